"""Stored arrays -> model inputs, and the train-time augmentation of the dataset contract.

Every prepared modality is turned into a model input by one pipeline (`InputPipeline`):
uint8 -> float / 255, an optional ImageNet normalisation, a resize of stored frames to the model's
input size (evaluation: torchvision `Resize((H, W))`), or a time window of a longer stored spectrogram.
At training time a modality may add its dataset's augmentation recipe:

- `rrc_flip` (frames, image): torchvision `RandomResizedCrop(size, scale, ratio)` + `RandomHorizontalFlip(p)`,
  the official OGM-GE / G2D recipe (OGM-GE `dataset/CramedDataset.py` @343dc1d; G2D `dataset/CremadDataset.py`
  @95969d8). Each frame of a clip draws its own box and flip, as the official per-frame transform does.
- `random_window` (spectrogram): a uniformly random window of the input length from the stored one
  (official VGGSound: a random 5-s crop of the tiled 10-s clip; evaluation here reads a fixed window).
- `crop_keep_flip` (frames, image): the same box and flip as `rrc_flip`, but without the resize: pixels
  outside the box are set to 0 and the content keeps its place and scale. For the embedded stand-ins, whose
  12x12 frames carry 3x3 motifs: a real 224-px face still reads as a face after the official crop is blown up
  to 224 (CNN features tolerate that scale change), while a 3x3 motif blown up 3.5x no longer matches any
  filter the network has learned (measured: the stand-in visual teacher fell from 71 % to 59 % under
  `rrc_flip`). Keeping the scale removes what a crop removes (the part of the image outside the box) and
  nothing else. Not an official recipe; used only by the stand-ins (reports/calibration.md).
- `none`: evaluation inputs at training time too.

Everything is batched on the batch's device: one crop box per image, then a crop + antialiased bilinear
resize as two matrix products per image (the separable triangle filter of torch's `interpolate(...,
antialias=True)`, which is what torchvision's tensor `resized_crop` runs), flips by reversing the output
columns. Boxes and flips are drawn on the CPU from the run's own generator, so they do not depend on the
device and a resumed run draws the same ones.

Deviations from the official pipeline (documented, tested where testable): the official code crops a PIL
uint8 image and rounds the resized pixels to uint8 before /255; here the crop is resized in float (no
rounding). The boxes follow torchvision's sampling rule (10 tries, then the central fallback) and its
distribution, but not its random stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

RECIPES = {"none": (), "rrc_flip": ("frames", "image"), "crop_keep_flip": ("frames", "image"),
           "random_window": ("spectrogram",)}
BOXED = ("rrc_flip", "crop_keep_flip")  # recipes that draw RandomResizedCrop boxes
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
NORMALIZE = ("none", "imagenet")


@dataclass
class Augment:
    """One modality's train-time augmentation (`datasets.<name>.augment.<modality>` in params.yaml)."""

    recipe: str = "none"  # none | rrc_flip | crop_keep_flip (frames, image) | random_window (spectrogram)
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # rrc: area fraction (torchvision default)
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # rrc: aspect w/h range (torchvision default)
    flip_p: float = 0.5  # rrc: horizontal flip probability (RandomHorizontalFlip default)


def _as_augment(value, where: str) -> Augment:
    if isinstance(value, Augment):
        return value
    if value is None or value == "none":
        return Augment()
    if isinstance(value, str):
        return Augment(recipe=value)
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a recipe name or a mapping, got {value!r}")
    known = {f.name for f in fields(Augment)}
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
    out = Augment(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(value).items()})
    return out


def resolve_augment(declared: dict, overrides: dict | None, spec) -> dict[str, Augment]:
    """The dataset's declared recipes with params.yaml overrides merged in, checked against the spec."""
    out = {}
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(spec.modality_names)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; {spec.name} has {list(spec.modality_names)}")
    for m in spec.modalities:
        base = _as_augment(declared.get(m.name), m.name)
        over = overrides.get(m.name)
        if over is not None:
            if isinstance(over, str) or over is None:
                base = _as_augment(over, m.name)
            else:
                merged = {f.name: getattr(base, f.name) for f in fields(Augment)}
                merged.update({k: v for k, v in dict(over).items()})
                base = _as_augment(merged, m.name)
        _check(base, m.kind, m.name)
        out[m.name] = base
    return out


def _check(a: Augment, kind: str, where: str) -> None:
    if a.recipe not in RECIPES:
        raise ValueError(f"{where}.recipe={a.recipe!r} not in {tuple(RECIPES)}")
    if a.recipe != "none" and kind not in RECIPES[a.recipe]:
        raise ValueError(f"{where}.recipe={a.recipe!r} needs a {'/'.join(RECIPES[a.recipe])} modality; "
                         f"{where} is {kind} (use none)")
    lo, hi = (list(a.scale) + [0, 0])[:2]
    if len(a.scale) != 2 or not 0 < lo <= hi <= 1:
        raise ValueError(f"{where}.scale={list(a.scale)}: need [lo, hi] with 0 < lo <= hi <= 1")
    if len(a.ratio) != 2 or not 0 < a.ratio[0] <= a.ratio[1]:
        raise ValueError(f"{where}.ratio={list(a.ratio)}: need [lo, hi] with 0 < lo <= hi")
    if not 0 <= a.flip_p <= 1:
        raise ValueError(f"{where}.flip_p={a.flip_p}: must be in [0, 1]")


