"""Shared download / verify / extract / per-clip-cache helpers for `g2d.data.raw.<name>`.

Everything a real `fetch` needs without depending on a dataset host being up:
* `download(url, dest, sha256=...)`: resumable (HTTP Range on `<dest>.part`), tqdm progress, sha256-checked;
  a file that already verifies is never downloaded again. Time limits: `timeout` (default 15 s) for the
  connection and for each wait on the server; a server that accepts the connection but sends no response in
  that time is reported as such ("host unreachable" is kept for refused / timed-out connections); a transfer
  slower than `min_rate` B/s over any `stall_timeout`-second window (defaults 1 KiB/s, 60 s) is stopped as
  stalled. Every byte received is kept in `<dest>.part`, so the next run resumes with a Range request.
* Format validation (`format_problem`): a file with no published checksum is accepted, and its sha256 recorded,
  only after it passes its format's own check: HTML/error pages are rejected for any non-HTML name; zip
  (.zip/.xlsx/.npz: every member's CRC), tar (.tar/.tar.gz/.tgz/.tar.bz2/.tar.xz: read to the end), .gz,
  pickle (protocol header, final STOP opcode), .npy (header + exact size), .json, .csv/.txt (UTF-8),
  .wav (RIFF/WAVE), .flv, .mp4/.m4a/.mov, .mkv/.webm (container magic). A rejected download is deleted and
  nothing is recorded.
* `verify` / `verify_or_record`: sha256sum-format manifests (`<hex>  <relpath>`); where no checksum is
  published, a validated file's sha256 is recorded on first use and checked afterwards. A mismatch against a
  recorded (not published) checksum says how to reset the entry:
  `python -m g2d.data.raw.fetching forget <MANIFEST.sha256> <relpath>` (or delete that line), then fetch again.
* `verify_fetched` / `verify_extracted`: `prepare`'s own re-check of what `fetch` verified, before trusting it.
* `extract(archive, dest)`: atomic (temp dir + rename), refuses path traversal; the `.extracted` marker lists
  the sha256 of every extracted file.
* `ClipCache` + `map_clips`: per-clip results cached atomically under `prepare_cache_dir(raw_dir)` (default
  `data/cache/<name>/`, outside every stage's output), each entry valid only for the sha256 + size of its
  source files, the preprocessing parameters and the code version it was made with (see `ClipCache`).
Errors are `RawDataError` subclasses whose text says what to obtain, where to put it and what to run next;
the CLI prints them without a traceback.
"""
from __future__ import annotations

import codecs
import hashlib
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from g2d.data.prepared import atomic_write_bytes  # noqa: F401 (the one atomic writer; F.atomic_write_bytes)

MANIFEST = "MANIFEST.sha256"
CHUNK = 1 << 20
STALL_TIMEOUT = 60.0  # s: a transfer slower than MIN_RATE over this window is stopped (partial file kept)
MIN_RATE = 1024.0     # B/s


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


class DigestStore:
    """sha256 of files, remembered by their stat stamp (size, mtime_ns, ctime_ns, inode) so that an unchanged
    file is not hashed again; any write, replacement, `cp -p`/rsync copy or chmod changes the stamp (ctime
    cannot be set from user space) and the file is hashed afresh. A file changed less than `RACY_S` seconds
    before it was hashed is not remembered (a write in the same timestamp tick would keep the stamp, as in
    git's "racy" index entries). Persisted as JSON at `path` (None: in memory only); thread-safe."""

    RACY_S = 2.0

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else None
        self._d: dict[str, list] = {}
        self._lock = threading.Lock()
        self._dirty = False
        if self.path and self.path.is_file():
            try:
                d = json.loads(self.path.read_text())
                self._d = d if isinstance(d, dict) else {}
            except (ValueError, OSError):
                self._d = {}

    @staticmethod
    def _stamp(st: os.stat_result) -> list:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def sha256(self, path: Path) -> str:
        path = Path(path)
        key = os.path.abspath(path)
        stamp = self._stamp(os.stat(path))
        with self._lock:
            rec = self._d.get(key)
        if isinstance(rec, list) and len(rec) == 5 and rec[:4] == stamp:
            return rec[4]
        digest = sha256_file(path)
        after = self._stamp(os.stat(path))
        recent = time.time_ns() - max(after[1], after[2]) < self.RACY_S * 1e9
        with self._lock:
            if after == stamp and not recent:
                self._d[key] = [*stamp, digest]
            else:
                self._d.pop(key, None)
            self._dirty = True
        return digest

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        with self._lock:
            data = json.dumps(self._d, sort_keys=True).encode()
            self._dirty = False
        atomic_write_bytes(self.path, data)


