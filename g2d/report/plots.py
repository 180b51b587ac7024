"""Figures from the committed per-run histories (reports/runs/*.csv): learning curves, SMP timeline."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
    return path


def learning_curves(runs_dir: Path, dataset: str, out: Path, metric: str = "acc") -> Path | None:
    """Per method: test fused and per-modality-head accuracy per epoch (mean over seeds)."""
    files = sorted((f for f in Path(runs_dir).rglob(f"*-{dataset}.csv") if not f.name.startswith("teacher-")),
                   key=lambda f: f.name)
    if not files:
        return None
    n = len(files)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, sharey=True)
    first = pd.read_csv(files[0], nrows=1)
    if f"test/{metric}" not in first.columns:  # regression datasets: curves of RMSE
        metric = "rmse"
    for ax, f in zip(axes.flat, files):
        h = pd.read_csv(f).groupby("epoch").mean(numeric_only=True)
        for c in [c for c in h.columns if c == f"test/{metric}" or c.startswith(f"test/{metric}_")]:
            label = "fused" if c == f"test/{metric}" else c.split("_", 1)[1]
            ax.plot(h.index, h[c], label=label, lw=1.5 if label == "fused" else 1.0,
                    ls="-" if label == "fused" else "--")
        ax.set_title(f.stem.removesuffix(f"-{dataset}"), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{dataset}: test {metric} per epoch (mean over seeds)", fontsize=10, y=1.02)
    return _save(fig, out)


def smp_timeline(runs_dir: Path, dataset: str, out: Path) -> Path | None:
    """Which modality's encoder trained in which epoch: mean kappa per epoch from history.csv."""
    panels = []
    for f in sorted(Path(runs_dir).rglob(f"*-{dataset}.csv"), key=lambda f: f.name):
        h = pd.read_csv(f)
        kap = [c for c in h.columns if c.startswith("coef/kappa_")]
        if kap:
            panels.append((f.stem.removesuffix(f"-{dataset}"), h.groupby("epoch")[kap].mean()))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(6, 0.5 + 0.45 * sum(len(k.columns) for _, k in panels)),
                             squeeze=False)
    for ax, (name, k) in zip(axes[:, 0], panels):
        ax.imshow(k.T.to_numpy(), aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(k.columns)), [c.removeprefix("coef/kappa_") for c in k.columns], fontsize=7)
        ax.set_title(f"{name}: kappa (1 = encoder trains)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("epoch", fontsize=8)
    return _save(fig, out)
