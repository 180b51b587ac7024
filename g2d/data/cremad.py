"""CREMA-D: audio-visual emotion recognition, 6 classes (Cao et al., IEEE TAC 2014).

Real data: 7,442 clips (OGM-GE split 6,698 train / 744 test). Audio: log-STFT (1, 257, 188);
visual: one frame (3, 1, 224, 224). The stand-in keeps the modalities, classes and task and is
calibrated (method-agnostically) to the paper's Figure-1 imbalance: audio teacher 61.7%, visual
teacher 76.5%, joint training collapses the visual head.
"""
from __future__ import annotations


from g2d.data.base import Dataset, DatasetSpec, ModalitySpec, config_with_standin
from g2d.data.standin import StandinConfig, StandinModality
from g2d.registry import register_dataset

CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")  # OGM-GE / G2D class order


def _standin() -> StandinConfig:
    """Calibrated (reports/calibration.md). Class groups NEU | HAP | SAD+FEA | DIS+ANG: audio is fast and
    sure of the groups but blind inside the two pairs; visual carries every class, but its group code
    is an interaction (slow to learn) and its within-pair bits are weak."""
    return StandinConfig(
        n_train=480, n_test=240, real_n_train=6698, real_n_test=744, pairs=0.67,
        modalities={
            "audio": StandinModality(shape=[1, 12, 12], code="linear", pair_signal=0.0, noise=0.1, flip=0.1,
                                     amplitude=6.0, density=0.15),
            "visual": StandinModality(shape=[3, 1, 12, 12], code="xor", pair_code="linear", bits=3,
                                      pair_signal=0.2, noise=0.15, amplitude=2.15, pixel_noise=0.3),
        })


CremadConfig = config_with_standin("CremadConfig", _standin, __name__)


@register_dataset("cremad")
class Cremad(Dataset):
    Config = CremadConfig
    spec = DatasetSpec(
        name="cremad",
        modalities=(ModalitySpec("audio", "spectrogram", (1, 257, 188)),
                    ModalitySpec("visual", "frames", (3, 1, 224, 224))),
        task="classification",
        classes=CLASSES,
    )
