"""Sample-/Modality-level valuation: Shapley values, copy counts, re-sample ratio, the extended step's gradient,
what the copies train, Joint-Train equivalence, checkpoint state, k = 3, refusals."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from baselines.valuation import (ModalityValuation, ModalityValuationParams, SampleValuation,
                                 SampleValuationParams, resample_ratio, sample_copies, shapley_values)
from g2d.methods.base import Context
from g2d.methods.joint import Joint
from g2d.models.model import MultimodalModel
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _ctx(spec, epoch, opt=None):
    return Context(spec=spec, device=torch.device("cpu"), epochs=10, epoch=epoch, optimizer=opt)


def _model(spec, state=None, fusion="concat"):
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    if state is not None:
        model.load_state_dict(state)
    return model.train()


def _grads_after_step(method, model, batch, epoch):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the grads, not the weights
    ctx = _ctx(model.spec, epoch, opt)
    terms = method.train_step(model, batch, opt, ctx)
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}, \
        terms, ctx


# (a) the valuation ---------------------------------------------------------------------------------------------
def test_shapley_two_modalities_official_formula():
    g = torch.Generator().manual_seed(0)
    correct = {s: torch.rand(50, generator=g) < 0.5 for s in [(0,), (1,), (0, 1)]}
    phi = shapley_values(correct, 2, "size")
    phi_ind = shapley_values(correct, 2, "indicator")
    for i in range(50):
        value_all = 2.0 if correct[(0, 1)][i] else 0.0  # sample_level.py l.110-116, written out
        value_a = 1.0 if correct[(0,)][i] else 0.0
        value_v = 1.0 if correct[(1,)][i] else 0.0
        assert phi[i, 0].item() == (value_a + value_all - value_v) / 2.0
        assert phi[i, 1].item() == (value_v + value_all - value_a) / 2.0
        all01 = value_all / 2  # BalanceBenchmark: every coalition worth 1 if right
        assert phi_ind[i, 0].item() == (value_a + all01 - value_v) / 2.0
        assert phi_ind[i, 1].item() == (value_v + all01 - value_a) / 2.0


@pytest.mark.parametrize("value", ["size", "indicator"])
def test_shapley_three_modalities_by_permutations(value):
    """Shapley = mean over the 3! orderings of the marginal value; efficiency: sum_m phi = v(M)."""
    g = torch.Generator().manual_seed(1)
    subsets = [s for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]
    correct = {s: torch.rand(20, generator=g) < 0.5 for s in subsets}
    phi = shapley_values(correct, 3, value)

    def v(s, i):
        if not s:
            return 0.0
        c = float(correct[tuple(sorted(s))][i])
        return c * len(s) if value == "size" else c

    for i in range(20):
        for m in range(3):
            marg = []
            for order in itertools.permutations(range(3)):
                before = order[:order.index(m)]
                marg.append(v(before + (m,), i) - v(before, i))
            assert phi[i, m].item() == pytest.approx(sum(marg) / 6, abs=1e-6)
        assert phi[i].sum().item() == pytest.approx(v((0, 1, 2), i), abs=1e-6)


def test_copy_thresholds_by_hand():
    phi = torch.tensor([-0.5, -0.1, -0.05, 0.0, 0.4, 0.41, 0.5, 0.99, 1.0, 1.5])
    # (-0.5: 3) (-0.1: none, strict) (-0.05, 0: 2) (0.4: none, strict) (0.41..0.99: 1) (1, 1.5: 0)
    assert sample_copies(phi).tolist() == [3, 0, 2, 2, 0, 1, 1, 1, 0, 0]


def test_resample_ratio_by_hand():
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        c = torch.rand(2, generator=g) * 2 - 0.5
        gap_a, gap_v = 1 - float(c[0]), 1 - float(c[1])
        x = abs(gap_a - gap_v) / 3 * 2  # modality_level.py l.161
        d, w = resample_ratio(c, 0.7, "linear")
        assert d == pytest.approx(0.7 * x) and w == (0 if gap_a > gap_v else 1)
        assert resample_ratio(c, 0.7, "tanh")[0] == pytest.approx(math.tanh(0.7 * x))
        assert resample_ratio(c, 0.7, "square")[0] == pytest.approx(x ** 1.5 * 0.7)
    c3 = torch.tensor([0.9, 0.2, 0.5])  # gaps 0.1, 0.8, 0.5: weakest = 1
    d, w = resample_ratio(c3, 1.0)
    assert w == 1 and d == pytest.approx(((0.8 - 0.1) + (0.8 - 0.5)) / 2 * 2 / 3)


@pytest.mark.parametrize("drop", ["features", "inputs"])
def test_coalition_correctness_by_hand_concat_head(drop):
    spec = tiny_spec(2)
    torch.manual_seed(0)
    model = _model(spec)
    batch = make_batch(spec, 16, seed=3)
    method = SampleValuation(SampleValuationParams(drop=drop), spec)
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    got = method.coalition_correct(model, batch, _ctx(spec, 5))
    assert model.training  # the eval-mode valuation restores train mode
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bn_before.items())  # no BN update
    model.eval()
    with torch.no_grad():
        a, v = model.encoders["audio"], model.encoders["visual"]
        W, b = model.fusion.fc.weight, model.fusion.fc.bias
        da = a.out_dim
        if drop == "features":
            fa, fv = a(batch["audio"]), v(batch["visual"])
            za, zv = torch.zeros_like(fa), torch.zeros_like(fv)
            outs = {(0,): (fa, zv), (1,): (za, fv), (0, 1): (fa, fv)}
        else:  # zero inputs through the encoders
            outs = {(0,): (a(batch["audio"]), v(torch.zeros_like(batch["visual"]))),
                    (1,): (a(torch.zeros_like(batch["audio"])), v(batch["visual"])),
                    (0, 1): (a(batch["audio"]), v(batch["visual"]))}
        for s, (fa, fv) in outs.items():
            logits = fa @ W[:, :da].T + fv @ W[:, da:].T + b  # official ConcatFusion: fc([a; v])
            assert torch.equal(got[s], logits.argmax(1) == batch["label"]), s


# (b) the training step -----------------------------------------------------------------------------------------
def _forced(method_cls, params, phi):
    m = method_cls(params, tiny_spec(phi.shape[1]))
    m.shapley = lambda model, batch, ctx: phi  # a fixed valuation, so the copies are known
    return m


@pytest.mark.parametrize("reduction", ["batch", "mean"])
def test_sample_step_gradient_equals_hand_built_batch(reduction):
    spec = tiny_spec(2)
    torch.manual_seed(0)
    state = _model(spec).state_dict()
    batch = make_batch(spec, 6, seed=4)
    phi = torch.tensor([[-0.5, 1.0], [0.0, 0.5], [1.5, 1.5], [0.5, -0.5], [1.0, 0.0], [0.5, 0.5]])
    method = _forced(SampleValuation, SampleValuationParams(warmup_epochs=2, reduction=reduction), phi)
    g, terms, ctx = _grads_after_step(method, _model(spec, state), batch, epoch=2)
    assert ctx.log["copies_audio"][0].item() == 3 + 2 + 0 + 1 + 0 + 1
    assert ctx.log["copies_visual"][0].item() == 0 + 1 + 0 + 3 + 2 + 1
    # hand: originals, then for each sample, each modality, `copies` rows keeping that modality only
    table = {-0.5: 3, 0.0: 2, 0.5: 1, 1.0: 0, 1.5: 0}
    rows, keep_a, keep_v = list(range(6)), [1.0] * 6, [1.0] * 6
    for i in range(6):
        for j in range(2):
            for _ in range(table[float(phi[i, j])]):
                rows.append(i)
                keep_a.append(1.0 if j == 0 else 0.0)
                keep_v.append(1.0 if j == 1 else 0.0)
    model = _model(spec, state)
    big = {k: batch[k][torch.tensor(rows)] for k in ("audio", "visual", "label")}
    fa, fv = model.encoders["audio"](big["audio"]), model.encoders["visual"](big["visual"])
    fused = model.fusion.fc(torch.cat([fa * torch.tensor(keep_a)[:, None], fv * torch.tensor(keep_v)[:, None]], 1))
    ce = F.cross_entropy(fused, big["label"], reduction="none")
    denom = 6 if reduction == "batch" else len(rows)
    (ce.sum() / denom).backward()
    assert terms["task"].item() == pytest.approx(ce[:6].sum().item() / denom, rel=1e-5)
    assert terms["resample"].item() == pytest.approx(ce[6:].sum().item() / denom, rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("fusion", ["late", "concat"])
def test_audio_copies_train_only_audio_encoder_and_head(fusion):
    """Copies keeping audio only: the copies' loss has no path to the visual encoder (its grads are the
    originals' grads) nor to the visual weights of the head; the audio encoder gets extra gradient."""
    spec = tiny_spec(2)
    torch.manual_seed(0)
    state = _model(spec, fusion=fusion).state_dict()
    batch = make_batch(spec, 6, seed=5)
    phi = torch.tensor([[-0.5, 1.0]] * 6)  # 3 audio-only copies of every sample, none for visual
    method = _forced(SampleValuation, SampleValuationParams(warmup_epochs=0), phi)
    g, _, _ = _grads_after_step(method, _model(spec, state, fusion), batch, epoch=0)
    model = _model(spec, state, fusion)  # the originals' term alone, in the same extended forward
    out, y = method.extended_forward(model, batch, torch.arange(6).repeat_interleave(3),
                                     torch.zeros(18, dtype=torch.long))
    (F.cross_entropy(out.fused, y, reduction="none")[:6].sum() / 6).backward()
    orig = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n in orig:
        if n.startswith("encoders.visual"):
            torch.testing.assert_close(g[n], orig[n], rtol=1e-5, atol=1e-7, msg=n)
    assert any((g[n] - orig[n]).abs().max() > 1e-4 for n in orig if n.startswith("encoders.audio"))
    if fusion == "concat":
        dv = model.encoders["audio"].out_dim
        torch.testing.assert_close(g["fusion.fc.weight"][:, dv:], orig["fusion.fc.weight"][:, dv:])
        assert (g["fusion.fc.weight"][:, :dv] - orig["fusion.fc.weight"][:, :dv]).abs().max() > 1e-4
    else:
        torch.testing.assert_close(g["fusion.heads.visual.weight"], orig["fusion.heads.visual.weight"])
        assert (g["fusion.heads.audio.weight"] - orig["fusion.heads.audio.weight"]).abs().max() > 1e-4


