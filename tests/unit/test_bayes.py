"""Bayes ceilings of the stand-in generator (g2d/bayes.py) against hand computations."""
import dataclasses

import numpy as np
import pytest

from g2d import bayes, registry
from g2d.data.standin import StandinConfig, StandinModality, _rng, latent


def _spec(name="cremad"):
    return registry.get_dataset(name).spec


def _cfg(**mods):
    return StandinConfig(pairs=0.67, modalities={k: StandinModality(**v) for k, v in mods.items()})


def test_codes_are_the_generators_codes():
    """With no noise and no flips the generator's latent is exactly the class code Bayes uses."""
    spec = _spec()
    cfg = _cfg(audio={"noise": 0.0, "flip": 0.0, "pair_signal": 0.3}, visual={"noise": 0.0, "bits": 3})
    y = np.arange(60) % 6
    for name in ("audio", "visual"):
        m = cfg.modalities[name]
        z = latent(y, "classification", 6, cfg.pairs, m, _rng(spec.name, name, "world", cfg.world_seed), _rng("s"))
        assert np.array_equal(z, bayes._codes(spec, cfg, name)[y])


def test_pair_blind_flipping_modality_matches_the_closed_form():
    """pairs 0.67 of 6 classes = 2 pairs + 2 singletons; pair_signal 0 hides the pair member, so the Bayes
    classifier is right w.p. 1 on singletons and 1/2 in pairs, and w.p. 1/6 on a flipped sample:
    acc = (1 - f) * 2/3 + f / 6."""
    for flip in (0.0, 0.1, 0.3):
        cfg = _cfg(audio={"noise": 0.1, "flip": flip, "pair_signal": 0.0}, visual={"noise": 0.1})
        acc = bayes.classification_ceilings(_spec(), cfg, n=40000)
        expect = 100 * ((1 - flip) * 2 / 3 + flip / 6)
        assert acc["audio"] == pytest.approx(expect, abs=0.8)  # MC standard error ~0.25 points
        assert acc["visual"] == pytest.approx(100.0, abs=0.1)  # clean, full codes: every class separable
        assert acc["all"] >= max(acc["audio"], acc["visual"]) - 0.3


def test_noise_lowers_the_ceiling_monotonically():
    accs = [bayes.classification_ceilings(_spec(), _cfg(audio={"noise": s}, visual={"noise": s}), n=20000)["all"]
            for s in (0.2, 0.6, 1.2)]
    assert accs[0] > accs[1] > accs[2] > 100 / 6


def test_regression_ceiling_equals_a_monte_carlo_posterior_mean():
    spec = _spec("misme")
    cfg = StandinConfig(n_factors=4, modalities={"image": StandinModality(noise=0.5, factors=[0, 1]),
                                                 "weather": StandinModality(noise=1.0, factors=[1, 2])})
    got = bayes.regression_ceilings(spec, cfg)
    rng = np.random.default_rng(0)
    u = rng.standard_normal((200000, 4))
    t = u.sum(1) / 2
    o_img = u[:, [0, 1]] + 0.5 * rng.standard_normal((200000, 2))
    o_w = u[:, [1, 2]] + 1.0 * rng.standard_normal((200000, 2))
    # posterior means of the factors (Gaussian, precisions add): u0 <- image; u1 <- both; u2 <- weather; u3 <- none
    p_i, p_w = 1 / 0.25, 1.0
    m0 = p_i * o_img[:, 0] / (1 + p_i)
    m1 = (p_i * o_img[:, 1] + p_w * o_w[:, 0]) / (1 + p_i + p_w)
    m2 = p_w * o_w[:, 1] / (1 + p_w)
    rmse = np.sqrt(np.mean((t - (m0 + m1 + m2) / 2) ** 2))
    assert got["all"] == pytest.approx(rmse, abs=0.005)
    assert got["image"] > got["all"] and got["weather"] > got["all"]


def test_every_registered_standin_has_ceilings_above_chance():
    from g2d import config as C

    cfg = C.load_config([])
    for name in ("cremad", "avmnist", "urfunny", "iemocap"):
        ds = registry.get_dataset(name)(C.dataset_config(cfg, name))
        small = dataclasses.replace(ds.config.standin)
        out = bayes.classification_ceilings(ds.spec, small, n=4000)
        assert set(out) == {*ds.spec.modality_names, "all"}
        assert all(100 / len(ds.spec.classes) < v <= 100 for v in out.values())
