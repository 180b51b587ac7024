"""Train-time augmentation of the dataset contract (issue 10 item 1): torchvision-equivalent crops,
the official box distribution, eval untouched, bit-identical resume, teachers see the student's batch."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from g2d.config import ConfigError
from g2d.data.prepared import Prepared, write_prepared
from g2d.data.transforms import Augment, InputPipeline, crop_resize, rrc_boxes
from g2d.registry import get_dataset
from g2d.runs import prepared_dir
from g2d.train.trainer import RunSpec, Trainer
from tests.helpers import killed_during, tiny_config

RRC = {"datasets.cremad.augment.visual.recipe=rrc_flip"}


def _boxes_and_flips(n, h, w, seed=0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    g = torch.Generator().manual_seed(seed)
    return rrc_boxes(n, h, w, scale, ratio, g), torch.rand(n, generator=g) < 0.5


@pytest.mark.parametrize("stored,out", [((36, 48), (24, 24)), ((12, 12), (12, 12)), ((360, 480), (224, 224)),
                                        ((20, 16), (30, 40))])
def test_crop_resize_equals_torchvision_resized_crop(stored, out):
    """Same box -> our batched crop + antialiased bilinear resize (+ flip) = torchvision's resized_crop (+ hflip)."""
    n = 12
    x = torch.rand(n, 3, *stored, generator=torch.Generator().manual_seed(1))
    boxes, flip = _boxes_and_flips(n, *stored)
    y = crop_resize(x, boxes, out, flip)
    for k in range(n):
        top, left, h, w = boxes[k].tolist()
        ref = TF.resized_crop(x[k], top, left, h, w, list(out), interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        if flip[k]:
            ref = TF.hflip(ref)
        torch.testing.assert_close(y[k], ref, rtol=0, atol=2e-5)


def test_eval_resize_equals_torchvision_resize():
    x = torch.rand(5, 3, 36, 48)
    full = torch.tensor([[0, 0, 36, 48]]).expand(5, 4)
    torch.testing.assert_close(crop_resize(x, full, (24, 24)), TF.resize(x, [24, 24], antialias=True),
                               rtol=0, atol=2e-5)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


@pytest.mark.parametrize("hw,scale,ratio", [((360, 480), (0.08, 1.0), (3 / 4, 4 / 3)), ((12, 12), (0.08, 1.0), (3 / 4, 4 / 3)),
                                            ((30, 200), (0.5, 1.0), (3 / 4, 4 / 3))])
def test_crop_boxes_follow_torchvision_distribution(hw, scale, ratio):
    """Area fraction, aspect, position and the central fallback: our boxes vs torchvision's get_params.
    KS critical value at alpha = 0.001 for n = m = 4000 is 1.95 * sqrt(2 / 4000) = 0.044."""
    n = 4000
    h, w = hw
    ours = rrc_boxes(n, h, w, scale, ratio, torch.Generator().manual_seed(0)).numpy().astype(float)
    torch.manual_seed(0)
    img = torch.zeros(1, h, w)
    ref = np.array([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)], dtype=float)
    feats = {
        "area": lambda b: b[:, 2] * b[:, 3] / (h * w),
        "aspect": lambda b: np.log(b[:, 3] / b[:, 2]),
        "top": lambda b: (b[:, 0] + b[:, 2] / 2) / h,
        "left": lambda b: (b[:, 1] + b[:, 3] / 2) / w,
    }
    for name, f in feats.items():
        assert _ks(f(ours), f(ref)) < 0.044, name
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= h).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= w).all()
    # the share of central fallbacks matches too (frequent on the 30x200 strip)
    fb = lambda b: np.mean((b[:, 0] == (h - b[:, 2]) // 2) & (b[:, 1] == (w - b[:, 3]) // 2) & (b[:, 2] == h))  # noqa: E731
    assert abs(fb(ours) - fb(ref)) < 0.03


def test_flip_rate_and_imagenet_normalisation_match_torchvision():
    meta = {"modalities": [{"name": "visual", "kind": "frames", "shape": [3, 2, 16, 20], "dtype": "uint8"}],
            "inputs": {"visual": {"input_shape": [3, 2, 8, 8], "normalize": "imagenet"}}}
    pipe = InputPipeline(meta, {"visual": Augment(recipe="none")})
    x = torch.randint(0, 256, (4, 3, 2, 16, 20), dtype=torch.uint8)
    got = pipe.eval({"visual": x})["visual"]
    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    for b in range(4):
        for t in range(2):
            ref = norm(TF.resize(x[b, :, t].float() / 255, [8, 8], antialias=True))
            torch.testing.assert_close(got[b, :, t], ref, rtol=0, atol=1e-5)
    _, flip = _boxes_and_flips(20000, 8, 8)
    assert abs(flip.float().mean().item() - 0.5) < 0.015


def test_crop_keep_flip_keeps_the_box_in_place_and_zeroes_the_rest():
    """The stand-in recipe: rrc_flip's box and flip (same draws), no resize: content keeps its scale and place."""
    meta = {"modalities": [{"name": "visual", "kind": "frames", "shape": [3, 1, 12, 12], "dtype": "float32"}]}
    x = torch.rand(64, 3, 1, 12, 12) + 1.0  # no zeros in the input: a zero in the output is the mask
    a = Augment(recipe="crop_keep_flip", scale=[0.08, 1.0])
    got = InputPipeline(meta, {"visual": a}).train({"visual": x}, torch.Generator().manual_seed(3))["visual"]
    g = torch.Generator().manual_seed(3)  # the same stream: boxes, then flips
    boxes = rrc_boxes(64, 12, 12, a.scale, a.ratio, g)
    flip = torch.rand(64, generator=g) < a.flip_p
    for b in range(64):
        i, j, h, w = boxes[b].tolist()
        ref = torch.zeros(3, 12, 12)
        ref[:, i:i + h, j:j + w] = x[b, :, 0, i:i + h, j:j + w]
        if flip[b]:
            ref = ref.flip(-1)
        assert torch.equal(got[b, :, 0], ref)
    assert 0 < flip.float().mean() < 1 and (boxes[:, 2] * boxes[:, 3] < 144).any()


def test_random_window_and_fixed_eval_window():
    meta = {"modalities": [{"name": "audio", "kind": "spectrogram", "shape": [1, 4, 30], "dtype": "float32"}],
            "inputs": {"audio": {"input_shape": [1, 4, 10], "window_start": 0.5}}}
    pipe = InputPipeline(meta, {"audio": Augment(recipe="random_window")})
    x = torch.arange(30.0).expand(64, 1, 4, 30).contiguous()
    ev = pipe.eval({"audio": x})["audio"]
    assert torch.equal(ev, x[..., 10:20])  # round(0.5 * (30 - 10)) = 10
    tr = pipe.train({"audio": x}, torch.Generator().manual_seed(0))["audio"]
    starts = tr[:, 0, 0, 0].long()
    assert starts.min() >= 0 and starts.max() <= 20 and len(set(starts.tolist())) > 10
    for b in range(64):
        assert torch.equal(tr[b], x[b, ..., starts[b]:starts[b] + 10])


def test_config_rejects_augment_that_does_not_fit(tmp_path):
    with pytest.raises(ConfigError, match=r"datasets.cremad.augment: audio.recipe='rrc_flip' needs a frames/image"):
        tiny_config(tmp_path, ["+datasets.cremad.augment.audio={recipe: rrc_flip}"])
    with pytest.raises(ConfigError, match=r"datasets.cremad.augment: unknown modalities \['text'\]"):
        tiny_config(tmp_path, ["+datasets.cremad.augment.text={recipe: none}"])
    with pytest.raises(ConfigError, match=r"visual.scale=\[0.0, 1.0\]"):
        tiny_config(tmp_path, ["+datasets.cremad.augment.visual.scale=[0.0,1.0]"])


def test_declared_recipes_are_the_official_ones():
    assert get_dataset("cremad").augment["visual"] == {"recipe": "rrc_flip", "scale": [0.08, 1.0],
                                                       "ratio": [3 / 4, 4 / 3], "flip_p": 0.5}
    assert get_dataset("vggsound").augment["audio"]["recipe"] == "random_window"


# ---- through the trainer, on a real-format prepared CREMA-D (uint8 frames larger than the input) ----------
def write_uint8_cremad(out: Path, n=(24, 8, 12)) -> Path:
    """CREMA-D-format prepared data at tiny sizes: frames stored uint8 (3, 1, 18, 24), input (3, 1, 12, 12)."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, size in zip(("train", "val", "test"), n):
        y = np.arange(size) % 6
        rng.shuffle(y)
        a = rng.standard_normal((size, 1, 8, 6)).astype(np.float32)
        a[:, 0, y % 8, 0] += 2.0
        v = rng.integers(0, 256, (size, 3, 1, 18, 24)).astype(np.uint8)
        v[np.arange(size), y % 3, 0, 4:14, 6:18] = 250
        splits[split] = {"audio": a, "visual": v, "label": y.astype(np.int64), "index": np.arange(size, dtype=np.int64)}
    return write_prepared(out, get_dataset("cremad").spec, splits,
                          {"source": "real", "inputs": {"visual": {"input_shape": [3, 1, 12, 12], "normalize": "imagenet"}}})


def _cfg(tmp_path, overrides=()):
    cfg = tiny_config(tmp_path, ["trainer.epochs=4", "trainer.batch_size=8", *overrides])
    write_uint8_cremad(prepared_dir(cfg, "cremad"))
    return cfg


def _fit(cfg, name, method="joint", seed=0):
    run_dir = Path(cfg.paths.runs) / name / f"s{seed}"
    return Trainer(cfg, RunSpec(method, "cremad", seed, run_dir, prepared_dir(cfg, "cremad"), Path(cfg.paths.runs))).fit()


def test_spec_is_the_input_shape_and_eval_is_untouched_by_augmentation(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, sorted(RRC))
    tr = Trainer(cfg, RunSpec("joint", "cremad", 0, tmp_path / "r", prepared_dir(cfg, "cremad")))
    assert tr.spec.modality("visual").shape == (3, 1, 12, 12)
    assert Prepared(prepared_dir(cfg, "cremad")).split("train")["visual"].shape[1:] == (3, 1, 18, 24)
    plain = Trainer(tiny_config(tmp_path, ["trainer.epochs=4", "trainer.batch_size=8"]),
                    RunSpec("joint", "cremad", 0, tmp_path / "p", prepared_dir(cfg, "cremad")))
    from g2d.models.model import MultimodalModel

    model = MultimodalModel(tr.spec, cfg.model)
    seen = {}
    for name, t in (("rrc", tr), ("none", plain)):
        t._ctx = type("C", (), {"autocast": staticmethod(lambda: torch.autocast("cpu", enabled=False))})()
        seen[name] = t.evaluate(model, "test")
    assert seen["rrc"] == seen["none"]  # evaluation inputs do not depend on the train recipe
    batch = {k: torch.from_numpy(np.array(v)) for k, v in Prepared(prepared_dir(cfg, "cremad")).split("test").items()}
    a, b = tr.inputs.eval(batch), tr.inputs.eval(batch)
    assert torch.equal(a["visual"], b["visual"]) and a["visual"].shape[-2:] == (12, 12)


def test_training_batches_are_augmented_and_teachers_see_the_same_batch(tmp_path, monkeypatch):
    from g2d.methods.base import Context

    cfg = _cfg(tmp_path, sorted(RRC))
    from g2d.runs import train_group

    train_group(cfg, "unimodal", "cremad", [0], "visual")
    train_group(cfg, "unimodal", "cremad", [0], "audio")
    seen = {"student": [], "teacher": []}
    orig_teacher = Context.teacher_outputs

    def spy(self, batch):
        seen["teacher"].append(batch["visual"])
        return orig_teacher(self, batch)

    monkeypatch.setattr(Context, "teacher_outputs", spy)
    from g2d.methods.g2d import G2DLoss

    orig_loss = G2DLoss.loss

    def spy_loss(self, batch, out, ctx):
        seen["student"].append(batch["visual"])
        return orig_loss(self, batch, out, ctx)

    monkeypatch.setattr(G2DLoss, "loss", spy_loss)
    res = _fit(cfg, "g2d-cremad", method="g2d")
    teacher_ids = {id(t) for t in seen["teacher"]}  # both lists keep their tensors alive: ids are unique
    assert seen["student"] and all(id(s) in teacher_ids for s in seen["student"])
    first = seen["student"][0]
    assert first.shape[-2:] == (12, 12)
    stored = Prepared(prepared_dir(cfg, "cremad")).split("train")
    resized = InputPipeline(Prepared(prepared_dir(cfg, "cremad")).meta, {}).eval(
        {k: torch.from_numpy(np.array(v)) for k, v in stored.items()})["visual"]
    # no training batch equals an un-augmented (eval-resized) view of any stored frame
    assert not any(torch.allclose(first[0], r, atol=1e-4) for r in resized)
    assert res["inputs"]["visual"]["recipe"] == "rrc_flip" and res["inputs"]["visual"]["stored_shape"] == [3, 1, 18, 24]
    assert set(res["teachers"]) == {"audio", "visual"}


def test_resume_with_augmentation_is_bit_identical(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, sorted(RRC))
    full = _fit(cfg, "full")
    killed_during(monkeypatch, lambda: _fit(cfg, "crash"), eval_call=5)  # epochs 0 and 1 are checkpointed
    resumed = _fit(cfg, "crash")
    assert resumed["selection"] == full["selection"]
    h1 = pd.read_csv(Path(cfg.paths.runs) / "full/s0/history.csv").drop(columns="time_s")
    h2 = pd.read_csv(Path(cfg.paths.runs) / "crash/s0/history.csv").drop(columns="time_s")
    pd.testing.assert_frame_equal(h1, h2)
    a = torch.load(Path(cfg.paths.runs) / "full/s0/model.pt")["model"]
    b = torch.load(Path(cfg.paths.runs) / "crash/s0/model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the augmentation really changes training: same seed without it gives another trajectory
    plain = _fit(tiny_config(tmp_path, ["trainer.epochs=4", "trainer.batch_size=8",
                                        "datasets.cremad.augment.visual.recipe=none"]), "plain")
    h3 = pd.read_csv(Path(cfg.paths.runs) / "plain/s0/history.csv")
    assert not math.isclose(h3["train/loss"].iloc[0], h1["train/loss"].iloc[0])
    assert json.loads((Path(cfg.paths.runs) / "full/s0/metrics.json").read_text())["inputs"]["visual"]["recipe"] == "rrc_flip"
    assert plain["inputs"]["visual"]["recipe"] == "none"
