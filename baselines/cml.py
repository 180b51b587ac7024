"""CML: Calibrating Multimodal Learning (H. Ma, Q. Zhang, C. Zhang, B. Wu, H. Fu, J. T. Zhou, Q. Hu, ICML 2023;
arXiv 2306.01265).

Sources read: the paper's abstract and introduction (the stored text reaches no further: the method section
and its equation numbers could not be read, so the formulas below are labelled (C1)-(C5) and pinned to code);
the official code QingyangZhang/CML @9d2496e6f37ad5571d44165da0a35b4e46c8a1e6 (a missing-view repository:
CPM-Nets and MIWAE, no CREMA-D script): `cpm/CPM_Nets.py` `rank_loss` l.98-124, `train` l.159-168,
`miwae/train.py` `get_multi_mask` l.67-86, stage-2 loss l.274-304, argparse l.123-137; and GeWu-Lab/BalanceBenchmark
@4c1482fca5aaa8d4278af8e26020daa039e3ccf3 `balancemm/trainer/CML_trainer.py` (`conf_loss` l.19-22, `train_loop`
l.62-67, `training_step` l.107-210) and `configs/trainer_config.yaml` l.29-33.

Principle (paper abstract): "the confidence should not increase when one modality is removed".
Per step, with k modalities and the per-modality read-outs z_m = `out.logits[m]`:
  (C1) removal chain: every sample i draws a random order of its k modalities and drops them one at a time,
       S_0 = all modalities, S_j = S_{j-1} minus the j-th modality of the order, j = 1..k-1 (official
       `get_multi_mask` l.67-86: a per-sample `random.shuffle`, redrawn every batch). `order="epoch"`: one
       order for all samples, drawn once per epoch (BalanceBenchmark `train_loop` l.62-67).
  (C2) prediction with a subset S: the fusion head's prediction from the modalities in S only -
       late: mean_{m in S} z_m; sum: sum_{m in S} z_m; concat: sum_{m in S} W_m f_m + b (BalanceBenchmark
       l.185/139: `out_s - unimodal[removed] + fc_out.bias / k`, i.e. the removed modality's weight term taken
       out, the full bias kept). S_0 gives the model's own fused output.
  (C3) confidence conf_S(x_i) = max_c softmax(z_S(x_i))_c, prediction pred_S = argmax (both codes).
  (C4) regulariser, for each link j = 1..k-1 and sample i:
       L_CML = sum_j sum_i ReLU((conf_{S_j,i} - conf_{S_{j-1},i}) * sign_{j,i} - epsilon)
       with `mask="official"` (CPM_Nets l.122, "trick 1"): sign = 0 where the fewer-modality prediction is right
       and the more-modality one wrong (pred_{S_j} = y and pred_{S_{j-1}} != y), else 1; epsilon = 0
       (l.123; miwae `--epsilon` default 0.0); summed over the batch, not averaged (l.123 `.sum()`). Both
       confidences keep their graph (CPM_Nets: neither is detached).
       `hinge="batch"` (BalanceBenchmark `conf_loss` l.22): ReLU(sum_i (conf_{S_j,i} - conf_{S_{j-1},i})) per
       link, the hinge on the batch sum; BalanceBenchmark computes the sign but does not use it: `mask="none"`.
  (C5) total  L = (1/k) sum_{j=0}^{k-1} CE(z_{S_j}, y) + lam * L_CML   (BalanceBenchmark l.193-201:
       `(CE(out) + sum_j CE(out_p)) / k + lam * sum_j conf_loss`; official miwae l.286-304 and CPM_Nets l.164-168
       also average the classification loss over the k nested inputs). `partial_ce: false`: CE(fused) alone
       plus the regulariser (the abstract's "regularization ... flexibly equipped by existing models").
       Outside the window `start_epoch <= epoch <= end_epoch` (BalanceBenchmark `modulation_starts/ends`,
       inclusive) the step is Joint-Train (loss = CE(fused) alone, bitwise).
  lam = 0.1: BalanceBenchmark `CML.lam`; the official miwae run `--beta 10` enters as beta / 100 = 0.1 (l.304).
  `predict` is the fused output.

Deviations and choices, numbered:
(1) The paper's own formula (its equation, which subsets, the mask and margin) could not be read; the default
    follows the official code (per-sample hinge, CPM's trick-1 mask, per-sample random order, sum over the batch).
(2) The official miwae stage 2 uses another mask (l.296: only samples whose more-modality prediction is right)
    plus a "trick 2" term with a detached reference (l.298-302); not implemented (CPM_Nets and BalanceBenchmark
    agree on trick 1 / no mask).
(3) Removing a modality means taking its read-out out of the fusion head (C2), not zero-filling its input
    (the official missing-view code imputes the mean of the missing features; BalanceBenchmark subtracts the
    read-out, followed here). film/gated heads have no per-modality read-out to remove: refused in check_config.
(4) k > 2 follows (C1) directly (the official code handles any number of views; BalanceBenchmark's 3-modality
    branch is the same chain with one order per epoch). Regression is refused (confidence is a softmax maximum).
(5) The random order uses the torch generator (seeded and checkpointed by the trainer); the epoch order
    (`order="epoch"`) is method state, saved in state_dict.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from g2d.methods.base import Method, task_loss
from g2d.models.fusion import ConcatFusion, LateFusion, SumFusion
from g2d.registry import register_method

CML_FUSIONS = ("late", "sum", "concat")
ORDERS = ("sample", "epoch")
HINGES = ("sample", "batch")
MASKS = ("official", "none")


@dataclass
class CMLParams:
    lam: float = 0.1  # BalanceBenchmark trainer_config.yaml CML.lam; official miwae --beta 10 / 100
    order: str = "sample"  # sample: per-sample order per step (official) | epoch: one order per epoch (BB)
    hinge: str = "sample"  # sample: ReLU per sample (official CPM_Nets l.123) | batch: ReLU of the batch sum (BB)
    mask: str = "official"  # official: CPM trick 1 | none (BalanceBenchmark)
    epsilon: float = 0.0  # margin of (C4) (official --epsilon 0.0)
    partial_ce: bool = True  # (C5): CE averaged over the k nested subsets (official and BalanceBenchmark)
    start_epoch: int = 0  # window, inclusive, 0-based (BalanceBenchmark modulation_starts 0)
    end_epoch: int = 80  # BalanceBenchmark modulation_ends 80


def removal_masks(order: torch.Tensor) -> list[torch.Tensor]:
    """(C1): keep-masks (B, k) of S_0..S_{k-1} for per-sample orders `order` (B, k) (a permutation per row)."""
    b, k = order.shape
    keep = torch.ones(b, k, dtype=torch.bool, device=order.device)
    masks = [keep.clone()]
    for j in range(k - 1):
        keep = keep.clone()
        keep[torch.arange(b, device=order.device), order[:, j]] = False
        masks.append(keep)
    return masks


def subset_logits(fusion, z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(C2): the fusion head's prediction from the kept modalities; z (k, B, C) read-outs, keep (B, k)."""
    w = keep.T.to(z.dtype)[:, :, None]  # (k, B, 1)
    total = (w * z).sum(0)
    if isinstance(fusion, LateFusion):
        return total / keep.sum(1, keepdim=True).to(z.dtype)
    if isinstance(fusion, SumFusion):
        return total
    if isinstance(fusion, ConcatFusion):  # shares carry b/k each: put the removed shares' bias back
        k = z.shape[0]
        return total + fusion.fc.bias.to(z.dtype) * ((k - keep.sum(1, keepdim=True)).to(z.dtype) / k)
    raise ValueError(f"cml needs a fusion with per-modality read-outs {CML_FUSIONS}, got {type(fusion).__name__}")