def read_manifest(path: Path) -> dict[str, str]:
    """sha256sum format: `<64 hex>  <relpath>` per line (a leading `*` on the path is accepted)."""
    return read_manifest_text(Path(path).read_text().splitlines(), path)


def write_manifest(path: Path, entries: Mapping[str, str]) -> Path:
    text = "".join(f"{h}  {rel}\n" for rel, h in sorted(entries.items()))
    atomic_write_bytes(Path(path), text.encode())
    return Path(path)


def forget(manifest: Path, rels: Iterable[str]) -> list[str]:
    """Remove the entries `rels` from a manifest (reset a checksum recorded on first use); returns those removed."""
    manifest = Path(manifest)
    entries = read_manifest(manifest) if manifest.is_file() else {}
    gone = [r for r in rels if entries.pop(r, None) is not None]
    if gone:
        write_manifest(manifest, entries)
    return gone


def reset_hint(manifest: Path, rel: str, rerun: str) -> str:
    """How to reset a recorded (trust-on-first-use) manifest entry: part of every mismatch against one."""
    return (f"If instead the recorded checksum is the wrong one (recorded from a bad first download, or the file "
            f"changed upstream), reset the entry: `python -m g2d.data.raw.fetching forget {manifest} {rel}` (or "
            f"delete the line ending in '  {rel}' from {manifest}), then run `{rerun}`: the file is validated "
            f"and its checksum recorded again.")


def hash_files(root: Path, rels: Iterable[str], jobs: int = 1, desc: str = "sha256",
               digests: DigestStore | None = None) -> dict[str, str]:
    rels = list(rels)
    root = Path(root)
    missing = [r for r in rels if not (root / r).is_file()]
    if missing:
        raise MissingRawFile(f"{root / missing[0]}: missing ({len(missing)} file(s) missing in total); "
                             f"re-run fetch or restore the file(s)")
    fn = digests.sha256 if digests is not None else sha256_file
    out = map_parallel(lambda r: fn(root / r), rels, jobs=jobs, desc=desc)
    return dict(zip(rels, out))


def verify(raw_dir: Path, manifest: Path | Mapping[str, str], jobs: int = 1, rerun: str = "g2d fetch <dataset>",
           sizes: Mapping[str, int] | None = None, recorded: bool = False) -> list[str]:
    """Check every file of `manifest` under `raw_dir`; raise naming the bad/missing files, else list them.

    `recorded`: the manifest holds checksums recorded on first use (not published ones); a mismatch then
    also says how to reset the entry."""
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
        hint = ("\n" + reset_hint(manifest, r, rerun)) if recorded and isinstance(manifest, (str, Path)) else ""
        raise ChecksumMismatch(
            f"{raw_dir / r}: sha256 {got[r]} != expected {entries[r]} ({len(bad)} of {len(entries)} file(s) "
            f"differ). Delete the bad file(s) and run `{rerun}` to re-download them." + hint)
    return sorted(entries)


def verify_or_record(raw_dir: Path, rels: Iterable[str], manifest: Path | None = None, jobs: int = 1,
                     rerun: str = "g2d fetch <dataset>") -> Path:
    """No published checksums: files already in `<raw_dir>/MANIFEST.sha256` are verified against it; the others
    are recorded, but only after they pass their format's validation (`format_problem`)."""
    raw_dir = Path(raw_dir)
    rels = list(rels)
    manifest = Path(manifest) if manifest else raw_dir / MANIFEST
    recorded = read_manifest(manifest) if manifest.is_file() else {}
    if recorded:
        verify(raw_dir, manifest, jobs=jobs, rerun=rerun, recorded=True)
    new = [r for r in rels if r not in recorded]
    if new:
        missing = [r for r in new if not (raw_dir / r).is_file()]
        if missing:
            raise MissingRawFile(f"{raw_dir / missing[0]}: missing ({len(missing)} file(s) missing in total); "
                                 f"restore the file(s) and run `{rerun}`")
        problems = map_parallel(lambda r: format_problem(raw_dir / r), new, jobs=jobs, desc="validate")
        bad = [(r, p) for r, p in zip(new, problems) if p]
        if bad:
            r, why = bad[0]
            raise CorruptRawFile(f"{raw_dir / r}: {why} ({len(bad)} of {len(new)} file(s) fail their format check); "
                                 f"no checksum recorded in {manifest}. Replace the file(s) with good copies and run "
                                 f"`{rerun}`.")
        write_manifest(manifest, {**recorded, **hash_files(raw_dir, new, jobs=jobs, desc=f"manifest {raw_dir.name}")})
        _log(f"recorded {len(new)} checksum(s) in {manifest} (no published checksums: later runs verify against it)")
    return manifest


