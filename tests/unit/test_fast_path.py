"""The fast single-run path and the GPU worker pool, on the CPU: resident budget, pinned-prefetch loader,
drop_last, NaN-check interval, trainer.compile fallback, and the spawn pool driven by a fake GPU list
(G2D_FAKE_GPUS). Each option at its default leaves the CPU computation unchanged; each forced on gives the
same numbers (prefetch) or the documented difference (drop_last)."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from g2d.runs import FAKE_GPUS, Job, n_workers, prepared_dir, run_jobs, visible_gpus
from g2d.train.loader import BatchLoader
from g2d.train.trainer import RunSpec, Trainer
from tests.helpers import tiny_config, write_tiny_cremad


def _arrays(n=21):
    rng = np.random.default_rng(0)
    return {"audio": rng.standard_normal((n, 1, 4, 3)).astype(np.float32),
            "visual": rng.integers(0, 255, (n, 3, 1, 4, 4), dtype=np.uint8),
            "label": np.arange(n, dtype=np.int64) % 6, "index": np.arange(n, dtype=np.int64)}


def _batches(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


@pytest.mark.parametrize("resident_bytes,prefetch", [(0, False), (0, True), (2**30, False)])
def test_loader_paths_give_identical_batches(resident_bytes, prefetch):
    """Resident tensors, memory-mapped reads and the prefetch thread: same samples, same order, same values
    (the permutation is drawn in the caller's thread)."""
    arrays = _arrays()
    ref = _batches(BatchLoader(arrays, 5, torch.device("cpu"), shuffle=True,
                               generator=torch.Generator().manual_seed(3), resident_bytes=2**30))
    got_loader = BatchLoader(arrays, 5, torch.device("cpu"), shuffle=True, generator=torch.Generator().manual_seed(3),
                             resident_bytes=resident_bytes, prefetch=prefetch)
    assert got_loader.resident == (resident_bytes > 0)
    got = _batches(got_loader)
    assert len(got) == len(ref) == 5
    for a, b in zip(ref, got):
        assert set(a) == set(b)
        ia, ib = a["index"].argsort(), b["index"].argsort()  # mapped reads come sorted within a batch
        for k in a:
            assert a[k].dtype == b[k].dtype
            torch.testing.assert_close(a[k][ia], b[k][ib], rtol=0, atol=0)


def test_residency_budget():
    arrays = _arrays()
    total = sum(a.nbytes for a in arrays.values())
    assert BatchLoader(arrays, 4, torch.device("cpu"), resident_bytes=total).tensors is not None
    assert BatchLoader(arrays, 4, torch.device("cpu"), resident_bytes=total - 1).tensors is None


def test_drop_last():
    arrays = _arrays(21)
    full = BatchLoader(arrays, 5, torch.device("cpu"))
    drop = BatchLoader(arrays, 5, torch.device("cpu"), drop_last=True)
    assert [len(b["label"]) for b in full] == [5, 5, 5, 5, 1] and len(full) == 5
    assert [len(b["label"]) for b in drop] == [5, 5, 5, 5] and len(drop) == 4
    assert len(BatchLoader(arrays, 32, torch.device("cpu"), drop_last=True)) == 1  # never an empty epoch


def test_prefetch_errors_reach_the_caller_and_an_early_stop_ends_the_thread():
    import threading

    class Bad(dict):
        pass

    arrays = _arrays()
    loader = BatchLoader(arrays, 5, torch.device("cpu"), resident_bytes=0, prefetch=True)
    it = iter(loader)
    next(it)
    it.close()  # abandoned iteration: the worker thread stops
    assert not [t for t in threading.enumerate() if t.name == "g2d-prefetch"]
    loader.arrays = {**arrays, "audio": arrays["audio"][:3]}  # indexing past the end fails in the thread
    with pytest.raises(IndexError):
        list(loader)


def _fit(cfg, name, method="joint", seed=0):
    run_dir = Path(cfg.paths.runs) / name / f"s{seed}"
    res = Trainer(cfg, RunSpec(method, "cremad", seed, run_dir, prepared_dir(cfg, "cremad"),
                               Path(cfg.paths.runs))).fit()
    return res, pd.read_csv(run_dir / "history.csv").drop(columns="time_s")


def test_trainer_prefetch_from_mapped_arrays_equals_resident(tmp_path):
    """trainer.resident_gib=0 + prefetch=on (the CUDA path for large data) trains exactly as the default."""
    cfg = tiny_config(tmp_path, ["trainer.epochs=2", "trainer.batch_size=8"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))
    a, ha = _fit(cfg, "a")
    cfg2 = tiny_config(tmp_path, ["trainer.epochs=2", "trainer.batch_size=8", "trainer.resident_gib=0",
                                  "trainer.prefetch=on"])
    b, hb = _fit(cfg2, "b")
    pd.testing.assert_frame_equal(ha, hb)
    assert a["selection"] == b["selection"]


def test_defaults_keep_the_cpu_computation(tmp_path):
    cfg = tiny_config(tmp_path, ["trainer.epochs=1", "trainer.batch_size=5"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))
    tc = cfg.trainer
    assert (tc.resident_gib, tc.prefetch, tc.drop_last, tc.check_every, tc.compile) == (2.0, "auto", False, 0, False)
    tr = Trainer(cfg, RunSpec("joint", "cremad", 0, tmp_path / "r", prepared_dir(cfg, "cremad")))
    st = tr.build_training()
    assert st.ctx.check_every == 1 and st.train.resident and not st.train.prefetch
    assert len(st.train) == 5  # 24 samples, batch 5: the last partial batch is kept
    cfg = tiny_config(tmp_path, ["trainer.epochs=1", "trainer.batch_size=5", "trainer.drop_last=true",
                                 "trainer.check_every=7"])
    st = Trainer(cfg, RunSpec("joint", "cremad", 0, tmp_path / "r2", prepared_dir(cfg, "cremad"))).build_training()
    assert st.ctx.check_every == 7 and len(st.train) == 4


@pytest.mark.parametrize("bad", ["trainer.resident_gib=-1", "trainer.prefetch=maybe", "trainer.check_every=-2",
                                 "workers_per_gpu=0"])
def test_new_keys_are_validated(tmp_path, bad):
    from g2d.config import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        tiny_config(tmp_path, [bad])


def test_compile_failure_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, ["trainer.epochs=1", "trainer.batch_size=8"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))
    a, ha = _fit(cfg, "a")

    def broken(self, *a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch.nn.Module, "compile", broken)
    cfg = tiny_config(tmp_path, ["trainer.epochs=1", "trainer.batch_size=8", "trainer.compile=true"])
    capsys.readouterr()
    b, hb = _fit(cfg, "b")
    warn = [li for li in capsys.readouterr().err.splitlines() if "trainer.compile" in li]
    assert len(warn) == 1 and "training eagerly" in warn[0]
    pd.testing.assert_frame_equal(ha, hb)


