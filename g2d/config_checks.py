"""Allowed values of every params.yaml field and the checks `load_config` runs before anything starts.

`CHECKS` maps each typed field with a range or a set of values to its `Rule`; `CHECKED_ELSEWHERE` names what
checks the others (a test keeps the two covering the whole schema). Also: strict YAML (syntax, tabs, duplicate
keys), each dataset's `real:` block against its raw module's Options, and each trained method's constructor.
Every failure is one ConfigError naming the file, the key and what is allowed.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from g2d.config import ConfigError, Schema, _dataset_block, method_params, trainer_config

# ---- allowed values of every typed field ----------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """What a field may hold: `ok(value)`, and `says` completes "<key>=<value> ..." when it does not."""

    ok: Callable[[Any], bool]
    says: Callable[[], str]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def at_least(lo: int) -> Rule:
    """An integer >= lo (OmegaConf already rejects non-integers for int fields)."""
    return Rule(lambda v: _number(v) and v >= lo, lambda: f"must be an integer >= {lo}")


def real_in(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A finite number in the interval (NaN and inf never pass)."""
    def ok(v: Any) -> bool:
        return (_number(v) and math.isfinite(v) and (v > lo if lo_open else v >= lo)
                and (hi is None or (v < hi if hi_open else v <= hi)))

    def says() -> str:
        if hi is None:
            return f"must be a finite number {'>' if lo_open else '>='} {lo:g}"
        return f"must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    return Rule(ok, says)


