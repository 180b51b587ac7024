"""The paper's qualitative claims, each tested on the suite's own runs (reports/claims.md, issue 11).

One row per (claim, dataset): the paired per-seed difference A - B of the claim's metric (sign turned so that
a positive difference is the paper's direction; RMSE is lower-better), its mean, 95% t-interval and paired
t-test p-value, Holm-adjusted over every row of the table. Verdict: *supported* when the difference is in the
paper's direction with Holm p < 0.05, *contradicted* when it is against it with Holm p < 0.05, otherwise
*inconclusive* (with the interval's half-width as the suite's resolution for that comparison). The verdicts
are whatever the runs say; the claims list is fixed from the paper (G2D, arXiv 2506.21514: §4.2 Tables 1-3,
§4.3 Table 4 and Fig. 4, §4.4 Tables 5-6) before any run, and nothing here looks at the result to choose it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from g2d.report.stats import holm, paired

ALPHA = 0.05


@dataclass(frozen=True)
class Claim:
    key: str
    text: str  # the paper's claim, for the row label
    a: str  # method expected to be better
    b: str  # method it is compared with
    datasets: tuple[str, ...] = ()  # () = every dataset on which both ran
    metric: str = ""  # "" = the dataset's primary metric (acc, or rmse for regression)
    source: str = ""  # where the paper makes it


CLAIMS = (
    Claim("g2d_vs_joint", "G2D > Joint-Train", "g2d", "joint", source="Tables 1-3"),
    Claim("smp_joint", "SMP improves Joint-Train", "joint+smp", "joint", ("cremad",), source="Table 4"),
    Claim("smp_umt", "SMP improves UMT", "umt+smp", "umt", ("cremad",), source="Table 4"),
    Claim("smp_g2d", "SMP improves the G2D loss", "g2d", "g2d-nosmp", ("cremad",), source="Table 4"),
    Claim("complete_vs_partial", "Complete > partial suppression", "g2d", "g2d-partial", source="Table 6"),
    Claim("weak_head", "G2D restores the weak (visual) head", "g2d", "joint", ("cremad",), "acc_visual",
          source="Fig. 1, Fig. 4"),
    Claim("weak_probe", "G2D restores the weak (visual) encoder (linear probe)", "g2d", "joint", ("cremad",),
          "probe_visual", source="Fig. 1 (read with a probe)"),
    *(Claim(f"late_vs_{f}", f"Late fusion > {f} fusion", "g2d", f"g2d+{f}", ("cremad",), source="Table 5")
      for f in ("concat", "sum", "film", "gated")),
)

COLUMNS = ["claim", "text", "source", "dataset", "metric", "a", "b", "n", "mean_a", "mean_b", "diff", "ci_low",
           "ci_high", "p_value", "p_holm", "verdict", "reason"]


def _series(sel: pd.DataFrame, method: str, dataset: str, metric: str) -> pd.Series:
    s = sel[(sel.method == method) & (sel.dataset == dataset) & (sel.metric == metric)]
    return s.set_index("seed")["value"].astype(float)


def _primary(sel: pd.DataFrame, dataset: str) -> str:
    return "rmse" if "rmse" in set(sel[sel.dataset == dataset].metric) else "acc"


def _lower_better(metric: str, primary: str) -> bool:
    """RMSE / MAE (and a regression probe, which reports RMSE) are better when lower."""
    return metric.split("_")[0] in ("rmse", "mae") or (metric.startswith("probe_") and primary == "rmse")


def _smp_note(smp: pd.DataFrame | None, method: str, dataset: str) -> str:
    """'SMP trains audio first in 100 % of phase-1 batches' for an SMP method, from tables/smp_order.csv."""
    if smp is None or smp.empty:
        return ""
    rows = smp[(smp.method == method) & (smp.dataset == dataset)]
    if rows.empty:
        return ""
    top = rows.sort_values("share_first", ascending=False).iloc[0]
    return f"{method} trains {top.modality} first in {100 * top.share_first:.0f} % of phase-1 batches"


def evaluate(runs: pd.DataFrame, selection: str, smp: pd.DataFrame | None = None) -> pd.DataFrame:
    """The claims table from runs.csv rows (students only, test split, one selection rule)."""
    sel = runs[(runs.selection == selection) & (runs.split == "test") & (runs.modality.fillna("") == "")]
    rows = []
    for c in CLAIMS:
        have = set(sel[sel.method == c.a].dataset) & set(sel[sel.method == c.b].dataset)
        for ds in [d for d in (c.datasets or sorted(have)) if d in have]:
            metric = c.metric or _primary(sel, ds)
            a, b = _series(sel, c.a, ds, metric), _series(sel, c.b, ds, metric)
            seeds = a.index.intersection(b.index)
            if not len(seeds):
                continue
            sign = -1.0 if _lower_better(metric, _primary(sel, ds)) else 1.0
            t = paired(sign * (a[seeds] - b[seeds]).to_numpy())
            rows.append({"claim": c.key, "text": c.text, "source": c.source, "dataset": ds, "metric": metric,
                         "a": c.a, "b": c.b, "n": t["n"], "mean_a": float(a[seeds].mean()),
                         "mean_b": float(b[seeds].mean()), "diff": t["diff"], "ci_low": t["ci_low"],
                         "ci_high": t["ci_high"], "p_value": t["p_value"]})
    df = pd.DataFrame(rows, columns=COLUMNS[:14])
    df["p_holm"] = holm(df["p_value"]) if len(df) else []
    verdicts, reasons = [], []
    for r in df.itertuples():
        significant = bool(np.isfinite(r.p_holm) and r.p_holm < ALPHA)
        v = ("supported" if r.diff > 0 else "contradicted") if significant else "inconclusive"
        why = []
        if v == "inconclusive":
            half = (r.ci_high - r.ci_low) / 2
            if not np.isfinite(half):
                why.append(f"too few seeds (n = {r.n})")
            elif abs(r.diff) <= half:
                why.append(f"|diff| {abs(r.diff):.2f} within the suite's resolution (±{half:.2f} at n = {r.n})")
            else:
                why.append(f"p {r.p_value:.2g} before, {r.p_holm:.2g} after Holm over {len(df)} rows "
                           f"(resolution ±{half:.2f} at n = {r.n})")
        notes = [_smp_note(smp, m, r.dataset) for m in (r.a, r.b)]
        why += [notes[0] or notes[1]] if any(notes) else []  # b's order only where a is no SMP method
        verdicts.append(v)
        reasons.append("; ".join(why))
    df["verdict"] = verdicts
    df["reason"] = reasons
    return df[COLUMNS]
