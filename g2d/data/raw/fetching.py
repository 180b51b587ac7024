"""Shared download / verify / extract / per-clip-cache helpers for `g2d.data.raw.<name>`.

Everything a real `fetch` needs without depending on a dataset host being up:
* `download(url, dest, sha256=...)`: resumable (HTTP Range on `<dest>.part`), tqdm progress, short
  connect timeout, sha256-checked; a file that already verifies is never downloaded again.
* `verify` / `verify_or_record`: sha256sum-format manifests (`<hex>  <relpath>`); where no checksum is
  published, the manifest is written on first download (trust on first use) and checked afterwards.
* `extract(archive, dest)`: atomic (temp dir + rename), refuses path traversal.
* `ClipCache` + `map_clips`: per-clip results cached atomically under `prepare_cache_dir(raw_dir)`
  (`<raw_dir>/../.cache/<name>/`), so a killed `prepare` resumes where it stopped.
Errors are `RawDataError` subclasses whose text says what to obtain, where to put it and what to run next;
the CLI prints them without a traceback.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "MANIFEST.sha256"
CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------- errors
class RawDataError(RuntimeError):
    """Base class of every fetch/prepare error with a user-facing how-to message."""


class ManualStepRequired(RawDataError):
    """A licence, a login or a dead host makes automation impossible: the message lists the steps."""


class DownloadFailed(RawDataError):
    """The host could not be reached or the transfer broke (the partial file is kept for resume)."""


class ChecksumMismatch(RawDataError):
    """A file's sha256 (or size) differs from the published / recorded one."""


class MissingRawFile(RawDataError, FileNotFoundError):
    """A raw file that prepare needs is absent."""


class CorruptRawFile(RawDataError):
    """A raw file exists but cannot be decoded (truncated, wrong format, wrong sample rate...)."""


def manual_step(what: str, steps: Sequence[str], then: str) -> ManualStepRequired:
    """Build a numbered step-by-step message: what is needed, how to obtain it, what to run next."""
    lines = [what, ""]
    lines += [f"  {i}. {s}" for i, s in enumerate(steps, 1)]
    lines += ["", f"Then run: {then}"]
    return ManualStepRequired("\n".join(lines))


