"""SMP plug-in: masks (strict / official scope), phases, ranking, ties, partial suppression."""
import copy
import math
from dataclasses import dataclass

import pytest
import torch
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec
from torch import nn

from g2d import config as C
from g2d import registry
from g2d.methods.base import Context
from g2d.methods.smp import phase_bounds, rank_modalities, smp_kappas
from g2d.models.model import MultimodalModel, Output

torch.set_num_threads(1)


class FakeTeacher(nn.Module):
    """Teacher whose true-class confidence is set by `scale` (logits = scale * one-hot(label))."""

    def __init__(self, m, n_classes, dim, scale):
        super().__init__()
        self.m, self.n, self.dim, self.scale = m, n_classes, dim, scale

    def forward(self, batch):
        y = batch["label"]
        logits = self.scale * nn.functional.one_hot(y, self.n).float()
        feats = torch.zeros(len(y), self.dim)
        return Output(features={self.m: feats}, logits={self.m: logits}, fused=logits)


def conf_of(scale, n):
    return math.exp(scale) / (math.exp(scale) + n - 1)


def setup(name="joint+smp", n_mod=2, scales=(0.5, 2.0), epochs=10, **params):
    torch.manual_seed(0)
    spec, cfg = tiny_spec(n_mod), tiny_model_cfg()
    model = MultimodalModel(spec, cfg)
    teachers = {m: FakeTeacher(m, spec.num_outputs, model.encoders[m].out_dim, s)
                for m, s in zip(spec.modality_names, scales)}
    cls = registry.get_method(name)
    method = cls(C._validate(C.OmegaConf.create(params), cls.Params, "test"), spec)
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=epochs, teachers=teachers)
    return spec, model, method, ctx


def bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def grads_of_plain_loss(model, base_name, spec, batch, ctx, eval_bn=()):
    """Gradients of the unmasked base loss on a copy of the model."""
    ref = copy.deepcopy(model)
    for m in eval_bn:
        for b in ref.encoders[m].modules():
            if isinstance(b, nn.BatchNorm2d):
                b.eval()
    base = registry.get_method(base_name)(registry.get_method(base_name).Params(), spec)
    terms = base.loss(batch, ref(batch), ctx)
    sum(terms.values()).backward()
    return {m: [p.grad.clone() for p in ps] for m, ps in ref.modality_parameters().items()}


@pytest.mark.parametrize("name", ["joint+smp", "g2d"])
def test_strict_scope_frozen_encoder_normalises_with_batch_statistics(name):
    """Phase-1 fused logits equal those of the model with every encoder in train mode (batch statistics),
    not the eval-mode output from never-updated running statistics (issue 10 item 3)."""
    spec, model, method, ctx = setup(name, scales=(0.5, 2.0), smp_scope="strict")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctx.epoch = 0  # phase 1: visual (higher teacher confidence) is frozen
    batch = make_batch(spec, seed=3)
    train_ref, eval_ref = copy.deepcopy(model), copy.deepcopy(model)
    for b in eval_ref.encoders["visual"].modules():
        if isinstance(b, nn.BatchNorm2d):
            b.eval()
    seen = []
    hook = model.fusion.register_forward_hook(lambda mod, inp, out: seen.append(out[0].detach().clone()))
    method.train_step(model, batch, opt, ctx)
    hook.remove()
    assert ctx.log["kappa_visual"][-1] == 0.0
    with torch.no_grad():
        want, wrong = train_ref(batch).fused, eval_ref(batch).fused
    assert not torch.allclose(want, wrong, atol=1e-3)  # the two readings really differ on this model
    torch.testing.assert_close(seen[0], want, rtol=0, atol=0)


