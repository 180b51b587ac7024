"""Every registered method (and `joint+<plugin>` for every plug-in) on tiny 2-/3-modality specs.

Emulates the trainer's contract on CPU: seed, build model + optimizer, `setup`, per epoch
`model.train()` + `on_epoch_start` + `train_step` + `on_epoch_end` (head metrics of a fixed batch); resume = fresh model/optimizer/method loaded
from a checkpoint file, RNG restored, then `setup`, exactly in the trainer's order. A method opts
out of a task with a class attribute `tasks = ("classification",)`; a fusion plug-in's class
attribute `fusion` picks the model's fusion head, as the trainer does.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from g2d import registry
from g2d.config import TrainerConfig
from g2d.methods.base import Context, task_loss
from g2d.models.model import MultimodalModel
from g2d.train import checkpoint
from g2d.train.seeding import rng_state, seed_everything, set_rng_state
from g2d.train.trainer import build_model, build_optimizer
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


def _names() -> list[str]:
    base = [m for m in registry.list_methods() if "+" not in m]
    return base + [f"joint+{p}" for p in registry.list_plugins()]


SPECS = {"2mod": tiny_spec(2), "3mod": tiny_spec(3), "regression": tiny_spec(2, task="regression")}
def _tasks(name: str) -> tuple[str, ...]:
    return getattr(registry.get_method(name), "tasks", ("classification", "regression"))


CASES = [pytest.param(n, s, id=f"{n}-{s}") for n in _names() for s in SPECS if SPECS[s].task in _tasks(n)]
UNSUPPORTED = [pytest.param(n, s, id=f"{n}-{s}") for n in _names() for s in SPECS if SPECS[s].task not in _tasks(n)]
SEED = 3


def _spec_or_skip(name: str, spec_id: str):
    return registry.get_method(name), SPECS[spec_id]


@pytest.mark.parametrize("name,spec_id", UNSUPPORTED)
def test_unsupported_task_is_a_clear_error(name, spec_id):
    """A method declaring `tasks` refuses other tasks at construction, naming the method and task."""
    cls, spec = _spec_or_skip(name, spec_id)
    with pytest.raises(ValueError, match=spec.task):
        cls(_params(cls, spec), spec)


def _params(cls, spec):
    P = cls.Params
    fields = {f.name for f in dataclasses.fields(P)} if dataclasses.is_dataclass(P) else set()
    return P(modality=spec.modality_names[0]) if "modality" in fields else P()  # unimodal needs one


def _teachers(spec, mods):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        out = {}
        for m in mods:
            t = MultimodalModel(spec, tiny_model_cfg(), (m,)).eval()
            for p in t.parameters():
                p.requires_grad_(False)
            out[m] = t
    return out


def _build(cls, spec):
    """What Trainer.fit does before the epoch loop (minus data and setup)."""
    method = cls(_params(cls, spec), spec)
    model = build_model(method, spec, tiny_model_cfg())  # fusion plug-ins and aux modules, as in Trainer
    opt = build_optimizer(model.parameters(), TrainerConfig(lr=0.05))
    teachers = _teachers(spec, model.modalities) if cls.needs_teachers else {}
    ctx = Context(spec=spec, device=torch.device("cpu"), epochs=4, teachers=teachers, optimizer=opt)
    return method, model, opt, ctx


def _val_metrics(model, spec) -> dict[str, float]:
    """What the trainer hands `on_epoch_end`: each head's validation accuracy (classification) and loss."""
    model.eval()
    with torch.no_grad():
        batch = make_batch(spec, 8, seed=77)
        out = model(batch)
    res = {}
    for m in model.modalities:
        res[f"loss_{m}"] = float(task_loss(spec, out.logits[m], batch["label"]))
        if spec.task == "classification":
            res[f"acc_{m}"] = 100.0 * float((out.logits[m].argmax(1) == batch["label"]).float().mean())
    return res


