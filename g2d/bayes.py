"""Bayes ceilings of a stand-in, from its generator alone (no training; issue 11).

The stand-in generator (g2d/data/standin.py) draws, per modality m, a latent code b_m: the code of the class
the sample shows (its own, or with probability `flip` a uniformly random one) plus N(0, noise^2) per entry;
the code is then encoded (linear or xor) and rendered into a tensor with pixel noise. The latent is known
exactly, so the Bayes-optimal accuracy *given the latent codes* follows by construction:

    p(b_m | y) = (1 - flip_m) N(b_m; C_m[y], s_m^2 I) + flip_m / K * sum_c N(b_m; C_m[c], s_m^2 I)
    p(y | b_1..b_M) ∝ prod_m p(b_m | y)        (modalities are drawn independently given y; uniform prior)

(xor encoding is lossless given the latent: each entry is the product of its two rendered signs.) Rendering
only adds noise, so these are upper bounds on what any model of the rendered tensors can reach: the
ceilings "well above the best teacher" that real data has (CREMA-D: a balanced model 85.9 vs the best
teacher 76.5). Estimated by Monte Carlo with a fixed seed (N samples; standard error <= 50/sqrt(N) points).

Regression: the target is sum_k u_k / sqrt(K) of standard-normal factors, modality m observes its factors
plus N(0, noise_m^2); the posterior variance of each factor is 1 / (1 + sum over observing m of 1/noise_m^2)
in closed form, and the Bayes RMSE is sqrt(mean_k Var(u_k | obs)).
"""
from __future__ import annotations

import numpy as np

from g2d.data.standin import StandinConfig, _rng, class_codes

N_SAMPLES = 20000
MIN_NOISE = 1e-3  # a noise-free code is a point mass; a tiny width keeps the likelihood finite


def _codes(spec, cfg: StandinConfig, name: str) -> np.ndarray:
    """Class codes C_m (K, bits + 2) exactly as `standin.latent` draws them (first draw of the world stream)."""
    m = cfg.modalities[name]
    k = len(spec.classes)
    bits = m.bits or int(np.ceil(np.log2(max(k, 2)))) + 2
    return class_codes(k, bits, cfg.pairs, m.pair_signal, _rng(spec.name, name, "world", cfg.world_seed))


def _loglik(b: np.ndarray, codes: np.ndarray, noise: float, flip: float) -> np.ndarray:
    """(N, K) log p(b | y) of the flip-mixture above."""
    s2 = max(noise, MIN_NOISE) ** 2
    d2 = ((b[:, None, :] - codes[None, :, :]) ** 2).sum(-1)  # (N, K)
    g = -0.5 * d2 / s2
    mx = g.max(1, keepdims=True)
    own = np.exp(g - mx)
    mix = (1 - flip) * own + flip * own.mean(1, keepdims=True)
    with np.errstate(divide="ignore"):  # log 0 = -inf: a class the code rules out
        return np.log(mix) + mx


def classification_ceilings(spec, cfg: StandinConfig, n: int = N_SAMPLES, seed: int = 0) -> dict[str, float]:
    """{modality: Bayes accuracy %, ..., "all": Bayes accuracy of all modalities together}."""
    k = len(spec.classes)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    total = np.zeros((n, k))
    out = {}
    for ms in spec.modalities:
        m = cfg.modalities[ms.name]
        codes = _codes(spec, cfg, ms.name)
        shown = np.where(rng.random(n) < m.flip, rng.integers(0, k, n), y)
        b = codes[shown] + m.noise * rng.standard_normal((n, codes.shape[1]))
        ll = _loglik(b, codes, m.noise, m.flip)
        out[ms.name] = _accuracy(ll, y, rng)
        total += ll
    out["all"] = _accuracy(total, y, rng)
    return out


def _accuracy(ll: np.ndarray, y: np.ndarray, rng) -> float:
    """Accuracy of the MAP class, ties broken uniformly at random (as a Bayes classifier may)."""
    best = ll.max(1, keepdims=True)
    tied = np.isclose(ll, best, rtol=0, atol=1e-9)
    pick = np.array([rng.choice(np.flatnonzero(t)) for t in tied])
    return float((pick == y).mean() * 100)


def regression_ceilings(spec, cfg: StandinConfig) -> dict[str, float]:
    """{modality: Bayes RMSE of the standardised target, ..., "all": all modalities together}."""
    kf = cfg.n_factors
    prec = {ms.name: np.zeros(kf) for ms in spec.modalities}
    for ms in spec.modalities:
        m = cfg.modalities[ms.name]
        idx = m.factors or list(range(kf))
        prec[ms.name][idx] = 1.0 / max(m.noise, MIN_NOISE) ** 2
    rmse = lambda p: float(np.sqrt(np.mean(1.0 / (1.0 + p))))  # noqa: E731
    out = {name: rmse(p) for name, p in prec.items()}
    out["all"] = rmse(sum(prec.values()))
    return out


def ceilings(dataset) -> dict[str, float]:
    """Bayes ceilings of a registered dataset's stand-in (its configured knobs)."""
    cfg = dataset.config.standin
    if dataset.spec.task == "classification":
        return classification_ceilings(dataset.spec, cfg)
    return regression_ceilings(dataset.spec, cfg)
