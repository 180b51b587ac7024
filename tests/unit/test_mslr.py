"""MSLR (baselines/mslr.py): exact per-modality learning rates, the code's gradient scaling, the (L3) ratio."""
from __future__ import annotations

import copy

import pytest
import torch

from baselines.mslr import MSLR, MSLRParams, modality_groups, update_ratio
from g2d.methods.base import Context, task_loss
from g2d.methods.joint import Joint  # noqa: F401 - registers joint
from g2d.models.model import MultimodalModel, Output
from g2d import registry
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec

LR, MOM, WD = 0.05, 0.9, 1e-2


def _model(spec, fusion="late", seed=0):
    torch.manual_seed(seed)
    return MultimodalModel(spec, tiny_model_cfg(fusion))


def _opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=MOM, weight_decay=WD)
    if kind == "adam":
        return torch.optim.Adam(params, lr=LR, weight_decay=WD)
    return torch.optim.AdamW(params, lr=LR, weight_decay=WD)


def _ctx(spec, opt, epoch=0):
    return Context(spec=spec, device=torch.device("cpu"), epochs=3, epoch=epoch, optimizer=opt)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_lr_mode_is_an_optimizer_with_per_modality_learning_rates(kind):
    """apply=lr == the same optimizer with a parameter group per modality at lr c_m * eta (several steps, so
    the momentum buffer / Adam moments matter), for SGD+momentum+wd, Adam and AdamW. In float64: in float32 the
    lerp's rounding can flip the sign of a near-zero gradient element, which Adam turns into a +-lr step (the
    full suite hit it once, with another thread count)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _lr_mode_equals_param_groups(kind)
    finally:
        torch.set_default_dtype(old)


def _lr_mode_equals_param_groups(kind):
    spec = tiny_spec(2)
    coeffs = {"audio": 0.5, "visual": 2.0}
    a, b = _model(spec), _model(spec)
    method = MSLR(MSLRParams(coeffs=coeffs, apply="lr"), spec)
    opt_a = _opt(kind, a.parameters())
    ctx = _ctx(spec, opt_a)
    method.setup(a, ctx)
    # reference: explicit param groups (encoder + own late head of each modality)
    groups = [{"params": list(b.encoders["audio"].parameters()) + list(b.fusion.heads["audio"].parameters()),
               "lr": 0.5 * LR},
              {"params": list(b.encoders["visual"].parameters()) + list(b.fusion.heads["visual"].parameters()),
               "lr": 2.0 * LR}]
    assert sum(len(g["params"]) for g in groups) == len(list(b.parameters()))
    opt_b = _opt(kind, groups)
    for step in range(4):
        batch = make_batch(spec, seed=step)
        torch.manual_seed(100 + step)
        method.train_step(a, batch, opt_a, ctx)
        torch.manual_seed(100 + step)
        opt_b.zero_grad()
        task_loss(spec, b(batch).fused, batch["label"]).backward()  # the same (float32) loss as the method
        opt_b.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.dtype == torch.float64 and torch.allclose(pa, pb, rtol=1e-9, atol=1e-12), (n, float((pa - pb).abs().max()))
    moved = [(pa - p0).abs().max() for pa, p0 in zip(a.parameters(), _model(spec).parameters())]
    assert max(moved) > 1e-3  # the comparison is not vacuous


def test_grad_mode_scales_exactly_each_modalitys_gradients():
    """apply=grad (the code): after after_backward, audio encoder + audio head grads = 0.9 x Joint-Train's,
    visual = 1.1 x; under concat fusion the shared head is Joint-Train's, untouched."""
    spec = tiny_spec(2)
    batch = make_batch(spec)
    for fusion, shared in (("late", []), ("concat", ["fusion.fc.weight", "fusion.fc.bias"])):
        a, j = _model(spec, fusion), _model(spec, fusion)
        method = MSLR(MSLRParams(coeffs={"audio": 0.9, "visual": 1.1}, apply="grad"), spec)
        ctx = _ctx(spec, None)
        method.setup(a, ctx)
        torch.manual_seed(1)
        sum(method.loss(batch, a(batch), ctx).values()).backward()
        method.after_backward(a, ctx)
        torch.manual_seed(1)
        torch.nn.functional.cross_entropy(j(batch).fused, batch["label"]).backward()
        ref = dict(j.named_parameters())
        for n, p in a.named_parameters():
            if n in shared:
                k = 1.0
            else:
                k = 0.9 if ".audio" in n else 1.1 if ".visual" in n else None
            assert k is not None, n
            assert torch.allclose(p.grad, k * ref[n].grad, rtol=1e-6, atol=1e-9), (fusion, n)
        assert abs(ctx.log["lr_coef_audio"][0] - 0.9) < 1e-12


