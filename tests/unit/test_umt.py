"""UMT: distillation term, frozen teachers, lambda=0 == joint. UME: teacher-average prediction, independence."""
import copy

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec

from baselines.umt import UME, UMT, UMEParams, UMTParams, distill_loss
from g2d.methods.base import Context, task_loss
from g2d.methods.joint import Joint
from g2d.models.model import MultimodalModel

torch.set_num_threads(1)


def _teachers(spec, seed=1, train_mode=False):
    torch.manual_seed(seed)
    ts = {}
    for m in spec.modality_names:
        t = MultimodalModel(spec, tiny_model_cfg(), (m,))
        t.train(train_mode)
        ts[m] = t
    return ts


def _ctx(spec, teachers=None):
    return Context(spec=spec, device=torch.device("cpu"), epochs=1, teachers=teachers or {})


def test_distill_loss_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 9, generator=g, requires_grad=True), torch.randn(6, 9, generator=g)
    assert torch.allclose(distill_loss(s, t), ((s - t) ** 2).sum() / s.numel())


@pytest.mark.parametrize("n", [2, 3])
def test_umt_loss_terms_equal_hand_computation(n):
    spec = tiny_spec(n)
    teachers = _teachers(spec)
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg())
    method, ctx = UMT(UMTParams(weight=3.0), spec), _ctx(spec, teachers)
    method.setup(model, ctx)
    batch = make_batch(spec, 8)
    out = model(batch)
    terms = method.loss(batch, out, ctx)
    assert torch.allclose(terms["task"], F.cross_entropy(out.fused, batch["label"]))
    for m in spec.modality_names:
        with torch.no_grad():
            h_t = teachers[m](batch).features[m]
        expect = 3.0 * ((out.features[m] - h_t) ** 2).mean()
        assert torch.allclose(terms[f"distill_{m}"], expect)
    assert set(terms) == {"task", *(f"distill_{m}" for m in spec.modality_names)}


def test_umt_teachers_frozen_and_unchanged_student_moves():
    spec = tiny_spec(2)
    teachers = _teachers(spec, train_mode=True)  # setup must put them in eval mode (frozen BN stats)
    before = {m: copy.deepcopy(t.state_dict()) for m, t in teachers.items()}
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg())
    student_before = copy.deepcopy(model.state_dict())
    method, ctx = UMT(UMTParams(), spec), _ctx(spec, teachers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method.setup(model, ctx)
    for step in range(2):
        ctx.step = step
        method.train_step(model, make_batch(spec, 8, seed=step), opt, ctx)
    for m, t in teachers.items():
        assert not t.training
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())
        for k, v in t.state_dict().items():  # parameters and BN buffers, bitwise
            assert torch.equal(v, before[m][k]), f"teacher {m} {k} changed"
    assert any(not torch.equal(v, student_before[k]) for k, v in model.state_dict().items())


def test_umt_distillation_zero_when_student_is_teacher():
    spec = tiny_spec(2)
    teachers = _teachers(spec)
    model = MultimodalModel(spec, tiny_model_cfg())
    for m in spec.modality_names:
        model.encoders[m].load_state_dict(teachers[m].encoders[m].state_dict())
    model.eval()  # same BN mode as the teachers, so features coincide
    method, ctx = UMT(UMTParams(), spec), _ctx(spec, teachers)
    batch = make_batch(spec, 8)
    terms = method.loss(batch, model(batch), ctx)
    for m in spec.modality_names:
        assert float(terms[f"distill_{m}"].detach()) == 0.0


def test_umt_lambda_zero_equals_joint():
    spec = tiny_spec(2)
    torch.manual_seed(0)
    a = MultimodalModel(spec, tiny_model_cfg())
    b = copy.deepcopy(a)
    oa, ob = (torch.optim.SGD(x.parameters(), lr=0.1, momentum=0.9) for x in (a, b))
    umt, joint = UMT(UMTParams(weight=0.0), spec), Joint(None, spec)
    ctx_u, ctx_j = _ctx(spec, _teachers(spec)), _ctx(spec)
    for step in range(2):
        batch = make_batch(spec, 8, seed=step)
        umt.train_step(a, batch, oa, ctx_u)
        joint.train_step(b, batch, ob, ctx_j)
    for (k, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), k


