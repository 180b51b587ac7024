"""OPM / OPRM (baselines/opm.py): hand-computed drop probabilities and coefficients, what each touches, k = 3."""
from __future__ import annotations

import math

import pytest
import torch

from baselines.ogm_ge import ogm_ratios
from baselines.opm import OPM, OPRM, OPMParams, OPRMParams, drop_features, drop_probabilities
from g2d.methods.base import Context
from g2d.methods.joint import Joint
from g2d.models.model import MultimodalModel
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _hand_scores(logits: dict, y: torch.Tensor, mods) -> list[float]:
    """s_m = sum_i softmax(z_m,i)[y_i], written out with math.exp."""
    out = []
    for m in mods:
        z = logits[m].detach().double().tolist()
        s = 0.0
        for row, t in zip(z, y.tolist()):
            e = [math.exp(v - max(row)) for v in row]
            s += e[t] / sum(e)
        out.append(s)
    return out


def _hand_q(rho: float, q_base: float, lam: float) -> float:
    return min(1.0, max(0.0, q_base * (1 + lam * math.tanh(rho - 1)))) if rho > 1 else 0.0


def _model(spec, state=None, fusion="late"):
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    if state is not None:
        model.load_state_dict(state)
    return model


def _ctx(spec, epoch):
    return Context(spec=spec, device=torch.device("cpu"), epochs=100, epoch=epoch)


# (a) the defining computations against hand computation ------------------------------------------------------

def test_drop_probability_by_hand_random():
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        s = torch.rand(2, generator=g) * 5 + 0.1
        q_base, lam = float(torch.rand(1, generator=g)), float(torch.rand(1, generator=g)) * 2
        rho = ogm_ratios(s)
        q = drop_probabilities(rho, q_base, lam)
        r = [s[0].item() / s[1].item(), s[1].item() / s[0].item()]
        exp = [_hand_q(x, q_base, lam) for x in r]
        torch.testing.assert_close(q, torch.tensor(exp), rtol=1e-5, atol=1e-6)
        assert (q > 0).sum() <= 1 and q[s.argmin()] == 0  # only the dominant modality is ever dropped


@pytest.mark.parametrize("fusion", ["late", "concat"])
def test_opm_records_hand_computed_rho_and_q(fusion):
    spec = tiny_spec(2)
    torch.manual_seed(0)
    model = _model(spec, fusion=fusion).train()
    batch = make_batch(spec, 8, seed=1)
    p = OPMParams(q_base=0.4, lam=0.7, p_exe=1.0)
    ctx = _ctx(spec, epoch=6)
    OPM(p, spec).modulated_output(model, batch, ctx)
    s = _hand_scores(model(batch).logits, batch["label"], spec.modality_names)  # the undropped read-out
    rho = [s[0] / s[1], s[1] / s[0]]
    for i, m in enumerate(spec.modality_names):
        assert ctx.log[f"rho_{m}"][0].item() == pytest.approx(rho[i], rel=1e-5)
        assert ctx.log[f"q_{m}"][0].item() == pytest.approx(_hand_q(rho[i], 0.4, 0.7), rel=1e-5, abs=1e-7)


def test_drop_features_mask_and_global_rescale_by_hand():
    g = torch.Generator().manual_seed(2)
    feats = {"a": torch.randn(4000, 6, generator=g) + 3, "b": torch.randn(4000, 10, generator=g) + 3}
    q = torch.tensor([0.3, 0.0])
    torch.manual_seed(0)
    out, keep = drop_features(feats, q, "global")
    theta = (6 * 0.3 + 10 * 0.0) / 16  # sum_m d_m q_m / sum_m d_m
    scale = 1 / (1 - theta)
    assert keep[1].all()
    assert abs(keep[0].mean().item() - 0.7) < 0.03
    torch.testing.assert_close(out["a"], feats["a"] * keep[0][:, None] * scale)
    torch.testing.assert_close(out["b"], feats["b"] * scale)  # the code rescales every modality
    out, keep = drop_features(feats, q, "modality")
    torch.testing.assert_close(out["a"], feats["a"] * keep[0][:, None] / 0.7)
    assert torch.equal(out["b"], feats["b"])
    with pytest.raises(ValueError, match="rescale"):
        drop_features(feats, q, "half")


