"""Dataset contract: a spec, real fetch/prepare, and a stand-in generator, all writing one format."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, ClassVar

TASKS = ("classification", "regression")
KINDS = ("spectrogram", "frames", "image", "sequence", "vector")


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    kind: str  # spectrogram (C,F,T) | frames (C,T,H,W) | image (C,H,W) | sequence (T,D) | vector (D,)
    shape: tuple[int, ...]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"modality {self.name}: kind {self.kind!r} not in {KINDS}")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    modalities: tuple[ModalitySpec, ...]
    task: str
    classes: tuple[str, ...] = ()

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"dataset {self.name}: task {self.task!r} not in {TASKS}")

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else 1

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    def modality(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"{self.name} has no modality {name!r}; it has {self.modality_names}")


@dataclass
class DatasetConfig:
    """Common per-dataset knobs; datasets extend it with their own fields."""

    val_fraction: float = 0.1  # stratified validation split carved from train (fixed seed)
    split_seed: int = 0
    trainer: dict[str, Any] = field(default_factory=dict)  # per-dataset trainer overrides
    real: dict[str, Any] = field(default_factory=dict)  # options for g2d.data.raw.<name> (fetch/prepare)
    # train-time augmentation per modality, over the dataset's declared recipe (`Dataset.augment`), e.g.
    # {visual: none} or {visual: {recipe: rrc_flip, scale: [0.08, 1.0]}}; see g2d/data/transforms.py
    augment: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, Any] = field(default_factory=dict)  # per-dataset method overrides: {g2d: {smp_phase_epochs: [150]}}


def config_with_standin(name: str, defaults: Callable[[], Any], module: str) -> type:
    """A dataset's Config: the common knobs plus its calibrated stand-in defaults (`standin:` block)."""
    from g2d.data.standin import StandinConfig

    cls = make_dataclass(name, [("standin", StandinConfig, field(default_factory=defaults))],
                         bases=(DatasetConfig,))
    cls.__module__ = module
    return cls


class Dataset:
    """Base class: subclasses set `spec` and `Config` (a `config_with_standin` class).

    Real-data code lives in `g2d.data.raw.<name>` (functions `fetch` and `prepare`). A *view*
    (`view_of = "urfunny"`) is a modality subset of another dataset's prepared data, e.g. UR-Funny A+V.
    """

    name: ClassVar[str]
    spec: ClassVar[DatasetSpec]
    Config: ClassVar[type] = DatasetConfig
    view_of: ClassVar[str | None] = None
    # the official train-time augmentation per modality (g2d.data.transforms.Augment fields); params.yaml
    # `datasets.<name>.augment` overrides it per profile; modalities not named have none
    augment: ClassVar[dict[str, dict]] = {}

    def __init__(self, config: Any | None = None):
        self.config = config if config is not None else self.Config()

    def standin(self, out_dir: Path, seed: int = 0) -> Path:
        """Generate the embedded stand-in from `config.standin` (see g2d/data/standin.py)."""
        from g2d.data.standin_dataset import write_standin  # it imports prepared, which imports this module

        return write_standin(self, out_dir, seed)

    def _raw(self):
        import importlib

        name = self.view_of or self.name
        try:
            return importlib.import_module(f"g2d.data.raw.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"g2d.data.raw.{name}":
                raise
            raise NotImplementedError(f"{name}: real-data fetch/prepare is not implemented (g2d/data/raw/{name}.py)")

    def fetch(self, raw_dir: Path) -> Path:
        return self._raw().fetch(Path(raw_dir), self.config.real)

    def prepare(self, raw_dir: Path, out_dir: Path) -> Path:
        return self._raw().prepare(Path(raw_dir), Path(out_dir), self.config.real)
