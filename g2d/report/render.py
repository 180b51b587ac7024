"""Report tables (CSV, the source of truth) -> Markdown, LaTeX and one offline HTML page via Jinja."""
from __future__ import annotations

import base64
from pathlib import Path

import jinja2
import pandas as pd

from g2d.data.prepared import atomic_write_text
from g2d.report import claims, plots, recipes
from g2d.report.tables import build, build_pairs, fmt, table_specs
from g2d.train.metrics import SELECTIONS

TEMPLATES = Path(__file__).parent / "templates"
METRIC_NAMES = {"acc": "acc", "f1": "macro-F1", "mae": "MAE", "rmse": "RMSE", "r2": "R²", "probe": "probe"}


def _label(dataset: str, metric: str, multi: bool) -> str:
    base, _, mod = metric.partition("_")
    if base in METRIC_NAMES:
        col = f"{mod} {METRIC_NAMES[base]}" if mod else f"fused {METRIC_NAMES[base]}"
    else:
        col = metric  # pairs tables: without / with / gain
    return f"{dataset} {col}" if multi else col


def _tex_escape(s) -> str:
    out = str(s)
    for a, b in (("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"), ("$", r"\$")):
        out = out.replace(a, b)
    return out


def environments():
    md = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                            keep_trailing_newline=True, autoescape=jinja2.select_autoescape(["html"]))
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


def _write_csv(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    tmp = path.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(path)
    # render from the file, not from memory
    cells = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"modality": str, "row": str})
    cells["modality"] = cells["modality"].fillna("")
    cells["cell"] = [fmt(m, s, int(n), d, k) for m, s, n, d, k in
                     zip(cells["mean"], cells["std"], cells["n"], cells["diverged"], cells["seeds"])]
    return cells


def table_context(name, spec, summary, runs, out_dir: Path, data_source: str = "standin") -> dict:
    cells = build_pairs(runs, spec) if spec.kind == "pairs" else build(summary, spec)
    csv = out_dir / "tables" / f"{name}.csv"
    cells = _write_csv(cells, csv)
    sources = sorted(summary[summary.dataset.isin(spec.datasets)].source.unique())
    if len(sources) > 1:
        raise ValueError(f"report {name}: datasets {spec.datasets} mix sources {sources}; never mix them")
    multi = len(spec.datasets) > 1 or spec.kind == "pairs" and len(spec.datasets) > 1
    cols, rows = pivot(cells, multi)
    effect = None
    if spec.kind == "methods":
        first = spec.metrics[0]
        eff_rows = []
        per_rule = {rule: build(summary, spec, rule) for rule in SELECTIONS}
        for label in dict.fromkeys(cells[cells.modality == ""].row):
            row_cells = []
            for rule in SELECTIONS:
                c = per_rule[rule]
                c = c[(c.row == label) & (c.metric == first) & (c.dataset == spec.datasets[0])]
                row_cells.append(c.iloc[0].cell if len(c) else "-")
            eff_rows.append({"label": label, "cells": row_cells})
        effect = {"rules": list(SELECTIONS), "rows": eff_rows,
                  "metric": _label(spec.datasets[0], first, multi)} if eff_rows else None
    standin = sources == ["standin"] or (not sources and data_source == "standin")
    paper_rows = [] if standin else _paper_rows(spec, cols, out_dir)
    return {
        "paper_rows": paper_rows, "name": name, "title": spec.title or name, "description": spec.description, "csv": csv.as_posix(),
        "standin": sources == ["standin"] or (not sources and data_source == "standin"),
        "sources": ", ".join(sources) or "none (no runs yet)",
        "seeds": int(cells.n.max()) if len(cells) else 0, "selection": spec.selection,
        "selection_text": SELECTIONS[spec.selection], "columns": cols, "rows": rows, "effect": effect,
        "kind": spec.kind,
    }


def _paper_rows(spec, cols: list[dict], out_dir: Path) -> list[dict]:
    """The paper's published numbers in this table's columns (real-data runs only, never stand-ins)."""
    path = out_dir / "paper_numbers.csv"
    if spec.kind != "methods" or not path.is_file():
        return []
    paper = pd.read_csv(path)
    rows = []
    for method in spec.methods or sorted(paper.method.unique()):
        cells, hit = [], False
        for c in cols:
            v = paper[(paper.method == method) & (paper.dataset == c["dataset"]) & (paper.metric == c["metric"])]
            cells.append(f"{v.iloc[0].value:.2f}" if len(v) else "-")
            hit |= bool(len(v))
        if hit:
            rows.append({"label": f"{method} (paper)", "cells": cells})
    return rows


def _figures(datasets: list[str], reports: Path) -> list[dict]:
    figs = []
    for ds in datasets:
        for kind, fn in (("curves", plots.learning_curves), ("smp", plots.smp_timeline)):
            p = fn(reports / "runs", ds, reports / "figures" / f"{kind}-{ds}.png")
            if p is not None:
                title = f"{ds}: learning curves" if kind == "curves" else f"{ds}: SMP timeline"
                figs.append({"title": title, "path": p.relative_to(reports).as_posix(),
                             "data": base64.b64encode(p.read_bytes()).decode()})
    return figs


