"""Paired statistics shared by `g2d compare` and the claims table: one implementation of each formula."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def holm(p) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error), in the input order; NaN entries stay NaN and are
    not counted in the family."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def paired(d) -> dict[str, float]:
    """Mean of per-seed differences d, its 95% t-interval and the paired (one-sample) t-test p-value."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if n > 1 and sd > 0 else float("nan")
    return {"n": n, "diff": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "p_value": p}
