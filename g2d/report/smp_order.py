"""Which modality SMP trains first: the share of phase-1 batches each modality is the one being trained.

SMP (G2D §3.3) ranks the modalities by their teachers' confidence on each training batch and, in phase 1,
trains only the least confident one (kappa = 1) with the others frozen (kappa = 0). Whether that is the
modality the paper means (the weak one) is decided by the data, so every SMP table shows it (issue 11).
Read from the committed per-epoch histories: `coef/kappa_<m>` is the mean kappa of m over the epoch's
batches, and phase-1 epochs are those where the kappas sum to one (one modality trained per batch, complete
suppression; which one may change from batch to batch). Runs with partial suppression (the others keep
kappa = 1 - tanh(alpha rho) > 0, so the sum exceeds one) or without kappa logs are skipped.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from g2d.data.prepared import atomic_write_text

COLUMNS = ["run", "method", "dataset", "seed", "modality", "share_first", "phase1_epochs"]


def per_seed(runs_dir: Path) -> pd.DataFrame:
    rows = []
    for f in sorted(Path(runs_dir).rglob("*.csv")):
        head = f.open().readline().strip().split(",")
        kappas = [c for c in head if c.startswith("coef/kappa_")]
        meta = f.with_suffix(".json")
        if not kappas or not meta.is_file():
            continue
        info = json.loads(meta.read_text())
        hist = pd.read_csv(f)
        k = hist[kappas]
        phase1 = ((k.sum(axis=1) - 1).abs() < 1e-6) & (len(kappas) > 1)  # one modality trained per batch
        for seed, h in hist[phase1].groupby("seed"):
            for c in kappas:
                rows.append({"run": info["run"], "method": info["method"], "dataset": info["dataset"],
                             "seed": int(seed), "modality": c.removeprefix("coef/kappa_"),
                             "share_first": float(h[c].mean()), "phase1_epochs": int(len(h))})
    return pd.DataFrame(rows, columns=COLUMNS)


def write(runs_dir: Path, path: Path) -> Path:
    """tables/smp_order.csv: per (run, modality) the mean over seeds of the phase-1 share, and n seeds."""
    df = per_seed(runs_dir)
    out = (df.groupby(["run", "method", "dataset", "modality"], sort=True)
           .agg(share_first=("share_first", "mean"), share_min=("share_first", "min"),
                share_max=("share_first", "max"), n=("seed", "nunique"), phase1_epochs=("phase1_epochs", "max"))
           .reset_index())
    path = Path(path)
    atomic_write_text(path, out.to_csv(index=False, float_format="%.4g"))
    return path