def fix_hint(name: str) -> str:
    return f"`g2d fetch {name}` (or `dvc repro fetch@{name}`)"


def verify_fetched(manifest: Path, root: Path, name: str, *, rels: Iterable[str] | None = None,
                   digests: DigestStore | None = None, jobs: int = 1, missing: str = "error") -> list[str]:
    """`prepare`'s re-check of what `fetch` verified: the files of `manifest` (or those of `rels` it lists) under
    `root` against their sha256, before anything is computed from them. Unchanged files are not re-hashed
    (`digests`). A manifest-listed file that is absent raises (`missing="error"`) or is left to the caller
    (`"ignore"`: datasets that count missing clips). No manifest: nothing was fetched, nothing to re-check."""
    manifest, root = Path(manifest), Path(root)
    if not manifest.is_file():
        _log(f"{name}: no {manifest}: raw files not fetched by `g2d fetch {name}`, so not re-verified")
        return []
    entries = read_manifest(manifest)
    want = dict(entries) if rels is None else {r: entries[r] for r in dict.fromkeys(rels) if r in entries}
    absent = [r for r in want if not (root / r).is_file()]
    if absent and missing == "error":
        raise MissingRawFile(
            f"{root / absent[0]}: listed in {manifest} (verified by `g2d fetch {name}`) but missing now "
            f"({len(absent)} file(s)). Restore it: run {fix_hint(name)}.")
    check = [r for r in want if r not in absent]
    store = digests if digests is not None else DigestStore()
    got = map_parallel(lambda r: store.sha256(root / r), check, jobs=jobs, desc=f"re-verify {name}")
    store.save()
    bad = [r for r, g in zip(check, got) if g != want[r]]
    if bad:
        r = bad[0]
        raise ChecksumMismatch(
            f"{root / r}: sha256 {dict(zip(check, got))[r]} != {want[r]} in {manifest}: the file changed after "
            f"`g2d fetch {name}` verified it ({len(bad)} of {len(check)} file(s) differ); prepare does not use it. "
            f"Delete the changed file(s) and run {fix_hint(name)} to download and verify them again.")
    return check


def verify_extracted(dest: Path, name: str, *, archive: Path | None = None,
                     digests: DigestStore | None = None, jobs: int = 1) -> list[str]:
    """`prepare`'s re-check of a tree written by `extract`: every file its `.extracted` marker lists, against the
    sha256 recorded at extraction, and the archive (when given and present) against the marker's digest."""
    dest = Path(dest)
    marker = dest / ".extracted"
    if not marker.is_file():
        return []
    lines = marker.read_text().splitlines()
    store = digests if digests is not None else DigestStore()
    if archive is not None and Path(archive).is_file() and lines and store.sha256(archive) != lines[0].strip():
        raise ChecksumMismatch(f"{dest}: extracted from another version of {archive} (sha256 differs from its "
                               f"{marker.name} marker); run {fix_hint(name)} to extract it again.")
    try:
        entries = read_manifest_text(lines[1:], marker, 2)
    except RawDataError:
        entries = {}
    absent = [r for r in entries if not (dest / r).is_file()]
    if absent:
        raise MissingRawFile(f"{dest / absent[0]}: extracted by `g2d fetch {name}` but missing now ({len(absent)} "
                             f"file(s)). Delete {dest} and run {fix_hint(name)} to extract it again.")
    rels = list(entries)
    got = map_parallel(lambda r: store.sha256(dest / r), rels, jobs=jobs, desc=f"re-verify {name}")
    store.save()
    bad = [r for r, g in zip(rels, got) if g != entries[r]]
    if bad:
        raise ChecksumMismatch(f"{dest / bad[0]}: changed after `g2d fetch {name}` extracted it (sha256 differs "
                               f"from {marker}; {len(bad)} file(s)); prepare does not use it. Delete {dest} and run "
                               f"{fix_hint(name)} to extract it again.")
    return rels


def read_manifest_text(lines: Iterable[str], where: Path, first_line: int = 1) -> dict[str, str]:
    out = {}
    for n, line in enumerate(lines, first_line):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise RawDataError(f"{where}:{n}: not a sha256sum line: {line!r}")
        out[parts[1].lstrip("*")] = parts[0].lower()
    return out


