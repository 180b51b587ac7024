"""MBSD, as implemented by BalanceBenchmark (GeWu-Lab/BalanceBenchmark, README "Objective methods: ... MBSD ...").

The paper behind the name could NOT be established: BalanceBenchmark's README and code name the method only as
"MBSD" (no citation, no docstring; its commits are "MBSD三模态", "modify PMR and MBSD logging"), and no copy of
the BalanceBenchmark paper's Section 3 (arXiv 2502.10816, which cites it) or of an MBSD paper was found in the
reference corpora. This file therefore reimplements BalanceBenchmark's trainer only - a secondary source - and
the module is to be read as "MBSD (BalanceBenchmark's version)"; no original-paper formula or code was checked.

Sources read: GeWu-Lab/BalanceBenchmark @4c1482fca5aaa8d4278af8e26020daa039e3ccf3
`balancemm/trainer/MBSD_trainer.py` (`training_step` l.95-231: k = 2 branch l.130-159, k = 3 branch l.160-224,
outside the window l.226-228) and `configs/trainer_config.yaml` l.47-50 (window 0..80).

Per step, with per-modality read-outs z_m = `out.logits[m]`, p_m = softmax(z_m), C classes, batch size B, and
for a pair of modalities (a, b) and sample i (BalanceBenchmark l.130-158):
  (M1) ps_i = max(p_a[i, y_i], p_b[i, y_i]),  pw_i = min(p_a[i, y_i], p_b[i, y_i])   (true-class probabilities)
  (M2) w_i = ps_i - pw_i if argmax p_a[i] = y_i or argmax p_b[i] = y_i, else 0            (l.147-151)
  (M3) KL_i = pw_i (log pw_i - ps_i): `F.kl_div(ps, pw, reduction='none')` (l.153), i.e. the strong true-class
       probability used as the log-probability input and the weak one as the target - the code's formula,
       elementwise on two scalars, not a KL divergence between distributions.
  (M4) RS_i = (1/C) sum_c (z_a[i, c] - z_b[i, c])^2   (l.132; `rs_on="logits"`); the k = 3 branch (l.197-199)
       uses the probabilities p instead: `rs_on="probs"`.
  (M5) L_KL = (1/B) sum_i w_i KL_i,  L_RS = (1/B) sum_i w_i RS_i  (l.154-158); for k > 2 both are averaged over
       all modality pairs (the k = 3 branch, l.214, l.222); the same for k = 2 (one pair).
  (M6) total  L = CE(fused) + sum_m CE(z_m) + L_RS + L_KL  inside `start_epoch <= epoch <= end_epoch`
       (l.159, l.224); outside it CE(fused) alone (l.228), bitwise Joint-Train.
  `predict` is the fused output.
  The weights w and the ps/pw values keep their graph in the code (they are written into tensors that then
  require grad, l.143-151); `detach_weight: true` detaches w (an option, not the code).

Deviations, numbered:
(1) The original MBSD paper could not be identified or read (see above); everything follows BalanceBenchmark.
(2) BalanceBenchmark's loops over samples are vectorised; the values are the same.
(3) k > 2: all pairs (BalanceBenchmark hard-codes the three pairs of k = 3); RS on logits for every k by
    default (BalanceBenchmark switches to probabilities at k = 3: `rs_on="probs"`).
(4) Read-outs: late/sum/concat heads (`out.logits`); film/gated have no unimodal prediction: refused in
    check_config. Regression is refused (true-class probabilities).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F

from g2d.methods.base import Method, task_loss
from g2d.registry import register_method

MBSD_FUSIONS = ("late", "sum", "concat")
RS_ON = ("logits", "probs")


@dataclass
class MBSDParams:
    start_epoch: int = 0  # BalanceBenchmark trainer_config.yaml MBSD.modulation_starts
    end_epoch: int = 80  # MBSD.modulation_ends
    rs_on: str = "logits"  # logits (BalanceBenchmark k = 2 branch) | probs (its k = 3 branch)
    detach_weight: bool = False  # the code keeps w's graph


def mbsd_pair_terms(za, zb, y, rs_on="logits", detach_weight=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(M1)-(M5) for one modality pair: (L_KL, L_RS), each (1/B) sum_i w_i * term_i."""
    za, zb = za.float(), zb.float()
    pa, pb = F.softmax(za, 1), F.softmax(zb, 1)
    pay, pby = pa.gather(1, y[:, None])[:, 0], pb.gather(1, y[:, None])[:, 0]
    ps, pw = torch.maximum(pay, pby), torch.minimum(pay, pby)  # (M1)
    right = (pa.argmax(1) == y) | (pb.argmax(1) == y)
    w = torch.where(right, ps - pw, torch.zeros_like(ps))  # (M2)
    if detach_weight:
        w = w.detach()
    kl = F.kl_div(ps, pw, reduction="none")  # (M3): pw * (log pw - ps), BalanceBenchmark l.153
    a, b = (za, zb) if rs_on == "logits" else (pa, pb)
    rs = ((a - b) ** 2).sum(1) / za.shape[1]  # (M4)
    n = y.shape[0]
    return (w * kl).sum() / n, (w * rs).sum() / n  # (M5)


@register_method("mbsd")
class MBSD(Method):
    """BalanceBenchmark's MBSD: fused + unimodal CE, confidence-gap-weighted KL and logit-matching terms."""

    Params = MBSDParams
    fusions = MBSD_FUSIONS
    fusion_need = "trains the modalities' own predictions"
    tasks = ("classification",)

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"{self.name} supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        if params.rs_on not in RS_ON:
            raise ValueError(f"methods.mbsd.rs_on={params.rs_on!r} not in {RS_ON} (params.yaml)")

    def in_window(self, epoch: int) -> bool:
        return self.params.start_epoch <= epoch <= self.params.end_epoch

    def loss(self, batch, out, ctx):
        y = batch["label"]
        terms = {"task": task_loss(self.spec, out.fused, y)}
        if not self.in_window(ctx.epoch):
            return terms
        mods = self.modalities()
        terms["uni"] = sum(task_loss(self.spec, out.logits[m], y) for m in mods)  # (M6)
        pairs = list(combinations(mods, 2))
        if pairs:
            kl_rs = [mbsd_pair_terms(out.logits[a], out.logits[b], y, self.params.rs_on, self.params.detach_weight)
                     for a, b in pairs]
            terms["kl"] = sum(k for k, _ in kl_rs) / len(pairs)
            terms["rs"] = sum(r for _, r in kl_rs) / len(pairs)
            ctx.record(mbsd_kl=terms["kl"].detach(), mbsd_rs=terms["rs"].detach())
        return terms
