"""AMCo (baselines/amco.py): hand-computed mask rate, mask, dependence, masked fused output and losses; what the
mask touches; Joint-Train outside the window; resume; k = 3, regression and fusion refusals."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from baselines.amco import AMCo, AMCoParams, dependence, mask_rate
from g2d.config import TrainerConfig
from g2d.methods.base import Context
from g2d.methods.joint import Joint
from g2d.models.model import MultimodalModel
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _setup(k=2, fusion="late", n_classes=4, seed=0, **kw):
    spec = tiny_spec(k, n_classes=n_classes)
    torch.manual_seed(seed)
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    method = AMCo(AMCoParams(**kw), spec)
    ctx = Context(spec, torch.device("cpu"), epochs=4)
    method.setup(model, ctx)
    return spec, model, method, ctx


def _hand_ce(z: torch.Tensor, y: torch.Tensor) -> float:
    rows = z.detach().double().tolist()
    tot = 0.0
    for row, t in zip(rows, y.tolist()):
        mx = max(row)
        tot += -(row[t] - mx - math.log(sum(math.exp(v - mx) for v in row)))
    return tot / len(rows)


def test_mask_rate_schedule_by_hand():
    """p_t = sin(pi/2 min(eps, l_t)/eps); with l_t += epoch/10 per step, N = int(p_t C) in epoch 1 is 0, 3, 5, 6."""
    for l_t in (0.0, 0.05, 0.1, 0.29, 0.3, 2.0):
        assert mask_rate(l_t, 0.3) == pytest.approx(math.sin(math.pi / 2 * min(0.3, l_t) / 0.3))
    spec, model, method, ctx = _setup(n_classes=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for e in (0, 1):
        ctx.epoch = e
        method.on_epoch_start(model, ctx)
        ctx.log.clear()
        for s in range(5):
            method.train_step(model, make_batch(spec, seed=s), opt, ctx)
        rates = ctx.log["amco_rate"]
        hand = [math.sin(math.pi / 2 * min(0.3, s * e / 10) / 0.3) for s in range(5)]
        assert rates == pytest.approx(hand)
    assert [int(r * 6) for r in rates] == [0, 3, 5, 6, 6]
    assert method.l_t == pytest.approx(0.5)
    prog = AMCo(AMCoParams(schedule="progress"), spec)  # option: l_t = epoch / epochs
    ctx.epoch = 1
    assert prog.rate(ctx) == pytest.approx(math.sin(math.pi / 2 * (1 / 4) / 0.3))


def test_dependence_by_hand():
    """D_m = batch mean of the softmax mass on m's slice of the concatenated shares; m dependent iff D_m > sigma."""
    g = torch.Generator().manual_seed(1)
    shares = [torch.randn(5, 4, generator=g) * 2 for _ in range(3)]
    hand = [0.0, 0.0, 0.0]
    for i in range(5):
        e = [[math.exp(v) for v in s[i].tolist()] for s in shares]
        tot = sum(sum(r) for r in e)
        for m in range(3):
            hand[m] += sum(e[m]) / tot / 5
    d = dependence(shares)
    assert d.tolist() == pytest.approx(hand, rel=1e-5)
    assert float(d.sum()) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("fusion", ["late", "concat", "sum"])
def test_masked_logits_fused_and_losses_by_hand(fusion):
    """Dependent audio: s'_a = s_a * mask (N = int(p_t C) zeros at randperm positions), fused' = mean/sum of the
    shares, loss = CE(fused') + CE(s'_a) + CE(s_v)."""
    spec, model, method, ctx = _setup(fusion=fusion, n_classes=6)
    method.dependent = [True, False]
    method.l_t = 0.1  # p_t = sin(pi/6) = 0.5 -> N = 3
    ctx.epoch = 1
    batch = make_batch(spec, seed=4)
    with torch.no_grad():
        out = model(batch)
    n = int(math.sin(math.pi / 2 * 0.1 / 0.3) * 6)
    assert n == 3
    torch.manual_seed(123)
    zeros = torch.randperm(6)[:n].tolist()
    mask = torch.tensor([0.0 if c in zeros else 1.0 for c in range(6)])
    sa, sv = out.logits["audio"] * mask, out.logits["visual"]
    fused_hand = (sa + sv) / 2 if fusion == "late" else sa + sv
    if fusion == "concat":  # the shares add up to the concat head's output
        assert torch.allclose(out.logits["audio"] + sv, out.fused, atol=1e-5)
    torch.manual_seed(123)
    fused, shares = method.masked_forward(model, batch, ctx)
    assert torch.allclose(fused, fused_hand, atol=1e-5)
    assert torch.allclose(shares[0], sa, atol=1e-6) and torch.allclose(shares[1], sv)
    assert int((shares[0] == 0).all(0).sum()) == 3
    y = batch["label"]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(123)
    terms = method.train_step(model, batch, opt, ctx)
    assert float(terms["task"]) == pytest.approx(_hand_ce(fused_hand, y), rel=1e-5)
    assert float(terms["uni_audio"]) == pytest.approx(_hand_ce(sa, y), rel=1e-5)
    assert float(terms["uni_visual"]) == pytest.approx(_hand_ce(sv, y), rel=1e-5)


