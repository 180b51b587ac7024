"""InfoReg invariants: scores, gaps and beta by hand, the window rule, the proximal gradient on the dominant encoder
only, the FIM-trace accumulation, checkpoint state, k = 3 and refusals."""
from __future__ import annotations

import io
import math

import pytest
import torch

from baselines.inforeg import (InfoReg, InfoRegParams, info_scores, regulation_coefficients, score_gaps,
                               window_kappa)
from g2d.methods.base import Context
from g2d.methods.joint import Joint
from g2d.models.model import MultimodalModel
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _ctx(spec, epoch=0):
    return Context(spec=spec, device=torch.device("cpu"), epochs=10, epoch=epoch)


def _hand_s(z, y):
    """sum_i exp(z_iy) / sum_k exp(z_ik), sample by sample."""
    return sum(math.exp(float(z[i, int(y[i])])) / sum(math.exp(float(v)) for v in z[i]) for i in range(z.shape[0]))


def test_scores_gaps_and_beta_by_hand():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 2, 1, 1, 3, 0, 2])
    for k in (2, 3):
        logits = [torch.randn(7, 4, generator=g) * 2 for _ in range(k)]
        s = info_scores(logits, y)
        hand = [_hand_s(z, y) for z in logits]
        torch.testing.assert_close(s, torch.tensor(hand), rtol=1e-5, atol=1e-5)
        gamma = torch.tensor([0.95, 0.1, 0.5][:k])
        for multi in ("mean", "max"):
            gap = score_gaps(s, multi)
            for i in range(k):
                others = [hand[j] for j in range(k) if j != i]
                ref = hand[i] - (sum(others) / len(others) if multi == "mean" else max(others))
                assert float(gap[i]) == pytest.approx(ref, abs=1e-5)
            beta = regulation_coefficients(gap, gamma, True)
            for i in range(k):
                ref = float(gamma[i]) * math.exp(math.tanh(float(gap[i]))) if float(gap[i]) > 0 else 0.0
                assert float(beta[i]) == pytest.approx(ref, rel=1e-6)
            assert regulation_coefficients(gap, gamma, False).abs().sum() == 0  # window closed
    # k = 2: exactly the official branch: the modality with the larger s gets gamma exp(tanh(s_a - s_v))
    s = torch.tensor([3.0, 1.5])
    beta = regulation_coefficients(score_gaps(s), torch.tensor([0.95, 0.1]), True)
    assert beta.tolist() == pytest.approx([0.95 * math.exp(math.tanh(1.5)), 0.0])
    beta = regulation_coefficients(score_gaps(s.flip(0)), torch.tensor([0.95, 0.1]), True)
    assert beta.tolist() == pytest.approx([0.0, 0.1 * math.exp(math.tanh(1.5))])


def test_window_kappa_by_hand():
    g = torch.Generator().manual_seed(1)
    trace = (torch.rand(25, generator=g) * 5).tolist()
    assert window_kappa([], 10) == 1.0  # epoch 0: k = 1 (official l.237-238)
    for e in range(1, 26):
        for w in (1, 3, 10):
            t = lambda j: trace[j] if j >= 0 else 0.0  # noqa: E731  (ten-zero padding, official l.694)
            ref = (t(e - 1) - t(e - w - 1)) / sum(t(j) for j in range(e - w, e))
            assert window_kappa(trace[:e], w) == pytest.approx(ref, rel=1e-9)
    assert window_kappa([0.0, 0.0], 10) == 0.0  # zero denominator: closed
    assert window_kappa([2.0], 10) == pytest.approx(1.0)  # epoch 1: (T0 - 0) / T0


