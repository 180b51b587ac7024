"""MSES: Modality-Specific Early Stopping, the second per-modality baseline of the MSLR paper's comparison (Y. Yao
and R. Mihalcea, "Modality-specific Learning Rates for Effective Multimodal Additive Late-fusion", Findings of ACL
2022; the G2D paper's "modality imbalance analysis" rows cite both). Each modality stops training on its own when
its own validation loss stops improving, so a modality that converges early is not over-trained while the others
still learn.

Sources read. Only the reference implementation used by the G2D paper's comparison; no paper text with MSES's
definition could be retrieved, so no equation numbers are given and every formula is labelled and pinned to
lihong2303/AGM_ICCV2023 @5a65542c70b1c7c15c5df291e77fa9cf2bbb9549, `run/CREMAD_main.py`:
`train` l.211-226 (the MSES step: each modality's gradients times c_m r_m, c_m = 1), `CREMAD_main` l.627-634
(r_m = 1, minima and their epochs), l.685-745 (the stopping rule), `test` (per-head validation losses:
`test_audio_loss += loss_a.item() / total_batch`, the mean over batches of each head's cross-entropy);
`utils/config.py` l.70-75 (epochs, modulation window). GeWu-Lab/BalanceBenchmark has no MSES.

After each epoch t, for every modality m still training, with L_m(t) modality m's head loss on held-out data:
  (S1) smoothed loss: S_m(1) = L_m(1); S_m(t) = 0.6 L_m(t-1) + 0.4 L_m(t) (l.688-696: the code's `bre_*` is the
       previous epoch's RAW loss, so this is a two-tap average, not an exponential moving average).
  (S2) best: while S_m(t) < min_m, min_m = S_m(t) and b_m = t, and the state at t is kept (l.700-717: the code
       saves the whole model and optimizer `ckpt_full_epoch{t}`); the first epoch starts min_m and b_m.
  (S3) stop: when t - b_m > patience (80 in the code, l.719) and m still trains, r_m = 0 from epoch t+1 on
       (m's parameters no longer move) and the state kept at b_m is restored (l.722-729; `restore` below).
  Training updates modality m's encoder and own head with rate c_m r_m eta, the MSLR mechanism (baselines/mslr.py
  (L1)/(L2), `apply`: "lr" moves the parameters by exactly that rate, so r_m = 0 freezes them; "grad" scales the
  gradients as the code does, under which momentum and weight decay still move a stopped modality).

`restore` (S3): "all" (default, the code): the whole model and the optimizer state at b_m; "modality": only
modality m's own parameters (encoder + own head) at b_m, the others keep their progress; "none": m stops where it
is.

Deviations, numbered:
  (1) Held-out data: L_m(t) is the trainer's VALIDATION split (`Method.on_epoch_end`'s `loss_<m>`); the code uses
      the test loader. The hook is not called after the final epoch, so (S3) is last checked after epoch T-2.
  (2) Window: the code modulates only inside `--modulation_starts/ends` (default 1-based epochs 0..20 of typically
      100), outside of which r_m = 0 is never applied, so with its defaults a stopped modality keeps training and
      only the restore takes effect. Here start_epoch/end_epoch default to every epoch of the run.
  (3) Patience: 80 of the code's usual 100 epochs (README commands `--EPOCHS 100`); the embedded 20-epoch suite
      scales it to 16 (params.yaml), as Re-learning's schedule is scaled. It fires only where a modality's best
      smoothed loss comes in the first epochs; the per-epoch `coef/stopped_<m>` in history.csv shows when it did.
  (4) When every modality has stopped the code exits; here the remaining epochs leave all parameters in place
      (r = 0 everywhere; under `apply: lr` exactly), so the last epoch reports the same model.
  (5) The first epoch's state is kept too: the code saves a checkpoint only on a strict improvement, so a
      modality whose best epoch is the first would restore a file the code may never have written.
  (6) k > 2 modalities: (S1)-(S3) are per modality. Regression: the per-head loss is the MSE head loss, so MSES
      works for regression unchanged.
  (7) `restore: all` restores the optimizer's state (momentum, moments) but keeps the learning rate the trainer's
      schedule has reached; loading the code's whole optimizer state would also bring back an earlier, undecayed
      rate that the schedule, already past its step, never lowers again.
  (8) A stopped modality's parameters are frozen, its BatchNorm running statistics are not (they follow the
      training batches in train mode, as in the code, where only gradients are scaled).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines.mslr import MSLR, modality_groups
from g2d.registry import register_method

RESTORE = ("all", "modality", "none")


@dataclass
class MSESParams:
    patience: int = 80  # (S3) CREMAD_main.py l.719 `epoch - audio_argmax_loss_epoch > 80`
    prev_weight: float = 0.6  # (S1) l.695-696: 0.6 * previous raw loss + 0.4 * this epoch's
    restore: str = "all"  # (S3) all: model + optimizer (the code) | modality: m's own parameters | none
    apply: str = "lr"  # lr: r_m = 0 freezes m exactly | grad: the code's gradient scaling (l.221-226)
    start_epoch: int = 0  # deviation (2): 0-based inclusive window of the rates
    end_epoch: int = 1_000_000
    # MSLR's fields MSES fixes: c_m = 1 (l.212-213) and r_m set only by (S3)
    coeffs: ClassVar[dict] = {}
    ratio: ClassVar[str] = "fixed"
    window: ClassVar[int] = 5


def smoothed_loss(prev_raw: float | None, raw: float, prev_weight: float) -> float:
    """(S1): the first epoch's raw loss, then prev_weight * previous raw + (1 - prev_weight) * this raw."""
    return raw if prev_raw is None else prev_weight * prev_raw + (1.0 - prev_weight) * raw


