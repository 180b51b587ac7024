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

    def __init__(self, params, spec):
        super().__init__(params, spec)
        self.modalities()  # fail at construction (before a run folder exists) on an unknown modality

    def modalities(self):
        m = self.params.modality
        if m not in self.spec.modality_names:
            raise ValueError(f"methods.unimodal.modality={m!r}: {self.spec.name} has {self.spec.modality_names}")
        return (m,)
