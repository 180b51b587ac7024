"""PMR invariants: prototypes, prototypical CE, the rebalancing coefficient, checkpoint state, k = 3."""
from __future__ import annotations

import io
import math

import pytest
import torch

from baselines.ogm_ge import ogm_ratios
from baselines.pmr import PMR, PMRParams, pce_loss, pmr_coefficients, prototype_entropy, prototype_logits
from g2d.methods.base import Context
from g2d.methods.joint import Joint
from g2d.models.model import MultimodalModel, Output
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _ctx(spec, epoch):
    return Context(spec=spec, device=torch.device("cpu"), epochs=10, epoch=epoch)


def _fake_out(feats: dict, n_classes: int, b: int) -> Output:
    return Output(features=feats, logits={m: torch.zeros(b, n_classes) for m in feats},
                  fused=torch.zeros(b, n_classes, requires_grad=True))


def _hand_pce(z, c, y, valid=None, sq=False):
    """-mean_i log(exp(-d_iy) / sum_k exp(-d_ik)), d = Euclidean (or squared), written out sample by sample."""
    total = 0.0
    for i in range(z.shape[0]):
        ks = [k for k in range(c.shape[0]) if valid is None or valid[k]]
        d = {k: math.sqrt(sum((float(z[i, j]) - float(c[k, j])) ** 2 for j in range(z.shape[1]))) for k in ks}
        if sq:
            d = {k: v * v for k, v in d.items()}
        total += -(-d[int(y[i])] - math.log(sum(math.exp(-d[k]) for k in ks)))
    return total / z.shape[0]


# (a) prototypes are the class means of the features seen -----------------------------------------------------
def test_prototypes_are_class_means_missing_classes_and_ema():
    spec = tiny_spec(2, n_classes=4)
    g = torch.Generator().manual_seed(0)
    pmr = PMR(PMRParams(first_epoch="skip", momentum=0.25), spec)
    y1, y2 = torch.tensor([0, 1, 1, 0, 3]), torch.tensor([1, 0, 0])  # class 2 never seen; 3 only in batch 1
    f1 = {m: torch.randn(5, 3, generator=g) for m in spec.modality_names}
    f2 = {m: torch.randn(3, 3, generator=g) for m in spec.modality_names}
    for y, f in ((y1, f1), (y2, f2)):
        terms = pmr.loss({"label": y}, _fake_out(f, 4, len(y)), _ctx(spec, 0))
        assert set(terms) == {"task"}  # first_epoch=skip: no PMR term before a finished epoch
    pmr.on_epoch_start(None, _ctx(spec, 1))
    assert pmr.has_proto.tolist() == [True, True, False, True]
    for m in spec.modality_names:
        allf, ally = torch.cat([f1[m], f2[m]]), torch.cat([y1, y2])
        for k in (0, 1, 3):
            torch.testing.assert_close(pmr.proto[m][k], allf[ally == k].mean(0))
    old = {m: t.clone() for m, t in pmr.proto.items()}
    # epoch 1 sees classes 0 and 2 only: 0 -> EMA, 2 -> plain mean (no old prototype), 1 and 3 keep the old one
    y3 = torch.tensor([0, 2, 2])
    f3 = {m: torch.randn(3, 3, generator=g) for m in spec.modality_names}
    pmr.loss({"label": y3}, _fake_out(f3, 4, 3), _ctx(spec, 1))
    pmr.on_epoch_start(None, _ctx(spec, 2))
    assert pmr.has_proto.all()
    for m in spec.modality_names:
        torch.testing.assert_close(pmr.proto[m][0], 0.75 * f3[m][0] + 0.25 * old[m][0])
        torch.testing.assert_close(pmr.proto[m][2], f3[m][1:].mean(0))
        torch.testing.assert_close(pmr.proto[m][[1, 3]], old[m][[1, 3]])
    pmr.on_epoch_start(None, _ctx(spec, 2))  # idempotent: a second call in the same epoch changes nothing
    torch.testing.assert_close(pmr.proto[spec.modality_names[0]][0],
                               0.75 * f3[spec.modality_names[0]][0] + 0.25 * old[spec.modality_names[0]][0])


