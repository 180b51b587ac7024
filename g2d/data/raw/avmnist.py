"""AV-MNIST real data: MultiBench's preprocessed `avmnist.tar.gz` (manual Google-Drive step), verified + extracted.

Layout (MultiBench / MFAS, also read by G2D): `image/{train,test}_data.npy` (N, 784) or (N, 28, 28),
`audio/{train,test}_data.npy` (N, 112, 112), `{train,test}_labels.npy` (N,); 60,000 train / 10,000 test.
prepare = the official loaders (G2D dataset/AVMNIST.py, MultiBench get_data.py): divide by 255, add a channel.
Licences of the components: MNIST (CC BY-SA 3.0), FSDD (CC BY-SA 4.0), ESC-50 noise (CC BY-NC 3.0).
No checksum is published: `fetch` records the archive's sha256 in `<raw_dir>/MANIFEST.sha256` only once it has
passed its format check (a complete tar.gz, no HTML page) and extracted into the expected layout; a later
mismatch says how to reset that entry. prepare re-checks the archive and the extracted files (their sha256 in
the `.extracted` marker) before reading them, and assembles in `cache_dir` (default `data/cache/avmnist/`,
outside every stage's output).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from g2d.data.prepared import stratified_split, write_prepared
from g2d.data.raw import fetching as F

NAME = "avmnist"
PREFIX = "datasets.avmnist.real"
ARCHIVE = "avmnist.tar.gz"
DRIVE_ID = "1KvKynJJca5tDtI5Mmp6CoRh9pQywH8Xp"  # pliang279/MultiBench README, "AV-MNIST" link
DRIVE_URL = f"https://drive.google.com/file/d/{DRIVE_ID}/view"
FILES = ("image/train_data.npy", "image/test_data.npy", "audio/train_data.npy", "audio/test_data.npy",
         "train_labels.npy", "test_labels.npy")
LICENCES = {"MNIST": "CC BY-SA 3.0", "FSDD (free-spoken-digit-dataset)": "CC BY-SA 4.0",
            "ESC-50 (noise)": "CC BY-NC 3.0 (non-commercial)",
            "MultiBench avmnist.tar.gz": "redistributed by MultiBench (MIT code licence; data keeps the above)"}


@dataclass
class Options:
    archive: str = ""        # avmnist.tar.gz somewhere else than <raw_dir>/avmnist.tar.gz
    folder: str = ""         # an already-extracted avmnist folder (contains image/ audio/ *_labels.npy)
    url: str = ""            # a direct-download mirror of avmnist.tar.gz (Google Drive needs the manual step)
    sha256: str = ""         # pin the archive's sha256 (none is published; else recorded on first use)
    timeout: float = 15.0
    cache_dir: str = ""      # assembly work area (default data/cache/avmnist: <paths.raw>/../cache/avmnist)
    val_fraction: float = 0.1
    split_seed: int = 0
    val_mode: str = "stratified"  # stratified (seeded, fraction) | multibench (train[55000:] as MultiBench)
    chunk: int = 5000

    def __post_init__(self):
        if self.val_mode not in ("stratified", "multibench"):
            raise ValueError(f"val_mode={self.val_mode!r} must be 'stratified' or 'multibench'")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")


def options(opts) -> Options:
    return F.parse_options(Options, opts, PREFIX)


def _manual(raw_dir: Path) -> F.ManualStepRequired:
    return F.manual_step(
        f"AV-MNIST is distributed as MultiBench's preprocessed {ARCHIVE} on Google Drive, which cannot be "
        "downloaded without a browser step. To get it:",
        [(f"Open {DRIVE_URL} (the AV-MNIST link of github.com/pliang279/MultiBench) and download {ARCHIVE} "
          "(no login needed while the file stays public)."),
         (f"Put it at {Path(raw_dir) / ARCHIVE} (or set {PREFIX}.archive: <path>; an extracted folder: "
          f"{PREFIX}.folder: <path>; a direct mirror: {PREFIX}.url: <url>)."),
         "Licences: MNIST CC BY-SA 3.0, FSDD CC BY-SA 4.0, ESC-50 noise CC BY-NC 3.0 (non-commercial use only)."],
        "g2d fetch avmnist   (records the archive's sha256, verifies it later, extracts), then g2d prepare avmnist")


def fetch(raw_dir: Path, opts: dict) -> Path:
    opt = options(opts)
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    if opt.folder:
        root = Path(opt.folder).expanduser()
        _check_layout(root)
        F.verify_or_record(root, FILES, raw_dir / F.MANIFEST, rerun="g2d fetch avmnist")
        return root
    archive = Path(opt.archive).expanduser() if opt.archive else raw_dir / ARCHIVE
    manifest = raw_dir / F.MANIFEST
    recorded = F.read_manifest(manifest).get(ARCHIVE) if manifest.is_file() else None
    want = opt.sha256.lower() or recorded
    tofu = not opt.sha256 and recorded is not None
    if not archive.is_file():
        if not opt.url:
            raise _manual(raw_dir)
        F.download(opt.url, archive, want, timeout=opt.timeout, how_to=str(_manual(raw_dir)),
                   recorded_in=manifest if tofu else None, rerun="g2d fetch avmnist")
    got = F.sha256_file(archive)
    if want and got != want:
        reset = ("\n" + F.reset_hint(manifest, ARCHIVE, "g2d fetch avmnist")) if tofu else ""
        raise F.ChecksumMismatch(
            f"{archive}: sha256 {got} != {'pinned' if opt.sha256 else 'recorded'} {want}. The file changed since "
            f"it was first fetched (or is truncated): delete it and fetch again." + reset)
    if not want:  # nothing to check against: the archive must prove itself before its checksum is recorded
        problem = F.format_problem(archive)
        if problem:
            raise F.CorruptRawFile(f"{archive}: {problem}; no checksum recorded in {manifest}. Delete it and "
                                   f"download {ARCHIVE} again (see `g2d fetch avmnist`).")
    dest = F.extract(archive, raw_dir / "extracted")
    root = _find_root(dest)
    _check_layout(root)
    if not want:
        F.write_manifest(manifest, {ARCHIVE: got})
        F._log(f"avmnist: recorded sha256 {got} of {archive} in {manifest} (no published checksum; it passed the "
               f"archive check and extracted into the expected layout)")
    return root


def reverify(raw_dir: Path, opt: Options, digests: F.DigestStore) -> None:
    """What fetch verified, checked again before prepare trusts it: the folder's files, or the archive and the
    tree extracted from it, against `<raw_dir>/MANIFEST.sha256` and the `.extracted` marker."""
    manifest = raw_dir / F.MANIFEST
    if opt.folder:
        F.verify_fetched(manifest, Path(opt.folder).expanduser(), NAME, rels=FILES, digests=digests)
        return
    archive = Path(opt.archive).expanduser() if opt.archive else raw_dir / ARCHIVE
    want = F.read_manifest(manifest).get(ARCHIVE) if manifest.is_file() else None
    if want and archive.is_file() and digests.sha256(archive) != want:
        raise F.ChecksumMismatch(f"{archive}: sha256 differs from {want} in {manifest}: the archive changed after "
                                 f"`g2d fetch avmnist` verified it; prepare does not use it. Restore it and run "
                                 f"{F.fix_hint(NAME)}.")
    F.verify_extracted(raw_dir / "extracted", NAME, archive=archive if archive.is_file() else None, digests=digests)
    digests.save()


def _find_root(base: Path) -> Path:
    for cand in (base, *sorted(p for p in base.iterdir() if p.is_dir())):
        if (cand / "image").is_dir() and (cand / "audio").is_dir():
            return cand
    raise F.CorruptRawFile(f"{base}: no folder with image/ and audio/ inside; is this MultiBench's {ARCHIVE}?")


def _check_layout(root: Path) -> None:
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise F.MissingRawFile(f"{root / missing[0]}: missing ({len(missing)} of the {len(FILES)} AV-MNIST files "
                               f"{list(FILES)}); re-extract {ARCHIVE} with `g2d fetch avmnist`.")


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise F.CorruptRawFile(f"{path}: unreadable .npy ({e}); truncated? Delete the extracted folder and run "
                               f"`g2d fetch avmnist` again.") from None


def _split_arrays(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img, aud, lab = (_load(root / f"image/{split}_data.npy"), _load(root / f"audio/{split}_data.npy"),
                     _load(root / f"{split}_labels.npy"))
    n = len(lab)
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer) and not np.all(np.mod(lab, 1) == 0):
        raise F.CorruptRawFile(f"{root / f'{split}_labels.npy'}: expected integer labels of shape (N,), got "
                               f"{lab.dtype} {lab.shape}")
    if n and (lab.min() < 0 or lab.max() > 9):
        raise F.CorruptRawFile(f"{root / f'{split}_labels.npy'}: labels must be digits 0..9, found "
                               f"{lab.min()}..{lab.max()}")
    if img.shape[1:] not in ((784,), (28, 28), (1, 28, 28)) or len(img) != n:
        raise F.CorruptRawFile(f"{root / f'image/{split}_data.npy'}: shape {img.shape}, expected ({n}, 784) or "
                               f"({n}, 28, 28)")
    if aud.shape[1:] not in ((112, 112), (1, 112, 112)) or len(aud) != n:
        raise F.CorruptRawFile(f"{root / f'audio/{split}_data.npy'}: shape {aud.shape}, expected ({n}, 112, 112)")
    return img, aud, lab.astype(np.int64)


def _scaled(src: np.ndarray, rows: np.ndarray, shape: tuple, path: Path, chunk: int) -> np.ndarray:
    """(rows of src) / 255 as float32 with a channel axis, written in chunks to a memory map (G2D AVMNIST.py)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(rows), *shape))
    for s in range(0, len(rows), chunk):
        out[s:s + chunk] = (np.asarray(src[rows[s:s + chunk]], np.float64) / 255.0).reshape(-1, *shape)
    out.flush()
    return out


