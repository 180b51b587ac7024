"""A run whose loss turns non-finite is recorded as diverged; the pool, the stage and the report go on."""
import json
from pathlib import Path

import pandas as pd
import torch

from g2d.methods.joint import Joint
from g2d.runs import prepared_dir, train_group
from tests.helpers import tiny_config, write_tiny_cremad

torch.set_num_threads(1)


def _cfg(tmp_path, overrides=()):
    cfg = tiny_config(tmp_path, ["trainer.epochs=3", "trainer.batch_size=8", "workers=1", *overrides])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))
    return cfg


def _nan_at_epoch_1_for_seed_1(monkeypatch):
    """Seed 1 gets a NaN loss from its first step of epoch 1 (step 3: 24 samples / batch 8 = 3 steps per epoch)."""
    orig = Joint.loss

    def loss(self, batch, out, ctx):
        terms = orig(self, batch, out, ctx)
        if ctx.epoch >= 1 and self._seed == 1:
            terms["task"] = terms["task"] * float("nan")
        return terms

    monkeypatch.setattr(Joint, "loss", loss)
    orig_setup = Joint.setup

    def setup(self, model, ctx):
        self._seed = int(torch.initial_seed())  # seed_everything(run.seed) ran just before
        return orig_setup(self, model, ctx)

    monkeypatch.setattr(Joint, "setup", setup)


def test_diverged_run_recorded_pool_continues_and_rerun_keeps_it(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path)
    _nan_at_epoch_1_for_seed_1(monkeypatch)
    summary = tmp_path / "reports" / "runs"
    res = train_group(cfg, "joint", "cremad", [0, 1], summary_dir=summary)  # returns: the NaN stops one run only
    assert "diverged" not in res[0] and res[0]["epochs"] == 3
    d = res[1]["diverged"]
    assert (d["epoch"], d["step"]) == (1, 3) and d["terms"]["task"] == "nan"
    run1 = Path(cfg.paths.runs) / "joint-cremad" / "s1"
    saved = json.loads((run1 / "metrics.json").read_text())
    assert saved["diverged"] == d and saved["epochs"] == 1
    assert saved["selection"]["best_val"]["epoch"] == 0  # over the epochs that completed
    assert list(pd.read_csv(run1 / "history.csv").epoch) == [0]
    assert not (run1 / "model.pt").exists() and not (run1 / "ckpt.pt").exists()
    assert "diverged at epoch 1 step 3" in capsys.readouterr().err
    written = json.loads((summary / "joint-cremad.json").read_text())
    assert [s.get("diverged", {}).get("epoch") for s in written["seeds"]] == [None, 1]

    # a rerun keeps the diverged run (same fingerprint): no retraining
    mtime = (run1 / "metrics.json").stat().st_mtime_ns
    again = train_group(cfg, "joint", "cremad", [0, 1])
    assert again[1]["diverged"] == d and (run1 / "metrics.json").stat().st_mtime_ns == mtime
    assert "already trained with this config" in capsys.readouterr().err
    # --force retrains it
    train_group(cfg, "joint", "cremad", [1], force=True)
    assert (run1 / "metrics.json").stat().st_mtime_ns != mtime


