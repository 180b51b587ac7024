import math

import pandas as pd
import pytest
import torch

from g2d.train import metrics


def test_accuracy_and_macro_f1_by_hand():
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    y = torch.tensor([0, 1, 1, 1, 2, 0])
    r = metrics.classification_metrics(pred, y, 3)
    assert r["acc"] == pytest.approx(100 * 4 / 6)
    f1 = [2 * 1 / (2 * 1 + 1 + 1), 2 * 2 / (2 * 2 + 1 + 0), 2 * 1 / (2 * 1 + 1 + 0)]
    assert r["f1"] == pytest.approx(100 * sum(f1) / 3)


def test_regression_metrics_by_hand():
    p, t = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, 5.0])
    r = metrics.regression_metrics(p, t)
    assert r["mae"] == pytest.approx(2 / 3)
    assert r["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert r["r2"] == pytest.approx(1 - 2 / (((t - t.mean()) ** 2).sum().item()))


def test_selection_rules():
    h = pd.DataFrame({"epoch": [0, 1, 2, 3], "val/acc": [10, 50, 50, 40], "test/acc": [5, 30, 60, 60],
                      "val/acc_audio": [1, 2, 3, 4], "test/acc_audio": [9, 8, 7, 6]})
    s = metrics.select(h, "classification")
    assert s["best_val"]["epoch"] == 1 and s["best_val"]["test"]["acc"] == 30  # earliest best val
    assert s["best_test"]["epoch"] == 3  # official `>=`: the later tie wins
    assert s["last"]["epoch"] == 3 and s["last"]["test"]["acc_audio"] == 6


def test_regression_selects_min_rmse():
    h = pd.DataFrame({"epoch": [0, 1], "val/rmse": [2.0, 1.0], "test/rmse": [1.5, 3.0]})
    s = metrics.select(h, "regression")
    assert s["best_val"]["epoch"] == 1 and s["best_test"]["epoch"] == 0
