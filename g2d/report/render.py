"""Report tables (CSV, the source of truth) -> Markdown and LaTeX via Jinja templates."""
from __future__ import annotations

from pathlib import Path

import jinja2
import pandas as pd

from g2d.data.prepared import atomic_write_text
from g2d.report.tables import build, fmt, table_specs
from g2d.train.metrics import SELECTIONS

TEMPLATES = Path(__file__).parent / "templates"


def _label(dataset: str, metric: str, multi: bool) -> str:
    base, _, mod = metric.partition("_")
    name = {"acc": "acc", "f1": "macro-F1", "mae": "MAE", "rmse": "RMSE", "r2": "R²"}.get(base, base)
    col = f"{mod} {name}" if mod else f"fused {name}"
    return f"{dataset} {col}" if multi else col


def _tex_escape(s) -> str:
    out = str(s)
    for a, b in (("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"), ("$", r"\$")):
        out = out.replace(a, b)
    return out


def environments():
    md = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                            keep_trailing_newline=True, trim_blocks=False)
    tex = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
        block_start_string=r"\BLOCK{", block_end_string="}", variable_start_string=r"\VAR{",
        variable_end_string="}", comment_start_string=r"\#{", comment_end_string="}",
        line_statement_prefix="%%", line_comment_prefix="%#", trim_blocks=True, lstrip_blocks=True,
        autoescape=False)
    tex.filters["tex"] = _tex_escape
    tex.filters["texnum"] = lambda s: str(s).replace("±", r"$\pm$")
    return md, tex


def pivot(cells: pd.DataFrame, multi: bool) -> tuple[list[dict], list[dict]]:
    cols, seen = [], set()
    for ds, metric in zip(cells.dataset, cells.metric):
        if (ds, metric) not in seen:
            seen.add((ds, metric))
            cols.append({"dataset": ds, "metric": metric, "label": _label(ds, metric, multi)})
    rows = []
    for label in dict.fromkeys(cells.row):
        sub = cells[cells.row == label].set_index(["dataset", "metric"])
        rows.append({"label": label, "cells": [sub.loc[(c["dataset"], c["metric"]), "cell"] for c in cols]})
    return cols, rows


def render_table(name: str, spec, summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    cells = build(summary, spec)
    csv = out_dir / "tables" / f"{name}.csv"
    tmp = csv.with_suffix(".csv.tmp")
    cells.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(csv)
    cells = pd.read_csv(csv, keep_default_na=False, na_values=[""])  # render from the file, not memory
    cells["cell"] = [fmt(m, s, int(n)) for m, s, n in zip(cells["mean"], cells["std"], cells["n"])]
    sub = summary[summary.dataset.isin(spec.datasets)]
    sources = sorted(sub.source.unique())
    multi = len(spec.datasets) > 1
    cols, rows = pivot(cells, multi)
    first = spec.metrics[0]
    effect_rows = []
    for label in dict.fromkeys(cells[cells.modality.fillna("") == ""].row):
        row_cells = []
        for rule in SELECTIONS:
            c = build(summary, spec, rule)
            c = c[(c.row == label) & (c.metric == first) & (c.dataset == spec.datasets[0])]
            row_cells.append(c.iloc[0].cell if len(c) else "-")
        effect_rows.append({"label": label, "cells": row_cells})
    ctx = {
        "title": spec.title or name, "description": spec.description, "csv": csv.as_posix(),
        "standin": sources == ["standin"], "sources": ", ".join(sources) or "none",
        "seeds": int(cells.n.max()) if len(cells) else 0, "selection": spec.selection,
        "selection_text": SELECTIONS[spec.selection], "metric_label": "metrics",
        "columns": cols, "rows": rows,
        "effect": {"rules": list(SELECTIONS), "rows": effect_rows} if effect_rows else None,
        "effect_metric": _label(spec.datasets[0], first, multi),
    }
    if len(sources) > 1:
        raise ValueError(f"report {name}: datasets {spec.datasets} mix sources {sources}; never mix them")
    md_env, tex_env = environments()
    paths = []
    for env, tpl, ext in ((md_env, "table.md.j2", "md"), (tex_env, "table.tex.j2", "tex")):
        p = out_dir / (f"{name}.{ext}" if ext == "md" else f"tex/{name}.tex")
        atomic_write_text(p, env.get_template(tpl).render(**ctx))
        paths.append(p)
    return [csv, *paths]


def render_all(cfg, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    summary_path = out_dir / "tables" / "summary.csv"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found: run `g2d aggregate` (or `dvc repro aggregate`) first")
    summary = pd.read_csv(summary_path, keep_default_na=False, na_values=[""])
    summary["modality"] = summary["modality"].fillna("")
    paths = []
    for name, spec in table_specs(cfg.reports).items():
        paths += render_table(name, spec, summary, out_dir)
    return paths
