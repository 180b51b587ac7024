"""Diagnosing & Re-learning invariants: scaling, purity, k-means, strength, the schedule, the held-out loss, the soft
re-initialisation (encoders only), checkpoint state, k = 3 and refusals."""
from __future__ import annotations

import io
import math

import pytest
import torch

from baselines.relearn import Relearn, RelearnParams, kmeans, minmax_scale, purity, reinit_strength
from g2d.methods.base import Context
from g2d.methods.joint import Joint
from g2d.models.model import MultimodalModel
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _ctx(spec, epoch=0):
    return Context(spec=spec, device=torch.device("cpu"), epochs=10, epoch=epoch)


def test_minmax_scale_and_purity_by_hand():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    x[:, 2] = 1.5  # constant column -> -1 (sklearn replaces a zero range by 1)
    s = minmax_scale(x)
    for j in range(4):
        col = [float(v) for v in x[:, j]]
        lo, hi = min(col), max(col)
        for i in range(9):
            ref = 2 * (col[i] - lo) / (hi - lo) - 1 if hi > lo else -1.0
            assert float(s[i, j]) == pytest.approx(ref, abs=1e-12)
    y = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 1, 1])
    lab = torch.tensor([3, 3, 3, 0, 0, 1, 1, 1, 1, 0])
    # clusters: 3 -> {0,0,1}: 2; 0 -> {2,2,1}: 2; 1 -> {2,1,0,1}: 2  => 6 / 10
    assert purity(y, lab) == pytest.approx(0.6)
    for trial in range(5):
        yy = torch.randint(0, 4, (30,), generator=g)
        ll = torch.randint(0, 3, (30,), generator=g)
        hand = 0
        for c in set(ll.tolist()):
            members = [int(yy[i]) for i in range(30) if int(ll[i]) == c]
            hand += max(members.count(k) for k in set(members))
        assert purity(yy, ll) == pytest.approx(hand / 30)


def test_kmeans_fixed_point_separation_and_determinism():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(5, 6, generator=g, dtype=torch.float64) * 6
    y = torch.arange(150) % 5
    x = centers[y] + 0.3 * torch.randn(150, 6, generator=g, dtype=torch.float64)
    lab = kmeans(x, 5, seed=0)
    assert purity(y, lab) == 1.0 and len(set(lab.tolist())) == 5  # well-separated blobs recovered
    assert torch.equal(lab, kmeans(x, 5, seed=0))  # seeded
    noisy = torch.randn(80, 3, generator=g, dtype=torch.float64)
    lab = kmeans(noisy, 4, seed=0, n_init=3)
    # Lloyd fixed point, checked by hand: every point is nearest to its own cluster's mean
    means = {c: [sum(float(noisy[i, j]) for i in range(80) if int(lab[i]) == c) / int((lab == c).sum())
                 for j in range(3)] for c in set(lab.tolist())}
    for i in range(80):
        d = {c: sum((float(noisy[i, j]) - mu[j]) ** 2 for j in range(3)) for c, mu in means.items()}
        assert d[int(lab[i])] <= min(d.values()) + 1e-9


def test_strength_and_schedule():
    assert reinit_strength(0.8, 0.5, 3.0) == pytest.approx(math.tanh(0.9))
    assert reinit_strength(0.5, 0.8, 3.0) == pytest.approx(math.tanh(0.9))  # |gap|
    assert reinit_strength(0.4, 0.4, 3.0) == 0.0
    r = Relearn(RelearnParams(reinit_epoch=20, reinit_num=3), tiny_spec(2))
    assert [e for e in range(100) if r.is_diagnosis_epoch(e)] == [20, 40, 60]  # official ours.sh schedule
    r = Relearn(RelearnParams(reinit_epoch=3, reinit_num=2), tiny_spec(2))
    assert [e for e in range(20) if r.is_diagnosis_epoch(e)] == [3, 6]


def _hand_ce(z, y):
    return sum(-(float(z[i, int(y[i])]) - math.log(sum(math.exp(float(v)) for v in z[i]))) for i in range(len(y))) \
        / len(y)


def test_loss_leaves_held_out_samples_out_and_accumulates_only_in_diagnosis_epochs():
    spec = tiny_spec(2)
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg())
    r = Relearn(RelearnParams(reinit_epoch=2, val_every=3), spec)
    r.setup(model, _ctx(spec))
    batch = make_batch(spec, 8, seed=2)
    batch["index"] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])  # held out: 0, 3, 6
    out = model(batch)
    out.fused.retain_grad()
    terms = r.loss(batch, out, _ctx(spec, 1))
    kept = [1, 2, 4, 5, 7]
    assert float(terms["task"].detach()) == pytest.approx(_hand_ce(out.fused[kept].detach(), batch["label"][kept]), rel=1e-5)
    terms["task"].backward()
    assert out.fused.grad[[0, 3, 6]].abs().sum() == 0 and out.fused.grad[kept].abs().sum() > 0
    assert r.feats == {} and r.acc_epoch == -1  # epoch 1 is not a diagnosis epoch
    r.loss(batch, model(batch), _ctx(spec, 2))
    assert r.acc_epoch == 2
    assert r.feats["val"]["label"][0].tolist() == batch["label"][[0, 3, 6]].tolist()
    assert r.feats["train"]["label"][0].tolist() == batch["label"][kept].tolist()
    torch.testing.assert_close(r.feats["val"]["audio"][0], out.features["audio"][[0, 3, 6]].detach())
    # no held-out sample in the batch: the loss and every gradient are Joint-Train's, bitwise
    batch["index"] = torch.tensor([1, 2, 4, 5, 7, 8, 10, 11])
    model.zero_grad(set_to_none=True)
    r.loss(batch, model(batch), _ctx(spec, 1))["task"].backward()
    mine = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    Joint(Joint.Params(), spec).loss(batch, model(batch), _ctx(spec, 1))["task"].backward()
    assert all(torch.equal(mine[n], p.grad) for n, p in model.named_parameters())


