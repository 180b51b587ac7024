"""MMPareto: closed-form min-norm, Pareto guarantee under conflict, no-conflict sum, step wiring with its own
unimodal heads (fusion head gets exactly grad L_mm), conflicts on a task built to have them, trainer round trip."""
import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec

from baselines.mmpareto import MMPareto, MMParetoParams, integrate, min_norm_2
from g2d.methods.base import Context, task_loss
from g2d.models.model import MultimodalModel
from g2d.runs import prepared_dir
from g2d.train import checkpoint
from g2d.train.trainer import RunSpec, Trainer
from tests.helpers import killed_during, tiny_config, write_tiny_cremad

torch.set_num_threads(1)


def _conflicting(seed=0):
    """Two gradients (two tensors each, very different layer scales) with a negative inner product."""
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(5, 3, generator=g, dtype=torch.float64) * 10, torch.randn(7, generator=g, dtype=torch.float64)]
    b = [-0.5 * a[0] + torch.randn(5, 3, generator=g, dtype=torch.float64),
         torch.randn(7, generator=g, dtype=torch.float64) * 0.1]
    flat = lambda gs: torch.cat([x.reshape(-1) for x in gs])
    assert flat(a).dot(flat(b)) < 0
    return a, b, flat


@pytest.mark.parametrize("seed", range(5))
def test_min_norm_matches_grid_search(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(20, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    b = b - 0.8 * a  # mostly conflicting
    c = min_norm_2(a, b)
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    norms = ((grid[:, None] * a + (1 - grid[:, None]) * b) ** 2).sum(1)
    c_grid = grid[norms.argmin()]
    assert abs(float(c) - float(c_grid)) < 1e-4
    # the textbook closed form for 2 vectors
    expect = ((b - a).dot(b) / (a - b).dot(a - b)).clamp(0, 1)
    assert torch.allclose(c, expect)


def test_min_norm_boundary_and_degenerate():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([2.0, 0.0])  # a.b >= |a|^2: the min-norm point is a itself
    assert float(min_norm_2(a, b)) == 1.0
    assert float(min_norm_2(b, a)) == 0.0
    assert float(min_norm_2(a, a.clone())) == 0.5  # identical vectors: any weight, we take 1/2


@pytest.mark.parametrize("seed", range(4))
def test_conflict_gives_pareto_direction(seed):
    a, b, flat = _conflicting(seed)
    gamma = 1.5
    out, cos, w_mm, w_u = integrate(a, b, gamma, "global")
    d = flat(out)
    assert cos < 0
    assert float(w_mm) != 0.5 and abs(float(w_mm + w_u) - 1) < 1e-12
    # non-negative inner product with each loss gradient (the Pareto property)
    assert d.dot(flat(a)) >= -1e-9 and d.dot(flat(b)) >= -1e-9
    # interior min-norm point: equal inner products with both gradients
    assert torch.allclose(d.dot(flat(a)), d.dot(flat(b)), rtol=1e-9)
    # global rescale: norm equals gamma * |g_mm + g_u|
    assert torch.allclose(d.norm(), gamma * (flat(a) + flat(b)).norm(), rtol=1e-9)
    # direction equals the min-norm combination computed independently
    c = min_norm_2(flat(a), flat(b))
    ref = c * flat(a) + (1 - c) * flat(b)
    assert torch.allclose(d / d.norm(), ref / ref.norm(), atol=1e-10)


def test_no_conflict_is_gamma_times_sum():
    g = torch.Generator().manual_seed(3)
    a = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    b = [x + 0.1 * torch.randn(x.shape, generator=g) for x in a]
    for mode in ("global", "tensor"):
        out, cos, w_mm, w_u = integrate(a, b, 1.5, mode)
        assert cos > 0 and float(w_mm) == 0.5 and float(w_u) == 0.5
        for o, x, y in zip(out, a, b):
            assert torch.allclose(o, 1.5 * (x + y), atol=1e-6)


def test_tensor_rescale_is_official_per_tensor_rule():
    a, b, _ = _conflicting(1)
    out, _, w_mm, w_u = integrate(a, b, 2.0, "tensor")
    for o, x, y in zip(out, a, b):
        d = 2 * (w_mm * x + w_u * y)
        r = max(1.0, float((x + y).norm() / d.norm()))
        assert torch.allclose(o, 2.0 * r * d)


def test_bad_rescale_raises():
    with pytest.raises(ValueError, match="rescale"):
        MMPareto(MMParetoParams(rescale="layer"), tiny_spec(2))


def _grads(loss, params):
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _model(spec, fusion="late", seed=0):
    """A model with MMPareto's unimodal heads attached as the trainer does (before the optimizer)."""
    torch.manual_seed(seed)
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    method = MMPareto(MMParetoParams(gamma=1.5), spec)
    model.aux = method.aux_module(model)
    return model, method


def _step_lr0(model, method, batch, spec):
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: grads stay for inspection
    return method.train_step(model, batch, opt, ctx), ctx


def test_aux_heads_are_own_linear_heads_not_in_the_prediction():
    spec = tiny_spec(2)
    model, method = _model(spec)
    assert set(model.aux) == set(spec.modality_names)
    for m in spec.modality_names:
        h = model.aux[m]
        assert isinstance(h, torch.nn.Linear)
        assert (h.in_features, h.out_features) == (model.encoders[m].out_dim, spec.num_outputs)
        assert torch.equal(h.bias, torch.zeros_like(h.bias))  # initialised like the model's heads
    batch = make_batch(spec, 8)
    model.eval()
    with torch.no_grad():
        before = method.predict(model(batch)).clone()
        for p in model.aux.parameters():
            p.add_(torch.randn_like(p))
        assert torch.equal(method.predict(model(batch)), before)  # the unimodal heads never feed the prediction


def test_missing_aux_heads_is_a_clear_error():
    spec = tiny_spec(2)
    model = MultimodalModel(spec, tiny_model_cfg())
    method = MMPareto(MMParetoParams(), spec)
    with pytest.raises(RuntimeError, match="aux_module"):
        _step_lr0(model, method, make_batch(spec, 4), spec)


@pytest.mark.parametrize("fusion,n,task", [("late", 2, "classification"), ("concat", 2, "classification"),
                                           ("late", 3, "classification"), ("late", 2, "regression")])
def test_train_step_fusion_head_gets_exactly_grad_mm(fusion, n, task):
    spec = tiny_spec(n, task=task)
    model, method = _model(spec, fusion)
    ref = copy.deepcopy(model)
    batch = make_batch(spec, 8)
    terms, ctx = _step_lr0(model, method, batch, spec)

    out = ref(batch)  # independent computation, separate autograd passes per loss
    y = batch["label"]
    mods = spec.modality_names
    l_mm = task_loss(spec, out.fused, y)
    l_u = {m: task_loss(spec, ref.aux[m](out.features[m]), y) for m in mods}
    assert torch.allclose(terms["loss"], l_mm + sum(l_u.values()))
    assert torch.allclose(terms["mm"], l_mm)
    named, rnames = dict(model.named_parameters()), {id(p): k for k, p in ref.named_parameters()}
    got = lambda p: named[rnames[id(p)]].grad
    fusion_p = list(ref.fusion.parameters())
    for m in mods:  # structure: no unimodal loss reaches the fusion head
        assert all(g is None for g in torch.autograd.grad(l_u[m], fusion_p, retain_graph=True, allow_unused=True))
    # the fusion head's gradient is exactly grad L_mm
    for p, e in zip(fusion_p, _grads(l_mm, fusion_p)):
        assert torch.allclose(got(p), e, rtol=0, atol=1e-6)
    enc = ref.modality_parameters()
    for m in mods:
        # each unimodal head's gradient is exactly grad of its own L_m
        aux_p = list(ref.aux[m].parameters())
        for p, e in zip(aux_p, _grads(l_u[m], aux_p)):
            assert torch.allclose(got(p), e, rtol=0, atol=1e-6)
        for other in mods:  # L_m reaches neither another modality's encoder nor another unimodal head
            if other != m:
                reach = enc[other] + list(ref.aux[other].parameters())
                assert all(g is None for g in torch.autograd.grad(l_u[m], reach, retain_graph=True, allow_unused=True))
        g_mm, g_u = _grads(l_mm, enc[m]), _grads(l_u[m], enc[m])
        # guard against accumulating .grad across losses (BalanceBenchmark bug): they must differ
        assert any(not torch.allclose(x, z) for x, z in zip(g_mm, g_u))
        expect, cos, w_mm, _ = integrate(g_mm, g_u, 1.5, "global")
        assert torch.allclose(ctx.log[f"cos_{m}"][0], cos, atol=1e-5)
        assert float(ctx.log[f"conflict_{m}"][0]) == float(cos <= 0)
        for p, e in zip(enc[m], expect):
            assert torch.allclose(got(p), e, rtol=1e-4, atol=1e-7)
    keys = ("cos", "w_mm", "w_uni", "conflict") + (("uni_acc",) if task == "classification" else ())
    assert set(ctx.log) == {f"{k}_{m}" for m in mods for k in keys}
    if task == "classification":
        for m in mods:
            acc = (ref.aux[m](out.features[m]).argmax(1) == y).float().mean()
            assert torch.equal(ctx.log[f"uni_acc_{m}"][0], acc)


def test_opposite_unimodal_head_conflicts_and_gets_min_norm_weights():
    """Built to conflict: audio's unimodal head predicts the opposite of the fusion head's audio part, so
    L_mm and L_audio pull the audio encoder's features in (nearly) opposite directions."""
    spec = tiny_spec(2)
    model, method = _model(spec, "late")
    with torch.no_grad():
        model.aux["audio"].weight.copy_(-model.fusion.heads["audio"].weight)
        model.aux["audio"].bias.zero_()
    ref = copy.deepcopy(model)
    batch = make_batch(spec, 8)
    _, ctx = _step_lr0(model, method, batch, spec)
    cos, w_mm = float(ctx.log["cos_audio"][0]), float(ctx.log["w_mm_audio"][0])
    assert cos < -0.5, cos
    assert float(ctx.log["conflict_audio"][0]) == 1.0
    assert w_mm != 0.5 and 0.0 <= w_mm <= 1.0
    # the integrated audio-encoder step is Pareto: it increases neither loss to first order
    out = ref(batch)
    y = batch["label"]
    enc = ref.modality_parameters()["audio"]
    g_mm = _grads(task_loss(spec, out.fused, y), enc)
    g_u = _grads(task_loss(spec, ref.aux["audio"](out.features["audio"]), y), enc)
    named, rnames = dict(model.named_parameters()), {id(p): k for k, p in ref.named_parameters()}
    d = torch.cat([named[rnames[id(p)]].grad.reshape(-1) for p in enc]).double()
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs]).double()
    assert d.dot(flat(g_mm)) >= -1e-9 and d.dot(flat(g_u)) >= -1e-9


