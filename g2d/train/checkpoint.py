"""Checkpoint and weights files: weights-only loading, integrity records, atomic writes, stale temporaries.

Every file written here (`ckpt.pt`, `model.pt`, `selected.pt`) holds only tensors, numbers, strings,
None and lists/tuples/dicts of them, and is read with `torch.load(weights_only=True)`: a crafted file
cannot run code when loaded, it is refused (CheckpointError naming the file).

Beside each file `<name>.sha256` records its sha256 (`sha256sum` format). A write is two-phase:
1. the data go to `.<name>.<pid>.tmp`, fsynced;
2. the new `<name>.sha256` is swapped in atomically (the commit point);
3. the temp file is renamed over `<name>`.
A writer killed between 2 and 3 left a complete, committed temp file: `verify` rolls it forward. A file
that does not match its record (truncated, garbage, a flipped byte) raises CheckpointError; callers decide
whether that is fatal (teacher weights) or a restart (`ckpt.pt`, see `move_aside`).
"""
from __future__ import annotations

import glob
import os
import pickle
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from g2d.data.prepared import TMP_FILE, atomic_write_bytes, clean_stale_tmp, file_sha256, pid_alive, temp_path

SUFFIX = ".sha256"


class CheckpointError(OSError):
    """A weights/checkpoint file that cannot be trusted: unreadable, mismatching its sha256, or unsafe.
    An OSError without errno (like gzip.BadGzipFile): the CLI reports it as a data error, exit 1."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = Path(path), why

    def __reduce__(self):  # raised in a fork-pool worker, re-raised in the parent
        return type(self), (self.path, self.why)


def sidecar(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_PLAIN = (int, float, bool, str, bytes, type(None))


def plain(obj, where: str = "checkpoint"):
    """`obj` with numpy values turned into tensors / Python numbers, so it loads with weights_only=True.
    Containers are rebuilt only where something changed (a model state_dict keeps its `_metadata`).
    Anything else (a custom object) is a TypeError naming where it is: it would need pickle to load."""
    t = type(obj)
    if t in _PLAIN or torch.is_tensor(obj) or isinstance(obj, (torch.Size, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        out = {plain(k, f"{where} key"): plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
        if all(a is b and x is y for (a, x), (b, y) in zip(obj.items(), out.items())):
            return obj
        return out
    if isinstance(obj, (list, tuple)):
        out = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(obj, out)) and t in (list, tuple):
            return obj
        return out if isinstance(obj, list) else tuple(out)
    raise TypeError(f"{where}: a {t.__module__}.{t.__qualname__} cannot go into a weights-only checkpoint; "
                    "store tensors, numbers, strings and lists/dicts of them (Method.state_dict included)")


def atomic_save(obj, path: Path) -> str:
    """torch.save `obj` (made weights-only loadable) to `path` with its sha256 record; returns the sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        roll_forward(path)  # a committed write of a killed writer first becomes `path`, as on load
    except CheckpointError:
        pass  # a malformed record: replaced below
    clean_stale_tmp(path.parent, path.name)
    clean_stale_tmp(path.parent, sidecar(path).name)
    obj = plain(obj, path.name)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        atomic_write_bytes(sidecar(path), f"{digest}  {path.name}\n".encode())  # commit
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return digest


def recorded_sha256(path: Path) -> str | None:
    """The sha256 in `<path>.sha256`, None when there is no record; CheckpointError for a malformed one."""
    side = sidecar(path)
    try:
        text = side.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"integrity record {side.name} unreadable ({e})") from None
    digest = text.split()[0] if text.split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise CheckpointError(path, f"integrity record {side.name} is malformed")
    return digest


def roll_forward(path: Path, want: str | None = None) -> bool:
    """Finish a write killed between its commit (the new sha256 record) and its rename: a dead writer's
    `.<name>.<pid>.tmp` hashing to the record becomes `<name>`. True when it did."""
    path = Path(path)
    want = want or recorded_sha256(path)
    if want is None:
        return False
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = TMP_FILE.match(tmp.name)
        if (m and m["name"] == path.name and tmp.is_file() and not pid_alive(int(m["pid"]))
                and file_sha256(tmp) == want):
            os.replace(tmp, path)
            return True
    return False


def verify(path: Path, required: bool = False) -> str | None:
    """Check `path` against its sha256 record (rolling a committed, unrenamed write forward first).
    Returns the sha256, or None when there is no record and it is not `required`."""
    path = Path(path)
    want = recorded_sha256(path)
    if want is None:
        if required:
            raise CheckpointError(path, f"no integrity record ({sidecar(path).name}): cannot tell it is complete")
        if not path.is_file():
            raise CheckpointError(path, "missing")
        return None
    have = file_sha256(path) if path.is_file() else None
    if have == want or roll_forward(path, want):
        return want
    if have is None:
        raise CheckpointError(path, f"missing, but {sidecar(path).name} records it")
    size = path.stat().st_size
    raise CheckpointError(path, f"sha256 mismatch: {size} bytes hashing to {have[:12]}..., "
                                f"{sidecar(path).name} records {want[:12]}... (truncated or corrupted)")


def load(path: Path, device="cpu", required: bool = False):
    """Verify, then load with weights_only=True. CheckpointError for a missing, corrupt or unsafe file."""
    path = Path(path)
    verify(path, required=required)
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning says nothing useful here
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(path, _refusal(str(e))) from None
    except FileNotFoundError:
        raise CheckpointError(path, "missing") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError, MemoryError) as e:
        first = str(e).strip().split(". ")[0].splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(path, f"unreadable, truncated or not a PyTorch file ({type(e).__name__}: {first})"
                              ) from None


def _refusal(msg: str) -> str:
    m = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
    if m:
        return (f"refused: unpickling it would call or import `{m[1]}`; a weights file may hold only tensors "
                "and plain containers (loading it could run arbitrary code). Do not load it; delete it or "
                "regenerate it")
    m = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", msg, re.S)
    why = " ".join(m[1].split())[:160] if m else msg.strip().splitlines()[0][:160]
    return f"refused: not a weights-only PyTorch file ({why}); delete it or regenerate it"


def move_aside(path: Path) -> Path:
    """Rename a bad file (and its record) to `<name>.corrupt-<timestamp>` so a rerun does not hit it again."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    if path.exists():
        os.replace(path, dest)
    if sidecar(path).exists():
        os.replace(sidecar(path), dest.with_name(dest.name + SUFFIX))
    return dest


def remove(path: Path) -> None:
    """Delete a file written by atomic_save and its integrity record."""
    Path(path).unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)
