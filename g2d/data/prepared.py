"""The prepared on-disk format shared by real `prepare` and stand-in generators.

<dir>/meta.json                     spec, class names, split sizes, provenance
<dir>/<split>/<modality>.npy        one array per modality, first axis = sample
<dir>/<split>/label.npy, index.npy  targets and stable sample ids
Arrays are memory-mapped on load, so real datasets need not fit in RAM.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from g2d.data.base import DatasetSpec, ModalitySpec

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


class PreparedError(RuntimeError):
    pass


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_prepared(out_dir: Path, spec: DatasetSpec, splits: dict[str, dict[str, np.ndarray]],
                   extra: dict[str, Any] | None = None) -> Path:
    """Write all splits into a temp dir, then swap it in: a crash never leaves a half dataset."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sizes = {}
    for split, arrays in splits.items():
        n = len(arrays["label"])
        for key in (*spec.modality_names, "label", "index"):
            if key not in arrays:
                raise PreparedError(f"{spec.name}/{split}: missing array {key!r}")
            if len(arrays[key]) != n:
                raise PreparedError(f"{spec.name}/{split}/{key}: {len(arrays[key])} rows, labels have {n}")
        (tmp / split).mkdir()
        for key, arr in arrays.items():
            np.save(tmp / split / f"{key}.npy", np.ascontiguousarray(arr))
        sizes[split] = n
    mods = []
    for m in spec.modalities:
        arr = splits[next(iter(splits))][m.name]
        mods.append({"name": m.name, "kind": m.kind, "shape": list(arr.shape[1:]), "dtype": str(arr.dtype)})
    meta = {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "task": spec.task,
        "classes": list(spec.classes),
        "modalities": mods,
        "splits": sizes,
        **(extra or {}),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


class Prepared:
    """A prepared dataset: its meta and memory-mapped split arrays."""

    def __init__(self, root: Path, mmap: bool = True):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise PreparedError(
                f"{meta_path} not found: prepare the dataset first "
                f"(`g2d prepare {self.root.name}` or `dvc repro prepare@{self.root.name}`)")
        self.meta = json.loads(meta_path.read_text())
        self._mmap = "r" if mmap else None
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    @property
    def spec(self) -> DatasetSpec:
        mods = tuple(ModalitySpec(m["name"], m["kind"], tuple(m["shape"])) for m in self.meta["modalities"])
        return DatasetSpec(self.meta["name"], mods, self.meta["task"], tuple(self.meta["classes"]))

    def split(self, name: str) -> dict[str, np.ndarray]:
        if name not in self._cache:
            d = self.root / name
            if not d.is_dir():
                raise PreparedError(f"{d}: split {name!r} missing; splits: {list(self.meta['splits'])}")
            keys = [*self.spec.modality_names, "label", "index"]
            self._cache[name] = {k: np.load(d / f"{k}.npy", mmap_mode=self._mmap) for k in keys}
        return self._cache[name]


def stratified_split(labels: np.ndarray, fraction: float, seed: int, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): per-class fraction held out; regression stratifies on quantile bins."""
    rng = np.random.default_rng(seed)
    if fraction <= 0:
        return np.arange(len(labels)), np.arange(0)
    if task == "regression":
        bins = np.quantile(labels, np.linspace(0, 1, 11)[1:-1])
        strata = np.digitize(labels, bins)
    else:
        strata = labels
    held = []
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        rng.shuffle(idx)
        held.append(idx[: int(round(fraction * len(idx)))])
    held_out = np.sort(np.concatenate(held)) if held else np.arange(0)
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep, held_out


def spec_dict(spec: DatasetSpec) -> dict:
    return asdict(spec)