def _epoch(method, model, opt, ctx, epoch: int) -> dict:
    """One trainer epoch of a single batch (batches differ per epoch), then the between-epochs hook."""
    ctx.epoch, ctx.log = epoch, {}
    model.train()
    method.on_epoch_start(model, ctx)
    terms = method.train_step(model, make_batch(ctx.spec, 6, seed=10 + epoch), opt, ctx)
    ctx.step += 1
    if epoch < ctx.epochs - 1:
        method.on_epoch_end(model, ctx, _val_metrics(model, ctx.spec))
    return terms


def _run(cls, spec, epochs=2):
    seed_everything(SEED)
    method, model, opt, ctx = _build(cls, spec)
    method.setup(model, ctx)
    terms = [_epoch(method, model, opt, ctx, e) for e in range(epochs)]
    return method, model, ctx, terms


_FULL: dict = {}


def _full_state(name: str, spec_id: str) -> dict:
    """Parameters after an uninterrupted two-epoch run (cached: both tests below compare to it)."""
    if (name, spec_id) not in _FULL:
        _FULL[(name, spec_id)] = _state(_run(registry.get_method(name), SPECS[spec_id])[1])
    return _FULL[(name, spec_id)]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors differ: {diff[:5]}"


@pytest.mark.parametrize("name,spec_id", CASES)
def test_two_steps_finite_and_learning(name, spec_id):
    cls, spec = _spec_or_skip(name, spec_id)
    seen = []  # every optimizer step (also a method's own optimizers) checks its grads

    def hook(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append((len(grads), all(bool(torch.isfinite(g).all()) for g in grads)))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        seed_everything(SEED)
        method, model, opt, ctx = _build(cls, spec)
        before = _state(model)
        method.setup(model, ctx)
        for epoch in range(2):
            terms = _epoch(method, model, opt, ctx, epoch)
            assert "loss" in terms, f"{name}.train_step must return a 'loss' term, got {sorted(terms)}"
            for k, v in terms.items():
                assert torch.isfinite(v).all(), f"{name}: term {k} = {v}"
            for k, vals in ctx.log.items():
                assert all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in vals), f"{name}: coef {k}"
    finally:
        handle.remove()
    assert seen, f"{name}: no optimizer step was taken"
    assert all(n > 0 for n, _ in seen), f"{name}: an optimizer step ran with no gradients"
    assert all(ok for _, ok in seen), f"{name}: non-finite gradient at an optimizer step"
    after = model.state_dict()
    enc_changed = [m for m in model.modalities
                   if any(not torch.equal(before[f"encoders.{m}.{k}"], v)
                          for k, v in model.encoders[m].named_parameters())]  # not BN buffers
    assert enc_changed, f"{name}: no encoder parameter changed after two steps"
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model.eval()
    with torch.no_grad():
        batch = make_batch(spec, 5, seed=99)
        out = model(batch)
        pred = method.predict(out)
    assert pred.shape == (5, spec.num_outputs)
    assert torch.isfinite(pred).all()


@pytest.mark.parametrize("name,spec_id", CASES)
def test_deterministic_under_seed(name, spec_id):
    cls, spec = _spec_or_skip(name, spec_id)
    _assert_same(_full_state(name, spec_id), _state(_run(cls, spec)[1]))


@pytest.mark.parametrize("name,spec_id", CASES)
def test_resume_matches_uninterrupted(name, spec_id, tmp_path):
    cls, spec = _spec_or_skip(name, spec_id)
    full = _full_state(name, spec_id)
    method, model, ctx, _ = _run(cls, spec, epochs=1)
    path = tmp_path / "ckpt.pt"  # what Trainer.fit saves at the end of an epoch
    checkpoint.atomic_save({"model": model.state_dict(), "optimizer": ctx.optimizer.state_dict(),
                            "method": method.state_dict(), "rng": rng_state(), "step": ctx.step}, path)
    del method, model, ctx
    seed_everything(SEED + 1)  # the fresh objects must not depend on leftover RNG state
    method, model, opt, ctx = _build(cls, spec)
    state = checkpoint.load(path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    method.load_state_dict(state["method"])
    set_rng_state(state["rng"])
    ctx.step = state["step"]
    method.setup(model, ctx)
    _epoch(method, model, opt, ctx, 1)
    _assert_same(full, _state(model))