def test_warmup_and_no_copies_are_joint_train_bitwise():
    spec = tiny_spec(2)
    torch.manual_seed(0)
    state = _model(spec).state_dict()
    batch = make_batch(spec, 6, seed=6)
    joint, _, _ = _grads_after_step(Joint(None, spec), _model(spec, state), batch, epoch=0)
    for method, epoch in ((SampleValuation(SampleValuationParams(warmup_epochs=3), spec), 2),
                          (_forced(SampleValuation, SampleValuationParams(warmup_epochs=0),
                                   torch.tensor([[1.0, 1.5]] * 6)), 0),  # phi >= 1: no copy
                          (ModalityValuation(ModalityValuationParams(warmup_epochs=3), spec), 1)):
        g, terms, _ = _grads_after_step(method, _model(spec, state), batch, epoch)
        assert set(terms) == {"loss", "task"}
        assert all(torch.equal(g[n], joint[n]) for n in joint)


# (c) modality level: dataset-level contribution from the previous epoch, copies, state -------------------------
def test_modality_level_contribution_copies_and_resume():
    spec = tiny_spec(2)
    torch.manual_seed(0)
    state = _model(spec).state_dict()
    p = ModalityValuationParams(warmup_epochs=2, alpha=1.0, part_ratio=0.5)
    g = torch.Generator().manual_seed(7)
    batches = [make_batch(spec, 8, seed=20 + i) for i in range(3)]
    phis = [torch.randint(-1, 4, (8, 2), generator=g).float() / 2 for _ in range(3)]  # in {-0.5 .. 1.5}

    def make():
        m = ModalityValuation(p, spec)
        m.shapley = lambda model, batch, ctx: m._phi[batch["index"]]  # fixed per-sample valuation
        return m

    seen = []
    method = make()
    model = _model(spec, state)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.manual_seed(11)
    picks = []
    for epoch in (0, 1):  # epoch 0: joint, nothing valued; epoch 1 (= warmup - 1): valued, no copies
        ctx = _ctx(spec, epoch, opt)
        method.on_epoch_start(model, ctx)
        for b, ph in zip(batches, phis):
            method._phi = ph
            rng = torch.get_rng_state()
            terms = method.train_step(model, b, opt, ctx)
            if epoch == 1:  # replay the method's draw of Z
                after = torch.get_rng_state()
                torch.set_rng_state(rng)
                picks.append((torch.rand(8) < 0.5, ph))
                torch.set_rng_state(after)
            assert set(terms) == {"loss", "task"}
    assert method.sums is not None and method.count == sum(int(k.sum()) for k, _ in picks)
    ckpt = copy.deepcopy({"method": method.state_dict(), "model": model.state_dict(), "opt": opt.state_dict(),
                          "rng": torch.get_rng_state()})

    def epoch2(method, model, opt):
        ctx = _ctx(spec, 2, opt)
        method.on_epoch_start(model, ctx)
        orig = method.step_with_copies

        def spy(model_, batch_, opt_, ctx_, rows, alone):
            seen.append((rows.clone(), alone.clone()))
            return orig(model_, batch_, opt_, ctx_, rows, alone)
        method.step_with_copies = spy
        for b, ph in zip(batches, phis):
            method._phi = ph
            method.train_step(model, b, opt, ctx)
        return ctx

    ctx = epoch2(method, model, opt)
    hand = sum(ph[k].sum(0) for k, ph in picks) / sum(int(k.sum()) for k, _ in picks)  # (MC) mean over Z
    c = [ctx.log["c_audio"][0], ctx.log["c_visual"][0]]
    assert c == pytest.approx(hand.tolist())
    gap = [1 - c[0], 1 - c[1]]
    d = abs(gap[0] - gap[1]) * 2 / 3
    assert ctx.log["resample_ratio"][0] == pytest.approx(d)
    for rows, alone in seen:
        assert rows.numel() in (math.floor(d * 8), math.floor(d * 8) + 1)
        assert (alone == (0 if gap[0] > gap[1] else 1)).all()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    # resume: fresh objects from the checkpoint give the identical epoch 2
    method2, model2 = make(), _model(spec)
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    opt2.load_state_dict(ckpt["opt"])
    method2.load_state_dict(ckpt["method"])
    torch.set_rng_state(ckpt["rng"])
    epoch2(method2, model2, opt2)
    assert all(torch.equal(first[k], v) for k, v in model2.state_dict().items())


