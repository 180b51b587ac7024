"""LFM: Facilitating Multimodal Classification via Dynamically Learning Modality Gap (Y. Yang, F. Wan, Q.-Y. Jiang,
Y. Xu, NeurIPS 2024; arXiv id not verified here).

Sources read: the abstract (the NeurIPS supplementary readme: the method "dynamically integrates unsupervised
contrastive learning and supervised multimodal learning", by a heuristic and by a learning-based integration
strategy); the paper's method section could not be read, so formulas are labelled (L1)-(L4) and pinned to code.
Official code njustkmg/NeurIPS24-LFM @ad44fa09fee471c9267a7cba526b222c54d45493: `README.md` (CREMA-D is run as
`python Crema_epoch.py`), `Crema_epoch.py` (`Alignment` l.38-45, `getAlpha_Learnable_Fitted` l.47-53,
`train_audio_video` l.56-85, `val` l.88-160, main l.180-199), `Crema_epoch_learnable.py` (`getAlpha_Learnable`
l.55-97, main l.240-257), `model/AudioVideo.py` (`AVClassifier.forward` l.58-67), `data/crema.json`; and
GeWu-Lab/BalanceBenchmark @4c1482fca5aaa8d4278af8e26020daa039e3ccf3 `balancemm/trainer/LFM_trainer.py`
(`Alignment` l.32-39, `getAlpha_Learnable` l.41-80, `fit` l.144-152, `training_step` l.333-349) and
`configs/trainer_config.yaml` l.110-117.

Per step, with per-modality heads z_m = `out.logits[m]` and the fused output z = `out.fused`
(official: z = 0.5 z_a + 0.5 z_v, AudioVideo.py l.62-66 / Crema_epoch.py l.70; this is `model.fusion: late`):
  (L1) supervised term  L_sup = CE(z, y)  (Crema_epoch.py l.70).
  (L2) alignment ("modality gap") term between the modalities' predictions p_m = softmax(z_m):
       `divergence="code"` (default): D(p, q) = 1/2 [KL(m || p) + KL(m || q)], m = (p + q) / 2 - what
       `Alignment` computes (l.38-45: `F.kl_div(p.log(), m, 'batchmean')` is KL(m || p), batch-mean), named
       a JS score there; `divergence="js"`: the Jensen-Shannon divergence 1/2 [KL(p || m) + KL(q || m)].
       k > 2: the mean of D over all modality pairs (BalanceBenchmark l.341-347, `manual_combinations`).
  (L3) weights alpha(e) = (alpha_sup, alpha_align) per epoch e:
       `schedule="fitted"` (default, Crema_epoch.py l.47-53, the script the README runs): the degree-5
       polynomials fitted to the learned weights, alpha_sup(e) = sum_i a_i e^i, alpha_align(e) = sum_i b_i e^i
       (coefficients below, a_i + b_i = 1 for i = 0 and a_i = -b_i after, so alpha_sup + alpha_align = 1);
       `schedule="constant"`: alpha_sup = `alpha_sup`, alpha_align = 1 - alpha_sup at every epoch.
       `horizon` > 0 evaluates the polynomial at e * horizon / epochs (the fit spans the official 200 epochs,
       crema.json `epoch_dict`); 0 (default) uses e itself, as the code.
  (L4) total  L = 2 (alpha_sup L_sup + alpha_align D)  (Crema_epoch.py l.71; BalanceBenchmark l.347).
  `predict` is the fused output (Crema_epoch.py `val` l.114: argmax softmax(0.5 z_v + 0.5 z_a)).

Deviations, numbered:
(1) The paper describes unsupervised contrastive learning; the released code's second term is (L2), a
    divergence between the two modalities' class predictions, not a feature-level contrastive loss. Followed:
    the code (the paper's loss could not be read).
(2) The learning-based strategy (`Crema_epoch_learnable.py` l.55-97, BalanceBenchmark's only mode) is not
    implemented: once per epoch it takes one hyper-gradient step on alpha_align from a fixed batch held out
    of the training set (16 samples, half used), using only the first parameter tensor's Hessian-vector
    product (`hessian_vector_prod[0].mean()`), clipped to [0.05, 0.95], lr 1e-4 halved every 20 epochs. The
    project's Method protocol has no held-out data pass; the fitted schedule (L3) is the official CREMA-D
    script's stand-in for it. BalanceBenchmark also starts it from alpha = (0.95, 0.05), the official script
    from (0.05, 0.95) (l.250): the weights are swapped there.
(3) BalanceBenchmark reads `modulation_starts/ends` but its `training_step` never uses them; no window here either.
(4) Per-modality read-outs: late/sum/concat heads (`out.logits`, fusion.py); film/gated read out conditioned
    projections, not unimodal predictions: refused in check_config. Regression is refused (softmax divergence).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F

from g2d.methods.base import Method, task_loss
from g2d.registry import register_method

LFM_FUSIONS = ("late", "sum", "concat")
SCHEDULES = ("fitted", "constant")
DIVERGENCES = ("code", "js")
# Crema_epoch.py@ad44fa0 l.49-50: getAlpha_Learnable_Fitted coefficients, lowest degree first
FIT_SUP = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11)
FIT_ALIGN = (7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06, -2.23835486e-08, 5.39717505e-11)


@dataclass
class LFMParams:
    schedule: str = "fitted"  # fitted: official polynomial (Crema_epoch.py l.47-53) | constant
    alpha_sup: float = 0.5  # schedule=constant only: alpha_sup (alpha_align = 1 - alpha_sup)
    horizon: int = 0  # > 0: evaluate the fit at epoch * horizon / epochs (official run: 200 epochs); 0: epoch
    divergence: str = "code"  # code: 1/2 [KL(m||p) + KL(m||q)] (official Alignment) | js


def lfm_alpha(epoch: float, schedule: str = "fitted", alpha_sup: float = 0.5) -> tuple[float, float]:
    """(L3): (alpha_sup, alpha_align) at `epoch`."""
    if schedule == "constant":
        return float(alpha_sup), 1.0 - float(alpha_sup)
    return (sum(c * epoch ** i for i, c in enumerate(FIT_SUP)),
            sum(c * epoch ** i for i, c in enumerate(FIT_ALIGN)))


def alignment(zp: torch.Tensor, zq: torch.Tensor, divergence: str = "code") -> torch.Tensor:
    """(L2) between two modalities' logits, batch-mean."""
    p, q = F.softmax(zp.float(), -1), F.softmax(zq.float(), -1)
    m = 0.5 * p + 0.5 * q
    lp, lq, lm = F.log_softmax(zp.float(), -1), F.log_softmax(zq.float(), -1), m.log()
    if divergence == "code":  # F.kl_div(p.log(), m) = sum m (log m - log p): KL(m || p)
        kl_p, kl_q = (m * (lm - lp)).sum(-1), (m * (lm - lq)).sum(-1)
    else:  # Jensen-Shannon: KL(p || m), KL(q || m)
        kl_p, kl_q = (p * (lp - lm)).sum(-1), (q * (lq - lm)).sum(-1)
    return 0.5 * (kl_p.mean() + kl_q.mean())


