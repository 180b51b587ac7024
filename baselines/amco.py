"""AMCo: Adaptive Mask Co-Optimization (Y. Zhou, X. Liang, S. Zheng, H. Xuan, T. Kumada, "Adaptive Mask
Co-Optimization for Modal Dependence in Multimodal Learning", IEEE ICASSP 2023, pp. 1-5, IEEE Xplore document
10096641; no arXiv version and no official code repository could be found (find_repos / code search, 2026-12)).

Sources read. The paper's text could NOT be read in this session (no copy in the page / docs corpora; only
third-party one-line summaries: "applies adaptive masking on the features of the dominant modality to adjust
the learning difficulty", "dynamically masks features of the dominant modality"). The only implementation
available, and therefore the reference for every formula below, is BalanceBenchmark (Xu et al., the GeWu-Lab
toolkit that lists AMCo as a feed-forward method), GeWu-Lab/BalanceBenchmark @4c1482fca5aaa8d4278af8e26020daa039e3ccf3:
`balancemm/trainer/AMCoTrainer` in `balancemm/trainer/AMCo_trainer.py` l.19-159 (BB-T), `BaseClassifierAMCoModel`
in `balancemm/models/avclassify_model.py` l.326-384 (BB-M), `configs/trainer_config.yaml` l.20-28 and
`configs/model_config.yaml` l.6-9 (concat fusion, ResNet18 encoders, modality_size 512). Equation numbers of the
paper are therefore not given; each formula is labelled (A1)-(A5) and pinned to the BalanceBenchmark line.

Per training step of epoch e (inside the inclusive window start_epoch <= e <= end_epoch; BB-T l.127, l.141):
  (A1) mask rate  p_t = sin(pi/2 * min(eps, l_t) / eps)  (BB-T l.73), with the schedule variable
       `schedule="balancebenchmark"` (default): l_t = 0 at the start of every epoch and l_t += e / 10 after
       every step (BB-T l.64, l.83), so p_t = 0 throughout epoch 0 and, with eps = 0.3, reaches 1 after
       ceil(3 / e) steps of epoch e >= 1;
       `schedule="progress"`: l_t = e / epochs (the fraction of training done; our option, NOT from any source:
       a reading of eps as the warm-up fraction of training, for a rate that ramps over the first eps of it).
  (A2) the mask: N = floor(p_t * L) of L positions are zeroed, chosen uniformly at random, one mask for the whole
       batch (BB-T l.74-82: np.ones(C - N) padded with N zeros, shuffled). `mask_on="logits"` (default, BB-M
       l.376-377): L = C, the number of classes, and the mask multiplies the dependent modality's class-logit
       share s_m = `out.logits[m]` (BB-M l.368-375: f_m W_m^T + b / k, the concat read-out); every dependent
       modality gets the same mask (BB-T draws one per step).
       `mask_on="features"`: L = d_m, the modality's feature width, and the mask multiplies the dependent
       modality's encoder feature f_m before the fusion head (one mask per dependent modality) - the third-party
       summaries' "masks features of the dominant modality", and BalanceBenchmark's unused `U: 512` equals its
       ResNet18 feature width (model_config.yaml l.9); an unverified reading of the paper, not the default.
  (A3) fused prediction from the masked shares: BB-M l.363, l.378: output = sum_m s_m (masked where dependent);
       here, for every fusion whose per-modality read-outs compose the fused output (fusion.py: concat and sum
       add the shares, late averages them), fused' = fused + c * sum_m (s'_m - s_m), c = 1 (sum, concat) or 1/k
       (late), which is exactly sum_m s'_m (concat, sum) or mean_m s'_m (late).
  (A4) co-optimisation loss: L = CE(fused', y) + sum_m CE(s'_m, y) (BB-T l.140-145: `loss.backward(retain_graph)`
       then each `loss_uni.backward()`, i.e. the gradient of the sum); the unimodal terms use the masked shares
       (BB-M masks `unimodal_result[m]` in place, l.377). Outside the window: L = CE(fused, y) (BB-T l.157).
  (A5) modal dependence, for the NEXT step (BB-T l.146-155, after the backward): the per-sample softmax over the
       concatenation [s'_1, ..., s'_k] (B, kC) of the masked shares; D_m = (1/B) sum_i sum_{c in m's slice}
       softmax_i,c, the batch-mean softmax mass on modality m (sum_m D_m = 1); m is dependent iff D_m > sigma.
       Every modality starts each epoch non-dependent (BB-T l.61-63). No graph (a comparison only).
Evaluation is the plain model (no mask; BB-M is called without a mask in `validation_step`).

Deviations and choices, numbered:
  (1) The paper could not be read: the defaults follow BalanceBenchmark throughout; `mask_on="features"` and
      `schedule="progress"` are options for the paper's possible formulation, not verified against its text.
  (2) BalanceBenchmark's AMCo model adds `linear_star`, a C x C linear layer on the fused logits, in training and
      evaluation (BB-M l.328-329, l.353). `star_head: false` (default) leaves it out: the saved model.pt /
      selected.pt leave a method's aux module out (g2d/methods/base.py `aux_module`), so every later evaluation
      of a saved model would differ from the trained predictor. `star_head: true` attaches it as `model.aux`
      (PyTorch's default Linear init) and `predict` applies it (the trainer's evaluation).
  (3) BalanceBenchmark expands the class mask to 2 rows (BB-T l.82, `mask_t.expand(2, -1)`), which only
      broadcasts against the (B, C) shares after its DataParallel wrapper (`MultiModalParallel.forward`,
      `avclassify_model.py` l.170-185) scatters the kwargs over 2 devices (one identical row each; on one device
      the (B, C) * (2, C) product would fail for B != 2); the intended single mask per step is implemented.
  (3b) One host sync per active step: the flags (A5) are read back (`.tolist()`), as BalanceBenchmark's `bool()`.
  (4) BalanceBenchmark's unused parameters: `alpha: 0.1`, `method: "None"`, `U: 512` and `modality: 2` are read
      (BB-T l.22-30) but never used; they are not parameters here (U is the feature width in `features` mode).
  (5) Randomness: the mask positions come from torch.randperm on the CPU generator (BalanceBenchmark:
      np.random.shuffle), which the trainer seeds and checkpoints; a mask is drawn only in a step where some
      modality is dependent and N > 0 (BalanceBenchmark draws one every step).
  (6) k > 2 modalities: (A2)-(A5) are written for any k in BalanceBenchmark (loops over `model.modalitys`) and are
      used unchanged; since sum_m D_m = 1, sigma >= 0.5 makes at most one modality dependent at a time (for k > 2
      a smaller sigma, e.g. 1/k, lets several be; each then gets the mask). The unimodal loss and the class mask
      need class labels: regression is refused (`tasks`).
  (7) Fusions: `mask_on="logits"` needs read-outs that compose the fused output (late, sum, concat); film and
      gated are refused by `check_config` (which cannot see the method's params, so the refusal holds for
      `mask_on="features"` too, although that mode - the head on the masked features - would run with them).
  (8) The dependence flags and l_t are method state (state_dict), so a resume mid-epoch continues identically;
      BalanceBenchmark's flags only live inside an epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from g2d.methods.base import Method, task_loss
from g2d.models.fusion import ConcatFusion, LateFusion, SumFusion
from g2d.registry import register_method

MASK_ON = ("logits", "features")
SCHEDULES = ("balancebenchmark", "progress")
LOGIT_FUSIONS = ("late", "sum", "concat")


@dataclass
class AMCoParams:
    # GeWu-Lab/BalanceBenchmark@4c1482f configs/trainer_config.yaml l.20-28 (AMCo block; its CREMA-D runs use it)
    sigma: float = 0.5  # dependence threshold on the softmax-mass share D_m (A5)
    eps: float = 0.3  # mask-rate ramp length (A1)
    start_epoch: int = 0  # modulation_starts (inclusive, 0-based)
    end_epoch: int = 80  # modulation_ends (inclusive)
    mask_on: str = "logits"  # logits (BalanceBenchmark) | features (option, deviation 1)
    schedule: str = "balancebenchmark"  # balancebenchmark (l_t += epoch/10 per step) | progress (option)
    unimodal_loss: bool = True  # the co-optimisation terms sum_m CE(s'_m, y) (A4)
    star_head: bool = False  # BalanceBenchmark's linear_star on the fused logits (deviation 2)


def mask_rate(l_t: float, eps: float) -> float:
    """p_t = sin(pi/2 * min(eps, l_t) / eps) (A1, AMCo_trainer.py l.73)."""
    return math.sin(math.pi / 2 * min(eps, l_t) / eps)


def random_mask(length: int, n_zero: int, device) -> torch.Tensor:
    """A (length,) 0/1 vector with n_zero zeros at uniformly random positions (A2, AMCo_trainer.py l.74-77)."""
    m = torch.ones(length)
    if n_zero > 0:
        m[torch.randperm(length)[:n_zero]] = 0.0
    return m.to(device)


def dependence(shares: list[torch.Tensor]) -> torch.Tensor:
    """D_m: batch mean of the softmax mass on modality m's slice of [s_1, ..., s_k] (A5, l.146-155). (k,)"""
    with torch.no_grad():
        p = F.softmax(torch.cat([s.detach().float() for s in shares], 1), 1)
        c = shares[0].shape[1]
        return torch.stack([p[:, i * c:(i + 1) * c].sum(1).mean() for i in range(len(shares))])