def test_full_mask_removes_the_dependent_modality_only():
    """p_t = 1: the dependent audio share is all zero, so audio encoder and head get no gradient, while the visual
    encoder's gradient is that of CE(s_v / 2) + CE(s_v) (late fusion); a partial mask zeroes exactly the masked
    classes' rows of the audio head."""
    spec, model, method, ctx = _setup(fusion="late", n_classes=4)
    ref = copy.deepcopy(model)
    method.dependent = [True, False]
    method.l_t = 1.0
    ctx.epoch = 1
    batch = make_batch(spec, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    method.train_step(model, batch, opt, ctx)
    for p in [*model.encoders["audio"].parameters(), *model.fusion.heads["audio"].parameters()]:
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    out = ref(batch)
    sv = out.logits["visual"]
    (F.cross_entropy(sv / 2, batch["label"]) + F.cross_entropy(sv, batch["label"])).backward()
    for p, q in zip(model.encoders["visual"].parameters(), ref.encoders["visual"].parameters()):
        if q.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6)
    # partial mask: rows of the masked classes in the audio head get no gradient, the others do
    method.dependent = [True, False]
    method.l_t = 0.1
    torch.manual_seed(7)
    n = int(math.sin(math.pi / 2 * 0.1 / 0.3) * 4)
    assert n in (1, 2)
    zeros = torch.randperm(4)[:n].tolist()
    torch.manual_seed(7)
    method.train_step(model, batch, opt, ctx)
    gw = model.fusion.heads["audio"].weight.grad
    for c in range(4):
        assert (torch.count_nonzero(gw[c]) == 0) == (c in zeros)


def test_outside_window_is_joint_train():
    """Outside start_epoch..end_epoch the step is CE(fused) only: Joint-Train's parameters after a step, bitwise."""
    spec, model, method, ctx = _setup(start_epoch=2, end_epoch=3)
    ref = copy.deepcopy(model)
    joint = Joint(None, spec)
    o1, o2 = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    method.dependent = [True, False]
    ctx.epoch = 1
    for s in range(2):
        batch = make_batch(spec, seed=s)
        t = method.train_step(model, batch, o1, ctx)
        joint.train_step(ref, batch, o2, ctx)
        assert set(t) == {"loss", "task"}
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_state_dict_resume_is_identical():
    """l_t and the dependence flags survive a checkpoint: resumed training equals uninterrupted training."""
    spec, model, method, ctx = _setup(n_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx.epoch = 1
    method.on_epoch_start(model, ctx)
    batches = [make_batch(spec, seed=s) for s in range(6)]
    for b in batches[:3]:
        method.train_step(model, b, opt, ctx)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), method.state_dict(),
             torch.get_rng_state())
    assert saved[2]["l_t"] == pytest.approx(0.3)
    for b in batches[3:]:
        method.train_step(model, b, opt, ctx)
    model2 = MultimodalModel(spec, tiny_model_cfg("late"))
    model2.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    opt2.load_state_dict(saved[1])
    m2 = AMCo(AMCoParams(), spec)
    m2.load_state_dict(saved[2])
    m2.setup(model2, ctx)
    torch.set_rng_state(saved[3])
    for b in batches[3:]:
        m2.train_step(model2, b, opt2, ctx)
    assert m2.state_dict() == method.state_dict()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_three_modalities_and_refusals():
    """k = 3 trains with per-modality flags (at most one dependent at sigma = 0.5); regression, film/gated and bad
    options are refused with a clear error."""
    spec, model, method, ctx = _setup(k=3, fusion="concat")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for e in range(3):
        ctx.epoch = e
        method.on_epoch_start(model, ctx)
        for s in range(4):
            method.train_step(model, make_batch(spec, seed=s), opt, ctx)
            assert len(method.dependent) == 3 and sum(method.dependent) <= 1
    shares = [torch.full((2, 4), 3.0), torch.zeros(2, 4), torch.zeros(2, 4)]
    assert (dependence(shares) > 0.5).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="regression"):
        AMCo(AMCoParams(), tiny_spec(2, task="regression"))
    for fusion in ("film", "gated"):
        with pytest.raises(ValueError, match="model.fusion"):
            AMCo.check_config(TrainerConfig(), tiny_model_cfg(fusion))
    AMCo.check_config(TrainerConfig(), tiny_model_cfg("late"))
    with pytest.raises(ValueError, match="mask_on"):
        AMCo(AMCoParams(mask_on="x"), tiny_spec(2))


def test_features_mode_and_star_head():
    """features mode zeroes int(p_t d) feature units of the dependent modality; star_head applies linear_star to
    the fused logits in training and in predict."""
    spec, model, method, ctx = _setup(mask_on="features")
    method.dependent = [False, True]
    method.l_t = 0.1
    ctx.epoch = 1
    batch = make_batch(spec, seed=3)
    with torch.no_grad():
        feats = model.encode(batch)
    d = feats["visual"][0].numel()
    torch.manual_seed(5)
    zeros = torch.randperm(d)[:int(math.sin(math.pi / 2 * 0.1 / 0.3) * d)].tolist()
    mask = torch.ones(d)
    mask[zeros] = 0.0
    hand = model.head({"audio": feats["audio"], "visual": feats["visual"] * mask})
    torch.manual_seed(5)
    with torch.no_grad():
        fused, shares = method.masked_forward(model, batch, ctx)
    assert torch.allclose(fused, hand.fused, atol=1e-6)
    assert torch.allclose(shares[1], hand.logits["visual"], atol=1e-6)
    method = AMCo(AMCoParams(star_head=True), spec)
    aux = method.aux_module(model)
    model.aux = aux
    method.setup(model, ctx)
    with torch.no_grad():
        out = model(batch)
        assert torch.allclose(method.predict(out), aux(out.fused))