@register_method("lfm")
class LFM(Method):
    """2 (alpha_sup(e) CE(fused) + alpha_align(e) D(p_a, p_v)) with the official fitted epoch schedule."""

    Params = LFMParams
    fusions = LFM_FUSIONS
    fusion_need = "aligns the modalities' own predictions"
    tasks = ("classification",)  # (L2) compares class distributions

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"{self.name} supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        if params.schedule not in SCHEDULES:
            raise ValueError(f"methods.lfm.schedule={params.schedule!r} not in {SCHEDULES} (params.yaml)")
        if params.divergence not in DIVERGENCES:
            raise ValueError(f"methods.lfm.divergence={params.divergence!r} not in {DIVERGENCES} (params.yaml)")
        if not 0.0 <= params.alpha_sup <= 1.0 or params.horizon < 0:
            raise ValueError("methods.lfm.alpha_sup must be in [0, 1] and methods.lfm.horizon >= 0 (params.yaml)")

    def alphas(self, ctx) -> tuple[float, float]:
        e = ctx.epoch * self.params.horizon / ctx.epochs if self.params.horizon > 0 else ctx.epoch
        return lfm_alpha(e, self.params.schedule, self.params.alpha_sup)

    def loss(self, batch, out, ctx):
        a_sup, a_align = self.alphas(ctx)
        mods = self.modalities()
        sup = task_loss(self.spec, out.fused, batch["label"])  # (L1)
        pairs = list(combinations(mods, 2))
        d = (sum(alignment(out.logits[a], out.logits[b], self.params.divergence) for a, b in pairs) / len(pairs)
             if pairs else sup.new_zeros(()))
        ctx.record(alpha_sup=a_sup, alpha_align=a_align, align=d.detach())
        return {"task": 2 * a_sup * sup, "align": 2 * a_align * d}  # (L4)
