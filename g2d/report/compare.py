"""Compare one method against every other method of the suite, seed by seed.

For each dataset and metric: the paired per-seed difference (method - other) over the seeds both
ran, its mean, a 95% t-interval, the paired t-test p-value and its Holm-corrected value over every test
of the report (one report holds tens of tests: uncorrected, some fall below 0.05 by chance alone). With 3
seeds these intervals are wide: they say how much the seeds disagree, they do not replace more seeds;
below MIN_SEEDS paired seeds the report says so at its top.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from g2d.data.prepared import atomic_write_text
from g2d.report.stats import holm
from g2d.report.stats import paired as paired_stats
from g2d.train.metrics import SELECTIONS, primary_metric

MIN_SEEDS = 5  # below this many paired seeds a comparison's p-values are flagged as fragile


def paired(runs: pd.DataFrame, method: str, selection: str = "best_val") -> pd.DataFrame:
    fused = runs.modality.isna() | (runs.modality.astype(str) == "")  # no per-modality rows (fillna("") warns on floats)
    sel = runs[(runs.selection == selection) & (runs.split == "test") & fused]
    mine = sel[sel.method == method]
    if mine.empty:
        raise FileNotFoundError(f"no runs of {method!r} in the aggregated table: add it to "
                                "suite.groups.<group>.methods in params.yaml and `dvc repro` "
                                "(or `g2d train method=... --all-seeds --summary reports/runs`)")
    rows = []
    for ds in sorted(mine.dataset.unique()):
        task_metric = primary_metric("regression" if "rmse" in set(mine[mine.dataset == ds].metric)
                                     else "classification")[0]
        a = mine[(mine.dataset == ds) & (mine.metric == task_metric)].set_index("seed")["value"]
        for other in sorted(sel[(sel.dataset == ds) & (sel.method != method)].method.unique()):
            b = sel[(sel.dataset == ds) & (sel.method == other) & (sel.metric == task_metric)]
            b = b.set_index("seed")["value"]
            seeds = a.index.intersection(b.index)
            t = paired_stats((a[seeds] - b[seeds]).to_numpy())  # = ttest_rel(a, b) on the common seeds
            n = t["n"]
            rows.append({"dataset": ds, "metric": task_metric, "method": method, "vs": other, "n": n,
                         "mean_method": float(a[seeds].mean()) if n else float("nan"),
                         "mean_vs": float(b[seeds].mean()) if n else float("nan"),
                         "diff": t["diff"], "ci_low": t["ci_low"], "ci_high": t["ci_high"], "p_value": t["p_value"]})
    if not rows:
        raise FileNotFoundError(f"{method!r} has no other method to compare with on its datasets "
                                f"({sorted(mine.dataset.unique())}): add baselines to "
                                "suite.groups.<group>.methods in params.yaml")
    df = pd.DataFrame(rows)
    df["p_holm"] = holm(df["p_value"])
    return df


def compare(reports_dir: Path, method: str, selection: str = "best_val") -> list[Path]:
    reports_dir = Path(reports_dir)
    runs_csv = reports_dir / "tables" / "runs.csv"
    if not runs_csv.is_file():
        raise FileNotFoundError(f"{runs_csv} not found: run `g2d aggregate` first")
    runs = pd.read_csv(runs_csv, keep_default_na=False, na_values=[""], dtype={"modality": str})  # as render.py
    df = paired(runs, method, selection)
    out = reports_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"{method}.csv"
    tmp = csv.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(csv)
    df = pd.read_csv(csv)
    standin = set(runs[runs.method == method].source) == {"standin"}
    n_tests = int(df.p_value.notna().sum())
    seeds = sorted({int(n) for n in df.n})
    from g2d.report.render import environments  # render imports the claims, which import the stats

    md, _ = environments()
    text = md.get_template("compare.md.j2").render(
        method=method, rows=df.to_dict("records"), csv=csv.as_posix(), standin=standin,
        selection=selection, selection_text=SELECTIONS[selection], n_tests=n_tests,
        seeds=seeds, min_seeds=MIN_SEEDS, few=min(seeds) < MIN_SEEDS,
        n_raw=int((df.p_value < 0.05).sum()), n_holm=int((df.p_holm < 0.05).sum()))
    if min(seeds) < MIN_SEEDS:
        print(f"[g2d] caution: {method}: {n_tests} paired t-tests on {'/'.join(map(str, seeds))} seed(s) "
              f"(fewer than {MIN_SEEDS}); p < 0.05 in {int((df.p_value < 0.05).sum())} uncorrected, "
              f"{int((df.p_holm < 0.05).sum())} after Holm: read the intervals, not the p-values", file=sys.stderr)
    path = out / f"{method}.md"
    atomic_write_text(path, text)
    return [csv, path]