# ----------------------------------------------------------------------------------------------- options
def parse_options(cls: type, options: Mapping[str, Any] | None, prefix: str):
    """Build dataclass `cls` (all fields defaulted) from a free-form dict; errors name `prefix.<key>`."""
    import dataclasses

    options = dict(options or {})
    base = cls()
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise RawDataError(f"{prefix}.{unknown[0]}: unknown option; allowed: {names}")
    kwargs = {}
    for k, v in options.items():
        d = getattr(base, k)
        if d is not None and v is not None and not isinstance(v, type(d)):
            if isinstance(d, float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            elif isinstance(d, (list, tuple)) and isinstance(v, (list, tuple)):
                v = type(d)(v)
            else:
                raise RawDataError(f"{prefix}.{k}: expected {type(d).__name__}, got {v!r}")
        kwargs[k] = v
    try:
        return dataclasses.replace(base, **kwargs)
    except (TypeError, ValueError) as e:
        raise RawDataError(f"{prefix}: {e}") from None


# ----------------------------------------------------------------------------------------------- hashing
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path) -> dict[str, str]:
    """sha256sum format: `<64 hex>  <relpath>` per line (a leading `*` on the path is accepted)."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise RawDataError(f"{path}:{n}: not a sha256sum line: {line!r}")
        out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def write_manifest(path: Path, entries: Mapping[str, str]) -> Path:
    text = "".join(f"{h}  {rel}\n" for rel, h in sorted(entries.items()))
    atomic_write_bytes(Path(path), text.encode())
    return Path(path)


def hash_files(root: Path, rels: Iterable[str], jobs: int = 1, desc: str = "sha256") -> dict[str, str]:
    rels = list(rels)
    root = Path(root)
    missing = [r for r in rels if not (root / r).is_file()]
    if missing:
        raise MissingRawFile(f"{root / missing[0]}: missing ({len(missing)} file(s) missing in total); "
                             f"re-run fetch or restore the file(s)")
    digests = map_parallel(lambda r: sha256_file(root / r), rels, jobs=jobs, desc=desc)
    return dict(zip(rels, digests))


def verify(raw_dir: Path, manifest: Path | Mapping[str, str], jobs: int = 1, rerun: str = "g2d fetch <dataset>",
           sizes: Mapping[str, int] | None = None) -> list[str]:
    """Check every file of `manifest` under `raw_dir`; raise naming the bad/missing files, else list them."""
    raw_dir = Path(raw_dir)
    entries = read_manifest(manifest) if isinstance(manifest, (str, Path)) else dict(manifest)
    missing = [r for r in entries if not (raw_dir / r).is_file()]
    if missing:
        raise MissingRawFile(
            f"{raw_dir / missing[0]}: missing ({len(missing)} of {len(entries)} manifest files missing). "
            f"Restore them (or delete the directory to start over) and run `{rerun}`.")
    if sizes:
        wrong = [r for r in entries if r in sizes and (raw_dir / r).stat().st_size != sizes[r]]
        if wrong:
            r = wrong[0]
            raise ChecksumMismatch(
                f"{raw_dir / r}: size {(raw_dir / r).stat().st_size} B, expected {sizes[r]} B "
                f"({len(wrong)} file(s) with a wrong size). Delete the file(s) and run `{rerun}` to re-download.")
    got = hash_files(raw_dir, list(entries), jobs=jobs, desc=f"verify {raw_dir.name}")
    bad = [r for r in entries if got[r] != entries[r]]
    if bad:
        r = bad[0]
        raise ChecksumMismatch(
            f"{raw_dir / r}: sha256 {got[r]} != expected {entries[r]} ({len(bad)} of {len(entries)} file(s) "
            f"differ). Delete the bad file(s) and run `{rerun}` to re-download them.")
    return sorted(entries)


def verify_or_record(raw_dir: Path, rels: Iterable[str], manifest: Path | None = None, jobs: int = 1,
                     rerun: str = "g2d fetch <dataset>") -> Path:
    """No published checksums: write `<raw_dir>/MANIFEST.sha256` the first time, verify against it later."""
    raw_dir = Path(raw_dir)
    manifest = Path(manifest) if manifest else raw_dir / MANIFEST
    if manifest.is_file():
        verify(raw_dir, manifest, jobs=jobs, rerun=rerun)
    else:
        write_manifest(manifest, hash_files(raw_dir, rels, jobs=jobs, desc=f"manifest {raw_dir.name}"))
        _log(f"recorded {manifest} (no published checksums: later runs verify against it)")
    return manifest


# ----------------------------------------------------------------------------------------------- download
@dataclass(frozen=True)
class Remote:
    url: str
    filename: str
    sha256: str | None = None
    size: int | None = None


def download(url: str, dest: Path, sha256: str | None = None, *, size: int | None = None,
             timeout: float = 15.0, how_to: str = "", progress: bool = True) -> Path:
    """Resumable, verified download of `url` to `dest` (`dest.part` holds partial bytes between runs).

    `how_to` is appended to every failure message (e.g. how to get the file by hand). A `dest` that already
    verifies (sha256, else size, else mere presence when neither is known) is returned untouched.
    """
    dest = Path(dest)
    hint = f"\n{how_to}" if how_to else ""
    if dest.is_file():
        if sha256 is None and (size is None or dest.stat().st_size == size):
            return dest
        if sha256 is not None and sha256_file(dest) == sha256.lower():
            return dest
        raise ChecksumMismatch(
            f"{dest}: exists but does not match the expected "
            f"{'sha256 ' + sha256 if sha256 else f'size {size} B'}; delete it and re-run to download it again."
            + hint)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is None or have < size:
        _transfer(url, part, have, timeout, progress, dest, hint)
    if size is not None and part.stat().st_size != size:  # the server finished: it holds a different file
        got = part.stat().st_size
        part.unlink()
        raise ChecksumMismatch(f"{dest}: the server sent {got} B, expected {size} B (from {url}); nothing was "
                               f"kept. Wrong URL or the file changed upstream." + hint)
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256.lower():
            part.unlink()
            raise ChecksumMismatch(f"{dest}: downloaded sha256 {got} != expected {sha256} (from {url}); "
                                   f"the bad file was deleted, re-run to download it again." + hint)
    os.replace(part, dest)
    return dest


def _transfer(url: str, part: Path, have: int, timeout: float, progress: bool, dest: Path, hint: str) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "g2d-bench"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: the part file is already complete
            return
        raise DownloadFailed(f"{url}: HTTP {e.code} {e.reason} while downloading {dest.name}." + hint) from None
    except (TimeoutError, urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DownloadFailed(f"{url}: host unreachable ({reason}); could not download {dest.name} "
                             f"(offline machine or dead host?)." + hint) from None
    with resp:
        status = getattr(resp, "status", 200)
        mode = "ab" if (have and status == 206) else "wb"
        if mode == "wb":
            have = 0
        total = resp.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        bar = _bar(total=total, initial=have, desc=dest.name, unit="B", unit_scale=True, disable=not progress)
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (TimeoutError, OSError, http.client.HTTPException) as e:
                        raise DownloadFailed(f"{url}: transfer interrupted ({e}); {part} keeps "
                                             f"{part.stat().st_size} B, re-run to resume." + hint) from None
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
        finally:
            bar.close()
    if total is not None and part.stat().st_size < total:
        raise DownloadFailed(f"{url}: connection closed after {part.stat().st_size} of {total} B; {part} is "
                             f"kept, re-run to resume." + hint)


def fetch_remotes(remotes: Sequence[Remote], raw_dir: Path, *, timeout: float = 15.0, how_to: str = "",
                  record: bool = True, jobs: int = 1) -> list[Path]:
    """Download a list of `Remote`s into raw_dir; those without a sha256 are pinned in MANIFEST.sha256."""
    raw_dir = Path(raw_dir)
    manifest = raw_dir / MANIFEST
    recorded = read_manifest(manifest) if manifest.is_file() else {}
    paths = map_parallel(lambda r: download(r.url, raw_dir / r.filename, r.sha256 or recorded.get(r.filename),
                                            size=r.size, timeout=timeout, how_to=how_to, progress=jobs <= 1),
                         list(remotes), jobs=jobs, desc="download")
    if record:
        new = {r.filename: sha256_file(raw_dir / r.filename) for r in remotes if r.filename not in recorded}
        if new:
            write_manifest(manifest, {**recorded, **new})
    return paths


# ----------------------------------------------------------------------------------------------- extract
def extract(archive: Path, dest: Path, *, expect: Sequence[str] = ()) -> Path:
    """Extract a tar(.gz/.bz2/.xz) or zip into `dest` atomically; skip if `dest` is already complete.

    Completeness = a `.extracted` marker naming the archive's sha256 (written last). `expect` lists relative
    paths that must exist after extraction (a wrong archive fails here, not later in prepare).
    """
    archive, dest = Path(archive), Path(dest)
    marker = dest / ".extracted"
    digest = sha256_file(archive)
    if marker.is_file() and marker.read_text().strip() == digest:
        return dest
    tmp = dest.with_name(f".{dest.name}.extract-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for m in z.namelist():
                    _safe_member(m, archive)
                z.extractall(tmp)
        else:
            try:
                with tarfile.open(archive) as t:
                    for m in t.getmembers():
                        _safe_member(m.name, archive)
                        if m.issym() or m.islnk():
                            raise CorruptRawFile(f"{archive}: member {m.name} is a link; refusing to extract")
                    t.extractall(tmp)
            except (tarfile.TarError, EOFError, OSError) as e:
                raise CorruptRawFile(f"{archive}: cannot be extracted ({e}): truncated or not an archive. "
                                     f"Delete it and download it again.") from None
        missing = [p for p in expect if not (tmp / p).exists()]
        if missing:
            raise CorruptRawFile(f"{archive}: extracted tree lacks {missing[0]} ({len(missing)} expected "
                                 f"path(s) missing): wrong archive?")
        (tmp / ".extracted").write_text(digest + "\n")
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def _safe_member(name: str, archive: Path) -> None:
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise CorruptRawFile(f"{archive}: member {name!r} escapes the target directory; refusing to extract")


# ----------------------------------------------------------------------------------------------- tools
def run_tool(cmd: Sequence[str], *, cwd: Path | None = None, how_to: str = "", env: Mapping[str, str] | None = None,
             capture: bool = False) -> str:
    """Run an external tool (git...); a missing tool or failure raises with `how_to`."""
    if shutil.which(cmd[0]) is None:
        raise ManualStepRequired(f"`{cmd[0]}` is not installed (needed for: {' '.join(cmd)}).\n{how_to}")
    try:
        res = subprocess.run(list(cmd), cwd=cwd, env={**os.environ, **(env or {})}, check=True,
                             stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE, text=True)
    except subprocess.CalledProcessError as e:
        raise DownloadFailed(f"`{' '.join(cmd)}` failed (exit {e.returncode}): {(e.stderr or '').strip()[-800:]}"
                             f"\n{how_to}") from None
    return res.stdout or ""


# ----------------------------------------------------------------------------------------------- prepare helpers
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def prepare_cache_dir(raw_dir: Path) -> Path:
    """Where prepare keeps per-clip caches: next to raw_dir, not inside it, because raw_dir is the DVC output
    of `fetch` and a dependency of `prepare` (writing into it would invalidate both stages)."""
    raw_dir = Path(raw_dir).resolve()
    return raw_dir.parent / ".cache" / raw_dir.name


def params_key(params: Mapping[str, Any]) -> str:
    """Short stable hash of preprocessing parameters: cache dirs change when the recipe changes."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


