"""Greedy (baselines/greedy.py): staged encoders, MMTM, conditional learning speeds, re-balancing steps."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from baselines.greedy import MMTM, Greedy, GreedyParams, speed_ratio, staged
from g2d.config import ModelConfig, ResNetConfig
from g2d.methods.base import Context, task_loss
from g2d.models.encoders import MLP, ResNet2d, SequenceEncoder
from g2d.train.trainer import build_model
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _run_staged(enc, x):
    s = staged(enc)
    h = s.begin(x)
    for i in range(len(s.channels)):
        h = s.stage(i, h)
    return s.squeeze(h)


@pytest.mark.parametrize("enc,shape", [
    (ResNet2d(1, 4, (1, 2, 1), "small"), (3, 1, 10, 9)),
    (ResNet2d(3, 4, (2, 1), "imagenet", frames=True), (3, 3, 2, 16, 16)),
    (MLP(7, 5, 3), (3, 7)),
    (SequenceEncoder(6, 5), (3, 4, 6)),
])
def test_staged_forward_without_mmtm_is_the_encoder(enc, shape):
    """Deviation (1): run stage by stage, the encoder gives exactly its own forward."""
    torch.manual_seed(0)
    enc.eval()
    x = torch.randn(*shape)
    assert torch.equal(_run_staged(enc, x), enc(x))


def test_stage_channels():
    assert staged(ResNet2d(1, 4, (1, 2, 1), "small")).channels == [4, 8, 16]
    assert staged(MLP(7, 5, 3)).channels == [5, 5, 5]
    assert staged(SequenceEncoder(6, 5)).channels == [5, 5]


def test_mmtm_matches_a_hand_computation():
    """(G1): e_m = sigmoid(W_m relu(W_sq [s_a; s_v] + b_sq) + b_m), width int(2 (C_a + C_v) / ratio)."""
    torch.manual_seed(1)
    mm = MMTM([4, 6], ratio=4)
    assert mm.squeeze.out_features == int(2 * 10 / 4)
    sa, sv = torch.randn(3, 4), torch.randn(3, 6)
    z = torch.relu(sa @ mm.squeeze.weight[:, :4].T + sv @ mm.squeeze.weight[:, 4:].T + mm.squeeze.bias)
    ea, ev = mm([sa, sv])
    assert torch.allclose(ea, torch.sigmoid(z @ mm.excite[0].weight.T + mm.excite[0].bias), atol=1e-6)
    assert torch.allclose(ev, torch.sigmoid(z @ mm.excite[1].weight.T + mm.excite[1].bias), atol=1e-6)


def _setup(spec=None, params=None, fusion="late"):
    spec = spec or tiny_spec(2)
    torch.manual_seed(0)
    method = Greedy(params or GreedyParams(), spec)
    model = build_model(method, spec, tiny_model_cfg(fusion))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=5, optimizer=opt)
    method.setup(model, ctx)
    return method, model, opt, ctx


def test_forward_with_open_gates_is_the_plain_model_and_the_loss_sums_the_heads():
    """All-ones excitations (W_m = 0, b_m = 60): the coupled forward is model(batch); (G2) = sum of head losses."""
    method, model, _, ctx = _setup()
    with torch.no_grad():
        for mm in model.aux:
            for fc in mm.excite:
                fc.weight.zero_()
                fc.bias.fill_(60.0)
    model.eval()
    batch = make_batch(ctx.spec, 5)
    a, b = method.forward(model, batch), model(batch)
    assert torch.allclose(a.fused, b.fused, atol=1e-6)
    terms = method.loss(batch, a, ctx)
    assert set(terms) == {"uni_audio", "uni_visual"}
    want = sum(task_loss(ctx.spec, a.logits[m], batch["label"]) for m in ("audio", "visual"))
    assert float(sum(terms.values()).detach()) == pytest.approx(float(want.detach()))


def test_speed_ratio_and_bdr_by_hand():
    """(G3): cumulative ||g||^2 / ||theta||^2 per branch and per MMTM part; BDR = log10(byp / main)."""
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    p.grad = torch.tensor([0.5, 1.0])
    q = nn.Parameter(torch.tensor([3.0]))  # no gradient: counts 0
    assert speed_ratio([p, q]) == pytest.approx((0.25 + 1.0) / (1 + 4 + 9))
    method, model, opt, ctx = _setup()
    opt.zero_grad()
    batch = make_batch(ctx.spec, 6)
    model.train()
    sum(method.loss(batch, method.forward(model, batch), ctx).values()).backward()
    b1 = method.bdr(model)
    shared = list(model.aux[0].squeeze.parameters())
    for i, m in enumerate(("audio", "visual")):
        main = speed_ratio(method.groups[m])
        byp = speed_ratio(list(model.aux[0].excite[i].parameters()) + shared)
        assert b1[i] == pytest.approx(math.log10(byp / main))
    b2 = method.bdr(model)  # the same gradients again: both sums double, the ratio stays
    assert b2 == pytest.approx(b1)
    assert method.m_main[0] == pytest.approx(2 * speed_ratio(method.groups["audio"]))


def test_rebalancing_schedule_follows_the_code():
    """(G4): not before start_epoch; |d| > eps starts `window` re-balanced steps caring for the sign's modality;
    no BDR is computed while re-balancing."""
    method, model, _, ctx = _setup(params=GreedyParams(epsilon=0.1, window=2, start_epoch=1))
    seq = iter([[0.5, 0.0], [0.5, 0.0], [0.0, 0.3], [0.0, 0.05], [0.0, 0.05]])
    calls = []
    method.bdr = lambda model: calls.append(1) or next(seq)
    states = []
    for epoch in (0, 1, 1, 1, 1, 1, 1):
        ctx.epoch = epoch
        method.after_backward(model, ctx)
        states.append((method.curating, method.caring))
    # epoch 0: locked; then d=+0.5 -> care for 0 for 2 steps; d=-0.3 -> care for 1 for 2 steps
    assert states == [(False, -1), (True, 0), (True, 0), (False, 0), (True, 1), (True, 1), (False, 1)]
    assert len(calls) == 3


def test_rebalanced_step_cuts_the_caring_modalitys_cross_modal_input():
    """(G5): caring for audio, audio's features do not depend on the visual input and audio's excitation
    parameters get no gradient; outside re-balancing they do. The running mean is the mean of the batch means."""
    method, model, opt, ctx = _setup()
    model.train()
    b1, b2 = make_batch(ctx.spec, 6, seed=1), make_batch(ctx.spec, 6, seed=2)
    e_means = []
    orig = model.aux[0].forward

    def spy(squeezed):
        e = orig(squeezed)
        e_means.append([t.detach().mean(0) for t in e])
        return e

    model.aux[0].forward = spy
    method.forward(model, b1)
    method.forward(model, b2)
    want = [(e_means[0][i] + e_means[1][i]) / 2 for i in range(2)]
    assert all(torch.allclose(a, w, atol=1e-6) for a, w in zip(method.avg[0], want))
    method.curating, method.caring = True, 0

    # each training forward first adds its own batch to the running mean (the code's order, balanced_mmtm.py
    # l.119-124 before l.147-162), with weight 1 / (n + 1): after 10^7 steps that share is below float32 resolution
    kept = ([list(r) for r in method.avg], 10**7)

    def feats(visual_shift):  # from the same running mean each time
        method.avg, method.avg_steps = [list(r) for r in kept[0]], kept[1]
        b = dict(b1, visual=b1["visual"] + visual_shift)
        model.train()
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.eval()
        return method.forward(model, b)

    o1, o2 = feats(0.0), feats(3.0)
    assert torch.allclose(o1.features["audio"], o2.features["audio"], rtol=0, atol=1e-6)
    assert not torch.equal(o1.features["visual"], o2.features["visual"])
    opt.zero_grad()
    sum(method.loss(b1, o1, ctx).values()).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.aux[0].excite[0].parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.aux[0].excite[1].parameters())
    method.curating = False
    o3, o4 = feats(0.0), feats(3.0)
    assert (o3.features["audio"] - o4.features["audio"]).abs().max() > 1e-3


def test_three_modalities_care_for_the_largest_bdr_and_refusals():
    method, model, _, ctx = _setup(spec=tiny_spec(3), params=GreedyParams(epsilon=0.1, start_epoch=0))
    method.bdr = lambda model: [0.1, 0.5, 0.2]
    method.after_backward(model, ctx)
    assert method.curating and method.caring == 1
    with pytest.raises(ValueError, match="greedy predicts with the mean of the modalities' own heads"):
        Greedy.check_config(None, tiny_model_cfg("concat"))
    one_stage = ModelConfig(resnet=ResNetConfig(width=4, blocks=[1], stem="small"))
    with pytest.raises(ValueError, match=">= 2 stages"):
        build_model(Greedy(GreedyParams(), tiny_spec(2)), tiny_spec(2), one_stage)
    with pytest.raises(ValueError, match="window"):
        Greedy(GreedyParams(window=0), tiny_spec(2))


def test_evaluation_never_rebalances_nor_moves_the_running_mean():
    """Deviation (3) and (G5): an eval-mode forward uses every excitation as computed and leaves the mean alone."""
    method, model, _, ctx = _setup()
    model.train()
    method.forward(model, make_batch(ctx.spec, 6, seed=1))
    before = [t.clone() for t in method.avg[0]], method.avg_steps
    method.curating, method.caring = True, 0
    model.eval()
    b = make_batch(ctx.spec, 6, seed=3)
    o1, o2 = method.forward(model, b), method.forward(model, dict(b, visual=b["visual"] + 3.0))
    assert (o1.features["audio"] - o2.features["audio"]).abs().max() > 1e-3
    assert method.avg_steps == before[1] and all(torch.equal(a, c) for a, c in zip(method.avg[0], before[0]))
