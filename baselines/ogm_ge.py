"""OGM / OGM-GE: on-the-fly gradient modulation (Peng et al., CVPR 2022), baselines-spec.md §2.

Per step, s_m = sum over the batch of the true-class softmax of modality m's logits (`out.logits[m]`,
the head slice / own head of the shared model), rho_m = s_m / (the others' s), and the dominant
modality's encoder gradient is scaled by k_m = 1 - tanh(alpha * rho_m); GE adds N(0, (std(g) + 1e-8)^2)
noise, std taken per tensor from the unmodulated gradient, to every selected tensor of every modality
(the official `+ 1e-8` keeps the noise alive where a gradient is exactly zero).
Choices, cited: (1) `rho_form="official"` (default) uses tanh(alpha*rho) as the paper's coefficient
(spec §2.1) and the official code (GeWu-Lab/OGM-GE_CVPR2022 main.py @343dc1d) do, so k jumps from 1
to 1-tanh(alpha) when rho crosses 1; `"shifted"` uses tanh(alpha*(rho-1)), continuous at rho=1.
(2) `scope="conv"` (default) modulates conv kernels only, as the official code does (it keeps
4-D tensors; we keep every tensor with >= 3 dims so Conv1d sequence encoders are covered);
`"weights"` = every >= 2-D encoder tensor (BalanceBenchmark), `"all"` = every encoder tensor.
(3) k > 2 modalities (UR-Funny) is not defined in the paper: `multi="mean"` (default) uses
rho_m = s_m / mean_{m'!=m} s_m'; `"min"` divides by the weakest other modality; `"pairwise"`
uses mean_{m'!=m} s_m/s_m' (BalanceBenchmark OGM_GE3). All three equal s_m/s_other for k = 2.
(4) The window is inclusive, 0-based epochs: `start_epoch <= epoch <= end_epoch` (official README
`--modulation_starts 0 --modulation_ends 50`); outside it the step is plain Joint-Train.
(5) For film/gated fusion `out.logits[m]` is the fusion module's own per-modality read-out
(fusion.py), not the official code's meaningless fc_out slice (spec §2.3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from g2d.methods.base import Method
from g2d.registry import register_method

SCOPES = ("conv", "weights", "all")
RHO_FORMS = ("official", "shifted")
MULTI = ("mean", "min", "pairwise")
GE_STD_EPS = 1e-8  # added to the GE noise std (official main.py @343dc1d)


@dataclass
class OGMParams:
    alpha: float = 0.8  # CREMA-D (official README "Tips"); VGGSound 0.1; G2D's code base (profiles.paper) 1.0
    ge: bool = False  # generalisation enhancement (Gaussian noise)
    start_epoch: int = 0  # modulation window, inclusive, 0-based epochs
    end_epoch: int = 50
    scope: str = "conv"  # conv | weights | all (see module docstring)
    rho_form: str = "official"  # official: tanh(alpha*rho) | shifted: tanh(alpha*(rho-1))
    multi: str = "mean"  # k > 2 modalities: mean | min | pairwise


@dataclass
class OGMGEParams(OGMParams):
    ge: bool = True


def ogm_ratios(s: torch.Tensor, multi: str = "mean") -> torch.Tensor:
    """rho_m for a vector of per-modality scores s (M,), M >= 2 (OGM-GE, spec §2.1; k > 2 per `multi`)."""
    m = s.shape[0]
    if m < 2:
        raise ValueError("OGM needs at least two modalities")
    others = (s.sum() - s) / (m - 1)
    if multi == "mean":
        return s / others
    eye = torch.eye(m, dtype=torch.bool, device=s.device)
    if multi == "min":
        return s / s.unsqueeze(0).expand(m, m).masked_fill(eye, float("inf")).min(1).values
    if multi == "pairwise":
        return ((s.unsqueeze(1) / s.unsqueeze(0)).masked_fill(eye, 0.0)).sum(1) / (m - 1)
    raise ValueError(f"methods.ogm*.multi={multi!r} not in {MULTI} (params.yaml)")


def ogm_coefficients(rho: torch.Tensor, alpha: float, rho_form: str = "official") -> torch.Tensor:
    """k_m = 1 - tanh(alpha * rho_m) where rho_m > 1, else 1 (OGM-GE, spec §2.1)."""
    if rho_form not in RHO_FORMS:
        raise ValueError(f"methods.ogm*.rho_form={rho_form!r} not in {RHO_FORMS} (params.yaml)")
    arg = rho if rho_form == "official" else rho - 1
    # 1 - tanh(x) written as 2 sigmoid(-2x): identical, but stays > 0 in float32 up to x ~ 50
    return torch.where(rho > 1, 2 * torch.sigmoid(-2 * alpha * arg), torch.ones_like(rho))


def select_params(params, scope: str) -> list:
    if scope == "conv":
        return [p for p in params if p.dim() >= 3]
    if scope == "weights":
        return [p for p in params if p.dim() >= 2]
    if scope == "all":
        return list(params)
    raise ValueError(f"methods.ogm*.scope={scope!r} not in {SCOPES} (params.yaml)")


@register_method("ogm")
class OGM(Method):
    """Gradient modulation of the dominant modality's encoder, applied between backward and step."""

    Params = OGMParams
    tasks = ("classification",)  # the score is a true-class softmax probability

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"{self.name} supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        ogm_coefficients(torch.ones(1), 0.0, params.rho_form)
        ogm_ratios(torch.ones(2), params.multi)
        self._scores: torch.Tensor | None = None
        self._groups: dict[str, list] = {}

    def setup(self, model, ctx) -> None:
        scope = self.params.scope
        self._groups = {m: select_params(ps, scope) for m, ps in model.modality_parameters().items()}
        empty = [m for m, ps in self._groups.items() if not ps]
        if empty:
            raise ValueError(f"methods.{self.name}.scope={scope!r} selects no encoder parameters for "
                             f"{empty} (no conv layers); use scope: weights or all in params.yaml")

    def in_window(self, epoch: int) -> bool:
        return self.params.start_epoch <= epoch <= self.params.end_epoch

    def loss(self, batch, out, ctx):
        with torch.no_grad():  # s_u: batch sum of true-class softmax (OGM-GE, spec §2.1), no graph
            y = batch["label"]
            self._scores = torch.stack([F.softmax(out.logits[m].float(), 1).gather(1, y[:, None]).sum()
                                        for m in self.modalities()])
        return super().loss(batch, out, ctx)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        rho = ogm_ratios(self._scores, self.params.multi)
        return rho, ogm_coefficients(rho, self.params.alpha, self.params.rho_form)

    def after_backward(self, model, ctx) -> None:
        if self._scores is None:
            raise RuntimeError(f"{self.name}: after_backward called without loss() on this step")
        rho, k = self.coefficients()
        self._scores = None
        if not self.in_window(ctx.epoch):  # plain Joint-Train step
            k = torch.ones_like(k)
        else:
            for i, m in enumerate(self.modalities()):
                for p in self._groups[m]:
                    if p.grad is None:
                        continue
                    if self.params.ge:  # OGM-GE (GE), spec §2.1: noise std from the *unmodulated* gradient
                        # std + 1e-8 as the official code: `normal_(0, parms.grad.std().item() + 1e-8)`
                        # (GeWu-Lab/OGM-GE_CVPR2022 main.py @343dc1d, lines 139 and 146; copied unchanged in
                        # rAIson-Lab/G2D utils/utils.py @95969d8, lines 189 and 198), so an exactly-zero
                        # gradient still gets N(0, 1e-8^2) noise
                        std = p.grad.std() if p.grad.numel() > 1 else p.grad.new_zeros(())
                        noise = torch.randn_like(p.grad) * (std + GE_STD_EPS)
                        p.grad.mul_(k[i]).add_(noise)
                    else:
                        p.grad.mul_(k[i])
        ctx.record(**{f"k_{m}": k[i] for i, m in enumerate(self.modalities())},
                   **{f"rho_{m}": rho[i] for i, m in enumerate(self.modalities())})


@register_method("ogm_ge")
class OGMGE(OGM):
    """OGM with generalisation enhancement (Gaussian noise) on."""

    Params = OGMGEParams