# ----------------------------------------------------------------------------------------------- validation
_TAR = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_ZIP = (".zip", ".xlsx", ".npz", ".docx", ".jar")
_KINDS = {".zip": "zip archive", ".xlsx": "xlsx workbook", ".npz": ".npz archive", ".pkl": "pickle",
          ".pickle": "pickle", ".npy": ".npy array", ".json": "JSON file", ".csv": "csv file", ".wav": "WAV file",
          ".gz": "gzip file", ".flv": "FLV video", ".mp4": "MP4 video"}
_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid"}


def _suffix(name: str) -> str:
    name = name.lower()
    for s in _TAR:
        if name.endswith(s):
            return s
    return os.path.splitext(name)[1]


def _kind(name: str) -> str:
    s = _suffix(name)
    return "tar archive" if s in _TAR else _KINDS.get(s, f"{s or 'extension-less'} file")


def looks_like_html(head: bytes) -> bool:
    h = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return h.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")) or (
        h.startswith(b"<") and b"<html" in h[:2048])


def format_problem(path: Path, name: str | None = None) -> str | None:
    """None if `path` passes its format's own validation (by its name, or `name`: the file a `.part` becomes),
    else what is wrong (for messages).

    Checks: empty file; HTML/XML page for any non-HTML name; zip/xlsx/npz: opens and every member's CRC
    matches; tar(.gz/.bz2/.xz): every member reads to its declared size; .gz: decompresses to the end; pickle:
    a known protocol header and the final STOP opcode ('.'); .npy: header and exact size; .json: parses;
    .csv/.txt/.tsv: UTF-8; .wav: RIFF/WAVE; .flv / .mp4 / .m4a / .mov / .mkv / .webm: container magic."""
    import gzip

    path = Path(path)
    suffix, kind = _suffix(name or path.name), _kind(name or path.name)
    size = path.stat().st_size
    if size == 0:
        return f"not a {kind}: the file is empty"
    with open(path, "rb") as f:
        head = f.read(4096)
        f.seek(max(0, size - 1))
        last = f.read(1)
    if suffix not in (".html", ".htm", ".xml", ".svg") and looks_like_html(head):
        return (f"not a {kind}: it is an HTML page (the server sent a sign-in, quota or error page instead of "
                f"the file)")
    try:
        if suffix in _ZIP:
            if not zipfile.is_zipfile(path):
                return f"not a {kind}: no zip directory (truncated or another format)"
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                return f"not a valid {kind}: member {bad!r} fails its CRC check (corrupt)"
        elif suffix in _TAR:
            with tarfile.open(path) as t:
                n = 0
                for m in t:
                    n += 1
                    if m.isfile():
                        got, src = 0, t.extractfile(m)
                        for block in iter(lambda: src.read(CHUNK), b""):
                            got += len(block)
                        if got != m.size:
                            return f"not a valid {kind}: member {m.name!r} is cut short (truncated)"
                if n == 0:
                    return f"not a valid {kind}: no members"
        elif suffix == ".gz":
            with gzip.open(path) as g:
                for _ in iter(lambda: g.read(CHUNK), b""):
                    pass
        elif suffix in (".pkl", ".pickle"):
            proto_ok = head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5
            if not (proto_ok or head[:1] in (b"(", b"]", b"}", b"c", b"l", b"d", b"I", b"N", b"S", b"V", b"F")):
                return f"not a {kind}: no pickle protocol header"
            if last != b".":
                return f"not a valid {kind}: no final STOP opcode (truncated)"
        elif suffix == ".npy":
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                offset = f.tell()
            if not dtype.hasobject:
                want = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if size != want:
                    return f"not a valid {kind}: {size} B, its header {shape} {dtype} needs {want} B (truncated?)"
        elif suffix == ".json":
            json.loads(path.read_bytes())
        elif suffix in (".csv", ".txt", ".tsv"):
            codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < 4096)
        elif suffix == ".wav":
            if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return f"not a {kind}: no RIFF/WAVE header"
        elif suffix == ".flv":
            if head[:3] != b"FLV":
                return f"not a {kind}: no FLV header"
        elif suffix in (".mp4", ".m4a", ".m4v", ".mov"):
            if head[4:8] not in _MP4_BOXES:
                return f"not a {kind}: no ISO-BMFF box at the start"
        elif suffix in (".mkv", ".webm"):
            if head[:4] != b"\x1a\x45\xdf\xa3":
                return f"not a {kind}: no Matroska/WebM header"
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError, UnicodeDecodeError,
            zlib.error) as e:
        return f"not a valid {kind}: {type(e).__name__}: {e} (truncated or another format)"
    return None


