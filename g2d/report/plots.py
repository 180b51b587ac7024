"""Figures from the committed per-run histories (reports/runs/*.csv): learning curves, SMP timeline."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


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
    # constrained layout keeps each panel's title clear of the x labels of the row above, and the suptitle
    # right above the first row (bbox_inches="tight" alone leaves them overlapping or far apart)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.4 + 2.6 * rows), squeeze=False, sharey=True,
                             layout="constrained")
    fig.get_layout_engine().set(h_pad=0.06, w_pad=0.04, hspace=0.04)
    first = pd.read_csv(files[0], nrows=1)
    if f"test/{metric}" not in first.columns:  # regression datasets: curves of RMSE
        metric = "rmse"
    for ax, f in zip(axes.flat, files):
        h = pd.read_csv(f).groupby("epoch").mean(numeric_only=True)
        for c in [c for c in h.columns if c == f"test/{metric}" or c.startswith(f"test/{metric}_")]:
            label = "fused" if c == f"test/{metric}" else c.split("_", 1)[1]
            ax.plot(h.index, h[c], label=label, lw=1.5 if label == "fused" else 1.0,
                    ls="-" if label == "fused" else "--")
        ax.set_title(f.stem.removesuffix(f"-{dataset}"), fontsize=9, pad=3)
        ax.set_xlabel("epoch", fontsize=8, labelpad=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{dataset}: test {metric} per epoch (mean over seeds)", fontsize=10)
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
    # one row per modality, a fixed height per row plus room for each panel's title: panels never overprint
    heights = [len(k.columns) for _, k in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.5, 0.6 + sum(0.28 * h + 0.42 for h in heights)),
                             squeeze=False, sharex=True, layout="constrained",
                             gridspec_kw={"height_ratios": heights})
    fig.get_layout_engine().set(h_pad=0.04, hspace=0.02)
    image = None
    for ax, (name, k) in zip(axes[:, 0], panels):
        epochs = k.index.to_numpy()
        extent = (epochs.min() - 0.5, epochs.max() + 0.5, len(k.columns) - 0.5, -0.5)
        image = ax.imshow(k.T.to_numpy(), aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest",
                          extent=extent)
        ax.set_yticks(range(len(k.columns)), [c.removeprefix("coef/kappa_") for c in k.columns], fontsize=7)
        ax.set_title(name, fontsize=8, loc="left", pad=2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("epoch", fontsize=8)
    bar = fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.04, pad=0.02, aspect=30)
    bar.set_label("mean kappa over seeds (1 = encoder trains, 0 = suppressed)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(f"{dataset}: SMP timeline per method", fontsize=9)
    return _save(fig, out)
