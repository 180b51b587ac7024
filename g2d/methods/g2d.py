"""G2D: Gradient-Guided Distillation (Rakib & Bagavathi, ICCV 2025, arXiv 2506.21514).

L_G2D = w_task L_S + sum_m w_feat^m L_feat^m + sum_m w_logit^m L_logit^m   (paper Eq. L_G2D), with
  L_S          CE on the fused prediction (MSE for regression),
  L_feat^m     F.mse_loss(f_s^m, f_t^m): element mean, as the official code (paper: per-sample ||.||^2),
  L_logit^m    T^2 KL(softmax(l_t^m / T) || softmax(l_s / T)), batchmean: every teacher distils into the
               *fused* student output, as the official code. Regression: MSE(l_s, l_t^m), T unused.
Registered variants: `g2d` (loss + SMP, g2d/methods/smp.py), `g2d-nosmp` (loss alone) and
`g2d-partial` (loss + SMP with OGM-GE-style partial suppression instead of kappa = 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from g2d.methods.base import Method, task_loss
from g2d.methods.smp import smp, teacher_confidence
from g2d.registry import register_method


@dataclass
class G2DParams:
    task_weight: float = 1.0  # ce_loss_weight (official 1.0)
    feature_weight: float = 1.0  # alpha in the paper; official {audio,video}_feature_loss_weight = 1.0
    logit_weight: float = 1.0  # beta in the paper; official logit_{audio,video}_loss_weight = 1.0
    temperature: float = 1.0  # official temp_audio = temp_video = 1
    # per-modality overrides, e.g. {visual: 0.5}; modalities not named use the global value
    feature_weights: dict[str, float] = field(default_factory=dict)
    logit_weights: dict[str, float] = field(default_factory=dict)
    temperatures: dict[str, float] = field(default_factory=dict)


def kd_logit(task: str, student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    """T^2 KL(p_t || p_s) with batchmean (Hinton et al. 2015; G2D L_logit); MSE for regression."""
    if task == "regression":
        return F.mse_loss(student.float(), teacher.float())
    return F.kl_div(F.log_softmax(student.float() / temp, dim=1), F.softmax(teacher.float() / temp, dim=1),
                    reduction="batchmean") * temp**2


@register_method("g2d-nosmp")
class G2DLoss(Method):
    """The G2D distillation loss without SMP ("G2D loss w/o SMP" row of the paper's SMP ablation)."""

    Params = G2DParams
    needs_teachers = True

    def __init__(self, params, spec):
        super().__init__(params, spec)
        mods = set(self.modalities())
        for key in ("feature_weights", "logit_weights", "temperatures"):
            unknown = set(getattr(params, key)) - mods
            if unknown:
                raise ValueError(f"methods.{self.name}.{key}: unknown modalities {sorted(unknown)}; "
                                 f"{spec.name} has {sorted(mods)}")
        bad = [m for m in mods if self._get("temperatures", "temperature", m) <= 0]
        if bad:
            raise ValueError(f"methods.{self.name}.temperature(s) must be > 0 (modalities {bad})")

    def _get(self, per: str, glob: str, m: str) -> float:
        return float(getattr(self.params, per).get(m, getattr(self.params, glob)))

    def loss(self, batch, out, ctx):
        p = self.params
        teach = ctx.teacher_outputs(batch)
        terms = {}
        if p.task_weight:
            terms["task"] = p.task_weight * task_loss(self.spec, out.fused, batch["label"])
        for m in self.modalities():
            t = teach[m]
            w_feat = self._get("feature_weights", "feature_weight", m)
            if w_feat:
                fs, ft = out.features[m], t.features[m]
                if fs.shape != ft.shape:
                    raise ValueError(
                        f"g2d feature distillation, modality {m!r}: student features {tuple(fs.shape)} vs "
                        f"teacher {tuple(ft.shape)}; teachers must be trained with the same model.* config "
                        "as the student (retrain them after changing model.* in params.yaml)")
                terms[f"kd_feat_{m}"] = w_feat * F.mse_loss(fs.float(), ft.float())
            w_logit = self._get("logit_weights", "logit_weight", m)
            if w_logit:
                temp = self._get("temperatures", "temperature", m)
                terms[f"kd_logit_{m}"] = w_logit * kd_logit(self.spec.task, out.fused, t.logits[m], temp)
        if not getattr(self, "smp_scores_confidence", False):
            conf = teacher_confidence(self.spec, teach, batch["label"])
            ctx.record(**{f"conf_{m}": v for m, v in conf.items()})
        return terms


G2D = register_method("g2d")(smp(G2DLoss))
G2D.__doc__ = "G2D: distillation loss + SMP with complete suppression (the paper's method)."


@dataclass
class G2DPartialParams(G2D.Params):
    smp_suppression: str = "partial"  # OGM-GE-style 1 - tanh(alpha * rho) instead of kappa = 0


@register_method("g2d-partial")
class G2DPartial(G2D):
    """Partial-suppression ablation (paper: complete vs partial suppression table)."""

    Params = G2DPartialParams
