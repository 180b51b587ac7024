"""MMPareto: closed-form min-norm, Pareto guarantee under conflict, no-conflict sum, step wiring."""
import copy

import pytest
import torch
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec

from baselines.mmpareto import MMPareto, MMParetoParams, integrate, min_norm_2
from g2d.methods.base import Context, task_loss
from g2d.models.model import MultimodalModel

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


@pytest.mark.parametrize("fusion,n", [("late", 2), ("concat", 2), ("late", 3)])
def test_train_step_sets_integrated_encoder_and_summed_head_grads(fusion, n):
    spec = tiny_spec(n)
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    ref = copy.deepcopy(model)
    batch = make_batch(spec, 8)
    method = MMPareto(MMParetoParams(gamma=1.5), spec)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: grads stay for inspection
    terms = method.train_step(model, batch, opt, ctx)

    out = ref(batch)  # independent computation with separate autograd passes per loss
    y = batch["label"]
    l_mm = task_loss(spec, out.fused, y)
    l_u = {m: task_loss(spec, out.logits[m], y) for m in spec.modality_names}
    assert torch.allclose(terms["loss"], l_mm + sum(l_u.values()))
    enc = ref.modality_parameters()
    enc_ids = {id(p) for ps in enc.values() for p in ps}
    heads = [p for p in ref.parameters() if id(p) not in enc_ids]
    named = dict(model.named_parameters())
    for m in spec.modality_names:
        g_mm, g_u = _grads(l_mm, enc[m]), _grads(l_u[m], enc[m])
        # guard against accumulating .grad across losses (BalanceBenchmark bug): they must differ
        assert any(not torch.allclose(x, z) for x, z in zip(g_mm, g_u))
        expect, cos, _, _ = integrate(g_mm, g_u, 1.5, "global")
        assert torch.allclose(ctx.log[f"cos_{m}"][0], cos, atol=1e-5)
        rnames = {id(p): k for k, p in ref.named_parameters()}
        for p, e in zip(enc[m], expect):
            assert torch.allclose(named[rnames[id(p)]].grad, e, rtol=1e-4, atol=1e-7)
    total = l_mm + sum(l_u.values())
    rnames = {id(p): k for k, p in ref.named_parameters()}
    for p, e in zip(heads, _grads(total, heads)):
        assert torch.allclose(named[rnames[id(p)]].grad, e, rtol=1e-5, atol=1e-7)
    assert set(ctx.log) == {f"{k}_{m}" for m in spec.modality_names for k in ("cos", "w_mm", "w_uni")}
