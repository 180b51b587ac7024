"""AMSS and AMSS+: Adaptively Mask Subnetworks considering modal Significance (Y. Yang, H. Pan, Q.-Y. Jiang, Y. Xu,
J. Tang, "Learning to Rebalance Multi-Modal Optimization by Adaptively Masking Subnetworks", IEEE TPAMI 47(6),
2025, doi 10.1109/TPAMI.2025.3547417; arXiv 2404.08347).

Sources read. The paper's abstract (arXiv 2404.08347v1 and the TPAMI record): modal significance from "mutual
information rates", "non-uniform adaptive sampling to select foreground subnetworks from each modality for
parameter updates", AMSS+ = the mask strategy made unbiased ("unbiased estimation"). The method section itself
(its equations and their numbers) could not be retrieved in the session that wrote this file, so the formulas are
labelled (S), (K), (I), (M), (U), (H) and each is pinned to the official code, njustkmg/TPAMI-AMSS
@3161ecc72f9cb8f8a6b3abed6d863a03339dd9e9 (README: the CREMA-D commands), read in full:
  `AMSS/train_test.py` (audio-video; CREMA-D and Kinetics-Sounds): `modal_caculate_MI` l.38-97, `train_epoch`
  l.129-343 (mask loop l.192-310), `train_test` l.437-439 (SGD), argparse l.598-641;
  `AMSS_IT/train_test_IT.py` (text-image): `modal_caculate_MI` l.70-109, head mask l.185-246;
  `AMSS_rod/train_nv.py` (NVGesture, THREE modalities): `modal_caculate_MI` l.41-90, masks l.173-252.
BalanceBenchmark (GeWu-Lab/BalanceBenchmark @4c1482fca5aaa8d4278af8e26020daa039e3ccf3) has NO AMSS trainer
(`balancemm/trainer/` lists none; `git grep -i amss` finds nothing), so there is no third-party version to compare.

Per step (the CREMA-D script, `AMSS/train_test.py`, unless said otherwise):
  (S) modal significance ("mutual information rate"), per modality m, from the batch, without a graph:
        score_m = -CE(out.logits[m], y) = mean_i log p_m(y_i | x_i)            (l.73-74; -H(Y|X^m) estimate)
        H(Y)    = -sum_k pi_k log pi_k, pi = the batch label frequencies         (`hy="entropy"`, default; the
                  IT/NV scripts' `entropy()`, l.61-67 / l.32-37, in bits there: we use nats, as score_m)
                  `hy="av_code"`: the CREMA-D script's CE(pi, pi) = -sum_k pi_k log softmax(pi)_k (l.70)
        H_m     = mean_i entropy(softmax(z_m,i)) of the encoder features z_m = `out.features[m]` (l.77-82:
                  CrossEntropyLoss(a, softmax(a)), a mean over the batch)
        r_m     = (score_m + H(Y) + c) / H_m,  c = `offset` = 0.5                  (l.89-90)
        Gate: if score_m + H(Y) + c <= 0 for any m, every keep ratio is 0.5 (l.86-87).
  (K) keep ratios: t = r / T (T = `temperature`), rho_m = clip(1 - softmax(t)_m, 0.1, 0.9), NaN -> 0.5
        (l.91-95, `limit_number` l.53-56). At k = 2 this is exactly the script's rho_a = e^{t_v}/(e^{t_a}+e^{t_v}):
        the more significant modality keeps (updates) FEWER parameters. k > 2 is the NVGesture script's own form
        (train_nv.py l.82-88: coeff_m = 1 - softmax(t)_m (+ its `bias`, 0 here), same clip), so AMSS is defined
        for any k >= 2; only the AV constants (c = 0.5, no /40 on H_m) are used, not NV's (c = 3, H_m / 40).
  (I) importance of each output channel j of a masked encoder tensor W (dim 0; conv: out channels):
        `importance="gn"` (default, --gn_mode default 'gn'): g_j = sum over W[j]'s entries of grad^2
        (l.244, 277); `"gn_wn"`: g_j / sum W[j]^2; `"sqrt_gn"`: sqrt(g_j) (l.247-252).
  (M) mask (AMSS): n_keep = ceil(N * rho_m) of the N channels are drawn without replacement with probability
        q_j = g_j / sum g (`sample="adaptive"`, torch.multinomial, l.263-265; README --sample_mode=Adaptive);
        `"topk"`: the n_keep largest g_j (l.256-257); `"random"`: uniform (l.258-259). The channels drawn keep
        their gradient (mask 1), the others get gradient 0 (l.267-274) before the optimizer step; weight decay
        and momentum still act inside SGD's step, as in the code (the mask multiplies `parms.grad`).
  (U) AMSS+ (`amss_plus`, --isbias=1): a drawn channel's gradient is multiplied by 1 / (q_j + 1/N) instead of 1
        (l.269-270; adaptive sampling only, as the code: other modes keep mask 1).
  Which tensors (`scope`): `"blocks"` (default, the code's rule l.243/276: 4-D tensors named `layer*...conv*`, i.e.
        the residual blocks' main-path convolutions; the stem conv, the shortcut (downsample) convs, BN and the
        head are not masked) = here the `conv1`/`conv2` kernels of every `BasicBlock` (g2d/models/encoders.py);
        an encoder without residual blocks (sequence encoders: a Conv1d) falls back to its >= 3-D tensors
        (`"conv"`); `"weights"`: every >= 2-D encoder tensor; `"all"`: every encoder tensor (1-D ones per entry).
  (H) fusion-head mask, `mask_head` (default false): in the CREMA-D script the `fc_out` mask (l.193-241, --mask_ffn)
        is computed but never multiplied into the gradient (no `parms.grad *=` for it), so on CREMA-D the head is
        NOT masked; that is our default. `mask_head: true` applies the text-image script's head mask
        (train_test_IT.py l.185-246): for every output row c of modality m's block of the head weight (late/sum:
        its own head; concat: its columns), ceil(d_m rho_m) of the d_m entries drawn with q = g^2/sum_row g^2
        (the same `sample` mode), AMSS+ weight 1/(q + 1/d_m); biases untouched. late, sum and concat only.

Deviations (numbered):
(1) Paper text not read (see above): every formula is the official code's; the constants c = 0.5 and the clip
    [0.1, 0.9] are code constants, and which of (S)'s code variants the paper writes is unverified.
(2) H(Y): default is the true label entropy in nats; the CREMA-D script's CE(pi, pi) is `hy="av_code"` (it
    depends on the length of `bincount(y)`, reproduced by bincount without minlength). The IT/NV scripts'
    log2 (bits) is not used: it mixes bits with score_m's nats.
(3) Zero importance: when fewer than n_keep channels have g_j > 0 (e.g. dead ReLU channels), torch.multinomial
    without replacement raises on some versions/devices and fills with zero-probability channels on others
    (torch 2.14 on CPU); here every channel with g_j > 0 is kept and the rest of n_keep is drawn uniformly from
    the zero ones, on every device. All-zero g: uniform draw, AMSS+ weight with q = 0 (i.e. N).
(4) AMSS+ head weight uses 1/(q + 1/d_m), d_m the number of entries of the distribution (as the conv rule's
    1/len(important_gn)); the IT script adds 1/len(2-D tensor) = 1/rows and a `bias`, the NV script (l.212) uses
    the sampled *indices* in place of q: both read as slips, not followed.
(5) The code's `random` mode uses numpy's generator; here every draw comes from torch's generator of the
    gradient's device (seeded and checkpointed by the trainer). No other state: a resumed run is identical.
(6) The code's `Bernoulli` sample mode (a variable number of channels) and the `fix` / `warm_up` switches are not
    offered; the README runs use Adaptive and the dynamic coefficients from the first step.
(7) score_m uses the fusion head's per-modality read-out `out.logits[m]` (g2d/models/fusion.py): the code's
    `calculate_outputs` (l.107-127) is the same W_m z_m + b/2 for concat and W_m z_m + b_m for sum.
Regression is refused (`tasks`): (S) needs class labels (CE, label frequencies).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from g2d.methods.base import Method
from g2d.registry import register_method

HY_FORMS = ("entropy", "av_code")
IMPORTANCES = ("gn", "gn_wn", "sqrt_gn")
SAMPLES = ("adaptive", "topk", "random")
SCOPES = ("blocks", "conv", "weights", "all")
HEAD_FUSIONS = ("late", "sum", "concat")
CLIP = (0.1, 0.9)  # limit_number, train_test.py l.53-56


@dataclass
class AMSSParams:
    # README CREMA-D command @3161ecc: --sample_mode=Adaptive --isbias=0 --mask_resnet=1 (temperature, gn_mode:
    # argparse defaults l.608-609, not overridden)
    temperature: float = 0.2  # T in (K)
    offset: float = 0.5  # c in (S), l.86/89
    hy: str = "entropy"  # entropy | av_code (deviation 2)
    importance: str = "gn"  # gn | gn_wn | sqrt_gn (I)
    sample: str = "adaptive"  # adaptive | topk | random (M)
    scope: str = "blocks"  # blocks | conv | weights | all
    mask_head: bool = False  # (H): the CREMA-D script's head mask has no effect
    unbiased: bool = False  # (U) AMSS+


@dataclass
class AMSSPlusParams(AMSSParams):
    unbiased: bool = True  # README AMSS+ command: --isbias=1


def label_entropy(y: torch.Tensor, form: str = "entropy") -> torch.Tensor:
    """H(Y) of the batch label frequencies (S); `av_code`: train_test.py l.70's CE(pi, pi)."""
    pi = torch.bincount(y).float() / y.numel()
    if form == "entropy":
        return -(pi * torch.log(pi.clamp_min(1e-30))).sum()
    if form == "av_code":
        return -(pi * F.log_softmax(pi, 0)).sum()
    raise ValueError(f"methods.amss.hy={form!r} not in {HY_FORMS} (params.yaml)")


