"""Atomic checkpoint files: write to a temp file, fsync, rename."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, device="cpu"):
    return torch.load(path, map_location=device, weights_only=False)
