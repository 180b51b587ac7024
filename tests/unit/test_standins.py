"""Stand-in generator: shapes, dtypes, balance, determinism, shared world, knobs, scale=1 layout."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from g2d import registry
from g2d.data.base import DatasetSpec, ModalitySpec
from g2d.data.prepared import Prepared
from g2d.data.standin import (
    StandinConfig,
    StandinModality,
    _rng,
    class_codes,
    generate,
    latent,
    regression_factors,
)
from g2d.data.standin_dataset import standin_layout

DATASETS = ("cremad", "avmnist", "vggsound", "urfunny", "iemocap", "misme")
REAL_SIZES = {"cremad": (6698, 744), "avmnist": (60000, 10000), "vggsound": (183730, 15446),
              "urfunny": (13224, 3290), "iemocap": (3515, 938), "misme": (3601, 900)}


def small(name: str, **over):
    """The dataset with its embedded stand-in config, sizes shrunk for speed (knobs unchanged)."""
    ds = registry.get_dataset(name)()
    sc = ds.config.standin
    n_cls = max(len(ds.spec.classes), 10)  # regression: 10 quantile strata
    sizes = {"n_train": 20 * n_cls if n_cls < 20 else 2 * n_cls, "n_test": 4 * n_cls if n_cls < 20 else n_cls}
    if sc.n_val:
        sizes["n_val"] = n_cls
    ds.config.standin = dataclasses.replace(sc, **{**sizes, **over})
    return ds


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.npy")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = {}
    for name in DATASETS:
        ds = small(name)
        d = tmp_path_factory.mktemp(name)
        ds.standin(d / "a", seed=0)
        ds.standin(d / "b", seed=0)
        ds.standin(d / "c", seed=1)
        out[name] = (ds, d)
    return out


@pytest.mark.parametrize("name", DATASETS)
def test_shapes_dtypes_and_meta(generated, name):
    ds, d = generated[name]
    p = Prepared(d / "a")
    assert p.meta["source"] == "standin" and "NOT the real dataset" in p.meta["note"]
    assert set(p.meta["splits"]) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        arr = p.split(split)
        n = len(arr["label"])
        assert n > 0
        for m in ds.spec.modalities:
            want = tuple(ds.config.standin.modalities[m.name].shape)
            assert arr[m.name].shape == (n, *want), (split, m.name)
            assert len(want) == len(m.shape)  # same kind of tensor as the real data
            assert arr[m.name].dtype == np.float32
            assert np.isfinite(arr[m.name]).all()
            assert arr[m.name].std() > 0.05
        assert arr["index"].dtype == np.int64 and len(np.unique(arr["index"])) == n
        if ds.spec.task == "classification":
            assert arr["label"].dtype == np.int64
            assert arr["label"].min() >= 0 and arr["label"].max() < len(ds.spec.classes)
        else:
            assert arr["label"].dtype == np.float32


@pytest.mark.parametrize("name", [n for n in DATASETS if n != "misme"])
def test_class_balance_per_split(generated, name):
    ds, d = generated[name]
    p = Prepared(d / "a")
    k = len(ds.spec.classes)
    test = np.bincount(p.split("test")["label"], minlength=k)
    assert test.max() - test.min() <= 1
    both = np.bincount(np.concatenate([p.split("train")["label"], p.split("val")["label"]]), minlength=k)
    assert both.max() - both.min() <= 1
    for split in ("train", "val"):
        c = np.bincount(p.split(split)["label"], minlength=k)
        assert c.min() >= 1 and c.max() - c.min() <= 2, split


def test_regression_target_is_standardised(generated):
    ds, d = generated["misme"]
    y = np.concatenate([Prepared(d / "a").split(s)["label"] for s in ("train", "val", "test")])
    assert abs(y.mean()) < 0.3 and 0.7 < y.std() < 1.3
    assert Prepared(d / "a").split("train")["weather"].shape[1:] == (8,)


@pytest.mark.parametrize("name", DATASETS)
def test_same_seed_same_bytes_other_seed_other_samples(generated, name):
    ds, d = generated[name]
    assert digest(d / "a") == digest(d / "b")
    a, c = Prepared(d / "a").split("train"), Prepared(d / "c").split("train")
    for m in ds.spec.modality_names:
        assert not np.array_equal(a[m], c[m]), m
    assert json.loads((d / "a" / "meta.json").read_text())["standin_seed"] == 0


def test_train_and_test_share_the_world():
    """A centroid classifier fit on train generalises to test (and to another seed's data)."""
    spec = DatasetSpec("w", (ModalitySpec("v", "vector", (12,)),), "classification", tuple("abcd"))
    cfg = StandinConfig(modalities={"v": StandinModality(shape=[12], noise=0.3, pixel_noise=0.3)})
    y_tr, y_te = np.arange(400) % 4, np.arange(200) % 4
    x_tr = generate(spec, cfg, y_tr, 0, "train", {"v": (12,)})["v"]
    x_te = generate(spec, cfg, y_te, 7, "test", {"v": (12,)})["v"]
    cent = np.stack([x_tr[y_tr == c].mean(0) for c in range(4)])
    pred = np.argmin(((x_te[:, None] - cent[None]) ** 2).sum(-1), 1)
    assert (pred == y_te).mean() > 0.9
    # another world: the train centroids are useless
    x_other = generate(spec, dataclasses.replace(cfg, world_seed=5), y_te, 7, "test", {"v": (12,)})["v"]
    pred = np.argmin(((x_other[:, None] - cent[None]) ** 2).sum(-1), 1)
    assert (pred == y_te).mean() < 0.6


def test_pair_signal_controls_which_classes_are_separable():
    codes0 = class_codes(6, 3, 0.67, 0.0, _rng("t"))
    codes1 = class_codes(6, 3, 0.67, 1.0, _rng("t"))
    # classes 2,3 and 4,5 are pairs: identical codes without pair signal, distinct with it
    assert np.array_equal(codes0[2], codes0[3]) and np.array_equal(codes0[4], codes0[5])
    assert not np.array_equal(codes1[2], codes1[3]) and not np.array_equal(codes1[4], codes1[5])
    assert len({tuple(c) for c in codes0}) == 4 and len({tuple(c) for c in codes1}) == 6
    # the group part is shared by both settings; within-pair bits are +-pair_signal
    assert np.array_equal(codes0[:, :3], codes1[:, :3])
    assert np.array_equal(codes1[2, 3:], [1, 1]) and np.array_equal(codes1[3, 3:], [-1, -1])


def test_flip_and_noise_reduce_information():
    y = np.arange(3000) % 6
    m_clean = StandinModality(noise=0.0)
    m_flip = StandinModality(noise=0.0, flip=0.5)
    zc = latent(y, "classification", 6, 0.0, m_clean, _rng("w"), _rng("s"))
    zf = latent(y, "classification", 6, 0.0, m_flip, _rng("w"), _rng("s"))
    codes = class_codes(6, 5, 0.0, 1.0, _rng("w"))[:, :5]  # group part (no pairs here)

    def dec(z):  # nearest code: perfect when clean, ~ 1 - 0.5 * 5/6 with half the codes re-drawn
        return np.argmin(((z[:, None, :] - codes[None]) ** 2).sum(-1), 1)

    assert (dec(zc[:, :5]) == y).mean() == 1.0
    assert abs((dec(zf[:, :5]) == y).mean() - (1 - 0.5 * 5 / 6)) < 0.04
    zn = latent(y, "classification", 6, 0.0, StandinModality(noise=1.0), _rng("w"), _rng("s"))
    assert 0.3 < (dec(zn[:, :5]) == y).mean() < 0.95


def test_xor_code_hides_the_label_in_products():
    y = np.arange(4000) % 2
    m = StandinModality(code="xor", noise=0.0, bits=3)
    z = latent(y, "classification", 2, 0.0, m, _rng("w"), _rng("s"))
    bit = class_codes(2, 3, 0.0, 1.0, _rng("w"))[y, 0]
    assert z.shape[1] == 2 * (3 + 2)
    assert abs(np.corrcoef(z[:, 0], bit)[0, 1]) < 0.06 and abs(np.corrcoef(z[:, 1], bit)[0, 1]) < 0.06
    assert np.allclose(z[:, 0] * z[:, 1], bit)  # amplitude 1, no noise: the product is the bit


def test_regression_factors_observed():
    rng = np.random.default_rng(0)
    u, t = regression_factors(5000, 8, rng)
    assert np.allclose(t, u.sum(1) / np.sqrt(8)) and 0.9 < t.std() < 1.1
    z = latent(u, "regression", 0, 0.0, StandinModality(factors=[0, 1], noise=0.0), _rng("w"), _rng("s"))
    assert np.allclose(z, u[:, [0, 1]])


@pytest.mark.parametrize("name", DATASETS)
def test_scale_one_is_the_real_layout(name):
    ds = registry.get_dataset(name)()
    ds.config.standin = dataclasses.replace(ds.config.standin, scale=1.0)
    lay = standin_layout(ds)
    assert lay["shapes"] == {m.name: tuple(m.shape) for m in ds.spec.modalities}
    tr, te = REAL_SIZES[name]
    assert lay["sizes"]["test"] == te
    assert lay["sizes"]["train"] + lay["sizes"].get("val", 0) == tr
    emb = standin_layout(registry.get_dataset(name)())
    for m in ds.spec.modalities:  # embedded: same rank, smaller or equal tensors
        assert len(emb["shapes"][m.name]) == len(m.shape)
        assert np.prod(emb["shapes"][m.name]) <= np.prod(m.shape)


@pytest.mark.parametrize("name,n_test", [("cremad", 4), ("misme", 27), ("urfunny", 4)])
def test_scale_gives_real_shapes_when_generated(tmp_path, name, n_test):
    ds = registry.get_dataset(name)()
    real_test = ds.config.standin.real_n_test
    ds.config.standin = dataclasses.replace(ds.config.standin, scale=n_test / real_test)
    p = Prepared(ds.standin(tmp_path / name, seed=0))
    for m in ds.spec.modalities:
        assert p.split("test")[m.name].shape == (n_test, *m.shape)
        assert tuple(p.meta["modalities"][[x["name"] for x in p.meta["modalities"]].index(m.name)]["shape"]) == m.shape


def test_bad_knobs_raise_clear_errors(tmp_path):
    ds = small("cremad")
    ds.config.standin.modalities["visual"] = dataclasses.replace(ds.config.standin.modalities["visual"],
                                                                  code="nope")
    with pytest.raises(ValueError, match="nope"):
        ds.standin(tmp_path / "x", seed=0)
    ds = small("cremad")
    ds.config.standin.modalities["audio"] = dataclasses.replace(ds.config.standin.modalities["audio"],
                                                                 shape=[12, 12])
    with pytest.raises(ValueError, match="needs 3 dims"):
        standin_layout(ds)
    ds = small("cremad", n_train=12)
    with pytest.raises(ValueError, match="empty stratified val"):
        ds.standin(tmp_path / "y", seed=0)


def _fake_result(name, teacher, joint, metric="acc"):
    d = 1.0 if metric == "acc" else 0.01  # seed-to-seed spread
    rows = [{"role": "teacher", "modality": m, "seed": s, "value": v + d * s}
            for m, v in teacher.items() for s in (0, 1)]
    rows += [{"role": "joint", "modality": m, "seed": s, "value": v - d * s}
             for m, v in joint.items() for s in (0, 1)]
    ds = registry.get_dataset(name)()
    return {"dataset": name, "metric": metric, "rows": rows, "sec_per_run": {"teacher": 1.0, "joint": 2.0},
            "generate_s": 0.1, "standin": dataclasses.asdict(ds.config.standin),
            "trainer": {"optimizer": "sgd", "lr": 0.03, "batch_size": 32, "epochs": 20, "num_threads": 1},
            "model": {"resnet": {"width": 8}, "mlp_hidden": 64, "seq_hidden": 64, "fusion": "late"}}


def test_imbalance_checks_pass_and_fail_on_hand_made_tables():
    from g2d.calibrate import imbalance_checks, summarise

    good = summarise(_fake_result("cremad", {"audio": 61.0, "visual": 76.0},
                                  {"fused": 68.0, "audio": 60.0, "visual": 27.0}))
    row = good.set_index(["role", "modality"]).loc[("teacher", "audio")]
    assert row["mean"] == 61.5 and abs(row["std"] - np.std([61.0, 62.0], ddof=1)) < 1e-12 and row["target"] == 61.7
    assert all(imbalance_checks(good, "cremad").values())
    # visual head keeps 40.5 - 16.7 > 0.5 * (76.5 - 16.7): not collapsed -> the check fails
    bad = summarise(_fake_result("cremad", {"audio": 61.0, "visual": 76.0},
                                 {"fused": 68.0, "audio": 60.0, "visual": 48.0}))
    checks = imbalance_checks(bad, "cremad")
    assert not checks["visual head keeps <= 50% of its teacher's margin over chance"]
    assert checks["audio head keeps >= 75% of its teacher's margin over chance"]
    reg = summarise(_fake_result("misme", {"image": 0.4, "weather": 0.2},
                                 {"fused": 0.45, "image": 0.1, "weather": 0.0}, metric="r2"))
    assert all(imbalance_checks(reg, "misme").values())


def test_write_outputs_replaces_rerun_datasets(tmp_path):
    from g2d.calibrate import write_outputs

    md, csv = tmp_path / "c.md", tmp_path / "c.csv"
    write_outputs([_fake_result("avmnist", {"audio": 40.0, "image": 65.0}, {"fused": 69.0, "audio": 15.0,
                                                                           "image": 64.0})], md, csv)
    write_outputs([_fake_result("cremad", {"audio": 61.0, "visual": 76.0},
                                {"fused": 68.0, "audio": 60.0, "visual": 27.0})], md, csv)
    write_outputs([_fake_result("avmnist", {"audio": 41.0, "image": 66.0}, {"fused": 70.0, "audio": 15.0,
                                                                           "image": 64.0})], md, csv)
    import pandas as pd

    t = pd.read_csv(csv)
    assert list(t.dataset.unique()) == ["cremad", "avmnist"]  # suite order, avmnist replaced not duplicated
    assert len(t[t.dataset == "avmnist"]) == 5
    assert t.set_index(["dataset", "role", "modality"]).loc[("avmnist", "teacher", "audio"), "mean"] == 41.5
    text = md.read_text()
    assert "not the real datasets" in text and "## cremad" in text and "## avmnist" in text


def test_regression_factor_out_of_range_is_reported():
    u, _ = regression_factors(10, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="out of range"):
        latent(u, "regression", 0, 0.0, StandinModality(factors=[0, 7]), _rng("w"), _rng("s"))
