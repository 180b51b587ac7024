"""One generator for every embedded stand-in dataset (DESIGN.md §5).

Each sample has a latent *code*: for classification the +-1 code of its class (as this modality
sees it), for regression the target factors this modality observes. The code is rendered into a
tensor of the modality's kind: spectrogram / image / frames get small motifs stamped at random
positions with amplitude = code value; sequences carry the mixed code on random time steps;
vectors are a random linear mix. Two documented knob families per modality:

informativeness (how much of the label the modality carries: which classes, at what noise)
  ``pair_signal`` the dataset groups a fraction ``StandinConfig.pairs`` of its classes into pairs;
                 a class code = [code of its group | +-1 within-pair bits]. This knob scales the
                 within-pair bits: 0 = the modality tells pair members apart only by chance, 1 = as
                 clearly as the groups; so modalities can differ in *which* classes they separate;
  ``flip``       fraction of samples whose code is that of a uniformly random class;
  ``noise``      Gaussian noise on the code (code entries are +-1);
  ``factors``    regression only: indices of the target factors the modality observes.
learnability (how quickly a network extracts it)
  ``code``       ``linear``: each code entry is the sign of one motif (fast: a matched filter);
                 ``xor``: each entry is the sign *product* of two motifs, each of which alone is a
                 fair coin (slow: gradients are near zero until an interaction is found, so a
                 faster modality can take the loss away first); ``pair_code`` the same choice for
                 the within-pair bits (e.g. coarse classes slow, fine distinctions linear);
  ``amplitude``  signal scale against ``pixel_noise``; ``clutter`` label-free latent features
                 rendered the same way; ``density`` / ``motif`` / ``active_steps`` how often and
                 how large the code appears in the tensor.

The "world" (class codes, motifs, mixing matrices) depends only on (dataset, modality,
``world_seed``), so train and test share it; ``seed`` only changes which samples are drawn.
Generation runs in float64 NumPy and is cast to float32, so the bytes do not depend on threads.
``StandinConfig.scale`` > 0 renders the real spec shapes and real split sizes x scale (scale = 1:
the real ones, to exercise the GPU path at paper shapes; the knobs are calibrated at scale 0 only).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StandinModality:
    shape: list[int] = field(default_factory=lambda: [1, 16, 16])  # embedded shape (scale = 0)
    # -- informativeness
    pair_signal: float = 1.0
    flip: float = 0.0
    noise: float = 0.5
    factors: list[int] = field(default_factory=list)  # regression: observed target factors ([] = all)
    # -- learnability
    code: str = "linear"  # linear | xor (group code; regression: the factors)
    pair_code: str = ""  # code of the within-pair bits; "" = same as `code`
    bits: int = 0  # code length; 0 = ceil(log2(classes)) + 2
    amplitude: float = 1.0
    pixel_noise: float = 0.5
    clutter: int = 0
    motif: int = 3  # motif side (spectrogram / image / frames)
    density: float = 0.05  # fraction of positions stamped (embedded shape; scale > 0 keeps the count)
    active_steps: float = 0.5  # sequence: fraction of time steps carrying the code


@dataclass
class StandinConfig:
    n_train: int = 600  # embedded sizes (scale = 0); val is carved from train (val_fraction)
    n_test: int = 200
    n_val: int = 0  # 0: carve val_fraction from train (the protocol); > 0: draw a separate val split
    scale: float = 0.0  # 0: embedded shapes/sizes; > 0: the real spec shapes, real split sizes x scale
    real_n_train: int = 0  # real train (+ val) and test sizes, used when scale > 0
    real_n_test: int = 0
    pairs: float = 0.0  # classification: fraction of classes grouped in pairs (see pair_signal)
    n_factors: int = 8  # regression: target = sum of this many latent factors / sqrt(n)
    world_seed: int = 0
    modalities: dict[str, StandinModality] = field(default_factory=dict)


def _rng(*keys) -> np.random.Generator:
    """Independent stream named by its keys (stable across runs and platforms)."""
    h = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def group_codes(n_classes: int, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Random +-1 codes, one per class group: the best of a few draws by minimum Hamming distance
    (distinct whenever the draw allows; with many groups and few bits, collisions cap accuracy)."""
    best, best_d = None, -1
    for _ in range(16 if n_classes > 64 else 64):
        c = rng.choice([-1.0, 1.0], size=(n_classes, bits))
        g = c @ c.T
        np.fill_diagonal(g, -bits)
        d = (bits - g.max()) / 2  # min Hamming distance
        if d > best_d:
            best, best_d = c, d
    return best


