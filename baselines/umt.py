"""UMT and UME (Du et al., ICML 2023, "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning").

UMT (`umt`): the late-fusion student is trained with CE(fused, y) + lambda * sum_m MSE(h_m^S, h_m^T):
frozen unimodal teachers (the project's `unimodal` runs, same encoder and data) distil their
encoder features into the student's encoders before fusion. MSE is the mean over all elements
(nn.MSELoss), lambda = 10 as in BalanceBenchmark's UMT trainer (the paper's value was not
retrieved; baselines-spec §7.4). Teachers run in eval mode under no_grad (`ctx.teacher_outputs`).

UME (`ume`): M unimodal models trained independently with CE, predictions averaged with equal
weights. Rather than re-reading the teacher runs at evaluation time (the trainer's `predict(out)`
sees only the trained model's Output), UME trains the M unimodal models inside its own run: the
loss is sum_m CE(logits_m, y) on a model whose per-modality heads share no parameters (late or
sum fusion, checked in `setup`), so each encoder+head pair receives exactly the gradient of its
own unimodal loss, i.e. M independent unimodal trainings on the same batches (the optimiser is
per-parameter). `trainer.grad_clip` clips each unimodal model's gradient norm (encoder_m + head_m)
separately, which is what M separate trainings with that option would do (one global norm would
couple them). A fusion whose heads share parameters is refused at config time (`check_config`). `predict`
averages the M predictions (logits by default; `combine: probs` averages softmax probabilities).
The trainer's per-modality metrics of a UME run are then the unimodal models' own accuracies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from g2d.methods.base import Method, task_loss
from g2d.models.fusion import LateFusion, SumFusion
from g2d.registry import register_method


@dataclass
class UMTParams:
    weight: float = 10.0  # lambda on the feature distillation (BalanceBenchmark; spec §7.4)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """UMT feature distillation ||h^S - h^T||^2, mean over elements (UMT paper, UMT objective; spec §7.1)."""
    return F.mse_loss(student.float(), teacher.detach().float())


@register_method("umt")
class UMT(Method):
    Params = UMTParams
    needs_teachers = True

    def setup(self, model, ctx):
        missing = [m for m in model.modalities if m not in ctx.teachers]
        if missing:
            raise RuntimeError(f"umt: no teacher loaded for modalities {missing}; train the unimodal "
                               "teachers first (suite.teachers in params.yaml)")
        for m, t in ctx.teachers.items():
            t.eval()  # spec §7.6.1: frozen BN statistics
            for p in t.parameters():
                p.requires_grad_(False)
            td, sd = t.encoders[m].out_dim, model.encoders[m].out_dim
            if td != sd:
                raise ValueError(f"umt: teacher-{m} feature width {td} != student {sd}; teachers must be "
                                 "trained with the same model.* settings as the student")

    def loss(self, batch, out, ctx):
        teach = ctx.teacher_outputs(batch)
        terms = {"task": task_loss(self.spec, out.fused, batch["label"])}
        for m, h in out.features.items():
            terms[f"distill_{m}"] = self.params.weight * distill_loss(h, teach[m].features[m])
        return terms


@dataclass
class UMEParams:
    combine: str = "logits"  # logits (average of logits) | probs (average of softmax probabilities)


@register_method("ume")
class UME(Method):
    Params = UMEParams
    fusions = ("late", "sum")
    fusion_need = "needs independent per-modality heads"

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if params.combine not in ("logits", "probs"):
            raise ValueError(f"methods.ume.combine={params.combine!r} not in (logits, probs) (params.yaml)")
        if params.combine == "probs" and spec.task != "classification":
            raise ValueError("methods.ume.combine=probs needs a classification dataset; use logits")

    def setup(self, model, ctx):
        independent = isinstance(model.fusion, (LateFusion, SumFusion))
        if not independent:
            raise ValueError(f"ume needs independent per-modality heads: model.fusion must be late or sum, "
                             f"got {type(model.fusion).__name__} (set model.fusion=late for ume)")

    def clip_gradients(self, model, ctx):
        """Per unimodal model: ||grad(encoder_m, head_m)|| <= trainer.grad_clip, each on its own."""
        if ctx.grad_clip <= 0:
            return
        heads = model.head_parameters()
        for m, enc in model.modality_parameters().items():
            nn.utils.clip_grad_norm_([*enc, *heads[m]], ctx.grad_clip)

    def loss(self, batch, out, ctx):
        # independent unimodal CE per modality, no fused loss (UME, spec §7.1)
        return {f"uni_{m}": task_loss(self.spec, z, batch["label"]) for m, z in out.logits.items()}

    def predict(self, out):
        zs = torch.stack([z.float() for z in out.logits.values()])
        if self.params.combine == "probs":
            zs = zs.softmax(-1)
        return zs.mean(0)  # equal-weight ensemble of the unimodal predictions (spec §7.1)
