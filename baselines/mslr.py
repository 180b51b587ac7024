"""MSLR: Modality-Specific Learning Rates (Y. Yao and R. Mihalcea, "Modality-specific Learning Rates for Effective
Multimodal Additive Late-fusion", Findings of ACL 2022, pp. 1824-1834, ACL Anthology 2022.findings-acl.143,
doi 10.18653/v1/2022.findings-acl.143; no arXiv version).

Sources read. The paper's abstract only (ACL Anthology page): additive late fusion, the final prediction being the
sum of unimodal predictions; one global learning rate can leave some modality's gradient vanishing, so each
modality gets its own learning rate; "three different strategies to assign learning rates". The paper's body
(its sections, the three strategies, their equations) could not be retrieved in the session that wrote this file,
so no equation numbers are given: every formula below is labelled and pinned to the reference implementation
used by the G2D paper's comparison, lihong2303/AGM_ICCV2023 @5a65542c70b1c7c15c5df291e77fa9cf2bbb9549 (the AGM
ICCV 2023 code base, which ships MSLR and MSES as baselines), `run/CREMAD_main.py`:
`train` l.194-210 (MSLR step), `CREMAD_main` l.627-628 (ratios start at 1.0), l.671-684 (ratio update),
`test` l.394-404 and l.418-429 (per-modality accuracies), `tasks/CREMAD_task.py` (SGD momentum 0.9,
weight decay 1e-4, StepLR), `model/CREMAD_net.py` `AVClassifier_Sum` (out = audio_cls(a) + visual_cls(v));
`run/AVMNIST_main.py` l.152-166 and `run/URFunny_main.py` l.146-164 for the other datasets' coefficients.
GeWu-Lab/BalanceBenchmark @4c1482fca5aaa8d4278af8e26020daa039e3ccf3 has no MSLR (nor MSES).

Per step, for every modality m, with the global learning rate eta of the shared optimizer:
  (L1) eta_m = c_m * r_m * eta, c_m = `coeffs[m]` (the code's `*_lr_init_coeff`: CREMA-D audio 0.9, visual 1.1,
       CREMAD_main.py l.195-196; AV-MNIST audio 1.3, visual 0.7; UR-Funny audio 0.9, visual 1.4, text 0.7),
       r_m the dynamic ratio of (L3) (1 while `ratio="fixed"`, the default). A modality missing from `coeffs`
       gets c_m = 1.
  (L2) eta_m applies to modality m's parameters: its encoder and the parameters of its own fusion head
       (the code: every parameter under `audio_net`/`audio_cls`, resp. `visual_*`, l.203-209). Fusion-head
       parameters shared by several modalities (concat, film, gated heads) keep the global eta. Under late/sum
       fusion (additive late fusion, the paper's setting) every parameter is some modality's.
  (L3) the code's automatic ratio (l.671-684): after each epoch, with modality m's accuracy a_m(t) and the list
       M_m of the previous (at most) W = `window` = 5 accuracies: while |M_m| < W, append a_m(t) and keep r_m;
       else r_m = a_m(t) / mean(M_m), then drop the oldest entry of M_m and append a_m(t). The new r_m is used
       from the next epoch on. In the code a_m(t) is the TEST-set accuracy of modality m's classifier; see (3).
  (L4) window: epochs start_epoch <= e <= end_epoch (0-based, inclusive; the code's `modulation_starts/ends`,
       1-based epochs, defaults 0 / 20, i.e. all 20 epochs of a 20-epoch run = 0-based 0..19); outside it the
       step is Joint-Train, bitwise.

How (L1) is applied (`apply`):
  "lr" (default: the paper's modality-specific LEARNING RATES). The trainer builds one optimizer with one
       parameter group (g2d/train/trainer.py `build_optimizer`) and checkpoints/schedules it; restructuring its
       groups would break resume and the StepLR scheduler, so the rate is applied by scaling modality m's
       UPDATE: p <- p_old + k_m (p_after_step - p_old), k_m = c_m r_m. For the three optimizers the trainer
       builds this is exactly optimizing m's parameters with lr k_m * eta: SGD (momentum, dampening 0, weight
       decay folded into the buffer) moves p by -eta * buf with buf independent of eta; Adam moves p by
       -eta * m_hat / (sqrt(v_hat) + eps) (L2 decay in the gradient); AdamW by -eta (wd p_old + m_hat /
       (sqrt(v_hat) + eps)); the optimizer's state (momentum buffer, moments) is the same as with lr k_m eta in
       all three (tests/unit/test_mslr.py checks each against an optimizer with a parameter group per modality).
  "grad" (the code, l.203-209): modality m's gradients are multiplied by k_m after backward, before gradient
       clipping and the step. Under SGD with a constant k_m this equals lr scaling except for the weight-decay
       term (torch adds wd * p after the scaling) and, for a changing k_m, the momentum buffer (old gradients
       keep their old k_m); under Adam/AdamW a constant k_m is almost a no-op (Adam is invariant to the
       gradient's scale up to eps). Offered to reproduce the code; not a learning rate under Adam.

Deviations, numbered:
  (1) Validation, not test, accuracies feed (L3). `ratio="val"` (params.yaml's value): a_m(t) is modality m's head accuracy
      on the validation split after epoch t, as the trainer computed it (`Method.on_epoch_end`'s `acc_<m>`),
      applied from epoch t+1 as in the code. `ratio="fixed"`: r_m = 1, fixed modality-specific rates c_m eta
      (the code's behaviour up to (L3): on its CREMA-D runs r_m departs from 1 only after epoch 6).
      `ratio="train"`: a PROXY, neither the paper's nor the code's: a_m(t) is modality m's classifier accuracy
      over the training batches of epoch t (train mode, under the drifting parameters, as `out.logits[m]`),
      updated by (L3) at the start of epoch t+1 (the only choice before the trainer had the hook).
  (2) The code selects and ratios on the test set (`test_dataloader`); this benchmark never feeds test data to a
      method.
  (3) The code's CREMA-D `test` l.402-404 increments the audio accuracy counter inside the visual-correct branch,
      so its "audio accuracy" equals the visual accuracy and both ratios follow the visual modality on CREMA-D.
      Not reproduced: `ratio="train"` uses each modality's own accuracy.
  (4) k > 2 modalities: (L1)-(L3) are per modality and need no pairing; every modality gets its own c_m (the code's
      UR-Funny run does exactly this with three coefficients). Regression: `ratio="fixed"` works unchanged (only
      learning rates); `ratio="val"` and `"train"` need accuracies and are refused for regression.
  (5) The per-modality parameter sets come from `model.modality_parameters()` and `model.head_parameters()`
      (never name substrings); a parameter in two modalities' head lists is shared and keeps eta, see (L2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from g2d.methods.base import Method, scale_grads
from g2d.registry import register_method

APPLY = ("lr", "grad")
RATIO = ("val", "fixed", "train")  # not "off": YAML 1.1 (OmegaConf) reads a bare off as False


@dataclass
class MSLRParams:
    # c_m of (L1): AGM_ICCV2023@5a65542 run/CREMAD_main.py l.195-196 (audio 0.9, visual 1.1); missing modality: 1
    coeffs: dict[str, float] = field(default_factory=dict)
    apply: str = "lr"  # lr: exact per-modality learning rate (paper) | grad: scale gradients (official code)
    # val: (L3) on validation head accuracies (params.yaml's choice) | fixed: r_m = 1 (the default here: valid for
    # every task) | train: (L3) on training batches (proxy); deviation (1)
    ratio: str = "fixed"
    window: int = 5  # W of (L3): CREMAD_main.py l.672 `len(audio_lr_memory) < 5`
    start_epoch: int = 0  # (L4) 0-based inclusive (code: --modulation_starts 0 over 1-based epochs)
    end_epoch: int = 19  # (L4) 0-based inclusive (code: --modulation_ends 20 = 1-based epoch 20)


def update_ratio(memory: list[float], acc: float, ratio: float, window: int) -> tuple[float, list[float]]:
    """(L3), CREMAD_main.py l.671-684: (new r_m, new memory) after an epoch with accuracy `acc`."""
    if len(memory) < window:
        return ratio, [*memory, acc]
    mean = sum(memory) / len(memory)
    new = acc / mean if mean > 0 else 1.0  # a zero mean (no correct prediction in W epochs): keep r_m = 1
    return new, [*memory[1:], acc]


def modality_groups(model) -> dict[str, list[torch.nn.Parameter]]:
    """(L2): each modality's encoder + its own head parameters; head parameters shared by modalities left out."""
    heads = model.head_parameters()
    seen: dict[int, int] = {}
    for ps in heads.values():
        for p in {id(p): p for p in ps}.values():
            seen[id(p)] = seen.get(id(p), 0) + 1
    groups = {}
    for m, enc in model.modality_parameters().items():
        own = [p for p in heads.get(m, []) if seen[id(p)] == 1]
        groups[m] = list({id(p): p for p in [*enc, *own] if p.requires_grad}.values())
    return groups