@register_method("amco")
class AMCo(Method):
    """Mask the dependent (dominant) modality's class-logit share (or features) with a growing rate; co-optimise."""

    Params = AMCoParams
    fusions = LOGIT_FUSIONS
    fusion_need = "masks the modalities' shares of the fused logits"
    tasks = ("classification",)  # class mask and unimodal CE need class labels (deviation 6)

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"{self.name} supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        p = params
        if p.mask_on not in MASK_ON:
            raise ValueError(f"methods.amco.mask_on={p.mask_on!r} not in {MASK_ON} (params.yaml)")
        if p.schedule not in SCHEDULES:
            raise ValueError(f"methods.amco.schedule={p.schedule!r} not in {SCHEDULES} (params.yaml)")
        if not p.eps > 0:
            raise ValueError(f"methods.amco.eps must be > 0, got {p.eps} (params.yaml)")
        self.l_t = 0.0
        self.dependent = [False] * len(self.modalities())
        self._star = None

    def aux_module(self, model):
        if not self.params.star_head:
            return None
        self._star = nn.Linear(self.spec.num_outputs, self.spec.num_outputs)  # BB-M l.329 linear_star
        return self._star

    def setup(self, model, ctx) -> None:
        if self.params.star_head:
            self._star = model.aux
        if self.params.mask_on == "logits" and not isinstance(model.fusion, (LateFusion, SumFusion, ConcatFusion)):
            raise ValueError(f"amco (mask_on=logits) needs model.fusion in {LOGIT_FUSIONS}, "
                             f"got {type(model.fusion).__name__}")

    def on_epoch_start(self, model, ctx) -> None:
        self.l_t = 0.0  # BB-T l.61-64: flags and l_t restart every epoch
        self.dependent = [False] * len(self.modalities())

    def in_window(self, epoch: int) -> bool:
        return self.params.start_epoch <= epoch <= self.params.end_epoch

    def rate(self, ctx) -> float:
        l_t = self.l_t if self.params.schedule == "balancebenchmark" else ctx.epoch / ctx.epochs
        return mask_rate(l_t, self.params.eps)

    def star(self, fused: torch.Tensor) -> torch.Tensor:
        return self._star(fused) if self._star is not None else fused

    def predict(self, out) -> torch.Tensor:
        return self.star(out.fused)

    def masked_forward(self, model, batch, ctx):
        """(fused', [s'_m]) of the training forward (A2, A3); the plain forward when no modality is dependent."""
        mods = self.modalities()
        feats = model.encode(batch)
        pt = self.rate(ctx)
        dep = [i for i, d in enumerate(self.dependent) if d]
        if self.params.mask_on == "features":
            for i in dep:
                f = feats[mods[i]]
                d = f[0].numel()
                n = int(pt * d)
                if n > 0:
                    mask = random_mask(d, n, f.device).to(f.dtype).view(1, *f.shape[1:])
                    feats[mods[i]] = f * mask  # (A2) features mode
            out = model.head(feats)
            shares = [out.logits[m] for m in mods]
            fused = out.fused
        else:
            out = model.head(feats)
            shares = [out.logits[m] for m in mods]
            fused = out.fused
            c = shares[0].shape[1]
            n = int(pt * c)  # (A2) N = int(pt * n_classes), l.74
            if dep and n > 0:
                mask = random_mask(c, n, fused.device).to(fused.dtype)[None]
                coef = 1.0 / len(mods) if isinstance(model.fusion, LateFusion) else 1.0
                new = [s * mask if i in dep else s for i, s in enumerate(shares)]  # BB-M l.376-377
                fused = fused + coef * sum(nw - s for nw, s in zip(new, shares) if nw is not s)  # (A3)
                shares = new
        ctx.record(amco_rate=pt, **{f"dep_{m}": float(self.dependent[i]) for i, m in enumerate(mods)})
        return self.star(fused), shares

    def train_step(self, model, batch, optimizer, ctx):
        optimizer.zero_grad(set_to_none=True)
        y = batch["label"]
        active = self.in_window(ctx.epoch)
        with ctx.autocast():
            if active:
                fused, shares = self.masked_forward(model, batch, ctx)
            else:
                out = model(batch)
                fused, shares = self.star(out.fused), None
            terms = {"task": task_loss(self.spec, fused, y)}
            if active and self.params.unimodal_loss:  # (A4) BB-T l.143-145
                for m, s in zip(self.modalities(), shares):
                    terms[f"uni_{m}"] = F.cross_entropy(s.float(), y)
        res = self.optimize(model, optimizer, ctx, terms)
        if active:  # (A5) dependence for the next step, from this step's (masked) shares
            d = dependence(shares)
            self.dependent = [bool(v) for v in (d > self.params.sigma).tolist()]
            for i, m in enumerate(self.modalities()):
                ctx.record(**{f"D_{m}": d[i]})
        self.l_t += ctx.epoch / 10  # BB-T l.83 (every step, in or out of the window)
        return res

    def state_dict(self) -> dict:
        return {"l_t": self.l_t, "dependent": list(self.dependent)}

    def load_state_dict(self, state: dict) -> None:
        self.l_t = float(state.get("l_t", 0.0))
        self.dependent = [bool(v) for v in state.get("dependent", [False] * len(self.modalities()))]