# ----------------------------------------------------------------------------------------------- download
@dataclass(frozen=True)
class Remote:
    url: str
    filename: str
    sha256: str | None = None
    size: int | None = None


def download(url: str, dest: Path, sha256: str | None = None, *, size: int | None = None,
             timeout: float = 15.0, how_to: str = "", progress: bool = True, stall_timeout: float | None = None,
             min_rate: float | None = None, recorded_in: Path | None = None,
             rerun: str = "g2d fetch <dataset>") -> Path:
    """Resumable, verified download of `url` to `dest` (`dest.part` holds partial bytes between runs).

    `sha256`: the published checksum, or (with `recorded_in` = the manifest it came from) one recorded on first
    use. Without one, the finished file must pass `format_problem` (else it is deleted). `timeout`: connect and
    per-read limit; `stall_timeout` / `min_rate` (default STALL_TIMEOUT s / MIN_RATE B/s): a slower transfer is
    stopped. Every stop keeps the bytes received in `dest.part` for the next run to resume. `how_to` is appended
    to every failure message (e.g. how to get the file by hand). A `dest` that already verifies (sha256, else
    size, else mere presence when neither is known) is returned untouched.
    """
    dest = Path(dest)
    hint = f"\n{how_to}" if how_to else ""
    stall = STALL_TIMEOUT if stall_timeout is None else float(stall_timeout)
    rate = MIN_RATE if min_rate is None else float(min_rate)
    reset = ("\n" + reset_hint(recorded_in, dest.name, rerun)) if recorded_in is not None else ""
    if dest.is_file():
        if sha256 is None and (size is None or dest.stat().st_size == size):
            return dest
        if sha256 is not None and sha256_file(dest) == sha256.lower():
            return dest
        what = (f"sha256 {sha256}" + (f" recorded in {recorded_in} on first download" if recorded_in else "")
                if sha256 else f"size {size} B")
        raise ChecksumMismatch(f"{dest}: exists but does not match the expected {what}; if the file is damaged, "
                               f"delete it and re-run to download it again." + reset + hint)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    ctype = ""
    if size is None or have < size:
        ctype = _transfer(url, part, have, timeout, progress, dest, hint, stall, rate)
    if size is not None and part.stat().st_size != size:  # the server finished: it holds a different file
        got = part.stat().st_size
        part.unlink()
        raise ChecksumMismatch(f"{dest}: the server sent {got} B, expected {size} B (from {url}); nothing was "
                               f"kept. Wrong URL or the file changed upstream." + hint)
    if sha256 is None or recorded_in is not None:  # nothing published: the format is the only evidence
        problem = format_problem(part, dest.name)
        if problem:
            part.unlink()
            served = f", Content-Type {ctype}" if ctype else ""
            raise CorruptRawFile(f"{dest}: {problem} (downloaded from {url}{served}); deleted, nothing recorded in "
                                 f"{MANIFEST}. Run `{rerun}` again later, or get the file by hand." + hint)
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256.lower():
            if recorded_in is not None:  # a valid file that differs from the recorded one: keep it, say how to reset
                raise ChecksumMismatch(
                    f"{dest}: downloaded sha256 {got} != {sha256} recorded in {recorded_in} on first download "
                    f"(from {url}). The new download passed its format check and is kept as {part}." + reset + hint)
            part.unlink()
            raise ChecksumMismatch(f"{dest}: downloaded sha256 {got} != expected {sha256} (from {url}); "
                                   f"the bad file was deleted, re-run to download it again." + hint)
    os.replace(part, dest)
    return dest


