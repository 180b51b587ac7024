"""Sample-level and Modality-level modality valuation (Y. Wei, R. Feng, Z. Wang, D. Hu, "Enhancing Multimodal
Cooperation via Sample-level Modality Valuation", CVPR 2024; arXiv 2309.06255).

Sources read: the official code GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation
@7ed12b07ee7d233aa835089185c909aaa3ff6b1e (HEAD, 2024-11-05): `code/sample_level.py` (arguments l.32-72,
`execute_modulation` l.75-153, `train_epoch` l.156-181, epoch loop l.303-340), `code/modality_level.py`
(arguments l.38-76, `execute_modulation` l.79-179), `code/datasets/dataloader.py` (`AV_KS_Dataset_sample_level`
l.116-188, `AV_KS_Dataset_modality_level` l.259-318), `code/models/models.py` (`AVClassifier.forward` l.29-72,
`exec_drop` l.74-86), README.md; and GeWu-Lab/BalanceBenchmark @4c1482fca5aaa8d4278af8e26020daa039e3ccf3
`balancemm/trainer/Sample_trainer.py` (l.75-102, 281-294), `balancemm/evaluation/modalitys.py`
(`Calculate_Shapley_Sample` l.58-103), `balancemm/datasets/__init__.py` (`create_dataset_sample_level`
l.127-218, `create_dataset_modality_level` l.221-347), `configs/trainer_config.yaml` (`Sample:` l.89-95).
The paper's text (its method section and equation numbers) could not be retrieved in this session (not in the
reference corpora; only the README's summary), so each formula is labelled (V), (PHI), (C), (MD) and pinned to
the official code line implementing it; the README names this code as the paper's implementation.

Both methods: per sample, value each modality's contribution to the fused prediction's correctness with
Shapley values, then train more on the low-contributing modality ("re-sample"): extra copies of samples in
which only that modality is kept (the others' encoder features set to zero, models.py l.62-67).
  (V)   value of a coalition S of modalities for sample i: v_i(S) = |S| * 1[argmax head(z_S) = y_i], v(empty) = 0,
        z_S = the encoder features with the modalities outside S zeroed, through the fusion head (models.py
        `exec_drop` l.74-86), eval mode, no grad (sample_level.py l.83-118: value_all = 2 if correct, value_a =
        1 if correct). `value="size"` (default, official). `value="indicator"`: v_i(S) = 1[correct]
        (BalanceBenchmark modalitys.py l.79, 97).
  (PHI) phi_i^m = sum_{S in M\\{m}} |S|! (k - |S| - 1)! / k! * (v_i(S u {m}) - v_i(S)), the Shapley value;
        at k = 2: phi^a = (v(a) + v(av) - v(v)) / 2 (sample_level.py l.117-118; modalitys.py l.89-98).
Sample-level (`sample_valuation`):
  (C)   copies of sample i training modality m alone: 1 if 0.4 < phi^m < 1, 2 if -0.1 < phi^m < 0.4,
        3 if phi^m < -0.1, else 0 (dataloader.py l.154-186; the same strict thresholds in BalanceBenchmark
        l.157-164). With (V) "size" at k = 2, phi in {-0.5, 0, 0.5, 1, 1.5}: 3, 2, 1, 0, 0 copies.
Modality-level (`modality_valuation`):
  (MC)  dataset-level contribution c^m = mean of phi_i^m over a random part Z (`part_ratio`) of the training
        samples (modality_level.py l.143-156); gap^m = 1 - c^m (l.158-159).
  (MD)  re-sample ratio d = f(|gap^a - gap^v| * 2/3) with f(x) = alpha x (`func="linear"`, default; l.161,
        dataloader.py l.300-301), tanh(alpha x) (`"tanh"`, l.302-304) or alpha x^1.5 (`"square"`, l.305-306);
        int(d * N) samples drawn uniformly with replacement from the N training samples each get one copy
        training the modality with the larger gap alone (l.307-316).
  Both: the first `warmup_epochs` epochs are plain Joint-Train (sample_level.py l.321-328; the valuation after
  epoch warmup-1 builds the re-sampled set of epoch `warmup`, l.141, 330-333), then every epoch trains on the
  original samples plus the copies with CE on the fused output (train_epoch l.164-176). No end epoch.

How the dataloader re-sampling is emulated (the Method protocol has no data pass and no dataloader control):
(1) Copies ride in the batch of their original sample. Each step, the batch (B samples) is extended by its
    copies (rows repeated, same augmented tensors), one train-mode forward of the B + n rows, the dropped
    modalities' features of the copy rows set to zero (`drop="features"`, the official feature-level
    zeroing; the copies' inputs still pass through every encoder, as in models.py l.62-67, so BN statistics
    see them but no gradient flows from a zeroed row), fused CE. The official shuffles the copies into the
    epoch (more steps of 64 mixed samples); here the epoch has the same number of steps, each larger.
    `reduction="batch"` (default): loss = (sum of CE over the B + n rows) / B, so each row weighs 1/B as a
    row of a B-batch does in the official loop and one epoch's summed gradient is the official epoch's to
    first order; the loss is reported as `task` (originals) + `resample` (copies). `"mean"`: / (B + n).
    A copy is the same augmented tensor as its original (the official loads each copy with fresh random crops).
    A step's batch can grow to (1 + 3k) B rows (sample level, early training when most predictions are wrong),
    so memory and the step's loss grow with it; `trainer.grad_clip` and `amp` act on the whole extended step
    (the official uses neither). A step without copies is the Joint-Train step (bitwise).
(2) Sample-level valuation timing: the official values every training sample after epoch e (eval mode, a
    separate pass with train-time augmentation, sample_level.py l.83-122, 260-262) and re-samples epoch e+1
    from it. Here each batch is valued just before its step (eval mode, no grad, the same augmented batch), and
    its copies are trained in the same step: the valuation is 0 to 1 epoch fresher (the official copy is
    trained uniformly in epoch e+1 with the end-of-epoch-e model). Cost: one extra no-grad forward per step
    (encoders once, the head 2^k - 1 times).
(3) Modality-level: c^m of epoch e+1 comes from the valuations of epoch e: each training sample of epoch e
    is valued (as in (2), at its own step) with probability `part_ratio` (Z; the official draws Z with
    replacement from one end-of-epoch pass over all N), the means roll over at the start of e+1 (state,
    checkpointed). Each step of e+1 then adds floor(d B + u) copies (u ~ U(0, 1), torch's generator: d B in
    expectation, int(d N) per epoch in the official), rows drawn uniformly with replacement from the batch
    (official: from the whole set). Valuation starts in epoch warmup-1, copies in epoch warmup
    (`warmup_epochs: 0`: copies from epoch 1). An epoch with no valued sample gives no copies in the next.
    The checkpointed state is the epoch's sums and count (c^m is rebuilt from them at the next epoch start).
(4) `drop="inputs"` zeroes the other modalities' inputs instead of features, in the valuation and the copies
    (BalanceBenchmark: validation_step `padding`, SampleDataset zeroing, __init__.py l.191-196): an option.
(5) k > 2 (not in the paper's code, which is audio-visual): (V)/(PHI) are the exact Shapley values over all
    2^k coalitions (as BalanceBenchmark, modalitys.py l.58-103); (C) is applied per modality unchanged.
    Modality-level: the weakest modality w = argmax gap^m is trained alone, d = f(mean_{m != w}(gap^w - gap^m)
    * 2/3), equal to (MD) at k = 2. Regression is refused (the value is argmax correctness).
(6) BalanceBenchmark deviates from the official code (not followed): (V) uses 1[correct] for every coalition,
    so at k = 2 a sample all three predictions get right has phi = 0.5 and gets a copy per modality (official:
    phi = 1, no copy); its modality-level ratio is sum over ordered pairs |gap^m - gap^m'| / (k - 1) * 2/3
    (twice the official at k = 2) with `alpha` unused, and each drawn sample gets one copy per modality
    (modality m alone with every modality of smaller gap zeroed: the weak one alone plus a full duplicate,
    l.294-326); it values inputs zeroed; it warms up 1 epoch (`modulation_starts: 1`).
(7) The official reports model selection on the test set (best_acc, sample_level.py l.341-373): not used.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from g2d.methods.base import Method
from g2d.registry import register_method

VALUES = ("size", "indicator")
DROPS = ("features", "inputs")
REDUCTIONS = ("batch", "mean")
FUNCS = ("linear", "tanh", "square")


@dataclass
class SampleValuationParams:
    warmup_epochs: int = 5  # official --warmup 5 (sample_level.py l.44); BalanceBenchmark modulation_starts 1
    value: str = "size"  # (V) size: |S| * 1[correct] (official) | indicator: 1[correct] (BalanceBenchmark)
    drop: str = "features"  # features (official, models.py l.62-67) | inputs (BalanceBenchmark)
    reduction: str = "batch"  # batch: sum / B (each row weighs as in a B-batch) | mean: / (B + n)


@dataclass
class ModalityValuationParams:
    warmup_epochs: int = 5  # official --warmup 5 (modality_level.py l.50)
    alpha: float = 1.0  # official --alpha 1 (l.52); BalanceBenchmark 0.5 (unused by its linear func)
    part_ratio: float = 0.2  # official --part_ratio 0.2 (l.51, the paper's Z); BalanceBenchmark 0.2
    func: str = "linear"  # (MD) linear | tanh | square (dataloader.py l.300-306)
    value: str = "size"
    drop: str = "features"
    reduction: str = "batch"


def _check_common(name: str, p) -> None:
    for key, allowed in (("value", VALUES), ("drop", DROPS), ("reduction", REDUCTIONS)):
        if getattr(p, key) not in allowed:
            raise ValueError(f"methods.{name}.{key}={getattr(p, key)!r} not in {allowed} (params.yaml)")
    if p.warmup_epochs < 0:
        raise ValueError(f"methods.{name}.warmup_epochs={p.warmup_epochs} must be >= 0 (params.yaml)")


def coalitions(k: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of range(k), as sorted tuples."""
    return [c for r in range(1, k + 1) for c in itertools.combinations(range(k), r)]


