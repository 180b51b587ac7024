"""OGM / OGM-GE invariants (baselines-spec.md §2.7) on hand-computed coefficients and a tiny model."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.ogm_ge import OGM, OGMGE, OGMGEParams, OGMParams, ogm_coefficients, ogm_ratios
from g2d.methods.base import Context
from g2d.methods.joint import Joint
from g2d.models.model import MultimodalModel
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def test_coefficients_two_modalities_by_hand():
    s = torch.tensor([3.0, 1.5])
    rho = ogm_ratios(s)
    torch.testing.assert_close(rho, torch.tensor([2.0, 0.5]))
    k = ogm_coefficients(rho, 0.8)
    assert k[0].item() == pytest.approx(1 - math.tanh(0.8 * 2.0))  # official: tanh(alpha * rho)
    assert k[1].item() == 1.0
    k_shift = ogm_coefficients(rho, 0.8, "shifted")
    assert k_shift[0].item() == pytest.approx(1 - math.tanh(0.8 * 1.0))
    # swapping the modality order swaps k
    torch.testing.assert_close(ogm_coefficients(ogm_ratios(s.flip(0)), 0.8), k.flip(0))


def test_coefficients_range_and_dominance_random():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        s = torch.rand(2, generator=g) * 9.5 + 0.5  # rho <= 20: k > 0 in float32
        alpha = float(torch.rand(1, generator=g)) * 2
        k = ogm_coefficients(ogm_ratios(s), alpha)
        assert ((k > 0) & (k <= 1)).all()
        assert (k < 1).sum() == (1 if alpha > 0 else 0)
        if alpha > 0:
            assert k.argmin() == s.argmax()
    k = ogm_coefficients(ogm_ratios(torch.tensor([2.0, 2.0])), 0.8)
    assert k.tolist() == [1.0, 1.0]


def test_ratios_three_modalities_by_hand():
    s = torch.tensor([3.0, 2.0, 1.0])
    torch.testing.assert_close(ogm_ratios(s, "mean"), torch.tensor([3 / 1.5, 2 / 2, 1 / 2.5]))
    torch.testing.assert_close(ogm_ratios(s, "min"), torch.tensor([3.0, 2.0, 0.5]))
    torch.testing.assert_close(ogm_ratios(s, "pairwise"),
                               torch.tensor([(1.5 + 3) / 2, (2 / 3 + 2) / 2, (1 / 3 + 1 / 2) / 2]))
    two = torch.tensor([0.7, 2.1])
    for multi in ("mean", "min", "pairwise"):
        torch.testing.assert_close(ogm_ratios(two, multi), torch.tensor([1 / 3, 3.0]))
    with pytest.raises(ValueError, match="multi"):
        ogm_ratios(s, "max")


def _grads(method, spec, state, batch, epoch=0, fusion="late"):
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    model.load_state_dict(state)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=1, epoch=epoch)
    method.setup(model, ctx)
    out = model(batch)
    sum(method.loss(batch, out, ctx).values()).backward()
    method.after_backward(model, ctx)
    return model, out, ctx, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def setup2():
    spec = tiny_spec(2)
    torch.manual_seed(0)
    state = MultimodalModel(spec, tiny_model_cfg()).state_dict()
    return spec, state, make_batch(spec, 8, seed=1)


@pytest.mark.parametrize("scope,fusion", [("conv", "late"), ("all", "late"), ("conv", "concat")])
def test_ogm_scales_only_dominant_encoder(scope, fusion):
    spec = tiny_spec(2)
    torch.manual_seed(0)
    state = MultimodalModel(spec, tiny_model_cfg(fusion)).state_dict()
    batch = make_batch(spec, 8, seed=1)
    _, _, _, joint = _grads(Joint(None, spec), spec, state, batch, fusion=fusion)
    ogm = OGM(OGMParams(alpha=0.5, scope=scope), spec)
    model, out, ctx, g = _grads(ogm, spec, state, batch, fusion=fusion)
    y = batch["label"]
    s = [F.softmax(out.logits[m].detach(), 1)[torch.arange(8), y].sum() for m in spec.modality_names]
    rho_a = (s[0] / s[1]).item()
    dom = 0 if rho_a > 1 else 1
    k_exp = 1 - math.tanh(0.5 * (rho_a if dom == 0 else 1 / rho_a))
    k = [ctx.log[f"k_{m}"][0] for m in spec.modality_names]
    assert not k[0].requires_grad
    assert k[dom].item() == pytest.approx(k_exp, rel=1e-5) and k[1 - dom].item() == 1.0
    scaled = 0
    for name, p in model.named_parameters():
        m = name.split(".")[1] if name.startswith("encoders.") else None
        selected = m is not None and (scope == "all" or p.dim() >= 3)
        if selected:
            i = spec.modality_names.index(m)
            assert torch.equal(g[name], joint[name] * k[i]), name
            scaled += i == dom
        else:  # head, BN, biases: bitwise the Joint-Train gradient
            assert torch.equal(g[name], joint[name]), name
    assert scaled > 0
    assert any(not torch.equal(g[n], joint[n]) for n in g)  # the dominant modality really was scaled


def _step_params(method, spec, state, batch, epoch):
    model = MultimodalModel(spec, tiny_model_cfg())
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=10, epoch=epoch)
    method.setup(model, ctx)
    rng = torch.get_rng_state()
    method.train_step(model, batch, opt, ctx)
    drew = not torch.equal(rng, torch.get_rng_state())
    return {n: p.detach().clone() for n, p in model.named_parameters()}, ctx, drew


@pytest.mark.parametrize("cls,params", [(OGM, OGMParams), (OGMGE, OGMGEParams)])
def test_outside_window_is_joint_train_bitwise(setup2, cls, params):
    spec, state, batch = setup2
    ref, _, _ = _step_params(Joint(None, spec), spec, state, batch, epoch=5)
    for epoch, inside in ((5, False), (0, False), (2, True)):
        method = cls(params(alpha=0.8, start_epoch=1, end_epoch=3), spec)
        got, ctx, drew = _step_params(method, spec, state, batch, epoch)
        same = all(torch.equal(ref[n], got[n]) for n in ref)
        assert same != inside, (epoch, inside)
        if not inside:
            assert all(v.item() == 1.0 for m in spec.modality_names for v in ctx.log[f"k_{m}"])
            assert not drew  # GE drew no noise outside the window
        else:
            assert drew == (cls is OGMGE)


def test_ge_noise_std_matches_unmodulated_gradient(setup2):
    spec, state, _ = setup2
    model = MultimodalModel(spec, tiny_model_cfg())
    model.load_state_dict(state)
    method = OGMGE(OGMGEParams(alpha=0.8), spec)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=1)
    method.setup(model, ctx)
    tensors = {m: max(method._groups[m], key=lambda p: p.numel()) for m in spec.modality_names}
    g = torch.Generator().manual_seed(3)
    base = {m: torch.randn(p.shape, generator=g) * (0.5 if m == "audio" else 2.0) for m, p in tensors.items()}
    k_exp = {"audio": 1 - math.tanh(0.8 * 3.0), "visual": 1.0}  # s = (3, 1): audio dominant
    noise = {m: [] for m in tensors}
    torch.manual_seed(0)
    for _ in range(300):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for m, p in tensors.items():
            p.grad = base[m].clone()
        method._scores = torch.tensor([3.0, 1.0])
        method.after_backward(model, ctx)
        for m, p in tensors.items():
            noise[m].append(p.grad - k_exp[m] * base[m])
    for m in tensors:
        eps = torch.stack(noise[m])
        n = eps.numel()
        assert n > 10_000
        assert abs(eps.mean().item()) < 5 * base[m].std().item() / math.sqrt(n)
        assert eps.std().item() == pytest.approx(base[m].std().item(), rel=0.03), m  # not k * std
    assert ctx.log["k_audio"][0].item() == pytest.approx(k_exp["audio"], rel=1e-5)


def test_scope_without_conv_layers_is_a_clear_error():
    from g2d.data.base import DatasetSpec, ModalitySpec

    spec = DatasetSpec("vec", (ModalitySpec("a", "vector", (4,)), ModalitySpec("b", "vector", (3,))),
                       "classification", ("x", "y"))
    model = MultimodalModel(spec, tiny_model_cfg())
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=1)
    with pytest.raises(ValueError, match="scope: weights"):
        OGM(OGMParams(), spec).setup(model, ctx)
    OGM(OGMParams(scope="weights"), spec).setup(model, ctx)
    with pytest.raises(ValueError, match="classification"):
        OGM(OGMParams(), tiny_spec(2, task="regression"))


def test_ge_noise_on_an_exactly_zero_gradient_has_std_1e8(setup2):
    """Official `normal_(0, grad.std() + 1e-8)` (OGM-GE main.py @343dc1d): a zero gradient still gets noise."""
    spec, state, _ = setup2
    model = MultimodalModel(spec, tiny_model_cfg())
    model.load_state_dict(state)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=1)
    for cls, params in ((OGMGE, OGMGEParams(alpha=0.8)), (OGM, OGMParams(alpha=0.8))):
        method = cls(params, spec)
        method.setup(model, ctx)
        torch.manual_seed(0)
        eps = {m: [] for m in spec.modality_names}
        for _ in range(20):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            method._scores = torch.tensor([3.0, 1.0])
            method.after_backward(model, ctx)
            for m in spec.modality_names:
                eps[m].append(torch.cat([p.grad.flatten() for p in method._groups[m]]))
        for m in spec.modality_names:
            e = torch.cat(eps[m])
            if cls is OGM:  # no GE: the zero gradient stays zero
                assert torch.count_nonzero(e) == 0
                continue
            assert e.numel() > 5_000 and torch.count_nonzero(e) == e.numel(), m
            assert e.std().item() == pytest.approx(1e-8, rel=0.05), m
            assert abs(e.mean().item()) < 5 * 1e-8 / math.sqrt(e.numel())
        # parameters outside the selected tensors (head, BN, biases) keep their zero gradient
        selected = {id(p) for ps in method._groups.values() for p in ps}
        assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters() if id(p) not in selected)
