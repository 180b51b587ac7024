"""CREMA-D: audio-visual emotion recognition, 6 classes (Cao et al., IEEE TAC 2014).

Real data: 7,442 clips (OGM-GE split 6,698 train / 744 test). Audio: log-STFT (1, 257, 188);
visual: one frame (3, 1, 224, 224) as the model sees it, made on the fly (g2d.data.transforms) from the
frame stored at its native 360x480 (g2d.data.raw.cremad). Split variants (`datasets.cremad.real.split`):
ogm_ge (default), ogm_ge_704 (BalanceBenchmark/ReconBoost's 704 evaluated test clips), speaker_folds
(SynIB's 5 speaker-independent folds, `fold: 1..5`), mla (MLA's own split); results of different variants
are not comparable. The stand-in keeps the modalities, classes and task and is
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
        n_train=480, n_test=1200, real_n_train=6698, real_n_test=744, pairs=0.67,
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
    # official train transform: RandomResizedCrop(224) + RandomHorizontalFlip() (OGM-GE dataset/CramedDataset.py
    # @343dc1d, G2D dataset/CremadDataset.py @95969d8; torchvision defaults scale (0.08, 1), ratio (3/4, 4/3), p 0.5)
    augment = {"visual": {"recipe": "rrc_flip", "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "flip_p": 0.5}}
    spec = DatasetSpec(
        name="cremad",
        modalities=(ModalitySpec("audio", "spectrogram", (1, 257, 188)),
                    ModalitySpec("visual", "frames", (3, 1, 224, 224))),
        task="classification",
        classes=CLASSES,
    )
