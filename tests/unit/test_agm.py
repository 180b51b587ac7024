"""AGM invariants (baselines-spec.md §3.7): Shapley shares, coefficients, running mean, gradients."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import baselines.agm as agm_mod
from baselines.agm import AGM, AGMParams, agm_coefficients, shapley_weights
from g2d.config import ModelConfig
from g2d.data.base import DatasetSpec, ModalitySpec
from g2d.methods.base import Context
from g2d.methods.joint import Joint
from g2d.models.model import MultimodalModel
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _ctx(spec, epoch=0):
    return Context(spec=spec, device=torch.device("cpu"), epochs=30, epoch=epoch)


@pytest.mark.parametrize("n", [2, 3])
def test_shares_are_shapley_plus_empty_share_and_sum_to_full(n):
    g = torch.Generator().manual_seed(n)
    f = {frozenset(S): torch.randn(4, 3, generator=g)
         for r in range(n + 1) for S in itertools.combinations(range(n), r)}
    coef = shapley_weights(n)
    o = [sum(coef[(S, m)] * f[S] for S in f if S) for m in range(n)]
    full = f[frozenset(range(n))]
    torch.testing.assert_close(sum(o), full)
    for m in range(n):  # Shapley value by its permutation definition, + f(empty)/M (AGM official share)
        phi = sum(f[frozenset(p[:p.index(m) + 1])] - f[frozenset(p[:p.index(m)])]
                  for p in itertools.permutations(range(n))) / math.factorial(n)
        torch.testing.assert_close(o[m], phi + f[frozenset()] / n)
    if n == 2:  # official CREMA-D form: o_a = 1/2 [f(a,v) - f(0,v) + f(a,0)]
        torch.testing.assert_close(o[0], 0.5 * (full - f[frozenset({1})] + f[frozenset({0})]))


def test_coefficients_by_hand():
    s, run = torch.tensor([0.9, 1.5, 1.2]), torch.tensor([1.0, 1.1, 1.6])
    r, rhat, c = agm_coefficients(s, run, alpha=0.7, cap=10.0)
    for m in range(3):
        r_m = math.exp(1.5 * (s.mean().item() - s[m].item()))
        rh_m = math.exp(1.5 * (run.mean().item() - run[m].item()))
        assert r[m].item() == pytest.approx(r_m, rel=1e-6)
        assert rhat[m].item() == pytest.approx(rh_m, rel=1e-6)
        assert c[m].item() == pytest.approx(math.exp(0.7 * min(rh_m - r_m, 10.0)), rel=1e-6)
        assert (c[m] < 1) == (r[m] > rhat[m])  # currently stronger than its history -> slowed down
    _, _, c = agm_coefficients(torch.tensor([5.0, 0.0]), torch.tensor([0.0, 5.0]), alpha=0.5, cap=3.0)
    assert c[0].item() == pytest.approx(math.exp(0.5 * 3.0)) and 0 < c[1].item() < 1e-20  # capped / tiny
    _, _, c = agm_coefficients(torch.tensor([0.8, 0.8]), torch.tensor([0.0, 0.0]), alpha=2.0, cap=10.0)
    assert c.tolist() == [1.0, 1.0]


def test_responses_sum_to_fused_padded_in_eval_mode_and_train_restored():
    spec = tiny_spec(3)
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg("concat")).train()
    method = AGM(AGMParams(), spec)
    method.setup(model, _ctx(spec))
    batch = make_batch(spec, 6)
    bn = model.encoders["audio"].stem[1]
    out = model(batch)
    stats = bn.running_mean.clone()
    o = method.responses(model, batch, out.fused)
    assert model.training
    assert torch.equal(bn.running_mean, stats)  # padded passes did not touch BN statistics
    torch.testing.assert_close(sum(o), out.fused, atol=1e-6, rtol=1e-5)
    assert all(x.requires_grad for x in o)  # padded passes keep their graphs
    model.eval()  # o_m rebuilt by hand from eval-mode zero-input passes and the train-mode full pass
    mods = spec.modality_names
    with torch.no_grad():
        f = {frozenset(S): model(batch, drop=tuple(mods[i] for i in range(3) if i not in S)).fused
             for r in (1, 2) for S in itertools.combinations(range(3), r)}
    model.train()
    f[frozenset(range(3))] = out.fused.detach()
    coef = shapley_weights(3)
    for m in range(3):
        torch.testing.assert_close(o[m].detach(), sum(coef[(S, m)] * v for S, v in f.items()))


def test_running_mean_and_coefficient_uses_previous_iterations():
    spec = tiny_spec(2)
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg())
    method = AGM(AGMParams(alpha=0.5, clip=0.0), spec)
    ctx = _ctx(spec)
    method.setup(model, ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(4):
        method.train_step(model, make_batch(spec, 6, seed=step), opt, ctx)
    s = torch.tensor([[v.item() for v in ctx.log[f"s_{m}"]] for m in spec.modality_names])  # (M, T)
    torch.testing.assert_close(method.running, s.mean(1))
    assert method.t == 4
    for t in range(4):
        prev = s[:, :t].mean(1) if t else torch.zeros(2)
        exp_rhat = torch.exp(2 * (prev.mean() - prev))
        got = torch.tensor([ctx.log[f"rhat_{m}"][t].item() for m in spec.modality_names])
        torch.testing.assert_close(got, exp_rhat)
        r = torch.tensor([ctx.log[f"r_{m}"][t].item() for m in spec.modality_names])
        c = torch.tensor([ctx.log[f"c_{m}"][t].item() for m in spec.modality_names])
        torch.testing.assert_close(c, torch.exp(0.5 * torch.clamp(exp_rhat - r, max=10.0)))
    assert ctx.log["rhat_audio"][0].item() == 1.0  # S starts at 0


def _grads(method, model, batch, spec, epoch=0):
    model.zero_grad(set_to_none=True)
    ctx = _ctx(spec, epoch)
    method.setup(model, ctx)
    out = model(batch)
    sum(method.loss(batch, out, ctx).values()).backward()
    method.after_backward(model, ctx)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, ctx


def test_equal_contributions_leave_gradients_unchanged():
    """Two identical modalities with identical inputs: s_a == s_b, so c = 1 and AGM == Joint-Train."""
    m = ModalitySpec("a", "spectrogram", (1, 12, 10))
    spec = DatasetSpec("sym", (m, ModalitySpec("b", "spectrogram", (1, 12, 10))), "classification",
                       ("x", "y", "z"))
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg())
    model.encoders["b"].load_state_dict(model.encoders["a"].state_dict())
    model.fusion.heads["b"].load_state_dict(model.fusion.heads["a"].state_dict())
    batch = make_batch(spec, 6)
    batch["b"] = batch["a"].clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    joint, _ = _grads(Joint(None, spec), model, batch, spec)
    model.load_state_dict(state)
    agm, ctx = _grads(AGM(AGMParams(alpha=3.0, clip=0.0), spec), model, batch, spec)
    assert [ctx.log[f"c_{x}"][0].item() for x in "ab"] == [1.0, 1.0]
    for n in joint:
        torch.testing.assert_close(agm[n], joint[n], atol=1e-6, rtol=1e-5, msg=n)


def test_encoder_gradients_scale_by_c_in_linear_late_fusion(monkeypatch):
    """Bias-free encoders (h(0) = 0) + sum head: encoder-m gradient = c_m x the Joint-Train one."""
    spec = DatasetSpec("lin", (ModalitySpec("a", "vector", (5,)), ModalitySpec("b", "vector", (7,))),
                       "classification", ("x", "y", "z"))
    torch.manual_seed(0)
    model = MultimodalModel(spec, ModelConfig(fusion="sum", mlp_hidden=6, mlp_layers=1))
    for enc in model.encoders.values():
        torch.nn.init.zeros_(enc.net[0].bias)
    batch = make_batch(spec, 8)
    c = torch.tensor([2.0, 0.25])
    monkeypatch.setattr(agm_mod, "agm_coefficients", lambda s, run, alpha, cap: (s, run, c))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    joint, _ = _grads(Joint(None, spec), model, batch, spec)
    model.load_state_dict(state)
    agm, _ = _grads(AGM(AGMParams(clip=0.0), spec), model, batch, spec)
    for i, m in enumerate("ab"):
        for n in joint:
            if n.startswith(f"encoders.{m}."):
                torch.testing.assert_close(agm[n], c[i] * joint[n], atol=1e-6, rtol=1e-5, msg=n)
    assert not torch.allclose(agm["encoders.a.net.0.weight"], joint["encoders.a.net.0.weight"])
    _, ctx = _grads(AGM(AGMParams(clip=0.0, end_epoch=3), spec), model, batch, spec, epoch=4)
    assert ctx.log["c_a"][0].item() == 1.0  # outside the window: c = 1


def test_conditional_clip():
    spec = tiny_spec(2)
    model = MultimodalModel(spec, tiny_model_cfg())
    method = AGM(AGMParams(clip=1.0), spec)
    for big, clipped in ((0.5, False), (3.0, True)):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1)
        model.fusion.heads["audio"].weight.grad[0, 0] = big
        before = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        method.after_backward(model, _ctx(spec))
        after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert before.item() > 1.0
        assert after.item() == pytest.approx(1.0 if clipped else before.item(), rel=1e-5)


def test_rejects_regression_and_bad_pad_mode():
    with pytest.raises(ValueError, match="classification"):
        AGM(AGMParams(), tiny_spec(2, task="regression"))
    with pytest.raises(ValueError, match="pad_mode"):
        AGM(AGMParams(pad_mode="zero"), tiny_spec(2))