def _num(x: float, digits: int = 2) -> str:
    return "-" if pd.isna(x) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    return "-" if pd.isna(x) else f"{x:.2g}" if x >= 1e-4 else "<1e-4"


def claims_context(runs: pd.DataFrame, smp: pd.DataFrame | None, selection: str, out_dir: Path,
                   standin: bool, sources: str) -> dict:
    """reports/tables/claims.csv (written, then re-read: the page shows the file) and the template context."""
    df = claims.evaluate(runs, selection, smp)
    csv = out_dir / "tables" / "claims.csv"
    atomic_write_text(csv, df.to_csv(index=False, float_format="%.6g"))
    df = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    df["reason"] = df["reason"].fillna("")
    rows = []
    for r in df.to_dict("records"):
        r.update(mean_a_s=_num(r["mean_a"]), mean_b_s=_num(r["mean_b"]), p_s=_p(r["p_value"]), holm_s=_p(r["p_holm"]),
                 diff_s=f"{r['diff']:+.2f} [{_num(r['ci_low'])}, {_num(r['ci_high'])}]")
        rows.append(r)
    counts = {v: int((df.verdict == v).sum()) for v in ("supported", "contradicted", "inconclusive")}
    return {"rows": rows, "csv": csv.as_posix(), "counts": counts, "selection": selection,
            "selection_text": SELECTIONS[selection], "standin": standin, "sources": sources,
            "contradicted": [f"{r['text']} on {r['dataset']}" for r in rows if r["verdict"] == "contradicted"]}


def smp_order_rows(smp: pd.DataFrame | None, methods: list[str], datasets: list[str]) -> list[dict]:
    """'Which modality SMP trains first' for the SMP methods of a table (tables/smp_order.csv)."""
    if smp is None or smp.empty:
        return []
    sub = smp[smp.method.isin(methods) & smp.dataset.isin(datasets)]
    out = []
    for (ds, m), g in sub.groupby(["dataset", "method"], sort=False):
        g = g.sort_values("share_first", ascending=False)
        out.append({"dataset": ds, "method": m, "n": int(g.n.max()), "epochs": int(g.phase1_epochs.max()),
                    "order": ", ".join(f"{r.modality} {100 * r.share_first:.0f} % (seeds {100 * r.share_min:.0f}-"
                                       f"{100 * r.share_max:.0f} %)" for r in g.itertuples())})
    return out


def render_all(cfg, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    summary_path = out_dir / "tables" / "summary.csv"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found: run `g2d aggregate` (or `dvc repro aggregate`) first")
    read = dict(keep_default_na=False, na_values=[""], dtype={"modality": str})
    summary = pd.read_csv(summary_path, **read)
    runs = pd.read_csv(out_dir / "tables" / "runs.csv", **read)
    for df in (summary, runs):
        df["modality"] = df["modality"].fillna("")
    smp_path = out_dir / "tables" / "smp_order.csv"
    smp = pd.read_csv(smp_path) if smp_path.is_file() else None
    md_env, tex_env = environments()
    paths, contexts = [], []
    for name, spec in table_specs(cfg.reports, cfg.trainer.select).items():
        ctx = table_context(name, spec, summary, runs, out_dir, cfg.data_source)
        methods = spec.methods or sorted(runs.method.unique())
        if spec.kind == "pairs":
            methods = [m for pair in spec.pairs for m in pair]
        ctx["smp_order"] = smp_order_rows(smp, methods, spec.datasets)
        contexts.append(ctx)
        paths.append(Path(ctx["csv"]))
        for env, tpl, p in ((md_env, "table.md.j2", out_dir / f"{name}.md"),
                            (tex_env, "table.tex.j2", out_dir / "tex" / f"{name}.tex")):
            atomic_write_text(p, env.get_template(tpl).render(**ctx))
            paths.append(p)
    datasets = list(dict.fromkeys(ds for spec in table_specs(cfg.reports, cfg.trainer.select).values() for ds in spec.datasets))
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)  # a declared output even when empty
    figs = _figures(datasets, out_dir)
    sources = sorted(runs.source.unique())
    cl = claims_context(runs, smp, cfg.trainer.select, out_dir, sources == ["standin"], ", ".join(sources))
    atomic_write_text(out_dir / "claims.md", md_env.get_template("claims.md.j2").render(**cl))
    paths += [Path(cl["csv"]), out_dir / "claims.md"]
    html = md_env.get_template("index.html.j2").render(
        tables=contexts, figures=figs, standin=all(c["standin"] for c in contexts), claims=cl)
    atomic_write_text(out_dir / "index.html", html)
    paths += [out_dir / f["path"] for f in figs] + [out_dir / "index.html"]
    paths += recipes.write_recipes(cfg, out_dir)  # reports/recipes.md: the paper profile with its sources
    return paths