def _setup(spec, params, seed=0, fusion="late"):
    torch.manual_seed(seed)
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    method = InfoReg(params, spec)
    ctx = _ctx(spec, 0)
    method.setup(model, ctx)
    method.on_epoch_start(model, ctx)  # anchor = parameters now
    with torch.no_grad():  # drift the encoders away from the anchor so theta - theta^(e) != 0
        g = torch.Generator().manual_seed(seed + 7)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, method, ctx


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fusion", ["late", "concat"])
def test_proximal_term_only_on_dominant_encoder(fusion):
    spec = tiny_spec(2)
    params = InfoRegParams(gamma=0.7, gamma_per_modality={"visual": 0.2})
    model, method, ctx = _setup(spec, params, fusion=fusion)
    anchor = {m: [a.clone() for a in method.anchor[m]] for m in spec.modality_names}
    batch = make_batch(spec, 8, seed=3)
    out = model(batch)
    terms = method.loss(batch, out, ctx)
    assert set(terms) == {"task", "uni"}
    sum(terms.values()).backward()
    plain = _grads(model)
    # hand reference: s from the per-modality logits, the larger one regulated with gamma_m exp(tanh(gap))
    y = batch["label"]
    s = {m: _hand_s(out.logits[m].detach(), y) for m in spec.modality_names}
    dom = max(s, key=s.get)
    weak = min(s, key=s.get)
    gam = {"audio": 0.7, "visual": 0.2}[dom]
    beta = gam * math.exp(math.tanh(s[dom] - s[weak]))
    method.after_backward(model, ctx)
    reg = _grads(model)
    assert set(reg) == set(plain)
    for n in plain:
        if n.startswith(f"encoders.{dom}."):
            continue
        assert torch.equal(reg[n], plain[n]), f"{n} changed (only encoders.{dom} may)"
    for (n, p), a in zip(model.encoders[dom].named_parameters(), anchor[dom]):
        ref = plain[f"encoders.{dom}.{n}"] + beta * (p.detach() - a)
        torch.testing.assert_close(reg[f"encoders.{dom}.{n}"], ref, rtol=1e-5, atol=1e-7)
        if not torch.equal(p.detach(), a):
            assert not torch.equal(reg[f"encoders.{dom}.{n}"], plain[f"encoders.{dom}.{n}"])
    assert ctx.log[f"beta_{dom}"][0] == pytest.approx(beta, rel=1e-5)
    assert float(ctx.log[f"beta_{weak}"][0]) == 0.0


def test_uni_weight_zero_non_dominant_grads_equal_joint():
    """uni_weight = 0: the loss is Joint-Train's CE(fused); all grads but the dominant encoder's are Joint's."""
    spec = tiny_spec(2)
    model, method, ctx = _setup(spec, InfoRegParams(uni_weight=0.0))
    batch = make_batch(spec, 8, seed=5)
    out = model(batch)
    sum(method.loss(batch, out, ctx).values()).backward()
    method.after_backward(model, ctx)
    reg = _grads(model)
    dom = [m for m in spec.modality_names if float(ctx.log[f"beta_{m}"][0]) > 0]
    assert len(dom) == 1
    model.zero_grad(set_to_none=True)
    joint = Joint(Joint.Params(), spec)
    sum(joint.loss(batch, model(batch), ctx).values()).backward()
    ref = _grads(model)
    for n in ref:
        same = torch.equal(reg[n], ref[n])
        assert same != n.startswith(f"encoders.{dom[0]}."), n


def test_window_closed_is_unregulated_bitwise():
    spec = tiny_spec(2)
    model, method, ctx = _setup(spec, InfoRegParams())
    method.history = {m: [1.0, 1.0, 1.0] for m in spec.modality_names}  # kappa = (1 - 0) / 3 > 0.05: open
    assert method.window_open()
    method.history = {m: [1.0] * 12 for m in spec.modality_names}  # kappa = (1 - 1) / 10 = 0: closed
    assert not method.window_open()
    batch = make_batch(spec, 8, seed=3)
    sum(method.loss(batch, model(batch), ctx).values()).backward()
    plain = _grads(model)
    method.after_backward(model, ctx)
    reg = _grads(model)
    assert all(torch.equal(plain[n], reg[n]) for n in plain)


def test_window_from_choices():
    spec = tiny_spec(3)
    h = {"audio": [1.0, 2.0], "visual": [3.0, 3.5], "text": [0.5, 0.25]}
    for wf, trace in (("first", h["audio"]), ("visual", h["visual"]), ("sum", [4.5, 5.75])):
        method = InfoReg(InfoRegParams(window_from=wf, window=10), spec)
        method.history = {m: list(v) for m, v in h.items()}
        assert method.kappa() == pytest.approx(window_kappa(trace, 10))


