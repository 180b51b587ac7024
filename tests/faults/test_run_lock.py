"""Concurrency and leftovers (issue 12, section 6): one lock per run folder (a second trainer waits for the
first, then reuses its result), stale locks taken over, finished runs not retrained unless --force, dead
writers' temporaries removed on the next start."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from g2d import cli, runs
from g2d.data.prepared import atomic_write_text
from g2d.runs import Job, RunLockedError, acquire_run_lock, prepared_dir, release_run_lock, run_jobs, run_lock
from g2d.train.trainer import SELECTED, RunSpec, Trainer
from tests.helpers import ROOT, TINY_MODEL, tiny_config, tmp_params, write_tiny_cremad


def _setup(tmp_path, overrides=()):
    cfg = tiny_config(tmp_path, ["trainer.epochs=3", "trainer.batch_size=8", *overrides])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))
    return cfg


def _trainer(cfg, name="joint-cremad", force=False):
    run_dir = Path(cfg.paths.runs) / name / "s0"
    return Trainer(cfg, RunSpec("joint", "cremad", 0, run_dir, prepared_dir(cfg, "cremad"), Path(cfg.paths.runs),
                                force=force)), run_dir


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _holder(pid: int, host: str | None = None) -> str:
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "start": runs._proc_start(pid)})


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def _strip(res):
    return {k: v for k, v in res.items() if k not in ("train_time_s", "provenance")}


# ---- the lock --------------------------------------------------------------------------------------------
def test_second_trainer_waits_for_the_holder_then_proceeds(tmp_path, sleeper, capsys):
    """Documented behaviour: a live holder makes the second trainer wait (one line), never train alongside."""
    cfg = _setup(tmp_path)
    tr, run_dir = _trainer(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / runs.LOCK_NAME).write_text(_holder(sleeper.pid))
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("res", tr.fit()))
    t.start()
    time.sleep(2.0)
    assert t.is_alive() and not (run_dir / "history.csv").exists() and not (run_dir / "ckpt.pt").exists()
    sleeper.kill()  # the holder dies without releasing: the waiter takes the stale lock over
    sleeper.wait()
    t.join(60)
    assert not t.is_alive() and out["res"]["epochs"] == 3
    err = capsys.readouterr().err
    assert err.count("waiting for it to finish") == 1 and f"pid {sleeper.pid}" in err
    assert "taking over a stale lock" in err
    assert not (run_dir / runs.LOCK_NAME).exists()  # released on exit


def test_no_wait_and_timeout_raise_naming_the_holder(tmp_path, sleeper):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / runs.LOCK_NAME).write_text(_holder(sleeper.pid))
    with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
        acquire_run_lock(run_dir, wait=False)
    t0 = time.monotonic()
    with pytest.raises(RunLockedError, match="gave up after 0.3s"):
        acquire_run_lock(run_dir, timeout=0.3, poll=0.05)
    assert time.monotonic() - t0 < 5
    assert json.loads((run_dir / runs.LOCK_NAME).read_text())["pid"] == sleeper.pid  # not stolen


@pytest.mark.parametrize("holder", ["dead_pid", "other_host", "garbled"])
def test_stale_lock_is_taken_over(tmp_path, capsys, holder):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    lock = run_dir / runs.LOCK_NAME
    lock.write_text({"dead_pid": _holder(_dead_pid()), "other_host": _holder(os.getppid(), "elsewhere.example"),
                     "garbled": '{"pid": 12'}[holder])
    with run_lock(run_dir, wait=False):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert "taking over a stale lock" in err
    assert {"dead_pid": "not running", "other_host": "another host (elsewhere.example)",
            "garbled": "unreadable lock file"}[holder] in err
    assert not lock.exists()


def test_lock_is_released_when_training_fails(tmp_path, monkeypatch):
    cfg = _setup(tmp_path)
    tr, run_dir = _trainer(cfg)
    monkeypatch.setattr(Trainer, "_train", lambda self: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        tr.fit()
    assert not (run_dir / runs.LOCK_NAME).exists()
    release_run_lock(run_dir)  # idempotent


def test_concurrent_g2d_train_second_waits_and_reuses(tmp_path, capsys):
    """A real `g2d train` holds the folder; an in-process trainer started meanwhile waits, then returns the
    first one's result without training."""
    params = tmp_params(tmp_path)
    cfg = tiny_config(tmp_path, ["trainer.epochs=8", "trainer.batch_size=8"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"), n=(320, 32, 32))
    proc = subprocess.Popen([sys.executable, "-m", "g2d.cli", "--params", str(params), "train", "method=joint",
                             "dataset=cremad", "seed=0", *TINY_MODEL, "trainer.progress=off", "trainer.epochs=8",
                             "trainer.batch_size=8"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stderr=subprocess.PIPE, text=True)
    tr, run_dir = _trainer(cfg)
    t0 = time.monotonic()
    while not (run_dir / "ckpt.pt").exists():  # the subprocess holds the lock and trains
        assert proc.poll() is None and time.monotonic() - t0 < 120
        time.sleep(0.01)
    res = tr.fit()
    assert proc.wait(120) == 0
    err = capsys.readouterr().err
    assert "waiting for it to finish" in err and "already trained with this config" in err
    assert res == json.loads((run_dir / "metrics.json").read_text())


def test_the_pool_never_trains_one_run_twice(tmp_path, monkeypatch):
    cfg = dataclasses.replace(tiny_config(tmp_path), workers=1)
    calls = []
    monkeypatch.setattr(runs, "_run_job", lambda cfg, job: calls.append(job) or {"run_dir": str(job.run_dir)})
    a, b = Job("joint", "cremad", 0, None, tmp_path), Job("joint", "cremad", 1, None, tmp_path)
    res = run_jobs(cfg, [a, b, a, Job("joint", "cremad", 0, None, tmp_path)])
    assert calls == [a, b] and [r["run_dir"] for r in res] == [str(a.run_dir), str(b.run_dir)] + [str(a.run_dir)] * 2


# ---- finished runs ---------------------------------------------------------------------------------------
def test_finished_run_is_reused_not_retrained(tmp_path, monkeypatch, capsys):
    cfg = _setup(tmp_path)
    tr, run_dir = _trainer(cfg)
    first = tr.fit()
    stamps = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    capsys.readouterr()
    monkeypatch.setattr(Trainer, "_train", lambda self: pytest.fail("retrained a finished run"))
    t0 = time.perf_counter()
    again = _trainer(cfg)[0].fit()
    assert time.perf_counter() - t0 < 2.0
    assert again == json.loads(json.dumps(first))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already trained with this config" in err[0] and "--force" in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == stamps


def test_force_retrains(tmp_path, capsys):
    cfg = _setup(tmp_path)
    tr, run_dir = _trainer(cfg)
    first = tr.fit()
    before = (run_dir / SELECTED).stat().st_mtime_ns
    again = _trainer(cfg, force=True)[0].fit()
    assert "--force: retraining from scratch" in capsys.readouterr().err
    assert (run_dir / SELECTED).stat().st_mtime_ns != before
    assert _strip(again) == _strip(json.loads(json.dumps(first)))


def test_cli_force_flag(tmp_path, capsys):
    params = tmp_params(tmp_path)
    cfg = _setup(tmp_path)
    argv = ["--params", str(params), "train", "method=joint", "dataset=cremad", "seed=0", *TINY_MODEL,
            "trainer.progress=off", "trainer.epochs=2", "trainer.batch_size=8"]
    assert cli.main(argv) == 0
    run_dir = Path(cfg.paths.runs) / "joint-cremad" / "s0"
    hist = (run_dir / "history.csv").stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert "already trained" in capsys.readouterr().err and (run_dir / "history.csv").stat().st_mtime_ns == hist
    assert cli.main([*argv, "--force"]) == 0
    assert "--force" in capsys.readouterr().err and (run_dir / "history.csv").stat().st_mtime_ns != hist


def test_changed_config_or_damaged_weights_retrain(tmp_path, capsys):
    """What a DVC stage re-run after a param change relies on: another fingerprint retrains."""
    cfg = _setup(tmp_path)
    tr, run_dir = _trainer(cfg)
    first = tr.fit()
    other = tiny_config(tmp_path, ["trainer.epochs=3", "trainer.batch_size=8", "trainer.lr=0.05"])
    capsys.readouterr()
    res = _trainer(other)[0].fit()
    assert "from another config or code version: retraining" in capsys.readouterr().err
    assert res["params_hash"] != first["params_hash"]
    (run_dir / "model.pt").write_bytes(b"damaged")
    _trainer(other)[0].fit()
    assert "model.pt: sha256 mismatch" in capsys.readouterr().err
    (run_dir / SELECTED).unlink()
    _trainer(other)[0].fit()
    assert "selected.pt" in capsys.readouterr().err


def test_student_is_retrained_when_its_teachers_change(tmp_path, capsys):
    from g2d.runs import train_group

    cfg = _setup(tmp_path, ["trainer.epochs=2"])
    for m in ("audio", "visual"):
        train_group(cfg, "unimodal", "cremad", [0], m)
    first = train_group(cfg, "g2d", "cremad", [0])[0]
    train_group(cfg, "g2d", "cremad", [0])
    assert "already trained" in capsys.readouterr().err
    retrain = tiny_config(tmp_path, ["trainer.epochs=3", "trainer.batch_size=8"])
    train_group(retrain, "unimodal", "cremad", [0], "audio")  # other teacher weights, same student config
    again = train_group(cfg, "g2d", "cremad", [0])[0]
    assert "another config" in capsys.readouterr().err and again["params_hash"] != first["params_hash"]


# ---- leftovers -------------------------------------------------------------------------------------------
def test_stale_temporaries_are_removed_on_the_next_start(tmp_path, sleeper):
    cfg = _setup(tmp_path)
    tr, run_dir = _trainer(cfg)
    run_dir.mkdir(parents=True)
    dead = _dead_pid()
    stale = [f".ckpt.pt.{dead}.tmp", f".ckpt.pt.sha256.{dead}.tmp", f".metrics.json.{dead}.tmp",
             f".selected.pt.{dead}.tmp", ".history.csv.tmp", f".lock.{dead}.tmp"]
    live = f".model.pt.{sleeper.pid}.tmp"  # a writer still alive: left alone
    for name in [*stale, live]:
        (run_dir / name).write_bytes(b"partial")
    tr.fit()
    left = {p.name for p in run_dir.iterdir() if p.name.startswith(".")}
    assert left == {live}
    # also on a start that only finds the run finished
    (run_dir / f".history.csv.{dead}.tmp").write_bytes(b"partial")
    _trainer(cfg)[0].fit()
    assert {p.name for p in run_dir.iterdir() if p.name.startswith(".")} == {live}


def test_atomic_writes_clean_their_own_dead_temporaries(tmp_path, sleeper):
    dead = _dead_pid()
    for name in (f".x.json.{dead}.tmp", f".x.json.{sleeper.pid}.tmp", f".other.json.{dead}.tmp"):
        (tmp_path / name).write_text("partial")
    atomic_write_text(tmp_path / "x.json", "{}\n")
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"x.json", f".x.json.{sleeper.pid}.tmp", f".other.json.{dead}.tmp"}  # only its own, dead


def test_write_prepared_cleans_dead_writers_folders(tmp_path, sleeper):
    dead = _dead_pid()
    for name in (f".cremad.tmp-{dead}", f".cremad.old-{dead}", f".cremad.tmp-{sleeper.pid}", f".avmnist.tmp-{dead}"):
        (tmp_path / name / "train").mkdir(parents=True)
    write_tiny_cremad(tmp_path / "cremad")
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"cremad", f".cremad.tmp-{sleeper.pid}", f".avmnist.tmp-{dead}"}


def test_failed_write_leaves_no_temporary(tmp_path, monkeypatch):
    import torch

    from g2d.train import checkpoint

    def full_disk(obj, f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        checkpoint.atomic_save({"a": 1}, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []
