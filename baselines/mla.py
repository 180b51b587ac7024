"""MLA: multimodal learning with alternating unimodal adaptation (Zhang et al., CVPR 2024), spec §4.

Each step encodes all modalities once, then in the fixed order of `spec.modality_names` takes one
optimizer step per modality on CE(psi(h_m), y) through a head psi shared by all modalities; only
that encoder and psi carry gradients (grads of the others are None, so weight decay and momentum
leave them alone). Shared head: the model's per-modality heads (`model.fusion: late|sum`) are tied
in `setup` into one module, so the optimizer (built before setup) already holds it, `model.pt`
saves it, and `out.logits[m]` = psi(h_m) gives the per-modality metrics. Head-gradient projection
(`projection="paper"`, default): the paper's recursive-least-squares projector,
P_t = P_{t-1} - q h^T P_{t-1}, q = P_{t-1} h / (alpha + h^T P_{t-1} h), h = mean feature of the
previously trained modality (current-batch mean, as the official code; the paper uses a dataset
mean), grad_W <- grad_W P_t^T, bias untouched, first update unprojected, P never reset. The
official code (Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation utils/utils.py
@ab6c184) never applies its projection (it matches the parameter name "module.weight", which the
head does not have), so its reported numbers come from `projection="none"`. Test-time fusion
(`test_fusion="entropy"`): z_i = sum_m softmax_m(-e_m,i) psi(h_m,i), entropy per sample over
classes (the official code's softmax over the batch, dim=0, is a bug); `"fixed"` returns the
fixed-weight sum z = sum_m w_m psi(h_m) with `fixed_weights` = {modality: w_m}; empty (the default) = the
model's equal-weight fused output (late: mean of the heads, w_m = 1/k). The official fixed fusion weights
audio (its first modality) 0.55 and visual 0.45: `main(av_alpha = 0.55)` feeds `valid(...)`, where
`out = av_alpha * out_a + (1 - av_alpha) * out_v` (the official repository above, main.py @ab6c184,
lines 651 and 968; `--av_alpha` defaults to 0.5 but training runs use main's 0.55); with three
modalities a 0.35, v 0.25, t 0.4 (`--a_alpha/--v_alpha/--t_alpha`). So `fixed_weights: {audio: 0.55,
visual: 0.45}` with `test_fusion: fixed` is the official "MLA (fixed fusion)" README command. The paper
profile (params.yaml `profiles.paper`) keeps `test_fusion: entropy`, the MLA paper's dynamic fusion, so
it does not use `fixed_weights` (it leaves them empty; see reports/recipes.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from g2d.methods.base import Method, task_loss
from g2d.registry import register_method


@dataclass
class MLAParams:
    projection: str = "paper"  # paper (RLS projector on the shared head) | none (official code as run)
    alpha: float = 0.1  # projector regulariser (official: 0.1 ** (1 + batch_idx / n_batches))
    test_fusion: str = "entropy"  # entropy (dynamic, paper) | fixed (sum_m fixed_weights[m] * psi(h_m))
    # test_fusion=fixed: weight per modality, every modality named; {} = equal weights (the model's fused output).
    # Official 2-modality value {audio: 0.55, visual: 0.45} (main.py @ab6c184, see the module docstring)
    fixed_weights: dict[str, float] = field(default_factory=dict)


def entropy_fusion(logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused (B,C), weights (M,B)): w_m,i = softmax over m of -H(softmax(z_m,i)) (MLA, spec §4.1)."""
    z = torch.stack([x.float() for x in logits])  # (M, B, C)
    logp = F.log_softmax(z, dim=2)
    ent = -(logp.exp() * logp).sum(2)  # (M, B), per sample over classes
    w = F.softmax(-ent, dim=0)
    return (w.unsqueeze(2) * z).sum(0), w


def update_projector(P: torch.Tensor, h: torch.Tensor, alpha: float) -> torch.Tensor:
    """P_t = P_{t-1} - q h^T P_{t-1}, q = P_{t-1} h / (alpha + h^T P_{t-1} h) (MLA, spec §4.1; OWM/RLS)."""
    Ph = P @ h
    q = Ph / (alpha + h @ Ph)
    return P - torch.outer(q, h @ P)


