"""The prepared on-disk format shared by real `prepare` and stand-in generators.

<dir>/meta.json                     spec, class names, split sizes, provenance
<dir>/<split>/<modality>.npy        one array per modality, first axis = sample
<dir>/<split>/label.npy, index.npy  targets and stable sample ids
meta.json `inputs.<modality>` (optional): input_shape (model input, when the stored array is larger),
normalize (none | imagenet), window_start (spectrograms: fixed eval window); see g2d/data/transforms.py
meta.json `arrays.<split>.<key>`: shape, dtype and sha256 of every stored array (format 2)
Arrays are memory-mapped on load, so real datasets need not fit in RAM.

Opening (`Prepared`) checks what is cheap: every array's .npy header against meta.json (shape, dtype,
rows = `splits.<split>`, per-sample shape = `modalities[*].shape`, i.e. the stored shape, not `inputs`),
the file size against the header (truncation), and the label range; the sha256 of every array too when
the arrays total at most HASH_CHECK_MAX_BYTES (256 MiB; the embedded stand-ins), otherwise only
`g2d verify <dataset>` hashes them. Any problem is one PreparedError naming the file(s) and the fix.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import threading
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from g2d.data.base import DatasetSpec, ModalitySpec

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 2  # 2: meta.json records shape/dtype/sha256 of every array (`arrays`)
HASH_CHECK_MAX_BYTES = 256 << 20  # Prepared() hashes every array on open up to this total size
TMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(?:-\d+)?\.tmp$")  # `.<name>.<pid>[-<thread>].tmp`


class PreparedError(RuntimeError):
    pass


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_tmp(folder: Path, name: str | None = None) -> list[Path]:
    """Remove `.<name>.<pid>.tmp` files (atomic writes) left by writers that are no longer alive (any name
    when `name` is None); a live writer's temp file is left alone. Returns what was removed."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".{glob.escape(name)}.*.tmp" if name else ".*.tmp"):
        m = TMP_FILE.match(p.name)
        if not m or (name and m["name"] != name) or not p.is_file():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def temp_path(path: Path) -> Path:
    """The temp file a writer of `path` uses: `.<name>.<pid>.tmp` (plus the thread id off the main thread, so
    threads never share one); `clean_stale_tmp` removes those of dead writers."""
    path = Path(path)
    tid = "" if threading.current_thread() is threading.main_thread() else f"-{threading.get_ident()}"
    return path.with_name(f".{path.name}.{os.getpid()}{tid}.tmp")


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write via a temp file + rename; a dead writer's temp file of the same name is removed first, and a
    failed write (full disk) leaves none. `fsync=False` for rebuildable caches, where durability costs time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path.parent, path.name)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _clean_stale_dirs(out_dir: Path) -> None:
    """`.<name>.tmp-<pid>` / `.<name>.old-<pid>` folders of write_prepared runs that died (kill -9, full disk)."""
    pat = re.compile(rf"^\.{re.escape(out_dir.name)}\.(?:tmp|old)-(\d+)$")
    if not out_dir.parent.is_dir():
        return
    for p in out_dir.parent.iterdir():
        m = pat.match(p.name)
        if m and p.is_dir() and int(m[1]) != os.getpid() and not pid_alive(int(m[1])):
            shutil.rmtree(p, ignore_errors=True)