def feature_entropy(z: torch.Tensor) -> torch.Tensor:
    """H_m = mean_i entropy(softmax(z_i)) over the feature dimension (S), l.77-82."""
    logp = F.log_softmax(z.float().flatten(1), 1)
    return -(logp.exp() * logp).sum(1).mean()


def significance(logits: list[torch.Tensor], feats: list[torch.Tensor], y: torch.Tensor, offset: float = 0.5,
                 hy: str = "entropy") -> tuple[torch.Tensor, bool]:
    """(r (M,), gate open): r_m = (score_m + H(Y) + c) / H_m (S); the gate is closed if any numerator <= 0."""
    h_y = label_entropy(y, hy)
    num = torch.stack([-F.cross_entropy(lg.float(), y) for lg in logits]) + h_y + offset
    den = torch.stack([feature_entropy(z) for z in feats])
    return num / den, bool((num > 0).all())


def keep_ratios(r: torch.Tensor, gate: bool, temperature: float) -> torch.Tensor:
    """rho_m = clip(1 - softmax(r / T)_m, 0.1, 0.9), NaN -> 0.5; closed gate -> 0.5 for all (K)."""
    if not gate:
        return torch.full_like(r, 0.5)
    rho = (1 - F.softmax(r / temperature, 0)).clamp(*CLIP)
    return torch.where(torch.isnan(rho), torch.full_like(rho, 0.5), rho)