def check_augment(spec, overrides: dict) -> None:
    """Config-time check of a `datasets.<name>.augment` block (raises ValueError with the key)."""
    from g2d import registry

    declared = getattr(registry.get_dataset(spec.name), "augment", {}) or {}
    resolve_augment(declared, overrides, spec)


# ---- crop boxes -----------------------------------------------------------------------------------
def rrc_boxes(n: int, height: int, width: int, scale, ratio, gen: torch.Generator) -> torch.Tensor:
    """(n, 4) int64 boxes (top, left, h, w) by torchvision's `RandomResizedCrop.get_params` rule, batched.

    Ten tries of area ~ U(scale) * H * W and log-aspect ~ U(log ratio); the first box that fits wins,
    otherwise the central crop with the aspect clamped to `ratio` (torchvision v0.29 transforms.py).
    A fixed number of draws per call, so the stream does not depend on which try succeeded.
    """
    tries = 10
    area = height * width
    u_area = torch.rand(n, tries, generator=gen, dtype=torch.float64)
    u_ratio = torch.rand(n, tries, generator=gen, dtype=torch.float64)
    u_i = torch.rand(n, tries, generator=gen, dtype=torch.float64)
    u_j = torch.rand(n, tries, generator=gen, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect)).long()  # torch.round = round-half-even, as Python's round
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    i = torch.floor(u_i * (height - h + 1).clamp_min(1)).long()
    j = torch.floor(u_j * (width - w + 1).clamp_min(1)).long()
    first = torch.argmax(ok.long(), dim=1)  # index of the first fitting try (0 if none fits)
    pick = lambda t: t.gather(1, first[:, None]).squeeze(1)  # noqa: E731
    boxes = torch.stack([pick(i), pick(j), pick(h), pick(w)], 1)
    # central fallback (torchvision): aspect clamped to the ratio range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.long)
    none_fit = ~ok.any(1)
    boxes[none_fit] = fallback
    return boxes


def crop_keep(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W): zero outside each (top, left, h, w) box, content in place, then the flips."""
    _, _, hh, ww = x.shape
    rows = torch.arange(hh)[None, :]
    cols = torch.arange(ww)[None, :]
    in_r = (rows >= boxes[:, :1]) & (rows < boxes[:, :1] + boxes[:, 2:3])  # (N, H)
    in_c = (cols >= boxes[:, 1:2]) & (cols < boxes[:, 1:2] + boxes[:, 3:4])  # (N, W)
    mask = (in_r[:, :, None] & in_c[:, None, :]).to(x.device, x.dtype)[:, None]
    y = x * mask
    return torch.where(flip.to(x.device)[:, None, None, None], y.flip(-1), y)


# ---- crop + resize as matrix products -------------------------------------------------------------
def resize_weights(start: torch.Tensor, length: torch.Tensor, n_in: int, n_out: int,
                   dtype=torch.float32) -> torch.Tensor:
    """(N, n_out, n_in) rows of the antialiased bilinear resize of [start, start + length) to n_out.

    torch `_upsample_bilinear2d_aa` weights (aten UpSampleKernel.cpp, `_compute_indices_min_size_weights_aa`):
    scale = length / n_out, centre_i = scale (i + 0.5), support = max(scale, 1), w_ij = tri((j + 0.5 -
    centre_i) / support), rows normalised. For scale < 1 this is ordinary bilinear with align_corners=False.
    """
    start = start.to(torch.float64)[:, None, None]
    length = length.to(torch.float64)[:, None, None]
    scale = length / n_out
    centre = scale * (torch.arange(n_out, dtype=torch.float64)[None, :, None] + 0.5)
    support = scale.clamp_min(1.0)
    j = torch.arange(n_in, dtype=torch.float64)[None, None, :] - start  # pixel index inside the crop
    w = (1.0 - ((j + 0.5 - centre) / support).abs()).clamp_min(0.0)
    w = torch.where((j >= 0) & (j < length), w, torch.zeros_like(w))
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int],
                flip: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, C, H, W) float, boxes (N, 4) (top, left, h, w) -> (N, C, out_h, out_w); flip (N,) bool mirrors."""
    n, _, hh, ww = x.shape
    wy = resize_weights(boxes[:, 0], boxes[:, 2], hh, out_hw[0]).to(x.device)
    wx = resize_weights(boxes[:, 1], boxes[:, 3], ww, out_hw[1])
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    wx = wx.to(x.device)
    return torch.matmul(torch.matmul(wy[:, None], x), wx.transpose(1, 2)[:, None])


