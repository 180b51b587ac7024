"""The Method protocol: what a method may change, and the default training step.

A method contributes loss terms (`loss`), gradient modulation between backward and step
(`after_backward`), optionally its own step (`train_step`), forward (`forward`) or inference rule (`predict`), its own
trainable modules (`aux_module`), a reaction to each epoch's validation metrics (`on_epoch_end`), and state
that must survive a checkpoint. The trainer owns data, optimisation, eval and checkpoints.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from g2d.data.base import DatasetSpec


@dataclass
class NoParams:
    pass


class NonFiniteLoss(RuntimeError):
    """A non-finite training loss: the trainer records the run as diverged (metrics.json `diverged`) and goes on
    with the next run. `epoch`, `step` and `terms` (each loss term's value) say where."""

    def __init__(self, message: str, epoch: int | None = None, step: int | None = None,
                 terms: dict[str, float] | None = None):
        super().__init__(message)
        self.epoch, self.step, self.terms = epoch, step, dict(terms or {})


@dataclass
class Context:
    """Per-run state handed to method hooks; `log` holds per-step coefficients (averaged per epoch)."""

    spec: DatasetSpec
    device: torch.device
    epochs: int
    epoch: int = 0
    step: int = 0
    teachers: dict[str, nn.Module] = field(default_factory=dict)
    log: dict[str, list] = field(default_factory=dict)
    amp: bool = False
    grad_clip: float = 0.0
    check_every: int = 1
    _teacher_cache: tuple[dict, Any] | None = None
    optimizer: torch.optim.Optimizer | None = None

    def record(self, **values) -> None:
        """Log coefficients for this step (tensors stay on device until the epoch ends)."""
        for k, v in values.items():
            self.log.setdefault(k, []).append(v.detach().float() if torch.is_tensor(v) else float(v))

    def autocast(self):
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def teacher_outputs(self, batch: dict) -> dict[str, Any]:
        """Frozen teachers' Output per modality, computed once per step under no_grad."""
        if not self.teachers:
            raise RuntimeError("this method needs teachers but none were loaded (set needs_teachers = True)")
        if self._teacher_cache is not None and self._teacher_cache[0] is batch:
            return self._teacher_cache[1]
        with torch.no_grad(), self.autocast():
            outs = {m: t(batch) for m, t in self.teachers.items()}
        self._teacher_cache = (batch, outs)  # holds the batch itself: an id() could be reused
        return outs

    def check_finite(self, total: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        if self.step % self.check_every == 0 and not torch.isfinite(total).item():
            vals = {k: float(v.detach()) for k, v in terms.items()}
            raise NonFiniteLoss(
                f"non-finite loss at epoch {self.epoch} step {self.step}: terms {vals}; "
                "training stopped (lower trainer.lr, enable trainer.grad_clip, or check the prepared data)",
                epoch=self.epoch, step=self.step, terms=vals)


def task_loss(spec: DatasetSpec, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE for classification, MSE for regression (G2D paper, L_S)."""
    if spec.task == "regression":
        return F.mse_loss(pred.squeeze(-1).float(), target.float())
    return F.cross_entropy(pred.float(), target)


class Method:
    name: ClassVar[str] = "base"
    Params: ClassVar[type] = NoParams
    needs_teachers: ClassVar[bool] = False
    # the model.fusion values the method can train with (None: any), refused at config time by check_config;
    # `fusion_need` says why, in the one-line error ("<name> <fusion_need>: set model.fusion to one of ...")
    fusions: ClassVar[tuple[str, ...] | None] = None
    fusion_need: ClassVar[str] = "cannot train with this fusion"

    def __init__(self, params: Any, spec: DatasetSpec):
        self.params = params
        self.spec = spec

    @classmethod
    def check_config(cls, tc, mcfg) -> None:
        """Refuse, at config time (config_checks.check_methods, before any run starts), shared trainer or model
        options this method cannot honour: raise ValueError saying which and what to set. `tc` is the run's
        TrainerConfig, `mcfg` the ModelConfig (a fusion plug-in's `cls.fusion` replaces `mcfg.fusion`).
        Every shared trainer option (e.g. `trainer.grad_clip`, applied by `clip_gradients`) is valid for
        every method in this repository; only choices a method cannot train with are refused here.
        The default refuses a fusion outside `cls.fusions`; an override should call super()."""
        fusion = getattr(cls, "fusion", None) or mcfg.fusion
        if cls.fusions is not None and fusion not in cls.fusions:
            raise ValueError(f"{cls.name} {cls.fusion_need}: set model.fusion to one of {cls.fusions}, "
                             f"got {fusion!r}")

    def modalities(self) -> tuple[str, ...]:
        """Modalities of the model this method trains (teachers: one)."""
        return self.spec.modality_names

    def aux_module(self, model: nn.Module) -> nn.Module | None:
        """Trainable modules the method owns beside the model (e.g. MMPareto's unimodal heads), or None.

        Called once, before the optimizer is built; the trainer attaches the result as `model.aux`, so it is
        optimised, checkpointed, moved to the device and switched train/eval with the model. The model's
        forward never uses it, and the saved `model.pt` / `selected.pt` leave it out.
        """
        return None

    def setup(self, model: nn.Module, ctx: Context) -> None:
        """Called once before training (after a resume too)."""

    def on_epoch_start(self, model: nn.Module, ctx: Context) -> None:
        pass

    def on_epoch_end(self, model: nn.Module, ctx: Context, metrics: dict[str, float]) -> None:
        """Between two epochs: `metrics` are epoch `ctx.epoch`'s validation metrics as the trainer computed them
        (`acc`, `f1` / `rmse`...; `loss`; per head `acc_<m>`, `loss_<m>`...; never a test metric). Called after
        the epoch was evaluated and its weights kept (trainer.select) and before its resumable checkpoint, so
        what the method changes here (its state, the model's or `ctx.optimizer`'s) takes effect from the next
        epoch and survives a resume. Not called after the final epoch: the model evaluated and reported last
        is the one saved."""

    def forward(self, model: nn.Module, batch: dict):
        """The model's Output for a batch, in the default training step, in evaluation and in the train-batch
        confidence: `model(batch)`. A method whose architecture couples the encoders between their stages
        computes it here (with modules from `aux_module`); the linear probes still read each encoder alone."""
        return model(batch)

    def loss(self, batch: dict, out, ctx: Context) -> dict[str, torch.Tensor]:
        return {"task": task_loss(self.spec, out.fused, batch["label"])}

    def after_backward(self, model: nn.Module, ctx: Context) -> None:
        """Gradient modulation point: grads exist, the optimizer has not stepped."""

    def train_step(self, model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
                   ctx: Context) -> dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            out = self.forward(model, batch)
            terms = self.loss(batch, out, ctx)
        return self.optimize(model, optimizer, ctx, terms)

    def optimize(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context,
                 terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tail of every step: NaN guard, backward, `after_backward`, clipping, optimizer step; returns the
        detached terms with their sum as `loss`. A method with its own forward calls it with its terms."""
        total = sum(terms.values())
        ctx.check_finite(total, terms)
        total.backward()
        self.after_backward(model, ctx)
        self.clip_gradients(model, ctx)
        optimizer.step()
        return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}

    def clip_gradients(self, model: nn.Module, ctx: Context) -> None:
        """`trainer.grad_clip` > 0: clip the gradient norm (after `after_backward`, before the step). Default: one
        norm over all parameters; a method whose model is several independent models clips each (UME)."""
        if ctx.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)

    def predict(self, out) -> torch.Tensor:
        """Fused prediction used for evaluation."""
        return out.fused

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def scale_grads(params, k: float | torch.Tensor) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(k)


def method_wrapper(fn: Callable[[type], type]) -> Callable[[type], type]:
    return fn
