"""Shared fixtures: tiny specs, batches and model configs for 2- and 3-modality tests."""
from __future__ import annotations

import pytest
import torch

from g2d.config import ModelConfig, ResNetConfig
from g2d.data.base import DatasetSpec, ModalitySpec


def tiny_spec(n_modalities: int = 2, task: str = "classification", n_classes: int = 4) -> DatasetSpec:
    mods = [ModalitySpec("audio", "spectrogram", (1, 12, 10)),
            ModalitySpec("visual", "frames", (3, 2, 12, 12)),
            ModalitySpec("text", "sequence", (5, 7))][:n_modalities]
    classes = tuple(f"c{i}" for i in range(n_classes)) if task == "classification" else ()
    return DatasetSpec("tiny", tuple(mods), task, classes)


def tiny_model_cfg(fusion: str = "late") -> ModelConfig:
    return ModelConfig(fusion=fusion, resnet=ResNetConfig(width=4, blocks=[1, 1], stem="small"),
                       mlp_hidden=8, mlp_layers=1, seq_hidden=8, fusion_dim=8)


def make_batch(spec: DatasetSpec, batch_size: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {m.name: torch.randn(batch_size, *m.shape, generator=g) for m in spec.modalities}
    if spec.task == "classification":
        batch["label"] = torch.arange(batch_size) % spec.num_outputs
    else:
        batch["label"] = torch.randn(batch_size, generator=g)
    batch["index"] = torch.arange(batch_size)
    return batch


@pytest.fixture
def spec2():
    return tiny_spec(2)


@pytest.fixture
def spec3():
    return tiny_spec(3)


@pytest.fixture(scope="session")
def ci_project(tmp_path_factory):
    """The project's pipeline reproduced once per test session on the CI profile (about a minute)."""
    import sys

    from tests.pipeline_project import make_project, run

    dest = make_project(tmp_path_factory.mktemp("proj"))
    run([sys.executable, "-m", "dvc", "repro", "-q"], dest)
    return dest
