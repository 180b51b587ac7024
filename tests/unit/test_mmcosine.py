"""MMCosine invariants (baselines/mmcosine.py): cosine logits, CE on their sum, what trains, predict, k = 3."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.mmcosine import MMCosine, MMCosineParams, cosine_logits
from g2d.methods.base import Context
from g2d.models.model import MultimodalModel
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _hand_cos(f: torch.Tensor, w: torch.Tensor, s: float) -> torch.Tensor:
    """s * <f_b, w_j> / (|f_b| |w_j|), one entry at a time (float64)."""
    f, w = f.double(), w.double()
    out = torch.empty(f.shape[0], w.shape[0], dtype=torch.float64)
    for b in range(f.shape[0]):
        for j in range(w.shape[0]):
            dot = sum(float(x) * float(y) for x, y in zip(f[b], w[j]))
            nf = math.sqrt(sum(float(x) ** 2 for x in f[b]))
            nw = math.sqrt(sum(float(y) ** 2 for y in w[j]))
            out[b, j] = s * dot / (nf * nw)
    return out


def _setup(n_mod=2, params=None, seed=0, fusion="late"):
    spec = tiny_spec(n_mod)
    torch.manual_seed(seed)
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    method = MMCosine(params or MMCosineParams(), spec)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=1, optimizer=opt)
    method.setup(model, ctx)
    return spec, model, opt, method, ctx


def _hand_fused(model, feats, mods, s):
    return sum(_hand_cos(feats[m].detach(), model.fusion.heads[m].weight.detach(), s) for m in mods)


@pytest.mark.parametrize("s", [10.0, 3.5])
def test_cosine_logits_match_hand_computation(s):  # (a)
    g = torch.Generator().manual_seed(0)
    f, w = torch.randn(5, 7, generator=g) * 4, torch.randn(3, 7, generator=g) * 0.2
    torch.testing.assert_close(cosine_logits(f, w, s).double(), _hand_cos(f, w, s), atol=1e-5, rtol=1e-5)
    spec, model, _, method, _ = _setup(params=MMCosineParams(scale=s))
    out = model(make_batch(spec, 6))
    want = {m: _hand_cos(out.features[m].detach(), model.fusion.heads[m].weight.detach(), s)
            for m in spec.modality_names}
    for m, z in method.unimodal_logits(out.features).items():
        torch.testing.assert_close(z.detach().double(), want[m], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.logits[m].detach().double(), want[m], atol=1e-5, rtol=1e-5)  # hooked head
    torch.testing.assert_close(method.fused_logits(out.features).detach().double(), sum(want.values()),
                               atol=1e-5, rtol=1e-5)
    assert (sum(want.values()).abs() <= 2 * s + 1e-9).all()  # |z_j| <= k s


def test_loss_is_cross_entropy_of_summed_cosine_logits():  # (b)
    spec, model, _, method, ctx = _setup()
    batch = make_batch(spec, 6, seed=1)
    out = model(batch)
    z = _hand_fused(model, out.features, spec.modality_names, method.params.scale)
    y = batch["label"].tolist()
    want = -sum(float(z[i, y[i]]) - math.log(sum(math.exp(float(v)) for v in z[i])) for i in range(len(y))) / len(y)
    terms = method.loss(batch, out, ctx)
    assert set(terms) == {"task"}
    assert float(terms["task"].detach()) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert set(ctx.log) == {"cos_audio", "cos_visual"}


def test_gradients_train_encoders_and_head_weights_not_biases():  # (c)
    spec, model, opt, method, ctx = _setup()
    batch = make_batch(spec, 6, seed=2)
    heads = model.fusion.heads
    # the head-weight gradient is the one of the hand formula (a fresh forward: BN in eval, no running-stat drift)
    model.eval()
    out = model(batch)
    ws = [heads[m].weight for m in spec.modality_names]
    s, f = method.params.scale, out.features
    z = sum(s * (f[m] / f[m].norm(dim=1, keepdim=True)) @ (heads[m].weight / heads[m].weight.norm(dim=1, keepdim=True)).T
            for m in spec.modality_names)
    want = torch.autograd.grad(F.cross_entropy(z, batch["label"]), ws)
    got = torch.autograd.grad(method.loss(batch, model(batch), ctx)["task"], ws)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    model.train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    method.train_step(model, batch, opt, ctx)
    after = dict(model.named_parameters())
    for m in spec.modality_names:
        assert not torch.equal(before[f"fusion.heads.{m}.weight"], after[f"fusion.heads.{m}.weight"]), m
        assert torch.equal(before[f"fusion.heads.{m}.bias"], after[f"fusion.heads.{m}.bias"]), m  # unused: no grad
        assert heads[m].bias.grad is None
        assert any(not torch.equal(before[k], v) for k, v in after.items() if k.startswith(f"encoders.{m}.")), m


def test_logits_are_scale_invariant():  # (c)
    spec, model, _, method, _ = _setup()
    out = model(make_batch(spec, 6, seed=3))
    feats = {m: f.detach() for m, f in out.features.items()}
    z = method.fused_logits(feats)
    torch.testing.assert_close(method.fused_logits({m: 3 * f for m, f in feats.items()}), z)
    one = dict(feats, audio=feats["audio"].clone())
    one["audio"][2] *= 3  # one sample's feature only
    torch.testing.assert_close(method.fused_logits(one), z)
    g = torch.Generator().manual_seed(4)
    f, w = torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g)
    w3 = w.clone()
    w3[1] *= 3  # one class row of the head weight
    torch.testing.assert_close(cosine_logits(f, w3, 10.0), cosine_logits(f, w, 10.0))


def test_predict_matches_training_rule_in_eval():  # (d)
    spec, model, opt, method, ctx = _setup()
    method.train_step(model, make_batch(spec, 6, seed=5), opt, ctx)
    model.eval()
    batch = make_batch(spec, 5, seed=6)
    with torch.no_grad():
        out = model(batch)
        pred = method.predict(out)
        loss = method.loss(batch, out, ctx)["task"]
    hand = _hand_fused(model, out.features, spec.modality_names, method.params.scale)
    torch.testing.assert_close(pred.double(), hand, atol=1e-5, rtol=1e-5)
    assert float(F.cross_entropy(pred, batch["label"])) == pytest.approx(float(loss), rel=1e-6)
    torch.testing.assert_close(sum(out.logits[m] for m in spec.modality_names), pred)  # per-modality metrics agree
    method.setup(model, ctx)  # a second setup (resume) leaves one hook per head
    assert all(len(model.fusion.heads[m]._forward_hooks) == 1 for m in spec.modality_names)
    lin = MMCosine(MMCosineParams(fused_eval="linear"), spec)
    lin.heads = model.fusion.heads
    raw = sum(F.linear(out.features[m], model.fusion.heads[m].weight, model.fusion.heads[m].bias)
              for m in spec.modality_names)
    torch.testing.assert_close(lin.predict(out), raw)
    with pytest.raises(RuntimeError, match="setup"):
        MMCosine(MMCosineParams(), spec).predict(out)


def test_three_modalities():  # (e)
    spec, model, opt, method, ctx = _setup(n_mod=3)
    assert spec.modality_names == ("audio", "visual", "text")
    batch = make_batch(spec, 6, seed=7)
    out = model(batch)
    hand = _hand_fused(model, out.features, spec.modality_names, method.params.scale)
    torch.testing.assert_close(method.fused_logits(out.features).detach().double(), hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(method.predict(out).detach().double(), hand, atol=1e-5, rtol=1e-5)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    terms = method.train_step(model, batch, opt, ctx)
    assert torch.isfinite(terms["loss"])
    for m in spec.modality_names:
        assert not torch.equal(before[f"fusion.heads.{m}.weight"], model.fusion.heads[m].weight), m
        assert any(not torch.equal(before[k], v) for k, v in model.named_parameters()
                   if k.startswith(f"encoders.{m}.")), m
    assert set(ctx.log) == {"cos_audio", "cos_visual", "cos_text"}


def test_config_refusals():
    for fusion in ("late", "sum"):
        MMCosine.check_config(None, tiny_model_cfg(fusion))
    for fusion in ("concat", "film", "gated"):
        with pytest.raises(ValueError, match=r"mmcosine needs one linear head per modality: set model.fusion to one "
                           r"of \('late', 'sum'\), got '"):
            MMCosine.check_config(None, tiny_model_cfg(fusion))
    spec = tiny_spec(2)
    with pytest.raises(ValueError, match="set model.fusion=late"):
        MMCosine(MMCosineParams(), spec).setup(MultimodalModel(spec, tiny_model_cfg("concat")), None)
    with pytest.raises(ValueError, match="regression"):
        MMCosine(MMCosineParams(), tiny_spec(2, task="regression"))
    with pytest.raises(ValueError, match="scale"):
        MMCosine(MMCosineParams(scale=0.0), spec)
    with pytest.raises(ValueError, match="fused_eval"):
        MMCosine(MMCosineParams(fused_eval="mean"), spec)
    _, model, _, method, _ = _setup(fusion="sum")  # sum fusion: the model's own fused output is z itself
    out = model(make_batch(tiny_spec(2), 4))
    torch.testing.assert_close(out.fused, method.predict(out))
