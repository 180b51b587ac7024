"""SMP (Sequential Modality Prioritization, G2D paper Sec. 3.3) as a plug-in for any method.

`get_method("joint+smp")` = `smp(Joint)`: scores each modality by its frozen teacher's confidence
rho^m, ranks them weakest first (ties: modality order) and, in phase j (tau_j epochs), lets only
the j-th weakest encoder learn (kappa = 0 for the others); after all phases kappa = 1. Its
params are prefixed `smp_` so they never clash with the base method's (e.g. OGM-GE's alpha).
Ranking is redone every batch (official code) or fixed by an epoch's first batch (`smp_rank_per: epoch`).
Scopes (`smp_scope`): `official` zeroes only the grads of weight tensors (dim >= 2: the conv kernels of the released
code; linear weights of MLP encoders, which have no conv); `strict` freezes the whole encoder
(grad = None so momentum and weight decay skip it; parameters and BN running buffers restored bit-exact,
BN normalising with batch statistics as in training).
`smp_suppression: partial` (k modalities): in phase j the prioritised modality keeps kappa = 1 and every
other one gets OGM-GE's 1 - tanh(alpha * rho^m / rho^lead), for k = 2 OGM-GE on teacher scores.
"""
import contextlib
import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from g2d.registry import register_plugin


@dataclass
class SMPFields:
    smp_phases: list[float] = field(default_factory=list)  # tau_j / epochs, length k-1; [] = [0.5/(k-1)]*(k-1)
    smp_phase_epochs: list[int] = field(default_factory=list)  # absolute tau_j (overrides smp_phases); paper CREMA-D [150]
    smp_rank_per: str = "batch"  # batch (official: re-rank every step) | epoch (ranking of the epoch's first batch)
    smp_scope: str = "strict"  # strict (whole encoder frozen) | official (only weight tensors' grads zeroed)
    smp_suppression: str = "complete"  # complete (kappa = 0, the paper) | partial (kappa = 1 - tanh(alpha*rho))
    smp_alpha: float = 1.0  # partial suppression strength (official config: 1.0)


def teacher_confidence(spec, teacher_outs: dict, label: torch.Tensor) -> dict[str, torch.Tensor]:
    """rho^m: batch mean of teacher m's softmax probability of the true class (paper, confidence Eq.).

    Regression analogue (ours, the paper gives none): exp(-mean squared teacher error), in (0, 1],
    higher = more confident, so rankings and the partial-suppression ratio keep their meaning.
    """
    conf = {}
    for m, out in teacher_outs.items():
        pred = out.logits[m].float()
        if spec.task == "regression":
            conf[m] = torch.exp(-((pred.squeeze(-1) - label.float()) ** 2).mean())
        else:
            conf[m] = F.softmax(pred, dim=1).gather(1, label.long().view(-1, 1)).mean()
    return conf


def phase_bounds(p, k: int, epochs: int, where: str = "methods.<name>") -> list[int]:
    """Cumulative phase ends E_j = tau_1 + ... + tau_j (epoch e is in phase j iff E_{j-1} <= e < E_j)."""
    if p.smp_phase_epochs:
        taus = list(p.smp_phase_epochs)
        key = "smp_phase_epochs"
    else:
        taus = list(p.smp_phases) or [0.5 / (k - 1)] * (k - 1)
        key = "smp_phases"
        if any(t < 0 for t in taus) or sum(taus) > 1 + 1e-9:
            raise ValueError(f"{where}.smp_phases={taus}: fractions of the epochs must be >= 0 and sum to <= 1")
        taus = [math.floor(t * epochs + 0.5) for t in taus]  # half up: 0.5 of 300 -> 150
    if len(taus) != k - 1 or any(t < 0 for t in taus):
        raise ValueError(f"{where}.{key}={taus}: need k-1 = {k - 1} non-negative phase lengths "
                         f"for {k} modalities")
    bounds, acc = [], 0
    for t in taus:
        acc += t
        bounds.append(acc)
    return bounds


def rank_modalities(conf: dict[str, float], order: tuple[str, ...]) -> list[str]:
    """Ascending confidence (weakest first); ties broken by modality order (the official code raised)."""
    return sorted(order, key=lambda m: (conf[m], order.index(m)))


def smp_kappas(ranking: list[str], conf: dict[str, float], epoch: int, bounds: list[int],
               suppression: str = "complete", alpha: float = 1.0) -> dict[str, float]:
    """kappa^m for this step: phase j trains only ranking[j]; 1 for all after the last phase."""
    phase = next((j for j, end in enumerate(bounds) if epoch < end), None)
    if phase is None:
        return {m: 1.0 for m in ranking}
    lead = ranking[phase]
    if suppression == "complete":
        return {m: float(m == lead) for m in ranking}
    # partial: OGM-GE coefficient (Peng et al. CVPR 2022, Eq. 10 as coded: tanh(alpha*ratio)) on teacher scores
    ref = max(conf[lead], 1e-12)
    return {m: 1.0 if m == lead else 1.0 - math.tanh(alpha * conf[m] / ref) for m in ranking}