def one_of(choices: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> Rule:
    """One of fixed names (a callable is read lazily, e.g. to avoid importing torch here)."""
    get = choices if callable(choices) else (lambda: choices)
    return Rule(lambda v: v in get(), lambda: f"not in ({', '.join(get())})")


def matching(pattern: str, text: str) -> Rule:
    return Rule(lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None, lambda: f"must be {text}")


NON_EMPTY = Rule(lambda v: isinstance(v, str) and v.strip() != "", lambda: "must be a non-empty path")


def list_of(item: Rule, distinct: bool = False) -> Rule:
    """A non-empty list whose items all pass `item` (optionally without repeats)."""
    def ok(v: Any) -> bool:
        return (isinstance(v, (list, tuple)) and len(v) > 0 and all(item.ok(x) for x in v)
                and (not distinct or len(set(v)) == len(v)))

    return Rule(ok, lambda: f"must be a non-empty list{' of distinct values' if distinct else ''}, each item: "
                            + item.says().removeprefix("must be "))


def _fusions() -> tuple[str, ...]:
    from g2d.models.fusion import FUSIONS

    return tuple(FUSIONS)


# The largest learning rate accepted: a typo guard (the recipes use 1e-3 .. 0.03; far above 1 every optimizer
# here diverges at once, and the NaN guard would stop the run only after its folder was written).
LR_MAX = 10.0

# dotted key -> rule, for every field of the typed schema that has a range or a set of values. load_config
# applies it to the composed config (after the profile overlay); per-dataset `datasets.<d>.trainer` overrides
# are checked with the same `trainer.*` rules.
CHECKS: dict[str, Rule] = {
    "seed": at_least(0),
    "data_source": one_of(("standin", "real")),
    "workers": at_least(0),
    "workers_per_gpu": at_least(1),
    "executor.kind": one_of(("local", "slurm", "submitit-local")),
    "executor.slurm.gpus_per_job": at_least(0),
    "executor.slurm.cpus_per_job": at_least(1),
    "executor.slurm.mem_gb": at_least(1),
    "executor.slurm.timeout_min": at_least(1),
    "executor.slurm.array_parallelism": at_least(1),
    "executor.slurm.max_requeue": at_least(0),
    "executor.slurm.poll_s": real_in(0, lo_open=True),
    "executor.slurm.log_dir": NON_EMPTY,
    "suite.seeds": list_of(at_least(0), distinct=True),
    "paths.raw": NON_EMPTY,
    "paths.prepared": NON_EMPTY,
    "paths.runs": NON_EMPTY,
    "paths.reports": NON_EMPTY,
    "trainer.epochs": at_least(1),
    "trainer.batch_size": at_least(1),
    "trainer.eval_batch_size": at_least(1),
    "trainer.optimizer": one_of(("sgd", "adam", "adamw")),
    "trainer.lr": real_in(0, LR_MAX, lo_open=True),
    "trainer.momentum": real_in(0, 1, hi_open=True),
    "trainer.weight_decay": real_in(0),
    "trainer.lr_step_epochs": at_least(0),
    "trainer.lr_gamma": real_in(0, 1, lo_open=True),
    "trainer.device": matching(r"auto|cpu|cuda(:[0-9]+)?", "auto, cpu, cuda or cuda:N"),
    "trainer.grad_clip": real_in(0),
    "trainer.num_threads": at_least(0),
    "trainer.progress": one_of(("auto", "on", "off")),
    "trainer.checkpoint_every": at_least(0),
    "trainer.select": one_of(("best_val", "best_test", "last")),
    "trainer.resident_gib": real_in(0),
    "trainer.prefetch": one_of(("auto", "on", "off")),
    "trainer.check_every": at_least(0),
    "model.fusion": one_of(_fusions),
    "model.resnet.width": at_least(1),
    "model.resnet.blocks": list_of(at_least(1)),
    "model.resnet.stem": one_of(("imagenet", "small")),
    "model.mlp_hidden": at_least(1),
    "model.mlp_layers": at_least(1),
    "model.seq_hidden": at_least(1),
    "model.fusion_dim": at_least(1),
}
# typed fields without a CHECKS rule, and what checks them instead
CHECKED_ELSEWHERE: dict[str, str] = {
    "method": "the registry (a registered method or method+plugin), then constructed with its params",
    "dataset": "the registry",
    "profile": "must name a block of profiles",
    "trainer.amp": "bool (OmegaConf)",
    "trainer.deterministic": "bool (OmegaConf)",
    "trainer.drop_last": "bool (OmegaConf)",
    "trainer.compile": "bool (OmegaConf)",
    "suite.datasets": "_check_suite (registered, not views, each with a datasets block)",
    "suite.groups": "_check_suite (known methods and datasets, supported tasks, one group per run)",
    "suite.dataset_seeds": "check_values (a registered dataset or view, and a suite.seeds-like list)",
    "datasets": "each dataset's Config; `real:` against g2d/data/raw/<name>.py Options; augment; methods",
    "methods": "each method's Params, and its constructor for the runs the config trains",
    "profiles": "the selected one is merged and checked like params.yaml",
    "extra_modules": "imported (an ImportError names the module)",
    "reports": "g2d report (g2d/report/render.py)",
    "sources": "tests/unit/test_recipes.py (profiles.paper)",
    "executor.slurm.partition": "str (empty: the cluster's default partition)",
    "executor.slurm.sbatch": "a map of extra sbatch flags, passed to submitit as slurm_additional_parameters",
}


def _get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def check_values(out: Schema, params: Path, overrides: list[str], overlay: Any, prof: str) -> None:
    """Every CHECKS rule on the composed config; the error says where the value came from."""
    from_cli = {o.split("=", 1)[0].lstrip("+~") for o in overrides}

    def origin(key: str) -> str:  # the profile overlay is merged last, so it wins over the command line
        if OmegaConf.select(OmegaConf.create(overlay or {}), key, default=None) is not None:
            return f" (set by profiles.{prof})"
        if key in from_cli:
            return " (set on the command line)"
        return ""

    def check(key: str, value: Any, rule: Rule, shown: str) -> None:
        if not rule.ok(value):
            raise ConfigError(f"{params}: {shown}={_show(value)} {rule.says()}{origin(shown)}")

    for key, rule in CHECKS.items():
        check(key, _get(out, key), rule, key)
    from g2d import registry

    for name, seeds in (out.suite.dataset_seeds or {}).items():
        if name not in registry.list_datasets():
            raise ConfigError(f"{params}: suite.dataset_seeds.{name}: unknown dataset (registered: "
                              f"{', '.join(registry.list_datasets())})")
        check(f"suite.dataset_seeds.{name}", list(seeds), CHECKS["suite.seeds"], f"suite.dataset_seeds.{name}")
    for name, block in out.datasets.items():  # per-dataset trainer overrides, merged as the trainer sees them
        over = (block or {}).get("trainer") or {}
        if over:
            try:
                tc = trainer_config(out, name)
            except ConfigError as e:
                raise ConfigError(f"{params}: {e}") from None
            for k in over:
                check(f"trainer.{k}", getattr(tc, k), CHECKS.get(f"trainer.{k}", Rule(lambda v: True, str)),
                      f"datasets.{name}.trainer.{k}")


def check_real_blocks(out: Schema, params: Path) -> None:
    """`datasets.<d>.real` is read by fetch / prepare only; check it against the raw module's Options here, so
    a typo or a bad value fails in every command (train included) instead of at the next prepare."""
    from g2d import registry
    from g2d.data.raw.fetching import RawDataError, parse_options

    for name, block in out.datasets.items():
        real = (block or {}).get("real") or {}
        if not real:
            continue
        try:
            mod = registry.get_dataset(name)(None)._raw()
        except NotImplementedError as e:  # a `real:` block for a dataset without real-data code
            raise ConfigError(f"{params}: datasets.{name}.real: {e}; remove the block") from None
        parse = getattr(mod, "options", None) or (lambda o, m=mod: parse_options(m.Options, o, m.PREFIX))
        try:
            parse(dict(real))
        except (RawDataError, ValueError, TypeError) as e:
            raise ConfigError(f"{params}: {e}") from None


def check_methods(out: Schema, params: Path) -> None:
    """Construct each method the config trains (the selected method on the selected dataset, and every suite
    group's runs) with its merged params: constructors only check values (no tensors, no files). Then
    `Method.check_config(trainer, model)` refuses shared trainer/model options the method cannot train with,
    before any run starts (not in `setup`, after other runs of the stage were trained)."""
    from g2d import registry

    suite = {(m, d) for g in out.suite.groups.values() for m in g.methods for d in g.datasets}
    merged: dict[tuple[str, str], Any] = {}  # params differ per dataset only where it overrides them
    trainers: dict[str, Any] = {}  # per dataset: building a trainer config costs ~40 ms (OmegaConf merge)
    for m, d in [(out.method, out.dataset), *sorted(suite - {(out.method, out.dataset)})]:
        cls = registry.get_method(m)
        over = (_dataset_block(out, d).get("methods") or {}).get(m)
        key = (m, json.dumps(over, sort_keys=True, default=str) if over else "")
        if key not in merged:
            merged[key] = method_params(out, m, d)
        try:
            cls(merged[key], registry.get_dataset(d).spec)
            if d not in trainers:
                trainers[d] = trainer_config(out, d)
            cls.check_config(trainers[d], out.model)  # shared trainer/model options it cannot take
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{params}: {e} ({m} on {d})") from None


# ---- YAML ------------------------------------------------------------------------------------------------------
class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader that rejects a key repeated in one mapping (Hydra / OmegaConf would not name the line)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: SafeConstructor reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first}); keep one of them",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def check_yaml(params: Path) -> None:
    """Read and parse the params file strictly: encoding, syntax, tabs, duplicate keys -> one line with its line."""
    try:
        text = params.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"{params}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                          "save the file as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{params}: cannot read it ({e.strerror or e})") from None
    try:
        yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{params}:{mark.line + 1}:{mark.column + 1}" if mark else str(params)
        problem = " ".join(str(e.problem or e.context or e).split())
        if "duplicate key" in problem:
            hint = ""
        elif "\\t" in problem or (mark and "\t" in (text.splitlines()[mark.line:mark.line + 1] or [""])[0]):
            hint = "; indent with spaces, not tabs"
        else:
            hint = "; check the indentation and quote values containing ': ' or starting with [ { * & ! | > % @"
        raise ConfigError(f"{where}: YAML error: {problem}{hint}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{params}: YAML error: {' '.join(str(e).split())}") from None
