"""The Method protocol: what a method may change, and the default training step.

A method contributes loss terms (`loss`), gradient modulation between backward and step
(`after_backward`), optionally its own step (`train_step`) or inference rule (`predict`), and
state that must survive a checkpoint. The trainer owns data, optimisation, eval and checkpoints.
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
    pass


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
                "training stopped (lower trainer.lr, enable trainer.grad_clip, or check the prepared data)")


def task_loss(spec: DatasetSpec, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE for classification, MSE for regression (G2D paper, L_S)."""
    if spec.task == "regression":
        return F.mse_loss(pred.squeeze(-1).float(), target.float())
    return F.cross_entropy(pred.float(), target)


class Method:
    name: ClassVar[str] = "base"
    Params: ClassVar[type] = NoParams
    needs_teachers: ClassVar[bool] = False

    def __init__(self, params: Any, spec: DatasetSpec):
        self.params = params
        self.spec = spec

    def modalities(self) -> tuple[str, ...]:
        """Modalities of the model this method trains (teachers: one)."""
        return self.spec.modality_names

    def setup(self, model: nn.Module, ctx: Context) -> None:
        """Called once before training (after a resume too)."""

    def on_epoch_start(self, model: nn.Module, ctx: Context) -> None:
        pass

    def loss(self, batch: dict, out, ctx: Context) -> dict[str, torch.Tensor]:
        return {"task": task_loss(self.spec, out.fused, batch["label"])}

    def after_backward(self, model: nn.Module, ctx: Context) -> None:
        """Gradient modulation point: grads exist, the optimizer has not stepped."""

    def train_step(self, model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
                   ctx: Context) -> dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            out = model(batch)
            terms = self.loss(batch, out, ctx)
        total = sum(terms.values())
        ctx.check_finite(total, terms)
        total.backward()
        self.after_backward(model, ctx)
        if ctx.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
        optimizer.step()
        return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}

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
