"""CML invariants (baselines/cml.py): removal chain, subset predictions, the confidence hinge, gradients, k = 3."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.cml import CML, CMLParams, cml_regulariser, removal_masks, subset_logits
from g2d.methods.base import Context
from g2d.models.model import MultimodalModel
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _setup(n_mod=2, params=None, fusion="late", seed=0):
    spec = tiny_spec(n_mod)
    torch.manual_seed(seed)
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = CML(params or CMLParams(), spec)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=2, optimizer=opt)
    method.setup(model, ctx)
    method.on_epoch_start(model, ctx)
    return spec, model, opt, method, ctx


def _softmax(row):
    mx = max(row)
    e = [math.exp(v - mx) for v in row]
    return [v / sum(e) for v in e]


def _hand_reg(more, fewer, y, hinge, mask, eps=0.0):
    """(C3)-(C4) one sample at a time, plain Python."""
    diffs = []
    for i in range(len(y)):
        pm, pf = _softmax(more[i].tolist()), _softmax(fewer[i].tolist())
        cm, cf = max(pm), max(pf)
        predm, predf = pm.index(cm), pf.index(cf)
        sign = 0.0 if (mask == "official" and predf == y[i] and predm != y[i]) else 1.0
        diffs.append((cf - cm, sign))
    if hinge == "batch":
        return max(0.0, sum(d for d, _ in diffs) - eps)
    return sum(max(0.0, d * s - eps) for d, s in diffs)


@pytest.mark.parametrize("hinge,mask", [("sample", "official"), ("sample", "none"), ("batch", "none")])
def test_regulariser_matches_hand_computation(hinge, mask):
    g = torch.Generator().manual_seed(0)
    more, fewer = torch.randn(40, 5, generator=g) * 2, torch.randn(40, 5, generator=g) * 2
    y = torch.randint(0, 5, (40,), generator=g)
    want = _hand_reg(more, fewer, y.tolist(), hinge, mask)
    assert float(cml_regulariser(more, fewer, y, hinge, mask)) == pytest.approx(want, rel=1e-5, abs=1e-6)
    # the official mask zeroes some active samples here (the two masks differ on this draw)
    if hinge == "sample":
        assert _hand_reg(more, fewer, y.tolist(), "sample", "official") < _hand_reg(more, fewer, y.tolist(),
                                                                                     "sample", "none")
    w = _hand_reg(more, fewer, y.tolist(), hinge, mask, eps=0.05)
    assert float(cml_regulariser(more, fewer, y, hinge, mask, 0.05)) == pytest.approx(w, rel=1e-5, abs=1e-6)


def test_removal_masks_and_subset_logits():
    order = torch.tensor([[2, 0, 1], [1, 2, 0]])
    masks = removal_masks(order)
    assert [m.tolist() for m in masks] == [[[True] * 3, [True] * 3],
                                           [[True, True, False], [True, False, True]],
                                           [[False, True, False], [True, False, False]]]
    for fusion in ("late", "sum", "concat"):
        spec, model, _, _, _ = _setup(3, fusion=fusion)
        out = model(make_batch(spec, 2))
        mods = spec.modality_names
        z = torch.stack([out.logits[m] for m in mods]).detach()
        torch.testing.assert_close(subset_logits(model.fusion, z, masks[0]), out.fused.detach())
        for keep in masks[1:]:
            got = subset_logits(model.fusion, z, keep)
            for i in range(2):
                kept = [m for j, m in enumerate(mods) if keep[i, j]]
                if fusion == "late":
                    want = sum(out.logits[m][i] for m in kept) / len(kept)
                elif fusion == "sum":
                    want = sum(out.logits[m][i] for m in kept)
                else:  # W_S f_S + b: the full bias, the removed columns left out
                    w, b, start, want = model.fusion.fc.weight, model.fusion.fc.bias, 0, 0
                    for m in mods:
                        d = out.features[m].shape[1]
                        if m in kept:
                            want = want + w[:, start:start + d] @ out.features[m][i]
                        start += d
                    want = want + b
                torch.testing.assert_close(got[i], want.detach(), atol=1e-5, rtol=1e-5)


def test_loss_is_mean_chain_ce_plus_lam_hinge():
    p = CMLParams(lam=0.7, order="epoch")
    spec, model, _, method, ctx = _setup(params=p)
    batch = make_batch(spec, 8, seed=1)
    out = model(batch)
    terms = method.loss(batch, out, ctx)
    removed = spec.modality_names[int(method.epoch_order[0])]
    kept = [m for m in spec.modality_names if m != removed][0]
    y = batch["label"]
    zf, zp = out.fused.detach(), out.logits[kept].detach()  # late fusion, one modality left: its own head
    ce = lambda z: -sum(math.log(_softmax(z[i].tolist())[int(y[i])]) for i in range(len(y))) / len(y)  # noqa: E731
    assert float(terms["task"].detach()) == pytest.approx((ce(zf) + ce(zp)) / 2, rel=1e-5)
    assert float(terms["cml"].detach()) == pytest.approx(0.7 * _hand_reg(zf, zp, y.tolist(), "sample", "official"),
                                                rel=1e-5, abs=1e-7)


def test_gradients_match_hand_loss_and_joint_outside_window():
    spec, model, opt, method, ctx = _setup(params=CMLParams(lam=5.0, order="epoch"))
    batch = make_batch(spec, 8, seed=2)
    model.eval()  # BN in eval: two forwards give the same graph
    params = [q for q in model.parameters()]
    got = torch.autograd.grad(sum(method.loss(batch, model(batch), ctx).values()), params, allow_unused=True)
    out = model(batch)
    kept = [m for m in spec.modality_names if m != spec.modality_names[int(method.epoch_order[0])]][0]
    y = batch["label"]
    pf, pp = F.softmax(out.fused, 1), F.softmax(out.logits[kept], 1)
    cf, predf = pf.max(1)
    cp, predp = pp.max(1)
    sign = torch.tensor([0.0 if (int(predp[i]) == int(y[i]) and int(predf[i]) != int(y[i])) else 1.0
                         for i in range(len(y))])
    hand = (F.cross_entropy(out.fused, y) + F.cross_entropy(out.logits[kept], y)) / 2 \
        + 5.0 * torch.clamp((cp - cf) * sign, min=0).sum()
    want = torch.autograd.grad(hand, params, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    # the regulariser reaches the head of the kept modality and both encoders
    reg = torch.autograd.grad(method.loss(batch, model(batch), ctx)["cml"], params, allow_unused=True)
    assert float(method.loss(batch, model(batch), ctx)["cml"].detach()) > 0
    names = [n for n, _ in model.named_parameters()]
    touched = {n for n, g in zip(names, reg) if g is not None and bool(g.abs().sum() > 0)}
    assert f"fusion.heads.{kept}.weight" in touched
    assert any(n.startswith("encoders.audio.") for n in touched) and any(n.startswith("encoders.visual.")
                                                                         for n in touched)
    # outside the window: exactly Joint-Train's loss
    ctx.epoch = 1
    off = CML(CMLParams(start_epoch=0, end_epoch=0), spec)
    off.setup(model, ctx)
    terms = off.loss(batch, out, ctx)
    assert set(terms) == {"task"} and torch.equal(terms["task"], F.cross_entropy(out.fused.float(), y))


def test_epoch_order_state_round_trip_and_per_sample_orders():
    spec, model, opt, method, ctx = _setup(n_mod=3, params=CMLParams(order="epoch"))
    state = method.state_dict()
    fresh = CML(CMLParams(order="epoch"), spec)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.epoch_order, method.epoch_order) and fresh.order_epoch == 0
    fresh.on_epoch_start(model, ctx)  # same epoch: no redraw
    assert torch.equal(fresh.epoch_order, method.epoch_order)
    samp = CML(CMLParams(), spec)
    torch.manual_seed(0)
    o = samp._orders(64, torch.device("cpu"))
    assert all(sorted(r) == [0, 1, 2] for r in o.tolist()) and len({tuple(r) for r in o.tolist()}) > 1


def test_three_modalities_train_step():
    spec, model, opt, method, ctx = _setup(n_mod=3)
    batch = make_batch(spec, 6, seed=3)
    terms = method.train_step(model, batch, opt, ctx)
    assert torch.isfinite(terms["loss"]) and {"task", "cml"} <= set(terms)
    assert "cml_reg" in ctx.log


def test_refusals():
    for fusion in ("late", "sum", "concat"):
        CML.check_config(None, tiny_model_cfg(fusion))
    for fusion in ("film", "gated"):
        with pytest.raises(ValueError, match="set model.fusion"):
            CML.check_config(None, tiny_model_cfg(fusion))
    with pytest.raises(ValueError, match="regression"):
        CML(CMLParams(), tiny_spec(2, task="regression"))
    for bad in (dict(order="x"), dict(hinge="x"), dict(mask="x"), dict(lam=-1.0)):
        with pytest.raises(ValueError, match="methods.cml"):
            CML(CMLParams(**bad), tiny_spec(2))
