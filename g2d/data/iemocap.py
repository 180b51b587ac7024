"""IEMOCAP: dyadic emotion recognition, 4 classes (neutral, happy+excited, sad, angry) (Busso et al. 2008).

Licence-gated (USC SAIL release form). Features per utterance as in the CMU-MultimodalSDK
convention: audio COVAREP 74-d, visual FACET 35-d, text GloVe 300-d sequences.
"""
from __future__ import annotations


from g2d.data.base import Dataset, DatasetSpec, ModalitySpec, config_with_standin
from g2d.data.standin import StandinConfig, StandinModality
from g2d.registry import register_dataset

SEQ_LEN = 20
CLASSES = ("neutral", "happy", "sad", "angry")


def _standin() -> StandinConfig:
    """Calibrated (reports/calibration.md), qualitative target text > audio > visual: text is fast and
    sure of 3 class groups (blind inside one pair); audio and visual carry all four classes through
    slower interaction codes, visual the noisiest."""
    return StandinConfig(n_train=480, n_test=1200, real_n_train=3515, real_n_test=938, pairs=0.5, modalities={
        "audio": StandinModality(shape=[10, 16], code="xor", pair_code="linear", pair_signal=0.5, noise=1.0),
        "visual": StandinModality(shape=[10, 12], code="xor", pair_code="linear", pair_signal=0.3, noise=1.5),
        "text": StandinModality(shape=[10, 24], code="linear", pair_signal=0.0, noise=0.5, flip=0.1)})


IemocapConfig = config_with_standin("IemocapConfig", _standin, __name__)


@register_dataset("iemocap")
class Iemocap(Dataset):
    Config = IemocapConfig
    spec = DatasetSpec("iemocap", (ModalitySpec("audio", "sequence", (SEQ_LEN, 74)),
                                   ModalitySpec("visual", "sequence", (SEQ_LEN, 35)),
                                   ModalitySpec("text", "sequence", (SEQ_LEN, 300))),
                       "classification", CLASSES)
