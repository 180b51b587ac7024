"""Fusion plug-ins: `g2d+concat`, `joint+film`, ... train any method with another fusion head.

The fusion ablation (late / concat / sum / film / gated) then needs no per-run model config: the
plug-in sets the method's `fusion`, which the trainer uses instead of `model.fusion`.
"""
from g2d.models.fusion import FUSIONS
from g2d.registry import register_plugin


def _fusion_plugin(fusion: str):
    def wrap(cls):
        return type(f"{cls.__name__}_{fusion}", (cls,), {"fusion": fusion, "__doc__": cls.__doc__})

    return wrap


for _f in FUSIONS:
    register_plugin(_f)(_fusion_plugin(_f))
