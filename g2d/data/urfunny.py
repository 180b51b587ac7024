"""UR-Funny: TED humour detection, binary, text + audio + visual feature sequences (Hasan et al. 2019).

Real features (MultiBench-style pickle): text GloVe 300-d, audio COVAREP 81-d, visual OpenFace 371-d,
word-aligned sequences. The paper also reports modality subsets: registered as views
`urfunny-av`, `urfunny-at`, `urfunny-vt` over the same prepared data (`urfunny` = A+V+T).
"""
from __future__ import annotations


from g2d.data.base import Dataset, DatasetSpec, ModalitySpec, config_with_standin
from g2d.data.standin import StandinConfig, StandinModality
from g2d.registry import register_dataset

SEQ_LEN = 50
MODS = (ModalitySpec("text", "sequence", (SEQ_LEN, 300)),
        ModalitySpec("audio", "sequence", (SEQ_LEN, 81)),
        ModalitySpec("visual", "sequence", (SEQ_LEN, 371)))


def _standin() -> StandinConfig:
    """Calibrated (reports/calibration.md): text is a noisy linear code (fast, the strongest);
    audio and visual are noisier interaction codes (slow), close to chance alone."""
    return StandinConfig(n_train=480, n_test=1200, real_n_train=13224, real_n_test=3290, modalities={
        "text": StandinModality(shape=[10, 24], code="linear", noise=3.5),
        "audio": StandinModality(shape=[10, 16], code="xor", noise=3.5),
        "visual": StandinModality(shape=[10, 16], code="xor", noise=3.5)})


UrfunnyConfig = config_with_standin("UrfunnyConfig", _standin, __name__)


@register_dataset("urfunny")
class Urfunny(Dataset):
    Config = UrfunnyConfig
    spec = DatasetSpec("urfunny", MODS, "classification", ("not_humor", "humor"))


def _view(name: str, mods: tuple[str, ...]):
    spec = DatasetSpec(name, tuple(m for m in MODS if m.name in mods), "classification", ("not_humor", "humor"))
    cls = type(name.replace("-", "_"), (Urfunny,), {"spec": spec, "view_of": "urfunny"})
    return register_dataset(name)(cls)


for _n, _m in (("urfunny-av", ("audio", "visual")), ("urfunny-at", ("audio", "text")),
               ("urfunny-vt", ("visual", "text"))):
    _view(_n, _m)
