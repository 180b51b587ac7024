"""Metric-drift goldens of the CI profile (pytest-regressions). CI never regenerates them.

Tolerance: CPU runs here are bit-deterministic (same seed -> same metrics), so the only noise is
floating-point differences between machines; one test sample is 100/n_test points (1.7 on the CI
profile's 60-sample test split), the measured seed spread of the CI profile is several points. An
absolute tolerance of 0.5 points therefore absorbs float noise yet catches a single changed
prediction: any real change to a method, the data generator or the trainer shows up. After a
deliberate change: `pytest tests/regression --force-regen`, review the diff, commit the goldens.
"""
from __future__ import annotations

import pandas as pd

TOL = 0.5


def _runs(project) -> dict:
    df = pd.read_csv(project / "reports/tables/runs.csv", keep_default_na=False)
    df = df[(df.split == "test") & (df.selection == "best_val")].sort_values(["run", "seed", "metric"])
    return {f"{r.run}|s{r.seed}|{r.metric}": [r.value] for r in df.itertuples()}


def test_per_run_metrics_golden(ci_project, num_regression):
    data = _runs(ci_project)
    assert data, "no runs aggregated"
    num_regression.check({k: v for k, v in data.items()}, default_tolerance={"atol": TOL, "rtol": 0})


def test_rendered_table_golden(ci_project, num_regression):
    cells = pd.read_csv(ci_project / "reports/tables/cremad.csv")
    cells = cells[cells.n > 0]
    data = {f"{r.row}|{r.metric}|{s}": [float(getattr(r, s))] for r in cells.itertuples() for s in ("mean", "std")}
    num_regression.check(data, default_tolerance={"atol": TOL, "rtol": 0})
