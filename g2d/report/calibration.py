"""reports/calibration.md from the suite's own runs: how the stand-ins compare with the real data's properties.

Written by `g2d calibrate` (the `calibrate` DVC stage) from what `dvc repro` trained, so the calibration shown
is the one behind every table (not a separate run). Per dataset, method-agnostic figures only (unimodal
teachers and Joint-Train; no imbalance method is used to judge a stand-in):
- teachers and Joint-Train (fused, heads, linear probes) against the published figures (g2d.calibrate.TARGETS),
  the Figure-1 imbalance checks, and "Joint-Train below the best teacher" (real CREMA-D: 67.5 vs 76.5);
- the Bayes ceilings of the generator (g2d.bayes: no training), against the best teacher;
- the teachers' train-batch confidence rho with and without the train-time augmentation (what SMP ranks on,
  G2D Eq. 8), so the order SMP trains the modalities in, and its cause, can be read off;
- power: for every claim row (reports/tables/claims.csv), seeds, seed std of both methods, the std of the
  paired difference and the 95% interval's half-width (the suite's resolution for that comparison).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from g2d import config as C
from g2d import registry
from g2d.calibrate import NOTES, TARGETS, imbalance_checks
from g2d.data.prepared import atomic_write_text

TEACHER_TOL = 5.0  # points: a teacher "meets" its published figure within this
HEADROOM = 10.0  # points: the Bayes ceiling must exceed the best teacher by at least this


def _metric(task: str) -> str:
    return "acc" if task == "classification" else "r2"


def _vals(sel: pd.DataFrame, method: str, modality: str, dataset: str, metric: str) -> np.ndarray:
    s = sel[(sel.method == method) & (sel.modality == modality) & (sel.dataset == dataset) & (sel.metric == metric)]
    return s.sort_values("seed")["value"].to_numpy(dtype=float)


def dataset_rows(runs: pd.DataFrame, name: str, selection: str) -> pd.DataFrame:
    """One row per (role, modality): the shape g2d.calibrate.imbalance_checks reads, plus probes and rho."""
    spec = registry.get_dataset(name).spec
    metric = _metric(spec.task)
    test = runs[(runs.selection == selection) & (runs.split == "test")]
    train = runs[(runs.selection == selection) & (runs.split == "train")]
    tgt = TARGETS.get(name, {})
    rows = []

    def add(role, mod, v, probe=np.array([]), rho=np.array([]), rho_aug=np.array([])):
        rows.append({"dataset": name, "role": role, "modality": mod, "metric": metric, "n_seeds": len(v),
                     "mean": float(v.mean()) if len(v) else float("nan"),
                     "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                     "target": tgt.get(role, {}).get(mod, float("nan")),
                     "probe": float(probe.mean()) if len(probe) else float("nan"),
                     "rho": float(rho.mean()) if len(rho) else float("nan"),
                     "rho_aug": float(rho_aug.mean()) if len(rho_aug) else float("nan")})

    for m in spec.modality_names:
        add("teacher", m, _vals(test, "unimodal", m, name, metric), _vals(test, "unimodal", m, name, f"probe_{m}"),
            _vals(train, "unimodal", m, name, "conf_train"), _vals(train, "unimodal", m, name, "conf_train_aug"))
    add("joint", "fused", _vals(test, "joint", "", name, metric))
    for m in spec.modality_names:
        add("joint", m, _vals(test, "joint", "", name, f"{metric}_{m}"), _vals(test, "joint", "", name, f"probe_{m}"))
    return pd.DataFrame(rows)


def power_rows(claims: pd.DataFrame, runs: pd.DataFrame, name: str, selection: str) -> list[dict]:
    from scipy import stats

    test = runs[(runs.selection == selection) & (runs.split == "test") & (runs.modality == "")]
    out = []
    for r in claims[claims.dataset == name].itertuples():
        sd_a = _vals(test, r.a, "", name, r.metric).std(ddof=1) if r.n > 1 else float("nan")
        sd_b = _vals(test, r.b, "", name, r.metric).std(ddof=1) if r.n > 1 else float("nan")
        half = (r.ci_high - r.ci_low) / 2
        sd_d = half * math.sqrt(r.n) / stats.t.ppf(0.975, r.n - 1) if r.n > 1 else float("nan")
        out.append({"claim": f"{r.text}: {r.a} vs {r.b}", "metric": r.metric, "n": int(r.n), "sd_a": sd_a,
                    "sd_b": sd_b, "sd_diff": sd_d, "half": half, "ok": bool(np.isfinite(half) and half <= 2.5)})
    return out


def _f(x: float, d: int = 1) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.{d}f}"


def _order(rows: pd.DataFrame, key: str) -> str:
    t = rows[(rows.role == "teacher")].dropna(subset=[key]).sort_values(key)
    return " < ".join(f"{r.modality} {r[key]:.3f}" for _, r in t.iterrows()) if len(t) else "-"


def render(cfg, reports: Path) -> tuple[str, pd.DataFrame]:
    tables = reports / "tables"
    read = dict(keep_default_na=False, na_values=[""], dtype={"modality": str})
    runs = pd.read_csv(tables / "runs.csv", **read)
    runs["modality"] = runs["modality"].fillna("")
    claims_path = tables / "claims.csv"
    claims = pd.read_csv(claims_path, keep_default_na=False, na_values=[""]) if claims_path.is_file() else None
    selection = cfg.trainer.select
    from g2d.bayes import ceilings

    intro = ["<!-- generated by `g2d calibrate` from reports/tables/runs.csv and claims.csv; do not edit -->",
             "# Stand-in calibration", "",
             "**These are generated stand-ins, not the real datasets.** Each embedded dataset is synthesised by "
             "`g2d/data/standin.py` with per-modality informativeness and learnability knobs, calibrated "
             "method-agnostically against published unimodal-teacher and Joint-Train figures and properties of "
             "the real pipeline (no imbalance method's result is used). Every figure below comes from the "
             f"suite's own runs (`dvc repro`), test split, selection rule **{selection}**, mean over seeds; "
             "targets are the published numbers (real data, official protocol), so only their order of "
             "magnitude and the imbalance pattern are comparable.", "",
             "- **Bayes ceiling**: accuracy of the Bayes classifier given the generator's latent codes "
             "(`g2d/bayes.py`, no training); rendering only adds noise, so it bounds what any model can reach.",
             "- **rho**: a teacher's mean softmax probability of the true class on the train split, on the "
             "evaluation inputs and on the train-time augmented ones. SMP ranks the teachers by rho on the "
             "augmented training batches and trains the least confident modality first (G2D Eq. 8).",
             "- **Power**: per claim (reports/claims.md), the 95% interval half-width of the paired per-seed "
             "difference; the target is <= 2.5 points.", ""]
    lines: list[str] = []
    summary = []
    all_rows = []
    for name in [d for d in cfg.suite.datasets if not registry.get_dataset(d).view_of]:
        ds = registry.get_dataset(name)(C.dataset_config(cfg, name))
        rows = dataset_rows(runs, name, selection)
        if rows[rows.role == "teacher"]["n_seeds"].max() == 0:
            continue
        all_rows.append(rows)
        metric = rows.metric.iloc[0]
        t = TARGETS.get(name, {})
        ceil = ceilings(ds)
        teach = rows[rows.role == "teacher"].set_index("modality")
        joint = rows[rows.role == "joint"].set_index("modality")
        best = teach["mean"].max()
        checks = dict(imbalance_checks(rows, name)) if name in TARGETS else {}
        for m, r in teach.iterrows():
            if np.isfinite(r.target):
                checks[f"{m} teacher within {TEACHER_TOL:.0f} of {r.target}"] = bool(abs(r["mean"] - r.target)
                                                                                     <= TEACHER_TOL)
        if metric == "acc":
            checks["Joint-Train fused below the best teacher"] = bool(joint.loc["fused", "mean"] < best)
            checks[f"Bayes ceiling >= best teacher + {HEADROOM:.0f}"] = bool(ceil["all"] >= best + HEADROOM)
        pw = power_rows(claims, runs, name, selection) if claims is not None else []
        summary.append({"dataset": name, "met": sum(checks.values()), "of": len(checks),
                        "ceiling": ceil["all"], "best": best, "rho": _order(rows, "rho"),
                        "rho_aug": _order(rows, "rho_aug"),
                        "power": f"{sum(p['ok'] for p in pw)}/{len(pw)}" if pw else "-"})
        fmt = (lambda x: _f(x, 1)) if metric == "acc" else (lambda x: _f(x, 3))
        lines += [f"## {name}", "", f"Metric: test {'accuracy (%)' if metric == 'acc' else 'R^2'}. Target source: "
                  f"{t.get('source', '-')}. Expected imbalance: **{t.get('dominant', '-')}** dominant under "
                  f"Joint-Train; weak: {', '.join(t.get('weak', [])) or '-'}.", "",
                  "| run | head | ours (mean ± std) | seeds | target | linear probe | rho | rho (augmented) |",
                  "|---|---|---|---:|---|---|---|---|"]
        for _, r in rows.iterrows():
            lines.append(f"| {'teacher' if r.role == 'teacher' else 'Joint-Train'} | {r.modality} | {fmt(r['mean'])} ± "
                         f"{fmt(r['std'])} | {r.n_seeds} | {fmt(r.target)} | {fmt(r.probe)} | {_f(r.rho, 3)} | "
                         f"{_f(r.rho_aug, 3)} |")
        unit = "%" if metric == "acc" else "RMSE of the standardised target"
        lines += ["", f"Bayes ceiling ({unit}): " + ", ".join(f"{k} {_f(v, 1 if metric == 'acc' else 3)}"
                                                            for k, v in ceil.items()) + ".", ""]
        if metric == "acc":
            lines += [f"Teachers' train-batch confidence, least confident (trained first by SMP) first: without "
                      f"augmentation {_order(rows, 'rho')}; with it {_order(rows, 'rho_aug')}.", ""]
        lines += ["Checks: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()) + ".", ""]
        if pw:
            lines += ["Power (claims on this dataset):", "",
                      "| comparison | metric | seeds | seed std A | seed std B | std of paired diff | 95% half-width | <= 2.5 |",
                      "|---|---|---:|---:|---:|---:|---:|---|"]
            lines += [f"| {p['claim']} | {p['metric']} | {p['n']} | {_f(p['sd_a'], 2)} | {_f(p['sd_b'], 2)} | "
                      f"{_f(p['sd_diff'], 2)} | {_f(p['half'], 2)} | {'yes' if p['ok'] else 'NO'} |" for p in pw]
            lines.append("")
        if name in NOTES:
            lines += [f"Note: {NOTES[name]}", ""]
        sc = ds.config.standin
        aug = (cfg.datasets.get(name) or {}).get("augment") or {}
        lines += [f"Stand-in: n_train {sc.n_train}, n_val {sc.n_val or 'carved from train'}, n_test {sc.n_test}, "
                  f"pairs {sc.pairs}; train-time augmentation overrides: {dict(aug) or 'none (declared recipes)'}; "
                  "knobs:", "",
                  "| modality | shape | code | pair_code | bits | pair_signal | flip | noise | amplitude | pixel_noise "
                  "| density | motif | active_steps | factors |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, k in sc.modalities.items():
            lines.append(f"| {m} | {k.shape} | {k.code} | {k.pair_code or '='} | {k.bits or 'auto'} | {k.pair_signal} "
                         f"| {k.flip} | {k.noise} | {k.amplitude} | {k.pixel_noise} | {k.density} | {k.motif} | "
                         f"{k.active_steps} | {k.factors or 'all'} |")
        lines.append("")
    tr = C.trainer_config(cfg, cfg.dataset)
    head = ["## Summary", "", f"Trainer: {tr.optimizer} lr {tr.lr}, batch {tr.batch_size}, {tr.epochs} epochs, LR x "
            f"{tr.lr_gamma} at epoch {tr.lr_step_epochs}, selection {tr.select}; {len(cfg.suite.seeds)} seeds; "
            f"model ResNet width {cfg.model.resnet.width}.", "",
            "| dataset | checks met | Bayes ceiling (all) | best teacher | rho order (no aug) | rho order (aug) | "
            "claims with half-width <= 2.5 |", "|---|---|---|---|---|---|---|"]
    head += [f"| {s['dataset']} | {s['met']}/{s['of']} | {_f(s['ceiling'], 1 if s['ceiling'] > 1 else 3)} | "
             f"{_f(s['best'], 1 if s['best'] > 1 else 3)} | {s['rho']} | {s['rho_aug']} | {s['power']} |"
             for s in summary]
    text = "\n".join(intro + head + [""] + lines) + "\n"
    return text, pd.concat(all_rows, ignore_index=True) if all_rows else pd.DataFrame()


def write(cfg, reports: Path) -> list[Path]:
    reports = Path(reports)
    text, table = render(cfg, reports)
    md, csv = reports / "calibration.md", reports / "tables" / "calibration.csv"
    atomic_write_text(md, text)
    atomic_write_text(csv, table.to_csv(index=False, float_format="%.6g"))
    return [md, csv]