def _grads(method, spec, state, batch, epoch):
    model = _model(spec, state)
    ctx = _ctx(spec, epoch)
    method.setup(model, ctx)
    out = model(batch)
    sum(method.loss(batch, out, ctx).values()).backward()
    method.after_backward(model, ctx)
    return model, out, ctx, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def setup2():
    spec = tiny_spec(2)
    torch.manual_seed(0)
    return spec, _model(spec).state_dict(), make_batch(spec, 8, seed=1)


def test_oprm_coefficient_and_warmup_by_hand(setup2):
    spec, state, batch = setup2
    _, _, _, joint = _grads(Joint(None, spec), spec, state, batch, 0)
    p = OPRMParams(alpha=0.6, ge=False, start_epoch=0, end_epoch=80, warmup_epochs=6)
    for epoch, on in ((0, False), (5, False), (6, True), (80, True), (81, False)):
        _, out, ctx, g = _grads(OPRM(p, spec), spec, state, batch, epoch)
        s = _hand_scores(out.logits, batch["label"], spec.modality_names)
        rho = [s[0] / s[1], s[1] / s[0]]
        k_exp = [1 - math.tanh(0.6 * r) if (r > 1 and on) else 1.0 for r in rho]  # 1 - tanh(alpha * rho)
        k = [ctx.log[f"k_{m}"][0].item() for m in spec.modality_names]
        assert k == pytest.approx(k_exp, rel=1e-5), epoch
        assert all(torch.equal(g[n], joint[n]) for n in g) != on, epoch


# (b) OPRM touches exactly the dominant modality's encoder ------------------------------------------------------

@pytest.mark.parametrize("fusion", ["late", "concat"])
def test_oprm_scales_only_dominant_encoder(fusion):
    spec = tiny_spec(2)
    torch.manual_seed(0)
    state = _model(spec, fusion=fusion).state_dict()
    batch = make_batch(spec, 8, seed=1)

    def run(method):
        model = _model(spec, state, fusion)
        ctx = _ctx(spec, 10)
        method.setup(model, ctx)
        out = model(batch)
        sum(method.loss(batch, out, ctx).values()).backward()
        method.after_backward(model, ctx)
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}, dict(model.named_parameters())

    _, joint, _ = run(Joint(None, spec))
    out, g, params = run(OPRM(OPRMParams(alpha=0.8, ge=False, scope="all"), spec))
    s = _hand_scores(out.logits, batch["label"], spec.modality_names)
    dom = spec.modality_names[0 if s[0] > s[1] else 1]
    k = 1 - math.tanh(0.8 * max(s[0] / s[1], s[1] / s[0]))
    changed = set()
    for name in g:
        if name.startswith(f"encoders.{dom}."):
            torch.testing.assert_close(g[name], joint[name] * k, rtol=0, atol=0)
            if not torch.equal(g[name], joint[name]):
                changed.add(name)
        else:  # the other encoder and the fusion head: bitwise the Joint-Train gradient
            assert torch.equal(g[name], joint[name]), name
    assert changed and len(changed) == sum(1 for n in params if n.startswith(f"encoders.{dom}."))
    # GE on: noise on every modality's modulated tensors, still never on the head
    _, g_ge, _ = run(OPRM(OPRMParams(alpha=0.8, ge=True), spec))
    for name in g_ge:
        if not name.startswith("encoders."):
            assert torch.equal(g_ge[name], joint[name]), name


# (c) OPM drops only the dominant modality, only while training -------------------------------------------------

