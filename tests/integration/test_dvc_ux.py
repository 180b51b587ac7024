"""DVC's own views of the project stay usable (issue 16, items 4-6).

- params.yaml is in the layout DVC's params writer (`dvc exp run -S`: dvc.utils.hydra.apply_overrides, a
  ruamel.yaml round trip) keeps byte for byte, so one `-S` value is a one-line diff;
- `dvc plots show` writes a page that loads Vega from the inlined, vendored builds (no CDN), one chart per
  (group, dataset) with its own title;
- reports/metrics/<method>.json (`dvc metrics show`, `dvc exp show`) have `<dataset>/<metric>` keys
  whose values are the summary.csv means.

If the round-trip tests fail after an edit of params.yaml, let DVC's writer lay it out (twice: the first pass
may move a comment), then check the diff (`git diff params.yaml`) and put back any comment or blank line it
dropped somewhere it keeps them (not right after a block list):

    python -c 'from dvc.utils.hydra import apply_overrides as a; a("params.yaml", []); a("params.yaml", [])'
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.pipeline_project import ROOT, run

PLOTS_DIR = ROOT / ".dvc" / "plots"


def _apply(path: Path, overrides: list[str]) -> None:
    """What `dvc exp run -S <overrides>` does to params.yaml (dvc/repo/experiments/queue/base.py)."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(str(path), overrides)


def _changed(a: str, b: str) -> list[str]:
    return [li for li in difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=0)
            if li[:1] in "+-" and not li.startswith(("+++", "---"))]


# ---- item 6: params.yaml survives DVC's writer ----------------------------------------------------------

def test_params_yaml_round_trips_unchanged(tmp_path):
    copy = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", copy)
    _apply(copy, [])
    before, after = (ROOT / "params.yaml").read_text(), copy.read_text()
    assert after == before, (
        "DVC's params writer (dvc exp run -S) would reformat params.yaml:\n" + "\n".join(_changed(before, after)[:40])
        + "\n(see this file's docstring for how to lay it out)")


def test_one_set_param_changes_one_line(tmp_path):
    copy = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", copy)
    _apply(copy, ["trainer.epochs=5"])
    before, after = (ROOT / "params.yaml").read_text(), copy.read_text()
    diff = _changed(before, after)
    assert len(diff) == 2, "one `-S trainer.epochs=5` changed more than one line:\n" + "\n".join(diff[:40])
    assert diff[0].startswith("-  epochs: ") and diff[1] == "+  epochs: 5", diff
    expected = yaml.safe_load(before)
    expected["trainer"]["epochs"] = 5
    assert yaml.safe_load(after) == expected


