"""`dvc repro` end to end on the CI profile in a temporary git repo; tables checked against metrics."""
from __future__ import annotations

import json
import re
import sys

import pandas as pd
import pytest

from tests.pipeline_project import run


@pytest.fixture
def project(ci_project):
    return ci_project


def numbers(text: str) -> list[str]:
    return re.findall(r"-?\d+\.\d+", text)


def test_repro_produces_reports(project):
    assert (project / "reports/cremad.md").is_file()
    assert (project / "reports/tex/cremad.tex").is_file()
    assert "Stand-in data" in (project / "reports/cremad.md").read_text()
    status = run([sys.executable, "-m", "dvc", "status"], project).stdout
    stale = [li for li in status.splitlines() if li.strip() and li.strip() not in ("codehash:", "always changed")]
    assert not stale, status  # only the always-run fingerprint stage is reported


def test_table_numbers_equal_metric_files(project):
    cells = pd.read_csv(project / "reports/tables/cremad.csv")
    md = (project / "reports/cremad.md").read_text()
    main_table = md.split("## Selection effect")[0]
    for row in cells.itertuples():
        if row.n == 0:
            continue
        seeds = json.loads((project / "reports/runs" / (
            f"teachers/cremad/teacher-cremad-{row.modality}.json" if isinstance(row.modality, str) and row.modality
            else f"main/{row.method}/{row.method}-cremad.json")).read_text())["seeds"]
        vals = [s["selection"]["best_val"]["test"][row.metric] for s in seeds]
        assert row.mean == pytest.approx(sum(vals) / len(vals), abs=1e-4)
        assert row.n == len(vals)
        assert f"{row.mean:.2f} ± {row.std:.2f}" in main_table
    line = next(li for li in main_table.splitlines() if li.startswith("| joint |"))
    joint = cells[cells.row == "joint"]
    assert numbers(line) == [x for r in joint.itertuples() for x in (f"{r.mean:.2f}", f"{r.std:.2f}")]


def test_rerun_is_noop(project):
    res = run([sys.executable, "-m", "dvc", "repro"], project)
    assert "Running stage 'main@" not in res.stdout
    assert "Running stage 'teacher@" not in res.stdout


def test_method_code_change_stales_only_its_stages(project):
    src = project / "g2d/methods/joint.py"
    original = src.read_text()
    try:
        src.write_text(original + "\n# a deliberate change\n")
        run([sys.executable, "-m", "dvc", "repro", "-q", "codehash"], project)
        status = run([sys.executable, "-m", "dvc", "status"], project).stdout
        assert "main@joint" in status
        assert "main@g2d" not in status and "teacher@" not in status and "prepare@" not in status
    finally:
        src.write_text(original)
        run([sys.executable, "-m", "dvc", "repro", "-q", "codehash"], project)
    assert "main@joint" not in run([sys.executable, "-m", "dvc", "status"], project).stdout


def test_failing_prepare_keeps_previous_output(project):
    """A `dvc repro prepare@cremad` that fails leaves the previous prepared data in place (issue 12 §6):
    DVC removes non-persistent outputs before running the command."""
    import yaml

    params_path = project / "params.yaml"
    original = params_path.read_text()
    meta = project / "data/prepared/cremad/meta.json"
    before = meta.read_bytes()
    arrays = {p.relative_to(project): p.read_bytes() for p in (project / "data/prepared/cremad").rglob("*.npy")}
    try:
        params = yaml.safe_load(original)
        params["datasets"]["cremad"]["standin"] = {"modalities": {"audio": {"code": "bogus"}}}  # fails in generate
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        res = run([sys.executable, "-m", "dvc", "repro", "prepare@cremad"], project, check=False)
        assert res.returncode != 0 and "bogus" in res.stdout + res.stderr
        assert meta.read_bytes() == before
        assert {p: (project / p).read_bytes() for p in arrays} == arrays
    finally:
        params_path.write_text(original)
    assert "prepare@cremad" not in run([sys.executable, "-m", "dvc", "status"], project).stdout
