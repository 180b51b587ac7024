import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from g2d.methods.base import NonFiniteLoss
from g2d.methods.joint import Joint
from g2d.runs import prepared_dir, train_group
from g2d.train import checkpoint
from g2d.train.trainer import RunSpec, Trainer
from tests.helpers import killed_during, tiny_config, write_tiny_cremad


def _setup(tmp_path, overrides=()):
    cfg = tiny_config(tmp_path, ["trainer.epochs=4", "trainer.batch_size=8", *overrides])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))
    return cfg


def _run(cfg, seed=0, method="joint", name="joint-cremad"):
    run_dir = Path(cfg.paths.runs) / name / f"s{seed}"
    return Trainer(cfg, RunSpec(method, "cremad", seed, run_dir, prepared_dir(cfg, "cremad"),
                                Path(cfg.paths.runs))).fit(), run_dir


def _strip(res):
    res = json.loads(json.dumps(res))
    res.pop("train_time_s")
    return res


def test_outputs_and_provenance(tmp_path):
    cfg = _setup(tmp_path)
    res, run_dir = _run(cfg)
    hist = pd.read_csv(run_dir / "history.csv")
    assert list(hist.epoch) == [0, 1, 2, 3]
    for col in ("train/loss", "val/acc", "val/f1", "test/acc_audio", "test/acc_visual", "test/f1_visual"):
        assert col in hist.columns
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["selection"]["last"]["test"]["acc"] == pytest.approx(hist["test/acc"].iloc[-1])
    for key in ("git_sha", "source_hash", "torch", "device", "python"):
        assert saved["provenance"][key]
    assert saved["seed"] == 0 and saved["method"] == "joint" and saved["params_hash"]
    assert (run_dir / "model.pt").is_file() and not (run_dir / "ckpt.pt").exists()


def test_same_seed_identical_metrics(tmp_path):
    cfg = _setup(tmp_path)
    a, _ = _run(cfg, name="a")
    b, _ = _run(cfg, name="b")
    c, _ = _run(cfg, seed=1, name="c")
    assert _strip(a)["selection"] == _strip(b)["selection"]
    ha = pd.read_csv(Path(cfg.paths.runs) / "a/s0/history.csv").drop(columns="time_s")
    hb = pd.read_csv(Path(cfg.paths.runs) / "b/s0/history.csv").drop(columns="time_s")
    pd.testing.assert_frame_equal(ha, hb)
    assert pd.read_csv(Path(cfg.paths.runs) / "c/s1/history.csv")["train/loss"].iloc[0] != ha["train/loss"].iloc[0]