def _leaves(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_every_number_or_flag_is_a_one_line_set_param(tmp_path):
    """Any numeric or boolean value (not only trainer.epochs): e.g. one inside a `{...}` map that the writer
    would re-wrap if the map were longer than a line."""
    text = (ROOT / "params.yaml").read_text()
    bad, tried = [], 0
    for key, value in _leaves(yaml.safe_load(text)):
        if not re.fullmatch(r"[\w.-]+", key):  # `umt+smp`: Hydra's override grammar has no `+` in keys
            continue
        if isinstance(value, bool):
            new = str(not value).lower()
        elif isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
            new = repr(value + 1)
        else:
            continue
        copy = tmp_path / "p.yaml"
        copy.write_text(text)
        _apply(copy, [f"{key}={new}"])
        tried += 1
        diff = _changed(text, copy.read_text())
        if len(diff) != 2:
            bad.append(f"{key}={new}: {diff[:6]}")
    assert tried > 50
    assert not bad, "these `-S` changes rewrite more than their own line:\n" + "\n".join(bad)


# ---- item 4: plots --------------------------------------------------------------------------------------

def _plot_defs(dvc_yaml: Path) -> dict[str, dict]:
    return {k: v for d in yaml.safe_load(dvc_yaml.read_text())["plots"] for k, v in d.items()}


def _expected_plots(params: dict) -> dict[str, set[str]]:
    """plot id -> its data files: a chart per (group, dataset), a line per method, and the dataset's teachers
    in the first chart of the dataset (views use their parent's teachers, shown in the parent's chart)."""
    from g2d import registry

    out, seen = {}, set()
    for g, group in params["suite"]["groups"].items():
        for ds in group["datasets"]:
            files = {f"reports/runs/{g}/{m}/{m}-{ds}.csv" for m in group["methods"]}
            cls = registry.get_dataset(ds)
            if not cls.view_of and ds not in seen:
                seen.add(ds)
                files |= {f"reports/runs/teachers/{ds}/teacher-{ds}-{mod}.csv" for mod in cls.spec.modality_names}
            out[f"{g}/{ds}"] = files
    return out


def test_plot_definitions_cover_the_suite():
    from g2d import registry

    defs = _plot_defs(ROOT / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    expected = _expected_plots(params)
    assert {k: set(v["y"]) for k, v in defs.items()} == expected, \
        "dvc.yaml `plots:` is out of step with params.yaml `suite.groups`"
    titles = [d["title"] for d in defs.values()]
    assert all(t.strip() for t in titles) and len(set(titles)) == len(titles), titles
    for pid, d in defs.items():
        ds = pid.split("/", 1)[1]
        metric = "test/rmse" if registry.get_dataset(ds).spec.task == "regression" else "test/acc"
        assert set(d["y"].values()) == {metric}, pid
        assert d["template"] == "g2d_curves" and d["x"] == "epoch" and d.get("x_label") and d.get("y_label"), pid
        assert (PLOTS_DIR / f"{d['template']}.json").is_file()


def test_offline_page_inlines_the_vendored_builds():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        assert repo.config.get("plots", {}).get("html_template") == "plots/offline.html"
    page = (PLOTS_DIR / "offline.html").read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page  # {scripts} would bring DVC's CDN <script> tags
    versions = json.loads((PLOTS_DIR / "vendor" / "versions.json").read_text())
    assert list(versions) == ["vega", "vega-lite", "vega-embed"]
    blocks = re.findall(r"<script>/\* ([\w-]+)@([\d.]+) build/[\w.-]+ \(BSD-3-Clause\) \*/\n(.*?)\n</script>", page,
                        flags=re.S)
    assert [(n, v) for n, v, _ in blocks] == [(n, versions[n]["version"]) for n in versions]
    for name, _, js in blocks:
        assert hashlib.sha256(js.encode()).hexdigest() == versions[name]["sha256"], f"{name}: not the npm build"
        licence = (PLOTS_DIR / "vendor" / f"{name}.LICENSE").read_text()
        assert "University of Washington Interactive Data Lab" in licence and "Redistribution" in licence
    assert not re.search(r"<script[^>]*\bsrc=", page)


def _specs(html: str) -> list[dict]:
    return [json.loads(s) for s in re.findall(r"var spec = (.*?);\n\s*vegaEmbed", html, flags=re.S)]


def test_plots_show_renders_offline_with_a_titled_chart_per_group_dataset(ci_project, tmp_path):
    """`dvc plots show` on a copy of the CI project (whose suite is joint + g2d on CREMA-D), with this
    repository's .dvc/plots and .dvc/config: the page has no http(s) script, and each chart with data has the
    title of its dvc.yaml definition, all distinct. The copy also gets an ablation-group history (a copy of
    g2d's) so that two charts have data."""
    proj = tmp_path / "proj"
    shutil.copytree(ci_project, proj, symlinks=True, ignore=shutil.ignore_patterns("cache", "dvc_plots"))
    shutil.copytree(PLOTS_DIR, proj / ".dvc" / "plots", dirs_exist_ok=True)
    shutil.copy(ROOT / ".dvc" / "config", proj / ".dvc" / "config")
    ume = proj / "reports/runs/ablation/ume/ume-cremad.csv"
    ume.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(proj / "reports/runs/main/g2d/g2d-cremad.csv", ume)
    res = run([sys.executable, "-m", "dvc", "plots", "show", "-o", "out"], proj)
    html = (proj / "out" / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all("src" not in s for s in scripts), scripts
    assert not re.search(r"""src\s*=\s*["']?https?:""", html) and "cdn.jsdelivr" not in html
    assert "vegaEmbed" in html and "vega@5" in html

    defs = _plot_defs(proj / "dvc.yaml")
    titled = {s["title"]["text"]: s for s in _specs(html) if s}
    assert len(titled) == len([s for s in _specs(html) if s]), "two charts share a title"
    want = {defs["main/cremad"]["title"], defs["ablation/cremad"]["title"]}
    assert set(titled) == want, (sorted(titled), res.stderr[-2000:])
    main = titled[defs["main/cremad"]["title"]]
    assert main["encoding"]["x"]["title"] == "epoch"
    assert main["layer"][0]["encoding"]["y"]["title"] == "test accuracy (%)"
    files = {d["filename"] for d in main["data"]["values"]}
    assert files == {"main/g2d/g2d-cremad.csv", "main/joint/joint-cremad.csv", "teachers/cremad/teacher-cremad-audio.csv",
                     "teachers/cremad/teacher-cremad-visual.csv"}
    seeds = {d["seed"] for d in main["data"]["values"]}
    assert len(seeds) == len(yaml.safe_load((proj / "params.yaml").read_text())["suite"]["seeds"]) > 1
    assert any(t.get("aggregate") and t["groupby"] == ["rev", "line", "method", "x_value"] for t in main["transform"])


# ---- item 5: headline metrics ---------------------------------------------------------------------------

def test_metrics_are_one_file_per_method_keyed_by_dataset_and_equal_summary_means(ci_project):
    """`dvc metrics show` is a methods x datasets table: one row per reports/metrics/<method>.json, one column per
    `<dataset>/<metric>`, each value the summary's mean under trainer.select."""
    from g2d import registry

    params = yaml.safe_load((ci_project / "params.yaml").read_text())
    want: dict[str, set] = {}
    for g in params["suite"]["groups"].values():
        for m in g["methods"]:
            want.setdefault(m, set()).update(f"{ds}/acc" for ds in g["datasets"])
    for ds in params["suite"]["datasets"]:
        for mod in registry.get_dataset(ds).spec.modality_names:
            want.setdefault(f"teacher-{mod}", set()).add(f"{ds}/acc")
    files = {p.stem: json.loads(p.read_text()) for p in (ci_project / "reports/metrics").glob("*.json")}
    assert {k: set(v) for k, v in files.items()} == want and len(want) >= 3
    summary = pd.read_csv(ci_project / "reports/tables/summary.csv")
    for method, vals in files.items():
        for key, value in vals.items():
            ds, metric = key.split("/")
            run_name = f"{method}-{ds}" if not method.startswith("teacher-") else f"teacher-{ds}-{method[8:]}"
            row = summary[(summary.run == run_name) & (summary.selection == params["trainer"]["select"])
                          & (summary.split == "test") & (summary.metric == metric)]
            assert len(row) == 1, (method, key)
            assert value == pytest.approx(float(row["mean"].iloc[0]), abs=1e-3), (method, key)

    shown = run([sys.executable, "-m", "dvc", "metrics", "show"], ci_project).stdout.splitlines()
    columns = sorted(set().union(*files.values()))
    assert shown[0].split() == ["Path", *columns]  # one column per dataset, not per (dataset, method)
    assert sorted(li.split()[0] for li in shown[1:]) == sorted(f"reports/metrics/{m}.json" for m in files)


def test_readme_exp_show_regexes_drop_dependency_hashes_and_keep_metrics(ci_project):
    """The README's `dvc exp show --drop` regexes, read from the README itself: the first leaves every metric
    column and no dependency hash; the one-dataset variant leaves that dataset's metrics only."""
    import csv
    import io

    readme = (ROOT / "README.md").read_text()
    base = re.search(r"dvc exp show --only-changed --drop '([^']+)'", readme).group(1)
    one = re.search(r"add `\|([^`]+)` to the `--drop` regex", readme).group(1)

    def columns(regex):
        out = run([sys.executable, "-m", "dvc", "exp", "show", "--csv", "--drop", regex], ci_project).stdout
        return next(csv.reader(io.StringIO(out)))

    shown = columns(base)
    n_metrics = sum(len(json.loads(p.read_text())) for p in (ci_project / "reports/metrics").glob("*.json"))
    assert not [c for c in shown if re.match(r"(data|g2d|reports)/[^:]*$", c)], shown  # no dependency hash
    assert len([c for c in shown if c.endswith(("/acc", "/rmse"))]) == n_metrics, shown  # every metric
    only = [c for c in columns(f"{base}|{one}") if c.endswith(("/acc", "/rmse"))]
    assert only and all(c.split(":")[-1].startswith("cremad/") for c in only), only
