"""Shared `standin()` implementation: the embedded layout, or real shapes and sizes at `scale > 0`."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from g2d.data.prepared import stratified_split, write_prepared
from g2d.data.standin import StandinConfig, _rng, balanced_labels, generate, regression_factors


def standin_layout(dataset) -> dict:
    """Shapes and split sizes the stand-in will have, without generating anything.

    scale = 0: the embedded shapes of the stand-in config and its n_train / n_test;
    scale > 0: the real dataset's spec shapes and real split sizes x scale (scale = 1: the real ones).
    """
    sc: StandinConfig = dataset.config.standin
    spec = dataset.spec
    if sc.scale < 0:
        raise ValueError(f"datasets.{spec.name}.standin.scale={sc.scale}: must be >= 0")
    if sc.scale == 0:
        shapes = {m.name: tuple(sc.modalities[m.name].shape) for m in spec.modalities if m.name in sc.modalities}
        sizes = {"train": sc.n_train, "test": sc.n_test}
        if sc.n_val > 0:
            sizes["val"] = sc.n_val
    else:
        if sc.real_n_train <= 0 or sc.real_n_test <= 0:
            raise ValueError(f"{spec.name}: standin.real_n_train / real_n_test unset; needed for scale > 0")
        shapes = {m.name: tuple(m.shape) for m in spec.modalities}
        sizes = {"train": max(1, round(sc.real_n_train * sc.scale)), "test": max(1, round(sc.real_n_test * sc.scale))}
        if sc.n_val > 0:  # real train size includes val: carve it the same way at scale > 0
            sizes["val"] = max(1, round(sizes["train"] * cfg_val(dataset)))
            sizes["train"] -= sizes["val"]
    for m in spec.modalities:
        if m.name in shapes and len(shapes[m.name]) != len(m.shape):
            raise ValueError(f"{spec.name}.standin.modalities.{m.name}.shape={list(shapes[m.name])}: "
                             f"needs {len(m.shape)} dims like the real {m.kind} shape {list(m.shape)}")
    return {"shapes": shapes, "sizes": sizes}


def cfg_val(dataset) -> float:
    return float(dataset.config.val_fraction)


def write_standin(dataset, out_dir: Path, seed: int) -> Path:
    """Generate train/test, carve a stratified val split from train, write the prepared format."""
    cfg = dataset.config
    sc: StandinConfig = cfg.standin
    spec = dataset.spec
    layout = standin_layout(dataset)
    rng = _rng(spec.name, "labels", seed)
    arrays = {}
    for split, n in layout["sizes"].items():
        if spec.task == "classification":
            labels = balanced_labels(n, len(spec.classes), rng)
            target = labels
        else:
            target, labels = regression_factors(n, sc.n_factors, rng)
            labels = labels.astype(np.float32)
        mods = generate(spec, sc, target, seed, split, layout["shapes"])
        arrays[split] = {**mods, "label": labels, "index": np.arange(n, dtype=np.int64)}
    if "val" not in arrays:  # the default protocol: a stratified val split carved out of train
        keep, val = stratified_split(arrays["train"]["label"], cfg.val_fraction, cfg.split_seed, spec.task)
        if len(val) == 0:
            raise ValueError(f"{spec.name}: val_fraction={cfg.val_fraction} of {len(keep)} train samples leaves an "
                             f"empty stratified val split; raise standin.n_train or set standin.n_val")
        full = arrays.pop("train")
        arrays["train"] = {k: v[keep] for k, v in full.items()}
        arrays["val"] = {k: v[val] for k, v in full.items()}
    extra = {"source": "standin", "standin_seed": seed, "standin": asdict(sc),
             "note": "generated stand-in, NOT the real dataset"}
    if spec.task == "regression":
        extra["target"] = "standardised target (z-score), stand-in for the real one"
    return write_prepared(out_dir, spec, {s: arrays[s] for s in ("train", "val", "test")}, extra)