def test_running_prototypes_in_first_epoch_exclude_current_batch():
    spec = tiny_spec(2, n_classes=3)
    g = torch.Generator().manual_seed(1)
    pmr = PMR(PMRParams(), spec)  # first_epoch=running
    y1 = torch.tensor([0, 1, 0])
    f1 = {m: torch.randn(3, 2, generator=g) for m in spec.modality_names}
    assert set(pmr.loss({"label": y1}, _fake_out(f1, 3, 3), _ctx(spec, 0))) == {"task"}  # nothing seen yet
    protos, valid = pmr.current_prototypes()
    assert valid.tolist() == [True, True, False]
    for m in spec.modality_names:
        torch.testing.assert_close(protos[m][0], f1[m][[0, 2]].mean(0))
        torch.testing.assert_close(protos[m][1], f1[m][1])


# (b) the prototypical loss is CE over -||z - c_k|| -----------------------------------------------------------
@pytest.mark.parametrize("distance", ["euclidean", "sqeuclidean"])
def test_pce_equals_formula(distance):
    g = torch.Generator().manual_seed(2)
    z, c = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 3, 1, 0])
    valid = torch.ones(4, dtype=torch.bool)
    got = pce_loss(prototype_logits(z, c, valid, distance), y)
    assert got.item() == pytest.approx(_hand_pce(z, c, y, sq=distance == "sqeuclidean"), rel=1e-5)
    # a class without a prototype leaves the softmax
    valid[2] = False
    keep = y != 2
    got = pce_loss(prototype_logits(z[keep], c, valid, distance), y[keep])
    assert got.item() == pytest.approx(_hand_pce(z[keep], c, y[keep], valid, distance == "sqeuclidean"), rel=1e-5)
    # entropy of the same distribution (PER)
    p = torch.softmax(prototype_logits(z, c, torch.ones(4, dtype=torch.bool), distance), 1)
    assert prototype_entropy(prototype_logits(z, c, torch.ones(4, dtype=torch.bool), distance)).item() == \
        pytest.approx(float(-(p * p.log()).sum(1).mean()), rel=1e-5)


# (c) ratio, coefficient and where the term goes ----------------------------------------------------------------
def test_coefficients_by_hand():
    rho = torch.tensor([0.5, 2.0])
    assert pmr_coefficients(rho, 2.0).tolist() == [2.0, 0.0]  # official: alpha on the weak modality only
    t = pmr_coefficients(rho, 0.8, "tanh")
    assert t[0].item() == pytest.approx(math.tanh(0.8 * (2.0 - 1.0))) and t[1].item() == 0.0
    assert pmr_coefficients(torch.tensor([1.0, 1.0]), 2.0).tolist() == [0.0, 0.0]  # tie: no term (code l.175)
    with pytest.raises(ValueError, match="coef"):
        pmr_coefficients(rho, 1.0, "linear")


def _model_and_batches(spec, fusion="late"):
    torch.manual_seed(0)
    state = MultimodalModel(spec, tiny_model_cfg(fusion)).state_dict()
    return state, make_batch(spec, 8, seed=1), make_batch(spec, 8, seed=2)


def _grads(method, spec, state, batch, ctx, fusion="late"):
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    model.load_state_dict(state)
    out = model(batch)
    terms = method.loss(batch, out, ctx)
    sum(terms.values()).backward()
    return model, out, terms, {n: p.grad.clone() for n, p in model.named_parameters()}


def _warm(pmr, spec, state, batch, fusion="late"):
    """Epoch 0 on `batch` (prototypes accumulate), then roll to epoch 1."""
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    model.load_state_dict(state)
    with torch.no_grad():
        pmr.loss(batch, model(batch), _ctx(spec, 0))
    pmr.on_epoch_start(model, _ctx(spec, 1))