@pytest.mark.parametrize("name,base", [("joint+smp", "joint"), ("g2d", "g2d-nosmp")])
@pytest.mark.parametrize("scales,frozen,live", [((0.5, 2.0), "visual", "audio"), ((2.0, 0.5), "audio", "visual")])
def test_strict_scope_freezes_suppressed_encoder(name, base, scales, frozen, live):
    spec, model, method, ctx = setup(name, scales=scales, smp_scope="strict")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    ctx.epoch = ctx.epochs - 1  # joint phase: warm-up step fills every momentum buffer
    warm = make_batch(spec, seed=1)  # kept alive: Context caches teacher outputs by id(batch)
    method.train_step(model, warm, opt, ctx)
    assert ctx.log[f"kappa_{frozen}"] == [1.0]
    enc = model.modality_parameters()
    assert all(torch.count_nonzero(opt.state[p]["momentum_buffer"]) > 0 for p in enc[frozen] if p.dim() == 4)

    ctx.epoch = 0  # phase 1: only the weakest (lower teacher confidence) trains
    batch = make_batch(spec, seed=2)
    before = {m: [p.detach().clone() for p in ps] for m, ps in enc.items()}
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in enc[frozen]]
    bn_before = bn_state(model.encoders[frozen])
    ref = grads_of_plain_loss(model, base, spec, batch, ctx)
    method.train_step(model, batch, opt, ctx)

    assert ctx.log[f"kappa_{frozen}"][-1] == 0.0 and ctx.log[f"kappa_{live}"][-1] == 1.0
    for p, b in zip(enc[frozen], before[frozen]):
        assert torch.equal(p, b)  # bit-identical despite momentum and weight decay
    for p, buf in zip(enc[frozen], bufs):
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)
    for k, v in bn_state(model.encoders[frozen]).items():
        assert torch.equal(v, bn_before[k]), k
    assert all(b.training for b in model.encoders[frozen].modules())  # train mode restored
    assert any(not torch.equal(p, b) for p, b in zip(enc[live], before[live]))
    for p, g in zip(enc[live], ref[live]):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_official_scope_zeroes_only_weight_tensors():
    spec, model, method, ctx = setup("joint+smp", scales=(0.5, 2.0), smp_scope="official")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    ctx.epoch = ctx.epochs - 1
    warm = make_batch(spec, seed=1)
    method.train_step(model, warm, opt, ctx)
    ctx.epoch = 0
    batch = make_batch(spec, seed=2)
    enc = model.modality_parameters()
    before = [p.detach().clone() for p in enc["visual"]]
    bn_before = bn_state(model.encoders["visual"])
    ref = grads_of_plain_loss(model, "joint", spec, batch, ctx)
    method.train_step(model, batch, opt, ctx)
    convs = [(p, b) for p, b in zip(enc["visual"], before) if p.dim() == 4]
    affine = [(p, b) for p, b in zip(enc["visual"], before) if p.dim() == 1]
    assert convs and affine
    assert all(torch.count_nonzero(p.grad) == 0 for p, _ in convs)
    assert all(torch.count_nonzero(p.grad) > 0 for p, _ in affine)
    assert any(not torch.equal(p, b) for p, b in affine)  # BN affine params keep learning
    assert all(not torch.equal(p, b) for p, b in convs)  # released-code quirk: momentum still moves them
    assert any(not torch.equal(v, bn_before[k]) for k, v in bn_state(model.encoders["visual"]).items())
    for p, g in zip(enc["audio"], ref["audio"]):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_phase_boundaries_two_and_three_modalities():
    p2 = registry.get_method("joint+smp").Params(smp_phases=[0.5])
    b = phase_bounds(p2, 2, 10)
    assert b == [5]
    conf = {"audio": 0.2, "visual": 0.7}
    rank = rank_modalities(conf, ("audio", "visual"))
    assert smp_kappas(rank, conf, 4, b) == {"audio": 1.0, "visual": 0.0}  # tau_1 - 1: weakest only
    assert smp_kappas(rank, conf, 5, b) == {"audio": 1.0, "visual": 1.0}  # tau_1: joint
    assert phase_bounds(registry.get_method("joint+smp").Params(), 2, 300) == [150]  # paper CREMA-D
    assert phase_bounds(registry.get_method("joint+smp").Params(smp_phase_epochs=[151], smp_phases=[0.1]), 2, 300) == [151]

    p3 = registry.get_method("joint+smp").Params(smp_phases=[0.2, 0.3])
    b3 = phase_bounds(p3, 3, 10)
    assert b3 == [2, 5]
    assert phase_bounds(registry.get_method("joint+smp").Params(), 3, 12) == [3, 6]  # default 0.5/(k-1) each
    mods = ("audio", "visual", "text")
    conf3 = {"audio": 0.5, "visual": 0.1, "text": 0.9}
    r3 = rank_modalities(conf3, mods)
    assert r3 == ["visual", "audio", "text"]
    assert smp_kappas(r3, conf3, 1, b3) == {"visual": 1.0, "audio": 0.0, "text": 0.0}
    assert smp_kappas(r3, conf3, 2, b3) == {"visual": 0.0, "audio": 1.0, "text": 0.0}
    assert smp_kappas(r3, conf3, 4, b3) == {"visual": 0.0, "audio": 1.0, "text": 0.0}
    assert smp_kappas(r3, conf3, 5, b3) == {m: 1.0 for m in mods}


def test_phases_through_the_method_three_modalities():
    spec, _model, method, ctx = setup("joint+smp", n_mod=3, scales=(1.0, 3.0, 0.0), epochs=6, smp_phases=[0.5, 1 / 3])
    batch = make_batch(spec)
    seen = {}
    for e in range(6):
        ctx.epoch = e
        seen[e] = method.smp_step_kappas(batch, ctx)
    assert seen[2] == {"audio": 0.0, "visual": 0.0, "text": 1.0}  # weakest (text) for 3 epochs
    assert seen[3] == seen[4] == {"audio": 1.0, "visual": 0.0, "text": 0.0}  # then the second weakest
    assert seen[5] == {"audio": 1.0, "visual": 1.0, "text": 1.0}