def test_no_completed_epoch_gives_null_selection(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    monkeypatch.setattr(Joint, "loss", lambda self, b, o, c: {"task": o.fused.sum() * float("nan")})
    (res,) = train_group(cfg, "joint", "cremad", [0], summary_dir=tmp_path / "reports" / "runs")
    assert res["diverged"]["epoch"] == 0 and res["diverged"]["step"] == 0
    assert res["selection"] is None and res["selected_checkpoint"] is None and res["epochs"] == 0


def _summary(seed, diverged, acc=70.0):
    sel = {"epoch": 0, "val": {"acc": acc}, "test": {"acc": acc}}
    res = {"seed": seed, "source": "standin", "provenance": {"git_sha": "x"},
           "selection": None if diverged == "none" else {"best_val": sel, "best_test": sel, "last": sel}}
    if diverged:
        res["diverged"] = {"epoch": 1, "step": 3, "terms": {"task": "nan"}}
    return res


def test_aggregate_excludes_and_counts_diverged_seeds_in_cells(tmp_path):
    from g2d.report.aggregate import summarise, tidy
    from g2d.report.render import _write_csv
    from g2d.report.tables import TableSpec, build

    runs = tmp_path / "runs"
    runs.mkdir()
    seeds = {"joint": [_summary(0, False, 70.0), _summary(1, False, 72.0), _summary(2, True, 10.0)],
             "g2d": [_summary(0, "none"), _summary(1, True), _summary(2, True)]}
    for m, ss in seeds.items():
        (runs / f"{m}-cremad.json").write_text(json.dumps(
            {"run": f"{m}-cremad", "method": m, "dataset": "cremad", "modality": None, "seeds": ss}))
    summary = summarise(tidy(runs))
    row = summary[(summary.run == "joint-cremad") & (summary.metric == "acc") & (summary.selection == "best_val")
                  & (summary.split == "test")].iloc[0]
    assert (row["mean"], row["n"], row["diverged"], row["seeds"]) == (71.0, 2, 1, 3)  # seed 2 (10.0) left out
    cells = build(summary, TableSpec(datasets=["cremad"], methods=["joint", "g2d"], teachers=False))
    cells = _write_csv(cells, tmp_path / "cells.csv")  # the cells as `g2d report` renders them (from the file)
    got = dict(zip(cells.method, cells.cell))
    assert got == {"joint": "71.00 ± 1.41 (1/3 diverged)", "g2d": "diverged (3/3)"}


# ---- shared trainer options are valid for every method (issue 16: -S trainer.grad_clip=1.0 died in ume) ----
def test_grad_clip_passes_config_for_every_registered_method(tmp_path):
    from g2d import config_checks, registry
    from g2d.config import trainer_config

    cfg = tiny_config(tmp_path, ["trainer.grad_clip=1.0"])  # the suite's every method passes check_methods
    names = sorted({*registry.list_methods(), *cfg.methods})
    for name in names:
        registry.get_method(name).check_config(trainer_config(cfg, "cremad"), cfg.model)
    for name in names:  # and as the selected method of a run, through load_config
        tiny_config(tmp_path, ["trainer.grad_clip=1.0", f"method={name}"])
    config_checks.check_methods(cfg, Path("params.yaml"))


def test_ume_fusion_refused_at_config_time(tmp_path):
    import pytest

    from g2d.config import ConfigError

    with pytest.raises(ConfigError, match=r"ume needs independent per-modality heads: set model.fusion to one of "
                       r"\('late', 'sum'\), got 'concat'"):
        tiny_config(tmp_path, ["method=ume", "model.fusion=concat"])


def test_ume_clipping_equals_per_modality_clipping_of_independent_models():
    from baselines.umt import UME, UMEParams
    from g2d.methods.base import Context, task_loss
    from g2d.models.model import MultimodalModel
    from tests.conftest import make_batch, tiny_model_cfg, tiny_spec

    spec = tiny_spec(2)
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg())
    clip = 0.05  # small: every modality's norm is clipped, and by a different factor
    uni = {}
    for m in spec.modality_names:  # each unimodal model alone: its encoder and its head
        u = MultimodalModel(spec, tiny_model_cfg(), (m,))
        u.encoders[m].load_state_dict(model.encoders[m].state_dict())
        u.fusion.heads[m].load_state_dict(model.fusion.heads[m].state_dict())
        uni[m] = u
    method = UME(UMEParams(), spec)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=1, grad_clip=clip)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    uopt = {m: torch.optim.SGD(u.parameters(), lr=0.5) for m, u in uni.items()}
    method.setup(model, ctx)
    batch = make_batch(spec, 8)
    method.train_step(model, batch, opt, ctx)
    norms = {}
    for m, u in uni.items():
        uopt[m].zero_grad()
        task_loss(spec, u(batch).fused, batch["label"]).backward()
        norms[m] = float(torch.nn.utils.clip_grad_norm_(u.parameters(), clip))
        uopt[m].step()
    assert all(n > clip for n in norms.values()) and abs(norms["audio"] - norms["visual"]) > 1e-3
    for m, u in uni.items():
        for k, v in u.encoders[m].state_dict().items():
            assert torch.allclose(v, model.encoders[m].state_dict()[k], atol=1e-6), (m, k)
        for k, v in u.fusion.heads[m].state_dict().items():
            assert torch.allclose(v, model.fusion.heads[m].state_dict()[k], atol=1e-6), (m, k)


# ---- FiLM fusion stays finite (issue 16: g2d+film diverged at 5 epochs) ----
def test_g2d_film_finite_for_20_epochs_on_the_standin(tmp_path):
    """The stand-in CREMA-D, teachers and G2D+FiLM at the default recipe (lr 0.03, SGD), 20 epochs."""
    import subprocess
    import sys

    from g2d.config import load_config
    from tests.helpers import tmp_params

    params = tmp_params(tmp_path)  # the project's recipe and model, paths inside tmp_path
    cfg = load_config(["trainer.progress=off", "workers=1"], params)
    assert (cfg.trainer.epochs, cfg.trainer.lr, cfg.trainer.optimizer) == (20, 0.03, "sgd")
    subprocess.run([sys.executable, "-m", "g2d.cli", "--params", str(params), "prepare", "cremad"], check=True,
                   capture_output=True, timeout=300)
    train_group(cfg, "unimodal", "cremad", [0], "audio")
    train_group(cfg, "unimodal", "cremad", [0], "visual")
    (res,) = train_group(cfg, "g2d+film", "cremad", [0])
    assert "diverged" not in res and res["epochs"] == 20
    hist = pd.read_csv(Path(cfg.paths.runs) / "g2d+film-cremad" / "s0" / "history.csv")
    terms = hist[[c for c in hist.columns if c.startswith("train/")]]
    assert terms.abs().max().max() < 20  # before the fix: 1e13 .. inf at lr 0.1; bounded logits now
