"""Test helpers: a temp project config and tiny prepared datasets written in the real format."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from g2d.config import load_config
from g2d.data.prepared import write_prepared
from g2d.registry import get_dataset

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = ["model.resnet.width=4", "model.resnet.blocks=[1,1]", "model.mlp_hidden=8", "model.seq_hidden=8",
              "model.fusion_dim=8"]


def tmp_params(tmp_path: Path, edit=None) -> Path:
    """Copy the project's params.yaml into tmp_path with every path pointing inside tmp_path."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"] = {k: str(tmp_path / v) for k, v in params["paths"].items()}
    if edit:
        edit(params)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params, sort_keys=False))
    return p


def tiny_config(tmp_path: Path, overrides=(), edit=None):
    return load_config([*TINY_MODEL, "trainer.progress=off", *overrides], tmp_params(tmp_path, edit))


def write_tiny_cremad(out_dir: Path, n=(24, 8, 12), seed: int = 0, signal: float = 2.0) -> Path:
    """A small learnable dataset in CREMA-D's modalities (tiny shapes), written as `prepare` would."""
    spec = get_dataset("cremad").spec
    rng = np.random.default_rng(seed)
    splits = {}
    for split, size in zip(("train", "val", "test"), n):
        y = np.arange(size) % 6
        rng.shuffle(y)
        a = rng.standard_normal((size, 1, 8, 6)).astype(np.float32)
        v = rng.standard_normal((size, 3, 1, 8, 8)).astype(np.float32)
        a[:, 0, y % 8, 0] += signal  # class-dependent pixels: learnable in a few steps
        v[np.arange(size), y % 3, 0, 0, 0] += signal
        splits[split] = {"audio": a, "visual": v, "label": y.astype(np.int64),
                         "index": np.arange(size, dtype=np.int64)}
    return write_prepared(out_dir, spec, splits, {"source": "standin"})


def killed_during(monkeypatch, train, eval_call: int) -> None:
    """Run `train()` killed (KeyboardInterrupt) at the trainer's `eval_call`-th evaluation, then restore the
    trainer. Two evaluations per epoch (val, test): 5 = epoch 2's val, so epochs 0 and 1 are checkpointed."""
    import pytest

    from g2d.train.trainer import Trainer

    calls, orig = {"n": 0}, Trainer.evaluate

    def crash(self, model, split):
        calls["n"] += 1
        if calls["n"] == eval_call:
            raise KeyboardInterrupt("simulated kill")
        return orig(self, model, split)

    monkeypatch.setattr(Trainer, "evaluate", crash)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(Trainer, "evaluate", orig)