def test_opm_drops_only_dominant_features_in_training(setup2):
    spec, state, batch = setup2
    model = _model(spec, state).train()
    ref = {m: f.detach() for m, f in model.encode(batch).items()}
    s = _hand_scores(model(batch).logits, batch["label"], spec.modality_names)
    dom, other = (spec.modality_names if s[0] > s[1] else spec.modality_names[::-1])
    q = _hand_q(max(s[0] / s[1], s[1] / s[0]), 0.5, 0.5)
    method = OPM(OPMParams(p_exe=1.0, rescale="modality"), spec)
    dropped_any = False
    for seed in range(5):
        torch.manual_seed(seed)
        out = method.modulated_output(model, batch, _ctx(spec, 6))
        assert torch.equal(out.features[other].detach(), ref[other])  # the weaker modality untouched
        f = out.features[dom].detach()
        zero = (f == 0).all(1)
        dropped_any |= bool(zero.any())
        torch.testing.assert_close(f[~zero], ref[dom][~zero] / (1 - q))  # kept samples: inverted dropout
    assert dropped_any
    # the code's global rescale scales the weaker modality by the constant 1 / (1 - theta), never zeroes it
    torch.manual_seed(0)
    out = OPM(OPMParams(p_exe=1.0), spec).modulated_output(model, batch, _ctx(spec, 6))
    d = {m: ref[m].shape[1] for m in ref}
    theta = d[dom] * q / (d[dom] + d[other])
    torch.testing.assert_close(out.features[other].detach(), ref[other] / (1 - theta))


def test_opm_never_drops_in_eval_warmup_or_predict(setup2):
    spec, state, batch = setup2
    method = OPM(OPMParams(p_exe=1.0, q_base=1.0), spec)
    model = _model(spec, state)
    model.eval()
    with torch.no_grad():
        plain = model(batch)
        rng = torch.get_rng_state()
        out = method.modulated_output(model, batch, _ctx(spec, 10))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(out.features[m], plain.features[m]) for m in spec.modality_names)
    assert torch.equal(out.fused, plain.fused) and torch.equal(method.predict(plain), plain.fused)
    model.train()  # warm-up epoch (epoch 5 < 6): plain forward, nothing drawn
    plain = model(batch)
    rng = torch.get_rng_state()
    out = method.modulated_output(model, batch, _ctx(spec, 5))
    assert torch.equal(rng, torch.get_rng_state()) and torch.equal(out.fused, plain.fused)
    out = method.modulated_output(model, batch, _ctx(spec, 6))  # active: q_base 1 drops the dominant one
    assert not torch.equal(out.fused, plain.fused)


def test_opm_train_step_outside_window_is_joint_bitwise(setup2):
    spec, state, batch = setup2

    def step(method, epoch):
        model = _model(spec, state).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ctx = _ctx(spec, epoch)
        method.setup(model, ctx)
        torch.manual_seed(0)
        method.train_step(model, batch, opt, ctx)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    ref = step(Joint(None, spec), 0)
    p = OPMParams(p_exe=1.0, q_base=0.9, start_epoch=7, end_epoch=9)
    for epoch, on in ((6, False), (7, True), (9, True), (10, False)):
        got = step(OPM(p, spec), epoch)
        assert all(torch.equal(ref[n], got[n]) for n in ref) != on, epoch


# (d) k = 3 -----------------------------------------------------------------------------------------------------

