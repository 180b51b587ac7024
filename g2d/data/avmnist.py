"""AV-MNIST: MNIST digit images + spoken-digit spectrograms, 10 classes (Vielzeuf et al. 2018).

Real layout (MultiBench / MFAS): image (1, 28, 28), audio spectrogram (1, 112, 112); 60k train
(55k/5k train/val in MultiBench) and 10k test. Published teachers: audio 42.7%, image 65.6%.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from g2d.data.base import Dataset, DatasetConfig, DatasetSpec, ModalitySpec
from g2d.data.standin import StandinConfig, StandinModality
from g2d.data.standin_dataset import write_standin
from g2d.registry import register_dataset


def _standin() -> StandinConfig:  # placeholder until calibrated
    return StandinConfig(n_train=600, n_test=200, modalities={
        "audio": StandinModality(shape=[1, 16, 16], code="linear", noise=1.0),
        "image": StandinModality(shape=[1, 14, 14], code="linear", noise=0.6)})


@dataclass
class AvmnistConfig(DatasetConfig):
    standin: StandinConfig = field(default_factory=_standin)


@register_dataset("avmnist")
class Avmnist(Dataset):
    Config = AvmnistConfig
    spec = DatasetSpec("avmnist", (ModalitySpec("audio", "spectrogram", (1, 112, 112)),
                                   ModalitySpec("image", "image", (1, 28, 28))),
                       "classification", tuple(str(i) for i in range(10)))

    def standin(self, out_dir: Path, seed: int = 0) -> Path:
        return write_standin(self, out_dir, seed)
