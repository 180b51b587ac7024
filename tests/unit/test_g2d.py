"""G2D loss against a hand computation, confidence scores, frozen teachers, end-to-end training."""
import json

import pandas as pd
import pytest
import torch
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec

from g2d import config as C
from g2d import registry
from g2d.methods.base import Context
from g2d.models.model import MultimodalModel, Output
from g2d.train.trainer import RunSpec, Trainer, teacher_path

torch.set_num_threads(1)


def teachers_for(spec, cfg=None, seed=1):
    torch.manual_seed(seed)
    out = {}
    for m in spec.modality_names:
        t = MultimodalModel(spec, cfg or tiny_model_cfg(), (m,)).eval()
        for p in t.parameters():
            p.requires_grad_(False)
        out[m] = t
    return out


def make(name, spec, teachers, **params):
    cls = registry.get_method(name)
    method = cls(C._validate(C.OmegaConf.create(params), cls.Params, "test"), spec)
    return method, Context(spec=spec, device=torch.device("cpu"), epochs=4, teachers=teachers)


def random_output(spec, teachers, batch, seed=3):
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(len(batch["label"]), teachers[m].encoders[m].out_dim, generator=g)
             for m in spec.modality_names}
    fused = torch.randn(len(batch["label"]), spec.num_outputs, generator=g)
    return Output(features=feats, logits={}, fused=fused)


def log_softmax(x):
    return x - torch.log(torch.exp(x).sum(1, keepdim=True))


def test_loss_equals_hand_computation():
    spec = tiny_spec(2)
    teachers = teachers_for(spec)
    batch = make_batch(spec, batch_size=7)
    params = {"task_weight": 0.7, "feature_weight": 1.3, "logit_weight": 0.4, "temperature": 2.5,
                  "feature_weights": {"visual": 0.2}, "temperatures": {"audio": 3.0}, "logit_weights": {"visual": 0.9}}
    method, ctx = make("g2d-nosmp", spec, teachers, **params)
    out = random_output(spec, teachers, batch)
    terms = method.loss(batch, out, ctx)
    assert set(terms) == {"task", "kd_feat_audio", "kd_feat_visual", "kd_logit_audio", "kd_logit_visual"}
    y, s, B = batch["label"], out.fused.double(), 7
    ce = -log_softmax(s)[torch.arange(B), y].mean()
    assert terms["task"].item() == pytest.approx(0.7 * ce.item(), rel=1e-5)
    for m, wf, wl, T in (("audio", 1.3, 0.4, 3.0), ("visual", 0.2, 0.9, 2.5)):
        with torch.no_grad():
            t = teachers[m](batch)
        ft, lt = t.features[m].double(), t.logits[m].double()
        feat = ((out.features[m].double() - ft) ** 2).sum() / ft.numel()  # element mean
        assert terms[f"kd_feat_{m}"].item() == pytest.approx(wf * feat.item(), rel=1e-5)
        pt = torch.exp(log_softmax(lt / T))
        kl = (pt * (log_softmax(lt / T) - log_softmax(s / T))).sum() / B * T**2  # KL(teacher || fused)
        assert terms[f"kd_logit_{m}"].item() == pytest.approx(wl * kl.item(), rel=1e-5)
        conf = torch.softmax(lt, 1)[torch.arange(B), y].mean()  # T = 1 for scoring
        assert ctx.log[f"conf_{m}"][0].item() == pytest.approx(conf.item(), rel=1e-5)
    # a zero weight drops the term (KD ablations: logit-only / feature-only)
    method0, ctx0 = make("g2d-nosmp", spec, teachers, feature_weight=0.0)
    assert set(method0.loss(batch, out, ctx0)) == {"task", "kd_logit_audio", "kd_logit_visual"}


def test_regression_loss_and_confidence():
    spec = tiny_spec(2, task="regression")
    teachers = teachers_for(spec)
    batch = make_batch(spec, batch_size=5)
    method, ctx = make("g2d-nosmp", spec, teachers, temperature=4.0, logit_weight=0.5, feature_weight=0.0)
    out = random_output(spec, teachers, batch)
    terms = method.loss(batch, out, ctx)
    y = batch["label"].double()
    assert terms["task"].item() == pytest.approx(((out.fused.double().squeeze(-1) - y) ** 2).mean().item(), rel=1e-5)
    for m in spec.modality_names:
        with torch.no_grad():
            tp = teachers[m](batch).logits[m].double()
        # regression logit KD: MSE between student and teacher predictions (temperature unused)
        assert terms[f"kd_logit_{m}"].item() == pytest.approx(
            0.5 * ((out.fused.double() - tp) ** 2).mean().item(), rel=1e-5)
        conf = torch.exp(-((tp.squeeze(-1) - y) ** 2).mean())
        assert ctx.log[f"conf_{m}"][0].item() == pytest.approx(conf.item(), rel=1e-5)