class ClipCache:
    """Per-clip results as `<root>/<key>.npz` (atomic write); `None` results are cached as skips."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        p = self.path(key)
        if not p.is_file():
            raise KeyError(key)
        with np.load(p, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        return None if "__skip__" in out else out

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, arrays: dict[str, np.ndarray] | None, reason: str = "") -> None:
        buf = io.BytesIO()
        if arrays is None:
            np.savez(buf, __skip__=np.array(reason))
        else:
            np.savez(buf, **arrays)
        atomic_write_bytes(self.path(key), buf.getvalue())

    def skip_reason(self, key: str) -> str | None:
        with np.load(self.path(key), allow_pickle=False) as z:
            return str(z["__skip__"]) if "__skip__" in z.files else None


def map_clips(fn: Callable[[Any], dict[str, np.ndarray]], items: Sequence[tuple[str, Any]], cache: ClipCache,
              *, jobs: int = 1, desc: str = "clips", skip_errors: tuple[type, ...] = ()) -> dict[str, Any]:
    """Run `fn(arg)` for each `(key, arg)` not yet cached; results go to `cache` as they finish.

    An exception of a type in `skip_errors` caches the clip as skipped (with its reason); any other
    exception aborts, leaving finished clips cached so a re-run resumes. Returns {key: ok} (False = skipped).
    """
    todo = [(k, a) for k, a in items if not cache.has(k)]

    def work(item):
        key, arg = item
        try:
            cache.put(key, fn(arg))
        except skip_errors as e:
            cache.put(key, None, reason=f"{type(e).__name__}: {e}")
        return key

    if todo:
        map_parallel(work, todo, jobs=jobs, desc=desc, initial=len(items) - len(todo), total=len(items))
    return {k: cache.skip_reason(k) is None for k, _ in items}


def stack_cached(cache: ClipCache, keys: Sequence[str], names: Sequence[str], work_dir: Path,
                 like: str | None = None) -> dict[str, np.ndarray]:
    """Stack cached per-clip arrays into memory-mapped `.npy` files under `work_dir` (no full copy in RAM).

    `like` names a cached clip giving shapes/dtypes when `keys` is empty (an empty split).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    first = cache.get(keys[0] if keys else like) if (keys or like) else None
    out = {}
    for name in names:
        if first is None:
            raise RawDataError(f"{cache.root}: no clips to stack for {name!r}")
        arr = np.lib.format.open_memmap(work_dir / f"{name}.npy", mode="w+", dtype=first[name].dtype,
                                        shape=(len(keys), *first[name].shape))
        for i, k in enumerate(keys):
            arr[i] = cache.get(k)[name]
        arr.flush()
        out[name] = arr
    return out


def map_parallel(fn: Callable, items: Sequence, *, jobs: int = 1, desc: str = "", initial: int = 0,
                 total: int | None = None) -> list:
    """Ordered map with a thread pool (PyAV decoding and torch STFT release the GIL) and a progress bar."""
    bar = _bar(total=total if total is not None else len(items) + initial, initial=initial, desc=desc,
               disable=len(items) < 2)
    out = []
    try:
        if jobs <= 1:
            for it in items:
                out.append(fn(it))
                bar.update(1)
        else:
            with ThreadPoolExecutor(max_workers=jobs) as ex:
                futures = [ex.submit(fn, it) for it in items]
                try:
                    for fut in futures:
                        out.append(fut.result())
                        bar.update(1)
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    finally:
        bar.close()
    return out


def default_jobs() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


def _bar(**kw):
    from tqdm.auto import tqdm

    kw.setdefault("file", sys.stderr)
    kw.setdefault("leave", False)
    return tqdm(**kw)


def _log(msg: str) -> None:
    print(f"[g2d] {msg}", file=sys.stderr)
