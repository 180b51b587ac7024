"""AGM: adaptive gradient modulation (Li et al., ICCV 2023), baselines-spec.md §3.

Mono-modal responses o_m are Shapley shares of the fused output computed from passes with the
other modalities' *inputs* zero-filled (`model(batch, drop=...)`); the padded passes keep their
graphs and run in eval mode (BN running stats, no dropout) as the official code does
(lihong2303/AGM_ICCV2023 run/CREMAD_main.py, model/*_net.py @5a65542). o_m = phi_m + f(empty)/M, so
sum_m o_m = f(full); the f(empty) coefficient in o_m is exactly zero (-w(0) + 1/M), so that pass
is skipped. Each o_m enters the loss through an identity whose backward multiplies by
c_m = exp(alpha * min(rhat_m - r_m, cap)), r_m = exp(M/(M-1) (mean_s - s_m)) from this batch's
scores s_m = mean -log softmax(o_m)[y] and rhat_m from their running arithmetic mean over all
iterations since the start (updated after c is computed, every iteration, also outside the
window: official CREMAD_main.py). The general-M form reproduces the official M = 2 and M = 3
formulas. Outside the window c = 1 (the official code instead keeps the last coefficients
set inside it; we follow the spec, for which the step is then Joint-Train). The official
conditional clip is kept: if any fusion-head weight gradient leaves [-clip, clip], clip the global
gradient norm to `clip` (CREMA-D/AV-MNIST 1.0, UR-Funny 5.0; 0 disables).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from g2d.methods.base import Method, task_loss
from g2d.registry import register_method


@dataclass
class AGMParams:
    alpha: float = 1.0  # official utils/config.py default (no CREMA-D value published); AV-MNIST README 2.5
    cap: float = 10.0  # min(rhat - r, cap): CREMA-D 10, UR-Funny 7, AV-MNIST none (use a large value)
    clip: float = 1.0  # conditional clip threshold / norm: 1.0 (UR-Funny 5.0); 0 = off
    start_epoch: int = 0  # modulation window, inclusive, 0-based (official: epochs 1-20, 1-based)
    end_epoch: int = 19
    pad_mode: str = "eval"  # eval (official: padded passes in eval mode) | train


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times c backward (AGM's Id_m module with a backward hook)."""

    @staticmethod
    def forward(ctx, x, c):
        ctx.save_for_backward(c)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (c,) = ctx.saved_tensors
        return (g * c).to(g.dtype), None


def shapley_weights(n: int) -> dict[tuple[frozenset, int], float]:
    """Coefficient a[S, m] of f(S) in o_m = phi_m + f(empty)/M, for every non-empty S (AGM, spec §3.1)."""
    w = {s: math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)}
    coef = {}
    for r in range(1, n + 1):
        for S in itertools.combinations(range(n), r):
            S = frozenset(S)
            for m in range(n):
                coef[(S, m)] = w[len(S) - 1] if m in S else -w[len(S)]
    return coef


def agm_coefficients(s: torch.Tensor, running: torch.Tensor, alpha: float, cap: float):
    """r_m, rhat_m and c_m from batch scores s and running mean scores (AGM, spec §3.1)."""
    n = s.shape[0]
    r = torch.exp(n / (n - 1) * (s.mean() - s))
    rhat = torch.exp(n / (n - 1) * (running.mean() - running))
    c = torch.exp(alpha * torch.clamp(rhat - r, max=cap))
    return r, rhat, c


@register_method("agm")
class AGM(Method):
    Params = AGMParams
    tasks = ("classification",)  # the score is a true-class log-probability

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"agm supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        if params.pad_mode not in ("eval", "train"):
            raise ValueError(f"methods.agm.pad_mode={params.pad_mode!r} not in (eval, train) (params.yaml)")
        if len(self.modalities()) < 2:
            raise ValueError("agm needs at least two modalities")
        self.running: torch.Tensor | None = None  # S_m, arithmetic mean of s_m over iterations
        self.t = 0  # iterations seen
        self._model: nn.Module | None = None
        self._coef = shapley_weights(len(self.modalities()))

    def setup(self, model, ctx) -> None:
        self._model = model

    def responses(self, model, batch, full) -> list[torch.Tensor]:
        """o_m from f(full) (train-mode pass) and the zero-input padded passes (graphs kept)."""
        mods = self.modalities()
        n = len(mods)
        f = {frozenset(range(n)): full}
        was = model.training
        if self.params.pad_mode == "eval":
            model.eval()
        try:
            for r in range(1, n):
                for S in itertools.combinations(range(n), r):
                    drop = tuple(mods[i] for i in range(n) if i not in S)
                    f[frozenset(S)] = model(batch, drop=drop).fused
        finally:
            model.train(was)
        return [sum(self._coef[(S, m)] * out for S, out in f.items()) for m in range(n)]

    def loss(self, batch, out, ctx):
        if self._model is None:
            raise RuntimeError("agm: setup(model, ctx) was not called")
        o = self.responses(self._model, batch, out.fused)
        y = batch["label"]
        with torch.no_grad():  # s_m = mean_i -log max(softmax(o_m)_y, 1e-8)
            p = torch.stack([F.softmax(om.float(), 1).gather(1, y[:, None]).squeeze(1) for om in o])
            s = -torch.log(p.clamp_min(1e-8)).mean(1)
            if self.running is None:
                self.running = torch.zeros_like(s)
            r, rhat, c = agm_coefficients(s, self.running, self.params.alpha, self.params.cap)
            if not self.params.start_epoch <= ctx.epoch <= self.params.end_epoch:
                c = torch.ones_like(c)
            self.t += 1  # S_m <- S_m (t-1)/t + s_m/t, after c was computed
            self.running = self.running * (self.t - 1) / self.t + s / self.t
        fused = sum(_ScaleGrad.apply(om, c[i]) for i, om in enumerate(o))
        mods = self.modalities()
        for name, v in (("c", c), ("s", s), ("r", r), ("rhat", rhat)):
            ctx.record(**{f"{name}_{m}": v[i] for i, m in enumerate(mods)})
        return {"task": task_loss(self.spec, fused, y)}

    def after_backward(self, model, ctx) -> None:
        thr = self.params.clip
        if thr <= 0:
            return
        grads = [p.grad for ps in model.head_parameters().values() for p in ps
                 if p.grad is not None and p.dim() > 1]  # head weights (official: fc_out.weight)
        if grads and torch.stack([g.abs().max() for g in grads]).max() > thr:  # official conditional clip
            nn.utils.clip_grad_norm_(model.parameters(), thr)

    def state_dict(self) -> dict:
        return {"running": None if self.running is None else self.running.clone(), "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.running = None if state["running"] is None else state["running"].clone()
        self.t = int(state["t"])
