"""Method.forward: the one place the model's output comes from, in training, evaluation and train confidence."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from g2d.data.prepared import Prepared
from g2d.methods.joint import Joint
from g2d.runs import prepared_dir
from g2d.train.trainer import RunSpec, Trainer
from tests.helpers import tiny_config, write_tiny_cremad


def test_forward_hook_feeds_training_evaluation_and_confidence(tmp_path, monkeypatch):
    """A forward that adds +100 to class 0's fused logit in eval mode: every evaluated fused prediction is class 0
    (test acc = class 0's share), the train-batch confidence is ~1 for class-0 samples only; training steps use
    the hook too."""
    cfg = tiny_config(tmp_path, ["trainer.epochs=2", "trainer.batch_size=8", "trainer.select=last"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"), n=(24, 8, 12))
    calls = {"train": 0, "eval": 0}

    def forward(self, model, batch):
        out = model(batch)
        calls["train" if model.training else "eval"] += 1
        if model.training:
            return out
        shift = torch.zeros_like(out.fused)
        shift[:, 0] = 100.0
        return dataclasses.replace(out, fused=out.fused + shift)

    monkeypatch.setattr(Joint, "forward", forward)
    res = Trainer(cfg, RunSpec("joint", "cremad", 0, Path(cfg.paths.runs) / "j/s0", prepared_dir(cfg, "cremad"))).fit()
    y = Prepared(prepared_dir(cfg, "cremad")).split("test")["label"]
    assert res["selection"]["last"]["test"]["acc"] == pytest.approx(100.0 * float(np.mean(y == 0)))
    assert calls["train"] == 2 * 3  # 24 samples / batch 8, two epochs
    # evaluation: val and test once per epoch (one batch each at eval_batch_size); confidence: the train split twice
    eb = cfg.trainer.eval_batch_size
    per_epoch = -(-8 // eb) + -(-12 // eb)
    assert calls["eval"] == 2 * per_epoch + 2 * -(-24 // eb)
    ytr = Prepared(prepared_dir(cfg, "cremad")).split("train")["label"]
    assert res["diagnostics"]["train"]["conf_train"] == pytest.approx(float(np.mean(ytr == 0)), abs=1e-6)
    assert json.loads((Path(cfg.paths.runs) / "j/s0/metrics.json").read_text())["selection"] == res["selection"]