def shapley_values(correct: dict[tuple[int, ...], torch.Tensor], k: int, value: str = "size") -> torch.Tensor:
    """(PHI) per-sample Shapley values (B, k) from each coalition's correctness (B,) bool; v(empty) = 0.
    (V) v(S) = |S| 1[correct] (`size`, sample_level.py l.110-118) or 1[correct] (`indicator`)."""
    if value not in VALUES:
        raise ValueError(f"value={value!r} not in {VALUES}")

    def v(s: tuple[int, ...]) -> torch.Tensor:
        if not s:
            return torch.zeros_like(next(iter(correct.values())), dtype=torch.float32)
        c = correct[s].float()
        return c * len(s) if value == "size" else c

    cols = []
    for m in range(k):
        others = [j for j in range(k) if j != m]
        phi = 0.0
        for r in range(k):
            w = math.factorial(r) * math.factorial(k - r - 1) / math.factorial(k)
            for s in itertools.combinations(others, r):
                phi = phi + w * (v(tuple(sorted((*s, m)))) - v(s))
        cols.append(phi)
    return torch.stack(cols, 1)


def sample_copies(phi: torch.Tensor) -> torch.Tensor:
    """(C) copies per (sample, modality): 1 on (0.4, 1), 2 on (-0.1, 0.4), 3 below -0.1, else 0
    (dataloader.py l.156-186, strict inequalities)."""
    n = torch.zeros_like(phi, dtype=torch.long)
    n = torch.where((phi > 0.4) & (phi < 1), 1, n)
    n = torch.where((phi > -0.1) & (phi < 0.4), 2, n)
    return torch.where(phi < -0.1, 3, n)


