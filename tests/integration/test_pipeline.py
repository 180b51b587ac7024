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
        # the tables report trainer.select (params.yaml: last); probes come from the kept checkpoint's diagnostics
        vals = [s["diagnostics"]["test"][row.metric] if row.metric.startswith("probe_")
                else s["selection"][s["selected_checkpoint"]["rule"]]["test"][row.metric] for s in seeds]
        assert {s["selected_checkpoint"]["rule"] for s in seeds} == {"last"}
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


def test_calibration_and_claims_come_from_the_suite_runs(project):
    """reports/calibration.md: the teachers' figures are the committed runs' means; claims.md: every row of
    claims.csv, with the verdict the Holm p-value and the sign give."""
    runs = pd.read_csv(project / "reports/tables/runs.csv", keep_default_na=False, na_values=[""])
    cal = pd.read_csv(project / "reports/tables/calibration.csv")
    text = (project / "reports/calibration.md").read_text()
    assert "Bayes ceiling" in text and "rho" in text and "## cremad" in text
    for r in cal[cal.role == "teacher"].itertuples():
        v = runs[(runs.method == "unimodal") & (runs.modality == r.modality) & (runs.dataset == r.dataset)
                 & (runs.selection == "last") & (runs.split == "test") & (runs.metric == "acc")].value
        assert r.mean == pytest.approx(v.mean(), abs=1e-4) and r.n_seeds == len(v)
        rho = runs[(runs.method == "unimodal") & (runs.modality == r.modality) & (runs.split == "train")
                   & (runs.metric == "conf_train_aug")].value
        assert r.rho_aug == pytest.approx(rho.mean(), abs=1e-5)
        assert f"{r.mean:.1f} ±" in text
    claims = pd.read_csv(project / "reports/tables/claims.csv")
    md = (project / "reports/claims.md").read_text()
    assert len(claims) >= 1 and "Stand-in data" in md
    for r in claims.itertuples():
        want = "inconclusive" if not r.p_holm < 0.05 else "supported" if r.diff > 0 else "contradicted"
        assert r.verdict == want
        assert f"{r.diff:+.2f} [" in md
    assert 'id="claims"' in (project / "reports/index.html").read_text()
