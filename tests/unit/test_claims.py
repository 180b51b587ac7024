"""The claims table (g2d/report/claims.py), SMP's first-trained modality (smp_order.py), committed-output hygiene."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from g2d.report import claims, smp_order
from g2d.report.stats import holm
from g2d.train.provenance import committed_view

ROOT = Path(__file__).resolve().parents[2]


def _runs(effects: dict[tuple[str, str], float], n: int = 10, metric: str = "acc", noise: float = 1.0) -> pd.DataFrame:
    """runs.csv rows: method m on dataset d scores base + effect + per-seed noise (seed effect shared)."""
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 3, n)
    rows = []
    for (m, d), eff in effects.items():
        for s in range(n):
            rows.append({"run": f"{m}-{d}", "method": m, "dataset": d, "modality": "", "source": "standin",
                         "seed": s, "selection": "last", "epoch": 19, "split": "test", "metric": metric,
                         "value": 60 + eff + seed_effect[s] + rng.normal(0, noise)})
    return pd.DataFrame(rows)


def test_verdicts_follow_the_paired_test_and_holm():
    runs = _runs({("joint", "cremad"): 0.0, ("g2d", "cremad"): 5.0, ("joint+smp", "cremad"): -5.0,
                  ("g2d-nosmp", "cremad"): 4.9, ("joint", "avmnist"): 0.0, ("g2d", "avmnist"): 0.1})
    df = claims.evaluate(runs, "last").set_index(["claim", "dataset"])
    assert df.loc[("g2d_vs_joint", "cremad"), "verdict"] == "supported"
    assert df.loc[("smp_joint", "cremad"), "verdict"] == "contradicted"
    assert df.loc[("smp_g2d", "cremad"), "verdict"] == "inconclusive"  # +0.1 against noise 1.4 (paired)
    assert "resolution" in df.loc[("smp_g2d", "cremad"), "reason"]
    assert ("smp_umt", "cremad") not in df.index  # no umt runs: no row
    # every cell is the paired test of the two methods' per-seed values, recomputed here independently
    for (key, ds), r in df.iterrows():
        a = runs[(runs.method == r.a) & (runs.dataset == ds)].sort_values("seed").value.to_numpy()
        b = runs[(runs.method == r.b) & (runs.dataset == ds)].sort_values("seed").value.to_numpy()
        t = stats.ttest_rel(a, b)
        half = stats.t.ppf(0.975, len(a) - 1) * np.std(a - b, ddof=1) / np.sqrt(len(a))
        assert r["n"] == 10 and r["diff"] == pytest.approx((a - b).mean()) and r.p_value == pytest.approx(t.pvalue)
        assert r.ci_low == pytest.approx((a - b).mean() - half) and r.mean_a == pytest.approx(a.mean())
    assert np.allclose(df.p_holm.to_numpy(), holm(df.p_value.to_numpy()), equal_nan=True)


def test_lower_is_better_metrics_flip_the_sign():
    runs = _runs({("joint", "misme"): 0.0, ("g2d", "misme"): -5.0}, metric="rmse")
    r = claims.evaluate(runs, "last").set_index(["claim", "dataset"]).loc[("g2d_vs_joint", "misme")]
    assert r.metric == "rmse" and r["diff"] > 4 and r.verdict == "supported"  # lower RMSE = the paper's direction


def _write_summary(folder: Path, method: str, kappas: dict[str, list[float]], seeds=(0, 1)):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"seed": s, "epoch": e, **{f"coef/kappa_{m}": v[e] for m, v in kappas.items()}, "test/acc": 50.0}
            for s in seeds for e in range(len(next(iter(kappas.values()))))]
    pd.DataFrame(rows).to_csv(folder / f"{method}-cremad.csv", index=False)
    (folder / f"{method}-cremad.json").write_text(json.dumps({"run": f"{method}-cremad", "method": method,
                                                               "dataset": "cremad", "modality": None, "seeds": []}))


def test_smp_order_is_the_share_of_phase1_batches(tmp_path):
    # epochs 0-3 phase 1 (one modality trained per batch), epochs 4-5 both trained
    _write_summary(tmp_path / "g2d", "g2d", {"audio": [1, 1, 0.25, 0.5, 1, 1], "visual": [0, 0, 0.75, 0.5, 1, 1]})
    _write_summary(tmp_path / "part", "g2d-partial", {"audio": [1, 1, 1], "visual": [0.3, 0.4, 1]})  # partial
    df = smp_order.per_seed(tmp_path)
    assert set(df.method) == {"g2d"} and set(df.phase1_epochs) == {4}
    share = df[df.seed == 0].set_index("modality").share_first
    assert share["audio"] == pytest.approx((1 + 1 + 0.25 + 0.5) / 4) and share["visual"] == pytest.approx(0.3125)
    out = pd.read_csv(smp_order.write(tmp_path, tmp_path / "o.csv"))
    assert list(out.n) == [2, 2]


def test_committed_view_drops_what_differs_between_identical_runs():
    res = {"seed": 0, "train_time_s": 3.2, "run_dir": "/x", "params_hash": "p1",
           "provenance": {"git_sha": "abc", "source_hash": "s1", "torch": "2"},
           "selection": {"last": {"test": {"acc": 1.0}}}}
    out = committed_view(res)
    assert out == {"seed": 0, "params_hash": "p1", "provenance": {"torch": "2"},
                   "selection": {"last": {"test": {"acc": 1.0}}}}
    assert res["provenance"]["git_sha"] == "abc"  # the run's own record is untouched
    # the stage's own method fingerprint replaces the all-source hashes
    assert committed_view(res, "c0de")["provenance"] == {"torch": "2", "code_hash": "c0de"}


def test_committed_summaries_carry_the_method_fingerprint_dvc_tracks():
    """source_hash/params_hash hash every g2d file (a report edit would change them without staling the
    stage); the summaries carry data/code/<method>.txt's hash instead, so a fresh clone rewrites them."""
    from g2d.codehash import method_hash
    for f in sorted((ROOT / "reports/runs").rglob("*.json"))[:40]:
        s = json.loads(f.read_text())
        want = method_hash(s["method"]).split("\n", 1)[0][:16]
        for r in s["seeds"]:
            assert "source_hash" not in r["provenance"] and "git_sha" not in r["provenance"], f
            assert r["provenance"]["code_hash"] == want, f


