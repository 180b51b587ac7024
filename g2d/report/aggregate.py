"""Per-run summaries (reports/runs/*.json) -> one tidy table, the source of truth for every report.

reports/tables/runs.csv: one row per (run, seed, selection rule, split, metric).
reports/tables/summary.csv: mean / std / n over seeds for each (run, selection, split, metric).
Runs from different stand-in/real sources or code versions are never averaged together.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from g2d.data.prepared import atomic_write_text

COLUMNS = ["run", "method", "dataset", "modality", "source", "seed", "selection", "epoch", "split", "metric",
           "value", "git_sha"]


def tidy(runs_dir: Path) -> pd.DataFrame:
    rows = []
    for f in sorted(Path(runs_dir).rglob("*.json")):
        summary = json.loads(f.read_text())
        for res in summary["seeds"]:
            for rule, sel in res["selection"].items():
                for split in ("val", "test"):
                    for metric, value in sel[split].items():
                        rows.append({
                            "run": summary["run"], "method": summary["method"], "dataset": summary["dataset"],
                            "modality": summary.get("modality") or "", "source": res.get("source", "real"),
                            "seed": res["seed"], "selection": rule, "epoch": sel["epoch"], "split": split,
                            "metric": metric, "value": value, "git_sha": res["provenance"]["git_sha"]})
    return pd.DataFrame(rows, columns=COLUMNS)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    keys = ["run", "method", "dataset", "modality", "source", "selection", "split", "metric"]
    mixed = df.groupby(["run"])["source"].nunique()
    if (mixed > 1).any():
        raise ValueError(f"runs mix stand-in and real data: {sorted(mixed[mixed > 1].index)}; re-run them")
    g = df.groupby(keys, sort=True)["value"]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def aggregate(reports_dir: Path) -> list[Path]:
    reports_dir = Path(reports_dir)
    df = tidy(reports_dir / "runs")
    if df.empty:
        raise FileNotFoundError(f"no run summaries in {reports_dir / 'runs'}: run the train stages first")
    tables = reports_dir / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    paths = []
    summary = summarise(df)
    for name, frame in (("runs", df), ("summary", summary)):
        p = tables / f"{name}.csv"
        tmp = p.with_suffix(".csv.tmp")
        frame.to_csv(tmp, index=False, float_format="%.6g")
        tmp.replace(p)
        paths.append(p)
    paths.append(headline(summary, tables / "headline.json"))
    return paths


def headline(summary: pd.DataFrame, path: Path) -> Path:
    """`dvc metrics show` / `dvc exp show`: each run's mean test primary metric (best-val selection)."""
    sel = summary[(summary.selection == "best_val") & (summary.split == "test") & summary.metric.isin(["acc", "rmse"])]
    out: dict[str, dict[str, float]] = {}
    for r in sel.itertuples():
        out.setdefault(r.dataset, {})[r.run.removesuffix(f"-{r.dataset}")] = round(float(r.mean), 4)
    atomic_write_text(path, json.dumps(out, indent=2, sort_keys=True) + "\n")
    return path