# ---- the worker pool with a fake GPU list -----------------------------------------------------------------
def test_visible_gpus_and_slots(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, ["trainer.device=cpu", "workers_per_gpu=3"])
    monkeypatch.delenv(FAKE_GPUS, raising=False)
    assert visible_gpus(cfg) == []
    monkeypatch.setenv(FAKE_GPUS, "4,7")
    assert visible_gpus(cfg) == ["4", "7"]
    assert n_workers(cfg, 100) == 6 and n_workers(cfg, 4) == 4
    monkeypatch.delenv(FAKE_GPUS)
    assert n_workers(cfg, 100, gpus=[]) == min(100, cfg.workers or __import__("os").cpu_count())


def test_fake_gpu_pool_pins_each_worker_and_matches_sequential(tmp_path, monkeypatch, capfd):
    """Two fake GPUs x 2 slots: spawned workers, each with its slot's CUDA_VISIBLE_DEVICES; results equal a
    sequential run's (same seeds)."""
    cfg = tiny_config(tmp_path, ["trainer.epochs=1", "trainer.batch_size=8", "trainer.device=cpu",
                                 "workers_per_gpu=2", "trainer.checkpoint_every=0"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))
    seeds = [0, 1, 2]
    monkeypatch.setenv(FAKE_GPUS, "3,5")
    capfd.readouterr()
    pooled = run_jobs(cfg, [Job("joint", "cremad", s, None, tmp_path / "pool") for s in seeds])
    err = capfd.readouterr().err
    lines = re.findall(r"worker (\d+): CUDA_VISIBLE_DEVICES=(\S+): (\S+)", err)
    assert len(lines) == 3, err
    assert {g for _, g, _ in lines} == {"3", "5"}  # round-robin over the GPUs
    assert len({pid for pid, _, _ in lines}) == 3  # one process per run
    monkeypatch.delenv(FAKE_GPUS)
    cfg1 = tiny_config(tmp_path, ["trainer.epochs=1", "trainer.batch_size=8", "trainer.device=cpu", "workers=1",
                                  "trainer.checkpoint_every=0"])
    seq = run_jobs(cfg1, [Job("joint", "cremad", s, None, tmp_path / "seq") for s in seeds])
    assert "CUDA_VISIBLE_DEVICES" not in capfd.readouterr().err
    for p, q in zip(pooled, seq):
        assert p["seed"] == q["seed"]
        assert json.dumps(p["selection"], sort_keys=True) == json.dumps(q["selection"], sort_keys=True)