def _synthetic(spec, n, seed):
    """Both modalities carry the label in a class-dependent pixel, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, spec.num_outputs, (n,), generator=g)
    b = {m.name: torch.randn(n, *m.shape, generator=g) for m in spec.modalities}
    b["audio"][torch.arange(n), 0, y * 3, 0] += 1.5
    b["visual"][torch.arange(n), y % 3, 0, y, 0] += 1.5
    b["label"], b["index"] = y, torch.arange(n)
    return b


def _shared_head_step(model, batch, opt, ctx, gamma=1.5):
    """The structure this file used to test (contrast only): L_m on the fusion head's own per-modality
    logits, so the unimodal losses also train the fused head."""
    opt.zero_grad(set_to_none=True)
    out, y = model(batch), batch["label"]
    l_mm = task_loss(ctx.spec, out.fused, y)
    enc = model.modality_parameters()
    heads = list(model.fusion.parameters())
    g_mm = _grads(l_mm, [p for m in model.modalities for p in enc[m]] + heads)
    head_g, start = g_mm[-len(heads):], 0
    for m in model.modalities:
        l_m = task_loss(ctx.spec, out.logits[m], y)
        g = _grads(l_m, enc[m] + heads)
        new, cos, _, _ = integrate(g_mm[start:start + len(enc[m])], g[:len(enc[m])], gamma, "global")
        start += len(enc[m])
        head_g = [a + b for a, b in zip(head_g, g[len(enc[m]):])]
        for p, gp in zip(enc[m], new):
            p.grad = gp
        ctx.record(**{f"conflict_{m}": (cos <= 0).float()})
    for p, gp in zip(heads, head_g):
        p.grad = gp
    opt.step()


def _conflict_rates(structure, steps=100, seed=0):
    spec = tiny_spec(2)
    model, method = _model(spec, "late", seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=1, optimizer=opt)
    data = _synthetic(spec, 256, 100 + seed)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, 256, (16,), generator=g)
        batch = {k: v[idx] for k, v in data.items()}
        if structure == "own":
            method.train_step(model, batch, opt, ctx)
        else:
            _shared_head_step(model, batch, opt, ctx)
        ctx.step += 1
    return {m: float(torch.stack(ctx.log[f"conflict_{m}"]).mean()) for m in spec.modality_names}


def test_conflicts_occur_on_a_synthetic_task():
    """MMPareto's Pareto branch must be reachable in ordinary training. With its own unimodal heads the
    fused and unimodal gradients conflict in a fraction of the steps; with the old shared late-fusion heads
    (contrast, same task and seed) the unimodal loss trains the very head whose mean is the fused output,
    which keeps the two gradients aligned: no conflict at all, i.e. MMPareto degenerated into
    "joint + unimodal losses with encoder gradients x 1.5"."""
    own = _conflict_rates("own")
    shared = _conflict_rates("shared")
    assert own["audio"] > 0 and own["visual"] > 0, own
    assert shared == {"audio": 0.0, "visual": 0.0}, shared


def _trainer_run(cfg, name, seed=0):
    run_dir = Path(cfg.paths.runs) / name / f"s{seed}"
    res = Trainer(cfg, RunSpec("mmpareto", "cremad", seed, run_dir, prepared_dir(cfg, "cremad"),
                               Path(cfg.paths.runs))).fit()
    res = json.loads(json.dumps(res))
    res.pop("train_time_s")
    return res, run_dir


def test_trainer_resume_with_unimodal_heads_is_bit_identical(tmp_path, monkeypatch):
    """Through the real trainer: the unimodal heads are checkpointed (ckpt.pt), left out of model.pt, and a
    crashed-then-resumed run equals the uninterrupted one bit for bit; conflict rates land in history.csv."""
    cfg = tiny_config(tmp_path, ["trainer.epochs=3", "trainer.batch_size=8"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))
    full, full_dir = _trainer_run(cfg, "full")
    killed_during(monkeypatch, lambda: _trainer_run(cfg, "crash"), eval_call=3)  # epoch 0 is checkpointed
    run_dir = Path(cfg.paths.runs) / "crash" / "s0"
    ckpt = checkpoint.load(run_dir / "ckpt.pt")
    assert ckpt["epoch"] == 0
    assert {k.split(".")[1] for k in ckpt["model"] if k.startswith("aux.")} == {"audio", "visual"}
    resumed, _ = _trainer_run(cfg, "crash")
    assert resumed["selection"] == full["selection"]
    h1 = pd.read_csv(full_dir / "history.csv").drop(columns="time_s")
    h2 = pd.read_csv(run_dir / "history.csv").drop(columns="time_s")
    pd.testing.assert_frame_equal(h1, h2)
    for m in ("audio", "visual"):
        assert h1[f"coef/conflict_{m}"].between(0, 1).all() and f"coef/uni_acc_{m}" in h1
    a = checkpoint.load(full_dir / "model.pt")["model"]
    b = checkpoint.load(run_dir / "model.pt")["model"]
    assert a.keys() == b.keys() and not any(k.startswith("aux.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
