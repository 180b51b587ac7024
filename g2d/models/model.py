"""The multimodal model every method trains: encoders + fusion head, one Output contract."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from g2d.data.base import DatasetSpec
from g2d.models.encoders import build_encoder
from g2d.models.fusion import build_fusion


@dataclass
class Output:
    features: dict[str, torch.Tensor]  # encoder features per modality
    logits: dict[str, torch.Tensor]  # per-modality predictions (see fusion.py)
    fused: torch.Tensor  # fusion head prediction


class MultimodalModel(nn.Module):
    def __init__(self, spec: DatasetSpec, mcfg, modalities: tuple[str, ...] | None = None):
        super().__init__()
        self.spec = spec
        self.modalities = tuple(modalities or spec.modality_names)
        self.encoders = nn.ModuleDict(
            {m: build_encoder(spec.modality(m).kind, spec.modality(m).shape, mcfg) for m in self.modalities})
        dims = {m: self.encoders[m].out_dim for m in self.modalities}
        fusion = mcfg.fusion if len(self.modalities) > 1 else "late"
        self.fusion = build_fusion(fusion, dims, spec.num_outputs, mcfg.fusion_dim)
        for mod in self.fusion.modules():
            if isinstance(mod, nn.Linear):  # official weight_init: xavier-normal, zero bias
                nn.init.xavier_normal_(mod.weight)
                nn.init.zeros_(mod.bias)

    def encode(self, batch: dict, drop=()) -> dict[str, torch.Tensor]:
        feats = {}
        for m in self.modalities:
            x = batch[m]
            if m in drop:
                x = torch.zeros_like(x)
            feats[m] = self.encoders[m](x)
        return feats

    def head(self, feats: dict[str, torch.Tensor]) -> Output:
        fused, per = self.fusion(feats)
        return Output(features=feats, logits=per, fused=fused)

    def forward(self, batch: dict, drop=()) -> Output:
        """`drop` zero-fills the named modalities' inputs (AGM scores, probing)."""
        unknown = set(drop) - set(self.modalities)
        if unknown:
            raise KeyError(f"drop names unknown modalities {sorted(unknown)}; model has {self.modalities}")
        return self.head(self.encode(batch, drop))

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Encoder parameters per modality: gradient hooks use this, never name substrings."""
        return {m: list(self.encoders[m].parameters()) for m in self.modalities}

    def head_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Fusion-head parameters that feed each modality's prediction (shared ones repeat)."""
        return self.fusion.head_parameters()