@register_method("mslr")
class MSLR(Method):
    """Modality-specific learning rates c_m r_m eta on each modality's encoder and own head."""

    Params = MSLRParams

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if params.apply not in APPLY:
            raise ValueError(f"methods.{self.name}.apply={params.apply!r} not in {APPLY} (params.yaml)")
        if params.ratio not in RATIO:
            raise ValueError(f"methods.{self.name}.ratio={params.ratio!r} not in {RATIO} (params.yaml)")
        if params.ratio in ("val", "train") and spec.task != "classification":
            raise ValueError(f"methods.{self.name}.ratio={params.ratio} needs accuracies: dataset {spec.name} is "
                             f"{spec.task} (set datasets.{spec.name}.methods.{self.name}.ratio=fixed)")
        if params.window < 1:
            raise ValueError(f"methods.{self.name}.window={params.window} must be >= 1 (params.yaml)")
        bad = {m: c for m, c in dict(params.coeffs or {}).items() if not float(c) > 0}
        if bad:
            raise ValueError(f"methods.{self.name}.coeffs {bad}: learning-rate coefficients must be > 0 "
                             "(params.yaml)")
        # names of other datasets' modalities are ignored: one methods.mslr block serves every dataset
        self.base = {m: float(dict(params.coeffs or {}).get(m, 1.0)) for m in self.modalities()}
        self.ratio = {m: 1.0 for m in self.modalities()}  # r_m of (L3), CREMAD_main.py l.627-628
        self.memory: dict[str, list[float]] = {m: [] for m in self.modalities()}
        self.correct: dict[str, float] = {m: 0.0 for m in self.modalities()}  # this epoch's (ratio=train)
        self.count = 0
        self.acc_epoch = -1  # the epoch whose predictions are in correct/count
        self.groups: dict[str, list[torch.nn.Parameter]] | None = None

    def setup(self, model, ctx) -> None:
        self.groups = modality_groups(model)

    def in_window(self, epoch: int) -> bool:
        return self.params.start_epoch <= epoch <= self.params.end_epoch

    def coefficients(self) -> dict[str, float]:
        """k_m = c_m r_m of (L1)."""
        return {m: self.base[m] * self.ratio[m] for m in self.modalities()}

    # -- (L3) with the training-batch proxy --------------------------------------------------------------
    def _roll(self, epoch: int) -> None:
        if self.acc_epoch >= epoch:
            return
        if self.params.ratio == "train" and self.count > 0:
            for m in self.modalities():
                acc = 100.0 * self.correct[m] / self.count
                self.ratio[m], self.memory[m] = update_ratio(self.memory[m], acc, self.ratio[m], self.params.window)
        self.correct = {m: 0.0 for m in self.modalities()}
        self.count = 0
        self.acc_epoch = epoch

    def on_epoch_start(self, model, ctx) -> None:
        self._roll(ctx.epoch)

    def on_epoch_end(self, model, ctx, metrics) -> None:
        """(L3) with `ratio="val"`: epoch t's validation head accuracies set r_m for epoch t+1."""
        if self.params.ratio == "val":
            for m in self.modalities():
                self.ratio[m], self.memory[m] = update_ratio(self.memory[m], float(metrics[f"acc_{m}"]),
                                                             self.ratio[m], self.params.window)

    def loss(self, batch, out, ctx):
        self._roll(ctx.epoch)
        terms = super().loss(batch, out, ctx)
        if self.params.ratio == "train":
            y = batch["label"]
            with torch.no_grad():
                for m in self.modalities():
                    self.correct[m] += float((out.logits[m].argmax(1) == y).sum())
            self.count += int(y.shape[0])
        return terms

    # -- applying the rates ----------------------------------------------------------------------------------
    def _groups(self):
        if self.groups is None:
            raise RuntimeError("mslr: setup(model, ctx) was not called")
        return self.groups

    def after_backward(self, model, ctx) -> None:
        if self.params.apply == "grad" and self.in_window(ctx.epoch):
            k = self.coefficients()
            for m, ps in self._groups().items():
                if k[m] != 1.0:
                    scale_grads(ps, k[m])  # the code l.203-209: grad <- k_m grad
            ctx.record(**{f"lr_coef_{m}": v for m, v in k.items()})

    def train_step(self, model, batch, optimizer, ctx):
        if self.params.apply != "lr" or not self.in_window(ctx.epoch):
            return super().train_step(model, batch, optimizer, ctx)
        k = self.coefficients()
        scaled = {m: ps for m, ps in self._groups().items() if k[m] != 1.0}
        with torch.no_grad():
            old = {m: [p.detach().clone() for p in ps] for m, ps in scaled.items()}
        terms = super().train_step(model, batch, optimizer, ctx)
        with torch.no_grad():  # p <- p_old + k_m (p_new - p_old): lr k_m * eta for SGD / Adam / AdamW
            for m, ps in scaled.items():
                for p, p0 in zip(ps, old[m]):
                    p.copy_(p0.lerp_(p, k[m]))
        ctx.record(**{f"lr_coef_{m}": v for m, v in k.items()})
        return terms

    # -- checkpoint --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"ratio": dict(self.ratio), "memory": {m: list(v) for m, v in self.memory.items()},
                "correct": dict(self.correct), "count": self.count, "acc_epoch": self.acc_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.ratio = {m: float(v) for m, v in state["ratio"].items()}
        self.memory = {m: [float(x) for x in v] for m, v in state["memory"].items()}
        self.correct = {m: float(v) for m, v in state["correct"].items()}
        self.count = int(state["count"])
        self.acc_epoch = int(state["acc_epoch"])