def test_umt_setup_errors():
    spec = tiny_spec(2)
    model = MultimodalModel(spec, tiny_model_cfg())
    with pytest.raises(RuntimeError, match="no teacher"):
        UMT(UMTParams(), spec).setup(model, _ctx(spec, {"audio": _teachers(spec)["audio"]}))
    wide = copy.deepcopy(tiny_model_cfg())
    wide.resnet.width = 8
    bad = {m: MultimodalModel(spec, wide, (m,)) for m in spec.modality_names}
    with pytest.raises(ValueError, match="feature width"):
        UMT(UMTParams(), spec).setup(model, _ctx(spec, bad))


def _unimodal_copy(model, spec, m):
    """A stand-alone unimodal model (a 'teacher') holding the UME model's encoder+head for m."""
    uni = MultimodalModel(spec, tiny_model_cfg(), (m,))
    uni.encoders[m].load_state_dict(model.encoders[m].state_dict())
    uni.fusion.heads[m].load_state_dict(model.fusion.heads[m].state_dict())
    return uni.eval()


@pytest.mark.parametrize("n,combine", [(2, "logits"), (3, "logits"), (2, "probs")])
def test_ume_predict_equals_teacher_average(n, combine):
    spec = tiny_spec(n)
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg())
    method, ctx = UME(UMEParams(combine=combine), spec), _ctx(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method.setup(model, ctx)
    method.train_step(model, make_batch(spec, 8), opt, ctx)
    model.eval()
    batch = make_batch(spec, 5, seed=3)
    with torch.no_grad():
        pred = method.predict(model(batch))
        zs = [_unimodal_copy(model, spec, m)(batch).fused for m in spec.modality_names]
    if combine == "probs":
        zs = [z.softmax(-1) for z in zs]
    assert torch.allclose(pred, sum(zs) / n, atol=1e-6)


def test_ume_trains_each_modality_as_an_independent_unimodal_model():
    spec = tiny_spec(2)
    torch.manual_seed(0)
    model = MultimodalModel(spec, tiny_model_cfg())
    uni = {m: _unimodal_copy(model, spec, m).train() for m in spec.modality_names}
    method, ctx = UME(UMEParams(), spec), _ctx(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    uopt = {m: torch.optim.SGD(u.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3) for m, u in uni.items()}
    for step in range(2):
        batch = make_batch(spec, 8, seed=step)
        terms = method.train_step(model, batch, opt, ctx)
        for m, u in uni.items():  # each teacher alone, plain task loss on its own prediction
            uopt[m].zero_grad()
            task_loss(spec, u(batch).fused, batch["label"]).backward()
            uopt[m].step()
    assert set(terms) == {"loss", "uni_audio", "uni_visual"}
    for m, u in uni.items():
        for k, v in u.encoders[m].state_dict().items():
            assert torch.allclose(v, model.encoders[m].state_dict()[k], atol=1e-6), (m, k)
        for k, v in u.fusion.heads[m].state_dict().items():
            assert torch.allclose(v, model.fusion.heads[m].state_dict()[k], atol=1e-6), (m, k)


def test_ume_rejects_shared_heads_and_bad_params():
    spec = tiny_spec(2)
    with pytest.raises(ValueError, match="late or sum"):
        UME(UMEParams(), spec).setup(MultimodalModel(spec, tiny_model_cfg("concat")), _ctx(spec))
    with pytest.raises(ValueError, match="combine"):
        UME(UMEParams(combine="vote"), spec)
    with pytest.raises(ValueError, match="classification"):
        UME(UMEParams(combine="probs"), tiny_spec(2, task="regression"))