def test_relearn_moves_encoders_toward_init_only():
    spec = tiny_spec(2)
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg())
    r = Relearn(RelearnParams(), spec)
    r.setup(model, _ctx(spec))
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # "training": move every parameter and a BN buffer
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    cur = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    r.relearn(model, {"audio": 0.3, "visual": 0.0})
    for n, p in model.named_parameters():
        ref = 0.3 * init[n] + 0.7 * cur[n] if n.startswith("encoders.audio.") else cur[n]
        torch.testing.assert_close(p.detach(), ref, rtol=1e-6, atol=1e-6)
        if not n.startswith("encoders.audio."):
            assert torch.equal(p.detach(), cur[n]), n
    assert all(torch.equal(b, bufs[n]) for n, b in model.named_buffers())  # BN running stats kept


def _train(r, model, opt, spec, epochs, ctx, nb=3):
    for e in epochs:
        ctx.epoch, ctx.log = e, {}
        model.train()
        r.on_epoch_start(model, ctx)
        for b in range(nb):
            batch = make_batch(spec, 12, seed=100 * e + b)
            batch["index"] = torch.arange(12) + 12 * b
            r.train_step(model, batch, opt, ctx)
            ctx.step += 1


def test_diagnosis_flow_strength_from_purity_gap():
    spec = tiny_spec(3)
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg())
    r = Relearn(RelearnParams(reinit_epoch=1, reinit_num=1, val_every=3, move_lambda=3.0), spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx = _ctx(spec)
    r.setup(model, ctx)
    _train(r, model, opt, spec, range(2), ctx)  # epoch 1 is a diagnosis epoch; features pending
    feats = {s: {k: torch.cat(v) for k, v in d.items()} for s, d in r.feats.items()}
    assert feats["val"]["label"].numel() == 12 and feats["train"]["label"].numel() == 24
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    init = {m: [t.clone() for t in ts] for m, ts in r.init.items()}
    ctx.epoch, ctx.log = 2, {}
    r.on_epoch_start(model, ctx)
    for m in spec.modality_names:
        pd, pv = (purity(feats[s]["label"], kmeans(minmax_scale(feats[s][m].double()), 4)) for s in ("train", "val"))
        a = math.tanh(3.0 * abs(pd - pv))
        assert ctx.log[f"alpha_{m}"] == [pytest.approx(a)]
        assert ctx.log[f"purity_train_{m}"] == [pytest.approx(pd)]
        for (n, p), q0 in zip(model.encoders[m].named_parameters(), init[m]):
            torch.testing.assert_close(p.detach(), a * q0 + (1 - a) * before[f"encoders.{m}.{n}"])
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n.startswith("fusion."))
    assert r.feats == {} and r.acc_epoch == -1
    ctx.epoch, ctx.log = 3, {}
    r.on_epoch_start(model, ctx)  # nothing pending: nothing happens
    assert ctx.log == {}


def test_state_dict_round_trip_resume_identical():
    spec = tiny_spec(2)

    def fresh():
        torch.manual_seed(0)
        model = MultimodalModel(spec, tiny_model_cfg())
        r = Relearn(RelearnParams(reinit_epoch=1, reinit_num=2, val_every=4), spec)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ctx = _ctx(spec)
        return model, r, opt, ctx

    model, r, opt, ctx = fresh()
    r.setup(model, ctx)
    _train(r, model, opt, spec, range(4), ctx)
    full = {k: v.clone() for k, v in model.state_dict().items()}

    model, r, opt, ctx = fresh()
    r.setup(model, ctx)
    _train(r, model, opt, spec, range(2), ctx)  # ends in a diagnosis epoch: its features are pending
    assert r.acc_epoch == 1
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "method": r.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf)
    model, r, opt, ctx = fresh()
    with torch.no_grad():  # a different model at setup time must not replace the checkpointed theta^init
        for p in model.parameters():
            p.add_(1.0)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    r.load_state_dict(state["method"])
    r.setup(model, ctx)
    ctx.step = 6
    _train(r, model, opt, spec, range(2, 4), ctx)
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())


def test_refusals_and_small_sets():
    with pytest.raises(ValueError, match="regression"):
        Relearn(RelearnParams(), tiny_spec(2, task="regression"))
    with pytest.raises(ValueError, match="val_every"):
        Relearn(RelearnParams(val_every=1), tiny_spec(2))
    with pytest.raises(ValueError, match="reinit_epoch"):
        Relearn(RelearnParams(reinit_epoch=0), tiny_spec(2))
    r = Relearn(RelearnParams(), tiny_spec(2))  # fewer held-out samples than classes: no k-means, a = 0
    r.feats = {"train": {"label": [torch.arange(8) % 4], "audio": [torch.randn(8, 3)], "visual": [torch.randn(8, 3)]},
               "val": {"label": [torch.tensor([0, 1])], "audio": [torch.randn(2, 3)], "visual": [torch.randn(2, 3)]}}
    res = r.diagnose()
    assert res["audio"][2] == 0.0 and res["visual"][2] == 0.0