def class_codes(n_classes: int, bits: int, pairs: float, pair_signal: float,
                rng: np.random.Generator) -> np.ndarray:
    """(C, bits + 2) codes: group code, then two within-pair bits scaled by ``pair_signal``.

    The last 2 * floor(pairs * C / 2) classes form consecutive pairs (lo, lo+1), ...; the two
    members of a pair share the group code and differ only in the within-pair bits.
    """
    n_pairs = int(np.floor(pairs * n_classes / 2 + 1e-9))
    lo = n_classes - 2 * n_pairs
    group = np.where(np.arange(n_classes) < lo, np.arange(n_classes), lo + (np.arange(n_classes) - lo) // 2)
    g = group_codes(int(group.max()) + 1, bits, rng)[group]
    within = np.where(np.arange(n_classes) < lo, 0.0, np.where((np.arange(n_classes) - lo) % 2 == 0, 1.0, -1.0))
    return np.concatenate([g, pair_signal * np.repeat(within[:, None], 2, axis=1)], axis=1)


def shown_classes(labels: np.ndarray, n_classes: int, m: StandinModality, rng: np.random.Generator) -> np.ndarray:
    """The class whose code each sample shows: its own, or a uniformly random one (``flip``)."""
    flip = rng.random(len(labels)) < m.flip
    return np.where(flip, rng.integers(0, n_classes, len(labels)), labels)


def _encode(b: np.ndarray, code: str, rng: np.random.Generator) -> np.ndarray:
    if code == "linear":
        return b
    if code == "xor":
        s = rng.choice([-1.0, 1.0], size=b.shape)  # random sign: each feature alone says nothing
        return np.stack([s, s * b], axis=2).reshape(len(b), -1)
    raise ValueError(f"stand-in code {code!r} not in (linear, xor)")


def latent(target: np.ndarray, task: str, n_classes: int, pairs: float, m: StandinModality,
           world: np.random.Generator, rng: np.random.Generator) -> np.ndarray:
    """(N, D) latent features carrying this modality's view of the label (before rendering)."""
    n = len(target)
    if task == "classification":
        bits = m.bits or int(np.ceil(np.log2(max(n_classes, 2)))) + 2
        b = class_codes(n_classes, bits, pairs, m.pair_signal, world)[shown_classes(target, n_classes, m, rng)]
    else:  # target holds the (N, K) factors
        bad = [f for f in m.factors if not 0 <= f < target.shape[1]]
        if bad:
            raise ValueError(f"stand-in factors {bad} out of range: n_factors is {target.shape[1]}")
        b = target[:, m.factors] if m.factors else target
    b = b + m.noise * rng.standard_normal(b.shape)
    if task == "classification":  # the last two entries are the within-pair bits
        z = np.concatenate([_encode(b[:, :-2], m.code, rng), _encode(b[:, -2:], m.pair_code or m.code, rng)], 1)
    else:
        z = _encode(b, m.code, rng)
    if m.clutter:
        z = np.concatenate([z, rng.choice([-1.0, 1.0], size=(n, m.clutter))], axis=1)
    return m.amplitude * z


def _stamp(z: np.ndarray, chans: int, h: int, w: int, m: StandinModality, stamps: float,
           motifs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """sum_j z_j * motif_j stamped at random positions shared by all j, plus pixel noise: (N, C, H, W)."""
    n, d = z.shape
    k = motifs.shape[-1]
    pos = rng.random((n, h, w)) < stamps / (h * w)
    pos[:, h // 2, w // 2] = True  # at least one stamp
    x = m.pixel_noise * rng.standard_normal((n, chans, h, w))
    pad = np.zeros((n, chans, h + k - 1, w + k - 1))
    nn_, yy, xx = np.nonzero(pos)
    vals = z[nn_] @ motifs.reshape(d, -1)  # (stamps, C*k*k): the full pattern of each stamp
    vals = vals.reshape(-1, chans, k, k)
    for dy in range(k):
        for dx in range(k):
            np.add.at(pad, (nn_, slice(None), yy + dy, xx + dx), vals[:, :, dy, dx])
    r = k // 2
    return x + pad[:, :, r:r + h, r:r + w]


def render(z: np.ndarray, kind: str, shape: tuple[int, ...], m: StandinModality, stamps: float,
           world: np.random.Generator, rng: np.random.Generator) -> np.ndarray:
    """Latent (N, D) -> tensor batch of the modality kind and shape (float64)."""
    n, d = z.shape
    if kind in ("spectrogram", "image", "frames"):
        c = shape[0]
        motifs = world.standard_normal((d, c, m.motif, m.motif))
        motifs /= np.linalg.norm(motifs.reshape(d, -1), axis=1)[:, None, None, None]  # unit energy
        if kind == "frames":
            _, t, h, w = shape
            return np.stack([_stamp(z, c, h, w, m, stamps, motifs, rng) for _ in range(t)], axis=2)
        return _stamp(z, c, shape[1], shape[2], m, stamps, motifs, rng)
    mix = world.standard_normal((d, shape[-1])) / np.sqrt(d)
    if kind == "vector":
        return z @ mix + m.pixel_noise * rng.standard_normal((n, shape[0]))
    if kind == "sequence":
        t = shape[0]
        on = rng.random((n, t, 1)) < m.active_steps
        on[:, 0] = True
        return on * (z @ mix)[:, None, :] + m.pixel_noise * rng.standard_normal((n, t, shape[1]))
    raise ValueError(f"unknown modality kind {kind!r}")


def generate(spec, cfg: StandinConfig, target: np.ndarray, seed: int, split: str,
             shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """float32 arrays for one split, every modality rendered from the shared target."""
    n_classes = len(spec.classes)
    out = {}
    for ms in spec.modalities:
        if ms.name not in cfg.modalities:
            raise KeyError(f"{spec.name}: stand-in config has no block for modality {ms.name!r} "
                           f"(datasets.{spec.name}.standin.modalities in params.yaml or g2d/data/{spec.name}.py)")
        m = cfg.modalities[ms.name]
        world = _rng(spec.name, ms.name, "world", cfg.world_seed)
        rng = _rng(spec.name, ms.name, split, seed)
        z = latent(target, spec.task, n_classes, cfg.pairs, m, world, rng)
        stamps = m.density * float(np.prod(m.shape[-2:])) if len(m.shape) >= 3 else 0.0
        x = render(z, ms.kind, shapes[ms.name], m, stamps, _rng(spec.name, ms.name, "render", cfg.world_seed), rng)
        out[ms.name] = x.astype(np.float32)
    return out


def balanced_labels(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Class-balanced labels (counts differ by at most one), shuffled."""
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    return labels.astype(np.int64)


def regression_factors(n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) standard-normal factors and the standardised target sum_k u_k / sqrt(K)."""
    u = rng.standard_normal((n, k))
    return u, u.sum(1) / np.sqrt(k)
