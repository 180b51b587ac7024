"""MMPareto (Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024).

Structure (official GeWu-Lab/MMPareto_ICML2024, code/models/models.py@a339db3 `AVClassifier`, trained by
code/MMPareto.py@a339db3): a multimodal head on the fused features plus one separate linear unimodal head
per modality that never feeds the multimodal prediction. Here the multimodal head is the model's fusion
head (whatever `model.fusion` is configured); the unimodal heads are MMPareto's own modules, created in
`aux_module` (one `nn.Linear(encoder_out_dim, n_outputs)` per modality, attached by the trainer as
`model.aux`, so they are optimised, checkpointed and moved with the model, but left out of `model.pt`).

Losses: L_mm = task loss on the fused prediction, L_m = task loss on `model.aux[m](features_m)`.
Gradients, each from its own `autograd.grad` call (spec §5.6.3: never accumulate .grad across losses):
- fusion head (every parameter that is neither an encoder's nor an aux head's): exactly grad L_mm;
- unimodal head m: exactly grad L_m;
- encoder theta_m, which has exactly two objectives, L_mm and L_m, for any number of modalities (so the
  2-vector closed-form min-norm solution is exact; no Frank-Wolfe needed): on its flattened gradient,
  cos(g_mm, g_m) > 0 -> weights (1/2, 1/2), otherwise the min-norm (MGDA) weights; direction
  d = 2(a1 g_mm + a2 g_m), rescaled to gamma * max(1, |g_mm + g_m| / |d|) * d.
Since no head is shared between the losses, every head's gradient equals the official one (grad of
L_mm + sum_m L_m restricted to that head). Inference uses the fused prediction only.
Logged per step (history.csv, epoch means under `coef/`): cos_<m>, w_mm_<m>, w_uni_<m>, conflict_<m>
(1 if cos <= 0, so its epoch mean is the conflict rate) and, for classification, uni_acc_<m> (training-batch
accuracy of MMPareto's unimodal head m, measured in train mode before the step).
Per-modality eval metrics (`acc_<m>`, `f1_<m>` ...) still come from the model's own `out.logits[m]`: under
the default late fusion that is modality m's component of the fusion head (the fused prediction is the mean
of these components; under concat/sum its additive share), trained only by L_mm. It is neither MMPareto's
unimodal head nor a standalone classifier; the unimodal heads are not evaluated on val/test.

Deviations from the official code:
- `rescale="global"` (default) takes the norm ratio over the whole encoder (the spec's reading of the
  paper, baselines-spec §5.1/§5.6.1); it keeps the final direction Pareto (non-negative inner product with
  both losses' gradients) and without conflict gives exactly gamma(g_mm + g_m). `rescale="tensor"` is the
  official code's rule (code/MMPareto.py@a339db3: the ratio is taken per parameter tensor), which
  produced the paper's numbers; it can break the Pareto guarantee in rare cases (spec §5.6.1).
- Min-norm boundary weights are exactly 0/1 (the official solver returns 0.999/0.001).
- The multimodal head is the benchmark's configured fusion head (late fusion by default; the official one
  is a linear head on the concatenated features, i.e. `model.fusion=concat`).
- The unimodal heads are initialised like the model's heads (xavier-normal weight, zero bias); the official
  code uses PyTorch's default nn.Linear init.
- The official code keeps a constant LR (its StepLR is never stepped); here the trainer's schedule applies
  to every method alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from g2d.methods.base import Method, task_loss
from g2d.registry import register_method

RESCALES = ("global", "tensor")


@dataclass
class MMParetoParams:
    gamma: float = 1.5  # magnitude boost (official gamma, spec §5.4)
    rescale: str = "global"  # global (paper, keeps the Pareto guarantee) | tensor (official code)


def min_norm_2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """argmin_{c in [0,1]} |c a + (1-c) b|^2 in closed form (MGDA, Sener & Koltun 2018, Alg. 1)."""
    diff = a - b
    den = diff.dot(diff)
    c = ((b - a).dot(b) / den.clamp_min(1e-30)).clamp(0.0, 1.0)
    return torch.where(den > 0, c, torch.full_like(c, 0.5))


def _flat(gs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1).to(torch.promote_types(g.dtype, torch.float32)) for g in gs])


def integrate(g_mm: list[torch.Tensor], g_u: list[torch.Tensor], gamma: float, rescale: str):
    """Per-encoder MMPareto direction (MMPareto Alg. 1, spec §5.1). Returns (grads, cos, w_mm, w_uni)."""
    if rescale not in RESCALES:
        raise ValueError(f"methods.mmpareto.rescale={rescale!r} not in {RESCALES} (params.yaml)")
    a, b = _flat(g_mm), _flat(g_u)
    cos = a.dot(b) / (a.norm() * b.norm()).clamp_min(1e-30)
    c = min_norm_2(a, b)
    w_mm = torch.where(cos > 0, torch.full_like(c, 0.5), c)  # no conflict: equal weights (MMPareto Alg. 1, spec §5.1)
    w_u = 1.0 - w_mm
    d = [2 * (w_mm * gm + w_u * gu) for gm, gu in zip(g_mm, g_u)]  # MMPareto Alg. 1: d = 2(a1 g_mm + a2 g_u)
    if rescale == "global":
        ratio = (a + b).norm() / (2 * (w_mm * a + w_u * b)).norm().clamp_min(1e-30)
        scales = [gamma * ratio.clamp_min(1.0)] * len(d)  # MMPareto magnitude rule (spec §5.1)
    else:
        scales = []
        for gm, gu, dl in zip(g_mm, g_u, d):
            n = dl.norm()
            r = torch.where(n > 0, (gm + gu).norm() / n.clamp_min(1e-30), torch.ones_like(n))
            scales.append(gamma * r.clamp_min(1.0))
    return [dl * s for dl, s in zip(d, scales)], cos, w_mm, w_u


def unimodal_heads(model: nn.Module) -> nn.ModuleDict:
    """One linear head per modality on its encoder's features, initialised like the model's heads."""
    heads = nn.ModuleDict({m: nn.Linear(model.encoders[m].out_dim, model.spec.num_outputs)
                           for m in model.modalities})
    for h in heads.values():  # as MultimodalModel's fusion heads (official weight_init): xavier-normal, zero bias
        nn.init.xavier_normal_(h.weight)
        nn.init.zeros_(h.bias)
    return heads


@register_method("mmpareto")
class MMPareto(Method):
    Params = MMParetoParams

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if params.rescale not in RESCALES:
            raise ValueError(f"methods.mmpareto.rescale={params.rescale!r} not in {RESCALES} (params.yaml)")

    def aux_module(self, model):
        return unimodal_heads(model)

    def train_step(self, model, batch, optimizer, ctx):
        aux = getattr(model, "aux", None)
        if not isinstance(aux, nn.ModuleDict) or set(aux.keys()) != set(model.modalities):
            raise RuntimeError("MMPareto needs its unimodal heads as model.aux: attach method.aux_module(model) "
                               "before building the optimizer, as Trainer.fit does")
        optimizer.zero_grad(set_to_none=True)
        y = batch["label"]
        mods = list(model.modalities)
        with ctx.autocast():
            out = model(batch)
            uni = {m: aux[m](out.features[m]) for m in mods}
            l_mm = task_loss(self.spec, out.fused, y)
            l_uni = {m: task_loss(self.spec, uni[m], y) for m in mods}
        terms = {"mm": l_mm, **{f"uni_{m}": v for m, v in l_uni.items()}}
        total = sum(terms.values())
        ctx.check_finite(total, terms)
        enc = {m: [p for p in ps if p.requires_grad] for m, ps in model.modality_parameters().items()}
        uni_p = {m: [p for p in aux[m].parameters() if p.requires_grad] for m in mods}
        own = {id(p) for ps in (*enc.values(), *uni_p.values()) for p in ps}
        heads = [p for p in model.parameters() if p.requires_grad and id(p) not in own]  # the fusion head
        all_enc = [p for m in mods for p in enc[m]]
        # separate gradients per loss (spec §5.6.3: never accumulate .grad between losses)
        g_mm = _grad(l_mm, all_enc + heads, retain=True)
        for p, gp in zip(heads, g_mm[len(all_enc):]):
            p.grad = gp  # fusion head: exactly grad L_mm (L_m never reaches it)
        start = 0
        for i, m in enumerate(mods):
            g_mm_m = g_mm[start:start + len(enc[m])]
            start += len(enc[m])
            g = _grad(l_uni[m], enc[m] + uni_p[m], retain=i < len(mods) - 1)
            g_u = g[:len(enc[m])]
            for p, gp in zip(uni_p[m], g[len(enc[m]):]):
                p.grad = gp  # unimodal head m: exactly grad L_m
            new, cos, w_mm, w_u = integrate(g_mm_m, g_u, self.params.gamma, self.params.rescale)
            for p, gp in zip(enc[m], new):
                p.grad = gp.to(p.dtype)
            rec = {f"cos_{m}": cos, f"w_mm_{m}": w_mm, f"w_uni_{m}": w_u, f"conflict_{m}": (cos <= 0).float()}
            if self.spec.task == "classification":
                rec[f"uni_acc_{m}"] = (uni[m].detach().argmax(1) == y).float().mean()
            ctx.record(**rec)
        if ctx.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
        optimizer.step()
        return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}


def _grad(loss: torch.Tensor, params: list, retain: bool) -> list[torch.Tensor]:
    """d loss / d params, zeros for parameters the loss does not reach."""
    gs = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