def test_fim_trace_accumulates_sum_of_layer_means():
    spec = tiny_spec(2)
    model, method, ctx = _setup(spec, InfoRegParams())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hand = {m: 0.0 for m in spec.modality_names}
    for step in range(3):
        batch = make_batch(spec, 6, seed=20 + step)
        opt.zero_grad(set_to_none=True)
        sum(method.loss(batch, model(batch), ctx).values()).backward()
        method.after_backward(model, ctx)
        for m in spec.modality_names:  # grads the optimizer steps with: sum over >= 2-D weights of mean(g^2)
            for p in model.encoders[m].parameters():
                if p.dim() >= 2:
                    hand[m] += sum(float(v) ** 2 for v in p.grad.flatten()) / p.grad.numel()
        opt.step()
    method.on_epoch_start(model, _ctx(spec, 1))
    for m in spec.modality_names:
        assert method.history[m] == [pytest.approx(hand[m], rel=1e-4)]
    assert method.anchor_epoch == 1
    assert all(torch.equal(a, p) for a, p in zip(method.anchor["audio"], model.encoders["audio"].parameters()))


def _train(method, model, opt, spec, epochs, ctx):
    for e in epochs:
        ctx.epoch = e
        method.on_epoch_start(model, ctx)
        for b in range(2):
            method.train_step(model, make_batch(spec, 6, seed=100 * e + b), opt, ctx)
            ctx.step += 1


def test_state_dict_round_trip_resume_identical():
    spec = tiny_spec(2)

    def fresh():
        torch.manual_seed(0)
        model = MultimodalModel(spec, tiny_model_cfg())
        method = InfoReg(InfoRegParams(window=2), spec)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ctx = _ctx(spec)
        method.setup(model, ctx)
        return model, method, opt, ctx

    model, method, opt, ctx = fresh()
    _train(method, model, opt, spec, range(4), ctx)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    hist = {m: list(v) for m, v in method.history.items()}

    model, method, opt, ctx = fresh()
    _train(method, model, opt, spec, range(2), ctx)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "method": method.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf)
    model, method, opt, ctx = fresh()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    method.load_state_dict(state["method"])
    ctx.step = 4
    _train(method, model, opt, spec, range(2, 4), ctx)
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())
    assert all(len(v) == 3 for v in hist.values())
    assert method.history == hist  # the restored running sum of epoch 1 became the same trace entry
    method.on_epoch_start(model, _ctx(spec, 4))
    model2, method2, *_ = fresh()
    del model2
    method2.load_state_dict(method.state_dict())
    assert method2.history == method.history and method2.acc_epoch == 4


def test_three_modalities_regulate_above_mean():
    spec = tiny_spec(3)
    model, method, ctx = _setup(spec, InfoRegParams(multi="mean"))
    batch = make_batch(spec, 8, seed=9)
    out = model(batch)
    sum(method.loss(batch, out, ctx).values()).backward()
    plain = _grads(model)
    method.after_backward(model, ctx)
    reg = _grads(model)
    y = batch["label"]
    s = {m: _hand_s(out.logits[m].detach(), y) for m in spec.modality_names}
    for m in spec.modality_names:
        above = s[m] > sum(v for n, v in s.items() if n != m) / 2
        touched = any(not torch.equal(reg[n], plain[n]) for n in plain if n.startswith(f"encoders.{m}."))
        assert touched == above, m
    assert not any(not torch.equal(reg[n], plain[n]) for n in plain if n.startswith("fusion."))


def test_refusals():
    with pytest.raises(ValueError, match="regression"):
        InfoReg(InfoRegParams(), tiny_spec(2, task="regression"))
    with pytest.raises(ValueError, match="window_from"):
        InfoReg(InfoRegParams(window_from="image"), tiny_spec(2))
    with pytest.raises(ValueError, match="multi"):
        InfoReg(InfoRegParams(multi="min"), tiny_spec(2))
    with pytest.raises(ValueError, match="two modalities"):
        InfoReg(InfoRegParams(), tiny_spec(1))
    # gamma_per_modality names absent from the dataset are ignored (one block serves every dataset)
    assert InfoReg(InfoRegParams(gamma_per_modality={"image": 3.0, "visual": 0.1}), tiny_spec(2)).gammas.tolist() \
        == pytest.approx([0.95, 0.1])
