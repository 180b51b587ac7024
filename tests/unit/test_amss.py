"""AMSS / AMSS+ (baselines/amss.py): hand-computed significance and keep ratios, masks, what they touch, k = 3."""
from __future__ import annotations

import math

import pytest
import torch

from baselines.amss import (AMSS, AMSSParams, AMSSPlus, AMSSPlusParams, channel_importance, keep_ratios,
                            label_entropy, masked_params, sample_mask, significance)
from g2d.methods.base import Context
from g2d.methods.joint import Joint
from g2d.models.model import MultimodalModel
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _softmax(row):
    mx = max(row)
    e = [math.exp(v - mx) for v in row]
    return [v / sum(e) for v in e]


def _hand_rho(logits, feats, y, offset=0.5, T=0.2, hy="entropy"):
    """train_test.py l.38-97 written out with math (k modalities: train_nv.py l.82-88's 1 - softmax)."""
    ys = y.tolist()
    counts = [ys.count(k) for k in range(max(ys) + 1)]
    pi = [c / len(ys) for c in counts]
    if hy == "entropy":
        h_y = -sum(p * math.log(p) for p in pi if p > 0)
    else:  # CE(pi, pi) = -sum pi_k log softmax(pi)_k
        h_y = -sum(p * math.log(s) for p, s in zip(pi, _softmax(pi)))
    nums, dens = [], []
    for lg, z in zip(logits, feats):
        score = sum(math.log(_softmax(row)[t]) for row, t in zip(lg.double().tolist(), ys)) / len(ys)
        ent = [-sum(p * math.log(p) for p in _softmax(row) if p > 0) for row in z.double().tolist()]
        nums.append(score + h_y + offset)
        dens.append(sum(ent) / len(ent))
    r = [n / d for n, d in zip(nums, dens)]
    if any(n <= 0 for n in nums):
        return r, [0.5] * len(r)
    e = [math.exp(v / T) for v in r]
    return r, [min(0.9, max(0.1, 1 - v / sum(e))) for v in e]


# (a) defining computations against hand computation ------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("hy", ["entropy", "av_code"])
def test_significance_and_keep_ratios_by_hand(k, hy):
    g = torch.Generator().manual_seed(k)
    for trial in range(30):
        b, c = 12, 5
        y = torch.randint(0, c, (b,), generator=g)
        logits = [torch.randn(b, c, generator=g) * (0.3 + trial / 10) for _ in range(k)]
        feats = [torch.rand(b, 16, generator=g) * 3 for _ in range(k)]
        offset = 0.5 if trial % 3 else -2.0  # -2 closes the gate in some trials
        r, gate = significance(logits, feats, y, offset, hy)
        rho = keep_ratios(r, gate, 0.2)
        r_exp, rho_exp = _hand_rho(logits, feats, y, offset, 0.2, hy)
        torch.testing.assert_close(r.double(), torch.tensor(r_exp, dtype=torch.float64), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rho.double(), torch.tensor(rho_exp, dtype=torch.float64), rtol=1e-5, atol=1e-5)
        if k == 2 and gate:  # the script's coeff_a = e^{t_v} / (e^{t_a} + e^{t_v}): the stronger keeps fewer
            assert (rho[0] <= rho[1]) == (r[0] >= r[1])


def test_label_entropy_forms():
    y = torch.tensor([0, 0, 1, 3])
    assert label_entropy(y).item() == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), rel=1e-6)
    pi = [0.5, 0.25, 0.0, 0.25]
    sm = _softmax(pi)
    assert label_entropy(y, "av_code").item() == pytest.approx(-sum(p * math.log(s) for p, s in zip(pi, sm)),
                                                               rel=1e-6)


def test_importance_forms_by_hand():
    g = torch.Generator().manual_seed(0)
    grad, w = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    gn = [sum(v * v for v in grad[j].flatten().tolist()) for j in range(3)]
    wn = [sum(v * v for v in w[j].flatten().tolist()) for j in range(3)]
    torch.testing.assert_close(channel_importance(grad, w, "gn"), torch.tensor(gn))
    torch.testing.assert_close(channel_importance(grad, w, "gn_wn"), torch.tensor([a / b for a, b in zip(gn, wn)]))
    torch.testing.assert_close(channel_importance(grad, w, "sqrt_gn"), torch.tensor([math.sqrt(a) for a in gn]))


def test_sample_mask_count_topk_and_unbiased_weight():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        n = int(torch.randint(1, 40, (1,), generator=g))
        imp = torch.rand(n, generator=g) + 1e-3
        rho = float(torch.rand(1, generator=g)) * 0.8 + 0.1
        n_keep = math.ceil(n * rho)
        m = sample_mask(imp, rho, "adaptive", False)
        assert int((m != 0).sum()) == n_keep and set(m.unique().tolist()) <= {0.0, 1.0}
        mp = sample_mask(imp, rho, "adaptive", True)
        kept = (mp != 0).nonzero().flatten().tolist()
        assert len(kept) == n_keep
        q = [v / sum(imp.tolist()) for v in imp.tolist()]
        for j in kept:  # (U): 1 / (q_j + 1/N)
            assert mp[j].item() == pytest.approx(1 / (q[j] + 1 / n), rel=1e-5)
        top = sorted(range(n), key=lambda j: -imp[j].item())[:n_keep]
        assert sorted((sample_mask(imp, rho, "topk").nonzero().flatten().tolist())) == sorted(top)
        assert int((sample_mask(imp, rho, "random") != 0).sum()) == n_keep