def test_feature_dim_mismatch_and_bad_params_raise():
    spec = tiny_spec(2)
    wide = tiny_model_cfg()
    wide.resnet.width = 6
    method, ctx = make("g2d-nosmp", spec, teachers_for(spec, wide))
    model = MultimodalModel(spec, tiny_model_cfg())
    batch = make_batch(spec)
    with pytest.raises(ValueError, match="same model"):
        method.loss(batch, model(batch), ctx)
    with pytest.raises(ValueError, match="unknown modalities"):
        make("g2d", spec, {}, feature_weights={"text": 1.0})
    with pytest.raises(ValueError, match="> 0"):
        make("g2d", spec, {}, temperature=0.0)


def test_teachers_get_no_gradient_and_do_not_change():
    spec = tiny_spec(3)
    teachers = teachers_for(spec)
    snap = {m: {k: v.clone() for k, v in t.state_dict().items()} for m, t in teachers.items()}
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg())
    method, ctx = make("g2d", spec, teachers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = [make_batch(spec, seed=s) for s in range(3)]  # alive: teacher outputs are cached by id(batch)
    for batch, e in zip(batches, (0, 3, 3)):
        ctx.epoch = e
        terms = method.train_step(model, batch, opt, ctx)
        assert torch.isfinite(terms["loss"])
    assert {"kd_feat_text", "kd_logit_text", "task"} <= set(terms)
    for m, t in teachers.items():
        assert not t.training
        for k, v in t.state_dict().items():
            assert torch.equal(v, snap[m][k]), (m, k)
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    assert all(p.grad is not None for ps in model.modality_parameters().values() for p in ps)
    assert len(ctx.log["conf_audio"]) == 3 and len(ctx.log["kappa_text"]) == 3  # SMP logs once per step


def _write_params(tmp_path):
    text = f"""
method: g2d
dataset: cremad
profile: embedded
suite:
  datasets: [cremad]
  seeds: [0]
  groups:
    main: {{methods: [g2d], datasets: [cremad]}}
paths: {{raw: {tmp_path}/raw, prepared: {tmp_path}/prepared, runs: {tmp_path}/runs, reports: {tmp_path}/rep}}
trainer: {{epochs: 2, batch_size: 16, eval_batch_size: 64, lr: 0.01, device: cpu, progress: 'off', num_threads: 1}}
model: {{fusion: late, resnet: {{width: 4, blocks: [1, 1], stem: small}}}}
datasets:
  cremad: {{standin: {{n_train: 40, n_test: 16}}}}
methods:
  unimodal: {{modality: audio}}
  g2d: {{smp_scope: official, smp_phases: [0.5], temperature: 2.0}}
  joint+smp: {{smp_scope: strict, smp_phase_epochs: [1], smp_rank_per: epoch}}
profiles: {{embedded: {{}}}}
"""
    (tmp_path / "params.yaml").write_text(text)
    return tmp_path / "params.yaml"


def test_end_to_end_teachers_then_g2d(tmp_path):
    params = _write_params(tmp_path)
    cfg = C.load_config([], params=params)
    prepared = tmp_path / "prepared" / "standin" / "cremad"
    registry.get_dataset("cremad")(C.dataset_config(cfg, "cremad")).standin(prepared)
    runs = tmp_path / "runs"
    for m in ("audio", "visual"):
        tcfg = C.load_config([f"methods.unimodal.modality={m}", "trainer.epochs=1"], params=params)
        tdir = teacher_path(runs, "cremad", m, 0).parent  # where the g2d run will look for it
        Trainer(tcfg, RunSpec("unimodal", "cremad", 0, tdir, prepared, runs)).fit()
    assert C.method_params(cfg, "g2d").smp_scope == "official"
    res = Trainer(cfg, RunSpec("g2d", "cremad", 0, runs / "g2d-cremad" / "s0", prepared, runs)).fit()
    run = runs / "g2d-cremad" / "s0"
    assert json.loads((run / "metrics.json").read_text())["method"] == "g2d" and res["epochs"] == 2
    hist = pd.read_csv(run / "history.csv")
    for col in ("coef/kappa_audio", "coef/kappa_visual", "coef/conf_audio", "coef/conf_visual",
                "train/kd_feat_audio", "train/kd_logit_visual", "train/task"):
        assert col in hist.columns, col
    # tau = 0.5 * 2 epochs = 1: in epoch 0 exactly one modality trains per step, in epoch 1 both
    k = hist[["coef/kappa_audio", "coef/kappa_visual"]].to_numpy()
    assert k[0].sum() == pytest.approx(1.0) and k[1].tolist() == [1.0, 1.0]
    assert ((hist[["coef/conf_audio", "coef/conf_visual"]] > 0) & (hist[["coef/conf_audio", "coef/conf_visual"]] < 1)).all().all()
    # SMP as a plug-in on Joint-Train (teachers used for scoring only), strict scope
    Trainer(cfg, RunSpec("joint+smp", "cremad", 0, runs / "jsmp" / "s0", prepared, runs)).fit()
    hist = pd.read_csv(runs / "jsmp" / "s0" / "history.csv")
    k = hist[["coef/kappa_audio", "coef/kappa_visual"]].to_numpy()
    assert sorted(k[0].tolist()) == [0.0, 1.0] and k[1].tolist() == [1.0, 1.0]  # epoch ranking: one trains
    assert "train/kd_feat_audio" not in hist.columns
