"""Unimodal teacher: one encoder + linear head trained on one modality (G2D teachers, UMT)."""
from dataclasses import dataclass

from g2d.methods.base import Method
from g2d.registry import register_method


@dataclass
class UnimodalParams:
    modality: str = ""  # which modality; required


@register_method("unimodal")
class Unimodal(Method):
    Params = UnimodalParams

    def modalities(self):
        m = self.params.modality
        if m not in self.spec.modality_names:
            raise ValueError(f"methods.unimodal.modality={m!r}: {self.spec.name} has {self.spec.modality_names}")
        return (m,)