def channel_importance(grad: torch.Tensor, weight: torch.Tensor, form: str = "gn") -> torch.Tensor:
    """g_j per slice along dim 0 (I): sum grad^2, / sum W^2 (gn_wn) or its sqrt (sqrt_gn)."""
    g2 = grad.float().pow(2)
    gn = g2.flatten(1).sum(1) if g2.dim() > 1 else g2
    if form == "gn":
        return gn
    if form == "gn_wn":
        w2 = weight.detach().float().pow(2)
        return gn / (w2.flatten(1).sum(1) if w2.dim() > 1 else w2)
    if form == "sqrt_gn":
        return gn.sqrt()
    raise ValueError(f"methods.amss.importance={form!r} not in {IMPORTANCES} (params.yaml)")


def _draw(imp: torch.Tensor, n_keep: int) -> torch.Tensor:
    """n_keep indices without replacement, P ~ imp (torch.multinomial); deviation (3) when too few imp > 0."""
    pos = imp > 0
    n_pos = int(pos.sum())
    if n_pos >= n_keep:
        return torch.multinomial(imp, n_keep, replacement=False)
    idx_pos = pos.nonzero().flatten()
    zeros = (~pos).nonzero().flatten()
    extra = zeros[torch.randperm(zeros.numel(), device=imp.device)[:n_keep - n_pos]]
    return torch.cat([idx_pos, extra])


def sample_mask(imp: torch.Tensor, rho: float, mode: str = "adaptive", unbiased: bool = False) -> torch.Tensor:
    """Mask over the N entries of `imp` (M): ceil(N rho) kept; AMSS+ (U) weights them 1 / (q_j + 1/N)."""
    n = imp.numel()
    n_keep = min(n, math.ceil(n * rho))
    imp = imp.float()
    total = imp.sum()
    q = imp / total if total > 0 else torch.zeros_like(imp)
    if mode == "adaptive":
        idx = _draw(q, n_keep) if total > 0 else torch.randperm(n, device=imp.device)[:n_keep]
    elif mode == "topk":
        idx = torch.argsort(imp, descending=True)[:n_keep]
    elif mode == "random":
        idx = torch.randperm(n, device=imp.device)[:n_keep]
    else:
        raise ValueError(f"methods.amss.sample={mode!r} not in {SAMPLES} (params.yaml)")
    mask = torch.zeros_like(imp)
    if unbiased and mode == "adaptive":  # l.269-270
        mask[idx] = 1 / (q[idx] + 1 / n)
    else:
        mask[idx] = 1.0
    return mask


