"""InfoReg: Information Acquisition Regulation (C. Huang, Y. Wei, Z. Yang, D. Hu, "Adaptive Unimodal Regulation for
Balanced Multimodal Information Acquisition", CVPR 2025; arXiv 2503.18595).

Sources read: the paper's abstract and introduction (arXiv 2503.18595v1 HTML, first page only) and the official
code GeWu-Lab/InfoReg_CVPR2025 @939b2ed11dcbf4daddb2507157b2cb9f8d0e24d7 `main.py` (`get_arguments` l.25-64,
`train_epoch` l.231-604, `main` l.669-715) and `models/basic_model.py` (`AVClassifier` l.8-80), and the README
("After data processing, you can simply run the code by: python main.py", i.e. the argparse defaults). The
method section (§3) could not be retrieved in the session that wrote this file, so the formulas are labelled
(L), (S), (B), (R), (F), (W) instead of by the paper's equation numbers; each is pinned to the official code
line that implements it. BalanceBenchmark (GeWu-Lab/BalanceBenchmark) has no InfoReg trainer.

Per step (batch of B samples, modality m with per-modality logits z_m = `out.logits[m]`):
  (L) loss L = CE(fused, y) + uni_weight * sum_m CE(z_m, y)                         (code l.378-380, 456-458:
      `loss_out_v.backward(); loss_out_a.backward(); loss.backward()` accumulate the three gradients)
  (S) s_m = sum_i softmax(z_m,i)[y_i]  (a batch sum, not a mean; no gradient)                  (code l.460-461)
  (B) gap_m = s_m - s_other (k = 2), beta_m = gamma_m * exp(tanh(gap_m)) if gap_m > 0 and the prime learning
      window is open, else 0; gamma_audio = 0.95, gamma_visual = 0.1 in the code           (code l.465-485)
  (R) proximal regulation of the information-sufficient (dominant) modality's encoder, added to the gradient
      after backward:  g_theta_m <- g_theta_m + beta_m (theta_m - theta_m^(e)),  i.e. the gradient of
      (beta_m / 2) ||theta_m - theta_m^(e)||^2, with theta_m^(e) the encoder's parameters at the start of
      epoch e (`global_model = cp.deepcopy(model)` at the top of `train_epoch`); every encoder parameter
      (conv and linear weights, biases, BN affine parameters)                     (code l.259, l.489-495)
  (F) information amount of modality m in epoch e, the Fisher-information "trace" as the code computes it:
      T_m^(e) = sum_layers mean_elements( sum_steps g_W^2 ) = sum_steps sum_layers mean(g_W^2), over the
      weights W of the encoder's Conv2d/Linear layers, g the gradient the optimizer steps with (after (R))
                                                                                     (code l.296-310, 507-514, 569-577)
  (W) prime learning window: with the trace history T^(0..e-1) of the window modality, padded with `window`
      zeros before epoch 0 (code l.694), kappa_e = (mean_{j=e-w}^{e-1} T^(j) - mean_{j=e-w-1}^{e-2} T^(j))
      / mean_{j=e-w}^{e-1} T^(j) = (T^(e-1) - T^(e-w-1)) / sum_{j=e-w}^{e-1} T^(j); kappa_0 = 1; the window is
      open in epoch e iff kappa_e > threshold (0.05). Not latched: a later epoch may reopen it  (code l.237-243,
      465, 473)
  Outside the window (beta = 0) the step is CE(fused) + uni_weight * sum_m CE(z_m): no regulation, but not
  Joint-Train when uni_weight > 0 (as the official code, whose `--modulation_starts/ends` are unused).

Deviations and choices (numbered):
(1) Paper text. Only the abstract/introduction were readable: every formula above is the released code's.
    A third-party summary (sciencestack.ai, "TL;DR") says the paper "combines unimodal and multimodal losses
    with an adaptive coefficient ... that depends on the observed performance gap", consistent with (L), (B).
(2) Per-modality logits z_m are the configured fusion head's read-out (g2d/models/fusion.py): under
    `model.fusion=concat` W_m f_m + b/k, the official l.361-363 read-out (b/2 at k = 2); under late/sum the
    modality's own head. The official model also has unused `head_audio/head_video` heads: not built here.
(3) (F) uses every encoder parameter with >= 2 dimensions (conv, linear, embedding and recurrent weight
    matrices), so non-ResNet encoders (MLP, sequence) have a trace too; for the ResNet encoders it is the
    official Conv2d/Linear weight set. T is accumulated on the gradient after (R) and before
    `trainer.grad_clip` (the official code has no clipping), in float32, on the device (one sync per epoch).
(4) The window modality (W): the official code uses the audio encoder's trace for both modalities (l.240-241),
    audio being CREMA-D's information-sufficient modality. `window_from="first"` (default) uses the dataset's
    first modality (audio on CREMA-D, as the code), a modality name picks that one, `"sum"` the sum of all
    encoders' traces. kappa with a zero denominator (no trace yet) is 0: window closed (the code divides by
    zero: NaN, the comparisons are False, same result).
(5) k > 2 modalities (UR-Funny, IEMOCAP) are defined by neither the paper's readable part nor the code:
    gap_m = s_m - mean_{j != m} s_j (`multi="mean"`, default) or s_m - max_{j != m} s_j (`"max"`, only the
    top modality is regulated); both equal s_m - s_other at k = 2. Every modality with gap_m > 0 is regulated
    with its own beta_m. gamma_m = `gamma_per_modality[m]` where given, else `gamma`; names a dataset lacks
    are ignored (the one `methods.inforeg` block serves every dataset).
(6) Regression is refused (`tasks`): (S) is a true-class softmax probability.
(7) The anchor theta^(e) is taken in `on_epoch_start` (and, if that hook was not called, at the first
    `after_backward` of the epoch, before any step of it: the same parameters). A resume restarts at an epoch
    boundary, so the anchor needs no checkpointing; the trace history and the running epoch sum do.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from g2d.methods.base import Method, task_loss
from g2d.registry import register_method

MULTI = ("mean", "max")


@dataclass
class InfoRegParams:
    gamma: float = 0.95  # beta scale (B), official l.468 (audio); used for modalities not in gamma_per_modality
    gamma_per_modality: dict[str, float] = field(default_factory=dict)  # official: {audio: 0.95, visual: 0.1}
    uni_weight: float = 1.0  # (L) weight of sum_m CE(z_m): official 1 (l.456-458); 0 = CE(fused) + regulation
    threshold: float = 0.05  # (W) window open iff kappa > threshold (official l.465, 473)
    window: int = 10  # (W) epochs in each moving mean of the trace (official l.240-241, ten-zero padding l.694)
    window_from: str = "first"  # (W) whose trace: first | sum | <modality name> (official: audio)
    multi: str = "mean"  # k > 2 gap: s_m - mean (mean) | max (max) of the other modalities' scores


def info_scores(logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """(S) s_m = sum_i softmax(z_m,i)[y_i], (M,), no gradient (official l.460-461)."""
    with torch.no_grad():
        return torch.stack([F.softmax(z.detach().float(), 1).gather(1, y[:, None]).sum() for z in logits])


def score_gaps(s: torch.Tensor, multi: str = "mean") -> torch.Tensor:
    """gap_m = s_m - (mean | max) of the other modalities' scores; s_m - s_other at k = 2."""
    m = s.shape[0]
    if m < 2:
        raise ValueError("inforeg needs at least two modalities")
    if multi == "mean":
        return s - (s.sum() - s) / (m - 1)
    if multi == "max":
        eye = torch.eye(m, dtype=torch.bool, device=s.device)
        return s - s.unsqueeze(0).expand(m, m).masked_fill(eye, float("-inf")).max(1).values
    raise ValueError(f"methods.inforeg.multi={multi!r} not in {MULTI} (params.yaml)")


