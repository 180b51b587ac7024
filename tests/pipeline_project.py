"""A throwaway copy of the project under git + DVC, for pipeline tests and the timing benchmark."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_project(dest: Path, edit=None, small: bool = True) -> Path:
    """A throwaway copy of the project (code, dvc.yaml, params.yaml) under git + DVC.

    small=True: the CI profile on a small suite (joint and g2d on CREMA-D); False: the suite as committed.
    """
    for item in ("g2d", "baselines", "dvc.yaml", "pyproject.toml"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / item)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if small:
        params["profile"] = "ci"
        # a small but representative suite: two methods (one with teachers + SMP) on CREMA-D
        params["suite"]["datasets"] = ["cremad"]
        params["suite"]["groups"] = {g: {"methods": [], "datasets": []} for g in params["suite"]["groups"]}
        params["suite"]["groups"]["main"] = {"methods": ["joint", "g2d"], "datasets": ["cremad"]}
    if edit:
        edit(params)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    run(["git", "init", "-q"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    shutil.copytree(ROOT / ".dvc/plots", dest / ".dvc/plots")  # the offline plots page and chart template
    run([sys.executable, "-m", "dvc", "config", "plots.html_template", "plots/offline.html"], dest)
    return dest


def run(cmd, cwd, check=True):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd)}
    # stages call `g2d`: make sure the venv's console script is on PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


