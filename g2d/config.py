"""Typed schema for params.yaml; loading = Hydra compose + profile overlay + validation.

params.yaml is the one committed source of truth. Command-line overrides use Hydra's grammar
(`trainer.epochs=5`, `method=g2d`) through the compose API, so Hydra never writes output folders.
Every error names the offending key and the file to fix. Before anything runs, `load_config` checks the YAML
itself (syntax, tabs, duplicate keys), every typed field against its rule in `g2d.config_checks.CHECKS` (ranges, enums, non-empty
paths), each dataset's `real:` block against its raw module's Options, and constructs each method that will be
trained (its own `__init__` checks, e.g. g2d's temperature > 0): a bad value is one ConfigError line.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    pass


@dataclass
class GroupConfig:
    methods: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)  # datasets or modality-subset views


@dataclass
class SuiteConfig:
    """What `dvc repro` runs (dvc.yaml reads these lists directly).

    `datasets` are fetched, prepared and get one unimodal teacher per modality. Each group trains
    its methods on its datasets (stage `<group>@<method>`: one process per method, all datasets
    and seeds); a (method, dataset) pair belongs to at most one group.
    """

    datasets: list[str] = field(default_factory=lambda: ["cremad"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # a dataset (or view) that runs other seeds than `seeds`, e.g. an expensive smoke-test stand-in
    dataset_seeds: dict[str, list[int]] = field(default_factory=dict)
    groups: dict[str, GroupConfig] = field(default_factory=dict)


def suite_seeds(cfg, dataset: str) -> list[int]:
    """Seeds `--all-seeds` trains on `dataset`: suite.dataset_seeds[dataset] (a view falls back to its parent's
    entry), else suite.seeds."""
    from g2d import registry

    over = cfg.suite.dataset_seeds
    base = registry.get_dataset(dataset).view_of if dataset not in over else None
    return list(over.get(dataset, over.get(base, cfg.suite.seeds) if base else cfg.suite.seeds))


@dataclass
class PathsConfig:
    raw: str = "data/raw"
    prepared: str = "data/prepared"
    runs: str = "data/runs"
    reports: str = "reports"


@dataclass
class TrainerConfig:
    epochs: int = 30
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step_epochs: int = 0  # StepLR step size in epochs; 0 = constant LR
    lr_gamma: float = 0.1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # bf16 autocast (CUDA only)
    deterministic: bool = True
    grad_clip: float = 0.0
    num_threads: int = 0  # torch CPU threads; 0 = torch default
    progress: str = "auto"  # auto (only on a TTY) | on | off
    checkpoint_every: int = 1  # epochs between resumable checkpoints
    # which epoch's weights a run keeps as `selected.pt` (teachers are distilled from it): best_val (the
    # default protocol) | best_test (the official code's rule, selection on the test set) | last
    select: str = "best_val"
    # ---- the fast single-run GPU path (defaults = the CPU computation, unchanged) ----
    resident_gib: float = 2.0  # a split whose arrays fit is held as tensors on the training device; else memory-mapped
    prefetch: str = "auto"  # auto (CUDA + memory-mapped: pinned host batches, next one gathered in a thread) | on | off
    drop_last: bool = False  # drop the last partial training batch (static shapes; the official loop keeps it)
    check_every: int = 0  # NaN check every N steps (one host sync each); 0 = auto: 1 on CPU, 50 on CUDA
    compile: bool = False  # torch.compile student and teachers (CUDA; falls back to eager with a one-line warning)


@dataclass
class ResNetConfig:
    width: int = 64  # channels of the first stage (ResNet-18: 64 -> 512-d features)
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    stem: str = "imagenet"  # imagenet (7x7/2 + maxpool) | small (3x3/1)


@dataclass
class ModelConfig:
    fusion: str = "late"  # late | concat | sum | film | gated
    resnet: ResNetConfig = field(default_factory=ResNetConfig)
    mlp_hidden: int = 128
    mlp_layers: int = 2
    seq_hidden: int = 128
    fusion_dim: int = 128  # common projection width for film / gated


@dataclass
class SlurmConfig:
    """submitit's AutoExecutor options for `executor.kind: slurm` (one job-array task per run)."""

    partition: str = ""  # empty: the cluster's default partition
    gpus_per_job: int = 1
    cpus_per_job: int = 4
    mem_gb: int = 16
    timeout_min: int = 240
    array_parallelism: int = 64  # concurrently running array tasks
    max_requeue: int = 3  # a preempted or timed-out task is requeued this often and resumes from its checkpoint
    poll_s: float = 10.0  # how often the waiting stage refreshes its queued / running / done / failed counts
    log_dir: str = "data/slurm"  # submitit's per-job stdout/stderr/pickles
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra sbatch flags, e.g. {account: x, qos: y}


