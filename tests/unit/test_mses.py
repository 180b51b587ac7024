"""MSES (baselines/mses.py): the smoothed per-head validation loss, the stopping rule, freezing and restoring."""
from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch

from baselines.mses import MSES, MSESParams, smoothed_loss
from baselines.mslr import modality_groups
from g2d.methods.base import Context
from g2d.models.model import MultimodalModel
from g2d.runs import prepared_dir
from g2d.train.trainer import RunSpec, Trainer
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec
from tests.helpers import tiny_config, write_tiny_cremad


def _setup(spec, params, seed=0):
    torch.manual_seed(seed)
    model = MultimodalModel(spec, tiny_model_cfg())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=50, optimizer=opt)
    method = MSES(params, spec)
    method.setup(model, ctx)
    return method, model, opt, ctx


def _steps(method, model, opt, ctx, n=2, seed=0):
    for s in range(n):
        model.train()
        method.train_step(model, make_batch(ctx.spec, seed=seed + s), opt, ctx)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_smoothing_and_stopping_rule_by_hand():
    """(S1)-(S3) on scripted losses: audio's smoothed minimum is epoch 1; with patience 2 it stops after epoch 4."""
    assert smoothed_loss(None, 2.0, 0.6) == 2.0
    assert smoothed_loss(1.0, 2.0, 0.6) == pytest.approx(0.6 * 1.0 + 0.4 * 2.0)
    spec = tiny_spec(2)
    method, model, opt, ctx = _setup(spec, MSESParams(patience=2, restore="none"))
    audio = [1.0, 0.7, 0.9, 1.0, 1.2, 1.3]
    # hand, S(t) = 0.6 L(t-1) + 0.4 L(t): 1.0, 0.88, 0.78, 0.94, 1.08, 1.24 -> best epoch 2 (0.78)
    visual = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]  # always improving: never stops
    stops = []
    for t, (a, v) in enumerate(zip(audio, visual)):
        ctx.epoch = t
        method.on_epoch_end(model, ctx, {"loss_audio": a, "loss_visual": v, "acc_audio": 0.0})
        stops.append(dict(method.stopped))
    assert method.best["audio"] == pytest.approx(0.6 * 0.7 + 0.4 * 0.9) and method.best_epoch["audio"] == 2
    assert [s["audio"] for s in stops] == [-1, -1, -1, -1, -1, 5]  # 5 - 2 > 2 first at epoch 5
    assert all(s["visual"] == -1 for s in stops) and method.best_epoch["visual"] == 5
    assert method.coefficients() == {"audio": 0.0, "visual": 1.0}


