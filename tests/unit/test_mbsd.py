"""MBSD (BalanceBenchmark's version, baselines/mbsd.py): weights, KL/RS terms, total loss, gradients, k = 3."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.mbsd import MBSD, MBSDParams, mbsd_pair_terms
from g2d.methods.base import Context
from g2d.models.model import MultimodalModel
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _softmax(row):
    mx = max(row)
    e = [math.exp(v - mx) for v in row]
    return [v / sum(e) for v in e]


def _hand_pair(za, zb, y, rs_on="logits"):
    """BalanceBenchmark MBSD_trainer.py l.130-158, one sample at a time."""
    n, c = za.shape
    kl_sum = rs_sum = 0.0
    for i in range(n):
        pa, pb = _softmax(za[i].tolist()), _softmax(zb[i].tolist())
        a, b = pa[y[i]], pb[y[i]]
        ps, pw = max(a, b), min(a, b)
        right = pa.index(max(pa)) == y[i] or pb.index(max(pb)) == y[i]
        w = ps - pw if right else 0.0
        kl = pw * (math.log(pw) - ps)
        u, v = (za[i].tolist(), zb[i].tolist()) if rs_on == "logits" else (pa, pb)
        rs = sum((s - t) ** 2 for s, t in zip(u, v)) / c
        kl_sum += w * kl
        rs_sum += w * rs
    return kl_sum / n, rs_sum / n


@pytest.mark.parametrize("rs_on", ["logits", "probs"])
def test_pair_terms_match_hand_computation(rs_on):
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(30, 4, generator=g) * 2, torch.randn(30, 4, generator=g) * 2
    y = torch.randint(0, 4, (30,), generator=g)
    kl, rs = mbsd_pair_terms(za, zb, y, rs_on)
    hk, hr = _hand_pair(za, zb, y.tolist(), rs_on)
    assert float(kl) == pytest.approx(hk, rel=1e-5, abs=1e-7)
    assert float(rs) == pytest.approx(hr, rel=1e-5, abs=1e-7)
    assert hr > 0
    # samples where neither modality is right carry no weight
    pa, pb = F.softmax(za, 1), F.softmax(zb, 1)
    wrong = (pa.argmax(1) != y) & (pb.argmax(1) != y)
    assert bool(wrong.any())
    k2, r2 = mbsd_pair_terms(za[wrong], zb[wrong], y[wrong], rs_on)
    assert float(k2) == 0.0 and float(r2) == 0.0


def _setup(n_mod=2, params=None, fusion="late"):
    spec = tiny_spec(n_mod)
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=2, optimizer=opt)
    return spec, model, opt, MBSD(params or MBSDParams(), spec), ctx


def test_total_loss_gradients_and_window():
    spec, model, _, method, ctx = _setup()
    batch = make_batch(spec, 8, seed=1)
    model.eval()
    y = batch["label"]
    params = list(model.parameters())
    got = torch.autograd.grad(sum(method.loss(batch, model(batch), ctx).values()), params)
    out = model(batch)
    za, zv = out.logits["audio"], out.logits["visual"]
    pa, pv = F.softmax(za, 1), F.softmax(zv, 1)
    a, v = pa[torch.arange(8), y], pv[torch.arange(8), y]
    ps, pw = torch.maximum(a, v), torch.minimum(a, v)
    w = (ps - pw) * ((pa.argmax(1) == y) | (pv.argmax(1) == y)).float()
    hand = (F.cross_entropy(out.fused, y) + F.cross_entropy(za, y) + F.cross_entropy(zv, y)
            + (w * pw * (pw.log() - ps)).mean() + (w * ((za - zv) ** 2).mean(1)).mean())
    want = torch.autograd.grad(hand, params)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2)
    terms = method.loss(batch, out, ctx)
    hk, hr = _hand_pair(za.detach(), zv.detach(), y.tolist())
    assert float(terms["kl"].detach()) == pytest.approx(hk, rel=1e-5, abs=1e-7)
    assert float(terms["rs"].detach()) == pytest.approx(hr, rel=1e-5, abs=1e-7)
    # detach_weight changes the gradient only through w
    det = MBSD(MBSDParams(detach_weight=True), spec)
    g_det = torch.autograd.grad(det.loss(batch, model(batch), ctx)["rs"], params, allow_unused=True)
    g_code = torch.autograd.grad(method.loss(batch, model(batch), ctx)["rs"], params, allow_unused=True)
    assert any(not torch.allclose(x, z) for x, z in zip(g_det, g_code) if x is not None and z is not None)
    # outside the window: exactly Joint-Train's loss
    ctx.epoch = 1
    off = MBSD(MBSDParams(end_epoch=0), spec)
    t = off.loss(batch, out, ctx)
    assert set(t) == {"task"} and torch.equal(t["task"], F.cross_entropy(out.fused.float(), y))


def test_three_modalities_mean_over_pairs():
    spec, model, opt, method, ctx = _setup(n_mod=3)
    batch = make_batch(spec, 8, seed=2)
    out = model(batch)
    terms = method.loss(batch, out, ctx)
    z = {m: out.logits[m].detach() for m in spec.modality_names}
    y = batch["label"].tolist()
    hs = [_hand_pair(z[a], z[b], y) for a, b in (("audio", "visual"), ("audio", "text"), ("visual", "text"))]
    assert float(terms["kl"].detach()) == pytest.approx(sum(h[0] for h in hs) / 3, rel=1e-5, abs=1e-7)
    assert float(terms["rs"].detach()) == pytest.approx(sum(h[1] for h in hs) / 3, rel=1e-5, abs=1e-7)
    assert torch.isfinite(method.train_step(model, batch, opt, ctx)["loss"])


def test_refusals():
    for fusion in ("late", "sum", "concat"):
        MBSD.check_config(None, tiny_model_cfg(fusion))
    for fusion in ("film", "gated"):
        with pytest.raises(ValueError, match="set model.fusion"):
            MBSD.check_config(None, tiny_model_cfg(fusion))
    with pytest.raises(ValueError, match="regression"):
        MBSD(MBSDParams(), tiny_spec(2, task="regression"))
    with pytest.raises(ValueError, match="methods.mbsd"):
        MBSD(MBSDParams(rs_on="features"), tiny_spec(2))