def prepare(raw_dir: Path, out_dir: Path, opts: dict) -> Path:
    from g2d.data.avmnist import Avmnist

    opt = options(opts)
    raw_dir = Path(raw_dir)
    if opt.folder:
        root = Path(opt.folder).expanduser()
    elif (raw_dir / "extracted").is_dir():
        root = _find_root(raw_dir / "extracted")
    else:
        raise F.MissingRawFile(f"{raw_dir / 'extracted'}: AV-MNIST not fetched yet; run `g2d fetch avmnist` "
                               f"(it explains the manual download) or set {PREFIX}.folder.")
    _check_layout(root)
    cache_dir = F.prepare_cache_dir(raw_dir, opt.cache_dir, out_dir=out_dir, option=f"{PREFIX}.cache_dir")
    reverify(raw_dir, opt, F.DigestStore(cache_dir / "digests.json"))
    data = {s: _split_arrays(root, s) for s in ("train", "test")}
    ytr = data["train"][2]
    if opt.val_mode == "multibench":
        cut = max(0, len(ytr) - 5000)  # MultiBench get_data.py: valid = train[55000:60000]
        rows = {"train": np.arange(cut), "val": np.arange(cut, len(ytr))}
    else:
        keep, val = stratified_split(ytr, opt.val_fraction, opt.split_seed, "classification")
        rows = {"train": keep, "val": val}
    rows["test"] = np.arange(len(data["test"][2]))
    work = cache_dir / f"assembled-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        splits = {}
        for s, idx in rows.items():
            img, aud, lab = data["test" if s == "test" else "train"]
            splits[s] = {"audio": _scaled(aud, idx, (1, 112, 112), work / f"{s}_audio.npy", opt.chunk),
                         "image": _scaled(img, idx, (1, 28, 28), work / f"{s}_image.npy", opt.chunk),
                         "label": lab[idx], "index": idx.astype(np.int64)}
        extra = {
            "source": "real",
            "class_index": {str(i): i for i in range(10)},
            "split_files": {f: {"sha256": F.sha256_file(root / f)} for f in FILES if f.endswith("labels.npy")},
            "val": ({"carved_from": "train", "mode": "multibench", "rows": "train[55000:60000]"}
                    if opt.val_mode == "multibench" else
                    {"carved_from": "train", "fraction": opt.val_fraction, "seed": opt.split_seed,
                     "stratified": True}),
            "index": "row number in the official {train,test} arrays (val rows index the train arrays)",
            "preprocessing": {"image": "x / 255 -> float32 (1, 28, 28)", "audio": "x / 255 -> float32 (1, 112, 112)"},
            "skipped": {"train": 0, "test": 0},
            "licences": LICENCES,
            "archive": {"name": ARCHIVE, "google_drive_id": DRIVE_ID},
        }
        out = write_prepared(Path(out_dir), Avmnist.spec, splits, extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
