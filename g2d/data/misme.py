"""MIS-ME: soil moisture regression from a soil image + 8 meteorological features (Rakib et al., DSAA 2024).

Real data: 2,701 / 900 / 900 train/val/test images (224x224) + station weather; target vwc.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from g2d.data.base import Dataset, DatasetConfig, DatasetSpec, ModalitySpec
from g2d.data.standin import StandinConfig, StandinModality
from g2d.registry import register_dataset

WEATHER = ("air_temperature", "relative_humidity", "precipitation", "solar_flux_density", "wind_speed",
           "barometric_pressure", "tilt_north_south", "tilt_west_east")


def _standin() -> StandinConfig:  # placeholder until calibrated
    return StandinConfig(n_train=540, n_test=180, modalities={
        "image": StandinModality(shape=[3, 16, 16], code="linear", noise=1.0),
        "weather": StandinModality(shape=[8], code="linear", noise=0.5)})


@dataclass
class MismeConfig(DatasetConfig):
    standin: StandinConfig = field(default_factory=_standin)


@register_dataset("misme")
class Misme(Dataset):
    Config = MismeConfig
    spec = DatasetSpec("misme", (ModalitySpec("image", "image", (3, 224, 224)),
                                 ModalitySpec("weather", "vector", (len(WEATHER),))),
                       "regression", ())

    def standin(self, out_dir: Path, seed: int = 0) -> Path:
        raise NotImplementedError("misme: regression stand-in not implemented yet")