@pytest.mark.parametrize("fusion", ["late", "concat"])
def test_pce_only_on_weak_modality_dominant_grad_unchanged(fusion):
    spec = tiny_spec(2)
    state, b0, b1 = _model_and_batches(spec, fusion)
    pmr = PMR(PMRParams(alpha=1.5), spec)
    _warm(pmr, spec, state, b0, fusion)
    ctx = _ctx(spec, 1)
    model, out, terms, g = _grads(pmr, spec, state, b1, ctx, fusion)
    _, _, _, joint = _grads(Joint(None, spec), spec, state, b1, _ctx(spec, 1), fusion)
    y = b1["label"]
    # hand: s^m = sum_i softmax(-||z - c||)_{y_i}, rho^a = s^a / s^v
    s = []
    for m in spec.modality_names:
        d = torch.stack([(out.features[m].detach() - pmr.proto[m][k]).pow(2).sum(1).sqrt() for k in range(4)], 1)
        s.append(torch.softmax(-d, 1)[torch.arange(8), y].sum())
    rho_a = (s[0] / s[1]).item()
    assert ctx.log["rho_audio"][0].item() == pytest.approx(rho_a, rel=1e-5)
    assert ctx.log["rho_visual"][0].item() == pytest.approx(1 / rho_a, rel=1e-5)
    weak = 0 if rho_a < 1 else 1
    mods = spec.modality_names
    assert ctx.log[f"beta_{mods[weak]}"][0].item() == 1.5 and ctx.log[f"beta_{mods[1 - weak]}"][0].item() == 0.0
    zw = out.features[mods[weak]]
    hand = 1.5 * _hand_pce(zw.detach(), pmr.proto[mods[weak]], y)
    assert terms["pce"].item() == pytest.approx(hand, rel=1e-5)
    changed = 0
    for name in g:
        if name.startswith(f"encoders.{mods[weak]}."):
            changed += not torch.allclose(g[name], joint[name])
        else:  # dominant encoder and the fusion head: the Joint-Train gradient
            torch.testing.assert_close(g[name], joint[name], rtol=0, atol=0, msg=name)
    assert changed > 0


def test_per_on_dominant_modality_only():
    spec = tiny_spec(2)
    state, b0, b1 = _model_and_batches(spec)
    pmr = PMR(PMRParams(alpha=1.0, per_mu=0.3, per_epochs=5), spec)
    _warm(pmr, spec, state, b0)
    ctx = _ctx(spec, 1)
    model, out, terms, g = _grads(pmr, spec, state, b1, ctx)
    mods = spec.modality_names
    dom = 0 if ctx.log["rho_audio"][0] > 1 else 1
    valid = torch.ones(4, dtype=torch.bool)
    h = prototype_entropy(prototype_logits(out.features[mods[dom]].detach(), pmr.proto[mods[dom]], valid))
    assert terms["per"].item() == pytest.approx(-0.3 * h.item(), rel=1e-5)
    # after per_epochs the term is gone
    pmr2 = PMR(PMRParams(alpha=1.0, per_mu=0.3, per_epochs=1), spec)
    _warm(pmr2, spec, state, b0)
    _, _, terms2, _ = _grads(pmr2, spec, state, b1, _ctx(spec, 1))
    assert "per" not in terms2 and "pce" in terms2


def test_outside_window_is_joint_train_bitwise():
    spec = tiny_spec(2)
    state, b0, b1 = _model_and_batches(spec)
    pmr = PMR(PMRParams(start_epoch=2, end_epoch=3), spec)
    _warm(pmr, spec, state, b0)
    _, _, terms, g = _grads(pmr, spec, state, b1, _ctx(spec, 1))
    _, _, _, joint = _grads(Joint(None, spec), spec, state, b1, _ctx(spec, 1))
    assert set(terms) == {"task"}
    assert all(torch.equal(g[n], joint[n]) for n in g)