def resample_ratio(contrib: torch.Tensor, alpha: float, func: str = "linear") -> tuple[float, int]:
    """(MC)/(MD) from the dataset-level contributions c^m: (d, index of the modality trained alone).
    gap = 1 - c; weak w = argmax gap; x = mean_{m != w}(gap_w - gap_m) * 2/3 (k = 2: |gap_a - gap_v| * 2/3)."""
    if func not in FUNCS:
        raise ValueError(f"func={func!r} not in {FUNCS}")
    gap = 1.0 - contrib.double()
    w = int(torch.argmax(gap))  # k = 2, equal gaps: w = 0 and d = 0 (no copies)
    x = float((gap[w] - torch.cat([gap[:w], gap[w + 1:]])).mean()) * 2 / 3
    if func == "linear":  # modality_level.py l.161, dataloader.py l.301
        d = alpha * x
    elif func == "tanh":  # dataloader.py l.302-304
        d = math.tanh(alpha * x)
    else:  # dataloader.py l.305-306
        d = x ** 1.5 * alpha
    return d, w


class _Valuation(Method):
    """Shared: valuation forward, batch extension by copies, the training step."""

    tasks = ("classification",)  # (V) is argmax correctness

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"{self.name} supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        _check_common(self.name, params)

    # -- valuation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def coalition_correct(self, model, batch, ctx) -> dict[tuple[int, ...], torch.Tensor]:
        """1[argmax fused(S) = y] for every non-empty coalition S, eval mode (sample_level.py l.83-118)."""
        mods, y = self.modalities(), batch["label"]
        was_training = model.training
        model.eval()
        try:
            out = {}
            with ctx.autocast():
                feats = model.encode(batch) if self.params.drop == "features" else None
                for s in coalitions(len(mods)):
                    drop = tuple(m for i, m in enumerate(mods) if i not in s)
                    if feats is not None:  # official exec_drop: zero features, fusion head
                        fused = model.head({m: torch.zeros_like(f) if m in drop else f
                                            for m, f in feats.items()}).fused
                    else:  # BalanceBenchmark: zero inputs
                        fused = model(batch, drop=drop).fused
                    out[s] = fused.float().argmax(1) == y
        finally:
            model.train(was_training)
        return out

    def shapley(self, model, batch, ctx) -> torch.Tensor:
        return shapley_values(self.coalition_correct(model, batch, ctx), len(self.modalities()), self.params.value)

    # -- training with copies -----------------------------------------------------------------------------
    def extended_forward(self, model, batch, rows: torch.Tensor, alone: torch.Tensor):
        """Forward of the batch plus copies batch[rows], copy j keeping modality alone[j] only (deviation (1))."""
        mods, b = self.modalities(), batch["label"].shape[0]
        big = {k: torch.cat([v, v[rows]]) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b else v
               for k, v in batch.items()}
        keep = {m: torch.cat([torch.ones(b, dtype=torch.bool, device=rows.device), alone == i])
                for i, m in enumerate(mods)}
        if self.params.drop == "inputs":
            for m in mods:
                x = big[m]
                big[m] = torch.where(keep[m].to(x.device).view(-1, *([1] * (x.dim() - 1))), x, torch.zeros_like(x))
            return model(big), big["label"]
        feats = model.encode(big)
        feats = {m: torch.where(keep[m].to(f.device)[:, None], f, torch.zeros_like(f)) for m, f in feats.items()}
        return model.head(feats), big["label"]

    def step_with_copies(self, model, batch, optimizer, ctx, rows, alone) -> dict[str, torch.Tensor]:
        if rows.numel() == 0:
            return super().train_step(model, batch, optimizer, ctx)  # no copies: the Joint-Train step
        b = batch["label"].shape[0]
        optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            out, y = self.extended_forward(model, batch, rows, alone)
        ce = F.cross_entropy(out.fused.float(), y, reduction="none")
        denom = b if self.params.reduction == "batch" else b + rows.numel()
        terms = {"task": ce[:b].sum() / denom, "resample": ce[b:].sum() / denom}
        return self.optimize(model, optimizer, ctx, terms)

    def _record(self, ctx, phi: torch.Tensor, counts: torch.Tensor) -> None:
        mods = self.modalities()
        ctx.record(**{f"phi_{m}": phi[:, i].mean() for i, m in enumerate(mods)},
                   **{f"copies_{m}": counts[:, i].sum().float() for i, m in enumerate(mods)})


