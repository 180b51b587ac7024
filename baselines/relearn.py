"""Diagnosing & Re-learning (Y. Wei, S. Li, R. Feng, D. Hu, "Diagnosing and Re-learning for Balanced Multimodal
Learning", ECCV 2024; arXiv 2407.09705).

Sources read: the paper's abstract (ar5iv 2407.09705, first page only), a third-party summary of its method
(sciencestack.ai "TL;DR", which quotes g^k = |P^k_D - P^k_V|, the strength tanh(lambda g^k) and the update
theta_k = (1 - a_k) theta_k^current + a_k theta_k^init), the official code GeWu-Lab/Diagnosing_Relearning_ECCV2024
@025085ea82ed784c6ab6e5fb1b08bfe498dd0fc7 `code/ours.py` (`purity_score` l.63-95, `reinit_score` l.99-135,
`reinit` l.139-169, `train_epoch` l.172-213, `get_feature` l.300-324, `main` l.329-428), `code/script/ours.sh`,
`code/models/models.py` (`AVClassifier` l.49-98) and the splits `code/dataset/cremad/{my_train,val}.csv` (5,954 +
744 = the 6,698 OGM train clips), and GeWu-Lab/BalanceBenchmark @39ed569712e48ed97d9999a032ba6918a2d360b1
`balancemm/trainer/ReLearning_trainer.py` (same algorithm, per modality). The paper's method section could not
be retrieved, so the formulas are labelled (D1)-(D3), (R) and pinned to the official code lines.

Training step: plain Joint-Train, CE(fused, y), on the samples that are not held out (official `train_epoch`
l.196-207 on `my_train`). Every `reinit_epoch` epochs, for j = 1..reinit_num (official l.418-427: after the
training epoch e = j * reinit_epoch, e > 0), for each modality m with encoder features f_m (`out.features[m]`,
the pooled encoder output as the official `a, v` of models.py l.87-98):
  (D1) x' = 2 (x - min) / (max - min) - 1 per feature dimension (MinMaxScaler(-1, 1), fitted separately on the
       training and the validation features; a constant dimension maps to -1)            (official l.108-109)
  (D2) k-means with C = number of classes clusters; purity P = (1/N) sum_clusters max_c |{i in cluster : y_i = c}|,
       P^m_D on the training features, P^m_V on the held-out (validation) ones           (l.110-116, l.63-95)
  (D3) strength a_m = tanh(move_lambda * |P^m_D - P^m_V|)                                         (l.122-127)
  (R)  soft re-initialisation of every encoder parameter (not buffers: BN running statistics are kept):
       theta_m <- a_m theta_m^init + (1 - a_m) theta_m, theta_m^init the encoder at the start of training
       (`init_para.pkl`, saved right after the model is built, l.345-350); the optimizer state (SGD momentum)
       is kept, as the official code does                                                      (l.156-166)

Deviations and choices (numbered):
(1) Feature pass. The official code runs a no-grad, eval-mode pass over the whole training split and the
    validation split after epoch e. The project's Method protocol has no data pass (g2d/train is frozen), so,
    as baselines/pmr.py does for its prototypes, the features are the detached training-mode features of the
    batches this method sees during epoch e (accumulated only in diagnosis epochs), and the diagnosis and
    re-initialisation run at the start of epoch e + 1 (`on_epoch_start`), i.e. at the same point of the
    schedule (after epoch e's evaluation, before epoch e + 1's first step). The features come from drifting
    parameters over the epoch, with batch-norm in train mode and the training augmentation (the official code
    trains and diagnoses with the test transform, anchors-and-protocols.md §"Diagnosing ... test transform").
(2) Validation set. The official validation set is 744 clips carved from the 6,698 training clips
    (`my_train.csv` + `val.csv`), never trained on. The trainer's own validation split is not visible to a
    method, so the held-out set is carved from the training batches: samples with `index % val_every == 0`
    (val_every = 9: 6,698 / 9 = 744.2, the official proportion) are left out of the loss in every epoch and
    their features form the validation features; the other samples are trained on and form the training
    features. The held-out samples still pass through the forward (batch-norm batch statistics see them).
    A method whose training set is 1/9 smaller than Joint-Train's is what the official code runs.
(3) k-means is our own (sklearn is not a dependency of this project): greedy k-means++ seeding (2 + ln C local
    trials, as sklearn), Lloyd iterations to label stability or a centre shift <= tol * mean feature variance,
    at most `max_iter`, best of `n_init` runs by inertia, float64 on the CPU, seeded by `kmeans_seed` (the
    official `KMeans(n_clusters, random_state=0)`, sklearn's defaults: max_iter 300, tol 1e-4, n_init "auto" =
    1 for k-means++ since sklearn 1.4; the official sklearn version is unpinned). An empty cluster keeps its
    centre (sklearn relocates it). Partitions, hence purities, can differ from sklearn's on the same data.
(4) A set with fewer samples than classes (no k-means possible) gives a_m = 0 for that diagnosis.
(5) k > 2 modalities: (D1)-(R) are per modality and need no change (BalanceBenchmark does the same). Any
    fusion head works (only the encoders' features and parameters are used). Regression is refused (`tasks`):
    purity needs class labels.
(6) theta^init is taken in `setup` on a fresh run and checkpointed (setup runs again after a resume).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from g2d.methods.base import Method
from g2d.registry import register_method


@dataclass
class RelearnParams:
    move_lambda: float = 3.0  # (D3) lambda, official ours.sh `--move_lambda 3`
    reinit_epoch: int = 20  # diagnose + re-initialise after epochs reinit_epoch * j (ours.sh `--reinit_epoch 20`)
    reinit_num: int = 3  # j = 1..reinit_num (ours.sh `--reinit_num 3`)
    val_every: int = 9  # deviation (2): index % val_every == 0 held out (official 744 of 6,698 = 1/9)
    n_init: int = 1  # deviation (3): k-means restarts (sklearn >= 1.4 n_init="auto" = 1 for k-means++)
    max_iter: int = 300  # sklearn KMeans default
    tol: float = 1e-4  # sklearn KMeans default (relative to the mean feature variance)
    kmeans_seed: int = 0  # official random_state=0


def minmax_scale(x: torch.Tensor) -> torch.Tensor:
    """(D1) per-column map to [-1, 1]; a constant column maps to -1 (sklearn MinMaxScaler(feature_range=(-1, 1)))."""
    lo, hi = x.min(0).values, x.max(0).values
    rng = hi - lo
    rng = torch.where(rng == 0, torch.ones_like(rng), rng)
    return 2 * (x - lo) / rng - 1


def _sqdist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, c, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; 2 + ln k candidates per centre, as sklearn)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centers = [x[int(torch.randint(n, (1,), generator=gen))]]
    d2 = _sqdist(x, centers[0][None])[:, 0]
    for _ in range(1, k):
        pot = d2.sum()
        if pot <= 0:  # every point already on a centre: any point will do
            idx = torch.randint(n, (1,), generator=gen)
            centers.append(x[int(idx)])
            continue
        cand = torch.multinomial(d2 / pot, trials, replacement=True, generator=gen)
        new_d2 = torch.minimum(d2[None], _sqdist(x[cand], x))  # (trials, n)
        best = int(new_d2.sum(1).argmin())
        centers.append(x[int(cand[best])])
        d2 = new_d2[best]
    return torch.stack(centers)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, n_init: int = 1, max_iter: int = 300,
           tol: float = 1e-4) -> torch.Tensor:
    """Cluster labels (N,) of Lloyd's k-means, best of n_init k-means++ runs by inertia (deviation (3))."""
    x = x.detach().to("cpu", torch.float64)
    gen = torch.Generator().manual_seed(seed)
    tol_scaled = tol * float(x.var(0, unbiased=False).mean())
    best_labels, best_inertia = None, float("inf")
    for _ in range(max(1, n_init)):
        c = kmeans_pp(x, k, gen)
        labels = None
        for _ in range(max_iter):
            new_labels = _sqdist(x, c).argmin(1)
            counts = torch.bincount(new_labels, minlength=k).to(x.dtype)
            sums = torch.zeros_like(c).index_add_(0, new_labels, x)
            new_c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)  # empty: keep
            shift = float((new_c - c).pow(2).sum())
            c = new_c
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            if shift <= tol_scaled:
                break
        d = _sqdist(x, c)
        labels = d.argmin(1)
        inertia = float(d.min(1).values.sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def purity(y: torch.Tensor, labels: torch.Tensor) -> float:
    """(D2) (1/N) sum over clusters of the size of the cluster's majority class (official `purity_score`)."""
    y, labels = y.cpu().long(), labels.cpu().long()
    table = torch.zeros(int(labels.max()) + 1, int(y.max()) + 1)
    table.index_put_((labels, y), torch.ones(len(y)), accumulate=True)
    return float(table.max(1).values.sum()) / len(y)


def reinit_strength(p_train: float, p_val: float, move_lambda: float) -> float:
    """(D3) a = tanh(lambda |P_D - P_V|) (official l.122-127)."""
    return math.tanh(move_lambda * abs(p_train - p_val))


@register_method("relearn")
class Relearn(Method):
    """Joint-Train with periodic purity-gap diagnosis and soft re-initialisation of each encoder."""

    Params = RelearnParams
    tasks = ("classification",)  # purity needs class labels

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"{self.name} supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        if params.val_every < 2:
            raise ValueError(f"methods.relearn.val_every={params.val_every} must be >= 2: the diagnosis needs "
                             "held-out samples (params.yaml)")
        if params.reinit_epoch < 1 or params.reinit_num < 0:
            raise ValueError(f"methods.relearn: reinit_epoch={params.reinit_epoch} must be >= 1 and "
                             f"reinit_num={params.reinit_num} >= 0 (params.yaml)")
        if params.move_lambda < 0:
            raise ValueError(f"methods.relearn.move_lambda={params.move_lambda} must be >= 0 (params.yaml)")
        self.n_classes = spec.num_outputs
        self.init: dict[str, list[torch.Tensor]] | None = None  # theta^init per modality
        self.feats: dict[str, dict[str, list[torch.Tensor]]] = {}  # {"train"|"val": {m or "label": [batches]}}
        self.acc_epoch = -1  # the diagnosis epoch whose features are in feats

    def is_diagnosis_epoch(self, epoch: int) -> bool:
        """Official l.418-420: epoch % reinit_epoch == 0, epoch > 0, at most reinit_num times."""
        p = self.params
        return epoch > 0 and epoch % p.reinit_epoch == 0 and epoch // p.reinit_epoch <= p.reinit_num

    def setup(self, model, ctx) -> None:
        if self.init is None:  # fresh run: the model as built (official init_para.pkl l.345)
            self.init = {m: [p.detach().clone() for p in ps] for m, ps in model.modality_parameters().items()}

    # -- diagnosis ---------------------------------------------------------------------------------------------
    def diagnose(self) -> dict[str, tuple[float, float, float]]:
        """(D1)-(D3) per modality from the accumulated features: {m: (P_D, P_V, a_m)}."""
        p, out = self.params, {}
        cat = {s: {k: torch.cat(v) for k, v in d.items()} for s, d in self.feats.items() if d}
        for m in self.modalities():
            pur = []
            for split in ("train", "val"):
                d = cat.get(split)
                if d is None or d["label"].numel() < self.n_classes:
                    break  # deviation (4)
                labels = kmeans(minmax_scale(d[m].double()), self.n_classes, p.kmeans_seed, p.n_init, p.max_iter,
                                p.tol)
                pur.append(purity(d["label"], labels))
            if len(pur) < 2:
                out[m] = (float("nan"), float("nan"), 0.0)
            else:
                out[m] = (pur[0], pur[1], reinit_strength(pur[0], pur[1], p.move_lambda))
        return out

    @torch.no_grad()
    def relearn(self, model, alphas: dict[str, float]) -> None:
        """(R) theta <- a theta^init + (1 - a) theta for every encoder parameter (official l.156-166)."""
        for m, ps in model.modality_parameters().items():
            a = alphas.get(m, 0.0)
            if a == 0.0:
                continue
            for q, q0 in zip(ps, self.init[m]):
                q.mul_(1 - a).add_(q0.to(q.device, q.dtype), alpha=a)

    def on_epoch_start(self, model, ctx) -> None:
        if self.acc_epoch < 0 or self.acc_epoch >= ctx.epoch:
            return
        result = self.diagnose()
        self.relearn(model, {m: r[2] for m, r in result.items()})
        self.feats, self.acc_epoch = {}, -1
        ctx.record(**{f"purity_train_{m}": r[0] for m, r in result.items() if not math.isnan(r[0])},
                   **{f"purity_val_{m}": r[1] for m, r in result.items() if not math.isnan(r[1])},
                   **{f"alpha_{m}": r[2] for m, r in result.items()})

    # -- step -----------------------------------------------------------------------------------------------
    def loss(self, batch, out, ctx):
        y = batch["label"]
        held = (batch["index"].to(y.device) % self.params.val_every) == 0  # deviation (2)
        keep = ~held
        if bool(keep.any()):
            task = F.cross_entropy(out.fused[keep].float(), y[keep])
        else:  # only held-out samples in this batch: no training signal
            task = out.fused.float().sum() * 0.0
        if self.is_diagnosis_epoch(ctx.epoch):
            self._accumulate(out.features, y, keep, held, ctx.epoch)
        return {"task": task}

    def _accumulate(self, feats, y, keep, held, epoch: int) -> None:
        if self.acc_epoch != epoch:
            self.feats, self.acc_epoch = {"train": {}, "val": {}}, epoch
        with torch.no_grad():
            for split, mask in (("train", keep), ("val", held)):
                if not bool(mask.any()):
                    continue
                d = self.feats[split]
                d.setdefault("label", []).append(y[mask].detach().cpu())
                for m in self.modalities():
                    d.setdefault(m, []).append(feats[m][mask].detach().float().cpu())

    # -- checkpoint ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"init": None if self.init is None else {m: [t.clone() for t in ts] for m, ts in self.init.items()},
                "feats": {s: {k: torch.cat(v) for k, v in d.items()} for s, d in self.feats.items()},
                "acc_epoch": self.acc_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.init = None if state["init"] is None else {m: [t.clone() for t in ts] for m, ts in state["init"].items()}
        self.feats = {s: {k: [v.clone()] for k, v in d.items()} for s, d in state["feats"].items()}
        self.acc_epoch = int(state["acc_epoch"])
