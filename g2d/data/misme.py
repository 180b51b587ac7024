"""MIS-ME: soil moisture regression from a soil image + 8 meteorological features (Rakib et al., DSAA 2024).

Real data: 2,701 / 900 / 900 train/val/test images (224x224) + station weather; target vwc.
"""
from __future__ import annotations


from g2d.data.base import Dataset, DatasetSpec, ModalitySpec, config_with_standin
from g2d.data.standin import StandinConfig, StandinModality
from g2d.registry import register_dataset

WEATHER = ("air_temperature", "relative_humidity", "precipitation", "solar_flux_density", "wind_speed",
           "barometric_pressure", "tilt_north_south", "tilt_west_east")


def _standin() -> StandinConfig:
    """Regression stand-in (reports/calibration.md): target = standardised sum of 8 latent factors.
    Weather (a fast linear 8-d vector) observes factors 0-3; the image observes 0-5 through a
    slower, noisier rendering, so it is better alone (as in the MIS-ME paper) but learned later."""
    return StandinConfig(n_train=480, n_test=1200, real_n_train=3601, real_n_test=900, modalities={
        "image": StandinModality(shape=[3, 12, 12], code="linear", factors=[0, 1, 2, 3, 4, 5], noise=0.2,
                                 amplitude=2.0, pixel_noise=0.3, density=0.15),
        "weather": StandinModality(shape=[8], code="linear", factors=[0, 1, 2, 3], noise=0.5, pixel_noise=0.2)})


MismeConfig = config_with_standin("MismeConfig", _standin, __name__)


@register_dataset("misme")
class Misme(Dataset):
    Config = MismeConfig
    spec = DatasetSpec("misme", (ModalitySpec("image", "image", (3, 224, 224)),
                                 ModalitySpec("weather", "vector", (len(WEATHER),))),
                       "regression", ())
