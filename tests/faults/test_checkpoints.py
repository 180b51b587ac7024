"""Checkpoint and weights files under attack and damage (issue 12, sections 1 and 3).

Weights are loaded weights-only (a crafted pickle is refused and runs nothing), every file carries a sha256
record, a damaged ckpt.pt is moved aside and the run restarts (same metrics as an uninterrupted run), a
damaged teacher is an error naming the file and the fix, and a real `g2d train` killed with SIGKILL at three
moments resumes to the uninterrupted run's metrics.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from g2d.runs import prepared_dir, train_group
from g2d.train import checkpoint
from g2d.train.checkpoint import CheckpointError
from g2d.train.trainer import SELECTED, RunSpec, Trainer
from tests.helpers import ROOT, TINY_MODEL, killed_during, tiny_config, tmp_params, write_tiny_cremad

EPOCHS = 4


class Evil:
    """Unpickling this creates `marker`: what a crafted checkpoint would do with os.system instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _setup(tmp_path, overrides=()):
    cfg = tiny_config(tmp_path, [f"trainer.epochs={EPOCHS}", "trainer.batch_size=8", *overrides])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))
    return cfg


def _run(cfg, name, method="joint", seed=0):
    run_dir = Path(cfg.paths.runs) / name / f"s{seed}"
    return Trainer(cfg, RunSpec(method, "cremad", seed, run_dir, prepared_dir(cfg, "cremad"),
                                Path(cfg.paths.runs))).fit(), run_dir


def _outcome(run_dir: Path) -> dict:
    """What must not depend on interruptions: selection, selected epoch, and the whole history but timings."""
    res = json.loads((run_dir / "metrics.json").read_text())
    hist = pd.read_csv(run_dir / "history.csv").drop(columns="time_s")
    return {"selection": res["selection"], "selected": res["selected_checkpoint"], "epochs": res["epochs"],
            "params_hash": res["params_hash"], "history": hist.to_dict("list")}


def _crash_after_epoch_1(cfg, monkeypatch, name) -> Path:
    """A run killed in epoch 2: ckpt.pt holds epoch 1."""
    killed_during(monkeypatch, lambda: _run(cfg, name), eval_call=5)  # epoch 2's val evaluation
    run_dir = Path(cfg.paths.runs) / name / "s0"
    assert checkpoint.load(run_dir / "ckpt.pt")["epoch"] == 1
    return run_dir


def _forge(path: Path, obj) -> None:
    """Write `obj` with torch.save and a matching sha256 record, as an attacker with write access could."""
    torch.save(obj, path)
    checkpoint.sidecar(path).write_text(f"{checkpoint.file_sha256(path)}  {path.name}\n")


def _flip_weight_byte(path: Path) -> None:
    """Flip one bit inside the bytes of the largest weight tensor (the zip stores tensors uncompressed)."""
    state = torch.load(path, weights_only=True)
    weights = state["model"]
    key = max(weights, key=lambda k: weights[k].numel())
    raw = weights[key].numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(raw)
    assert at >= 0
    data[at + len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    changed = torch.load(path, weights_only=True)["model"][key]  # still loads: only the hash can tell
    assert not torch.equal(changed, weights[key])


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(path.stat().st_size))
    elif how == "flipped":
        _flip_weight_byte(path)
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(how)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run's outcome (the same for every test: seeded, deterministic)."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = _setup(tmp)
    _, run_dir = _run(cfg, "full")
    return _outcome(run_dir)


# ---- section 1: weights-only loading --------------------------------------------------------------------
def test_the_payload_is_live(tmp_path):
    """Sanity check of the test itself: loading the crafted file the old way does run its code."""
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": Evil(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy-pickle"])
@pytest.mark.parametrize("name", ["model.pt", SELECTED, "ckpt.pt"])
def test_malicious_file_is_refused(tmp_path, name, fmt):
    marker, path = tmp_path / "pwned", tmp_path / name
    if fmt == "zip":
        _forge(path, {"model": Evil(marker), "epoch": 0})
    else:
        path.write_bytes(pickle.dumps({"model": Evil(marker)}, protocol=2))
        checkpoint.sidecar(path).write_text(f"{checkpoint.file_sha256(path)}  {name}\n")
    with pytest.raises(CheckpointError, match=r"refused") as err:
        checkpoint.load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: refused") and ("exec" in msg or "weights-only" in msg), msg
    assert not marker.exists()


def test_malicious_ckpt_is_refused_and_the_run_restarts(tmp_path, monkeypatch, capsys, reference):
    cfg = _setup(tmp_path)
    run_dir = _crash_after_epoch_1(cfg, monkeypatch, "evil")
    marker = tmp_path / "pwned"
    fp = checkpoint.load(run_dir / "ckpt.pt")["fingerprint"]
    _forge(run_dir / "ckpt.pt", {"fingerprint": fp, "epoch": 1, "model": Evil(marker)})
    capsys.readouterr()
    _run(cfg, "evil")
    err = capsys.readouterr().err
    assert not marker.exists()
    line = [x for x in err.splitlines() if "ckpt.pt" in x]
    assert len(line) == 1 and "refused" in line[0] and "moved aside" in line[0] and "starting fresh" in line[0]
    assert _outcome(run_dir) == reference
    assert list(run_dir.glob("ckpt.pt.corrupt-*")) and not (run_dir / "ckpt.pt").exists()


