"""`dvc repro` end to end on the CI profile in a temporary git repo; tables checked against metrics."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def make_project(dest: Path, edit=None) -> Path:
    """A throwaway copy of the project (code, dvc.yaml, params.yaml with profile=ci) under git + DVC."""
    for item in ("g2d", "baselines", "dvc.yaml", "pyproject.toml"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / item)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profile"] = "ci"
    if edit:
        edit(params)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    run(["git", "init", "-q"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    return dest


def run(cmd, cwd, check=True):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd)}
    # stages call `g2d`: make sure the venv's console script is on PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    dest = make_project(tmp_path_factory.mktemp("proj"))
    run([sys.executable, "-m", "dvc", "repro", "-q"], dest)
    return dest


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
            f"teacher-cremad-{row.modality}.json" if isinstance(row.modality, str) and row.modality
            else f"{row.method}-cremad.json")).read_text())["seeds"]
        vals = [s["selection"]["best_val"]["test"][row.metric] for s in seeds]
        assert row.mean == pytest.approx(sum(vals) / len(vals), abs=1e-4)
        assert row.n == len(vals)
        assert f"{row.mean:.2f} ± {row.std:.2f}" in main_table
    line = next(li for li in main_table.splitlines() if li.startswith("| joint |"))
    joint = cells[cells.row == "joint"]
    assert numbers(line) == [x for r in joint.itertuples() for x in (f"{r.mean:.2f}", f"{r.std:.2f}")]


def test_rerun_is_noop_and_method_change_reruns_only_it(project):
    res = run([sys.executable, "-m", "dvc", "repro"], project)
    assert "Running stage 'train@joint-cremad'" not in res.stdout
    assert "Running stage 'teacher@" not in res.stdout