@dataclass
class ExecutorConfig:
    """Where training runs execute; results do not depend on it (same seeds, same metrics), so no stage tracks it.
    local: this machine (fork pool on CPU, per-GPU spawn pool on CUDA); slurm: submitit job arrays;
    submitit-local: submitit's LocalExecutor (the slurm code path on this machine, for tests and dry runs)."""

    kind: str = "local"
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class Schema:
    method: str = "joint"
    dataset: str = "cremad"
    seed: int = 0
    profile: str = "embedded"
    data_source: str = "standin"  # standin (embedded suite, offline) | real (fetched + prepared datasets)
    workers: int = 0  # parallel training processes on CPU (0 = one per core); results do not depend on it
    workers_per_gpu: int = 1  # concurrent runs per visible GPU on CUDA (spawn pool); results do not depend on it
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)
    extra_modules: list[str] = field(default_factory=list)
    reports: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # a profile's dotted key -> its source (profiles.paper; reports/recipes.md)


def _compose(params: Path, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    if params.is_dir():
        raise ConfigError(f"{params}: is a folder; pass the params file (--params {params / 'params.yaml'})")
    if not params.is_file():
        raise ConfigError(f"{params}: not found; run from the project root or pass --params PATH")
    from g2d.config_checks import check_yaml

    check_yaml(params)
    try:
        with initialize_config_dir(config_dir=str(params.parent.resolve()), version_base=None):
            cfg = compose(config_name=params.stem, overrides=list(overrides))
    except HydraException as e:
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad override in {overrides}: {msg} (keys must exist in {params})") from None
    return cfg


def _validate(cfg: DictConfig, schema: type, where: str) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        head = str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid key {key!r}: {head}") from None


def load_config(overrides: list[str] | tuple[str, ...] = (), params: str | Path = "params.yaml") -> Schema:
    """Compose params.yaml + overrides, apply the profile overlay, validate every block."""
    from g2d import config_checks as checks

    params = Path(params)
    raw = _compose(params, list(overrides))
    profiles = raw.get("profiles") or {}
    prof = raw.get("profile", "embedded")
    if prof not in profiles:
        raise ConfigError(f"{params}: profile {prof!r} not in profiles ({', '.join(profiles) or 'none'})")
    overlay = profiles[prof] or {}
    OmegaConf.set_struct(raw, False)  # the overlay may add keys (e.g. a dataset's stand-in sizes)
    cfg = OmegaConf.merge(raw, overlay)
    out: Schema = _validate(cfg, Schema, str(params))
    from g2d import registry

    registry.import_extra(out.extra_modules)
    # method / dataset names must resolve; their blocks must match their own schemas
    registry.get_dataset(out.dataset)
    registry.get_method(out.method)
    checks.check_values(out, params, list(overrides), overlay, prof)
    _check_suite(out, params)
    for name, block in out.methods.items():
        try:
            cls = registry.get_method(name)
        except registry.RegistryError as e:
            raise ConfigError(f"{params}: methods.{name}: {e}") from None
        _validate(OmegaConf.create(block or {}), cls.Params, f"{params}: methods.{name}")
    for name, block in out.datasets.items():
        cls = registry.get_dataset(name)
        _validate(OmegaConf.create(block or {}), cls.Config, f"{params}: datasets.{name}")
        for mname in (block or {}).get("methods") or {}:
            if mname not in out.methods:
                raise ConfigError(f"{params}: datasets.{name}.methods.{mname}: no `methods.{mname}` block "
                                  f"(known: {', '.join(out.methods)})")
            method_params(out, mname, name)
        from g2d.data.transforms import check_augment

        try:
            check_augment(cls.spec, (block or {}).get("augment") or {})
        except ValueError as e:
            raise ConfigError(f"{params}: datasets.{name}.augment: {e}") from None
    checks.check_real_blocks(out, params)
    checks.check_methods(out, params)
    return out


def _check_suite(out: Schema, params: Path) -> None:
    """Cross-check the suite so a missing block, an unsupported task or a duplicate fails before training."""
    from g2d import registry

    s = out.suite
    for name in s.datasets:
        if registry.get_dataset(name).view_of:
            raise ConfigError(f"{params}: suite.datasets: {name!r} is a view; list it in a group instead")
        if name not in out.datasets:
            raise ConfigError(f"{params}: dataset {name!r} is in suite.datasets but has no `datasets.{name}` block "
                              f"(add `{name}: {{}}` under datasets:)")
    seen: dict[tuple[str, str], str] = {}
    for g, group in s.groups.items():
        for ds in group.datasets:
            dcls = registry.get_dataset(ds)
            base = dcls.view_of or ds
            if base not in s.datasets:
                raise ConfigError(f"{params}: suite.groups.{g}: dataset {ds!r} needs {base!r} in suite.datasets")
        for name in group.methods:
            cls = registry.get_method(name)
            if name not in out.methods:
                raise ConfigError(f"{params}: method {name!r} (suite.groups.{g}) has no `methods.{name}` block "
                                  f"(add `{name}: {{}}` under methods:)")
            tasks = getattr(cls, "tasks", ("classification", "regression"))
            for ds in group.datasets:
                task = registry.get_dataset(ds).spec.task
                if task not in tasks:
                    raise ConfigError(f"{params}: suite.groups.{g}: {name} supports {list(tasks)}, "
                                      f"but {ds} is {task}")
                if (name, ds) in seen:
                    raise ConfigError(f"{params}: {name} on {ds} is in groups {seen[(name, ds)]!r} and {g!r}; "
                                      "a run belongs to one group")
                seen[(name, ds)] = g


def method_params(cfg: Schema, name: str | None = None, dataset: str | None = None) -> Any:
    """`methods.<name>` with the dataset's `datasets.<dataset>.methods.<name>` overrides merged in
    (a view without its own block uses its parent's)."""
    from g2d import registry

    name = name or cfg.method
    cls = registry.get_method(name)
    block = OmegaConf.create(cfg.methods.get(name) or {})
    where = f"methods.{name}"
    if dataset is not None:
        over = (_dataset_block(cfg, dataset).get("methods") or {}).get(name)
        if over:
            block = OmegaConf.merge(block, over)
            where = f"methods.{name} + datasets.{dataset}.methods.{name}"
    return _validate(block, cls.Params, where)


def _dataset_block(cfg: Schema, dataset: str) -> dict:
    from g2d import registry

    block = cfg.datasets.get(dataset)
    if block is None:
        parent = registry.get_dataset(dataset).view_of
        block = cfg.datasets.get(parent) if parent else None
    return block or {}


def dataset_config(cfg: Schema, name: str | None = None) -> Any:
    from g2d import registry

    name = name or cfg.dataset
    cls = registry.get_dataset(name)
    return _validate(OmegaConf.create(cfg.datasets.get(name) or {}), cls.Config, f"datasets.{name}")


def trainer_config(cfg: Schema, dataset: str | None = None) -> TrainerConfig:
    """Global trainer block with the dataset's `trainer:` overrides merged in."""
    dcfg = dataset_config(cfg, dataset)
    over = getattr(dcfg, "trainer", None) or {}
    where = f"datasets.{dataset or cfg.dataset}.trainer" if over else "trainer"
    # merge as plain dicts: an unknown key is then reported by _validate, naming the block
    return _validate(OmegaConf.merge(OmegaConf.create(to_dict(cfg.trainer)), over), TrainerConfig, where)


def to_dict(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# TrainerConfig fields left out of a run's fingerprint: they cannot change what a run computes (the progress
# display; how often a resumable checkpoint is written, resume being exact: tests/unit/test_methods_smoke.py::test_resume_matches_uninterrupted)
RESULT_NEUTRAL_TRAINER = ("progress", "checkpoint_every")


def fingerprint(obj: Any) -> str:
    """Stable short hash of a config object (dataclass / dict)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def optional(x: Any | None, default: Any) -> Any:
    return default if x is None else x