def _transfer(url: str, part: Path, have: int, timeout: float, progress: bool, dest: Path, hint: str,
              stall: float = STALL_TIMEOUT, min_rate: float = MIN_RATE) -> str:
    """GET `url` (Range from `have`) appending to `part`; returns the response's Content-Type."""
    req = urllib.request.Request(url, headers={"User-Agent": "g2d-bench"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: the part file is already complete
            return ""
        raise DownloadFailed(f"{url}: HTTP {e.code} {e.reason} while downloading {dest.name}." + hint) from None
    except urllib.error.URLError as e:  # connecting failed (refused, DNS, connect timeout, TLS)
        raise DownloadFailed(f"{url}: host unreachable ({e.reason}); could not download {dest.name} "
                             f"(offline machine or dead host?)." + hint) from None
    except TimeoutError:  # connected and sent the request, no status line within `timeout`
        raise DownloadFailed(f"{url}: server accepted the connection but did not answer within {timeout:g} s; "
                             f"could not download {dest.name} (overloaded or hung server: try again later)."
                             + hint) from None
    except http.client.RemoteDisconnected:
        raise DownloadFailed(f"{url}: server accepted the connection but closed it without answering; could not "
                             f"download {dest.name}." + hint) from None
    except (OSError, http.client.HTTPException) as e:
        raise DownloadFailed(f"{url}: request failed ({type(e).__name__}: {e}); could not download {dest.name}."
                             + hint) from None
    with resp:
        status = getattr(resp, "status", 200)
        ctype = resp.headers.get("Content-Type", "") or ""
        mode = "ab" if (have and status == 206) else "wb"
        if mode == "wb":
            have = 0
        total = resp.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        bar = _bar(total=total, initial=have, desc=dest.name, unit="B", unit_scale=True, disable=not progress)
        try:
            with open(part, mode) as f:
                window_t, window_n = time.monotonic(), 0
                while True:
                    try:
                        block = resp.read1(CHUNK)  # whatever has arrived: nothing received is held back
                    except TimeoutError:
                        f.flush()
                        raise DownloadFailed(f"{url}: no data for {timeout:g} s (stalled transfer); {part} keeps "
                                             f"{part.stat().st_size} B, re-run to resume." + hint) from None
                    except (OSError, http.client.HTTPException) as e:
                        f.flush()
                        raise DownloadFailed(f"{url}: transfer interrupted ({e}); {part} keeps "
                                             f"{part.stat().st_size} B, re-run to resume." + hint) from None
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
                    window_n += len(block)
                    now = time.monotonic()
                    if now - window_t >= stall:
                        if window_n < min_rate * (now - window_t):
                            f.flush()
                            raise DownloadFailed(
                                f"{url}: transfer stalled: {window_n} B in the last {now - window_t:.1f} s, below "
                                f"the minimum {min_rate:g} B/s over {stall:g} s; {part} keeps "
                                f"{part.stat().st_size} B, re-run to resume." + hint)
                        window_t, window_n = now, 0
        finally:
            bar.close()
    if total is not None and part.stat().st_size < total:
        raise DownloadFailed(f"{url}: connection closed after {part.stat().st_size} of {total} B; {part} is "
                             f"kept, re-run to resume." + hint)
    return ctype


def fetch_remotes(remotes: Sequence[Remote], raw_dir: Path, *, timeout: float = 15.0, how_to: str = "",
                  record: bool = True, jobs: int = 1, stall_timeout: float | None = None,
                  min_rate: float | None = None, rerun: str = "g2d fetch <dataset>") -> list[Path]:
    """Download a list of `Remote`s into raw_dir; those without a sha256 are pinned in MANIFEST.sha256, and only
    once they pass their format's validation (an HTML page or a truncated archive is never recorded)."""
    raw_dir = Path(raw_dir)
    manifest = raw_dir / MANIFEST
    recorded = read_manifest(manifest) if manifest.is_file() else {}

    def get(r: Remote) -> Path:
        tofu = not r.sha256 and r.filename in recorded
        return download(r.url, raw_dir / r.filename, r.sha256 or recorded.get(r.filename), size=r.size,
                        timeout=timeout, how_to=how_to, progress=jobs <= 1, stall_timeout=stall_timeout,
                        min_rate=min_rate, recorded_in=manifest if tofu else None, rerun=rerun)

    paths = map_parallel(get, list(remotes), jobs=jobs, desc="download")
    if record:
        new = {}
        for r in remotes:
            if r.filename in recorded:
                continue
            path = raw_dir / r.filename
            problem = None if r.sha256 else format_problem(path)  # placed by hand, or by an older g2d
            if problem:
                raise CorruptRawFile(f"{path}: {problem}; no checksum recorded in {manifest}. Delete it and run "
                                     f"`{rerun}` to download it again." + (f"\n{how_to}" if how_to else ""))
            new[r.filename] = (r.sha256 or sha256_file(path)).lower()
        if new:
            write_manifest(manifest, {**recorded, **new})
    return paths


# ----------------------------------------------------------------------------------------------- extract
def extract(archive: Path, dest: Path, *, expect: Sequence[str] = ()) -> Path:
    """Extract a tar(.gz/.bz2/.xz) or zip into `dest` atomically; skip if `dest` is already complete.

    Completeness = a `.extracted` marker (written last): first line the archive's sha256, then the sha256 of
    every extracted file (sha256sum format), which `verify_extracted` re-checks at prepare time. `expect`
    lists relative paths that must exist after extraction (a wrong archive fails here, not later in prepare).
    """
    archive, dest = Path(archive), Path(dest)
    digest = sha256_file(archive)
    if marker_digest(dest) == digest:
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
        write_extract_marker(tmp, digest)
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


def marker_digest(dest: Path) -> str | None:
    """The archive sha256 an `.extracted` marker names (its first line), None without a marker."""
    marker = Path(dest) / ".extracted"
    if not marker.is_file():
        return None
    lines = marker.read_text().splitlines()
    return lines[0].strip() if lines else ""


def write_extract_marker(tree: Path, digest: str) -> None:
    """`.extracted`: the archive's sha256, then `<sha256>  <relpath>` of every file of `tree`."""
    tree = Path(tree)
    rels = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file() and p.name != ".extracted")
    body = "".join(f"{sha256_file(tree / r)}  {r}\n" for r in rels)
    (tree / ".extracted").write_text(digest + "\n" + body)


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
def prepare_cache_dir(raw_dir: Path, cache_dir: str | Path = "", *, out_dir: Path | None = None,
                      option: str = "cache_dir") -> Path:
    """A dataset's cache folder (per-clip results, file digests, assembly work areas): outside every stage's
    output, so that writing it invalidates nothing and nothing else can overwrite it.

    Default: the `cache` folder next to the raw root, `<paths.raw>/../cache/<name>`, i.e. `data/raw/<name>` ->
    `data/cache/<name>` (git-ignored, no DVC stage's output); a raw root not named `raw` (a hand-made layout)
    gets `<raw root>/.cache/<name>` (still outside the fetch output `<raw root>/<name>`). `cache_dir` (the
    `datasets.<name>.real.cache_dir` option, `option` names it in errors) is used as given instead. A folder
    inside `raw_dir` (the fetch stage's output) or inside `out_dir` (the prepare stage's output) is refused.
    """
    raw_dir = Path(raw_dir).resolve()
    if cache_dir:
        out = Path(cache_dir).expanduser().resolve()
    elif raw_dir.parent.name == "raw":
        out = raw_dir.parent.parent / "cache" / raw_dir.name
    else:
        out = raw_dir.parent / ".cache" / raw_dir.name
    for stage, d in (("fetch", raw_dir), ("prepare", Path(out_dir).resolve() if out_dir else None)):
        if d is not None and (out == d or d in out.parents):
            raise RawDataError(f"{option}: {out} is inside {d}, the output of the `{stage}` stage; a cache there "
                               f"would change (and be replaced with) that output. Choose a folder outside it "
                               f"(default: {raw_dir.parent.parent / 'cache' / raw_dir.name}).")
    return out


def params_key(params: Mapping[str, Any]) -> str:
    """Short stable hash of preprocessing parameters: cache dirs change when the recipe changes."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def code_version(*files: str | Path, libraries: Sequence[str] = ()) -> dict[str, str]:
    """The code a cached result depends on: sha256 (16 hex) of each source file (the dataset's raw module and
    the modules it borrows from) plus the installed versions of the decoding `libraries`. Part of every
    ClipCache key: any edit of those files or an upgrade of those libraries invalidates the cache."""
    from importlib import metadata

    out = {Path(f).name: hashlib.sha256(Path(f).read_bytes()).hexdigest()[:16] for f in files}
    for lib in libraries:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


CACHE_FORMAT = 2  # bump when the entry layout or its key changes


class ClipCache:
    """Per-clip results as `<root>/<key>.npz` (atomic write), each valid only for what it was computed from.

    Cache key of an entry (stored in its `__entry__` record and compared on every lookup):
    * `salt`: hash of the preprocessing `params`, the `code` version (`code_version`) and CACHE_FORMAT;
    * the sources: (file name, size, sha256) of every file the clip was computed from. File digests come from
      a `DigestStore`, so an unchanged file (same size, mtime, ctime, inode) is not hashed again, and a
      truncated, replaced or edited file is.
    Any difference and the clip is recomputed (the entry is overwritten: no stale entries pile up). A `None`
    result (a skip, e.g. an undecodable clip under `skip_corrupt`) records the exception's class names and is
    reused only while its sources are unchanged and the caller still skips that class: fixing the file or
    turning the skip option off re-evaluates it.
    """

    def __init__(self, root: Path, *, params: Any = None, code: Any = None, digests: DigestStore | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.salt = params_key({"params": params, "code": code, "format": CACHE_FORMAT})
        self.digests = digests if digests is not None else DigestStore()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def identity(self, sources: Sequence[Path]) -> list[list]:
        out = []
        for s in sources:
            s = Path(s)
            try:
                out.append([s.name, s.stat().st_size, self.digests.sha256(s)])
            except FileNotFoundError:
                out.append([s.name, -1, ""])
        return out

    def entry(self, key: str) -> dict | None:
        """The stored `__entry__` record of `key` (None if absent or unreadable)."""
        try:
            with np.load(self.path(key), allow_pickle=False) as z:
                return json.loads(str(z["__entry__"])) if "__entry__" in z.files else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None

    def valid(self, key: str, sources: Sequence[Path], skip_errors: tuple[type, ...] = ()) -> bool:
        e = self.entry(key)
        if e is None or e.get("salt") != self.salt:
            return False
        if e.get("skip") is not None:
            names = set(e.get("skip_classes", ()))
            if not any(f"{c.__module__}.{c.__qualname__}" in names for c in skip_errors):
                return False
        return e.get("sources") == self.identity(sources)

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        p = self.path(key)
        if not p.is_file():
            raise KeyError(key)
        with np.load(p, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files if k not in ("__entry__", "__skip__")}
            skipped = "__skip__" in z.files
        return None if skipped else out

    def has(self, key: str) -> bool:
        """An entry exists (of any key; `valid` tells whether it still applies)."""
        return self.path(key).is_file()

    def put(self, key: str, arrays: dict[str, np.ndarray] | None, reason: str = "", *,
            sources: list | None = None, skip_classes: Sequence[str] = ()) -> None:
        """Store `arrays` (None: a skip with `reason`); `sources` = `identity(...)` taken before computing."""
        rec = {"salt": self.salt, "sources": sources or [], "skip": reason if arrays is None else None,
               "skip_classes": list(skip_classes)}
        buf = io.BytesIO()
        if arrays is None:
            np.savez(buf, __skip__=np.array(reason), __entry__=np.array(json.dumps(rec)))
        else:
            np.savez(buf, **arrays, __entry__=np.array(json.dumps(rec)))
        atomic_write_bytes(self.path(key), buf.getvalue(), fsync=False)  # a cache: rebuilt if lost

    def skip_reason(self, key: str) -> str | None:
        with np.load(self.path(key), allow_pickle=False) as z:
            return str(z["__skip__"]) if "__skip__" in z.files else None


def map_clips(fn: Callable[[Any], dict[str, np.ndarray]], items: Sequence[tuple[str, Any]], cache: ClipCache,
              *, sources: Callable[[Any], Sequence[Path]], jobs: int = 1, desc: str = "clips",
              skip_errors: tuple[type, ...] = ()) -> dict[str, Any]:
    """Run `fn(arg)` for each `(key, arg)` without a valid cache entry; results go to `cache` as they finish.

    `sources(arg)` lists the files the result is computed from (their size + sha256 are part of the entry's
    key; `lambda arg: ()` for a pure function of `arg`). An exception of a type in `skip_errors` caches the
    clip as skipped (with its reason); any other exception aborts, leaving finished clips cached so a re-run
    resumes. Returns {key: ok} (False = skipped).
    """
    todo = [(k, a) for k, a in items if not cache.valid(k, sources(a), skip_errors)]

    def work(item):
        key, arg = item
        srcs = list(sources(arg))
        before = cache.identity(srcs)
        try:
            result, reason, classes = fn(arg), "", ()
        except skip_errors as e:
            result, reason = None, f"{type(e).__name__}: {e}"
            classes = [f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__]
        if cache.identity(srcs) != before:
            raise RawDataError(f"{srcs[0]}: changed while it was being prepared; run prepare again")
        cache.put(key, result, reason, sources=before, skip_classes=classes)
        return key

    try:
        if todo:
            map_parallel(work, todo, jobs=jobs, desc=desc, initial=len(items) - len(todo), total=len(items))
    finally:
        cache.digests.save()
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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m g2d.data.raw.fetching forget <MANIFEST.sha256> <relpath>...`: reset checksums recorded on first
    use, so that the next `g2d fetch` validates the file again and records its checksum afresh."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "forget":
        print("usage: python -m g2d.data.raw.fetching forget <MANIFEST.sha256> <relpath> [<relpath> ...]",
              file=sys.stderr)
        return 2
    manifest, rels = Path(args[1]), args[2:]
    gone = forget(manifest, rels)
    for r in rels:
        print(f"{manifest}: {'removed' if r in gone else 'no entry for'} {r}")
    return 0 if gone else 1


if __name__ == "__main__":
    sys.exit(main())