@pytest.mark.parametrize("how", ["evil", "truncated", "flipped"])
def test_bad_teacher_is_an_error_naming_file_and_fix(tmp_path, how):
    cfg = _setup(tmp_path, ["trainer.epochs=2"])
    for m in ("audio", "visual"):
        train_group(cfg, "unimodal", "cremad", [0], m)
    bad = Path(cfg.paths.runs) / "teachers/cremad/audio/s0" / SELECTED
    marker = tmp_path / "pwned"
    if how == "evil":
        _forge(bad, {"model": Evil(marker), "epoch": 0})
    else:
        _damage(bad, how)
    with pytest.raises(CheckpointError) as err:
        _run(cfg, "g2d-cremad", method="g2d")
    msg = str(err.value)
    assert str(bad) in msg and "dvc repro teacher@cremad" in msg and "g2d teacher cremad" in msg
    assert {"evil": "refused", "truncated": "sha256 mismatch", "flipped": "sha256 mismatch"}[how] in msg
    assert not marker.exists()
    assert not (Path(cfg.paths.runs) / "g2d-cremad/s0/metrics.json").exists()


def test_cli_reports_a_bad_teacher_in_one_line(tmp_path, capsys):
    from g2d import cli

    params = tmp_params(tmp_path)
    cfg = _setup(tmp_path, ["trainer.epochs=2"])
    for m in ("audio", "visual"):
        train_group(cfg, "unimodal", "cremad", [0], m)
    bad = Path(cfg.paths.runs) / "teachers/cremad/visual/s0" / SELECTED
    _damage(bad, "truncated")
    capsys.readouterr()
    rc = cli.main(["--params", str(params), "train", "method=g2d", "dataset=cremad", "seed=0", *TINY_MODEL,
                   "trainer.progress=off", "trainer.epochs=2", "trainer.batch_size=8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"g2d: error: {bad}: teacher weights sha256 mismatch") and "teacher@cremad" in err[0]


def test_saved_files_load_weights_only_and_carry_a_record(tmp_path, monkeypatch):
    """ckpt.pt (RNG states, history, method state), model.pt and selected.pt all load with weights_only=True."""
    cfg = _setup(tmp_path)
    run_dir = _crash_after_epoch_1(cfg, monkeypatch, "c")
    state = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert {"rng", "loader_rng", "augment_rng", "history", "method", "optimizer"} <= set(state)
    assert all(type(v) in (int, float) for row in state["history"] for v in row.values())
    _run(cfg, "c")
    for name in ("model.pt", SELECTED):
        torch.load(run_dir / name, weights_only=True)
        assert checkpoint.verify(run_dir / name, required=True) == checkpoint.file_sha256(run_dir / name)
    assert not (run_dir / "ckpt.pt").exists() and not checkpoint.sidecar(run_dir / "ckpt.pt").exists()


def test_rng_states_survive_weights_only_round_trip(tmp_path):
    """Python's and numpy's state tuples go in as ints/lists/tensors and come back exact."""
    import random

    import numpy as np

    from g2d.train.seeding import rng_state, seed_everything, set_rng_state

    seed_everything(7)
    random.random(), np.random.randn(), torch.rand(1)  # noqa: B018 -- move every stream, numpy's gauss cache too
    checkpoint.atomic_save({"rng": rng_state()}, tmp_path / "ckpt.pt")
    draw = (random.random(), np.random.randn(), np.random.rand(), torch.rand(3).tolist())
    seed_everything(99)
    set_rng_state(checkpoint.load(tmp_path / "ckpt.pt")["rng"])
    assert (random.random(), np.random.randn(), np.random.rand(), torch.rand(3).tolist()) == draw


def test_unsafe_state_is_refused_at_save_time(tmp_path):
    class Custom:
        pass

    with pytest.raises(TypeError, match=r"ckpt.pt\['method'\]\['x'\].*Custom.*weights-only"):
        checkpoint.atomic_save({"method": {"x": Custom()}}, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


# ---- section 3: corrupt checkpoints ---------------------------------------------------------------------
@pytest.mark.parametrize("how", ["truncated", "garbage", "flipped", "empty"])
def test_damaged_ckpt_is_moved_aside_and_the_run_restarts(tmp_path, monkeypatch, capsys, reference, how):
    cfg = _setup(tmp_path)
    run_dir = _crash_after_epoch_1(cfg, monkeypatch, "crash")
    _damage(run_dir / "ckpt.pt", how)
    capsys.readouterr()
    _run(cfg, "crash")
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "ckpt.pt" in x]
    assert len(lines) == 1, err
    assert str(run_dir / "ckpt.pt") in lines[0] and "moved aside" in lines[0] and "starting fresh" in lines[0]
    if how == "flipped":
        assert "sha256 mismatch" in lines[0]  # detected by the hash, not resumed silently
    assert "resuming" not in err
    assert _outcome(run_dir) == reference
    aside = [p for p in run_dir.glob("ckpt.pt.corrupt-*") if not p.name.endswith(".sha256")]
    assert len(aside) == 1 and checkpoint.sidecar(aside[0]).is_file()  # kept, with its record, for a post-mortem
    _run(cfg, "crash")  # a rerun does not trip over it again
    assert "ckpt.pt" not in capsys.readouterr().err


def test_missing_record_is_not_resumed(tmp_path, monkeypatch, capsys, reference):
    cfg = _setup(tmp_path)
    run_dir = _crash_after_epoch_1(cfg, monkeypatch, "crash")
    checkpoint.sidecar(run_dir / "ckpt.pt").unlink()
    _run(cfg, "crash")
    assert "no integrity record" in capsys.readouterr().err
    assert _outcome(run_dir) == reference


def test_good_ckpt_resumes(tmp_path, monkeypatch, capsys, reference):
    cfg = _setup(tmp_path)
    run_dir = _crash_after_epoch_1(cfg, monkeypatch, "crash")
    capsys.readouterr()
    _run(cfg, "crash")
    assert f"resuming {run_dir} from epoch 2/{EPOCHS}" in capsys.readouterr().err
    assert _outcome(run_dir) == reference


def test_write_killed_between_commit_and_rename_rolls_forward(tmp_path, monkeypatch, capsys, reference):
    """The new record is the commit point: a committed temp file that was not renamed yet is used."""
    cfg = _setup(tmp_path)
    run_dir = _crash_after_epoch_1(cfg, monkeypatch, "crash")
    ckpt = run_dir / "ckpt.pt"
    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp = run_dir / f".ckpt.pt.{dead.pid}.tmp"
    os.replace(ckpt, tmp)  # the rename never happened; an older file is where the new one should be
    ckpt.write_bytes(b"older checkpoint")
    capsys.readouterr()
    _run(cfg, "crash")
    assert f"resuming {run_dir} from epoch 2/{EPOCHS}" in capsys.readouterr().err
    assert _outcome(run_dir) == reference and not tmp.exists()


# ---- SIGKILL of a real `g2d train` ---------------------------------------------------------------------
def _peek_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except Exception:  # not there yet, or replaced while reading
        return -1


@pytest.mark.slow
def test_sigkill_at_three_moments_then_rerun_equals_uninterrupted(tmp_path):
    epochs = 10
    args = ["train", "method=joint", "dataset=cremad", "seed=0", *TINY_MODEL, "trainer.progress=off",
            f"trainer.epochs={epochs}", "trainer.batch_size=8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def g2d(params: Path, **kw) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "g2d.cli", "--params", str(params), *args], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

    dirs = {}
    for k in ("ref", "killed"):
        (tmp_path / k).mkdir()
        params = tmp_params(tmp_path / k)
        cfg = tiny_config(tmp_path / k)
        write_tiny_cremad(prepared_dir(cfg, "cremad"), n=(160, 32, 32))
        dirs[k] = (params, Path(cfg.paths.runs) / "joint-cremad" / "s0")
    ref = g2d(dirs["ref"][0])
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err

    params, run_dir = dirs["killed"]
    ckpt, logs = run_dir / "ckpt.pt", []
    for min_epoch, delay in ((0, 0.0), (2, 0.05), (4, 0.13)):  # kill after the 1st, 3rd, 5th epoch's ckpt
        p = g2d(params)
        t0 = time.monotonic()
        while _peek_epoch(ckpt) < min_epoch:
            assert p.poll() is None, f"finished before the kill: {p.communicate()[1]}"
            assert time.monotonic() - t0 < 240
            time.sleep(0.005)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        assert p.returncode == -signal.SIGKILL
        logs.append(p.stderr.read())
        assert not (run_dir / "metrics.json").exists()
    p = g2d(params)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    logs.append(err)
    assert all("resuming" in x for x in logs[1:]), logs
    print("\n".join(line for x in logs for line in x.splitlines() if "resuming" in line or "lock" in line))
    assert all("taking over a stale lock" in x for x in logs[1:]), logs
    assert _outcome(run_dir) == _outcome(dirs["ref"][1])
    a = torch.load(dirs["ref"][1] / SELECTED, weights_only=True)["model"]
    b = torch.load(run_dir / SELECTED, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    left = sorted(p.name for p in run_dir.iterdir())
    assert left == sorted(["history.csv", "metrics.json", "model.pt", "model.pt.sha256", SELECTED,
                           SELECTED + ".sha256"]), left


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_resume_on_cuda_equals_uninterrupted(tmp_path, monkeypatch):
    """ckpt.pt is loaded with map_location=cuda: RNG/generator states must still go back to the CPU."""
    cfg = _setup(tmp_path, ["trainer.device=cuda", "trainer.amp=false"])
    _, full = _run(cfg, "full")
    run_dir = _crash_after_epoch_1(cfg, monkeypatch, "crash")
    _run(cfg, "crash")
    assert _outcome(run_dir) == _outcome(full)