def masked_params(encoder: torch.nn.Module, scope: str) -> list[torch.nn.Parameter]:
    """The encoder tensors AMSS masks (`scope`, see the module docstring)."""
    if scope == "blocks":
        sel = [p for name, p in encoder.named_parameters()
               if name.startswith("layers.") and (".conv1." in name or ".conv2." in name) and p.dim() >= 3]
        return sel or masked_params(encoder, "conv")
    if scope == "conv":
        return [p for p in encoder.parameters() if p.dim() >= 3]
    if scope == "weights":
        return [p for p in encoder.parameters() if p.dim() >= 2]
    if scope == "all":
        return list(encoder.parameters())
    raise ValueError(f"methods.amss.scope={scope!r} not in {SCOPES} (params.yaml)")


@register_method("amss")
class AMSS(Method):
    """Importance-sampled gradient masks per modality, fewer channels updated for the more significant modality."""

    Params = AMSSParams
    tasks = ("classification",)  # (S) needs class labels

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"{self.name} supports {self.tasks} only; dataset {spec.name} is {spec.task}")
        p = params
        for val, allowed, key in ((p.hy, HY_FORMS, "hy"), (p.importance, IMPORTANCES, "importance"),
                                  (p.sample, SAMPLES, "sample"), (p.scope, SCOPES, "scope")):
            if val not in allowed:
                raise ValueError(f"methods.{self.name}.{key}={val!r} not in {allowed} (params.yaml)")
        if not p.temperature > 0:
            raise ValueError(f"methods.{self.name}.temperature={p.temperature} must be > 0 (params.yaml)")
        self._rho: torch.Tensor | None = None
        self._groups: dict[str, list] = {}
        self._head: dict[str, tuple[torch.nn.Parameter, slice]] = {}

    def setup(self, model, ctx) -> None:
        self._groups = {m: masked_params(model.encoders[m], self.params.scope) for m in self.modalities()}
        empty = [m for m, ps in self._groups.items() if not ps]
        if empty:
            raise ValueError(f"methods.{self.name}.scope={self.params.scope!r} selects no encoder parameters for "
                             f"{empty} (no conv layers); use scope: weights or all in params.yaml")
        self._head = {}
        if self.params.mask_head:
            fusion = model.fusion
            if hasattr(fusion, "fc") and hasattr(fusion, "dims"):  # concat: modality m's columns
                start = 0
                for m, d in fusion.dims.items():
                    self._head[m] = (fusion.fc.weight, slice(start, start + d))
                    start += d
            elif type(fusion).__name__ in ("LateFusion", "SumFusion"):
                self._head = {m: (fusion.heads[m].weight, slice(None)) for m in self.modalities()}
            else:
                raise ValueError(f"methods.{self.name}.mask_head=true supports fusion {HEAD_FUSIONS} only, "
                                 f"not {type(fusion).__name__}; set model.fusion or mask_head: false")

    def loss(self, batch, out, ctx):
        y = batch["label"]
        mods = self.modalities()
        with torch.no_grad():  # (S), (K) from this step's forward, no graph
            r, gate = significance([out.logits[m].detach() for m in mods], [out.features[m].detach() for m in mods],
                                   y, self.params.offset, self.params.hy)
            self._rho = keep_ratios(r, gate, self.params.temperature)
        ctx.record(amss_gate=float(gate), **{f"rho_{m}": self._rho[i] for i, m in enumerate(mods)},
                   **{f"sig_{m}": r[i] for i, m in enumerate(mods)})
        return super().loss(batch, out, ctx)

    def after_backward(self, model, ctx) -> None:
        if self._rho is None:
            raise RuntimeError(f"{self.name}: after_backward called without loss() on this step")
        rho, self._rho = self._rho.tolist(), None
        p = self.params
        for i, m in enumerate(self.modalities()):
            for w in self._groups[m]:  # (I), (M), (U) per tensor, per output channel
                if w.grad is None:
                    continue
                mask = sample_mask(channel_importance(w.grad, w, p.importance), rho[i], p.sample, p.unbiased)
                w.grad.mul_(mask.to(w.grad.dtype).view(-1, *([1] * (w.grad.dim() - 1))))
            if m in self._head:  # (H) per output row over modality m's columns
                w, cols = self._head[m]
                if w.grad is None:
                    continue
                g = w.grad[:, cols]
                imp = g.float().pow(2) if p.importance != "sqrt_gn" else g.float().abs()
                if p.importance == "gn_wn":
                    imp = imp / w.detach()[:, cols].float().pow(2)
                mask = torch.stack([sample_mask(row, rho[i], p.sample, p.unbiased) for row in imp])
                g.mul_(mask.to(g.dtype))


@register_method("amss_plus")
class AMSSPlus(AMSS):
    """AMSS+: the drawn channels' gradients reweighted by 1 / (q + 1/N) (U)."""

    Params = AMSSPlusParams