def write_prepared(out_dir: Path, spec: DatasetSpec, splits: dict[str, dict[str, np.ndarray]],
                   extra: dict[str, Any] | None = None) -> Path:
    """Write all splits into a temp dir, then swap it in: a crash never leaves a half dataset."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    _clean_stale_dirs(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sizes, records = {}, {}
    for split, arrays in splits.items():
        n = len(arrays["label"])
        for key in (*spec.modality_names, "label", "index"):
            if key not in arrays:
                raise PreparedError(f"{spec.name}/{split}: missing array {key!r}")
            if len(arrays[key]) != n:
                raise PreparedError(f"{spec.name}/{split}/{key}: {len(arrays[key])} rows, labels have {n}")
        (tmp / split).mkdir()
        records[split] = {}
        for key, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            np.save(tmp / split / f"{key}.npy", arr)
            records[split][key] = {"shape": list(arr.shape), "dtype": arr.dtype.str,
                                   "sha256": file_sha256(tmp / split / f"{key}.npy")}
        sizes[split] = n
    mods = []
    for m in spec.modalities:
        arr = splits[next(iter(splits))][m.name]
        mods.append({"name": m.name, "kind": m.kind, "shape": list(arr.shape[1:]), "dtype": str(arr.dtype)})
    meta = {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "task": spec.task,
        "classes": list(spec.classes),
        "modalities": mods,
        "splits": sizes,
        "arrays": records,
        **(extra or {}),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


_WARNED_NO_HASH: set[str] = set()


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a .npy header, without reading the data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            shape, _, dtype = np.lib.format._read_array_header(f, version)
        return tuple(shape), dtype, f.tell()


class Prepared:
    """A prepared dataset: its meta and memory-mapped split arrays, checked on open (see module doc).

    check: "auto" (structure; hashes too up to HASH_CHECK_MAX_BYTES), "full" (always hash), "structure"
    (never hash), "none" (only read meta.json; `problems()` then reports everything)."""

    def __init__(self, root: Path, mmap: bool = True, check: str = "auto"):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise PreparedError(
                f"{meta_path} not found: prepare the dataset first "
                f"(`g2d prepare {self.root.name}` or `dvc repro prepare@{self.root.name}`)")
        try:
            self.meta = json.loads(meta_path.read_text())
            if not isinstance(self.meta, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in ("name", "task", "classes", "modalities", "splits") if k not in self.meta]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            for m in self.meta["modalities"]:
                m["name"], m["kind"], m["shape"]  # noqa: B018 -- must exist
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise PreparedError(f"{meta_path}: unreadable or truncated ({type(e).__name__}: {e}); "
                                + self.fix(self.root.name)) from None
        self._mmap = "r" if mmap else None
        self._cache: dict[str, dict[str, np.ndarray]] = {}
        if check not in ("auto", "full", "structure", "none"):
            raise ValueError(f"check={check!r} not in (auto, full, structure, none)")
        if check != "none":
            problems = self.problems(hashes={"auto": None, "full": True, "structure": False}[check])
            if problems:
                raise PreparedError("; ".join(problems) + "; " + self.fix())

    # ---- integrity ----------------------------------------------------------------------------
    def fix(self, name: str | None = None) -> str:
        name = name or self.meta.get("name", self.root.name)
        try:
            shown = self.root.resolve().relative_to(Path.cwd().resolve())
        except ValueError:
            shown = self.root
        return (f"restore it with `dvc checkout {shown.as_posix()}` or regenerate it with `g2d prepare {name}` "
                "(then `g2d verify` checks it)")

    def _expected(self) -> dict[str, dict[str, dict]]:
        """split -> key -> {shape (incl. rows), dtype, sha256?}: the `arrays` record, or (format 1) what
        `modalities` and `splits` say."""
        if isinstance(self.meta.get("arrays"), dict):
            return self.meta["arrays"]
        mods = {m["name"]: m for m in self.meta["modalities"]}
        out = {}
        for split, n in self.meta["splits"].items():
            out[split] = {k: {"shape": [n, *mods[k]["shape"]], "dtype": mods[k].get("dtype")} for k in mods}
            out[split]["label"] = {"shape": [n], "dtype": None}
            out[split]["index"] = {"shape": [n], "dtype": None}
        return out

    def problems(self, hashes: bool | None = None, note_missing: bool = True) -> list[str]:
        """Every problem found, one line each naming its file. hashes: True = always hash, False = never,
        None = when the arrays total at most HASH_CHECK_MAX_BYTES. note_missing: say once (stderr) when
        meta.json records no hashes."""
        meta, expected = self.meta, self._expected()
        mods = {m["name"]: m for m in meta["modalities"]}
        out, ok_files = [], []
        for split, n in meta["splits"].items():
            keys = expected.get(split)
            if keys is None:
                out.append(f"{self.root / 'meta.json'}: no `arrays` record for split {split!r}")
                continue
            for key in (*mods, "label", "index"):
                if key not in keys:
                    out.append(f"{self.root / 'meta.json'}: no `arrays` record for {split}/{key}")
            for key, rec in keys.items():
                path = self.root / split / f"{key}.npy"
                if not path.is_file():
                    out.append(f"{path}: missing")
                    continue
                try:
                    shape, dtype, offset = _npy_header(path)
                except (OSError, ValueError, SyntaxError, EOFError) as e:
                    out.append(f"{path}: unreadable .npy header ({type(e).__name__}: {str(e)[:120]})")
                    continue
                want = list(rec.get("shape") or [])
                if key in mods:  # the stored per-sample shape, not the model input shape (`inputs`)
                    want = [want[0] if want else n, *mods[key]["shape"]]
                if not shape or shape[0] != n:
                    out.append(f"{path}: {shape[0] if shape else 0} rows, meta.json splits.{split} says {n}")
                    continue
                if list(shape) != want:
                    out.append(f"{path}: shape {list(shape)}, meta.json says {want}")
                    continue
                if rec.get("dtype") and np.dtype(rec["dtype"]) != dtype:
                    out.append(f"{path}: dtype {dtype.str} ({dtype}), meta.json says {np.dtype(rec['dtype'])}")
                    continue
                size, expect = path.stat().st_size, offset + int(np.prod(shape)) * dtype.itemsize
                if size != expect:
                    out.append(f"{path}: {size} bytes, its header implies {expect} "
                               f"({'truncated' if size < expect else 'trailing bytes'})")
                    continue
                if key == "label":
                    bad = self._label_problem(path)
                    if bad:
                        out.append(f"{path}: {bad}")
                        continue
                ok_files.append((path, rec.get("sha256"), size))
        recorded = [f for f in ok_files if f[1]]
        if note_missing and len(recorded) < len(ok_files) and str(self.root) not in _WARNED_NO_HASH:
            _WARNED_NO_HASH.add(str(self.root))
            print(f"[g2d] {self.root}: meta.json records no sha256 for its arrays (prepared by an older g2d): "
                  f"shapes, dtypes, rows and labels checked, contents not; regenerate with "
                  f"`g2d prepare {meta['name']}` to record them", file=sys.stderr)
        if hashes is None:
            hashes = sum(f[2] for f in ok_files) <= HASH_CHECK_MAX_BYTES
        if hashes:
            for path, want, _ in recorded:
                have = file_sha256(path)
                if have != want:
                    out.append(f"{path}: sha256 {have[:12]}... differs from meta.json's {want[:12]}... "
                               "(contents changed or corrupted)")
        return out

    def hashes_recorded(self) -> bool:
        arrays = self.meta.get("arrays")
        return isinstance(arrays, dict) and all(
            isinstance(r, dict) and r.get("sha256") for keys in arrays.values() for r in keys.values())

    def _label_problem(self, path: Path) -> str | None:
        y = np.load(path, mmap_mode="r")
        if y.size == 0:
            return None
        if self.meta["task"] == "classification":
            k = len(self.meta.get("classes") or ())
            if not np.issubdtype(y.dtype, np.integer):
                return f"labels have dtype {y.dtype}, classification needs integers"
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= k:
                return f"labels span [{lo}, {hi}], the {k} classes need [0, {k - 1}]"
        elif not np.isfinite(np.asarray(y, dtype=np.float64)).all():
            return "non-finite regression targets"
        return None

    @property
    def spec(self) -> DatasetSpec:
        """Shapes are what the model sees: `inputs.<m>.input_shape` where the stored array differs (frames kept
        at a resolution the train-time crop can come from, a longer spectrogram for a random window)."""
        inputs = self.meta.get("inputs") or {}
        mods = tuple(ModalitySpec(m["name"], m["kind"], tuple((inputs.get(m["name"]) or {}).get("input_shape")
                                                              or m["shape"]))
                     for m in self.meta["modalities"])
        return DatasetSpec(self.meta["name"], mods, self.meta["task"], tuple(self.meta["classes"]))

    def split(self, name: str) -> dict[str, np.ndarray]:
        if name not in self._cache:
            d = self.root / name
            if not d.is_dir():
                raise PreparedError(f"{d}: split {name!r} missing; splits: {list(self.meta['splits'])}")
            keys = [*self.spec.modality_names, "label", "index"]
            arrays = {}
            for k in keys:
                try:
                    arrays[k] = np.load(d / f"{k}.npy", mmap_mode=self._mmap)
                except (OSError, ValueError, EOFError) as e:
                    raise PreparedError(f"{d / f'{k}.npy'}: unreadable ({type(e).__name__}: {str(e)[:160]}); "
                                        + self.fix()) from None
            self._cache[name] = arrays
        return self._cache[name]


def stratified_split(labels: np.ndarray, fraction: float, seed: int, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): per-class fraction held out; regression stratifies on quantile bins."""
    rng = np.random.default_rng(seed)
    if fraction <= 0:
        return np.arange(len(labels)), np.arange(0)
    if task == "regression":
        bins = np.quantile(labels, np.linspace(0, 1, 11)[1:-1])
        strata = np.digitize(labels, bins)
    else:
        strata = labels
    held = []
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        rng.shuffle(idx)
        held.append(idx[: int(round(fraction * len(idx)))])
    held_out = np.sort(np.concatenate(held)) if held else np.arange(0)
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep, held_out


def spec_dict(spec: DatasetSpec) -> dict:
    return asdict(spec)
