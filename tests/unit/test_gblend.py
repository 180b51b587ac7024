"""Gradient-Blending invariants: the OGR weights, the held-out split, the blended loss's gradients, the shadow
estimation window, checkpoint state, k = 3 and regression."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from baselines.gblend import GBlend, GBlendParams, blend_weights, holdout_fraction
from g2d.methods.base import Context
from g2d.train.trainer import build_model, build_optimizer
from g2d.config import TrainerConfig
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _build(spec, params, seed=0):
    torch.manual_seed(seed)
    method = GBlend(params, spec)
    model = build_model(method, spec, tiny_model_cfg())
    opt = build_optimizer(model.parameters(), TrainerConfig(lr=0.05))
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=10, optimizer=opt)
    method.setup(model, ctx)
    return method, model, opt, ctx


def _batch(spec, n=24, seed=0, offset=0):
    b = make_batch(spec, n, seed=seed)
    b["index"] = torch.arange(n) + offset
    return b


def _epoch(method, model, opt, ctx, epoch, batches):
    ctx.epoch, ctx.log = epoch, {}
    model.train()
    method.on_epoch_start(model, ctx)
    for b in batches:
        method.train_step(model, b, opt, ctx)
        ctx.step += 1


# (a) the weights: |dG| / dO^2 normalised, against a plain hand computation ---------------------------------
@pytest.mark.parametrize("estimate", ["delta", "final"])
def test_blend_weights_match_hand_computation(estimate):
    g = torch.Generator().manual_seed(1)
    start, end = torch.rand(3, 2, generator=g) + 0.5, torch.rand(3, 2, generator=g) + 0.2
    raw = []
    for j in range(3):
        lt_s, lv_s, lt_e, lv_e = (float(start[j, 0]), float(start[j, 1]), float(end[j, 0]), float(end[j, 1]))
        if estimate == "delta":  # paper: dG = L^V_s - L^V_e, dO = (L^V_e - L^T_e) - (L^V_s - L^T_s)
            num, den = lv_s - lv_e, (lv_e - lt_e) - (lv_s - lt_s)
        else:  # MultiBench delta=False: L^V_e / O_e^2, O_e < 0 -> 1e-4
            num, den = lv_e, lv_e - lt_e
            den = 1e-4 if den < 0 else den
        raw.append(abs(num) / (den * den))
    want = [r / sum(raw) for r in raw]
    got = blend_weights(start, end, estimate)
    assert got.tolist() == pytest.approx(want, rel=1e-9)
    assert float(got.sum()) == pytest.approx(1.0)
    # a head that overfits more (bigger dO at the same dG) gets a smaller weight
    s2, e2 = start.clone(), end.clone()
    e2[0, 0] -= 0.3  # lower final train loss of head 0: O_e grows
    if estimate == "delta":
        assert blend_weights(s2, e2)[0] < got[0]


def test_blend_weights_degenerate_is_uniform():
    same = torch.ones(3, 2)
    assert blend_weights(same, same).tolist() == pytest.approx([1 / 3] * 3)  # dG = 0 for every head


# (b) held-out split: fixed, about v_rate, never trains the main model ----------------------------------------
def test_holdout_is_fixed_and_about_v_rate():
    idx = torch.arange(20000)
    u = holdout_fraction(idx)
    assert torch.equal(u, holdout_fraction(idx.clone()))
    assert bool(((u >= 0) & (u < 1)).all())
    assert abs(float((u < 0.08).double().mean()) - 0.08) < 0.01
    assert not torch.equal(u < 0.08, holdout_fraction(idx, seed=1) < 0.08)


def test_blended_loss_gradients_and_heldout_excluded():
    """Main grads = d/dtheta [w_f CE(fused) + sum_m w_m CE(aux_m)] on the kept samples only; fusion head gets
    w_f x Joint-Train's grad, aux head m only w_m x its own CE's grad; held-out inputs do not matter."""
    spec = tiny_spec(2)
    method, model, opt, ctx = _build(spec, GBlendParams(v_rate=0.3, super_epoch=2))
    method.shadows = None  # no estimation: compare the main step only
    method.weights = torch.tensor([0.2, 0.3, 0.5])
    b = _batch(spec, 24)
    held = holdout_fraction(b["index"]) < 0.3
    assert 0 < int(held.sum()) < 24
    ref = copy.deepcopy(model)
    mods = spec.modality_names
    # hand computation on the kept samples
    kb = {k: v[~held] for k, v in b.items()}
    out = ref(kb)
    y = kb["label"]
    total = 0.5 * F.cross_entropy(out.fused, y) + sum(
        w * F.cross_entropy(ref.aux[m](out.features[m]), y) for w, m in zip((0.2, 0.3), mods))
    total.backward()
    joint = copy.deepcopy(model)
    F.cross_entropy(joint(kb).fused, y).backward()
    # the method's step, with the held-out samples' inputs replaced by garbage: same gradients
    b2 = {k: v.clone() for k, v in b.items()}
    for m in mods:
        b2[m][held] = 1e3
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: grads stay, weights unchanged
    method.train_step(model, b2, sgd, ctx)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    for (n, p), (_, q) in zip(model.fusion.named_parameters(), joint.fusion.named_parameters()):
        torch.testing.assert_close(p.grad, 0.5 * q.grad, msg=n)  # fused head: w_fused x Joint-Train
    for i, m in enumerate(mods):
        h = copy.deepcopy(ref.aux[m])
        h.zero_grad()
        F.cross_entropy(h(out.features[m].detach()), y).backward()
        for p, q in zip(model.aux[m].parameters(), h.parameters()):
            torch.testing.assert_close(p.grad, (0.2, 0.3)[i] * q.grad)  # aux head m: w_m x its own CE only


# (c) estimation: shadows train on their own, accumulate pre-step losses, and set the next window's weights ------
def test_shadow_losses_and_window_weights():
    spec = tiny_spec(2)
    p = GBlendParams(v_rate=0.3, super_epoch=2)
    method, model, opt, ctx = _build(spec, p)
    ctx.epoch = 0
    method.on_epoch_start(model, ctx)
    assert method.shadows is not None and method.weights is None
    b = _batch(spec, 24)
    held = holdout_fraction(b["index"]) < 0.3
    before = copy.deepcopy(method.shadows)
    main_before = copy.deepcopy(model)
    method.train_step(model, b, opt, ctx)
    tr = {k: v[~held] for k, v in b.items()}
    ho = {k: v[held] for k, v in b.items()}
    enc, head = before["audio"]["enc"], before["audio"]["head"]
    lt = F.cross_entropy(head(enc(tr["audio"])), tr["label"])  # pre-step train loss, train mode
    enc.eval(), head.eval()
    lv = F.cross_entropy(head(enc(ho["audio"])), ho["label"])  # held-out loss, eval mode
    acc = method.hist[-1][0]
    torch.testing.assert_close(acc, torch.tensor([float(lt.detach()) * int((~held).sum()), float((~held).sum()),
                                                  float(lv.detach()) * int(held.sum()), float(held.sum())]))
    # the shadows stepped; the main model's step is the plain blended one (shadows do not leak into it)
    assert any(not torch.equal(a, c) for a, c in zip(before.parameters(), method.shadows.parameters()))
    ref_m, _, ref_opt, ref_ctx = _build(spec, p)
    ref_m.shadows = None
    ref_ctx.epoch = 0
    ref_m.done_epoch = 0
    ref_model = main_before
    ref_opt = build_optimizer(ref_model.parameters(), TrainerConfig(lr=0.05))
    ref_m.train_step(ref_model, b, ref_opt, ref_ctx)
    for a, c in zip(model.state_dict().values(), ref_model.state_dict().values()):
        torch.testing.assert_close(a, c)
    # finish the window: epoch 1, then epoch 2 computes the weights from epoch 0's and epoch 1's means
    _epoch(method, model, opt, ctx, 1, [_batch(spec, 24, seed=5)])
    h0, h1 = method.hist[0].clone(), method.hist[1].clone()
    ctx.epoch = 2
    method.on_epoch_start(model, ctx)
    mean = lambda h: torch.stack([h[:, 0] / h[:, 1], h[:, 2] / h[:, 3]], 1)  # noqa: E731
    torch.testing.assert_close(method.weights, blend_weights(mean(h0), mean(h1)).float())
    assert method.shadows is not None and len(method.hist) == 1  # online: the next window estimates again


def test_offline_and_sequential_schedules():
    spec = tiny_spec(2)
    off = GBlend(GBlendParams(super_epoch=2, online=False), spec)
    assert [off.estimating(e) for e in range(6)] == [True, True, False, False, False, False]
    seq = GBlend(GBlendParams(super_epoch=2, schedule="sequential"), spec)
    assert [seq.main_trains(e) for e in range(6)] == [False, False, True, True, False, False]
    method, model, opt, ctx = _build(spec, GBlendParams(super_epoch=2, schedule="sequential", v_rate=0.3))
    before = copy.deepcopy(model.state_dict())
    _epoch(method, model, opt, ctx, 0, [_batch(spec, 24)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # estimation window: frozen
    with pytest.raises(ValueError, match="super_epoch"):
        GBlend(GBlendParams(super_epoch=1), spec)
    with pytest.raises(ValueError, match="estimate"):
        GBlend(GBlendParams(estimate="x"), spec)


# (d) checkpoint: resuming mid-window gives the uninterrupted run ------------------------------------------------
def test_resume_mid_window_is_identical():
    spec = tiny_spec(2)
    p = GBlendParams(super_epoch=2, v_rate=0.3)
    data = [[_batch(spec, 24, seed=10 + e)] for e in range(3)]
    method, model, opt, ctx = _build(spec, p)
    for e in range(3):
        _epoch(method, model, opt, ctx, e, data[e])
    full, w_full = copy.deepcopy(model.state_dict()), method.weights.clone()

    method, model, opt, ctx = _build(spec, p)
    _epoch(method, model, opt, ctx, 0, data[0])
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "s": method.state_dict()}, buf)
    buf.seek(0)
    st = torch.load(buf, weights_only=False)
    method2 = GBlend(p, spec)
    torch.manual_seed(99)
    model2 = build_model(method2, spec, tiny_model_cfg())
    opt2 = build_optimizer(model2.parameters(), TrainerConfig(lr=0.05))
    model2.load_state_dict(st["m"])
    opt2.load_state_dict(st["o"])
    method2.load_state_dict(st["s"])
    ctx2 = Context(spec=spec, device=torch.device("cpu"), epochs=10, optimizer=opt2, step=ctx.step)
    method2.setup(model2, ctx2)
    for e in (1, 2):
        _epoch(method2, model2, opt2, ctx2, e, data[e])
    torch.testing.assert_close(method2.weights, w_full, rtol=0, atol=0)
    for k, v in full.items():
        assert torch.equal(v, model2.state_dict()[k]), k


# (e) k = 3 and regression: k + 1 weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [tiny_spec(3), tiny_spec(2, task="regression")], ids=["3mod", "regression"])
def test_k3_and_regression(spec):
    method, model, opt, ctx = _build(spec, GBlendParams(super_epoch=2, v_rate=0.3))
    for e in range(3):
        _epoch(method, model, opt, ctx, e, [_batch(spec, 24, seed=e)])
    assert method.weights.shape == (len(spec.modality_names) + 1,)
    assert bool(torch.isfinite(method.weights).all()) and float(method.weights.sum()) == pytest.approx(1.0)
    assert set(ctx.log) == {f"w_{m}" for m in (*spec.modality_names, "fused")}
