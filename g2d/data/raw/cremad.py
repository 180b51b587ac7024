"""CREMA-D real data: git clone (LFS pointers) + verified per-file download, then OGM-GE/G2D preprocessing.

fetch: every AudioWAV/*.wav and VideoFlash/*.flv is checked against the sha256 + size of its git-lfs pointer
(packaged list, repo commit 1658cd34); missing or pointer-only files are downloaded from GitHub's LFS media
host (resumable, verified; no git or git-lfs needed). `clone:` uses an existing checkout instead.
prepare (g2d-spec §3.1): audio 22.05 kHz, tiled x3, first 3 s, clipped, log|STFT(512, 353)| -> (1, 257, 188)
float32; one frame = frame k*int(fps) with k = RandomState(999).choice(n_kept, 1) -> resized 224x224 uint8.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from g2d.data.prepared import stratified_split, write_prepared
from g2d.data.raw import fetching as F

NAME = "cremad"
PREFIX = "datasets.cremad.real"
COMMIT = "1658cd342dff90010aa843eaeebd53610a08b1dc"  # the LFS object list in g2d/data/checksums is pinned to it
MEDIA_URL = f"https://media.githubusercontent.com/media/CheyneyComputerScience/CREMA-D/{COMMIT}"
SUBDIRS = {"audio": ("AudioWAV", ".wav"), "video": ("VideoFlash", ".flv")}
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
LFS_HEAD = b"version https://git-lfs.github.com/spec/v1"


@dataclass
class Options:
    clone: str = ""             # existing CREMA-D checkout (else <raw_dir>/CREMA-D); completed + verified by fetch
    media_url: str = MEDIA_URL  # LFS objects: <media_url>/<AudioWAV|VideoFlash>/<file>
    manifest: str = ""          # `sha256  size  path` list (default: packaged g2d/data/checksums/cremad_lfs.txt.gz)
    timeout: float = 15.0
    jobs: int = dataclasses.field(default_factory=F.default_jobs)
    split_dir: str = ""         # folder with cremad_train.csv / cremad_test.csv (default: the packaged OGM-GE split)
    val_fraction: float = 0.1
    split_seed: int = 0
    sample_rate: int = 22050
    source_sample_rate: int = 16000  # CREMA-D AudioWAV is 16 kHz; 0 accepts any rate (resampled)
    max_missing_fraction: float = 0.05  # more missing clips than this = wrong folder, not the literature's drops
    skip_corrupt: bool = False  # undecodable clip: error (default) or logged skip
    keep_cache: bool = True

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")


def options(opts) -> Options:
    return F.parse_options(Options, opts, PREFIX)


def _root(raw_dir: Path, opt: Options) -> Path:
    return Path(opt.clone).expanduser() if opt.clone else Path(raw_dir) / "CREMA-D"


def _how_to(raw_dir: Path) -> str:
    return str(F.manual_step(
        "CREMA-D could not be fetched automatically. To get it by hand:",
        [("Install git-lfs (https://git-lfs.com), then: GIT_LFS_SKIP_SMUDGE=1 git clone "
          "https://github.com/CheyneyComputerScience/CREMA-D.git && cd CREMA-D && "
          "git lfs pull --include \"AudioWAV/*,VideoFlash/*\"  (about 3 GB; the whole repo is 7.5 GB). "
          "The GitLab mirror gitlab.com/cs-cooper-lab/crema-d-mirror works too."),
         f"Either put the checkout at {Path(raw_dir) / 'CREMA-D'}, or set datasets.cremad.real.clone: <path>."],
        "g2d fetch cremad   (verifies every file against its LFS sha256), then g2d prepare cremad"))


# ----------------------------------------------------------------------------------------------- fetch
def lfs_manifest(path: str | Path = "") -> dict[str, tuple[str, int]]:
    """{relpath: (sha256, size)} of AudioWAV/*.wav and VideoFlash/*.flv, read from the repo's LFS pointers."""
    import gzip

    if path:
        text = Path(path).read_text()
    else:
        text = gzip.decompress((resources.files("g2d") / "data" / "checksums" / "cremad_lfs.txt.gz").read_bytes()).decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            sha, size, rel = line.split(maxsplit=2)
            out[rel] = (sha, int(size))
    return out


def fetch(raw_dir: Path, opts: dict) -> Path:
    """Download every missing/pointer-only file from the LFS media host, then verify all against the pins."""
    opt = options(opts)
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    root = _root(raw_dir, opt)
    how_to = _how_to(raw_dir)
    entries = lfs_manifest(opt.manifest)
    manifest = F.write_manifest(raw_dir / F.MANIFEST, {r: e[0] for r, e in entries.items()})
    todo = [r for r in entries if not (root / r).is_file() or _is_pointer(root / r)]

    def get(rel):
        if _is_pointer(root / rel):
            (root / rel).unlink()
        F.download(f"{opt.media_url}/{rel}", root / rel, entries[rel][0], size=entries[rel][1],
                   timeout=opt.timeout, how_to=how_to, progress=False)

    if todo:
        F._log(f"cremad: downloading {len(todo)} of {len(entries)} files into {root}")
        F.map_parallel(get, todo, jobs=opt.jobs, desc="CREMA-D download")
    F.verify(root, manifest, jobs=opt.jobs, sizes={r: e[1] for r, e in entries.items()}, rerun="g2d fetch cremad")
    return root


def _is_pointer(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size > 1024:
        return False
    return path.read_bytes().startswith(LFS_HEAD)


# ----------------------------------------------------------------------------------------------- decoding
def read_wav(path: Path, expect_sr: int = 0) -> tuple[np.ndarray, int]:
    """Mono float32 waveform; a header promising more audio than the file holds is an error."""
    import soundfile as sf

    _check_wav_complete(path)
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except RuntimeError as e:
        raise F.CorruptRawFile(f"{path}: unreadable WAV ({e}); delete it and re-run `g2d fetch cremad`.") from None
    if expect_sr and sr != expect_sr:
        raise F.CorruptRawFile(f"{path}: sample rate {sr} Hz, expected {expect_sr} Hz (CREMA-D AudioWAV is 16 kHz): "
                               f"wrong file? Set {PREFIX}.source_sample_rate: 0 to resample any rate.")
    if len(x) == 0:
        raise F.CorruptRawFile(f"{path}: WAV has no samples; delete it and re-fetch.")
    return x.mean(axis=1), sr  # librosa.load(mono=True) averages channels


def _check_wav_complete(path: Path) -> None:
    b = Path(path).read_bytes()[:1 << 16]
    size = Path(path).stat().st_size
    if b[:4] != b"RIFF" or b[8:12] != b"WAVE":
        raise F.CorruptRawFile(f"{path}: not a RIFF/WAVE file; delete it and re-fetch.")
    pos = 12
    while pos + 8 <= len(b):
        cid, n = b[pos:pos + 4], struct.unpack("<I", b[pos + 4:pos + 8])[0]
        if cid == b"data":
            if pos + 8 + n > size:
                raise F.CorruptRawFile(f"{path}: truncated WAV (header declares {n} B of audio, file holds "
                                       f"{size - pos - 8} B); delete it and re-run `g2d fetch cremad`.")
            return
        pos += 8 + n + (n & 1)
    raise F.CorruptRawFile(f"{path}: WAV without a data chunk; delete it and re-fetch.")


def resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    """torchaudio's windowed-sinc resampler (librosa.load's soxr_hq is not installed here)."""
    if sr == target:
        return x.astype(np.float32)
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(x, np.float32)), sr, target).numpy()


def log_stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """log(|STFT| + 1e-7) as librosa.stft defaults (periodic Hann, center, zero pad): OGM-GE CramedDataset."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    X = torch.stft(t, n_fft, hop_length=hop, win_length=n_fft, window=torch.hann_window(n_fft), center=True,
                   pad_mode="constant", return_complex=True)
    return torch.log(X.abs() + 1e-7).numpy().astype(np.float32)[None]


def decode_frames_1fps(path: Path, rerun: str = "g2d fetch cremad") -> list[np.ndarray]:
    """RGB frames 0, f, 2f, ... (f = int(fps)) among the first CAP_PROP_FRAME_COUNT frames: one per second, as
    OGM-GE/G2D data/CREMAD/video_preprocessing.py reads them with OpenCV's FFmpeg backend."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise F.CorruptRawFile(f"{path}: no video stream")
            s = c.streams.video[0]
            rate = float(s.guessed_rate or s.average_rate or 0)
            fps = int(rate)  # int(CAP_PROP_FPS)
            if fps <= 0:
                raise F.CorruptRawFile(f"{path}: video without a frame rate")
            duration = (c.duration or 0) / 1e6
            # CAP_PROP_FRAME_COUNT: nb_frames, else floor(duration * fps + 0.5); OGM-GE stops reading there
            limit = s.frames or int(np.floor(duration * rate + 0.5)) or float("inf")
            kept, n = [], 0
            for frame in c.decode(s):
                if n >= limit:
                    break
                if n % fps == 0:
                    kept.append(frame.to_ndarray(format="rgb24"))
                n += 1
    except F.RawDataError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise F.CorruptRawFile(f"{path}: undecodable video ({e}); delete it and re-run `{rerun}`.") from None
    if not kept:
        raise F.CorruptRawFile(f"{path}: no decodable frames; delete it and re-run `{rerun}`.")
    if n < limit and n / rate < duration - 1.0:  # 1 s slack: the audio track may outlast the video a little
        raise F.CorruptRawFile(f"{path}: truncated video ({n} frames = {n / rate:.2f} s decoded, container says "
                               f"{duration:.2f} s); delete it and re-run `{rerun}`.")
    return kept


def select_frames(n: int, k: int) -> np.ndarray:
    """G2D: np.random.seed(999); choice(n, k, replace=False) -> a fixed function of n (no global reseed)."""
    return np.random.RandomState(999).choice(n, k, replace=False)


def resize_frame(img: np.ndarray, size: int = 224) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, size, size) uint8; PIL bilinear = torchvision Resize((224, 224)) on PIL images."""
    from PIL import Image

    out = Image.fromarray(img).resize((size, size), Image.BILINEAR)
    return np.asarray(out, np.uint8).transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------- prepare
PARAMS = {"audio": {"sample_rate": 22050, "tile": 3, "seconds": 3, "clip": [-1, 1], "n_fft": 512, "hop": 353,
                    "window": "hann (periodic)", "center": True, "pad_mode": "constant",
                    "transform": "log(|STFT| + 1e-7)", "resampler": "torchaudio.functional.resample (sinc_interp_hann)",
                    "source_sample_rate": 16000},
          "visual": {"frames": 1, "extract": "frames k*int(fps), k = 0,1,..., below CAP_PROP_FRAME_COUNT (1 per second)",
                     "select": "np.random.RandomState(999).choice(n_kept, 1, replace=False)",
                     "resize": [224, 224], "interp": "PIL bilinear", "dtype": "uint8 (loader divides by 255)"}}


def _process_clip(arg) -> dict[str, np.ndarray]:
    wav, flv, sr, src_sr = arg
    x, rate = read_wav(wav, src_sr)
    x = resample(x, rate, sr)
    x = np.tile(x, 3)[: 3 * sr]  # OGM-GE: tile x3, keep the first 3 s
    x = np.clip(x, -1.0, 1.0)
    audio = log_stft(x, 512, 353)
    frames = decode_frames_1fps(flv)
    k = select_frames(len(frames), 1)
    visual = np.stack([resize_frame(frames[i]) for i in k], axis=1)  # (3, 1, 224, 224)
    return {"audio": audio, "visual": visual}


def read_split(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [(r[0].strip(), r[1].strip()) for r in csv.reader(f) if r]


def _split_files(opt: Options) -> dict[str, Path]:
    if opt.split_dir:
        d = Path(opt.split_dir)
        files = {s: d / f"cremad_{s}.csv" for s in ("train", "test")}
    else:
        d = resources.files("g2d") / "data" / "splits"
        files = {s: Path(str(d / f"cremad_{s}.csv")) for s in ("train", "test")}
    for s, p in files.items():
        if not p.is_file():
            raise F.MissingRawFile(f"{p}: CREMA-D {s} split file missing (set {PREFIX}.split_dir or reinstall g2d).")
    return files


def assemble(cache: F.ClipCache, chosen: list[tuple[int, str, int]], names, work: Path,
             like: str | None = None) -> dict[str, np.ndarray]:
    """(row, clip, label) triples -> memory-mapped modality arrays + label/index/clip arrays."""
    keys = [c for _, c, _ in chosen]
    arrays = F.stack_cached(cache, keys, names, work, like=like)
    arrays["label"] = np.array([y for _, _, y in chosen], np.int64)
    arrays["index"] = np.array([i for i, _, _ in chosen], np.int64)
    arrays["clip"] = np.array(keys, dtype=str)
    return arrays


def prepare(raw_dir: Path, out_dir: Path, opts: dict) -> Path:
    from g2d.data.cremad import CLASSES

    opt = options(opts)
    raw_dir, root = Path(raw_dir), _root(raw_dir, opt)
    files = _split_files(opt)
    rows = {s: read_split(p) for s, p in files.items()}
    cls_index = {c: i for i, c in enumerate(CLASSES)}
    for s, rs in rows.items():
        bad = [lab for _, lab in rs if lab not in cls_index]
        if bad:
            raise F.RawDataError(f"{files[s]}: unknown label {bad[0]!r}; expected one of {list(CLASSES)}")
    params = {**PARAMS, "audio": {**PARAMS["audio"], "sample_rate": opt.sample_rate,
                                  "source_sample_rate": opt.source_sample_rate}}
    cache = F.ClipCache(F.prepare_cache_dir(raw_dir) / f"{NAME}-{F.params_key(params)}")
    items, missing = [], {}
    for s, rs in rows.items():
        for clip, _ in rs:
            wav, flv = root / "AudioWAV" / f"{clip}.wav", root / "VideoFlash" / f"{clip}.flv"
            if wav.is_file() and flv.is_file() and not _is_pointer(wav) and not _is_pointer(flv):
                items.append((clip, (wav, flv, opt.sample_rate, opt.source_sample_rate)))
            else:
                missing.setdefault(s, []).append(clip)
    n_all = sum(len(r) for r in rows.values())
    n_missing = sum(len(v) for v in missing.values())
    if n_missing > opt.max_missing_fraction * n_all:
        first = next(iter(missing.values()))[0]
        raise F.MissingRawFile(
            f"{root / 'AudioWAV' / (first + '.wav')} (or its .flv): {n_missing} of {n_all} clips missing or LFS "
            f"pointers, more than {PREFIX}.max_missing_fraction={opt.max_missing_fraction}. Run `g2d fetch cremad` "
            f"(or set {PREFIX}.clone to a complete git-lfs checkout).")
    for s, clips in missing.items():
        F._log(f"cremad: skipping {len(clips)} {s} clip(s) with a missing wav or flv (e.g. {clips[0]})")
    skip = (F.CorruptRawFile,) if opt.skip_corrupt else ()
    results = F.map_clips(_process_clip, items, cache, jobs=opt.jobs, desc="CREMA-D clips", skip_errors=skip)
    corrupt = {k: cache.skip_reason(k).replace(str(root), "<root>") for k, ok in results.items() if not ok}
    skipped, chosen = {}, {}
    for s, rs in rows.items():
        chosen[s] = [(i, clip, cls_index[lab]) for i, (clip, lab) in enumerate(rs) if results.get(clip)]
        skipped[s] = {"missing": missing.get(s, []), "corrupt": [c for c, _ in rs if c in corrupt]}
    tr, va = stratified_split(np.array([y for _, _, y in chosen["train"]]), opt.val_fraction, opt.split_seed,
                              "classification")
    chosen["val"] = [chosen["train"][j] for j in va]
    chosen["train"] = [chosen["train"][j] for j in tr]
    work = cache.root / f".assembled-{os.getpid()}"
    like = next((c for s in chosen.values() for _, c, _ in s), None)
    try:
        splits = {s: assemble(cache, chosen[s], ("audio", "visual"), work / s, like) for s in ("train", "val", "test")}
        out = _write(out_dir, splits, opt, files, rows, cls_index, params, skipped, corrupt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not opt.keep_cache:
        shutil.rmtree(cache.root, ignore_errors=True)
    return out


def _write(out_dir, splits, opt, files, rows, cls_index, params, skipped, corrupt) -> Path:
    from g2d.data.cremad import Cremad

    extra = {
        "source": "real",
        "class_index": cls_index,
        "split_files": {s: {"file": p.name, "sha256": F.sha256_file(p), "rows": len(rows[s])} for s, p in files.items()},
        "val": {"carved_from": "train", "fraction": opt.val_fraction, "seed": opt.split_seed, "stratified": True},
        "index": "row number in the official split file (val rows index the train file)",
        "preprocessing": params,
        "normalize": IMAGENET,
        "skipped": {s: {"missing": len(v["missing"]), "corrupt": len(v["corrupt"])} for s, v in skipped.items()},
        "skipped_clips": skipped,
        "corrupt_reasons": corrupt,
        "deviations": [
            "frame taken from the decoded video directly (OGM-GE goes through an OpenCV JPEG round trip)",
            "stored frame is the test-time Resize((224, 224)); train-time RandomResizedCrop must crop from it",
            "resampling 16 -> 22.05 kHz with torchaudio's sinc resampler instead of librosa/soxr",
        ],
    }
    out = write_prepared(Path(out_dir), Cremad.spec, splits, extra)
    F._log(f"cremad: {json.dumps(extra['skipped'])} skipped; wrote {out}")
    return out