# (d) state survives a checkpoint --------------------------------------------------------------------------------
def test_state_dict_round_trip_mid_training():
    spec = tiny_spec(2)
    state, b0, b1 = _model_and_batches(spec)
    pmr = PMR(PMRParams(momentum=0.3), spec)
    _warm(pmr, spec, state, b0)
    model = MultimodalModel(spec, tiny_model_cfg())
    model.load_state_dict(state)
    with torch.no_grad():
        pmr.loss(b1, model(b1), _ctx(spec, 1))  # epoch 1 accumulators are non-empty at the "checkpoint"
    buf = io.BytesIO()
    torch.save(pmr.state_dict(), buf)
    buf.seek(0)
    fresh = PMR(PMRParams(momentum=0.3), spec)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert pmr.acc_epoch == fresh.acc_epoch == 1
    assert torch.equal(pmr.has_proto, fresh.has_proto) and torch.equal(pmr.counts, fresh.counts)
    for m in spec.modality_names:
        assert torch.equal(pmr.proto[m], fresh.proto[m]) and torch.equal(pmr.sums[m], fresh.sums[m])
    # the next epoch's prototypes and terms agree
    pmr.on_epoch_start(model, _ctx(spec, 2))
    fresh.on_epoch_start(model, _ctx(spec, 2))
    with torch.no_grad():
        out = model(b0)
        ta, tb = pmr.loss(b0, out, _ctx(spec, 2)), fresh.loss(b0, out, _ctx(spec, 2))
    assert ta.keys() == tb.keys() and "pce" in ta
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    state2 = pmr.state_dict()  # a snapshot, not a view of the live accumulators
    pmr.loss(b1, out, _ctx(spec, 2))
    assert not torch.equal(state2["counts"], pmr.counts)
    assert all(not torch.equal(state2["sums"][m], pmr.sums[m]) for m in spec.modality_names)


# (e) three modalities ------------------------------------------------------------------------------------------
def test_three_modalities_ratios_and_terms():
    spec = tiny_spec(3)
    state, b0, b1 = _model_and_batches(spec)
    pmr = PMR(PMRParams(alpha=1.0, multi="mean"), spec)
    _warm(pmr, spec, state, b0)
    ctx = _ctx(spec, 1)
    model, out, terms, g = _grads(pmr, spec, state, b1, ctx)
    _, _, _, joint = _grads(Joint(None, spec), spec, state, b1, _ctx(spec, 1))
    y, mods = b1["label"], spec.modality_names
    valid = torch.ones(4, dtype=torch.bool)
    s = torch.stack([torch.softmax(prototype_logits(out.features[m].detach(), pmr.proto[m], valid), 1)
                     [torch.arange(8), y].sum() for m in mods])
    rho = torch.stack([s[i] / ((s.sum() - s[i]) / 2) for i in range(3)])  # s^m / mean of the others
    torch.testing.assert_close(torch.stack([ctx.log[f"rho_{m}"][0] for m in mods]), rho)
    torch.testing.assert_close(rho, ogm_ratios(s, "mean"))
    weak = [i for i in range(3) if rho[i] < 1]
    assert weak and len(weak) < 3
    hand = sum(_hand_pce(out.features[mods[i]].detach(), pmr.proto[mods[i]], y) for i in weak)
    assert terms["pce"].item() == pytest.approx(hand, rel=1e-5)
    for name in g:
        enc = name.split(".")[1] if name.startswith("encoders.") else None
        if enc is not None and mods.index(enc) in weak:
            continue
        torch.testing.assert_close(g[name], joint[name], rtol=0, atol=0, msg=name)


def test_bad_options_refused():
    spec = tiny_spec(2)
    for kw, match in (({"distance": "cosine"}, "distance"), ({"multi": "max"}, "multi"),
                      ({"first_epoch": "zero"}, "first_epoch"), ({"momentum": 1.0}, "momentum")):
        with pytest.raises(ValueError, match=match):
            PMR(PMRParams(**kw), spec)
    with pytest.raises(ValueError, match="regression"):
        PMR(PMRParams(), tiny_spec(2, task="regression"))
