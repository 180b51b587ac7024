"""Per-method code fingerprints, so DVC re-runs only the stages whose method code changed.

`g2d codehash` writes data/code/<method>.txt: a hash of the source files that define the method
(every module in its class hierarchy, plug-ins included, and the method modules those use) plus the shared core (trainer, models,
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


# method code lives here: a module of these packages that a method's modules use (a helper imported from another
# baseline, e.g. PMR's `ogm_ratios` from baselines.ogm_ge) is part of that method's code
METHOD_PACKAGES = ("baselines", "g2d.methods")


def _uses(mod) -> set[str]:
    """Names of the method-package modules whose functions, classes or module objects `mod`'s namespace holds."""
    out = set()
    for v in vars(mod).values():
        name = v.__name__ if inspect.ismodule(v) else getattr(v, "__module__", None)
        if isinstance(name, str) and name.split(".")[0] in ("baselines", "g2d") and \
                name.startswith(METHOD_PACKAGES) and name in sys.modules:
            out.add(name)
    return out


def method_files(name: str) -> list[Path]:
    """Every module of the method's class hierarchy, the method-package modules they use (transitively), the core."""
    cls = registry.get_method(name)
    todo = [k.__module__ for k in inspect.getmro(cls) if not k.__module__.startswith(("builtins", "abc"))]
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += sorted(_uses(sys.modules[m]) - seen) if m.startswith(METHOD_PACKAGES) else []
    files = {Path(f).resolve() for m in seen if (f := getattr(sys.modules.get(m), "__file__", None))}
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
