"""PMR: Prototypical Modal Rebalance for Multimodal Learning (Y. Fan, W. Xu, H. Wang, J. Wang, S. Guo, CVPR 2023;
arXiv 2211.07089).

Sources read: the paper's abstract (arXiv 2211.07089v1), the official code
fanyunfeng-bit/Modal-Imbalance-PMR @3615e48983555089b0e693380087617c3797a641 `main_Prototype_grad.py`
(`EU_dist` l.69, `train_epoch` l.152-178, `calculate_prototype` l.383-441) and `bash.sh`, and
GeWu-Lab/BalanceBenchmark @4c1482fca5aaa8d4278af8e26020daa039e3ccf3 `balancemm/trainer/PMR_trainer.py`
and `configs/trainer_config.yaml`, and PMR issues #4, #7, #9 (PER missing from the code). The method section's
text (§3) could not be retrieved in the session that wrote this file, so the formulas are labelled (P), (PCE),
(rho), (beta), (PER) instead of by the paper's equation numbers (to be added from the PDF); each is pinned to
the official code line that implements it, which is what could be checked.

Per step, for every modality m with encoder features z^m = `out.features[m]` (B, D_m):
  (P)   prototypes   c_k^m = mean of z^m over the class-k samples           (paper §3, "prototype"; code l.417-433)
  (PCE) p_ik^m = softmax_k(-d(z_i^m, c_k^m)),  L_PCE^m = -mean_i log p_{i,y_i}^m
        with d the Euclidean distance ||z - c||_2 (code `EU_dist`, a sqrt; `distance="sqeuclidean"`
        uses ||z - c||^2 instead)                                          (paper §3, PCE loss; code l.152,166)
  (rho) s^m = sum_i p_{i,y_i}^m,  rho^m = s^m / s^other  (k = 2: rho^a = s^a / s^v)  (paper §3; code l.158-160)
  (beta) weak modality (rho^m < 1) gets beta^m * L_PCE^m:
        `coef="official"` (default): beta^m = alpha (a step: code l.169-177, BalanceBenchmark l.165-175);
        `coef="tanh"`: beta^m = tanh(alpha * (1/rho^m - 1)), i.e. tanh(alpha (rho^v - 1)) for the audio
        coefficient at k = 2 - the continuous form we recall from the paper, NOT verified against its text
        here (hence not the default). rho^m >= 1 gives beta^m = 0; rho = 1 exactly: no term (code l.175).
  (PER) prototypical entropy regularisation on the dominant modality (rho^m > 1) during the early epochs
        (abstract: "a prototype-based entropy regularization term during the early training stage to prevent
        premature convergence"): loss -= per_mu * H(p^m), H = mean_i -sum_k p_ik log p_ik, for epochs
        `< per_epochs`. The released code has no PER (`bash.sh` calls a `main_Proto_PER.py` that is not in the
        repository; PMR issues #4, #7, #9 ask where it is), BalanceBenchmark has none either, and we could not
        read the paper's mu / E_r, so `per_mu = 0` (off) by default; the weight is a constant mu per dominant
        modality (our choice, not a verified paper formula).
  Total: L = CE(fused, y) + sum_m beta^m L_PCE^m [- per_mu sum_{m dominant} H(p^m)], inside the inclusive 0-based
  window `start_epoch <= epoch <= end_epoch` (code `--modulation_starts/--modulation_ends`); outside it the
  step is plain Joint-Train (the loss is `task` alone, bitwise).

The PCE term of modality m depends only on z^m (prototypes are constants), so it reaches modality m's encoder
and nothing else: the dominant modality's encoder gradient is the Joint-Train one (under late fusion).

Deviations (all documented here, none in the formulas above):
(1) Prototype pass. The official code recomputes prototypes before every epoch with a no-grad pass, in
    eval mode, over the first 10% of the training batches (`sample_count >= all_num // 10`; AVE/CGMNIST use
    the validation set), then EMA `c = (1 - momentum) c_new + momentum c_old` (l.439). The project's Method
    protocol has no data pass (g2d/train is frozen), so we accumulate per-class sums and counts of the
    detached, train-mode features of every training batch this method sees in epoch e and turn them into
    epoch e+1's prototypes at the start of e+1 (same EMA with `momentum`; bash.sh's CREMA-D runs use 0.0).
    These are means over the whole epoch under drifting parameters, not a snapshot of the end-of-epoch
    encoder, and BN is in train mode.
(2) Epoch 0. The official code builds epoch-0 prototypes from the untrained encoder. `first_epoch="running"`
    (default) uses, while no finished-epoch prototypes exist, the running class means of the batches seen so
    far in the epoch (this batch excluded, so a sample never sits in its own prototype): PMR acts from the
    second step as in the official code (which acts from the first), on features at least as recent.
    `"skip"`: no PMR terms until a finished epoch has produced prototypes (epoch 0 is Joint-Train).
(3) Missing classes. A class with no prototype yet (or none seen in the previous epoch and none before) is
    left out of the softmax (logit -inf), and samples of that class are left out of L_PCE, H and s^m; fewer
    than two classes with prototypes means no PMR terms this step. A class unseen in epoch e keeps its old
    prototype. (The official code divides by a zero count: NaN prototypes.)
(4) k > 2 modalities (UR-Funny, IEMOCAP) are not defined by the paper nor the official code; rho^m uses
    OGM's generalisation (`baselines.ogm_ge.ogm_ratios`, `multi`: mean (default) | min | pairwise, all equal to
    s^m / s^other at k = 2), and every modality with rho^m < 1 gets a PCE term, every one with rho^m > 1 the
    PER term. BalanceBenchmark's k > 2 branch instead drops PCE and scales gradients by 1 - tanh(eta rho)
    with rho = s^m / min s (l.147-192): not PMR, not followed.
(5) Scores and ratios are computed under no_grad from the same distances (the official code keeps the graph
    but only compares them); p and the losses are computed in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baselines.ogm_ge import ogm_ratios
from g2d.methods.base import Method, task_loss
from g2d.registry import register_method

COEFS = ("official", "tanh")
DISTANCES = ("euclidean", "sqeuclidean")
FIRST_EPOCH = ("running", "skip")


@dataclass
class PMRParams:
    alpha: float = 2.0  # official bash.sh @3615e48, CREMA-D concat/sum (--alpha 2.0); BalanceBenchmark 0.6
    coef: str = "official"  # official: beta = alpha on the weak modality | tanh: tanh(alpha (1/rho - 1))
    start_epoch: int = 0  # modulation window, inclusive, 0-based (--modulation_starts 0)
    end_epoch: int = 70  # bash.sh CREMA-D --modulation_ends 70 (argparse default 100; BalanceBenchmark 80)
    momentum: float = 0.0  # prototype EMA weight of the old prototype (bash.sh CREMA-D --momentum_coef 0.0)
    distance: str = "euclidean"  # euclidean (official EU_dist) | sqeuclidean
    multi: str = "mean"  # k > 2 ratios, as OGM: mean | min | pairwise
    first_epoch: str = "running"  # before any finished-epoch prototypes: running | skip
    per_mu: float = 0.0  # PER weight on the dominant modality (paper has PER, released code does not): off
    per_epochs: int = 10  # PER only for epochs < per_epochs (the paper's "early training stage")


def prototype_distances(z: torch.Tensor, protos: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """d(z_i, c_k) (B, C). cdist without the matmul shortcut: exact, and a zero distance has a zero gradient."""
    if distance not in DISTANCES:
        raise ValueError(f"methods.pmr.distance={distance!r} not in {DISTANCES} (params.yaml)")
    d = torch.cdist(z.float(), protos.float(), compute_mode="donot_use_mm_for_euclid_dist")
    return d if distance == "euclidean" else d.pow(2)


def prototype_logits(z, protos, valid, distance="euclidean") -> torch.Tensor:
    """-d(z, c_k), classes without a prototype at -inf (PCE softmax argument)."""
    return (-prototype_distances(z, protos, distance)).masked_fill(~valid[None, :], float("-inf"))


def pce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_PCE = -mean_i log softmax(-d(z_i, c))_{y_i} (paper §3 PCE; official l.166 `criterion(audio_sim, label)`)."""
    return F.cross_entropy(logits, y)


