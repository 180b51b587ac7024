"""Metric-drift goldens of the CI profile (pytest-regressions). CI never regenerates them.

Tolerance: CPU runs here are bit-deterministic (same seed -> same metrics) on one machine; between machines
the CPU kernels' float rounding differs (g2d pins them to AVX2, g2d/cpu_isa.py, but oneDNN's blocking and MKL
may still vary). Measured between the machine of the previous goldens and an AVX2 one: 1 of the 200 per-run
values changed, by exactly one test sample (100/60 = 1.67 points on the CI profile's 60-sample test split: one
flipped prediction, and 1.43 in that run's F1), and no table cell by more than 0.33. So a run may move by one
test sample (TOL_RUN = 1.75) and a table cell (mean or std over 10 seeds, where one flip moves a mean by 0.17)
by 0.5 (TOL): two changed predictions in one run, or any real change to a method, the data generator or the
trainer (the measured seed spread of the CI profile is several points), still fails. After a deliberate change:
`pytest tests/regression --force-regen`, review the diff, commit the goldens.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

TOL = 0.5
TOL_RUN = 1.75  # one test sample of the CI profile (1.67) plus margin
GOLDEN = Path(__file__).with_suffix("")


def _check(request, num_regression, data: dict, atol: float) -> None:
    """num_regression with the tolerance applied to every value. pytest-regressions writes the obtained table to
    CSV and reads it back, so a whole-number value (25 = 15 of 60 test samples) comes back as an integer
    column and is compared exactly, ignoring the tolerance; here both sides are read as floats. Writing or
    regenerating the goldens (--force-regen, a missing file) stays num_regression's."""
    golden = GOLDEN / f"{request.node.name}.csv"
    if request.config.getoption("force_regen") or not golden.is_file():
        num_regression.check(data, default_tolerance={"atol": atol, "rtol": 0})
        return
    expected = pd.read_csv(golden, index_col=0).iloc[0].astype(float).to_dict()
    assert set(data) == set(expected), (f"keys differ from {golden}: obtained only {sorted(set(data) - set(expected))}, "
                                        f"expected only {sorted(set(expected) - set(data))}")
    far = {k: (float(v[0]), expected[k]) for k, v in data.items()
           if not np.isclose(float(v[0]), expected[k], atol=atol, rtol=0, equal_nan=True)}
    assert not far, (f"{len(far)} values moved by more than {atol} from {golden} (obtained, expected): "
                     + ", ".join(f"{k}: {a:.4f} vs {b:.4f}" for k, (a, b) in sorted(far.items())[:10]))


def _runs(project) -> dict:
    df = pd.read_csv(project / "reports/tables/runs.csv", keep_default_na=False)
    df = df[(df.split == "test") & (df.selection == "best_val")].sort_values(["run", "seed", "metric"])
    return {f"{r.run}|s{r.seed}|{r.metric}": [r.value] for r in df.itertuples()}


def test_per_run_metrics_golden(ci_project, num_regression, request):
    data = _runs(ci_project)
    assert data, "no runs aggregated"
    _check(request, num_regression, data, TOL_RUN)


def test_rendered_table_golden(ci_project, num_regression, request):
    cells = pd.read_csv(ci_project / "reports/tables/cremad.csv")
    cells = cells[cells.n > 0]
    data = {f"{r.row}|{r.metric}|{s}": [float(getattr(r, s))] for r in cells.itertuples() for s in ("mean", "std")}
    _check(request, num_regression, data, TOL)