@register_method("sample_valuation")
class SampleValuation(_Valuation):
    """Sample-level re-sampling: each sample's low-contributing modalities trained alone on 1-3 copies."""

    Params = SampleValuationParams

    def train_step(self, model, batch, optimizer, ctx):
        if ctx.epoch < self.params.warmup_epochs:
            return super().train_step(model, batch, optimizer, ctx)
        phi = self.shapley(model, batch, ctx)  # deviation (2): this batch, now
        counts = sample_copies(phi)  # (B, k)
        self._record(ctx, phi, counts)
        b, k = counts.shape
        flat = counts.reshape(-1)
        idx = torch.repeat_interleave(torch.arange(b * k, device=flat.device), flat)
        rows, alone = idx // k, idx % k
        return self.step_with_copies(model, batch, optimizer, ctx, rows, alone)


@register_method("modality_valuation")
class ModalityValuation(_Valuation):
    """Modality-level re-sampling: d N random copies training the modality with the lowest mean contribution."""

    Params = ModalityValuationParams

    def __init__(self, params, spec):
        super().__init__(params, spec)
        resample_ratio(torch.zeros(2), 1.0, params.func)
        if not 0.0 < params.part_ratio <= 1.0:
            raise ValueError(f"methods.{self.name}.part_ratio={params.part_ratio} must be in (0, 1] (params.yaml)")
        self.sums: torch.Tensor | None = None  # this epoch's sum of phi over the valued samples (k,)
        self.count = 0
        self.acc_epoch = -1
        self.contrib: torch.Tensor | None = None  # (MC) c^m from the previous epoch, or None

    def _roll(self, epoch: int) -> None:
        if self.acc_epoch >= epoch:
            return
        self.contrib = self.sums / self.count if self.count > 0 and self.acc_epoch == epoch - 1 else None
        self.sums, self.count, self.acc_epoch = None, 0, epoch

    def on_epoch_start(self, model, ctx) -> None:
        self._roll(ctx.epoch)

    def train_step(self, model, batch, optimizer, ctx):
        self._roll(ctx.epoch)
        p = self.params
        if ctx.epoch < p.warmup_epochs - 1:
            return super().train_step(model, batch, optimizer, ctx)
        y = batch["label"]
        b = y.shape[0]
        pick = torch.rand(b) < p.part_ratio  # deviation (3): Z, a part_ratio share of every epoch's samples
        if bool(pick.any()):
            sub = {k: v[pick.to(v.device)] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b else v
                   for k, v in batch.items()}
            phi = self.shapley(model, sub, ctx)
            s = phi.sum(0).double().cpu()
            self.sums = s if self.sums is None else self.sums + s
            self.count += int(phi.shape[0])
        if ctx.epoch < p.warmup_epochs or self.contrib is None:
            return super().train_step(model, batch, optimizer, ctx)
        d, w = resample_ratio(self.contrib, p.alpha, p.func)
        n = int(math.floor(d * b + float(torch.rand(()))))  # d B copies in expectation
        rows = torch.randint(0, b, (n,), device=y.device)
        alone = torch.full((n,), w, dtype=torch.long, device=y.device)
        mods = self.modalities()
        ctx.record(resample_ratio=d, **{f"c_{m}": float(self.contrib[i]) for i, m in enumerate(mods)})
        return self.step_with_copies(model, batch, optimizer, ctx, rows, alone)

    def state_dict(self) -> dict:
        return {"sums": None if self.sums is None else self.sums.clone(), "count": self.count,
                "acc_epoch": self.acc_epoch, "contrib": None if self.contrib is None else self.contrib.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.sums = None if state["sums"] is None else state["sums"].clone()
        self.count, self.acc_epoch = int(state["count"]), int(state["acc_epoch"])
        self.contrib = None if state["contrib"] is None else state["contrib"].clone()
