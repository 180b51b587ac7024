"""Report table specs (params.yaml `reports:`) -> tidy cell tables built from summary.csv."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from omegaconf import OmegaConf

from g2d.config import ConfigError
from g2d.train.metrics import SELECTIONS


@dataclass
class TableSpec:
    title: str = ""
    datasets: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)  # rows; empty = every method run on these datasets
    metrics: list[str] = field(default_factory=lambda: ["acc"])  # columns, e.g. acc, acc_audio, f1
    teachers: bool = True  # add unimodal-teacher rows
    selection: str = ""  # "" = trainer.select, the epoch the runs keep (and their probes read)
    description: str = ""
    kind: str = "methods"  # methods: rows = methods | pairs: rows = (without, with) pairs and their gain
    pairs: list[list[str]] = field(default_factory=list)  # kind=pairs: [[without, with], ...]
    pair_labels: list[str] = field(default_factory=lambda: ["without", "with", "gain"])


def table_specs(reports: dict, default_selection: str = "best_val") -> dict[str, TableSpec]:
    out = {}
    for name, block in (reports or {}).items():
        try:
            spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TableSpec), block or {}))
        except Exception as e:  # omegaconf raises several types; name the key either way
            raise ConfigError(f"params.yaml: reports.{name}: {str(e).splitlines()[0]}") from None
        if spec.kind not in ("methods", "pairs"):
            raise ConfigError(f"params.yaml: reports.{name}.kind {spec.kind!r} not in (methods, pairs)")
        if spec.kind == "pairs" and (not spec.pairs or any(len(p) != 2 for p in spec.pairs)):
            raise ConfigError(f"params.yaml: reports.{name}.pairs must list [without, with] method pairs")
        spec.selection = spec.selection or default_selection
        if spec.selection not in SELECTIONS:
            raise ConfigError(f"params.yaml: reports.{name}.selection {spec.selection!r} not in {list(SELECTIONS)}")
        out[name] = spec
    return out


CELL_COLUMNS = ["row", "method", "modality", "dataset", "metric", "mean", "std", "n", "diverged", "seeds", "cell"]


def fmt(mean: float, std: float, n: int, diverged: int = 0, seeds: int = 0) -> str:
    """One formatting rule for every output (md, tex, html) so they round identically. Diverged seeds are
    left out of mean/std and counted: `71.20 ± 1.30 (1/3 diverged)`, `diverged (3/3)`."""
    diverged = 0 if pd.isna(diverged) else int(diverged)
    seeds = max(0 if pd.isna(seeds) else int(seeds), diverged)
    if pd.isna(mean):
        return f"diverged ({diverged}/{seeds})" if diverged else "-"
    cell = f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"
    return f"{cell} ({diverged}/{seeds} diverged)" if diverged else cell


def expand_metrics(metrics: list[str], dataset: str) -> list[str]:
    """`acc_*` -> one column per modality of the dataset (acc_audio, acc_visual, ...)."""
    from g2d import registry

    out = []
    for m in metrics:
        if m.endswith("_*"):
            out += [f"{m[:-2]}_{mod}" for mod in registry.get_dataset(dataset).spec.modality_names]
        else:
            out.append(m)
    return out


def build(summary: pd.DataFrame, spec: TableSpec, selection: str | None = None) -> pd.DataFrame:
    """Long table of cells: row label, method, modality, dataset, metric, mean, std, n, cell.

    Teacher rows fill only their own modality's columns (acc_<m>, f1_<m>), or the fused columns of a table
    without per-modality columns; other cells are '-'.
    """
    sel = summary[(summary.selection == (selection or spec.selection or "best_val")) & (summary.split == "test")
                  & summary.dataset.isin(spec.datasets)]
    counts: dict[tuple, tuple[int, int]] = {}  # (method, modality, dataset) -> (diverged, seeds)
    if "diverged" in summary.columns:
        for r in summary[summary.dataset.isin(spec.datasets)].itertuples():
            counts[(r.method, r.modality if isinstance(r.modality, str) else "", r.dataset)] = (
                int(r.diverged), int(r.seeds))
    methods = spec.methods or sorted(sel[sel.modality.fillna("") == ""].method.unique())
    labels = [(m, "") for m in methods]
    if spec.teachers:
        labels = [("unimodal", mod) for mod in sorted(sel[sel.modality.fillna("") != ""].modality.unique())] + labels
    rows = []
    for method, mod in labels:
        for ds in spec.datasets:
            metrics = expand_metrics(spec.metrics, ds)
            for metric in metrics:
                hit = sel[(sel.method == method) & (sel.modality.fillna("") == mod) & (sel.dataset == ds)
                          & (sel.metric == metric)]
                # a teacher fills its own modality's column; where the table has none (e.g. MIS-ME's fused
                # MAE/RMSE only), its single-modality prediction fills the fused column
                own_col = any(m.endswith(f"_{mod}") for m in metrics) or "_" in metric
                if mod and not metric.endswith(f"_{mod}") and own_col:
                    hit = hit.iloc[0:0]
                if len(hit) > 1:
                    raise ValueError(f"duplicate summary rows for {method}/{mod}/{ds}/{metric}")
                if len(hit):
                    r = hit.iloc[0]
                    mean, std, n = float(r["mean"]), float(r["std"]), int(r["n"])
                else:
                    mean, std, n = float("nan"), float("nan"), 0
                d, k = counts.get((method, mod, ds), (0, 0))
                if mod and not metric.endswith(f"_{mod}") and own_col:
                    d = 0  # a teacher's '-' cell outside its own column
                rows.append({"row": f"{mod} teacher" if mod else method, "method": method, "modality": mod,
                             "dataset": ds, "metric": metric, "mean": mean, "std": std, "n": n,
                             "diverged": d, "seeds": k, "cell": fmt(mean, std, n, d, k)})
    return pd.DataFrame(rows, columns=CELL_COLUMNS)


def build_pairs(runs: pd.DataFrame, spec: TableSpec, selection: str | None = None) -> pd.DataFrame:
    """Rows = pairs; columns without / with / gain, gain = mean +- std of the per-seed paired difference."""
    sel = runs[(runs.selection == (selection or spec.selection or "best_val")) & (runs.split == "test")
               & (runs.modality.fillna("") == "")]
    rows = []
    metric = spec.metrics[0]
    for without, with_ in spec.pairs:
        for ds in spec.datasets:
            vals = {}
            for m in (without, with_):
                v = sel[(sel.method == m) & (sel.dataset == ds) & (sel.metric == metric)]
                vals[m] = v.set_index("seed")["value"]
            cells = []
            for label, series in ((spec.pair_labels[0], vals[without]), (spec.pair_labels[1], vals[with_])):
                cells.append((label, series))
            common = vals[without].index.intersection(vals[with_].index)
            cells.append((spec.pair_labels[2], vals[with_][common] - vals[without][common]))
            for label, series in cells:
                n = len(series)
                mean = float(series.mean()) if n else float("nan")
                std = float(series.std()) if n > 1 else (0.0 if n else float("nan"))
                rows.append({"row": f"{without} / {with_}", "method": with_, "modality": "", "dataset": ds,
                             "metric": label, "mean": mean, "std": std, "n": n, "diverged": 0, "seeds": n,
                             "cell": fmt(mean, std, n)})
    return pd.DataFrame(rows, columns=CELL_COLUMNS)
