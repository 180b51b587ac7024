"""AV-MNIST: MNIST digit images + spoken-digit spectrograms, 10 classes (Vielzeuf et al. 2018).

Real layout (MultiBench / MFAS): image (1, 28, 28), audio spectrogram (1, 112, 112); 60k train
(55k/5k train/val in MultiBench) and 10k test. Published teachers: audio 42.7%, image 65.6%.
"""
from __future__ import annotations


from g2d.data.base import Dataset, DatasetSpec, ModalitySpec, config_with_standin
from g2d.data.standin import StandinConfig, StandinModality
from g2d.registry import register_dataset


def _standin() -> StandinConfig:
    """Calibrated (reports/calibration.md): the image is fast and sure of 8 class groups but blind inside
    two digit pairs; the audio carries every digit, more noisily and with a weaker (slower) signal."""
    return StandinConfig(n_train=480, n_test=1200, real_n_train=60000, real_n_test=10000, pairs=0.4, modalities={
        "audio": StandinModality(shape=[1, 12, 12], code="linear", pair_signal=0.5, noise=0.4, flip=0.25,
                                 amplitude=1.5),
        "image": StandinModality(shape=[1, 12, 12], code="linear", pair_signal=0.0, noise=0.1, flip=0.17,
                                 amplitude=6.0, density=0.15)})


AvmnistConfig = config_with_standin("AvmnistConfig", _standin, __name__)


@register_dataset("avmnist")
class Avmnist(Dataset):
    Config = AvmnistConfig
    spec = DatasetSpec("avmnist", (ModalitySpec("audio", "spectrogram", (1, 112, 112)),
                                   ModalitySpec("image", "image", (1, 28, 28))),
                       "classification", tuple(str(i) for i in range(10)))
