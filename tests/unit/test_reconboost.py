"""ReconBoost: reconcilement loss and its gradient, stage schedule, phase scopes, ensemble, state."""
import copy

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec

from baselines.reconboost import ReconBoost, ReconBoostParams, reconcile_loss
from g2d.methods.base import Context
from g2d.models.model import MultimodalModel

torch.set_num_threads(1)


def _setup(n=2, params=None, wd=0.0, seed=0):
    spec = tiny_spec(n)
    torch.manual_seed(seed)
    model = MultimodalModel(spec, tiny_model_cfg("late"))
    method = ReconBoost(params or ReconBoostParams(), spec)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=wd)
    ctx.optimizer = opt
    method.setup(model, ctx)
    return spec, model, method, ctx, opt


def test_reconcile_loss_matches_code_formula_and_gradient():
    g = torch.Generator().manual_seed(0)
    B, C, w1, w2, beta = 7, 5, 5.0, 1.0, 1.3
    logits = torch.randn(B, C, generator=g, requires_grad=True)
    others = torch.randn(B, C, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    loss, q_y = reconcile_loss(logits, others, y, w1, w2, beta)
    # official form: -w1 mean_c(y_c log p_c) + w2 mean_c(y_c q_c log p_c), averaged over the batch
    onehot = F.one_hot(y, C).float()
    logp = torch.log_softmax(logits, 1)
    q = torch.softmax(beta * others, 1)
    expect = (-w1 * (onehot * logp).mean(-1) + w2 * (onehot * q * logp).mean(-1)).mean()
    assert torch.allclose(loss, expect)
    assert torch.allclose(q_y, q[torch.arange(B), y])
    (grad,) = torch.autograd.grad(loss, logits)
    p = torch.softmax(logits, 1).detach()
    expect_grad = -(w1 - w2 * q_y[:, None]) * (onehot - p) / C / B  # spec §6.7
    assert torch.allclose(grad, expect_grad, atol=1e-7)


def test_reconcile_weight_shrinks_when_others_are_right():
    logits = torch.zeros(1, 3)
    y = torch.tensor([0])
    confident = torch.tensor([[10.0, 0, 0]])
    wrong = torch.tensor([[0, 10.0, 0]])
    assert reconcile_loss(logits, confident, y, 5, 1)[0] < reconcile_loss(logits, wrong, y, 5, 1)[0]


@pytest.mark.parametrize("n,boost,correct,expect", [
    (2, 1, 1, [(0, 1, "audio"), (0, 2, None), (1, 1, "visual"), (1, 2, None), (2, 1, "audio")]),
    (3, 2, 1, [(0, 1, "audio"), (0, 1, "audio"), (0, 2, None), (1, 1, "visual"), (1, 1, "visual"),
               (1, 2, None), (2, 1, "text"), (2, 1, "text"), (2, 2, None), (3, 1, "audio")]),
    (2, 1, 0, [(0, 1, "audio"), (1, 1, "visual"), (2, 1, "audio")]),
])
def test_schedule_alternates(n, boost, correct, expect):
    m = ReconBoost(ReconBoostParams(boost_epochs=boost, correct_epochs=correct), tiny_spec(n))
    assert [m.schedule(e) for e in range(len(expect))] == expect


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _changed(before, model, prefix):
    return [k for k, v in model.named_parameters() if k.startswith(prefix) and not torch.equal(v, before[k])]


@pytest.mark.parametrize("n", [2, 3])
def test_phase1_trains_only_the_active_learner(n):
    spec, model, method, ctx, opt = _setup(n, wd=1e-3)
    for epoch in (0, 2):  # stage 0 (audio) and stage 1 (visual) phase 1
        active = method.schedule(epoch)[2]
        ctx.epoch = epoch
        before, beta = _snapshot(model), method.beta.detach().clone()
        method.train_step(model, make_batch(spec, 8, seed=epoch), opt, ctx)
        for m in spec.modality_names:
            enc, head = _changed(before, model, f"encoders.{m}."), _changed(before, model, f"fusion.heads.{m}.")
            if m == active:
                assert enc and head
            else:
                assert not enc and not head, f"inactive {m} changed: {enc + head}"
        assert torch.equal(method.beta, beta)
        assert ctx.log["active"][-1] == spec.modality_names.index(active)


def test_phase2_trains_everything_and_beta():
    spec, model, method, ctx, opt = _setup(2)
    ctx.epoch = 1
    before, beta = _snapshot(model), method.beta.detach().clone()
    method.train_step(model, make_batch(spec, 8), opt, ctx)
    for m in spec.modality_names:
        assert _changed(before, model, f"encoders.{m}.") and _changed(before, model, f"fusion.heads.{m}.")
    assert not torch.equal(method.beta, beta)
    assert ctx.log["phase"] == [2] and ctx.log["active"] == [-1]


def test_phase2_loss_is_ce_of_ensemble():
    spec, model, method, ctx, opt = _setup(2)
    method.beta = torch.tensor(1.7, requires_grad=True)
    ref = copy.deepcopy(model)
    batch = make_batch(spec, 8)
    ctx.epoch = 1
    terms = method.train_step(model, batch, opt, ctx)
    out = ref(batch)
    expect = F.cross_entropy(1.7 * (out.logits["audio"] + out.logits["visual"]), batch["label"])
    assert torch.allclose(terms["rectify"], expect)


def test_predict_is_beta_times_sum():
    spec, model, method, _, _ = _setup(3)
    method.beta = torch.tensor(0.6)
    model.eval()
    with torch.no_grad():
        out = model(make_batch(spec, 5))
    expect = 0.6 * (out.logits["audio"] + out.logits["visual"] + out.logits["text"])
    assert torch.allclose(method.predict(out), expect)


def test_optimizer_momentum_restarts_at_each_phase():
    spec, model, method, ctx, opt = _setup(2)
    for epoch in (0, 0, 1):
        ctx.epoch = epoch
        method.train_step(model, make_batch(spec, 8, seed=epoch), opt, ctx)
    # first step of the new phase: a fresh SGD's momentum buffer equals the gradient (wd = 0)
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], p.grad)