@register_method("mla")
class MLA(Method):
    Params = MLAParams
    tasks = ("classification",)  # entropy fusion needs class probabilities

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"mla supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        if params.projection not in ("paper", "none"):
            raise ValueError(f"methods.mla.projection={params.projection!r} not in (paper, none) "
                             "(params.yaml)")
        if params.test_fusion not in ("entropy", "fixed"):
            raise ValueError(f"methods.mla.test_fusion={params.test_fusion!r} not in (entropy, fixed) "
                             "(params.yaml)")
        w = dict(params.fixed_weights or {})
        if w:
            mods = set(spec.modality_names)
            if set(w) != mods:
                raise ValueError(f"methods.mla.fixed_weights names {sorted(w)}; {spec.name} has {sorted(mods)}: "
                                 "give every modality a weight, or {} for equal weights (params.yaml)")
            if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
                raise ValueError(f"methods.mla.fixed_weights={w}: weights must be >= 0 with a positive sum")
        self.P: torch.Tensor | None = None  # projector on the head's input space, accumulated
        self.prev: torch.Tensor | None = None  # mean feature of the previously trained modality
        self.head: nn.Linear | None = None

    def setup(self, model, ctx) -> None:
        heads = getattr(model.fusion, "heads", None)
        if not isinstance(heads, nn.ModuleDict):
            raise TypeError(f"mla needs per-modality linear heads to share (model.fusion: late or sum in "
                            f"params.yaml); got {type(model.fusion).__name__}")
        dims = {m: h.in_features for m, h in heads.items()}
        if len(set(dims.values())) != 1:
            raise ValueError(f"mla's shared head needs equal encoder output dims, got {dims}: set model."
                             "resnet.width / model.seq_hidden / model.mlp_hidden in params.yaml to match")
        first = next(iter(heads))
        for m in heads:  # tie: every modality reads out through the first modality's head
            heads[m] = heads[first]
        self.head = heads[first]

    def _project(self, h_prev: torch.Tensor) -> None:
        """Update P with the previous modality's mean feature and project the head weight grad."""
        w = self.head.weight
        if self.P is None:
            self.P = torch.eye(w.shape[1], device=w.device, dtype=torch.float32)
        self.P = update_projector(self.P, h_prev.float(), self.params.alpha)
        if w.grad is not None:
            w.grad.copy_(w.grad.float() @ self.P.T)

    def train_step(self, model, batch, optimizer, ctx):
        if self.head is None:
            raise RuntimeError("mla: setup(model, ctx) was not called")
        y = batch["label"]
        optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            feats = model.encode(batch)  # one forward per encoder, as the official loop
        terms, logits = {}, []
        for m in self.modalities():
            with ctx.autocast():
                z = self.head(feats[m])
                loss = task_loss(self.spec, z, y)
            ctx.check_finite(loss, {f"task_{m}": loss})
            loss.backward()
            if self.params.projection == "paper" and self.prev is not None:
                self._project(self.prev)
            if ctx.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # other encoders keep grad None: untouched by the step
            self.prev = feats[m].detach().float().mean(0)
            terms[f"task_{m}"] = loss.detach()
            logits.append(z.detach())
        with torch.no_grad():
            _, w = entropy_fusion(logits)
        ctx.record(**{f"w_{m}": w[i].mean() for i, m in enumerate(self.modalities())})
        return {"loss": sum(terms.values()), **terms}

    def predict(self, out) -> torch.Tensor:
        if self.params.test_fusion == "fixed":
            w = self.params.fixed_weights
            if not w:
                return out.fused
            return sum(float(w[m]) * out.logits[m].float() for m in self.modalities())
        return entropy_fusion([out.logits[m] for m in self.modalities()])[0]

    def state_dict(self) -> dict:
        return {"P": None if self.P is None else self.P.clone(),
                "prev": None if self.prev is None else self.prev.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.P = None if state["P"] is None else state["P"].clone()
        self.prev = None if state["prev"] is None else state["prev"].clone()