def prototype_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = mean_i -sum_k p_ik log p_ik over the classes with a prototype (PER)."""
    logp = F.log_softmax(logits, 1)
    plogp = torch.where(torch.isfinite(logits), logp.exp() * logp, torch.zeros_like(logp))
    return -plogp.sum(1).mean()


def pmr_coefficients(rho: torch.Tensor, alpha: float, coef: str = "official") -> torch.Tensor:
    """beta^m for the PCE term: nonzero only where rho^m < 1 (the weak modality)."""
    if coef not in COEFS:
        raise ValueError(f"methods.pmr.coef={coef!r} not in {COEFS} (params.yaml)")
    if coef == "official":  # code l.169-177: beta = 1 * alpha for the weak modality
        val = torch.full_like(rho, float(alpha))
    else:  # tanh(alpha (rho^other - 1)), rho^other = 1/rho^m at k = 2
        val = torch.tanh(alpha * (1.0 / rho - 1.0))
    return torch.where(rho < 1, val, torch.zeros_like(rho))


@register_method("pmr")
class PMR(Method):
    """Prototypical CE on the weak modality (+ optional entropy regularisation on the dominant one)."""

    Params = PMRParams
    tasks = ("classification",)  # prototypes are class means

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"{self.name} supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        pmr_coefficients(torch.ones(1), 1.0, params.coef)
        prototype_distances(torch.zeros(1, 1), torch.zeros(1, 1), params.distance)
        ogm_ratios(torch.ones(2), params.multi)  # raises for a `multi` not in ogm_ge.MULTI
        if params.first_epoch not in FIRST_EPOCH:
            raise ValueError(f"methods.pmr.first_epoch={params.first_epoch!r} not in {FIRST_EPOCH} (params.yaml)")
        if not 0.0 <= params.momentum < 1.0:
            raise ValueError(f"methods.pmr.momentum={params.momentum} must be in [0, 1) (params.yaml)")
        self.n_classes = spec.num_outputs
        self.proto: dict[str, torch.Tensor] = {}  # finished-epoch prototypes, (C, D_m)
        self.has_proto: torch.Tensor | None = None  # (C,) bool
        self.sums: dict[str, torch.Tensor] = {}  # this epoch's per-class feature sums
        self.counts: torch.Tensor | None = None  # (C,) this epoch's per-class sample counts
        self.acc_epoch = -1  # the epoch whose features are in sums/counts

    # -- prototype bookkeeping -------------------------------------------------------------------------
    def _roll(self, epoch: int) -> None:
        """Turn the accumulators of an earlier epoch into prototypes (EMA with `momentum`), then reset."""
        if self.acc_epoch >= epoch:
            return
        if self.counts is not None and bool((self.counts > 0).any()):
            seen = self.counts > 0
            if self.has_proto is None:
                self.has_proto = torch.zeros_like(seen)
            for m, s in self.sums.items():
                mean = s / self.counts.clamp(min=1)[:, None]  # (P) class means
                old = self.proto.get(m, torch.zeros_like(mean))
                ema = (1 - self.params.momentum) * mean + self.params.momentum * old  # official l.439
                new = torch.where((seen & self.has_proto)[:, None], ema, mean)
                self.proto[m] = torch.where(seen[:, None], new, old)  # unseen class: keep the old one
            self.has_proto = self.has_proto | seen
        self.sums, self.counts = {}, None
        self.acc_epoch = epoch

    def _accumulate(self, feats: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        with torch.no_grad():
            if self.counts is None:
                self.counts = torch.zeros(self.n_classes, device=y.device)
            self.counts.index_add_(0, y, torch.ones_like(y, dtype=self.counts.dtype))
            for m in self.modalities():
                z = feats[m].detach().float()
                if m not in self.sums:
                    self.sums[m] = torch.zeros(self.n_classes, z.shape[1], device=z.device)
                self.sums[m].index_add_(0, y, z)

    def current_prototypes(self) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """(prototypes, valid classes) used by this step, or None when PMR cannot act yet."""
        if self.has_proto is not None and bool(self.has_proto.any()):
            protos, valid = self.proto, self.has_proto
        elif self.params.first_epoch == "running" and self.counts is not None:
            valid = self.counts > 0  # deviation (2): running means of this epoch's earlier batches
            protos = {m: s / self.counts.clamp(min=1)[:, None] for m, s in self.sums.items()}
        else:
            return None
        if int(valid.sum()) < 2:
            return None
        return protos, valid

    def on_epoch_start(self, model, ctx) -> None:
        self._roll(ctx.epoch)

    def in_window(self, epoch: int) -> bool:
        return self.params.start_epoch <= epoch <= self.params.end_epoch

    # -- loss --------------------------------------------------------------------------------------------
    def loss(self, batch, out, ctx):
        self._roll(ctx.epoch)
        y = batch["label"]
        terms = {"task": task_loss(self.spec, out.fused, y)}
        cur = self.current_prototypes() if self.in_window(ctx.epoch) else None
        if cur is not None:
            protos, valid = cur
            keep = valid.to(y.device)[y]  # deviation (3): samples of classes without a prototype are left out
            if bool(keep.any()):
                terms.update(self._pmr_terms(out, y, keep, protos, valid, ctx))
        self._accumulate(out.features, y)  # after use: this batch is not in its own running prototype
        return terms

    def _pmr_terms(self, out, y, keep, protos, valid, ctx) -> dict[str, torch.Tensor]:
        p, mods = self.params, self.modalities()
        yk = y[keep]
        dev = out.features[mods[0]].device
        valid = valid.to(dev)
        logits = {m: prototype_logits(out.features[m][keep], protos[m].to(dev), valid, p.distance) for m in mods}
        with torch.no_grad():  # (rho) s^m = sum_i softmax(-d)_{i, y_i}
            s = torch.stack([F.softmax(logits[m].detach(), 1).gather(1, yk[:, None]).sum() for m in mods])
            rho = ogm_ratios(s, p.multi)
            beta = pmr_coefficients(rho, p.alpha, p.coef)
        terms = {}
        pce = [beta[i] * pce_loss(logits[m], yk) for i, m in enumerate(mods) if beta[i] > 0]  # (beta) weak only
        if pce:
            terms["pce"] = torch.stack(pce).sum()
        per_on = p.per_mu > 0 and ctx.epoch < p.per_epochs
        per = [prototype_entropy(logits[m]) for i, m in enumerate(mods) if per_on and rho[i] > 1]
        if per:  # (PER) maximise the dominant modality's prototype entropy
            terms["per"] = -p.per_mu * torch.stack(per).sum()
        ctx.record(**{f"rho_{m}": rho[i] for i, m in enumerate(mods)},
                   **{f"beta_{m}": beta[i] for i, m in enumerate(mods)})
        return terms

    # -- checkpoint ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        clone = lambda d: {m: t.detach().clone() for m, t in d.items()}  # noqa: E731
        return {"proto": clone(self.proto), "sums": clone(self.sums),
                "has_proto": None if self.has_proto is None else self.has_proto.clone(),
                "counts": None if self.counts is None else self.counts.clone(), "acc_epoch": self.acc_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.proto = {m: t.clone() for m, t in state["proto"].items()}
        self.sums = {m: t.clone() for m, t in state["sums"].items()}
        self.has_proto = None if state["has_proto"] is None else state["has_proto"].clone()
        self.counts = None if state["counts"] is None else state["counts"].clone()
        self.acc_epoch = int(state["acc_epoch"])
