"""Are the committed results what the committed code and params produce?

A results commit is only worth its numbers if `dvc repro` on a fresh clone has nothing to do. This check
needs no data and trains nothing: it recomputes every method's code fingerprint (what `g2d codehash` would
write to data/code/) and asks `dvc status` about everything else git tracks (params, source folders, the
committed summaries and tables). Missing *untracked* outputs (data/prepared, data/runs on a fresh clone)
are not staleness and are ignored.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from g2d.codehash import ROOT, method_hash

ABSENT = ("deleted", "not in cache")  # what a fresh clone's missing untracked data looks like to DVC


def code_changes(root: Path = ROOT) -> list[str]:
    """data/code/<method>.txt files whose committed content differs from the current sources."""
    out = []
    for f in sorted((root / "data/code").glob("*.txt")):
        if f.read_text() != method_hash(f.stem):
            out.append(f"data/code/{f.name}")
    return out


def dvc_changes(root: Path = ROOT) -> dict[str, list[str]]:
    """stage -> what `dvc status` finds changed, leaving out absent untracked data and data/code (see above)."""
    res = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True,
                         text=True, env=None)
    if res.returncode:
        raise RuntimeError(f"dvc status failed in {root}: {res.stderr.strip()[-500:]}")
    out: dict[str, list[str]] = {}
    for stage, items in json.loads(res.stdout or "{}").items():
        found = []
        for item in items:
            if item == "always changed":
                continue
            if isinstance(item, str):  # e.g. "changed command"
                found.append(item)
                continue
            for kind, paths in item.items():
                if not isinstance(paths, dict):
                    found.append(kind)
                    continue
                for path, state in paths.items():
                    if isinstance(state, dict):  # a params file: {key: "modified" | "new" | "deleted"}
                        found += [f"param {key} {st}" for key, st in state.items()]
                    elif kind == "changed params":
                        found.append(f"param {path}")
                    elif state not in ABSENT and not str(path).startswith("data/code/"):
                        found.append(f"{path} {state}")
        if found:
            out[stage] = found
    return out


def stale(root: Path = ROOT) -> list[str]:
    """One line per reason the committed results are not HEAD's; empty when they are."""
    lines = [f"{p}: the code it fingerprints changed" for p in code_changes(root)]
    lines += [f"{stage}: {', '.join(why)}" for stage, why in dvc_changes(root).items()]
    return lines
