"""MLA invariants (baselines-spec.md §4.7): projector, alternating updates, entropy fusion."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.mla import MLA, MLAParams, entropy_fusion, update_projector
from g2d.data.base import DatasetSpec
from g2d.methods.base import Context
from g2d.methods.unimodal import Unimodal, UnimodalParams
from g2d.models.model import MultimodalModel, Output
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _ctx(spec, opt=None):
    return Context(spec=spec, device=torch.device("cpu"), epochs=1, optimizer=opt)


def test_projector_formula_symmetry_and_orthogonality():
    g = torch.Generator().manual_seed(0)
    d, alpha = 16, 1e-3
    P = torch.eye(d, dtype=torch.float64)
    for _ in range(5):
        h = torch.randn(d, generator=g, dtype=torch.float64).abs()
        new = update_projector(P, h, alpha)
        # independent form for symmetric P: P - P h h^T P / (alpha + h^T P h)
        torch.testing.assert_close(new, P - torch.outer(P @ h, h @ P) / (alpha + h @ P @ h))
        torch.testing.assert_close(new, new.T)
        ev = torch.linalg.eigvalsh(new)
        assert ev.min() > -1e-9 and ev.max() < 1 + 1e-9
        grad = torch.randn(5, d, generator=g, dtype=torch.float64)
        proj = grad @ new.T
        assert (proj @ h).norm() / (proj.norm() * h.norm()) < 1e-3  # Delta W h_prev ~ 0
        assert (grad @ h).norm() / (grad.norm() * h.norm()) > 1e-2  # ...which the raw gradient is not
        P = new


def test_entropy_fusion_matches_formula_on_constructed_logits():
    g = torch.Generator().manual_seed(1)
    za, zv = torch.randn(7, 5, generator=g) * 3, torch.randn(7, 5, generator=g)
    za[2] = zv[2]  # equal entropies on sample 2
    spec = tiny_spec(2, n_classes=5)
    method = MLA(MLAParams(), spec)
    pred = method.predict(Output(features={}, logits={"audio": za, "visual": zv}, fused=torch.zeros(7, 5)))
    for i in range(7):
        ent = []
        for z in (za[i], zv[i]):
            p = [math.exp(v) for v in z.tolist()]
            p = [v / sum(p) for v in p]
            ent.append(-sum(v * math.log(v) for v in p))
        e_max = max(ent)
        w = [math.exp(e_max - e) for e in ent]
        w = [v / sum(w) for v in w]  # MLA: w_m = exp(max e - e_m) / sum exp(max e - e_m'')
        exp = w[0] * za[i] + w[1] * zv[i]
        torch.testing.assert_close(pred[i], exp, atol=1e-5, rtol=1e-5)
        if i == 2:
            assert w[0] == pytest.approx(0.5)
    _, w = entropy_fusion([za, zv])
    torch.testing.assert_close(w.sum(0), torch.ones(7))
    ent = torch.stack([-(F.softmax(z, 1) * F.log_softmax(z, 1)).sum(1) for z in (za, zv)])
    lower = ent[0] < ent[1] - 1e-4
    assert lower.any() and (~lower).any()
    assert ((w[0] > w[1]) == lower)[ent[0] != ent[1]].all()
    # per-sample: changing other samples leaves sample 0's prediction alone (the official dim=0 bug)
    za2 = za.clone()
    za2[1:] = torch.randn(6, 5, generator=g) * 10
    pred2 = method.predict(Output(features={}, logits={"audio": za2, "visual": zv}, fused=torch.zeros(7, 5)))
    torch.testing.assert_close(pred2[0], pred[0])
    fixed = MLA(MLAParams(test_fusion="fixed"), spec)
    fused = torch.randn(7, 5, generator=g)
    out = Output(features={}, logits={"audio": za, "visual": zv}, fused=fused)
    assert torch.equal(fixed.predict(out), fused)


def _setup(params, spec=None, opt_kw=None):
    spec = spec or tiny_spec(2)
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg())
    opt = torch.optim.SGD(model.parameters(), **(opt_kw or {"lr": 0.1}))
    method = MLA(params, spec)
    ctx = _ctx(spec, opt)
    method.setup(model, ctx)
    return spec, model, opt, method, ctx


def test_head_is_shared_and_logits_use_it():
    spec, model, _, method, _ = _setup(MLAParams(), tiny_spec(3))
    heads = model.fusion.heads
    assert heads["audio"] is heads["visual"] is heads["text"] is method.head
    out = model(make_batch(spec, 4))
    for m in spec.modality_names:
        torch.testing.assert_close(out.logits[m], method.head(out.features[m]))
    with pytest.raises(TypeError, match="model.fusion: late or sum"):
        MLA(MLAParams(), spec).setup(MultimodalModel(spec, tiny_model_cfg("concat")), _ctx(spec))


@pytest.mark.parametrize("projection", ["paper", "none"])
def test_head_gradient_orthogonal_to_previous_modality(projection):
    spec, model, opt, method, ctx = _setup(MLAParams(projection=projection, alpha=1e-4))
    seen = []
    head_w = method.head.weight
    opt.register_step_pre_hook(lambda o, a, k: seen.append(
        (head_w.grad.clone(), None if method.prev is None else method.prev.clone(),
         {m: [p.grad is not None for p in ps] for m, ps in model.modality_parameters().items()})))
    batch = make_batch(spec, 8)
    first = model.encoders["audio"](batch["audio"])  # the very first update is the plain CE gradient
    g0 = torch.autograd.grad(F.cross_entropy(method.head(first), batch["label"]), head_w)[0]
    for step in range(2):
        method.train_step(model, make_batch(spec, 8, seed=step), opt, ctx)
    assert len(seen) == 4  # one optimizer step per modality per train_step
    torch.testing.assert_close(seen[0][0], g0)
    for i, (grad, prev, has_grad) in enumerate(seen):
        active = spec.modality_names[i % 2]
        assert all(has_grad[active]) and not any(any(has_grad[m]) for m in has_grad if m != active)
        if i == 0:
            continue
        cos = ((grad @ prev).norm() / (grad.norm() * prev.norm())).item()
        assert (cos < 1e-3) if projection == "paper" else (cos > 1e-2), (i, cos)
    assert [len(ctx.log[f"w_{m}"]) for m in spec.modality_names] == [2, 2]


def test_other_encoders_untouched_under_momentum_and_weight_decay():
    spec, model, opt, method, ctx = _setup(MLAParams(), tiny_spec(3),
                                           {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1})
    snaps = []

    def enc():
        return {m: [p.detach().clone() for p in e.parameters()] for m, e in model.encoders.items()}

    opt.register_step_pre_hook(lambda o, a, k: snaps.append(enc()))
    opt.register_step_post_hook(lambda o, a, k: snaps.append(enc()))
    for step in range(2):  # the second step has momentum buffers for every encoder
        method.train_step(model, make_batch(spec, 6, seed=step), opt, ctx)
    assert len(snaps) == 12
    for i in range(6):
        active = spec.modality_names[i % 3]
        pre, post = snaps[2 * i], snaps[2 * i + 1]
        for m in spec.modality_names:
            same = all(torch.equal(a, b) for a, b in zip(pre[m], post[m]))
            assert same == (m != active), (i, m)


def test_single_modality_without_projection_is_unimodal_training():
    full = tiny_spec(2)
    spec = DatasetSpec("one", full.modalities[:1], "classification", full.classes)
    _, model, opt, method, ctx = _setup(MLAParams(projection="none"), spec)
    torch.manual_seed(0)
    ref = MultimodalModel(spec, tiny_model_cfg())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    uni = Unimodal(UnimodalParams(modality="audio"), spec)
    for step in range(2):
        batch = make_batch(spec, 6, seed=step)
        method.train_step(model, batch, opt, ctx)
        uni.train_step(ref, batch, ref_opt, _ctx(spec, ref_opt))
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_fixed_weights_set_the_fixed_fusion_and_only_it():
    """Official fixed fusion: out = 0.55 * out_a + 0.45 * out_v (MLA main.py @ab6c184); {} = equal weights."""
    spec = tiny_spec(2, n_classes=3)
    za = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.1, 0.0]])
    zv = torch.tensor([[0.0, 1.1, -1.0], [0.0, 0.3, 0.1]])
    out = Output(features={}, logits={"audio": za, "visual": zv}, fused=(za + zv) / 2)  # late fusion: the mean
    equal = MLA(MLAParams(test_fusion="fixed"), spec).predict(out)
    official = MLA(MLAParams(test_fusion="fixed", fixed_weights={"audio": 0.55, "visual": 0.45}), spec).predict(out)
    torch.testing.assert_close(official, 0.55 * za + 0.45 * zv)
    assert torch.equal(equal, out.fused)
    # the weight decides sample 0: audio's class 0 wins at 0.55, visual's class 1 at 0.5
    assert equal.argmax(1).tolist() == [1, 1] and official.argmax(1).tolist() == [0, 1]
    halves = MLA(MLAParams(test_fusion="fixed", fixed_weights={"audio": 0.5, "visual": 0.5}), spec).predict(out)
    torch.testing.assert_close(halves, out.fused)
    # entropy fusion does not read them
    dyn = MLA(MLAParams(fixed_weights={"audio": 0.55, "visual": 0.45}), spec).predict(out)
    torch.testing.assert_close(dyn, entropy_fusion([za, zv])[0])
    for bad in ({"audio": 1.0}, {"audio": 0.5, "visual": 0.3, "text": 0.2}, {"audio": -0.1, "visual": 1.1}):
        with pytest.raises(ValueError, match="fixed_weights"):
            MLA(MLAParams(test_fusion="fixed", fixed_weights=bad), spec)
    three = MLA(MLAParams(test_fusion="fixed", fixed_weights={"audio": 0.35, "visual": 0.25, "text": 0.4}),
                tiny_spec(3, n_classes=3))
    zt = torch.randn(2, 3)
    out3 = Output(features={}, logits={"audio": za, "visual": zv, "text": zt}, fused=torch.zeros(2, 3))
    torch.testing.assert_close(three.predict(out3), 0.35 * za + 0.25 * zv + 0.4 * zt)
