"""LFM invariants (baselines/lfm.py): fitted weights, the alignment divergence, the total loss, gradients, k = 3."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.lfm import LFM, LFMParams, alignment, lfm_alpha
from g2d.methods.base import Context
from g2d.models.model import MultimodalModel
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _setup(n_mod=2, params=None, fusion="late", epochs=4):
    spec = tiny_spec(n_mod)
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = LFM(params or LFMParams(), spec)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=epochs, optimizer=opt)
    return spec, model, opt, method, ctx


def _softmax(row):
    mx = max(row)
    e = [math.exp(v - mx) for v in row]
    return [v / sum(e) for v in e]


def _hand_div(zp, zq, kind):
    tot = 0.0
    for i in range(zp.shape[0]):
        p, q = _softmax(zp[i].tolist()), _softmax(zq[i].tolist())
        m = [(a + b) / 2 for a, b in zip(p, q)]
        if kind == "code":  # kl_div(p.log(), m): sum m log(m / p)
            tot += 0.5 * (sum(mc * math.log(mc / pc) for mc, pc in zip(m, p))
                          + sum(mc * math.log(mc / qc) for mc, qc in zip(m, q)))
        else:
            tot += 0.5 * (sum(pc * math.log(pc / mc) for mc, pc in zip(m, p))
                          + sum(qc * math.log(qc / mc) for mc, qc in zip(m, q)))
    return tot / zp.shape[0]


def test_fitted_alpha_values():
    # Crema_epoch.py@ad44fa0 l.49-52, evaluated by hand
    a = [2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11]
    for e in (0, 1, 37, 199):
        want = a[0] + a[1] * e + a[2] * e ** 2 + a[3] * e ** 3 + a[4] * e ** 4 + a[5] * e ** 5
        s, al = lfm_alpha(e)
        assert s == pytest.approx(want, rel=1e-12)
        assert s + al == pytest.approx(1.0, abs=1e-12)
    assert lfm_alpha(0) == pytest.approx((0.204623704, 0.795376296))
    assert lfm_alpha(5, "constant", 0.3) == pytest.approx((0.3, 0.7))
    _, _, _, m, ctx = _setup(params=LFMParams(horizon=200), epochs=20)
    ctx.epoch = 10
    assert m.alphas(ctx) == pytest.approx(lfm_alpha(100))


@pytest.mark.parametrize("kind", ["code", "js"])
def test_alignment_matches_hand_computation(kind):
    g = torch.Generator().manual_seed(1)
    zp, zq = torch.randn(7, 5, generator=g) * 2, torch.randn(7, 5, generator=g)
    assert float(alignment(zp, zq, kind)) == pytest.approx(_hand_div(zp, zq, kind), rel=1e-5, abs=1e-7)
    assert float(alignment(zp, zp, kind)) == pytest.approx(0.0, abs=1e-6)
    assert _hand_div(zp, zq, "code") != pytest.approx(_hand_div(zp, zq, "js"), rel=1e-3)  # they differ


def test_loss_terms_and_gradients():
    spec, model, _, method, ctx = _setup()
    ctx.epoch = 3
    batch = make_batch(spec, 8, seed=2)
    model.eval()
    out = model(batch)
    terms = method.loss(batch, out, ctx)
    s, al = lfm_alpha(3)
    za, zv = out.logits["audio"].detach(), out.logits["visual"].detach()
    zf = out.fused.detach()
    torch.testing.assert_close(zf, 0.5 * za + 0.5 * zv)  # the official fused output (late fusion)
    y = batch["label"].tolist()
    ce = -sum(math.log(_softmax(zf[i].tolist())[y[i]]) for i in range(len(y))) / len(y)
    assert float(terms["task"].detach()) == pytest.approx(2 * s * ce, rel=1e-5)
    assert float(terms["align"].detach()) == pytest.approx(2 * al * _hand_div(za, zv, "code"), rel=1e-5)
    # gradients: the hand formula on every parameter; the alignment term touches both heads and encoders
    params = list(model.parameters())
    got = torch.autograd.grad(sum(method.loss(batch, model(batch), ctx).values()), params)
    o = model(batch)
    pa, pv = F.softmax(o.logits["audio"], 1), F.softmax(o.logits["visual"], 1)
    m = (pa + pv) / 2
    d = 0.5 * ((m * (m.log() - pa.log())).sum(1).mean() + (m * (m.log() - pv.log())).sum(1).mean())
    want = torch.autograd.grad(2 * (s * F.cross_entropy(o.fused, batch["label"]) + al * d), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    al_grads = torch.autograd.grad(method.loss(batch, model(batch), ctx)["align"], params)
    names = [n for n, _ in model.named_parameters()]
    touched = {n for n, g in zip(names, al_grads) if bool(g.abs().sum() > 0)}
    assert {"fusion.heads.audio.weight", "fusion.heads.visual.weight"} <= touched
    assert any(n.startswith("encoders.audio.") for n in touched)
    assert any(n.startswith("encoders.visual.") for n in touched)


def test_three_modalities_mean_over_pairs():
    spec, model, opt, method, ctx = _setup(n_mod=3, params=LFMParams(divergence="js"))
    batch = make_batch(spec, 6, seed=3)
    out = model(batch)
    terms = method.loss(batch, out, ctx)
    z = {m: out.logits[m].detach() for m in spec.modality_names}
    want = (_hand_div(z["audio"], z["visual"], "js") + _hand_div(z["audio"], z["text"], "js")
            + _hand_div(z["visual"], z["text"], "js")) / 3
    assert float(terms["align"].detach()) == pytest.approx(2 * lfm_alpha(0)[1] * want, rel=1e-5)
    assert torch.isfinite(method.train_step(model, batch, opt, ctx)["loss"])


def test_refusals():
    for fusion in ("late", "sum", "concat"):
        LFM.check_config(None, tiny_model_cfg(fusion))
    for fusion in ("film", "gated"):
        with pytest.raises(ValueError, match="set model.fusion"):
            LFM.check_config(None, tiny_model_cfg(fusion))
    with pytest.raises(ValueError, match="regression"):
        LFM(LFMParams(), tiny_spec(2, task="regression"))
    for bad in (dict(schedule="learnable"), dict(divergence="kl"), dict(alpha_sup=1.5), dict(horizon=-1)):
        with pytest.raises(ValueError, match="methods.lfm"):
            LFM(LFMParams(**bad), tiny_spec(2))
