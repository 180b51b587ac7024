"""Gradient-Blending (G-Blend): W. Wang, D. Tran, M. Feiszli, "What Makes Training Multi-modal Classification
Networks Hard?", CVPR 2020 (arXiv 1905.12681).

Sources read. The paper's introduction (arXiv 1905.12681v5 text) and abstract; its method section (§3: the
overfitting-to-generalisation ratio, the optimal-blend proposition, Algorithms "Offline / Online G-Blend")
could NOT be retrieved in the session that wrote this file, so its formulas are labelled (O), (OGR), (W), (L)
below from what the two reference implementations compute, and equation numbers are not given (to be added
from the PDF). Reference code read (G-Blend's authors released none for this setting):
  - pliang279/MultiBench @49f9be224f342de005b7f001281f33df4301eb22 `training_structures/gradient_blend.py`:
    `train_unimodal` l.46-94, `train_multimodal` l.154-200 (the weight of one head), `gb_estimate` l.203-247
    (copies of the encoders/heads trained for `gb_epoch` epochs from the current weights, normalised),
    `train` l.297-379 (held-out split `v_rate` l.332-344, one estimate per `gb_epoch` epochs l.352-358,
    blended loss l.365-377);
  - GeWu-Lab/BalanceBenchmark @4c1482fca5aaa8d4278af8e26020daa039e3ccf3 `balancemm/trainer/GBlending_trainer.py`
    (`fit` l.89-106: re-estimate every `super_epoch` epochs; `training_step` l.292-303; `super_epoch_origin`
    l.306-376) and `configs/trainer_config.yaml` l.34-39 (GBlending: online, super_epoch 10).

Heads. The paper trains one classifier head per modality on its encoder's features plus the multimodal head
(late fusion by concatenation), with loss (L) = sum_k w_k L_k over the k unimodal heads and the fused head.
`heads="aux"` (default; paper, MultiBench `unimodal_classification_heads`): the unimodal heads are this
method's own linear heads (`model.aux[m]`, as MMPareto's), the fused head is the model's fusion head.
`heads="model"` (BalanceBenchmark): the unimodal predictions are the fusion head's per-modality read-outs
`out.logits[m]` (BalanceBenchmark `unimodal_result`: f_m W_m^T + b/2); no aux heads.

Per estimation, for each head j in (m_1, ..., m_k, fused), a copy ("shadow") of the current model's part that
head j needs (unimodal: encoder m + head m; fused: all encoders + the fusion head) is trained alone on the
training samples with loss L_j for `super_epoch` epochs (MultiBench `gb_estimate`, BalanceBenchmark
`super_epoch_origin`), each with a fresh optimizer of the main one's type and hyper-parameters. With L^T the
training loss and L^V the held-out loss of shadow j at the start (s) and end (e) of that window:
  (O)   O = L^V - L^T                                                  (overfitting; both references)
  (OGR) dO = O_e - O_s,  dG = L^V_s - L^V_e                            (paper's OGR = |dO / dG|)
  (W)   w_j = |dG_j| / dO_j^2,  w_j <- w_j / sum_i w_i                 (`estimate="delta"`, default: the paper's
        dG / dO^2 and BalanceBenchmark l.361-372, which takes |.| too); `estimate="final"` is MultiBench's
        default (`delta = False`, l.13, l.85-94): w_j = |L^V_e| / max(O_e, 1e-4)^2 (O_e < 0 -> 1e-4).
        dO^2 is floored at 1e-12; a weight vector that is zero or non-finite is replaced by uniform weights.
  (L)   main loss  sum_m w_m task(uni_m, y) + w_fused task(fused, y)  (MultiBench l.369-374; BalanceBenchmark
        l.300-301 sums the unimodal results and 'output' likewise). Prediction: the fused head.
`online=True` (default, BalanceBenchmark `method: online`): a new estimate every `super_epoch` epochs;
`online=False` (offline G-Blend): one estimate, from the initial weights, then fixed.

Held-out data (the Method protocol has no validation hook; g2d/train is not changed). As MultiBench (l.332-344),
a fixed fraction `v_rate` of the TRAINING samples is held out: sample i (the batch's stable `index`) is held out
iff u(i) < v_rate, u a fixed integer hash of (index, `holdout_seed`) into [0, 1) (`holdout_fraction`), the same
for every run seed. Held-out samples never train anything (main model nor shadows); they only give L^V. The
main model therefore trains on about (1 - v_rate) of the training set (MultiBench: the same).

Deviations (numbered):
(1) Losses measured along the way. The references evaluate L^T, L^V at the checkpoints (MultiBench: full
    passes before and after the window; BalanceBenchmark: the train loss accumulated during the window's first
    and last epoch and a validation pass after each). The protocol gives no data pass, so L^T_s, L^V_s are the
    sample-weighted means over the window's FIRST epoch of each shadow's pre-step losses on the training
    samples (train mode) and on the held-out samples of the same batches (eval mode, no grad), and L^T_e, L^V_e
    those of its LAST epoch; hence `super_epoch >= 2`. (BalanceBenchmark sums, rather than averages, the
    batch losses, mixing the train and validation set sizes in O: not followed.)
(2) Timing (`schedule`). The references first train the shadows for a window from theta_t, then train the main
    model for a window from theta_t with the new weights (so a window's compute is doubled). Within a
    fixed epoch budget: `schedule="lagged"` (default) trains the main model every epoch and the shadows
    alongside it on the same batches; the weights estimated over window i (from the main model at its start)
    are used in window i+1, and window 0 uses uniform weights 1/(k+1). `schedule="sequential"` keeps the
    references' order: estimation windows (shadows train, the main model does not step) alternate with
    training windows that use the estimate just made; the main model then gets half of the epochs
    (offline: all windows after the first).
(3) MultiBench also fine-tunes the multimodal head after every window (l.380-420): not in the paper's
    algorithm, not done. BalanceBenchmark's unimodal shadows are the whole model with the other modalities'
    inputs zeroed, read out at the fused head, and it uses the real validation split: not followed (paper:
    unimodal networks; no validation split is available to a method here).
(4) Shadows' learning rate follows the main optimizer's current one at each epoch start; their gradients are
    clipped with `trainer.grad_clip` like the main model's. BN statistics of held-out forwards are not updated.
(5) k modalities: k unimodal heads + the fused head, k + 1 weights (the paper blends RGB, flow and audio).
    Regression: the task loss is MSE instead of CE in every formula (`g2d.methods.base.task_loss`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from baselines.mmpareto import unimodal_heads
from g2d.methods.base import Method, task_loss
from g2d.registry import register_method

ESTIMATES = ("delta", "final")
HEADS = ("aux", "model")
SCHEDULES = ("lagged", "sequential")
FUSED = "fused"
_TWO32 = 2 ** 32


@dataclass
class GBlendParams:
    super_epoch: int = 10  # BalanceBenchmark configs/trainer_config.yaml@4c1482f l.38 (GBlending.super_epoch)
    online: bool = True  # BalanceBenchmark l.35 (method: online); False = offline G-Blend
    estimate: str = "delta"  # delta: |dG| / dO^2 (paper, BalanceBenchmark) | final: MultiBench delta=False
    heads: str = "aux"  # aux: own unimodal heads (paper, MultiBench) | model: fusion read-outs (BalanceBenchmark)
    schedule: str = "lagged"  # lagged | sequential (deviation 2)
    v_rate: float = 0.08  # held-out fraction of the training samples (MultiBench train() default v_rate)
    holdout_seed: int = 0  # salt of the held-out hash (fixed across run seeds)


def holdout_fraction(index: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """u(i) in [0, 1): a fixed integer hash of the sample id (no int64 overflow: every product < 2^63)."""
    h = (index.long() % _TWO32 + (seed % 65536) * 7919) * 2654435761 % _TWO32
    h = (h ^ (h >> 16)) * 73244475 % _TWO32
    h = h ^ (h >> 16)
    return h.double() / _TWO32


def blend_weights(start: torch.Tensor, end: torch.Tensor, estimate: str = "delta") -> torch.Tensor:
    """Normalised G-Blend weights from (J, 2) [L^T, L^V] at the window's start and end (formulas (O)-(W))."""
    if estimate not in ESTIMATES:
        raise ValueError(f"methods.gblend.estimate={estimate!r} not in {ESTIMATES} (params.yaml)")
    start, end = start.double(), end.double()
    o_s, o_e = start[:, 1] - start[:, 0], end[:, 1] - end[:, 0]  # (O) O = L^V - L^T
    if estimate == "delta":
        g, o = start[:, 1] - end[:, 1], o_e - o_s  # (OGR) dG = L^V_s - L^V_e, dO = O_e - O_s
    else:  # MultiBench gradient_blend.py@49f9be2 l.89-92: g = L^V_e, o = O_e, o < 0 -> 1e-4
        g, o = end[:, 1], torch.where(o_e < 0, torch.full_like(o_e, 1e-4), o_e)
    w = g.abs() / (o * o).clamp_min(1e-12)  # (W) w = dG / dO^2, |.| as both references
    z = w.sum()
    if not bool(torch.isfinite(z)) or float(z) <= 0:
        return torch.full_like(w, 1.0 / len(w))
    return w / z


