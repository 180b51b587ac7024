"""Fusion heads: fused prediction plus a per-modality prediction for each modality.

Per-modality logits, generalised to k modalities (official G2D/OGM-GE conventions in g2d-spec.md §2.5):
- late: each modality's own head head_m(f_m) = W_m f_m + b_m (full bias); fused = their mean.
- sum: each modality's own head W_m f_m + b_m, every head with its own full bias; fused = their sum,
  so the per-modality logits add up to the fused output. No bias is split (the official code reads
  out W_m f_m + b_m / 2 instead, whose shares do not add up to the fused logits).
- concat: one head on [f_1; ...; f_k]; share_m = W[:, cols of m] f_m + b/k, the bias split equally,
  so the shares add up to the fused output.
- film/gated: the output layer on the modality's own (conditioned) projection with a 1/k bias share
  (film: normalised FiLM with gamma = 1 + delta_gamma, Perez et al. 2018; see FiLMFusion).
"""
from __future__ import annotations

import torch
from torch import nn

FUSIONS = ("late", "concat", "sum", "film", "gated")


class LateFusion(nn.Module):
    """fused = mean_m head_m(f_m) (the G2D default)."""

    def __init__(self, dims: dict[str, int], n_out: int, _d: int = 0):
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(d, n_out) for m, d in dims.items()})

    def forward(self, feats):
        per = {m: self.heads[m](f) for m, f in feats.items()}
        return torch.stack(list(per.values())).mean(0), per

    def head_parameters(self):
        return {m: list(h.parameters()) for m, h in self.heads.items()}


class SumFusion(nn.Module):
    """fused = sum_m head_m(f_m)."""

    def __init__(self, dims, n_out, _d=0):
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(d, n_out) for m, d in dims.items()})

    def forward(self, feats):
        per = {m: self.heads[m](f) for m, f in feats.items()}
        return torch.stack(list(per.values())).sum(0), per

    def head_parameters(self):
        return {m: list(h.parameters()) for m, h in self.heads.items()}


class ConcatFusion(nn.Module):
    """fused = W [f_1; ...; f_k] + b; share_m = W_m f_m + b/k."""

    def __init__(self, dims, n_out, _d=0):
        super().__init__()
        self.dims = dict(dims)
        self.fc = nn.Linear(sum(dims.values()), n_out)

    def forward(self, feats):
        fused = self.fc(torch.cat([feats[m] for m in self.dims], 1))
        per, start, k = {}, 0, len(self.dims)
        for m, d in self.dims.items():
            per[m] = feats[m] @ self.fc.weight[:, start:start + d].T + self.fc.bias / k
            start += d
        return fused, per

    def head_parameters(self):
        return {m: [self.fc.weight, self.fc.bias] for m in self.dims}


class FiLMFusion(nn.Module):
    """The first modality conditions the mean projection of the others: out(FiLM(x | c)).

    The official G2D code (g2d-spec.md §2.5, the OGM-GE fusion module) computes [gamma; beta] = fc(c) and
    out(gamma * x + beta) with gamma unbounded and linear in c; its per-modality read-out conditions a
    modality on itself, out(gamma(x) * x + beta(x)), which is quadratic in the encoder features: cross-entropy
    falls by scaling features up, the gradient grows with them, and g2d+film diverged (feature-distillation term
    ~1e13 to inf at trainer.lr=0.1, non-finite on some set-ups at the default lr, issue 16).
    Deviation: the generator predicts the deviation of the scale, as in Perez et al., "FiLM: Visual Reasoning
    with a General Conditioning Layer" (AAAI 2018, section 7.2: "we predict delta gamma"), squashed:
        FiLM(x | c) = (1 + tanh(dgamma(c))) * x + beta(c),   [dgamma; beta] = W c + b,
    so gamma lies in (0, 2), an untrained generator (dgamma ~ 0) leaves x nearly unchanged, and every logit is
    at most linear in the features, like the other heads' (tests/unit/test_models.py checks the growth). The
    features are not normalised (an earlier version of this docstring said LayerNorm; the code never had it).
    """

    def __init__(self, dims, n_out, d=128):
        super().__init__()
        self.mods = list(dims)
        self.proj = nn.ModuleDict({m: nn.Linear(dd, d) for m, dd in dims.items()})
        self.film = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, n_out)

    def _mod(self, cond, x):
        dgamma, beta = self.film(cond).chunk(2, dim=1)
        return (1 + torch.tanh(dgamma)) * x + beta

    def forward(self, feats):
        p = {m: self.proj[m](feats[m]) for m in self.mods}
        rest = torch.stack([p[m] for m in self.mods[1:]]).mean(0) if len(self.mods) > 1 else p[self.mods[0]]
        fused = self.out(self._mod(p[self.mods[0]], rest))
        k = len(self.mods)
        per = {m: self._mod(p[m], p[m]) @ self.out.weight.T + self.out.bias / k for m in self.mods}
        return fused, per

    def head_parameters(self):
        shared = [*self.film.parameters(), *self.out.parameters()]
        return {m: [*self.proj[m].parameters(), *shared] for m in self.mods}


class GatedFusion(nn.Module):
    """out(sigmoid(p_1) * mean_{m>1} p_m): the first modality gates the others."""

    def __init__(self, dims, n_out, d=128):
        super().__init__()
        self.mods = list(dims)
        self.proj = nn.ModuleDict({m: nn.Linear(dd, d) for m, dd in dims.items()})
        self.out = nn.Linear(d, n_out)

    def forward(self, feats):
        p = {m: self.proj[m](feats[m]) for m in self.mods}
        rest = torch.stack([p[m] for m in self.mods[1:]]).mean(0) if len(self.mods) > 1 else p[self.mods[0]]
        fused = self.out(torch.sigmoid(p[self.mods[0]]) * rest)
        k = len(self.mods)
        per = {m: p[m] @ self.out.weight.T + self.out.bias / k for m in self.mods}
        return fused, per

    def head_parameters(self):
        return {m: [*self.proj[m].parameters(), *self.out.parameters()] for m in self.mods}


def build_fusion(name: str, dims: dict[str, int], n_out: int, d: int) -> nn.Module:
    table = {"late": LateFusion, "concat": ConcatFusion, "sum": SumFusion, "film": FiLMFusion,
             "gated": GatedFusion}
    if name not in table:
        raise ValueError(f"model.fusion {name!r} not in {FUSIONS}")
    return table[name](dims, n_out, d)
