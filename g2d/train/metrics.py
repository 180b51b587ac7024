"""Metrics (acc / macro-F1; MAE / RMSE / R^2) and the three model-selection rules."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

SELECTIONS = {
    "best_val": "test at the best-validation epoch (default protocol)",
    "best_test": "best test epoch (official-code protocol: selection on the test set)",
    "last": "last epoch",
}


def primary_metric(task: str) -> tuple[str, bool]:
    """(name, higher_is_better) used for model selection."""
    return ("acc", True) if task == "classification" else ("rmse", False)


def classification_metrics(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> dict[str, float]:
    pred, target = pred.cpu().long(), target.cpu().long()
    acc = (pred == target).float().mean().item() * 100
    f1s = []
    for c in range(n_classes):
        tp = ((pred == c) & (target == c)).sum().item()
        fp = ((pred == c) & (target != c)).sum().item()
        fn = ((pred != c) & (target == c)).sum().item()
        if tp + fp + fn == 0:
            continue  # class absent from both: excluded from the macro average
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"acc": acc, "f1": 100 * float(np.mean(f1s)) if f1s else 0.0}


def regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    p, t = pred.cpu().double().reshape(-1), target.cpu().double().reshape(-1)
    err = p - t
    ss_tot = ((t - t.mean()) ** 2).sum().item()
    return {"mae": err.abs().mean().item(), "rmse": math.sqrt((err**2).mean().item()),
            "r2": 1 - (err**2).sum().item() / ss_tot if ss_tot > 0 else float("nan")}


def compute(task: str, out: torch.Tensor, target: torch.Tensor, n_classes: int) -> dict[str, float]:
    if task == "classification":
        return classification_metrics(out.argmax(-1), target, n_classes)
    return regression_metrics(out.squeeze(-1), target)


def select(history: pd.DataFrame, task: str) -> dict[str, dict]:
    """Apply each selection rule to a per-epoch history: {rule: {epoch, val: {...}, test: {...}}}."""
    name, higher = primary_metric(task)
    out = {}
    for rule in SELECTIONS:
        if rule == "last":
            row = history.iloc[-1]
        else:
            col = history[f"{'val' if rule == 'best_val' else 'test'}/{name}"].to_numpy()
            best = np.nanmax(col) if higher else np.nanmin(col)
            hits = np.flatnonzero(col == best)
            # best_val: earliest best epoch; best_test: latest (the official `>=` rule)
            row = history.iloc[hits[0] if rule == "best_val" else hits[-1]]
        out[rule] = {"epoch": int(row["epoch"])}
        for split in ("val", "test"):
            out[rule][split] = {c.split("/", 1)[1]: float(row[c]) for c in history.columns
                                if c.startswith(f"{split}/")}
    return out
