"""Report building: cells from the tidy tables, pairs' paired gains, paper numbers only for real data."""
from __future__ import annotations

import math

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
                                 "source": source, "data_split": "ogm_ge", "seed": seed, "selection": rule,
                                 "epoch": 3, "split": "test",
                                 "metric": metric, "value": float(rng.uniform(20, 90)), "git_sha": "x"})
    return pd.DataFrame(rows)


def test_cells_are_seed_means():
    runs = _runs()
    cells = build(summarise(runs), TableSpec(datasets=["cremad"], metrics=["acc", "acc_*"], teachers=False))
    for r in cells.itertuples():
        v = runs[(runs.method == r.method) & (runs.metric == r.metric) & (runs.selection == "best_val")].value
        assert r.mean == pytest.approx(v.mean()) and r.std == pytest.approx(v.std()) and r.n == 3
    assert set(cells.metric) == {"acc", "acc_audio", "acc_visual"}  # acc_* expanded per modality


def test_runs_of_different_split_variants_are_never_tabled_together():
    runs = _runs()
    summarise(runs)
    runs.loc[runs.method == "g2d", "data_split"] = "speaker_folds/1"
    with pytest.raises(ValueError, match=r"cremad: runs on different split variants cannot share a table "
                                         r"\(ogm_ge: joint\+smp-cremad, joint-cremad; speaker_folds/1: g2d-cremad\)"):
        summarise(runs)


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


def _holm_reference(p):
    """Holm by its definition: reject H_(1..k) while p_(j) <= alpha / (m - j + 1); the adjusted p of a test is
    the smallest alpha at which it is rejected, found by scanning the candidate alphas (no shared code)."""
    p = [float(x) for x in p]
    idx = [i for i, x in enumerate(p) if not math.isnan(x)]
    m = len(idx)
    order = sorted(idx, key=lambda i: p[i])
    out = [float("nan")] * len(p)
    candidates = sorted({min(1.0, (m - j) * p[i]) for j, i in enumerate(order)} | {1.0})
    for i in idx:
        for alpha in candidates:
            rejected = set()
            for j, k in enumerate(order):
                if p[k] <= alpha / (m - j) + 1e-15:
                    rejected.add(k)
                else:
                    break
            if i in rejected:
                out[i] = alpha
                break
        else:
            out[i] = 1.0  # not rejected even at alpha = 1: the adjusted p is capped at 1
    return out


@pytest.mark.parametrize("seed", range(5))
def test_holm_matches_definition_on_random_p_values(seed):
    from g2d.report.stats import holm

    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 1, 30) ** 3  # many small ones
    p[rng.choice(30, 3, replace=False)] = np.nan  # untestable (zero variance): not in the family
    p[5] = p[6] if not np.isnan(p[5] + p[6]) else p[5]  # a tie
    got = holm(p)
    want = _holm_reference(p)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.all(np.isnan(got) == np.isnan(p))
    ok = ~np.isnan(p)
    assert np.all(got[ok] >= p[ok]) and np.all(got[ok] <= 1)


def test_holm_small_hand_example():
    from g2d.report.stats import holm

    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, max(0.04, 0.06), max(0.06, 0.06), min(1, 0.5)
    np.testing.assert_allclose(holm([0.03, 0.01, 0.5, 0.02]), [0.06, 0.04, 0.5, 0.06])


def test_compare_report_states_seeds_holm_and_warns(tmp_path, capsys):
    from g2d.report.compare import MIN_SEEDS, compare

    runs = _runs()
    (tmp_path / "tables").mkdir()
    runs.to_csv(tmp_path / "tables/runs.csv", index=False)
    csv, md = compare(tmp_path, "g2d")
    df = pd.read_csv(csv)
    assert list(df.p_holm) == pytest.approx(list(_holm_reference(df.p_value)))
    text = md.read_text()
    assert "| p (Holm) | p (raw) |" in text and f"over the {len(df)} tests" in text
    assert f"rests on 3 paired seed(s), fewer than {MIN_SEEDS}" in text
    assert "caution: g2d: 2 paired t-tests on 3 seed(s)" in capsys.readouterr().err
    for r in df.itertuples():
        assert f"| {r.p_holm:.3f} | {r.p_value:.3f} |" in text


def test_compare_error_names_an_existing_params_key(tmp_path):
    from g2d.report.compare import compare

    (tmp_path / "tables").mkdir()
    _runs().to_csv(tmp_path / "tables/runs.csv", index=False)
    with pytest.raises(FileNotFoundError, match=r"suite\.groups\.<group>\.methods") as e:
        compare(tmp_path, "mla")
    assert "suite.methods " not in str(e.value)


def test_html_turns_code_spans_into_code_and_keeps_numbers_on_one_line(tmp_path):
    from tests.helpers import ROOT

    runs = _runs()
    (tmp_path / "tables").mkdir()
    runs.to_csv(tmp_path / "tables/runs.csv", index=False)
    summarise(runs).to_csv(tmp_path / "tables/summary.csv", index=False)
    (tmp_path / "paper_numbers.csv").write_text((ROOT / "reports/paper_numbers.csv").read_text())
    cfg = Schema(reports={"t": {"title": "T `x`", "datasets": ["cremad"], "methods": ["joint", "g2d"],
                                "description": "`g2d` uses <late> fusion; a lone ` stays", "metrics": ["acc"],
                                "teachers": False}})
    render_all(cfg, tmp_path)
    html = (tmp_path / "index.html").read_text()
    body = html.split("<body>", 1)[1].split("-->", 1)[1]  # past the generator comment
    assert "<p><code>g2d</code> uses &lt;late&gt; fusion; a lone ` stays</p>" in body
    assert "<h2>T <code>x</code></h2>" in body
    assert "td { white-space: nowrap; }" in html
