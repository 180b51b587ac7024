"""MMPareto (Wei & Hu, ICML 2024): Pareto integration of multimodal and unimodal gradients.

Losses: L_mm = task loss on the fused prediction, L_m = task loss on `out.logits[m]` (the
modality's own head under the default late fusion; a head slice under concat/sum, which the spec
(§5.6.2) notes also trains the fusion head). Each encoder theta_m has exactly two objectives,
L_mm and L_m, for any number of modalities, so the 2-vector closed-form min-norm solution is
exact (no Frank-Wolfe needed). Per encoder, on its flattened gradient: cos(g_mm, g_m) > 0 ->
weights (1/2, 1/2); otherwise the min-norm (MGDA) weights. Direction d = 2(a1 g_mm + a2 g_m),
rescaled to gamma * max(1, |g_mm + g_m| / |d|) * d. Heads keep their plain gradient of
L_mm + sum_m L_m. Inference uses the fused prediction only.
`rescale="global"` (default) takes the norm ratio over the whole encoder (the spec's reading of
the paper, baselines-spec §5.1/§5.6.1); it keeps the final direction Pareto (non-negative inner
product with both losses' gradients) and without conflict gives exactly gamma(g_mm + g_m).
`rescale="tensor"` is the official code's behaviour (GeWu-Lab/MMPareto_ICML2024, code/MMPareto.py
@a339db3: the ratio is taken per parameter tensor), which produced the paper's numbers; it can
break the Pareto guarantee in rare cases (spec §5.6.1). The official code keeps a constant LR
(its StepLR is never stepped); here the trainer's schedule applies to every method alike.
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


@register_method("mmpareto")
class MMPareto(Method):
    Params = MMParetoParams

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if params.rescale not in RESCALES:
            raise ValueError(f"methods.mmpareto.rescale={params.rescale!r} not in {RESCALES} (params.yaml)")

    def train_step(self, model, batch, optimizer, ctx):
        optimizer.zero_grad(set_to_none=True)
        y = batch["label"]
        with ctx.autocast():
            out = model(batch)
            l_mm = task_loss(self.spec, out.fused, y)
            l_uni = {m: task_loss(self.spec, out.logits[m], y) for m in model.modalities}
        terms = {"mm": l_mm, **{f"uni_{m}": v for m, v in l_uni.items()}}
        total = sum(terms.values())
        ctx.check_finite(total, terms)
        enc = {m: [p for p in ps if p.requires_grad] for m, ps in model.modality_parameters().items()}
        enc_ids = {id(p) for ps in enc.values() for p in ps}
        heads = [p for p in model.parameters() if p.requires_grad and id(p) not in enc_ids]
        all_enc = [p for m in model.modalities for p in enc[m]]
        # separate gradients per loss (spec §5.6.3: never accumulate .grad between losses)
        g_mm = _grad(l_mm, all_enc + heads, retain=True)
        head_grad = g_mm[len(all_enc):]
        g_mm_enc, start = {}, 0
        for m in model.modalities:
            g_mm_enc[m] = g_mm[start:start + len(enc[m])]
            start += len(enc[m])
        mods = list(model.modalities)
        for i, m in enumerate(mods):
            g = _grad(l_uni[m], enc[m] + heads, retain=i < len(mods) - 1)
            g_u, head_u = g[:len(enc[m])], g[len(enc[m]):]
            head_grad = [h + hu for h, hu in zip(head_grad, head_u)]
            new, cos, w_mm, w_u = integrate(g_mm_enc[m], g_u, self.params.gamma, self.params.rescale)
            for p, gp in zip(enc[m], new):
                p.grad = gp.to(p.dtype)
            ctx.record(**{f"cos_{m}": cos, f"w_mm_{m}": w_mm, f"w_uni_{m}": w_u})
        for p, gp in zip(heads, head_grad):
            p.grad = gp
        if ctx.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
        optimizer.step()
        return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}


def _grad(loss: torch.Tensor, params: list, retain: bool) -> list[torch.Tensor]:
    """d loss / d params, zeros for parameters the loss does not reach."""
    gs = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
