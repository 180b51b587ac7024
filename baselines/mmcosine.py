"""MMCosine: multi-modal cosine loss (Xu, Feng, Zhang, Hu, ICASSP 2023, arXiv 2303.05338), one linear head per modality.

Formulas (paper §2 "Method", the MMCosine loss; each cited to the official code that implements it):
  (1) per-modality logits  z_m = s * (f_m / |f_m|) (W_m / |W_m|_row)^T, i.e. z_m,j = s cos(theta_m,j), the cosine
      between modality m's encoder feature f_m and the j-th row (class j) of its head weight W_m; no bias.
      GeWu-Lab/MMCosine_ICASSP23:main_CD.py@00ba0a9 `train_epoch`: `torch.mm(F.normalize(a, dim=1),
      F.normalize(fc_out.weight[:, :512].T, dim=0)) * args.scaling`, the same for v with the columns 512:.
  (2) fused logits  z = sum_m z_m = s sum_m cos(theta_m,j)  (main_CD.py@00ba0a9: `out = out_a + out_v`).
  (3) loss  L = CE(z, y) = -log softmax(z)_y, averaged over the batch (main_CD.py@00ba0a9: `criterion(out, label)`).
  (4) prediction  argmax_j z_j, the same rule as training (paper; BalanceBenchmark).
k >= 2 modalities: the sum in (2) runs over all of them (the paper has audio + visual only; BalanceBenchmark sums
three, GeWu-Lab/BalanceBenchmark:balancemm/trainer/MMCosine_trainer.py@4c1482f `training_step`). The paper's
equation numbers could not be checked here: the stored copies of its text reach only the abstract and introduction
("a modality-wise L2 normalization to features and weights"); the formulas follow the official code above.

Where the head lives: the official model is one concat layer `fc_out` whose column block W[:, cols of m] is
modality m's weight, bias never used by the loss. Here each modality has its own head (`model.fusion: late|sum`):
W_m = `model.fusion.heads[m].weight`, the same matrix without the slicing; its bias b_m gets no gradient, as the
official `fc_out.bias`. The trained parameters are the encoders and the head weights. The loss and `predict`
compute (1)-(2) from `out.features` and those weights (not from the model's forward), so they hold whatever the
model's forward returns. `setup` also hooks each head so that `out.logits[m]` is z_m of (1): the trainer's
per-modality metrics (`acc_<m>`) then report the cosine read-out this method trains, as the official `valid()`
does for acc_a / acc_v (without the hook they would report W_m f_m + b_m, a rule nobody trained). No file under
g2d/ changes and state_dict keys are the model's own (a hook is not state). With `late` the model's own `fused`
output becomes mean_m z_m (= z / k, same argmax); `predict` returns z. concat/film/gated are refused in
`check_config`: concat's per-modality read-out is computed inline (nothing to hook), film/gated read out a
conditioned projection, not f_m (the official film/gated variants normalise their mid-fusion features instead).

Deviations and options, cited:
  (a) `fused_eval="cosine"` (default, the paper's rule and BalanceBenchmark's `validation_step`) predicts with (2).
      The official `valid()` (main_CD.py@00ba0a9) computes the cosine logits only for acc_a / acc_v and predicts the
      fused class from the model's plain output `fc_out([a; v]) = W [a; v] + b`, unnormalised:
      `fused_eval="linear"` reproduces it as sum_m (W_m f_m + b_m) (b_m stay at their zero init: no gradient).
  (b) s: the official README's CREMA-D command `main_CD.py --train --fusion_method gated --mmcosine True
      --scaling 10` and the `--scaling` default (main_CD.py@00ba0a9) give s = 10 (params.yaml `methods.mmcosine`).
      BalanceBenchmark uses s = 15 (configs/trainer_config.yaml@4c1482f `MMCosine.scaling`).
  (c) BalanceBenchmark applies the cosine loss only inside a window `modulation_starts <= epoch <= modulation_ends`
      (0..80) and trains plain CE on the model's output outside it; the original (and this file) uses it every epoch.
      BalanceBenchmark also slices one concat `fc_out` per modality by feature size, as the original.
  (d) The official `--lam` NCE term (supplementary material; default 0, main_CD.py@00ba0a9) is left out.
  (e) Per-modality CE values of the official loop are only logged there; here `ctx.record` logs the batch mean of
      the true-class cosine per modality (`cos_<m>`, the official tensorboard `logit_a/v` divided by s).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from g2d.methods.base import Method, task_loss
from g2d.models.fusion import LateFusion, SumFusion
from g2d.registry import register_method

FUSED_EVAL = ("cosine", "linear")
HEAD_FUSIONS = ("late", "sum")


@dataclass
class MMCosineParams:
    # s in (1); CREMA-D: 10, official README command `--scaling 10` (MMCosine_ICASSP23 @00ba0a9); BalanceBenchmark 15
    scale: float = 10.0
    fused_eval: str = "cosine"  # cosine: predict with (2) (paper) | linear: sum_m W_m f_m + b_m (official valid())


def cosine_logits(f: torch.Tensor, w: torch.Tensor, s: float) -> torch.Tensor:
    """(1): s * (f/|f|) (w/|w|)^T for features f (B, d) and head weight w (C, d): rows normalised, no bias."""
    return s * (F.normalize(f.float(), dim=1) @ F.normalize(w.float(), dim=1).T)


class _CosineReadout:
    """Forward hook on a head: its output becomes z_m of (1), so `out.logits[m]` is the cosine read-out."""

    def __init__(self, s: float):
        self.s = s

    def __call__(self, module, args, output):
        return cosine_logits(args[0], module.weight, self.s).to(output.dtype)


@register_method("mmcosine")
class MMCosine(Method):
    Params = MMCosineParams
    fusions = HEAD_FUSIONS
    fusion_need = "needs one linear head per modality"
    tasks = ("classification",)  # (3) is a softmax cross-entropy over class logits

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"mmcosine supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        if not params.scale > 0:
            raise ValueError(f"methods.mmcosine.scale={params.scale!r} must be > 0 (params.yaml)")
        if params.fused_eval not in FUSED_EVAL:
            raise ValueError(f"methods.mmcosine.fused_eval={params.fused_eval!r} not in {FUSED_EVAL} (params.yaml)")
        self.heads = None  # the model's per-modality heads (model.fusion.heads), set in setup
        self._hooks: list = []

    def setup(self, model, ctx) -> None:
        if not isinstance(model.fusion, (LateFusion, SumFusion)):
            raise ValueError(f"mmcosine needs one linear head per modality: set model.fusion=late (or sum), "
                             f"got {type(model.fusion).__name__}")
        for h in self._hooks:  # setup again (resume): never two hooks on one head
            h.remove()
        self.heads = model.fusion.heads
        self._hooks = [self.heads[m].register_forward_hook(_CosineReadout(self.params.scale))
                       for m in self.modalities()]

    def _heads(self):
        if self.heads is None:
            raise RuntimeError("mmcosine: setup(model, ctx) was not called")
        return self.heads

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """z_m of (1) for every modality, from the encoder features and the head weights."""
        heads = self._heads()
        return {m: cosine_logits(feats[m], heads[m].weight, self.params.scale) for m in self.modalities()}

    def fused_logits(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.unimodal_logits(feats).values())  # (2): z = sum_m z_m

    def loss(self, batch, out, ctx):
        y = batch["label"]
        per = self.unimodal_logits(out.features)
        with torch.no_grad():  # (e): mean true-class cosine per modality
            ctx.record(**{f"cos_{m}": z.gather(1, y[:, None]).mean() / self.params.scale for m, z in per.items()})
        return {"task": task_loss(self.spec, sum(per.values()), y)}  # (3): CE on (2)

    def predict(self, out) -> torch.Tensor:
        if self.params.fused_eval == "linear":  # (a): the official valid()'s unnormalised fused output
            heads = self._heads()
            return sum(F.linear(out.features[m].float(), heads[m].weight.float(), heads[m].bias.float())
                       for m in self.modalities())
        return self.fused_logits(out.features)  # (4): the training rule (2)