def test_resume_after_crash_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = _setup(tmp_path)
    full, _ = _run(cfg, name="full")
    killed_during(monkeypatch, lambda: _run(cfg, name="crash"), eval_call=5)  # epochs 0 and 1 are checkpointed
    run_dir = Path(cfg.paths.runs) / "crash/s0"
    assert checkpoint.load(run_dir / "ckpt.pt")["epoch"] == 1
    resumed, _ = _run(cfg, name="crash")
    assert _strip(resumed)["selection"] == _strip(full)["selection"]
    h1 = pd.read_csv(Path(cfg.paths.runs) / "full/s0/history.csv").drop(columns="time_s")
    h2 = pd.read_csv(run_dir / "history.csv").drop(columns="time_s")
    pd.testing.assert_frame_equal(h1, h2)
    a = torch.load(Path(cfg.paths.runs) / "full/s0/model.pt")["model"]
    b = torch.load(run_dir / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stale_checkpoint_from_other_config_is_not_resumed(tmp_path, monkeypatch, capsys):
    cfg = _setup(tmp_path)
    run_dir = Path(cfg.paths.runs) / "joint-cremad/s0"
    run_dir.mkdir(parents=True)
    torch.save({"fingerprint": "other", "epoch": 2}, run_dir / "ckpt.pt")
    res, _ = _run(cfg)
    assert res["epochs"] == 4
    assert "starting fresh" in capsys.readouterr().err


def test_nan_loss_stops_with_message(tmp_path, monkeypatch, capsys):
    cfg = _setup(tmp_path)
    monkeypatch.setattr(Joint, "loss", lambda self, b, o, c: {"task": o.fused.sum() * float("nan")})
    res, run_dir = _run(cfg)  # the run is recorded as diverged, not raised (tests/unit/test_divergence.py)
    assert res["diverged"] == {"epoch": 0, "step": 0, "terms": {"task": "nan"}}
    assert "non-finite loss at epoch 0 step 0: terms {'task': nan}" in capsys.readouterr().err
    assert issubclass(NonFiniteLoss, RuntimeError)


def test_missing_teacher_is_clear(tmp_path):
    from g2d.train.trainer import load_teacher

    cfg = _setup(tmp_path)
    from g2d.registry import get_dataset

    with pytest.raises(FileNotFoundError, match=r"dvc repro teacher@cremad"):
        load_teacher(tmp_path / "nope/model.pt", get_dataset("cremad").spec, cfg.model, "audio", "cpu")


def test_teacher_checkpoint_mismatch_is_clear(tmp_path):
    from g2d.train.trainer import load_teacher

    cfg = _setup(tmp_path, ["methods.unimodal.modality=audio"])
    train_group(cfg, "unimodal", "cremad", [0], "audio")
    path = Path(cfg.paths.runs) / "teachers/cremad/audio/s0/model.pt"
    wide = tiny_config(tmp_path, ["model.resnet.width=6"])
    from g2d.data.prepared import Prepared

    spec = Prepared(prepared_dir(cfg, "cremad")).spec
    load_teacher(path, spec, cfg.model, "audio", "cpu")  # matches
    with pytest.raises(RuntimeError, match="does not match the current model config"):
        load_teacher(path, spec, wide.model, "audio", "cpu")


def test_train_group_writes_summaries(tmp_path):
    cfg = _setup(tmp_path, ["trainer.epochs=2"])
    out = tmp_path / "summ"
    res = train_group(cfg, "joint", "cremad", [0, 1], summary_dir=out)
    data = json.loads((out / "joint-cremad.json").read_text())
    assert [r["seed"] for r in data["seeds"]] == [0, 1]
    assert data["seeds"][1]["selection"] == res[1]["selection"]
    hist = pd.read_csv(out / "joint-cremad.csv")
    assert sorted(hist.seed.unique()) == [0, 1] and len(hist) == 4


@pytest.mark.parametrize("rule", ["best_val", "best_test", "last"])
def test_selected_checkpoint_is_the_reported_epoch(tmp_path, rule):
    """selected.pt holds the weights of the epoch trainer.select reports (issue 10 item 5): re-evaluating it
    reproduces that epoch's test metrics, and students record which teacher epoch they distilled from."""
    from g2d.models.model import MultimodalModel
    from g2d.train.trainer import SELECTED

    cfg = _setup(tmp_path, ["trainer.epochs=6", f"trainer.select={rule}", "methods.unimodal.modality=visual"])
    train_group(cfg, "unimodal", "cremad", [0], "visual")
    train_group(cfg, "unimodal", "cremad", [0], "audio")
    tdir = Path(cfg.paths.runs) / "teachers/cremad/visual/s0"
    res = json.loads((tdir / "metrics.json").read_text())
    kept = torch.load(tdir / SELECTED)
    assert kept["epoch"] == res["selection"][rule]["epoch"] == res["selected_checkpoint"]["epoch"]
    hist = pd.read_csv(tdir / "history.csv")
    assert rule == "last" or hist[f"{'val' if rule == 'best_val' else 'test'}/acc"].nunique() > 1
    tr = Trainer(cfg, RunSpec("unimodal", "cremad", 0, tmp_path / "x", prepared_dir(cfg, "cremad")))
    model = MultimodalModel(tr.spec, cfg.model, ("visual",))
    model.load_state_dict(kept["model"])
    tr._ctx = type("C", (), {"autocast": staticmethod(lambda: torch.autocast("cpu", enabled=False))})()
    assert tr.evaluate(model, "test")["acc"] == pytest.approx(res["selection"][rule]["test"]["acc"])
    student, _ = _run(cfg, method="g2d", name="g2d-cremad")
    for m in ("audio", "visual"):
        t = json.loads((Path(cfg.paths.runs) / f"teachers/cremad/{m}/s0/metrics.json").read_text())
        assert student["teachers"][m]["epoch"] == t["selection"][rule]["epoch"]
        assert student["teachers"][m]["rule"] == rule