def regulation_coefficients(gap: torch.Tensor, gamma: torch.Tensor, open_: bool) -> torch.Tensor:
    """(B) beta_m = gamma_m exp(tanh(gap_m)) for gap_m > 0 inside the window, else 0 (official l.465-485)."""
    if not open_:
        return torch.zeros_like(gap)
    return torch.where(gap > 0, gamma * torch.exp(torch.tanh(gap)), torch.zeros_like(gap))


def window_kappa(history: list[float], window: int = 10) -> float:
    """(W) kappa_e from the trace history of epochs 0..e-1 (official l.237-243 with the ten-zero padding of
    l.694): relative change of the `window`-epoch moving mean; 1 at epoch 0, 0 for a zero denominator."""
    if not history:
        return 1.0
    padded = [0.0] * window + [float(t) for t in history]
    new = sum(padded[-window:]) / window
    old = sum(padded[-window - 1:-1]) / window
    return (new - old) / new if new != 0 else 0.0


@register_method("inforeg")
class InfoReg(Method):
    """Proximal regulation of the dominant modality's encoder during the prime learning window."""

    Params = InfoRegParams
    tasks = ("classification",)  # (S) is a true-class softmax probability

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"{self.name} supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        mods = self.modalities()
        if len(mods) < 2:
            raise ValueError("inforeg needs at least two modalities")
        score_gaps(torch.ones(2), params.multi)
        if params.window_from not in ("first", "sum", *mods):
            raise ValueError(f"methods.inforeg.window_from={params.window_from!r} not in first, sum or a modality "
                             f"of {spec.name} {list(mods)} (params.yaml)")
        if params.window < 1:
            raise ValueError(f"methods.inforeg.window={params.window} must be >= 1 (params.yaml)")
        self.gammas = torch.tensor([float(params.gamma_per_modality.get(m, params.gamma)) for m in mods])
        self.history: dict[str, list[float]] = {m: [] for m in mods}  # T_m per finished epoch
        self.acc: dict[str, torch.Tensor] = {}  # running (F) sum of the current epoch
        self.acc_epoch = -1  # the epoch whose sum is in acc
        self.anchor: dict[str, list[torch.Tensor]] = {}
        self.anchor_epoch = -1
        self._scores: torch.Tensor | None = None

    # -- window --------------------------------------------------------------------------------------------
    def _roll(self, epoch: int) -> None:
        """Close the epochs before `epoch`: their (F) sums join the trace history."""
        if self.acc_epoch >= epoch:
            return
        if self.acc_epoch >= 0:
            for m in self.modalities():
                self.history[m].append(float(self.acc[m]) if m in self.acc else 0.0)
        self.acc, self.acc_epoch = {}, epoch

    def window_trace(self) -> list[float]:
        wf, mods = self.params.window_from, self.modalities()
        if wf == "sum":
            return [sum(t) for t in zip(*(self.history[m] for m in mods))]
        return self.history[mods[0] if wf == "first" else wf]

    def kappa(self) -> float:
        return window_kappa(self.window_trace(), self.params.window)

    def window_open(self) -> bool:
        return self.kappa() > self.params.threshold

    def _snapshot(self, model, epoch: int) -> None:
        self.anchor = {m: [p.detach().clone() for p in ps] for m, ps in model.modality_parameters().items()}
        self.anchor_epoch = epoch

    def on_epoch_start(self, model, ctx) -> None:
        self._roll(ctx.epoch)
        self._snapshot(model, ctx.epoch)  # theta^(e): official `global_model = cp.deepcopy(model)` l.259

    # -- step ------------------------------------------------------------------------------------------------
    def loss(self, batch, out, ctx):
        self._roll(ctx.epoch)
        y, mods = batch["label"], self.modalities()
        terms = {"task": task_loss(self.spec, out.fused, y)}
        if self.params.uni_weight != 0:  # (L) official l.456-458
            terms["uni"] = self.params.uni_weight * sum(F.cross_entropy(out.logits[m].float(), y) for m in mods)
        self._scores = info_scores([out.logits[m] for m in mods], y)
        return terms

    def after_backward(self, model, ctx) -> None:
        if self._scores is None:
            raise RuntimeError("inforeg: after_backward called without loss() on this step")
        s, self._scores = self._scores, None
        if self.anchor_epoch != ctx.epoch:  # deviation (7): first step of the epoch, parameters not yet stepped
            self._snapshot(model, ctx.epoch)
        kappa = self.kappa()
        open_ = kappa > self.params.threshold
        gap = score_gaps(s, self.params.multi)
        beta = regulation_coefficients(gap, self.gammas.to(s.device), open_)
        groups = model.modality_parameters()
        beta_host = beta.tolist() if open_ else [0.0] * len(beta)  # one device sync per step
        for i, m in enumerate(self.modalities()):
            if beta_host[i] > 0:  # (R) grad += beta (theta - theta^(e)), official l.489-495
                for p, a in zip(groups[m], self.anchor[m]):
                    if p.grad is not None:
                        p.grad.add_(p.detach() - a, alpha=beta_host[i])
            with torch.no_grad():  # (F) sum_layers mean(g_W^2) after (R), official l.507-514
                sq = [p.grad.float().pow(2).mean() for p in groups[m] if p.dim() >= 2 and p.grad is not None]
                if sq:
                    step_sum = torch.stack(sq).sum()
                    self.acc[m] = self.acc[m] + step_sum if m in self.acc else step_sum
        ctx.record(kappa=kappa, **{f"beta_{m}": beta[i] for i, m in enumerate(self.modalities())},
                   **{f"s_{m}": s[i] for i, m in enumerate(self.modalities())})

    # -- checkpoint ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": {m: list(h) for m, h in self.history.items()},
                "acc": {m: t.detach().clone() for m, t in self.acc.items()}, "acc_epoch": self.acc_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.history = {m: [float(v) for v in h] for m, h in state["history"].items()}
        self.acc = {m: t.clone() for m, t in state["acc"].items()}
        self.acc_epoch = int(state["acc_epoch"])