def test_adaptive_draw_frequencies_follow_importance():
    """n_keep = 1: channel j is drawn with probability q_j = g_j / sum g."""
    torch.manual_seed(0)
    imp = torch.tensor([1.0, 2.0, 3.0, 4.0])
    counts = torch.zeros(4)
    for _ in range(4000):
        counts += sample_mask(imp, 0.1, "adaptive")  # ceil(4 * 0.1) = 1
    torch.testing.assert_close(counts / 4000, imp / imp.sum(), atol=0.025, rtol=0)


def test_zero_importance_fallback():
    torch.manual_seed(0)
    imp = torch.tensor([0.0, 5.0, 0.0, 0.0, 1.0, 0.0])
    m = sample_mask(imp, 0.9, "adaptive")  # ceil(5.4) = 6 > 2 positive: both positive kept + 4 zeros
    assert m[1] == 1 and m[4] == 1 and int((m != 0).sum()) == 6
    assert int((sample_mask(torch.zeros(5), 0.5, "adaptive") != 0).sum()) == 3


# (b) what the masks touch ------------------------------------------------------------------------------------------

def _grads(method_cls, params, spec, fusion="late", seed=0):
    torch.manual_seed(seed)
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = make_batch(spec, 8, seed=1)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=2)
    ref = MultimodalModel(spec, tiny_model_cfg(fusion))
    ref.load_state_dict(state)
    joint = Joint(Joint.Params(), spec)
    out = ref(batch)
    sum(joint.loss(batch, out, ctx).values()).backward()
    method = method_cls(params, spec)
    method.setup(model, ctx)
    out = model(batch)
    sum(method.loss(batch, out, ctx).values()).backward()
    mods = spec.modality_names
    rho = keep_ratios(*significance([out.logits[m].detach() for m in mods], [out.features[m].detach() for m in mods],
                                    batch["label"], params.offset, params.hy), params.temperature)
    method.after_backward(model, ctx)
    g_ref = {n: p.grad.clone() for n, p in ref.named_parameters()}
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    return method, model, g, g_ref, rho


@pytest.mark.parametrize("cls,params", [(AMSS, AMSSParams()), (AMSSPlus, AMSSPlusParams())])
def test_masks_touch_only_block_convs(cls, params):
    spec = tiny_spec(2)
    method, model, g, g_ref, rho = _grads(cls, params, spec)
    masked = {id(p) for ps in method._groups.values() for p in ps}
    names = {n for n, p in model.named_parameters() if id(p) in masked}
    assert names == {f"encoders.{m}.layers.{i}.conv{j}.weight" for m in spec.modality_names for i in (0, 1)
                     for j in (1, 2)}  # the stem, shortcut convs, BN and the heads are not masked
    for n, p in model.named_parameters():
        if n not in names:
            assert torch.equal(g[n], g_ref[n]), n  # identical to Joint-Train
            continue
        m = n.split(".")[1]
        i = spec.modality_names.index(m)
        N = p.shape[0]
        ref = g_ref[n].flatten(1)
        got = g[n].flatten(1)
        imp = [sum(v * v for v in ref[j].tolist()) for j in range(N)]
        kept = [j for j in range(N) if got[j].abs().sum() > 0]
        assert len(kept) == math.ceil(N * rho[i].item()), n
        for j in range(N):
            if j not in kept:
                assert torch.all(got[j] == 0)
            elif params.unbiased:
                w = 1 / (imp[j] / sum(imp) + 1 / N)
                torch.testing.assert_close(got[j], ref[j] * w, rtol=1e-5, atol=1e-7)
            else:
                assert torch.equal(got[j], ref[j])


def test_mask_head_concat_rows_and_bias_untouched():
    spec = tiny_spec(2)
    method, model, g, g_ref, rho = _grads(AMSS, AMSSParams(mask_head=True), spec, fusion="concat")
    assert torch.equal(g["fusion.fc.bias"], g_ref["fusion.fc.bias"])
    start = 0
    for i, m in enumerate(spec.modality_names):
        d = model.fusion.dims[m]
        blk, ref = g["fusion.fc.weight"][:, start:start + d], g_ref["fusion.fc.weight"][:, start:start + d]
        for row, row_ref in zip(blk, ref):
            kept = row != 0
            assert int(kept.sum()) == math.ceil(d * rho[i].item())
            assert torch.equal(row[kept], row_ref[kept])
        start += d


def test_mask_head_refuses_film():
    spec = tiny_spec(2)
    model = MultimodalModel(spec, tiny_model_cfg("film"))
    with pytest.raises(ValueError, match="mask_head"):
        AMSS(AMSSParams(mask_head=True), spec).setup(model, Context(spec=spec, device=torch.device("cpu"), epochs=1))


# (c) k = 3, regression, determinism ---------------------------------------------------------------------------------

def test_three_modalities_sequence_falls_back_to_conv():
    spec = tiny_spec(3)
    method, model, g, g_ref, rho = _grads(AMSS, AMSSParams(), spec)
    assert rho.shape == (3,)
    text = masked_params(model.encoders["text"], "blocks")
    assert [p.dim() for p in text] == [3]  # the Conv1d kernel
    N = text[0].shape[0]
    kept = int((g["encoders.text.conv.weight"].flatten(1).abs().sum(1) > 0).sum())
    assert kept == math.ceil(N * rho[2].item())
    assert torch.equal(g["encoders.text.proj.0.weight"], g_ref["encoders.text.proj.0.weight"])


def test_regression_refused():
    with pytest.raises(ValueError, match="regression"):
        AMSS(AMSSParams(), tiny_spec(2, task="regression"))


def test_same_rng_state_same_masks():
    """No method state: the masks depend on the torch RNG only (which the trainer checkpoints)."""
    spec = tiny_spec(2)
    a = _grads(AMSSPlus, AMSSPlusParams(), spec, seed=5)[2]
    b = _grads(AMSSPlus, AMSSPlusParams(), spec, seed=5)[2]
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert AMSS(AMSSParams(), spec).state_dict() == {}
