"""Provenance recorded in every metrics.json."""
from __future__ import annotations

import hashlib
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

import g2d


@lru_cache
def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[2])
        sha = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "g2d", "baselines"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parents[2]).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@lru_cache
def source_hash() -> str:
    """Hash of the framework and baseline sources: a resume checkpoint from other code is not reused."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pkg in ("g2d", "baselines"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def provenance(device: torch.device) -> dict:
    return {
        "git_sha": git_sha(),
        "source_hash": source_hash(),
        "g2d_bench": g2d.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
    }


VOLATILE = ("run_dir", "train_time_s")  # differ between two identical runs
VOLATILE_PROVENANCE = ("git_sha", "source_hash")  # a commit's own sha; a hash of every g2d file, report code included


def published_view(res: dict) -> dict:
    """A run's metrics.json as its DVC output (data/runs) holds it: without the fields that differ between
    two identical runs (wall times), that a commit can never hold of itself (its own git sha), or that hash
    code the stage does not depend on (`source_hash` covers every g2d file, so editing a report module would
    change it). dvc.lock records the output's md5, so a fresh clone's `dvc repro` must write these files
    byte for byte. The full record stays in the scratch copy (data/cache/runs)."""
    out = {k: v for k, v in res.items() if k not in VOLATILE}
    if "provenance" in out:
        out["provenance"] = {k: v for k, v in out["provenance"].items() if k not in VOLATILE_PROVENANCE}
    return out


def committed_view(res: dict, code_hash: str = "") -> dict:
    """A run result as the committed summaries (reports/runs) hold it: the published view plus `code_hash`,
    the method's fingerprint that DVC tracks for the stage (g2d.codehash, data/code/<method>.txt)."""
    out = published_view(res)
    if code_hash and "provenance" in out:
        out["provenance"]["code_hash"] = code_hash
    return out


VOLATILE_HISTORY = ("time_s",)  # history.csv columns left out of the published runs and committed summaries
