"""Per-run summaries (reports/runs/*.json) -> one tidy table, the source of truth for every report.

reports/tables/runs.csv: one row per (run, seed, selection rule, split, metric).
reports/tables/summary.csv: mean / std / n over seeds for each (run, selection, split, metric), with `seeds`
(the run's seeds) and `diverged` (how many of them diverged: metrics.json `diverged`; left out of mean and n).
Runs from different stand-in/real sources, code versions or split variants (`data_split`, e.g. CREMA-D's
`ogm_ge` vs `speaker_folds/1`) are never averaged or tabled together.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from g2d.data.prepared import atomic_write_text
from g2d.report import smp_order

COLUMNS = ["run", "method", "dataset", "modality", "source", "data_split", "seed", "selection", "epoch", "split", "metric",
           "value", "code_hash"]
DIVERGED = "diverged"  # `metric` of the one row a diverged seed contributes (value NaN): never averaged, counted


def tidy(runs_dir: Path) -> pd.DataFrame:
    rows = []
    for f in sorted(Path(runs_dir).rglob("*.json")):
        summary = json.loads(f.read_text())
        for res in summary["seeds"]:
            if res.get("diverged"):  # excluded from every mean; counted per (run, dataset) by summarise
                rows.append({
                    "run": summary["run"], "method": summary["method"], "dataset": summary["dataset"],
                    "modality": summary.get("modality") or "", "source": res.get("source", "real"),
                    "data_split": res.get("split", "standard"), "seed": res["seed"], "selection": "",
                    "epoch": res["diverged"].get("epoch"), "split": "", "metric": DIVERGED,
                    "value": float("nan"), "code_hash": res["provenance"].get("code_hash", "")})
                continue
            for rule, sel in res["selection"].items():
                for split in ("val", "test"):
                    for metric, value in sel[split].items():
                        rows.append({
                            "run": summary["run"], "method": summary["method"], "dataset": summary["dataset"],
                            "modality": summary.get("modality") or "", "source": res.get("source", "real"),
                            "data_split": res.get("split", "standard"),
                            "seed": res["seed"], "selection": rule, "epoch": sel["epoch"], "split": split,
                            "metric": metric, "value": value, "code_hash": res["provenance"].get("code_hash", "")})
            probed = res.get("diagnostics")  # probes and train-batch confidence of selected.pt (g2d.train.probes)
            if probed:
                for split, metric, value in [(sp, k, v) for sp in ("test", "train")
                                             for k, v in (probed.get(sp) or {}).items()]:
                    rows.append({
                        "run": summary["run"], "method": summary["method"], "dataset": summary["dataset"],
                        "modality": summary.get("modality") or "", "source": res.get("source", "real"),
                        "data_split": res.get("split", "standard"), "seed": res["seed"],
                        "selection": probed["rule"], "epoch": probed["epoch"], "split": split, "metric": metric,
                        "value": value, "code_hash": res["provenance"].get("code_hash", "")})
    return pd.DataFrame(rows, columns=COLUMNS)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    keys = ["run", "method", "dataset", "modality", "source", "selection", "split", "metric"]
    mixed = df.groupby(["run"])["source"].nunique()
    if (mixed > 1).any():
        raise ValueError(f"runs mix stand-in and real data: {sorted(mixed[mixed > 1].index)}; re-run them")
    splits = df.groupby(["dataset"])["data_split"].unique()
    for ds, names in splits.items():
        if len(names) > 1:
            runs = df[df.dataset == ds].groupby("data_split")["run"].unique()
            detail = "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in runs.items())
            raise ValueError(f"{ds}: runs on different split variants cannot share a table ({detail}); re-run "
                             f"them on one `datasets.{ds}.real.split` or keep their summaries apart")
    g = df.groupby(keys, sort=True)["value"]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    # diverged seeds: `seeds` = seeds of the run, `diverged` = how many of them diverged; the run's `diverged`
    # row (selection/split empty, n 0) keeps the count where every seed diverged
    seeds = df.groupby("run")["seed"].nunique().rename("seeds")
    div = df[df.metric == DIVERGED].groupby("run")["seed"].nunique().rename("diverged")
    out = out.merge(seeds, on="run", how="left").merge(div, on="run", how="left")
    out["diverged"] = out["diverged"].fillna(0).astype(int)
    return out


def aggregate(reports_dir: Path, selection: str = "best_val") -> list[Path]:
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
    paths += headline(summary, reports_dir / "metrics", selection)
    paths.append(smp_order.write(reports_dir / "runs", tables / "smp_order.csv"))
    return paths


def headline(summary: pd.DataFrame, out_dir: Path, selection: str = "best_val") -> list[Path]:
    """The `dvc metrics show` / `dvc metrics diff` / `dvc exp show` metrics: one file per method,
    `<out_dir>/<method>.json` (a teacher is `teacher-<modality>.json`), keyed `<dataset>/<metric>`: the mean over
    seeds of the run's test primary metric (`acc`, or `rmse` for regression) under `selection` (trainer.select), as
    in summary.csv. DVC prints one row per file and one column per key, so the table is methods x datasets
    (a single file of `<dataset>/<method>/<metric>` keys was one row of 170 columns); `dvc metrics diff` names a
    number `reports/metrics/g2d.json cremad/acc`. No `_std` keys (they are in summary.csv). A file of a method
    no longer in the runs is removed."""
    sel = summary[(summary.selection == selection) & (summary.split == "test") & summary.metric.isin(["acc", "rmse"])]
    per: dict[str, dict[str, float]] = {}
    for r in sel.itertuples():
        run = r.run.replace(f"-{r.dataset}", "", 1)  # g2d-cremad -> g2d, teacher-cremad-audio -> teacher-audio
        per.setdefault(run, {})[f"{r.dataset}/{r.metric}"] = round(float(r.mean), 4)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for run, vals in sorted(per.items()):
        p = out_dir / f"{run}.json"
        text = json.dumps(dict(sorted(vals.items())), indent=2) + "\n"
        if not p.is_file() or p.read_text() != text:
            atomic_write_text(p, text)
        paths.append(p)
    for stale in set(out_dir.glob("*.json")) - set(paths):
        stale.unlink()
    return paths