def test_committed_claims_table_matches_the_committed_run_summaries():
    """Each cell of reports/tables/claims.csv, recomputed from the per-seed metrics in reports/runs/*.json."""
    table = pd.read_csv(ROOT / "reports/tables/claims.csv")
    per = {}
    for f in (ROOT / "reports/runs").rglob("*.json"):
        s = json.loads(f.read_text())
        if s.get("modality"):
            continue
        for r in s["seeds"]:
            if r.get("diverged"):
                continue
            rule = r["selected_checkpoint"]["rule"]
            vals = {**r["selection"][rule]["test"], **(r.get("diagnostics") or {}).get("test", {})}
            for k, v in vals.items():
                per[(s["method"], s["dataset"], k, r["seed"])] = v
    assert len(table) >= 10
    for r in table.itertuples():
        seeds = sorted(s for (m, d, k, s) in per if (m, d, k) == (r.a, r.dataset, r.metric)
                       and (r.b, d, k, s) in per)
        sign = -1 if r.metric in ("rmse", "mae") else 1
        d = np.array([sign * (per[(r.a, r.dataset, r.metric, s)] - per[(r.b, r.dataset, r.metric, s)]) for s in seeds])
        assert r.n == len(d) and r.diff == pytest.approx(d.mean(), abs=1e-4), r
        if len(d) > 1 and d.std() > 0:
            assert r.p_value == pytest.approx(stats.ttest_1samp(d, 0).pvalue, rel=1e-3, abs=1e-6), r