def test_ranking_follows_teacher_confidence_and_swaps():
    spec, _model, method, ctx = setup(scales=(0.5, 2.0))
    batch = make_batch(spec)
    conf = method.smp_confidence(batch, ctx)
    assert conf["audio"].item() == pytest.approx(conf_of(0.5, 4), rel=1e-6)
    assert method.smp_step_kappas(batch, ctx) == {"audio": 1.0, "visual": 0.0}
    ctx.teachers["audio"].scale, ctx.teachers["visual"].scale = 2.0, 0.5
    ctx._teacher_cache = None
    assert method.smp_step_kappas(batch, ctx) == {"audio": 0.0, "visual": 1.0}


def test_ties_are_stable_and_never_crash():
    spec, model, method, ctx = setup(scales=(1.0, 1.0))
    batch = make_batch(spec)
    for _ in range(3):  # audio comes first in modality order -> ranked weakest on a tie
        assert method.smp_step_kappas(batch, ctx) == {"audio": 1.0, "visual": 0.0}
    assert rank_modalities({"text": 0.5, "audio": 0.5, "visual": 0.5}, ("audio", "visual", "text")) == \
        ["audio", "visual", "text"]
    assert rank_modalities({"text": 0.5, "audio": 0.5, "visual": 0.2}, ("audio", "visual", "text")) == \
        ["visual", "audio", "text"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method.train_step(model, batch, opt, ctx)  # a tie trains without error


def test_rank_per_epoch_fixes_first_batch_ranking():
    spec, model, method, ctx = setup(scales=(0.5, 2.0), smp_rank_per="epoch")
    method.on_epoch_start(model, ctx)
    batch = make_batch(spec)
    assert method.smp_step_kappas(batch, ctx) == {"audio": 1.0, "visual": 0.0}
    ctx.teachers["audio"].scale = 3.0
    ctx._teacher_cache = None
    assert method.smp_step_kappas(batch, ctx) == {"audio": 1.0, "visual": 0.0}  # fixed for the epoch
    method.on_epoch_start(model, ctx)
    assert method.smp_step_kappas(batch, ctx) == {"audio": 0.0, "visual": 1.0}


def test_partial_coefficient_is_one_minus_tanh_alpha_rho():
    conf = {"audio": 0.3, "visual": 0.6}
    k = smp_kappas(["audio", "visual"], conf, 0, [5], "partial", alpha=0.7)
    assert k["audio"] == 1.0
    assert k["visual"] == pytest.approx(1 - math.tanh(0.7 * 0.6 / 0.3), abs=1e-12)
    assert smp_kappas(["audio", "visual"], conf, 5, [5], "partial", 0.7) == {"audio": 1.0, "visual": 1.0}
    # through the g2d-partial method, official smp_scope: dominant conv grads scaled by the coefficient
    spec, model, method, ctx = setup("g2d-partial", scales=(0.5, 2.0), smp_scope="official", smp_alpha=0.5)
    batch = make_batch(spec)
    ref = grads_of_plain_loss(model, "g2d-nosmp", spec, batch, ctx)
    method.train_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.0), ctx)
    coef = 1 - math.tanh(0.5 * conf_of(2.0, 4) / conf_of(0.5, 4))
    assert ctx.log["kappa_visual"] == [pytest.approx(coef, rel=1e-6)]
    enc = model.modality_parameters()
    for p, g in zip(enc["visual"], ref["visual"]):
        torch.testing.assert_close(p.grad, g * coef if p.dim() == 4 else g, rtol=1e-5, atol=1e-7)
    for p, g in zip(enc["audio"], ref["audio"]):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_plugin_composes_params_and_validates():
    cls = registry.get_method("joint+smp")
    assert cls.needs_teachers and cls is registry.get_method("joint+smp")
    assert not registry.get_method("joint").needs_teachers
    with pytest.raises(ValueError, match="phases"):
        setup(smp_phases=[0.3, 0.3])  # k-1 = 1 phase for 2 modalities
    with pytest.raises(ValueError, match="scope"):
        setup(smp_scope="loose")
    with pytest.raises(C.ConfigError, match="bogus"):
        C._validate(C.OmegaConf.create({"bogus": 1}), cls.Params, "methods.joint+smp")
    spec = tiny_spec(2)

    @dataclass
    class P:  # a base method with its own alpha / scope (like OGM-GE) composes: SMP fields are prefixed
        alpha: float = 0.8
        scope: str = "conv"

    composed = registry._PLUGINS["smp"](type("Ogm", (registry.get_method("joint"),), {"Params": P}))
    p = composed.Params()
    assert (p.alpha, p.scope, p.smp_alpha, p.smp_scope) == (0.8, "conv", 1.0, "strict")
    with pytest.raises(TypeError, match="smp_alpha"):
        registry._PLUGINS["smp"](type("Bad", (registry.get_method("joint"),),
                                      {"Params": dataclass(type("Q", (), {"__annotations__": {"smp_alpha": float},
                                                                         "smp_alpha": 0.8}))}))
    with pytest.raises(ValueError, match=">= 2 modalities"):
        registry.get_method("unimodal+smp")(registry.get_method("unimodal+smp").Params(modality="audio"), spec)