def test_modality_groups_partition_and_shared_heads():
    spec = tiny_spec(3)
    late = _model(spec, "late")
    g = modality_groups(late)
    ids = [id(p) for ps in g.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(late.parameters()))  # late: every parameter is one modality's
    concat = _model(spec, "concat")
    g = modality_groups(concat)
    for m, ps in g.items():
        assert {id(p) for p in ps} == {id(p) for p in concat.encoders[m].parameters()}  # fc shared: left out


def test_update_ratio_matches_a_hand_computation():
    accs = [40.0, 50.0, 45.0, 55.0, 60.0, 66.0, 30.0, 70.0]
    mem, r, got = [], 1.0, []
    for a in accs:
        r, mem = update_ratio(mem, a, r, 5)
        got.append(r)
    # by hand, the code's rule: r stays 1 for the first 5 epochs, then acc / mean(previous 5)
    hand = [1.0, 1.0, 1.0, 1.0, 1.0,
            66.0 / ((40 + 50 + 45 + 55 + 60) / 5),
            30.0 / ((50 + 45 + 55 + 60 + 66) / 5),
            70.0 / ((45 + 55 + 60 + 66 + 30) / 5)]
    assert got == pytest.approx(hand, rel=1e-12)
    assert mem == [55.0, 60.0, 66.0, 30.0, 70.0]


def test_train_ratio_uses_each_modalitys_training_accuracy():
    """ratio=train: epoch accuracies of out.logits[m] (by hand) drive (L3); k_m = c_m * r_m."""
    spec = tiny_spec(2, n_classes=3)
    method = MSLR(MSLRParams(coeffs={"audio": 2.0}, ratio="train", window=1), spec)
    y = torch.tensor([0, 1, 2, 0])
    la = torch.tensor([[5., 0, 0], [0, 5, 0], [0, 0, 5], [0, 5, 0]])  # 3/4 right
    lv = torch.tensor([[5., 0, 0], [5, 0, 0], [5, 0, 0], [5, 0, 0]])  # 2/4 right
    lv2 = torch.tensor([[5., 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]])  # 4/4 right
    batch = {"label": y}
    for epoch, (a, v) in enumerate([(la, lv), (la, lv2), (lv, lv2)]):
        method._roll(epoch)
        method.loss(batch, Output(features={}, logits={"audio": a, "visual": v}, fused=a + v), _ctx(spec, None, epoch))
    method._roll(3)
    # hand: audio accs 75, 75, 50 -> r = 75/75, then 50/75; visual 50, 100, 100 -> 100/50, then 100/100
    assert method.memory == {"audio": [50.0], "visual": [100.0]}
    assert method.ratio["audio"] == pytest.approx(50 / 75) and method.ratio["visual"] == pytest.approx(1.0)
    assert method.coefficients() == pytest.approx({"audio": 2.0 * 50 / 75, "visual": 1.0})