def cml_regulariser(logits_more, logits_fewer, y, hinge="sample", mask="official", epsilon=0.0) -> torch.Tensor:
    """(C3)-(C4) for one link S_{j-1} -> S_j."""
    p_more, p_fewer = F.softmax(logits_more.float(), 1), F.softmax(logits_fewer.float(), 1)
    conf_m, pred_m = p_more.max(1)
    conf_f, pred_f = p_fewer.max(1)
    diff = conf_f - conf_m
    if hinge == "batch":  # BalanceBenchmark conf_loss l.22: max(0, sum(conf_x - conf))
        return F.relu(diff.sum() - epsilon)
    if mask == "official":  # CPM_Nets l.122 trick 1
        sign = (~((pred_f == y) & (pred_m != y))).to(diff.dtype)
        diff = diff * sign
    return F.relu(diff - epsilon).sum()  # CPM_Nets l.123


@register_method("cml")
class CML(Method):
    """CE over nested modality subsets + a hinge on confidence increases when a modality is removed."""

    Params = CMLParams
    fusions = CML_FUSIONS
    fusion_need = "removes a modality's read-out from the fusion head"
    tasks = ("classification",)  # (C3) is a softmax maximum

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"{self.name} supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        for key, allowed in (("order", ORDERS), ("hinge", HINGES), ("mask", MASKS)):
            if getattr(params, key) not in allowed:
                raise ValueError(f"methods.cml.{key}={getattr(params, key)!r} not in {allowed} (params.yaml)")
        if params.lam < 0 or params.epsilon < 0:
            raise ValueError("methods.cml.lam and methods.cml.epsilon must be >= 0 (params.yaml)")
        self.fusion = None
        self.epoch_order: torch.Tensor | None = None  # (k,) the epoch's removal order (order="epoch")
        self.order_epoch = -1

    def setup(self, model, ctx) -> None:
        if not isinstance(model.fusion, (LateFusion, SumFusion, ConcatFusion)):
            raise ValueError(f"cml needs model.fusion in {CML_FUSIONS}, got {type(model.fusion).__name__}")
        self.fusion = model.fusion

    def on_epoch_start(self, model, ctx) -> None:
        if self.params.order == "epoch" and self.order_epoch != ctx.epoch:
            self.epoch_order = torch.randperm(len(self.modalities()))
            self.order_epoch = ctx.epoch

    def in_window(self, epoch: int) -> bool:
        return self.params.start_epoch <= epoch <= self.params.end_epoch

    def _orders(self, b: int, device) -> torch.Tensor:
        k = len(self.modalities())
        if self.params.order == "epoch":
            if self.epoch_order is None:
                raise RuntimeError("cml: order='epoch' needs on_epoch_start before the first step")
            return self.epoch_order.to(device)[None, :].expand(b, k)
        return torch.rand(b, k).argsort(1).to(device)  # (C1) official: a fresh order per sample per step

    def loss(self, batch, out, ctx):
        y = batch["label"]
        if not self.in_window(ctx.epoch) or len(self.modalities()) < 2:
            return {"task": task_loss(self.spec, out.fused, y)}
        if self.fusion is None:
            raise RuntimeError("cml: setup(model, ctx) was not called")
        p, mods = self.params, self.modalities()
        z = torch.stack([out.logits[m].float() for m in mods])  # (k, B, C)
        masks = removal_masks(self._orders(y.shape[0], z.device))
        chain = [out.fused.float()] + [subset_logits(self.fusion, z, keep) for keep in masks[1:]]  # (C2)
        reg = sum(cml_regulariser(chain[j - 1], chain[j], y, p.hinge, p.mask, p.epsilon)
                  for j in range(1, len(chain)))
        if p.partial_ce:  # (C5)
            task = sum(task_loss(self.spec, zs, y) for zs in chain) / len(chain)
        else:
            task = task_loss(self.spec, out.fused, y)
        ctx.record(cml_reg=reg.detach())
        return {"task": task, "cml": p.lam * reg}

    def state_dict(self) -> dict:
        return {"epoch_order": None if self.epoch_order is None else self.epoch_order.clone(),
                "order_epoch": self.order_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_order = None if state["epoch_order"] is None else state["epoch_order"].clone()
        self.order_epoch = int(state["order_epoch"])