# (d) k = 3, regression, options ------------------------------------------------------------------------------
def test_three_modalities_copies_each_keep_one_modality():
    spec = tiny_spec(3)
    torch.manual_seed(0)
    model = _model(spec, fusion="late")
    batch = make_batch(spec, 6, seed=8)
    method = SampleValuation(SampleValuationParams(warmup_epochs=0), spec)
    phi = method.shapley(model, batch, _ctx(spec, 0))
    assert phi.shape == (6, 3)
    n = sample_copies(phi)
    seen = {}
    orig = method.extended_forward

    def spy(model_, batch_, rows, alone):
        seen["rows"], seen["alone"] = rows, alone
        return orig(model_, batch_, rows, alone)
    method.extended_forward = spy
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ctx = _ctx(spec, 0, opt)
    method.train_step(model, batch, opt, ctx)
    for j, m in enumerate(spec.modality_names):
        assert int((seen["alone"] == j).sum()) == int(n[:, j].sum()) == ctx.log[f"copies_{m}"][0].item()
        for i in range(6):
            assert int(((seen["rows"] == i) & (seen["alone"] == j)).sum()) == int(n[i, j])


def test_regression_and_bad_options_refused():
    reg = tiny_spec(2, task="regression")
    for cls, P in ((SampleValuation, SampleValuationParams), (ModalityValuation, ModalityValuationParams)):
        with pytest.raises(ValueError, match="regression"):
            cls(P(), reg)
        for bad in ({"value": "count"}, {"drop": "none"}, {"reduction": "sum"}, {"warmup_epochs": -1}):
            with pytest.raises(ValueError, match=next(iter(bad))):
                cls(P(**bad), tiny_spec(2))
    with pytest.raises(ValueError, match="part_ratio"):
        ModalityValuation(ModalityValuationParams(part_ratio=0.0), tiny_spec(2))
    with pytest.raises(ValueError, match="func"):
        ModalityValuation(ModalityValuationParams(func="cubic"), tiny_spec(2))
