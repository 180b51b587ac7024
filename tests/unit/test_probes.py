"""Linear probes and train-batch confidence of the selected checkpoint (g2d/train/probes.py)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from g2d.runs import prepared_dir
from g2d.train import probes
from g2d.train.trainer import RunSpec, Trainer
from tests.helpers import tiny_config, write_tiny_cremad


def test_ridge_is_the_penalised_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]], dtype=torch.float64) + 3 + 0.1 * torch.randn(50, 1, generator=g,
                                                                                                    dtype=torch.float64)
    w, b = probes.fit_ridge(x, y)
    # normal equations of mean (xw + b - y)^2 + L2 ||w||^2 with an unpenalised bias, solved by numpy on [x, 1]
    xa = np.hstack([x.numpy(), np.ones((50, 1))])
    pen = np.diag([probes.L2] * 4 + [0.0]) * 50
    ref = np.linalg.solve(xa.T @ xa + pen, xa.T @ y.numpy())
    assert np.allclose(w.numpy(), ref[:4], atol=1e-10) and np.allclose(b.numpy(), ref[4], atol=1e-10)


def test_logistic_fit_is_a_stationary_point_of_its_objective():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(120, generator=g, dtype=torch.float64) > 0).long() + 2 * (x[:, 1] > 0).long()
    w, b = probes.fit_logistic(x, y, 4)
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x @ w + b, y) + probes.L2 * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert gw.abs().max() < 1e-6 and gb.abs().max() < 1e-6


def test_probe_reads_separable_features_and_not_noise():
    g = torch.Generator().manual_seed(2)
    y = torch.arange(600) % 6
    signal = torch.nn.functional.one_hot(y, 6).double() * 3 + 0.3 * torch.randn(600, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(600, 6, generator=g, dtype=torch.float64)
    assert probes.probe(signal[:400], y[:400], signal[400:], y[400:], "classification", 6) == 100.0
    assert probes.probe(noise[:400], y[:400], noise[400:], y[400:], "classification", 6) < 30.0  # chance 16.7


def test_train_confidence_is_the_mean_true_class_probability():
    class Fixed(torch.nn.Module):  # fused logits = the batch's x: the expected value is computable by hand
        modalities = ("a",)

        def forward(self, batch):
            return type("O", (), {"fused": batch["a"]})()

    class Inputs:
        def eval(self, b):
            return b

        def train(self, b, gen):
            return {**b, "a": b["a"] * 0}  # "augmentation" that removes every signal: uniform probabilities

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])  # row 1: the true class is not the most probable one
    loader = [{"a": logits[:2], "label": labels[:2]}, {"a": logits[2:], "label": labels[2:]}]
    out = probes.train_confidence(Fixed(), loader, Inputs(), torch.Generator())
    expect = torch.softmax(logits, 1)[torch.arange(3), labels].mean().item()
    assert out["conf_train"] == pytest.approx(expect, abs=1e-7)
    assert out["conf_train_aug"] == pytest.approx(1 / 3, abs=1e-7)


@pytest.mark.parametrize("recipe", ["none", "crop_keep_flip"])
def test_every_run_records_probes_and_confidence_of_its_selected_epoch(tmp_path, recipe):
    cfg = tiny_config(tmp_path, ["trainer.epochs=2", "trainer.batch_size=8", "trainer.select=best_val",
                                 f"datasets.cremad.augment.visual.recipe={recipe}"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"), n=(24, 8, 12))
    res = Trainer(cfg, RunSpec("joint", "cremad", 0, Path(cfg.paths.runs) / "j/s0", prepared_dir(cfg, "cremad"))).fit()
    d = res["diagnostics"]
    assert d["rule"] == "best_val" and d["epoch"] == res["selection"]["best_val"]["epoch"]
    assert set(d["test"]) == {"probe_audio", "probe_visual"}
    assert all(0 <= v <= 100 for v in d["test"].values())
    assert 0 < d["train"]["conf_train"] < 1
    if recipe == "none":  # no train-time augmentation: both readings are the same inputs
        assert d["train"]["conf_train_aug"] == d["train"]["conf_train"]
    else:
        assert d["train"]["conf_train_aug"] != d["train"]["conf_train"]
