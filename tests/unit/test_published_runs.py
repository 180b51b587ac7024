"""A run's DVC output (data/runs) and its fingerprint must be the same in a fresh clone: dvc.lock records
the output's md5, so no wall time, git sha or hash of code the stage does not depend on may reach it."""
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from g2d import codehash, registry
from g2d.runs import _copy_run, prepared_dir
from g2d.train.trainer import RunSpec, Trainer
from tests.helpers import tiny_config, write_tiny_cremad


def _fake_run(folder: Path, time_s: float, sha: str) -> None:
    folder.mkdir(parents=True)
    res = {"seed": 0, "params_hash": "p", "train_time_s": time_s, "selection": {"last": {"epoch": 1}},
           "provenance": {"git_sha": sha, "source_hash": sha[::-1], "torch": "2"}}
    (folder / "metrics.json").write_text(json.dumps(res))
    pd.DataFrame({"epoch": [0, 1], "test/acc": [50.0, 60.125], "time_s": [time_s, time_s / 2]}).to_csv(
        folder / "history.csv", index=False)
    (folder / "model.pt").write_bytes(b"weights")


def test_published_files_drop_wall_times_and_are_byte_identical_across_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _fake_run(a, 3.25, "abc")
    _fake_run(b, 7.5, "def-dirty")
    _copy_run(a, tmp_path / "out_a", publish=True)
    _copy_run(b, tmp_path / "out_b", publish=True)
    for name in ("metrics.json", "history.csv", "model.pt"):
        assert (tmp_path / "out_a" / name).read_bytes() == (tmp_path / "out_b" / name).read_bytes(), name
    m = json.loads((tmp_path / "out_a/metrics.json").read_text())
    assert "train_time_s" not in m and m["provenance"] == {"torch": "2"} and m["params_hash"] == "p"
    h = pd.read_csv(tmp_path / "out_a/history.csv")
    assert list(h.columns) == ["epoch", "test/acc"] and list(h["test/acc"]) == [50.0, 60.125]
    # the scratch copy keeps the full record
    assert json.loads((a / "metrics.json").read_text())["train_time_s"] == 3.25
    # an unchanged output is left alone (mtime kept)
    before = os.stat(tmp_path / "out_a/metrics.json").st_mtime_ns
    _copy_run(a, tmp_path / "out_a", publish=True)
    assert os.stat(tmp_path / "out_a/metrics.json").st_mtime_ns == before


@pytest.mark.parametrize("name", ["joint", "g2d", "unimodal"])
def test_code_fingerprint_covers_the_stage_files_only(name):
    files = [f.as_posix() for f in codehash.method_files(name)]
    assert not [f for f in files if "/g2d/report/" in f or f.endswith(("/g2d/cli.py", "/g2d/calibrate.py"))]
    assert any(f.endswith("/g2d/train/trainer.py") for f in files)
    assert codehash.code_id(name) == codehash.method_hash(name).split("\n", 1)[0][:16]


def test_run_fingerprint_follows_the_method_code_hash(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, ["trainer.epochs=1", "trainer.batch_size=8"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))
    spec = RunSpec("joint", "cremad", 0, Path(cfg.paths.runs) / "j/s0", prepared_dir(cfg, "cremad"),
                   Path(cfg.paths.runs))
    first = Trainer(cfg, spec).fingerprint
    assert Trainer(cfg, spec).fingerprint == first
    import g2d.train.trainer as T

    monkeypatch.setattr(T, "code_id", lambda m: "another-code")
    assert Trainer(cfg, spec).fingerprint != first
    assert registry.get_method("joint")  # the registry the fingerprint was read from


@pytest.mark.parametrize("name,helper", [("pmr", "baselines/ogm_ge.py"), ("opm", "baselines/ogm_ge.py"),
                                         ("gblend", "baselines/mmpareto.py"), ("mses", "baselines/mslr.py")])
def test_code_fingerprint_covers_helper_modules_a_method_imports(name, helper):
    """A helper imported from another baseline (PMR's and OPM's `ogm_ratios`, Gradient-Blending's unimodal heads,
    MSES's `modality_groups`) is the method's code: editing it must re-run that method's stage."""
    files = {f.relative_to(codehash.ROOT).as_posix() for f in codehash.method_files(name)}
    assert helper in files
    assert "baselines/agm.py" not in files  # a baseline the method does not use is not its code


def test_run_fingerprint_ignores_only_result_neutral_trainer_options(tmp_path):
    """In-process runs (progress bar on) and pool or SLURM workers (progress off) train the same run, whatever the
    checkpoint spacing; an option that changes the computation changes the fingerprint."""
    cfg = tiny_config(tmp_path, ["trainer.epochs=1", "trainer.batch_size=8"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))

    def fp(*overrides):
        c = tiny_config(tmp_path, ["trainer.epochs=1", "trainer.batch_size=8", *overrides])
        return Trainer(c, RunSpec("joint", "cremad", 0, Path(c.paths.runs) / "j/s0", prepared_dir(c, "cremad"),
                                  Path(c.paths.runs))).fingerprint

    base = fp()
    assert fp("trainer.progress=on") == fp("trainer.progress=auto") == fp("trainer.checkpoint_every=3") == base
    assert fp("trainer.batch_size=4") != base and fp("trainer.lr=0.5") != base and fp("trainer.check_every=2") != base
