"""Per-method code fingerprints, so DVC re-runs only the stages whose method code changed.

`g2d codehash` writes data/code/<method>.txt: a hash of the source files that define the method
(every module in its class hierarchy, plug-ins included) plus the shared core (trainer, models,
prepared-data reader). A train stage depends on its method's file alone; DVC compares contents, so
an unchanged hash leaves the stage up to date even though this stage always runs.
"""
from __future__ import annotations

import hashlib
import inspect
import sys
from functools import lru_cache
from pathlib import Path

from g2d import registry
from g2d.data.prepared import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
# g2d/data/*.py: the prepared reader, the input pipeline and augmentation, and each dataset's declared recipe
CORE = ["g2d/train", "g2d/models", "g2d/methods/base.py", "g2d/data/*.py", "g2d/config.py"]


def _core_files() -> list[Path]:
    out = []
    for rel in CORE:
        if "*" in rel:
            out += sorted(ROOT.glob(rel))
            continue
        p = ROOT / rel
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def method_files(name: str) -> list[Path]:
    cls = registry.get_method(name)
    files = set()
    for klass in inspect.getmro(cls):
        mod = sys.modules.get(klass.__module__)
        f = getattr(mod, "__file__", None)
        if f and not klass.__module__.startswith(("builtins", "abc")):
            files.add(Path(f).resolve())
    return sorted(files | {p.resolve() for p in _core_files()})


def method_hash(name: str) -> str:
    h = hashlib.sha256()
    lines = []
    for f in method_files(name):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        rel = f.relative_to(ROOT).as_posix() if f.is_relative_to(ROOT) else f.as_posix()
        lines.append(f"{digest}  {rel}")
        h.update(f"{digest} {rel}\n".encode())
    return h.hexdigest() + "\n" + "\n".join(lines) + "\n"


@lru_cache
def code_id(name: str) -> str:
    """Short form of method_hash: what a run's fingerprint and the committed summaries record of the code.
    It covers exactly the files the stage depends on, so code outside them (reports, CLI) changes neither."""
    return method_hash(name).split("\n", 1)[0][:16]


def write_all(methods: list[str], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    written = []
    for name in sorted(set(methods) | {"unimodal"}):
        p = out_dir / f"{name}.txt"
        text = method_hash(name)
        if not p.is_file() or p.read_text() != text:  # leave mtime alone when unchanged
            atomic_write_text(p, text)
        written.append(p)
    return written