def test_val_ratio_follows_each_heads_validation_accuracy():
    """ratio=val (params.yaml's): on_epoch_end's acc_<m> drive (L3) by hand; k_m = c_m * r_m from the next epoch."""
    spec = tiny_spec(2)
    method = MSLR(MSLRParams(coeffs={"audio": 0.9, "visual": 1.1}, ratio="val", window=2), spec)
    ctx = _ctx(spec, None)
    accs = [(40.0, 20.0), (60.0, 30.0), (50.0, 45.0), (80.0, 30.0)]
    for e, (a, v) in enumerate(accs):
        ctx.epoch = e
        method.on_epoch_end(None, ctx, {"acc_audio": a, "acc_visual": v, "loss_audio": 9.0, "acc": 99.0})
    # hand: memories fill with epochs 0-1; epoch 2: r = 50/50, 45/25 -> mem [60,50], [30,45];
    # epoch 3: r = 80/55, 30/37.5
    assert method.ratio == pytest.approx({"audio": 80 / 55, "visual": 30 / 37.5})
    assert method.memory == {"audio": [50.0, 80.0], "visual": [45.0, 30.0]}
    assert method.coefficients() == pytest.approx({"audio": 0.9 * 80 / 55, "visual": 1.1 * 30 / 37.5})
    fixed = MSLR(MSLRParams(ratio="fixed"), spec)
    fixed.on_epoch_end(None, ctx, {"acc_audio": 1.0, "acc_visual": 2.0})
    assert fixed.ratio == {"audio": 1.0, "visual": 1.0} and fixed.memory == {"audio": [], "visual": []}


def _train(method, model, opt, spec, epochs, start=0):
    ctx = _ctx(spec, opt)
    method.setup(model, ctx)
    for e in range(start, start + epochs):
        ctx.epoch = e
        model.train()
        method.on_epoch_start(model, ctx)
        for s in range(3):
            torch.manual_seed(1000 * e + s)
            method.train_step(model, make_batch(spec, seed=10 * e + s), opt, ctx)


def test_outside_the_window_is_joint_train_bitwise():
    spec = tiny_spec(2)
    a, j = _model(spec), _model(spec)
    oa, oj = _opt("sgd", a.parameters()), _opt("sgd", j.parameters())
    _train(MSLR(MSLRParams(coeffs={"audio": 0.3, "visual": 3.0}, start_epoch=5, end_epoch=9), spec), a, oa, spec, 2)
    _train(registry.get_method("joint")(registry.get_method("joint").Params(), spec), j, oj, spec, 2)
    for pa, pj in zip(a.parameters(), j.parameters()):
        assert torch.equal(pa, pj)


def test_state_dict_round_trip_resumes_identically():
    spec = tiny_spec(2)
    params = MSLRParams(coeffs={"audio": 0.9, "visual": 1.1}, ratio="train", window=1)
    m1, model1 = MSLR(params, spec), _model(spec)
    opt1 = _opt("sgd", model1.parameters())
    _train(m1, model1, opt1, spec, 2)
    # checkpoint after epoch 1: model, optimizer, method state
    model2 = copy.deepcopy(model1)
    opt2 = _opt("sgd", model2.parameters())
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    m2 = MSLR(params, spec)
    m2.load_state_dict(copy.deepcopy(m1.state_dict()))
    assert m2.state_dict() == m1.state_dict()
    _train(m1, model1, opt1, spec, 2, start=2)
    _train(m2, model2, opt2, spec, 2, start=2)
    assert m1.ratio == m2.ratio and m1.ratio != {"audio": 1.0, "visual": 1.0}  # the ratio did move
    for p1, p2 in zip(model1.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)


def test_k3_and_regression_and_refusals():
    spec3 = tiny_spec(3)
    m = MSLR(MSLRParams(coeffs={"audio": 0.9, "visual": 1.4, "text": 0.7, "other_dataset_mod": 5.0}), spec3)
    assert m.coefficients() == {"audio": 0.9, "visual": 1.4, "text": 0.7}
    reg = tiny_spec(2, task="regression")
    m = MSLR(MSLRParams(coeffs={"audio": 0.5}, ratio="fixed"), reg)  # only learning rates: fine for regression
    model = _model(reg)
    _train(m, model, _opt("sgd", model.parameters()), reg, 1)
    for ratio in ("train", "val"):
        with pytest.raises(ValueError, match=r"ratio=.* needs accuracies: dataset .* is regression \(set datasets\."):
            MSLR(MSLRParams(ratio=ratio), reg)
    with pytest.raises(ValueError, match="apply"):
        MSLR(MSLRParams(apply="scale"), spec3)
    with pytest.raises(ValueError, match="coeffs"):
        MSLR(MSLRParams(coeffs={"audio": 0.0}), spec3)
