"""One generator for every embedded stand-in dataset.

Each modality gets a latent class code, rendered into a tensor of the modality's kind
(spectrogram / image / frames: motifs stamped at random positions; sequence: code present on
random time steps; vector: random linear mixing). Two documented knob families:

* informativeness (how much of the label the modality carries):
  ``groups`` - the modality only tells classes apart up to groups of this many consecutive
  classes; ``flip`` - fraction of samples whose code is that of a random class;
  ``noise`` - Gaussian noise on the latent code (relative to a unit code).
* learnability (how fast a network extracts it):
  ``code='linear'`` puts each class bit in the sign of one latent feature (fast);
  ``code='xor'`` puts it in the sign *product* of a pair of features, each uninformative alone
  (slow: the network must learn interactions); ``amplitude`` scales the signal against the
  fixed pixel noise; ``clutter`` adds label-independent latent features of the same form.

The "world" (codes, motifs, mixing matrices) is fixed by (dataset, modality, world_seed), so
train and test share it; ``seed`` only changes which samples are drawn.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class StandinModality:
    shape: list[int] = field(default_factory=lambda: [1, 32, 32])
    groups: int = 1
    flip: float = 0.0
    noise: float = 0.5
    code: str = "linear"  # linear | xor
    bits: int = 0  # 0 = enough bits for the classes (+2)
    amplitude: float = 1.0
    clutter: int = 0  # number of label-independent latent features
    pixel_noise: float = 0.5
    motif: int = 5  # motif side (image kinds)
    density: float = 0.02  # fraction of positions stamped with the motif
    active_steps: float = 0.5  # sequence kind: fraction of time steps carrying the code


@dataclass
class StandinConfig:
    n_train: int = 600
    n_test: int = 200
    world_seed: int = 0
    modalities: dict[str, StandinModality] = field(default_factory=dict)


def _rng(*keys) -> np.random.Generator:
    h = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def class_codes(n_classes: int, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Distinct +-1 codes, one per class (as far apart as random sampling allows)."""
    best, best_d = None, -1
    for _ in range(64):
        c = rng.choice([-1.0, 1.0], size=(n_classes, bits))
        d = min((np.abs(c[i] - c[j]).sum() for i in range(n_classes) for j in range(i)), default=bits)
        if d > best_d:
            best, best_d = c, d
    return best


def latent(labels: np.ndarray, n_classes: int, m: StandinModality, world: np.random.Generator,
           rng: np.random.Generator) -> np.ndarray:
    """(N, D) latent features carrying the modality's view of the label."""
    bits = m.bits or int(np.ceil(np.log2(max(n_classes, 2)))) + 2
    codes = class_codes(n_classes, bits, world)
    eff = (labels // max(m.groups, 1)) * max(m.groups, 1)  # informativeness: merge class groups
    flip = rng.random(len(labels)) < m.flip
    eff = np.where(flip, rng.integers(0, n_classes, len(labels)), eff)
    b = codes[eff] + m.noise * rng.standard_normal((len(labels), bits))
    if m.code == "linear":
        z = b
    elif m.code == "xor":
        s = rng.choice([-1.0, 1.0], size=b.shape)  # random sign: each feature alone says nothing
        z = np.stack([s, s * b], axis=2).reshape(len(labels), 2 * bits)
    else:
        raise ValueError(f"stand-in code {m.code!r} not in (linear, xor)")
    if m.clutter:
        z = np.concatenate([z, rng.standard_normal((len(labels), m.clutter))], axis=1)
    return (m.amplitude * z).astype(np.float32)


def _render_planes(z: np.ndarray, chans: int, h: int, w: int, m: StandinModality,
                   world: np.random.Generator, rng: np.random.Generator) -> np.ndarray:
    """Stamp motif_j * z_j at shared random positions: (N, chans, h, w)."""
    n, d = z.shape
    k = m.motif
    motifs = world.standard_normal((chans, d, k, k)).astype(np.float32)
    motifs /= np.linalg.norm(motifs.reshape(chans, d, -1), axis=(0, 2))[None, :, None, None] + 1e-8
    pos = (rng.random((n, 1, h, w)) < m.density).astype(np.float32)
    pos[:, 0, h // 2, w // 2] = 1.0  # at least one stamp
    planes = torch.from_numpy(z)[:, :, None, None] * torch.from_numpy(pos)
    x = F.conv2d(planes, torch.from_numpy(motifs), padding=k // 2)
    x = x + m.pixel_noise * torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    return x.numpy()


def render(z: np.ndarray, kind: str, shape: list[int], m: StandinModality,
           world: np.random.Generator, rng: np.random.Generator) -> np.ndarray:
    n, d = z.shape
    if kind in ("spectrogram", "image"):
        c, h, w = shape
        return _render_planes(z, c, h, w, m, world, rng)
    if kind == "frames":
        c, t, h, w = shape
        frames = [_render_planes(z, c, h, w, m, world, rng) for _ in range(t)]
        return np.stack(frames, axis=2)  # (N, C, T, H, W)
    if kind == "vector":
        (dim,) = shape
        mix = world.standard_normal((d, dim)).astype(np.float32) / np.sqrt(d)
        return (z @ mix + m.pixel_noise * rng.standard_normal((n, dim))).astype(np.float32)
    if kind == "sequence":
        t, dim = shape
        mix = world.standard_normal((d, dim)).astype(np.float32) / np.sqrt(d)
        on = (rng.random((n, t, 1)) < m.active_steps).astype(np.float32)
        on[:, 0] = 1.0
        x = on * (z @ mix)[:, None, :] + m.pixel_noise * rng.standard_normal((n, t, dim))
        return x.astype(np.float32)
    raise ValueError(f"unknown modality kind {kind!r}")


def generate(spec, cfg: StandinConfig, n: int, labels: np.ndarray, seed: int, split: str) -> dict[str, np.ndarray]:
    """Arrays for one split: every modality rendered from the shared labels."""
    n_classes = max(len(spec.classes), 2)
    out = {}
    for ms in spec.modalities:
        if ms.name not in cfg.modalities:
            raise KeyError(f"{spec.name}: stand-in config has no block for modality {ms.name!r}")
        m = cfg.modalities[ms.name]
        world = _rng(spec.name, ms.name, "world", cfg.world_seed)
        rng = _rng(spec.name, ms.name, split, seed)
        z = latent(labels, n_classes, m, world, rng)
        world_r = _rng(spec.name, ms.name, "render", cfg.world_seed)
        out[ms.name] = render(z, ms.kind, list(m.shape), m, world_r, rng)
    return out


def balanced_labels(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    return labels.astype(np.int64)
