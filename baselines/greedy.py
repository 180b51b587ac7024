"""Greedy: balanced multi-modal learning against the greedy nature of multi-modal DNNs (N. Wu, S. Jastrzebski,
K. Cho, K. J. Geras, "Characterizing and Overcoming the Greedy Nature of Learning in Multi-modal Deep Neural
Networks", ICML 2022, PMLR 162, arXiv 2202.05306).

Sources read. The official code only; the paper's method section could not be retrieved in this session, so no
equation numbers are given and every formula is labelled and pinned to nyukat/greedy_multimodal_learning
@a190e03: `src/model.py` (MMTM_MVCNN), `src/balanced_mmtm.py` (MMTM_mitigate), `src/callbacks.py`
(Bias_Mitigation_Strong, l.174-267), `train.py` (blend_loss, l.22-28), `configs/training_guided.gin`,
`src/framework.py` (1-based epochs, l.293). BalanceBenchmark's Greedy trainer was not read.

(G1) Model: each modality's encoder runs stage by stage; after every stage but the first (the code: ResNet-18
     layer2, layer3, layer4; model.py l.57-59, l.83-99) an MMTM (Joze et al., CVPR 2020) couples the modalities:
     s_m = mean of modality m's features over every non-channel position, z = ReLU(W_sq [s_1; ...; s_k] + b_sq),
     e_m = sigmoid(W_m z + b_m), x_m <- x_m * e_m channel-wise (balanced_mmtm.py l.93-112, l.115-117, l.140-145),
     squeeze width int(2 * sum_m C_m / ratio), ratio 4 (l.27, model.py l.57). Each modality's own head reads its
     pooled features; the prediction is the mean of the heads (model.py l.101-108), i.e. the late fusion head.
(G2) Loss: sum over modalities of the task loss of modality m's head (train.py blend_loss: CE per branch).
(G3) Conditional learning speeds (callbacks.py compute_BDR l.199-233), after each backward outside re-balancing:
     M^main_m += sum_{theta in branch m} ||g||^2 / sum_{theta in branch m} ||theta||^2 (encoder and own head),
     M^byp_m += the same ratio over m's MMTM parameters (W_m, b_m) plus the shared squeeze (W_sq, b_sq), both
     cumulative over the whole run; BDR_m = log10(M^byp_m / M^main_m); d = BDR_0 - BDR_1.
(G4) From epoch `start_epoch` on (the code: 1-based epoch 2 = 0-based 1), while not re-balancing: |d| > epsilon
     (0.01) starts re-balancing for the next `window` (5) steps, caring for c = 0 if d > 0 else 1 (l.240-263).
(G5) Re-balancing step (balanced_mmtm.py l.147-162): the caring modality's excitation e_c is replaced by the
     running average of its excitation over the training steps, so its features get nothing from the other
     modalities; the others' excitations are computed as usual. Evaluation never re-balances.

Deviations, numbered:
  (1) Encoders are g2d's (g2d/models/encoders.py): the stages are a ResNet2d's stages (its stem with the first),
      an MLP's layers, a SequenceEncoder's projection and temporal convolution. An MMTM follows each of the last
      S - 1 stages of every modality, S the smallest stage count (the code: 4 stages, MMTMs after 2-4). With no
      MMTM (an all-ones excitation) the staged forward is exactly the encoder's (tests/unit/test_greedy.py).
  (2) k > 2 modalities: one MMTM over all of them (as MMTM allows); c = argmax_m BDR_m when
      max_m BDR_m - min_m BDR_m > epsilon, which for k = 2 is exactly the code's sign rule.
  (3) The code's running average for the second modality averages the FIRST modality's excitation (l.121-122,
      `vis_out` in both lines) and is updated by evaluation forwards too; here each modality's own excitation,
      from training forwards only. As in the code, a forward adds its own batch to the mean (weight 1/(n+1))
      before a re-balancing step reads it.
  (4) The linear probes (metrics.json `diagnostics`) read each encoder alone, without the MMTMs.
  (5) Regression: (G2) uses the task loss (MSE) per head; the code is classification only.
  (6) The code's recipe (SGD lr 0.1 without momentum or weight decay, ReduceLROnPlateau, early stopping on
      train accuracy, best-validation checkpoint) is not adopted: the trainer's recipe and selection rule apply,
      as for every method. A parameter without a gradient counts 0 in (G3) (the code would fail on it).
  (7) Model fusion must be `late` (the mean of the heads, (G1)); refused otherwise at config time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from baselines.mslr import modality_groups
from g2d.methods.base import Method, task_loss
from g2d.models.encoders import MLP, ResNet2d, SequenceEncoder
from g2d.registry import register_method


@dataclass
class GreedyParams:
    epsilon: float = 0.01  # (G4) training_guided.gin Bias_Mitigation_Strong.epsilon
    window: int = 5  # (G4) Bias_Mitigation_Strong.curation_windowsize
    start_epoch: int = 1  # (G4) Bias_Mitigation_Strong.starting_epoch = 2 over 1-based epochs
    ratio: int = 4  # (G1) MMTM(128, 128, 4) in model.py l.57-59
    balance: bool = True  # false: the MMTM model trained without re-balancing (the paper's "greedy" baseline)


# ---- (G1), deviation (1): an encoder as stages over channel-first features --------------------------------------
class _ResNetStages:
    def __init__(self, enc: ResNet2d):
        self.enc, groups = enc, []
        for block in enc.layers:
            if not groups or block.conv1.out_channels != groups[-1][-1].conv1.out_channels:
                groups.append([])
            groups[-1].append(block)
        self.groups = groups
        self.channels = [g[-1].conv2.out_channels for g in groups]

    def begin(self, x):
        if self.enc.frames:
            b, c, t, h, w = x.shape
            self.bt = (b, t)
            return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        self.bt = None
        return x

    def stage(self, i, x):
        if i == 0:
            x = self.enc.stem(x)
        for block in self.groups[i]:
            x = block(x)
        return x

    def squeeze(self, x):  # = the encoder's pooling: mean over time and space
        if self.bt is not None:
            b, t = self.bt
            return x.reshape(b, t, x.shape[1], -1).mean(dim=(1, 3))
        return x.mean(dim=(2, 3))

    def scale(self, x, e):
        if self.bt is not None:
            e = e.repeat_interleave(self.bt[1], dim=0)
        return x * e[:, :, None, None]


class _MLPStages:
    def __init__(self, enc: MLP):
        mods = list(enc.net)
        self.layers = [nn.Sequential(*mods[i:i + 2]) for i in range(0, len(mods), 2)]
        self.channels = [layer[0].out_features for layer in self.layers]

    def begin(self, x):
        return x.flatten(1)

    def stage(self, i, x):
        return self.layers[i](x)

    def squeeze(self, x):
        return x

    def scale(self, x, e):
        return x * e


class _SequenceStages:
    def __init__(self, enc: SequenceEncoder):
        self.enc = enc
        self.channels = [enc.out_dim, enc.out_dim]

    def begin(self, x):
        return x

    def stage(self, i, x):
        return self.enc.proj(x).transpose(1, 2) if i == 0 else torch.relu(self.enc.conv(x))  # (B, H, T)

    def squeeze(self, x):
        return x.mean(dim=2)

    def scale(self, x, e):
        return x * e[:, :, None]


def staged(enc: nn.Module):
    for kind, cls in ((ResNet2d, _ResNetStages), (MLP, _MLPStages), (SequenceEncoder, _SequenceStages)):
        if isinstance(enc, kind):
            return cls(enc)
    raise ValueError(f"greedy: no staged forward for encoder {type(enc).__name__}")


class MMTM(nn.Module):
    """(G1): excitations e_m = sigmoid(W_m ReLU(W_sq [s_1; ...; s_k] + b_sq) + b_m)."""

    def __init__(self, dims: list[int], ratio: int):
        super().__init__()
        width = int(2 * sum(dims) / ratio)
        self.squeeze = nn.Linear(sum(dims), width)
        self.excite = nn.ModuleList(nn.Linear(width, d) for d in dims)

    def forward(self, squeezed: list[torch.Tensor]) -> list[torch.Tensor]:
        z = torch.relu(self.squeeze(torch.cat(squeezed, dim=1)))
        return [torch.sigmoid(fc(z)) for fc in self.excite]


def speed_ratio(params) -> float:
    """(G3): sum ||g||^2 / sum ||theta||^2 over `params` (a missing gradient counts 0)."""
    g = sum(float((p.grad.detach().float() ** 2).sum()) for p in params if p.grad is not None)
    w = sum(float((p.detach().float() ** 2).sum()) for p in params)
    return g / w if w > 0 else 0.0


@register_method("greedy")
class Greedy(Method):
    """MMTM-coupled encoders, unimodal-head losses, re-balancing steps that cut the caring modality's MMTM input."""

    Params = GreedyParams
    fusions = ("late",)
    fusion_need = "predicts with the mean of the modalities' own heads (deviation 7)"

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if not params.epsilon >= 0:
            raise ValueError(f"methods.greedy.epsilon={params.epsilon} must be >= 0 (params.yaml)")
        if params.window < 1 or params.ratio < 1:
            raise ValueError(f"methods.greedy.window={params.window} and ratio={params.ratio} must be >= 1 "
                             "(params.yaml)")
        mods = self.modalities()
        self.m_main = [0.0] * len(mods)
        self.m_byp = [0.0] * len(mods)
        self.curating = False
        self.caring = -1
        self.curation_step = 0
        self.avg: list[list[torch.Tensor] | None] | None = None  # (G5) mean excitation per MMTM and modality
        self.avg_steps = 0
        self.d = 0.0
        self._mmtm: nn.ModuleList | None = None

    # -- (G1) ---------------------------------------------------------------------------------------------------
    def aux_module(self, model):
        stages = {m: staged(model.encoders[m]) for m in self.modalities()}
        s_min = min(len(st.channels) for st in stages.values())
        if s_min < 2:
            raise ValueError("greedy: every encoder needs >= 2 stages for an MMTM between them "
                             "(model.resnet.blocks, model.mlp_layers)")
        self._mmtm = nn.ModuleList(
            MMTM([st.channels[len(st.channels) - s_min + p] for st in stages.values()], self.params.ratio)
            for p in range(1, s_min))
        return self._mmtm

    def setup(self, model, ctx) -> None:
        self._mmtm = model.aux
        self.groups = modality_groups(model)

    def forward(self, model, batch):
        mods = self.modalities()
        st = [staged(model.encoders[m]) for m in mods]
        x = [s.begin(batch[m]) for s, m in zip(st, mods)]
        n_mmtm = len(model.aux)
        offset = [len(s.channels) - n_mmtm - 1 for s in st]
        for i, s in enumerate(st):
            for j in range(offset[i] + 1):
                x[i] = s.stage(j, x[i])
        train = model.training
        for p, mmtm in enumerate(model.aux):
            for i, s in enumerate(st):
                x[i] = s.stage(offset[i] + 1 + p, x[i])
            e = mmtm([s.squeeze(xi) for s, xi in zip(st, x)])
            if train:
                self._track(p, e)
                if self.curating and self.caring >= 0:  # (G5)
                    e[self.caring] = self.avg[p][self.caring].expand_as(e[self.caring])
            x = [s.scale(xi, ei) for s, xi, ei in zip(st, x, e)]
        return model.head({m: s.squeeze(xi) for m, s, xi in zip(mods, st, x)})

    def _track(self, p: int, e: list[torch.Tensor]) -> None:
        """(G5), deviation (3): cumulative mean over training forwards of each modality's mean excitation."""
        if self.avg is None:
            self.avg = [None] * len(self._mmtm)
        n = self.avg_steps
        old = self.avg[p] or [torch.zeros_like(t[0]).detach() for t in e]
        self.avg[p] = [(a * n + t.detach().mean(0)) / (n + 1) for a, t in zip(old, e)]
        if p == len(self._mmtm) - 1:
            self.avg_steps += 1

    # -- (G2) ---------------------------------------------------------------------------------------------------
    def loss(self, batch, out, ctx):
        y = batch["label"]
        return {f"uni_{m}": task_loss(self.spec, out.logits[m], y) for m in self.modalities()}

    # -- (G3), (G4) ---------------------------------------------------------------------------------------------
    def bdr(self, model) -> list[float]:
        """Accumulate (G3) for this step; BDR_m = log10(M^byp_m / M^main_m)."""
        shared = [p for mm in self._mmtm for p in mm.squeeze.parameters()]
        for i, m in enumerate(self.modalities()):
            own = [p for mm in self._mmtm for p in mm.excite[i].parameters()]
            self.m_main[i] += speed_ratio(self.groups[m])
            self.m_byp[i] += speed_ratio(own + shared)
        return [math.log10(b / a) if a > 0 and b > 0 else 0.0 for a, b in zip(self.m_main, self.m_byp)]

    def after_backward(self, model, ctx) -> None:
        if not self.params.balance:
            return
        if self.curating:
            self.curation_step += 1
            if self.curation_step == self.params.window:
                self.curating = False
        else:
            b = self.bdr(model)
            if len(b) == 2:
                self.d = b[0] - b[1]
                gap, c = abs(self.d), (0 if self.d > 0 else 1)
            else:  # deviation (2)
                gap, c = max(b) - min(b), max(range(len(b)), key=b.__getitem__)
                self.d = gap
            if ctx.epoch >= self.params.start_epoch and gap > self.params.epsilon:
                self.curating, self.caring, self.curation_step = True, c, 0
        ctx.record(greedy_d=self.d, greedy_curating=float(self.curating), greedy_caring=float(self.caring))

    # -- checkpoint --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"m_main": list(self.m_main), "m_byp": list(self.m_byp), "curating": self.curating,
                "caring": self.caring, "curation_step": self.curation_step, "d": self.d,
                "avg": None if self.avg is None else [None if r is None else [t.clone() for t in r] for r in self.avg],
                "avg_steps": self.avg_steps}

    def load_state_dict(self, state: dict) -> None:
        self.m_main = [float(v) for v in state["m_main"]]
        self.m_byp = [float(v) for v in state["m_byp"]]
        self.curating, self.caring = bool(state["curating"]), int(state["caring"])
        self.curation_step, self.d = int(state["curation_step"]), float(state["d"])
        self.avg = None if state["avg"] is None else [None if r is None else [t.clone() for t in r]
                                                       for r in state["avg"]]
        self.avg_steps = int(state["avg_steps"])