def test_no_reset_keeps_momentum():
    spec, model, method, ctx, opt = _setup(2, ReconBoostParams(reset_optimizer=False))
    for epoch in (0, 1):
        ctx.epoch = epoch
        method.train_step(model, make_batch(spec, 8, seed=epoch), opt, ctx)
    p = next(iter(model.encoders["audio"].parameters()))
    assert not torch.equal(opt.state[p]["momentum_buffer"], p.grad)


def test_ga_term_only_when_enabled_and_has_gradient():
    spec, model, method, ctx, opt = _setup(2, ReconBoostParams(ga_weight=0.5))
    ctx.epoch = 2  # stage 1: GA against stage 0's learner
    terms = method.train_step(model, make_batch(spec, 8), opt, ctx)
    assert "ga" in terms and terms["ga"] > 0
    spec, model, method, ctx, opt = _setup(2)
    ctx.epoch = 2
    assert "ga" not in method.train_step(model, make_batch(spec, 8), opt, ctx)


def test_state_round_trip_reproduces_next_step():
    spec, model, method, ctx, opt = _setup(2)
    for epoch in (0, 1, 1):
        ctx.epoch = epoch
        method.train_step(model, make_batch(spec, 8, seed=epoch), opt, ctx)
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    m2 = ReconBoost(ReconBoostParams(), spec)
    state = method.state_dict()
    m2.load_state_dict(state)
    m2.setup(model2, ctx)
    batch = make_batch(spec, 8, seed=9)
    method.train_step(model, batch, opt, ctx)
    m2.train_step(model2, batch, opt2, ctx)
    assert torch.equal(method.beta, m2.beta)
    assert state["beta_opt"]["state"][0]["momentum_buffer"] is not None  # beta's momentum was saved
    for (k, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), k


def test_regression_rejected():
    with pytest.raises(ValueError, match="classification"):
        ReconBoost(ReconBoostParams(), tiny_spec(2, task="regression"))
