"""OPM and OPRM: on-the-fly prediction / gradient modulation (Wei, Hu, Du, Wen, "On-the-fly Modulation for
Balanced Multimodal Learning", IEEE TPAMI 2024, arXiv 2410.11582; the journal version of OGM-GE, CVPR 2022).

Sources. Reference code: GeWu-Lab/BML_TPAMI2024 @4b3aa4fd841856c4acbebf48549e6c59fbf7635e (HEAD,
2024-09-29): `code/models/Classifier.py` (`calcu_q`, `Modality_drop.execute_drop`, `custom_autograd`,
`Classifier.forward`), `code/main.py` (`train`: warm-up, OGM coefficients, GE noise), `code/config.py`,
`code/scripts/train_opm.sh`, `code/scripts/train_ogm.sh`; CREMA-D journal settings from the maintainer in
GeWu-Lab/BML_TPAMI2024#3 (2025-10-28). The paper's own text (its sections and equation numbers) was not
available to this implementation (no copy in the reference corpora; only its abstract and the README):
every formula below is therefore cited to the code, which the README names as the paper's official
implementation, and where the paper might disagree the code's behaviour is the default and the
alternatives are options. The paper-level description (abstract, README): OPM "weakens the influence of the
dominant modality by dropping its feature with dynamical probability in the feed-forward stage", OGM
"mitigates its gradient in the back-propagation stage", both driven by the discriminative discrepancy
between modalities monitored during training.

Shared discrepancy (both methods, as OGM-GE, `baselines.ogm_ge`): s_m = sum over the batch of the
true-class softmax of modality m's logits `out.logits[m]` (Classifier.py l.139-143: t_m = f_m W_m^T + b/2 with
detached W, b; here the fusion head's per-modality read-out, g2d/models/fusion.py: W_m f_m + b/k for concat),
computed without a graph; rho_m = s_m / s_other for k = 2 (main.py l.119-120; Classifier.py l.61-62).

OPM (`opm`), Classifier.py + main.py @4b3aa4f:
  (O1) drop probability (calcu_q, l.58-72):
       q_m = clip(q_base * (1 + lam * tanh(ReLU(rho_m - 1))), 0, 1) if rho_m > 1, else 0.
       Only the dominant modality (rho > 1) gets q > 0.
  (O2) per step, the drop is executed with probability p_exe (execute_drop l.34); if executed, each sample
       i keeps modality m's feature with probability 1 - q_m: mask_{m,i} ~ Bernoulli(1 - q_m) (l.45),
       f_m,i <- mask_{m,i} f_m,i, then every modality's feature is rescaled (l.49, custom_autograd l.9-21,
       which is x / (1 - theta) forward and grad / (1 - theta) backward, i.e. a constant scale):
       `rescale="global"` (default, the code): f <- f / (1 - theta), theta = sum_m d_m q_m / sum_m d_m
       (l.39-41), d_m the feature width (config.py `d = [512, 512]`), applied to all modalities alike;
       `"modality"`: inverted dropout per modality, f_m <- f_m / (1 - q_m) (an option, not in the code);
       `"none"`: no rescaling.
  (O3) the fused prediction of the dropped features is trained with the task loss only (main.py l.104;
       the unimodal losses are computed for logging, never backpropagated). The scores s_m come from the
       features before the drop (Classifier.py l.139-147).
  (O4) training only: evaluation runs the plain model (main.py `val` calls the model with warm_up=1);
       here `predict` is the fused output and the trainer's eval forward never drops.
OPRM (`oprm`, OGM of the journal, main.py l.116-168): the dominant modality's encoder gradient is scaled by
  (G1) k_m = 1 - tanh(alpha * ReLU(rho_m)) if rho_m > 1, else 1 (l.136-150), i.e. `rho_form="official"` of
       `baselines.ogm_ge` (tanh(alpha * rho), not tanh(alpha * (rho - 1)); `"shifted"` is the option);
  (G2) GE on by default: the code's `--modulation` defaults to OGM_GE (l.36) and train_ogm.sh does not
       override it, so N(0, (std(g) + 1e-8)^2) noise is added to every modulated tensor of every modality
       (l.157-167); `ge: false` is plain OGM (the paper's name for the method);
  (G3) 4-D (conv) encoder tensors only (l.157: `len(parms.grad.size()) == 4`), `scope` as in ogm_ge;
  (G4) window start_epoch <= epoch <= end_epoch (l.154), inclusive, 0-based.
  OPRM reuses `baselines.ogm_ge.OGM` unchanged (scores, ratios, coefficients, GE, scope); it only adds the
  warm-up below, so with `warmup_epochs: 0` it is OGM / OGM-GE of the CVPR paper.

Choices and deviations, each documented:
  (1) Warm-up (both methods): main.py l.91 `warm_up = 1 if epoch <= 5` disables OPM and OGM in epochs 0-5
      whatever the window says; here `warmup_epochs: 6` (epochs < 6 are plain Joint-Train). The CVPR OGM-GE
      code had no warm-up; `warmup_epochs: 0` removes it.
  (2) k > 2 modalities (UR-Funny, IEMOCAP; the paper and code define k = 2): rho_m from
      `baselines.ogm_ge.ogm_ratios` with `multi` = mean (default) | min | pairwise, all equal to s_m/s_other
      for k = 2. (O1) then applies per modality, so every modality with rho_m > 1 is dropped with its own
      q_m (OPRM: scaled with its own k_m, exactly as ogm's `multi`). Under all three rules the weakest
      modality has rho <= 1, so q = 0 for at least one modality and no sample ever loses every modality.
  (3) The code's sample filter (execute_drop l.50-53, main.py l.95-101: samples with every modality dropped
      are removed from the loss, the step skipped if none is left) is not implemented: by (2) and because
      for k = 2 at most one of q_1, q_2 is > 0 (calcu_q), the filter can never remove a sample.
  (4) Random draws: the code draws the p_exe gate with numpy and the masks with torch.distributions; here
      both come from torch's generators (gate: the CPU generator, masks: the feature device's), which the
      trainer seeds and checkpoints. Outside the active window nothing is drawn (bitwise Joint-Train).
  (5) For film/gated fusion `out.logits[m]` is the fusion module's own per-modality read-out (fusion.py), as
      for ogm_ge; the drop acts on the encoder features that enter any fusion head.
  (6) `end_epoch: -1` (OPM default) = no end: the code's OPM has no modulation end (only its OGM has one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baselines.ogm_ge import MULTI, OGM, OGMParams, ogm_ratios
from g2d.methods.base import Method
from g2d.registry import register_method

RESCALES = ("global", "modality", "none")


@dataclass
class OPMParams:
    # train_opm.sh @4b3aa4f (config.py dataset KineticSound; no separate CREMA-D script is released)
    q_base: float = 0.5  # base drop probability of the dominant modality (O1)
    lam: float = 0.5  # lambda: growth of q with the discrepancy (O1)
    p_exe: float = 0.7  # probability that a step executes the drop at all (O2)
    warmup_epochs: int = 6  # main.py l.91: no modulation while epoch <= 5 (choice 1)
    start_epoch: int = 0  # active window, inclusive, 0-based; also needs epoch >= warmup_epochs
    end_epoch: int = -1  # -1: to the last epoch (the code's OPM has no end; choice 6)
    rescale: str = "global"  # global (code: all features / (1 - theta)) | modality (f_m / (1 - q_m)) | none
    multi: str = "mean"  # k > 2 modalities: mean | min | pairwise (baselines.ogm_ge.ogm_ratios)


@dataclass
class OPRMParams(OGMParams):
    # train_ogm.sh @4b3aa4f: --alpha 0.8 --modulation_starts 0 --modulation_ends 60
    alpha: float = 0.8
    ge: bool = True  # main.py l.36: --modulation defaults to OGM_GE (G2)
    start_epoch: int = 0
    end_epoch: int = 60
    warmup_epochs: int = 6  # main.py l.91 (choice 1)


def drop_probabilities(rho: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """q_m = clip(q_base (1 + lam tanh(ReLU(rho_m - 1))), 0, 1) where rho_m > 1, else 0 (O1, calcu_q l.58-72)."""
    q = q_base * (1 + lam * torch.tanh(F.relu(rho - 1)))
    return torch.where(rho > 1, q, torch.zeros_like(q)).clamp(0.0, 1.0)


def drop_features(feats: dict[str, torch.Tensor], q: torch.Tensor, rescale: str = "global"
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(dropped features, keep mask (M, B)): mask_{m,i} ~ Bernoulli(1 - q_m), then the (O2) rescaling."""
    if rescale not in RESCALES:
        raise ValueError(f"methods.opm.rescale={rescale!r} not in {RESCALES} (params.yaml)")
    names = list(feats)
    first = feats[names[0]]
    q = q.to(device=first.device, dtype=torch.float32)
    keep = torch.bernoulli((1 - q)[:, None].expand(len(names), first.shape[0]))  # (O2) execute_drop l.45
    if rescale == "global":  # theta = sum_m d_m q_m / sum_m d_m; all features / (1 - theta) (l.39-41, l.49)
        d = torch.tensor([feats[m][0].numel() for m in names], dtype=torch.float32, device=q.device)
        scale = (1 / (1 - (d * q).sum() / d.sum())).expand(len(names))
    elif rescale == "modality":  # inverted dropout per modality: f_m / (1 - q_m) (q_m = 1 keeps nothing)
        scale = torch.where(q < 1, 1 / (1 - q.clamp(max=1 - 1e-12)), torch.ones_like(q))
    else:
        scale = torch.ones_like(q)
    out = {}
    for i, m in enumerate(names):
        f = feats[m]
        w = (keep[i] * scale[i]).to(f.dtype).view(-1, *([1] * (f.dim() - 1)))
        out[m] = f * w
    return out, keep