@register_method("mses")
class MSES(MSLR):
    """Per-modality early stopping on each head's smoothed validation loss; a stopped modality is frozen."""

    Params = MSESParams

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if params.restore not in RESTORE:
            raise ValueError(f"methods.mses.restore={params.restore!r} not in {RESTORE} (params.yaml)")
        if params.patience < 0:
            raise ValueError(f"methods.mses.patience={params.patience} must be >= 0 (params.yaml)")
        if not 0.0 <= params.prev_weight < 1.0:
            raise ValueError(f"methods.mses.prev_weight={params.prev_weight} must be in [0, 1) (params.yaml)")
        mods = self.modalities()
        self.prev_raw: dict[str, float | None] = {m: None for m in mods}
        self.best: dict[str, float | None] = {m: None for m in mods}
        self.best_epoch: dict[str, int] = {m: -1 for m in mods}
        self.kept: dict[str, dict | None] = {m: None for m in mods}  # (S2) state at b_m
        self.stopped: dict[str, int] = {m: -1 for m in mods}  # the epoch after which m stopped, -1 = training

    def _snapshot(self, model, ctx) -> dict:
        snap = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        if self.params.restore == "all" and ctx.optimizer is not None:
            snap["optimizer"] = copy.deepcopy(ctx.optimizer.state_dict())
        return snap

    def _restore(self, model, ctx, m: str) -> None:
        snap = self.kept[m]
        if self.params.restore == "none" or snap is None:
            return
        if self.params.restore == "all":
            model.load_state_dict(snap["model"])
            if "optimizer" in snap and ctx.optimizer is not None:
                lrs = [g["lr"] for g in ctx.optimizer.param_groups]
                ctx.optimizer.load_state_dict(snap["optimizer"])
                for g, lr in zip(ctx.optimizer.param_groups, lrs):  # deviation (7): the schedule's rate stays
                    g["lr"] = lr
            return
        names = {id(p): n for n, p in model.named_parameters()}
        with torch.no_grad():
            for p in modality_groups(model)[m]:
                p.copy_(snap["model"][names[id(p)]])

    def on_epoch_end(self, model, ctx, metrics) -> None:
        t = ctx.epoch
        for m in self.modalities():
            if self.stopped[m] >= 0:
                continue
            raw = float(metrics[f"loss_{m}"])
            s = smoothed_loss(self.prev_raw[m], raw, self.params.prev_weight)  # (S1)
            self.prev_raw[m] = raw
            if self.best[m] is None or s < self.best[m]:  # (S2); the first epoch starts it (deviation (5))
                self.best[m], self.best_epoch[m] = s, t
                self.kept[m] = self._snapshot(model, ctx)
        for m in self.modalities():  # (S3), after every modality's (S2): a restore must not feed (S2)
            if self.stopped[m] < 0 and t - self.best_epoch[m] > self.params.patience:
                self.stopped[m], self.ratio[m] = t, 0.0
                self._restore(model, ctx, m)
                self.kept[m] = None  # no longer needed: frees a model copy

    def on_epoch_start(self, model, ctx) -> None:
        super().on_epoch_start(model, ctx)
        ctx.record(**{f"stopped_{m}": float(self.stopped[m] >= 0) for m in self.modalities()})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "prev_raw": dict(self.prev_raw), "best": dict(self.best),
                "best_epoch": dict(self.best_epoch), "kept": dict(self.kept), "stopped": dict(self.stopped)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.prev_raw = dict(state["prev_raw"])
        self.best = dict(state["best"])
        self.best_epoch = {m: int(v) for m, v in state["best_epoch"].items()}
        self.kept = dict(state["kept"])
        self.stopped = {m: int(v) for m, v in state["stopped"].items()}
