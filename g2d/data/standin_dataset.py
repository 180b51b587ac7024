"""Shared `standin()` implementation: sizes from the real split sizes times `scale`."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from g2d.data.prepared import stratified_split, write_prepared
from g2d.data.standin import StandinConfig, _rng, balanced_labels, generate


def write_standin(dataset, out_dir: Path, seed: int) -> Path:
    """Generate train/test, carve a stratified val split from train, write the prepared format."""
    cfg = dataset.config
    sc: StandinConfig = cfg.standin
    spec = dataset.spec
    n_classes = max(len(spec.classes), 2)
    rng = _rng(spec.name, "labels", seed)
    arrays = {}
    for split, n in (("train", sc.n_train), ("test", sc.n_test)):
        labels = balanced_labels(n, n_classes, rng)
        mods = generate(spec, sc, n, labels, seed, split)
        arrays[split] = {**mods, "label": labels, "index": np.arange(n, dtype=np.int64)}
    keep, val = stratified_split(arrays["train"]["label"], cfg.val_fraction, cfg.split_seed, spec.task)
    full = arrays.pop("train")
    arrays["train"] = {k: v[keep] for k, v in full.items()}
    arrays["val"] = {k: v[val] for k, v in full.items()}
    extra = {"source": "standin", "standin_seed": seed, "standin": asdict(sc),
             "note": "generated stand-in, NOT the real dataset"}
    return write_prepared(out_dir, spec, {s: arrays[s] for s in ("train", "val", "test")}, extra)