@register_method("gblend")
class GBlend(Method):
    """Loss-weighted multi-task training, weights from each head's overfitting-to-generalisation behaviour."""

    Params = GBlendParams

    def __init__(self, params, spec):
        super().__init__(params, spec)
        p = params
        for name, val, allowed in (("estimate", p.estimate, ESTIMATES), ("heads", p.heads, HEADS),
                                   ("schedule", p.schedule, SCHEDULES)):
            if val not in allowed:
                raise ValueError(f"methods.gblend.{name}={val!r} not in {allowed} (params.yaml)")
        if int(p.super_epoch) < 2:
            raise ValueError(f"methods.gblend.super_epoch={p.super_epoch} must be >= 2: the start and end losses "
                             "are the first and last epoch of a window (params.yaml)")
        if not 0.0 < p.v_rate < 1.0:
            raise ValueError(f"methods.gblend.v_rate={p.v_rate} must be in (0, 1) (params.yaml)")
        self.heads = (*self.modalities(), FUSED)
        self.weights: torch.Tensor | None = None  # (k+1,), None: uniform (no estimate yet)
        self.shadows: nn.ModuleDict | None = None  # the estimation copies, while a window is estimating
        self.shadow_opts: dict[str, torch.optim.Optimizer] = {}
        self.hist: list[torch.Tensor] = []  # per epoch of the window: (k+1, 4) [sum L^T, n_T, sum L^V, n_V]
        self.done_epoch = -1  # last epoch on_epoch_start handled
        self._pending: dict | None = None  # shadow state loaded before setup() has the model

    # -- schedule ------------------------------------------------------------------------------------------
    def estimating(self, epoch: int) -> bool:
        """Whether the window holding `epoch` trains shadows (formula windows: deviation 2)."""
        i, p = epoch // self.params.super_epoch, self.params
        if p.schedule == "lagged":
            return p.online or i == 0
        return i % 2 == 0 if p.online else i == 0

    def main_trains(self, epoch: int) -> bool:
        return self.params.schedule == "lagged" or not self.estimating(epoch)

    def current_weights(self, device) -> torch.Tensor:
        if self.weights is None:
            return torch.full((len(self.heads),), 1.0 / len(self.heads), device=device)
        return self.weights.to(device)

    # -- modules -------------------------------------------------------------------------------------------
    def aux_module(self, model):
        return unimodal_heads(model) if self.params.heads == "aux" else None

    def _make_shadows(self, model) -> nn.ModuleDict:
        sh = {}
        for m in self.modalities():
            head = copy.deepcopy(model.aux[m] if self.params.heads == "aux" else model.fusion)
            sh[m] = nn.ModuleDict({"enc": copy.deepcopy(model.encoders[m]), "head": head})
        sh[FUSED] = nn.ModuleDict({"enc": copy.deepcopy(model.encoders), "head": copy.deepcopy(model.fusion)})
        return nn.ModuleDict(sh)

    def _make_opts(self, ctx) -> None:
        opt = ctx.optimizer
        self.shadow_opts = {j: type(opt)(self.shadows[j].parameters(), **opt.defaults) for j in self.heads}
        self._set_lr(ctx)

    def _set_lr(self, ctx) -> None:
        lr = ctx.optimizer.param_groups[0]["lr"]
        for o in self.shadow_opts.values():
            for g in o.param_groups:
                g["lr"] = lr

    def _shadow_out(self, j: str, batch: dict, model) -> torch.Tensor:
        s = self.shadows[j]
        if j == FUSED:
            return s["head"]({m: s["enc"][m](batch[m]) for m in self.modalities()})[0]
        f = s["enc"](batch[j])
        if self.params.heads == "aux":
            return s["head"](f)
        # fusion read-out of modality j; every fusion's per-modality logits depend on f_j alone
        feats = {m: f if m == j else f.new_zeros(f.shape[0], model.encoders[m].out_dim) for m in self.modalities()}
        return s["head"](feats)[1][j]

    def setup(self, model, ctx) -> None:
        if self.params.heads == "aux" and not isinstance(getattr(model, "aux", None), nn.ModuleDict):
            raise RuntimeError("gblend needs its unimodal heads as model.aux (attach method.aux_module(model))")
        if self._pending is not None:  # resume: rebuild the shadows from the model's structure, then load
            st, self._pending = self._pending, None
            self.shadows = self._make_shadows(model).to(ctx.device)
            self.shadows.load_state_dict(st["shadows"])
            self._make_opts(ctx)
            for j, o in self.shadow_opts.items():
                o.load_state_dict(st["opts"][j])
        self.hist = [h.to(ctx.device) for h in self.hist]
        if self.weights is not None:
            self.weights = self.weights.to(ctx.device)

    # -- epochs ----------------------------------------------------------------------------------------------
    def on_epoch_start(self, model, ctx) -> None:
        e = ctx.epoch
        if e <= self.done_epoch:
            return
        self.done_epoch = e
        if e % self.params.super_epoch == 0:
            if self.shadows is not None:  # a window's estimate is complete
                self._finish_estimate()
            if self.estimating(e):
                self.shadows = self._make_shadows(model).to(ctx.device)
                self._make_opts(ctx)
                self.hist = []
        if self.shadows is not None:
            self._set_lr(ctx)
            self.hist.append(torch.zeros(len(self.heads), 4, device=ctx.device))

    def _finish_estimate(self) -> None:
        start, end = self.hist[0], self.hist[-1]
        ok = bool((start[:, [1, 3]] > 0).all() and (end[:, [1, 3]] > 0).all())
        if ok:  # (1): epoch means of the window's first and last epoch
            s = torch.stack([start[:, 0] / start[:, 1], start[:, 2] / start[:, 3]], 1)
            t = torch.stack([end[:, 0] / end[:, 1], end[:, 2] / end[:, 3]], 1)
            self.weights = blend_weights(s, t, self.params.estimate).float()
        self.shadows, self.shadow_opts, self.hist = None, {}, []

    # -- step ------------------------------------------------------------------------------------------------
    def train_step(self, model, batch, optimizer, ctx):
        held = holdout_fraction(batch["index"], self.params.holdout_seed).to(batch["label"].device) < self.params.v_rate
        keep = ~held
        tr = {k: v[keep] for k, v in batch.items()}
        ho = {k: v[held] for k, v in batch.items()}
        n_tr, n_ho = int(keep.sum()), int(held.sum())
        dev = batch["label"].device
        w = self.current_weights(dev)
        ctx.record(**{f"w_{j}": w[i] for i, j in enumerate(self.heads)})
        out_terms: dict[str, torch.Tensor] = {}
        if self.shadows is not None and n_tr > 0:
            self._shadow_step(model, tr, ho, n_tr, n_ho, ctx)
        if not self.main_trains(ctx.epoch) or n_tr == 0:
            zero = torch.zeros((), device=dev)
            return {"loss": zero, **out_terms}
        optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            out = model(tr)
            y = tr["label"]
            uni = ({m: model.aux[m](out.features[m]) for m in self.modalities()} if self.params.heads == "aux"
                   else out.logits)
            terms = {"fused": w[-1] * task_loss(self.spec, out.fused, y),  # (L) w_fused L_fused
                     "uni": sum(w[i] * task_loss(self.spec, uni[m], y) for i, m in enumerate(self.modalities()))}
        return self.optimize(model, optimizer, ctx, terms)

    def _shadow_step(self, model, tr, ho, n_tr, n_ho, ctx) -> None:
        acc = self.hist[-1]
        for i, j in enumerate(self.heads):
            s, opt = self.shadows[j], self.shadow_opts[j]
            s.train()
            opt.zero_grad(set_to_none=True)
            with ctx.autocast():
                lt = task_loss(self.spec, self._shadow_out(j, tr, model), tr["label"])
            lt.backward()
            if ctx.grad_clip > 0:
                nn.utils.clip_grad_norm_(s.parameters(), ctx.grad_clip)
            lv = None
            if n_ho > 0:  # held-out loss at the same (pre-step) parameters, eval mode
                s.eval()
                with torch.no_grad(), ctx.autocast():
                    lv = task_loss(self.spec, self._shadow_out(j, ho, model), ho["label"])
                s.train()
            opt.step()
            with torch.no_grad():
                acc[i, 0] += lt.detach().float() * n_tr
                acc[i, 1] += n_tr
                if lv is not None:
                    acc[i, 2] += lv.float() * n_ho
                    acc[i, 3] += n_ho

    # -- checkpoint ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        st = {"weights": None if self.weights is None else self.weights.clone(),
              "hist": [h.clone() for h in self.hist], "done_epoch": self.done_epoch}
        if self.shadows is not None:
            st["shadows"] = {k: v.detach().clone() for k, v in self.shadows.state_dict().items()}
            st["opts"] = {j: copy.deepcopy(o.state_dict()) for j, o in self.shadow_opts.items()}
        elif self._pending is not None:
            st.update(self._pending)
        return st

    def load_state_dict(self, state: dict) -> None:
        self.weights = None if state["weights"] is None else state["weights"].clone()
        self.hist = [h.clone() for h in state["hist"]]
        self.done_epoch = int(state["done_epoch"])
        self.shadows, self.shadow_opts = None, {}
        self._pending = {"shadows": state["shadows"], "opts": state["opts"]} if "shadows" in state else None
