"""Report building: cells from the tidy tables, pairs' paired gains, paper numbers only for real data."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from g2d.config import Schema
from g2d.report.aggregate import summarise
from g2d.report.compare import paired
from g2d.report.render import render_all
from g2d.report.tables import TableSpec, build, build_pairs, table_specs


def _runs(source="standin") -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for method in ("joint", "g2d", "joint+smp"):
        for seed in (0, 1, 2):
            for metric in ("acc", "acc_audio", "acc_visual"):
                for rule in ("best_val", "best_test", "last"):
                    rows.append({"run": f"{method}-cremad", "method": method, "dataset": "cremad", "modality": "",
                                 "source": source, "seed": seed, "selection": rule, "epoch": 3, "split": "test",
                                 "metric": metric, "value": float(rng.uniform(20, 90)), "git_sha": "x"})
    return pd.DataFrame(rows)


def test_cells_are_seed_means():
    runs = _runs()
    cells = build(summarise(runs), TableSpec(datasets=["cremad"], metrics=["acc", "acc_*"], teachers=False))
    for r in cells.itertuples():
        v = runs[(runs.method == r.method) & (runs.metric == r.metric) & (runs.selection == "best_val")].value
        assert r.mean == pytest.approx(v.mean()) and r.std == pytest.approx(v.std()) and r.n == 3
    assert set(cells.metric) == {"acc", "acc_audio", "acc_visual"}  # acc_* expanded per modality


def test_pairs_gain_is_paired_difference():
    runs = _runs()
    spec = TableSpec(kind="pairs", datasets=["cremad"], pairs=[["joint", "joint+smp"]], metrics=["acc"])
    cells = build_pairs(runs, spec).set_index("metric")
    sel = runs[(runs.selection == "best_val") & (runs.metric == "acc")]
    d = (sel[sel.method == "joint+smp"].set_index("seed").value - sel[sel.method == "joint"].set_index("seed").value)
    assert cells.loc["gain", "mean"] == pytest.approx(d.mean())
    assert cells.loc["gain", "std"] == pytest.approx(d.std())


def test_compare_matches_scipy():
    runs = _runs()
    df = paired(runs, "g2d").set_index("vs")
    sel = runs[(runs.selection == "best_val") & (runs.metric == "acc")]
    a, b = (sel[sel.method == m].set_index("seed").value for m in ("g2d", "joint"))
    assert df.loc["joint", "diff"] == pytest.approx((a - b).mean())
    assert df.loc["joint", "p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    half = stats.t.ppf(0.975, 2) * (a - b).std() / np.sqrt(3)
    assert df.loc["joint", "ci_high"] - df.loc["joint", "ci_low"] == pytest.approx(2 * half)


def test_bad_table_spec_is_named():
    from g2d.config import ConfigError

    with pytest.raises(ConfigError, match="reports.t.selection"):
        table_specs({"t": {"datasets": ["cremad"], "selection": "best"}})
    with pytest.raises(ConfigError, match="reports.t.pairs"):
        table_specs({"t": {"datasets": ["cremad"], "kind": "pairs"}})


@pytest.mark.parametrize("source", ["standin", "real"])
def test_rendered_markdown_equals_csv_and_paper_only_for_real(tmp_path, source):
    from tests.helpers import ROOT

    runs = _runs(source)
    (tmp_path / "tables").mkdir()
    runs.to_csv(tmp_path / "tables/runs.csv", index=False)
    summarise(runs).to_csv(tmp_path / "tables/summary.csv", index=False)
    (tmp_path / "paper_numbers.csv").write_text((ROOT / "reports/paper_numbers.csv").read_text())
    cfg = Schema(reports={"t": {"title": "T", "datasets": ["cremad"], "methods": ["joint", "g2d"],
                                "metrics": ["acc"], "teachers": False}})
    render_all(cfg, tmp_path)
    md = (tmp_path / "t.md").read_text()
    cells = pd.read_csv(tmp_path / "tables/t.csv")
    for r in cells.itertuples():
        assert f"| {r.row} | {r.mean:.2f} ± {r.std:.2f} |" in md
    assert ("Stand-in data" in md) == (source == "standin")
    assert ("g2d (paper) | 85.89" in md) == (source == "real")
    html = (tmp_path / "index.html").read_text()
    assert "<table>" in html and ("Stand-in data" in html) == (source == "standin")


def test_teacher_cells_follow_the_table_columns():
    rows = []
    for mod in ("image", "weather"):
        for metric, v in (("rmse", 0.7), (f"rmse_{mod}", 0.7)):
            rows.append({"run": f"teacher-misme-{mod}", "method": "unimodal", "dataset": "misme", "modality": mod,
                         "source": "standin", "selection": "best_val", "split": "test", "metric": metric,
                         "mean": v, "std": 0.0, "n": 3})
    summary = pd.DataFrame(rows)
    fused_only = build(summary, TableSpec(datasets=["misme"], metrics=["rmse"])).set_index("row")
    assert fused_only.loc["image teacher", "n"] == 3  # no per-modality column: the fused column shows it
    per_mod = build(summary, TableSpec(datasets=["misme"], metrics=["rmse", "rmse_*"]))
    cell = per_mod[(per_mod.row == "image teacher") & (per_mod.metric == "rmse")]
    assert int(cell.n.iloc[0]) == 0  # its own column exists: the fused column stays empty
    own = per_mod[(per_mod.row == "image teacher") & (per_mod.metric == "rmse_image")]
    assert int(own.n.iloc[0]) == 3