def _check(p, where: str) -> None:
    for key, ok in (("smp_rank_per", ("batch", "epoch")), ("smp_scope", ("strict", "official")),
                    ("smp_suppression", ("complete", "partial"))):
        if getattr(p, key) not in ok:
            raise ValueError(f"{where}.{key}={getattr(p, key)!r} not in {ok} (params.yaml)")
    if p.smp_alpha < 0:
        raise ValueError(f"{where}.smp_alpha={p.smp_alpha} must be >= 0 (params.yaml)")


def _params_with_smp(base_params: type, name: str) -> type:
    """Base method's Params + SMP fields (one dataclass, so params.yaml validates both)."""
    base_names = {f.name for f in dataclasses.fields(base_params)}
    clash = base_names & {f.name for f in dataclasses.fields(SMPFields)}
    if clash:
        raise TypeError(f"{base_params.__name__} already has fields {sorted(clash)}: cannot add SMP to it")
    new = []
    for f in dataclasses.fields(SMPFields):
        dflt = ({"default_factory": f.default_factory} if f.default_factory is not dataclasses.MISSING
                else {"default": f.default})
        new.append((f.name, f.type, field(**dflt)))
    return dataclasses.make_dataclass(name, new, bases=(base_params,))


@register_plugin("smp")
def smp(base: type) -> type:
    """Return `base` with SMP; teachers are loaded for scoring even if `base` does not distil."""

    class WithSMP(base):
        Params = _params_with_smp(base.Params, f"{base.Params.__name__}SMP")
        needs_teachers = True
        smp_scores_confidence = True  # G2D's loss leaves conf_<m> logging to SMP

        def __init__(self, params, spec):
            super().__init__(params, spec)
            where = f"methods.{self.name}"
            _check(params, where)
            if len(self.modalities()) < 2:
                raise ValueError(f"SMP needs >= 2 modalities; {spec.name} gives {self.modalities()}")
            phase_bounds(params, len(self.modalities()), 1, where)  # fail at construction on a bad phases block
            self._kappa: dict[str, float] = {}
            self._epoch_rank: list[str] | None = None

        def on_epoch_start(self, model, ctx):
            super().on_epoch_start(model, ctx)
            self._epoch_rank = None

        def smp_confidence(self, batch, ctx) -> dict[str, torch.Tensor]:
            return teacher_confidence(self.spec, ctx.teacher_outputs(batch), batch["label"])

        def smp_step_kappas(self, batch, ctx) -> dict[str, float]:
            mods = tuple(self.modalities())
            conf = self.smp_confidence(batch, ctx)
            ctx.record(**{f"conf_{m}": conf[m] for m in mods})
            bounds = phase_bounds(self.params, len(mods), ctx.epochs, f"methods.{self.name}")
            if ctx.epoch >= bounds[-1]:  # joint phase: no ranking needed (and no host sync)
                return {m: 1.0 for m in mods}
            vals = dict(zip(mods, torch.stack([conf[m] for m in mods]).tolist()))
            rank = rank_modalities(vals, mods)
            if self.params.smp_rank_per == "epoch":
                self._epoch_rank = self._epoch_rank or rank
                rank = self._epoch_rank
            return smp_kappas(rank, vals, ctx.epoch, bounds, self.params.smp_suppression, self.params.smp_alpha)

        def train_step(self, model, batch, optimizer, ctx):
            self._kappa = k = self.smp_step_kappas(batch, ctx)
            ctx.record(**{f"kappa_{m}": v for m, v in k.items()})
            frozen = [m for m, v in k.items() if v == 0.0] if self.params.smp_scope == "strict" else []
            with _frozen_encoders(model, frozen):
                return super().train_step(model, batch, optimizer, ctx)

        def after_backward(self, model, ctx):
            super().after_backward(model, ctx)
            enc = model.modality_parameters()
            for m, kappa in self._kappa.items():
                if kappa == 1.0:
                    continue
                for p in enc[m]:
                    if self.params.smp_scope == "official":  # as released: weight tensors only (conv: 4-D)
                        if p.dim() >= 2 and p.grad is not None:
                            p.grad.mul_(kappa)
                    elif kappa == 0.0:
                        p.grad = None  # optimizer skips it: no momentum, no weight decay
                    elif p.grad is not None:
                        p.grad.mul_(kappa)

    WithSMP.__name__ = WithSMP.__qualname__ = f"{base.__name__}SMP"
    WithSMP.__doc__ = f"{base.__name__} + SMP (G2D paper Sec. 3.3). " + (base.__doc__ or "")
    return WithSMP


@contextlib.contextmanager
def _frozen_encoders(model, mods: list[str]):
    """Strict scope: encoders of `mods` bit-identical through the step.

    Normalisation runs as in training (batch statistics, as the paper and the official code, which never
    switch a suppressed encoder to eval mode); its running buffers are restored bit-exact afterwards, so the
    frozen encoder's state, parameters and buffers alike, does not change during its suppressed steps.
    """
    if not mods:
        yield
        return
    enc = model.modality_parameters()
    params = [p for m in mods for p in enc[m]]
    snap = [p.detach().clone() for p in params]
    bufs = [b for m in mods for b in model.encoders[m].buffers()]
    buf_snap = [b.detach().clone() for b in bufs]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, snap):
                p.copy_(s)  # guard; with grad None the optimizer already left them untouched
            for b, s in zip(bufs, buf_snap):
                b.copy_(s)  # BN running mean/var and num_batches_tracked