class InputPipeline:
    """Turns stored batches into model inputs; `train` adds each modality's augmentation recipe."""

    def __init__(self, meta: dict, augment: dict[str, Augment]):
        self.mods = {}
        inputs = meta.get("inputs") or {}
        for m in meta["modalities"]:
            name, stored = m["name"], tuple(m["shape"])
            info = inputs.get(name) or {}
            target = tuple(info.get("input_shape") or stored)
            norm = info.get("normalize", "none")
            if norm not in NORMALIZE:
                raise ValueError(f"meta.json inputs.{name}.normalize={norm!r} not in {NORMALIZE}")
            aug = augment.get(name, Augment())
            _check(aug, m["kind"], f"augment.{name}")
            if len(target) != len(stored):
                raise ValueError(f"meta.json inputs.{name}.input_shape={list(target)} vs stored {list(stored)}")
            self.mods[name] = {"kind": m["kind"], "stored": stored, "input": target, "norm": norm, "aug": aug,
                               "window_start": float(info.get("window_start", 0.5))}

    @property
    def augments(self) -> dict[str, Augment]:
        return {m: v["aug"] for m, v in self.mods.items()}

    def describe(self) -> dict:
        """What runs record in their provenance."""
        return {m: {"recipe": v["aug"].recipe, **({"scale": list(v["aug"].scale), "ratio": list(v["aug"].ratio),
                                                   "flip_p": v["aug"].flip_p} if v["aug"].recipe in BOXED else {}),
                    "input_shape": list(v["input"]), "stored_shape": list(v["stored"]), "normalize": v["norm"]}
                for m, v in self.mods.items()}

    def eval(self, batch: dict) -> dict:
        return self._apply(batch, None)

    def train(self, batch: dict, gen: torch.Generator) -> dict:
        return self._apply(batch, gen)

    def _apply(self, batch: dict, gen: torch.Generator | None) -> dict:
        out = dict(batch)
        for name, mod in self.mods.items():
            x = batch[name]
            if x.dtype == torch.uint8:
                x = x.float().div_(255.0)
            elif x.dtype != torch.float32 and x.is_floating_point():
                x = x.float()
            recipe = mod["aug"].recipe if gen is not None else "none"
            if mod["kind"] in ("frames", "image"):
                x = self._frames(x, mod, recipe, gen)
            elif mod["kind"] == "spectrogram":
                x = self._window(x, mod, recipe, gen)
            if mod["norm"] == "imagenet":
                x = _imagenet(x, mod["kind"])
            out[name] = x
        return out

    @staticmethod
    def _frames(x, mod, recipe, gen):
        stored, target = mod["stored"], mod["input"]
        if recipe == "none" and stored[-2:] == target[-2:]:
            return x
        b = x.shape[0]
        if mod["kind"] == "frames":  # (B, C, T, H, W) -> (B*T, C, H, W): one box per frame
            c, t, h, w = x.shape[1:]
            imgs = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        else:
            imgs = x
        n, hh, ww = imgs.shape[0], imgs.shape[-2], imgs.shape[-1]
        if recipe in BOXED:
            a = mod["aug"]
            boxes = rrc_boxes(n, hh, ww, a.scale, a.ratio, gen)
            flip = torch.rand(n, generator=gen) < a.flip_p
            if recipe == "crop_keep_flip":
                imgs = crop_keep(imgs, boxes, flip)
                boxes, flip = torch.tensor([[0, 0, hh, ww]], dtype=torch.long).expand(n, 4), None
        else:
            boxes = torch.tensor([[0, 0, hh, ww]], dtype=torch.long).expand(n, 4)
            flip = None
        y = crop_resize(imgs, boxes, target[-2:], flip)
        if mod["kind"] == "frames":
            y = y.reshape(b, t, c, *target[-2:]).permute(0, 2, 1, 3, 4).contiguous()
        return y

    @staticmethod
    def _window(x, mod, recipe, gen):
        t_in, t_st = mod["input"][-1], mod["stored"][-1]
        if t_st == t_in:
            return x
        if t_st < t_in:
            raise ValueError(f"stored spectrogram has {t_st} frames < input {t_in}")
        free = t_st - t_in
        b = x.shape[0]
        if recipe == "random_window":
            start = torch.floor(torch.rand(b, generator=gen, dtype=torch.float64) * (free + 1)).long()
        else:
            start = torch.full((b,), int(round(mod["window_start"] * free)), dtype=torch.long)
        idx = (start[:, None] + torch.arange(t_in)[None, :]).to(x.device)  # (B, T_in)
        shape = x.shape[:-1]
        flat = x.reshape(b, -1, t_st)
        return flat.gather(2, idx[:, None, :].expand(b, flat.shape[1], t_in)).reshape(*shape, t_in)


def _imagenet(x: torch.Tensor, kind: str) -> torch.Tensor:
    """torchvision Normalize(ImageNet mean, std) over the channel axis (axis 1 of image and frames)."""
    c = x.shape[1]
    if c != 3:
        raise ValueError(f"imagenet normalisation needs 3 channels, got {c}")
    view = (1, 3, 1, 1, 1) if kind == "frames" else (1, 3, 1, 1)
    mean = torch.tensor(IMAGENET["mean"], dtype=x.dtype, device=x.device).view(view)
    std = torch.tensor(IMAGENET["std"], dtype=x.dtype, device=x.device).view(view)
    return (x - mean) / std