def test_stopped_modality_is_frozen_exactly_and_the_others_train():
    """apply=lr: after the stop, no parameter of audio's encoder and own head moves (momentum and weight decay
    included); every visual parameter still does."""
    spec = tiny_spec(2)
    method, model, opt, ctx = _setup(spec, MSESParams(patience=0, restore="none"))
    _steps(method, model, opt, ctx)
    for t, loss_a in enumerate([1.0, 2.0, 3.0]):  # audio worsens: stops after epoch 1 (1 - 0 > 0)
        ctx.epoch = t
        method.on_epoch_end(model, ctx, {"loss_audio": loss_a, "loss_visual": 1.0 - 0.1 * t})
    assert method.stopped["audio"] == 1 and method.stopped["visual"] == -1
    names = {id(p): n for n, p in model.named_parameters()}
    audio = {names[id(p)] for p in modality_groups(model)["audio"]}
    before = _params(model)
    _steps(method, model, opt, ctx, n=3, seed=5)
    after = _params(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert audio and not (moved & audio)
    assert moved == set(before) - audio


@pytest.mark.parametrize("restore", ["all", "modality"])
def test_restore_brings_back_the_best_epochs_state(restore):
    """restore=all: every parameter and the optimizer's momentum at audio's best epoch, the current lr kept;
    restore=modality: audio's parameters only, visual keeps its later progress."""
    spec = tiny_spec(2)
    method, model, opt, ctx = _setup(spec, MSESParams(patience=1, restore=restore))
    _steps(method, model, opt, ctx)
    ctx.epoch = 0
    method.on_epoch_end(model, ctx, {"loss_audio": 1.0, "loss_visual": 1.0})  # best for both: state kept
    at_best = _params(model)
    mom_best = copy.deepcopy(opt.state_dict()["state"])
    for t in (1, 2):
        _steps(method, model, opt, ctx, seed=10 * t)
        ctx.epoch = t
        opt.param_groups[0]["lr"] = 0.005 * t  # the schedule moved on
        if t == 2:
            before_stop = _params(model)
        method.on_epoch_end(model, ctx, {"loss_audio": 1.0 + t, "loss_visual": 1.0 - 0.1 * t})
    assert method.stopped["audio"] == 2  # 2 - 0 > 1
    now = _params(model)
    audio = {n for n, p in model.named_parameters() if any(p is q for q in modality_groups(model)["audio"])}
    for k in now:
        want = at_best[k] if (restore == "all" or k in audio) else before_stop[k]
        assert torch.equal(now[k], want), k
    assert opt.param_groups[0]["lr"] == 0.01  # never the best epoch's rate
    if restore == "all":
        for i, st in opt.state_dict()["state"].items():
            assert torch.equal(st["momentum_buffer"], mom_best[i]["momentum_buffer"])
    assert method.kept["audio"] is None


def test_state_dict_round_trip_resumes_identically():
    spec = tiny_spec(2)
    params = MSESParams(patience=1, restore="all")
    m1, model1, opt1, ctx1 = _setup(spec, params)
    for t, la in enumerate([1.0, 0.5]):
        _steps(m1, model1, opt1, ctx1, seed=t)
        ctx1.epoch = t
        m1.on_epoch_end(model1, ctx1, {"loss_audio": la, "loss_visual": 1.0})
    m2, model2, opt2, ctx2 = _setup(spec, params)
    model2.load_state_dict(copy.deepcopy(model1.state_dict()))
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    m2.load_state_dict(copy.deepcopy(m1.state_dict()))
    for m, model, opt, ctx in ((m1, model1, opt1, ctx1), (m2, model2, opt2, ctx2)):
        for t, la in ((2, 2.0), (3, 3.0), (4, 4.0)):  # visual stops after epoch 2 and audio after epoch 3
            _steps(m, model, opt, ctx, seed=10 * t)
            ctx.epoch = t
            m.on_epoch_end(model, ctx, {"loss_audio": la, "loss_visual": 1.0})
    assert m1.stopped == m2.stopped == {"audio": 3, "visual": 2}
    for (k, p1), p2 in zip(model1.named_parameters(), model2.parameters()):
        assert torch.equal(p1, p2), k


def test_refusals():
    spec = tiny_spec(2)
    for bad, match in (({"restore": "best"}, "restore"), ({"patience": -1}, "patience"),
                       ({"prev_weight": 1.0}, "prev_weight"), ({"apply": "x"}, "apply")):
        with pytest.raises(ValueError, match=match):
            MSES(MSESParams(**bad), spec)
    MSES(MSESParams(), tiny_spec(2, task="regression"))  # per-head losses exist for regression too


def test_trainer_feeds_validation_head_losses_and_the_stop_shows_in_history(tmp_path):
    """Through the real trainer: the hook is called between epochs (not after the last) with that epoch's
    validation metrics only (val/loss_<m> as in history.csv, no test metric); a patience of 0 on a worsening head
    stops it and history.csv records `coef/stopped_<m>` from the epoch after the stop."""
    cfg = tiny_config(tmp_path, ["trainer.epochs=4", "trainer.batch_size=8", "trainer.select=last",
                                 "methods.mses.patience=0", "methods.mses.restore=none"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"), n=(24, 8, 12))
    seen = []
    orig = MSES.on_epoch_end

    def spy(self, model, ctx, metrics):  # the real metrics are recorded; audio's loss is made to worsen
        seen.append((ctx.epoch, dict(metrics)))
        return orig(self, model, ctx, {**metrics, "loss_audio": float(ctx.epoch)})

    MSES.on_epoch_end = spy
    try:
        res = Trainer(cfg, RunSpec("mses", "cremad", 0, Path(cfg.paths.runs) / "m/s0",
                                   prepared_dir(cfg, "cremad"))).fit()
    finally:
        MSES.on_epoch_end = orig
    hist = pd.read_csv(Path(cfg.paths.runs) / "m/s0/history.csv")
    assert [e for e, _ in seen] == [0, 1, 2]
    for e, metrics in seen:
        assert metrics["loss_audio"] == pytest.approx(hist.loc[e, "val/loss_audio"])
        assert not any(k.startswith("test") for k in metrics)
    # patience 0: audio stops after epoch 1 (1 - 0 > 0), recorded from epoch 2 on
    assert hist["coef/stopped_audio"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert res["selection"]["last"]["epoch"] == 3