def test_three_modalities_opm_and_oprm():
    spec = tiny_spec(3)
    mods = spec.modality_names
    torch.manual_seed(0)
    state = _model(spec).state_dict()
    batch = make_batch(spec, 8, seed=4)
    model = _model(spec, state).train()
    ref = {m: f.detach() for m, f in model.encode(batch).items()}
    s = _hand_scores(model(batch).logits, batch["label"], mods)
    rho = [s[i] / ((sum(s) - s[i]) / 2) for i in range(3)]  # multi=mean: s_m / mean of the others
    q = [_hand_q(r, 0.5, 0.5) for r in rho]
    assert min(q) == 0 and max(q) > 0
    ctx = _ctx(spec, 6)
    torch.manual_seed(1)
    out = OPM(OPMParams(p_exe=1.0, rescale="modality"), spec).modulated_output(model, batch, ctx)
    for i, m in enumerate(mods):
        assert ctx.log[f"q_{m}"][0].item() == pytest.approx(q[i], rel=1e-5, abs=1e-7)
        f = out.features[m].detach()
        if q[i] == 0:
            assert torch.equal(f, ref[m])
        else:  # each sample dropped (0) or kept and rescaled by 1 / (1 - q_m)
            zero = (f == 0).all(1)
            assert zero.any()
            torch.testing.assert_close(f[~zero], ref[m][~zero] / (1 - q[i]))
    # any modality position can be the dropped one: the third modality alone, by hand
    g = torch.Generator().manual_seed(5)
    feats = {m: torch.randn(2000, 4, generator=g) + 2 for m in mods}
    torch.manual_seed(2)
    dropped, keep = drop_features(feats, torch.tensor([0.0, 0.0, 0.6]), "global")
    scale = 1 / (1 - 4 * 0.6 / 12)
    assert keep[:2].all() and abs(keep[2].mean().item() - 0.4) < 0.04
    for i, m in enumerate(mods):
        torch.testing.assert_close(dropped[m], feats[m] * keep[i][:, None] * scale)
    # OPRM: every modality with rho > 1 scaled by its own k, the rest and the head bitwise Joint-Train
    _, _, _, joint = _grads(Joint(None, spec), spec, state, batch, 0)
    _, out, ctx, g = _grads(OPRM(OPRMParams(alpha=0.5, ge=False, scope="all"), spec), spec, state, batch, 10)
    s = _hand_scores(out.logits, batch["label"], mods)
    rho = [s[i] / ((sum(s) - s[i]) / 2) for i in range(3)]
    k = [1 - math.tanh(0.5 * r) if r > 1 else 1.0 for r in rho]
    assert sum(x < 1 for x in k) >= 1
    for name in g:
        mod = name.split(".")[1] if name.startswith("encoders.") else None
        if mod is None:
            assert torch.equal(g[name], joint[name]), name
        else:
            kk = k[mods.index(mod)]
            torch.testing.assert_close(g[name], joint[name] * kk, rtol=1e-6, atol=0)
            if kk == 1.0:
                assert torch.equal(g[name], joint[name]), name


def test_params_refused():
    spec = tiny_spec(2)
    with pytest.raises(ValueError, match="q_base"):
        OPM(OPMParams(q_base=1.5), spec)
    with pytest.raises(ValueError, match="rescale"):
        OPM(OPMParams(rescale="x"), spec)
    with pytest.raises(ValueError, match="multi"):
        OPM(OPMParams(multi="max"), spec)
    with pytest.raises(ValueError, match="regression"):
        OPM(OPMParams(), tiny_spec(2, task="regression"))


def test_epoch_log_reduces_as_the_trainer_does_when_some_steps_skip_the_drop():
    """The trainer stacks each key's per-step values at the epoch's end (g2d/train/trainer.py): with the p_exe gate
    some steps drop and some do not, and every key must still hold tensors only (a float among tensors crashed
    the first embedded-suite run)."""
    spec = tiny_spec(2)
    torch.manual_seed(0)
    model = _model(spec)
    method = OPM(OPMParams(p_exe=0.5, warmup_epochs=0), spec)
    ctx = _ctx(spec, epoch=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    method.setup(model, ctx)
    model.train()
    for i in range(30):
        method.train_step(model, make_batch(spec, 8, seed=i), opt, ctx)
    gate = [float(v) for v in ctx.log["opm_exec"]]
    assert 0 < sum(gate) < len(gate), gate  # both kinds of step happened
    for k, v in ctx.log.items():
        kinds = {torch.is_tensor(x) for x in v}
        assert len(kinds) == 1, f"{k}: floats and tensors mixed (the trainer's stack fails on whichever comes first)"
        red = float(torch.as_tensor(v).float().mean()) if not torch.is_tensor(v[0]) else float(torch.stack(v).mean())
        assert math.isfinite(red), k