@register_method("opm")
class OPM(Method):
    """On-the-fly Prediction Modulation: drop the dominant modality's features in the training forward."""

    Params = OPMParams
    tasks = ("classification",)  # the score is a true-class softmax probability

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"{self.name} supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        p = params
        if not (0.0 <= p.q_base <= 1.0 and 0.0 <= p.p_exe <= 1.0 and p.lam >= 0.0):
            raise ValueError(f"methods.{self.name}: need 0 <= q_base <= 1, 0 <= p_exe <= 1, lam >= 0; got "
                             f"q_base={p.q_base}, p_exe={p.p_exe}, lam={p.lam} (params.yaml)")
        if p.rescale not in RESCALES:
            raise ValueError(f"methods.{self.name}.rescale={p.rescale!r} not in {RESCALES} (params.yaml)")
        if p.multi not in MULTI:
            raise ValueError(f"methods.{self.name}.multi={p.multi!r} not in {MULTI} (params.yaml)")

    def active(self, epoch: int) -> bool:
        p = self.params
        return epoch >= p.warmup_epochs and p.start_epoch <= epoch and (p.end_epoch < 0 or epoch <= p.end_epoch)

    def scores(self, model, feats: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """s_m: batch sum of the true-class softmax of the undropped features' read-out (O3), no graph."""
        with torch.no_grad():
            per = model.head({m: f.detach() for m, f in feats.items()}).logits
            return torch.stack([F.softmax(per[m].float(), 1).gather(1, y[:, None]).sum() for m in self.modalities()])

    def modulated_output(self, model, batch: dict, ctx):
        """The training forward: encode, score, maybe drop (O1, O2), fuse. Plain forward in eval mode (O4)."""
        feats = model.encode(batch)
        mods = self.modalities()
        if not (model.training and self.active(ctx.epoch)):
            if model.training:
                ctx.record(opm_exec=0.0, **{f"q_{m}": 0.0 for m in mods})
            return model.head(feats)
        s = self.scores(model, feats, batch["label"])
        rho = ogm_ratios(s, self.params.multi)
        q = drop_probabilities(rho, self.params.q_base, self.params.lam)
        execute = bool(torch.rand(()) < self.params.p_exe)  # (O2) execute_drop l.34
        if execute:
            feats, keep = drop_features(feats, q, self.params.rescale)
        ctx.record(opm_exec=float(execute), **{f"q_{m}": q[i] for i, m in enumerate(mods)},
                   **{f"rho_{m}": rho[i] for i, m in enumerate(mods)},
                   # always a tensor: the epoch's log of one key is stacked, floats and tensors do not mix
                   **{f"kept_{m}": (keep[i].float().mean() if execute else torch.ones((), device=q.device))
                      for i, m in enumerate(mods)})
        return model.head(feats)

    def train_step(self, model, batch, optimizer, ctx):
        """The base step with the modulated forward in place of `model(batch)`."""
        optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            out = self.modulated_output(model, batch, ctx)
            terms = self.loss(batch, out, ctx)  # (O3) task loss on the fused prediction only
        return self.optimize(model, optimizer, ctx, terms)


@register_method("oprm")
class OPRM(OGM):
    """The journal's OGM(-GE): baselines.ogm_ge.OGM with the code's warm-up (G1-G4, choice 1)."""

    Params = OPRMParams

    def in_window(self, epoch: int) -> bool:
        return epoch >= self.params.warmup_epochs and super().in_window(epoch)
