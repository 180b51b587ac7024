"""VGGSound real data: a user-supplied folder of clips + the official csv, decoded with PyAV (no ffmpeg CLI).

The videos live on YouTube (the VGG host is gone; large parts of YouTube are gone too), so `fetch` only
gets the csv (when its host answers), indexes the clips present and pins them in a manifest; getting the
clips is a manual step. prepare follows OGM-GE/G2D (g2d-spec §3.2): 16 kHz audio tiled to >= 10 s, a 5 s
window, log|STFT(256, 128)| -> (1, 129, 626); frames at 1 fps, clips with <= 3 frames dropped, 3 frames by
RandomState(999).choice(n, 3) -> (3, 3, 224, 224) uint8. Class index = sorted label names of the csv.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from g2d.data.base import DatasetSpec
from g2d.data.prepared import stratified_split, write_prepared
from g2d.data.raw import fetching as F
from g2d.data.raw.cremad import IMAGENET, assemble, decode_frames_1fps, log_stft, resize_frame, select_frames

NAME = "vggsound"
PREFIX = "datasets.vggsound.real"
CSV_URL = "https://www.robots.ox.ac.uk/~vgg/data/vggsound/vggsound.csv"
N_CLASSES = 309


@dataclass
class Options:
    video_dir: str = ""         # folder with <ytid>_<start:06d>.mp4 (or unpadded) clips, searched recursively
    csv: str = ""               # official vggsound.csv (default <raw_dir>/vggsound.csv); header optional
    csv_url: str = CSV_URL      # tried by fetch when the csv is absent (the VGG host is gone: expect a how-to)
    timeout: float = 10.0
    hash_clips: bool = True     # pin every clip's sha256 in <raw_dir>/MANIFEST.sha256 (site-specific subset)
    jobs: int = dataclasses.field(default_factory=F.default_jobs)
    val_fraction: float = 0.1
    split_seed: int = 0
    sample_rate: int = 16000
    window_start_s: float = 2.5  # fixed 5 s window start (official: random in [0, 5] s, also at test time)
    frames: int = 3
    min_frames: int = 4          # OGM-GE/G2D keep a clip only with more than 3 frames
    keep_cache: bool = True

    def __post_init__(self):
        if not 0 <= self.window_start_s <= 5:
            raise ValueError(f"window_start_s={self.window_start_s} must be in [0, 5] (clips are tiled to >= 10 s)")
        if self.min_frames < self.frames:
            raise ValueError(f"min_frames={self.min_frames} must be >= frames={self.frames}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")


def options(opts) -> Options:
    return F.parse_options(Options, opts, PREFIX)


def _paths(raw_dir: Path, opt: Options) -> tuple[Path, Path]:
    raw_dir = Path(raw_dir)
    return (Path(opt.csv).expanduser() if opt.csv else raw_dir / "vggsound.csv",
            Path(opt.video_dir).expanduser() if opt.video_dir else raw_dir / "video")


def _manual(raw_dir: Path, csv_path: Path, video_dir: Path, what: str) -> F.ManualStepRequired:
    return F.manual_step(
        f"VGGSound: {what}. The clips are YouTube videos (CC BY 4.0 annotations; video copyright stays with "
        "the owners) and cannot be fetched automatically. To set it up:",
        [("Get the official csv: vggsound.csv from https://github.com/hche11/VGGSound (data/vggsound.csv, "
          f"rows `youtube_id,start,label,split`) -> {csv_path} (or set {PREFIX}.csv)."),
         ("Get the 10 s clips as <youtube_id>_<start:06d>.mp4 (yt-dlp over the csv rows, or a mirror such as the "
          f"Hugging Face dataset Loie/VGGSound; ~200k clips, hundreds of GB) -> {video_dir} "
          f"(or set {PREFIX}.video_dir). Missing clips are skipped and counted."),
         "Expect a site-specific subset: the prepared meta records which clips were found."],
        "g2d fetch vggsound   (indexes and pins the clips), then g2d prepare vggsound")


def read_csv(path: Path) -> list[tuple[str, int, str, str]]:
    """(youtube_id, start, label, split) rows; accepts G2D's header line and OGM-GE's headerless file."""
    if not Path(path).is_file():
        raise F.MissingRawFile(f"{path}: VGGSound csv not found; run `g2d fetch vggsound` for how to get it.")
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for n, r in enumerate(csv.reader(f), 1):
            if not r or (n == 1 and not r[1].strip().lstrip("-").isdigit()):
                continue  # empty line or header (`youtube_id,time,label,split`)
            if len(r) != 4 or not r[1].strip().isdigit() or r[3].strip() not in ("train", "test"):
                raise F.CorruptRawFile(f"{path}:{n}: expected `youtube_id,start,label,train|test`, got {r!r}")
            rows.append((r[0].strip(), int(r[1]), r[2].strip(), r[3].strip()))
    if not rows:
        raise F.CorruptRawFile(f"{path}: no rows")
    return rows


def index_clips(video_dir: Path) -> dict[tuple[str, int], Path]:
    """{(youtube_id, start): path} for every *.mp4 named <id>_<start> (padded or not) under video_dir."""
    out = {}
    for p in sorted(Path(video_dir).rglob("*.mp4")):
        ytid, _, start = p.stem.rpartition("_")
        if ytid and start.isdigit():
            out.setdefault((ytid, int(start)), p)
    return out


def fetch(raw_dir: Path, opts: dict) -> Path:
    opt = options(opts)
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    csv_path, video_dir = _paths(raw_dir, opt)
    if not csv_path.is_file():
        how = str(_manual(raw_dir, csv_path, video_dir, "the csv is missing"))
        F.download(opt.csv_url, csv_path, None, timeout=opt.timeout, how_to=how)
    rows = read_csv(csv_path)
    clips = index_clips(video_dir) if video_dir.is_dir() else {}
    found = sorted({str(clips[(y, t)].relative_to(video_dir)) for y, t, _, _ in rows if (y, t) in clips})
    if not found:
        raise _manual(raw_dir, csv_path, video_dir, f"none of the {len(rows)} csv clips is in {video_dir}")
    if opt.hash_clips:
        F.verify_or_record(video_dir, found, raw_dir / F.MANIFEST, jobs=opt.jobs, rerun="g2d fetch vggsound")
    F.atomic_write_bytes(raw_dir / "clips.txt", "".join(f + "\n" for f in found).encode())
    F._log(f"vggsound: {len(found)} of {len(rows)} csv clips present in {video_dir}")
    return raw_dir


def read_audio(path: Path, sr: int) -> np.ndarray:
    """Mono float32 at `sr`: libswresample to s16 (as `ffmpeg -ar 16000 pcm_s16le`), /32768, channel mean."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.audio:
                raise F.CorruptRawFile(f"{path}: no audio stream")
            s = c.streams.audio[0]
            res = av.AudioResampler(format="s16", layout=s.layout.name, rate=sr)
            ch = len(s.layout.channels)
            parts = [f.to_ndarray().reshape(-1, ch) for fr in c.decode(s) for f in res.resample(fr)]
            parts += [f.to_ndarray().reshape(-1, ch) for f in res.resample(None)]
    except F.RawDataError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise F.CorruptRawFile(f"{path}: undecodable audio ({e})") from None
    if not parts or sum(len(p) for p in parts) == 0:
        raise F.CorruptRawFile(f"{path}: no audio samples")
    return (np.concatenate(parts).astype(np.float32) / 32768.0).mean(axis=1)


def _process_clip(arg) -> dict[str, np.ndarray]:
    path, sr, start_s, k, min_frames = arg
    x = read_audio(path, sr)
    while len(x) < 10 * sr:  # OGM-GE VGGSoundDataset: tile x2 until >= 10 s
        x = np.tile(x, 2)
    start = round(start_s * sr)
    x = np.clip(x[start:start + 5 * sr], -1.0, 1.0)
    audio = log_stft(x, 256, 128)
    frames = decode_frames_1fps(path, rerun="g2d prepare vggsound")
    if len(frames) < min_frames:
        raise F.CorruptRawFile(f"{path}: {len(frames)} frame(s) at 1 fps; OGM-GE/G2D keep clips with > 3")
    idx = select_frames(len(frames), k)  # G2D order (not sorted)
    visual = np.stack([resize_frame(frames[i]) for i in idx], axis=1)  # (3, k, 224, 224)
    return {"audio": audio, "visual": visual}


def prepare(raw_dir: Path, out_dir: Path, opts: dict) -> Path:
    from g2d.data.vggsound import Vggsound

    opt = options(opts)
    raw_dir = Path(raw_dir)
    csv_path, video_dir = _paths(raw_dir, opt)
    rows = read_csv(csv_path)
    classes = sorted({lab for _, _, lab, _ in rows})
    if len(classes) != N_CLASSES:
        F._log(f"vggsound: {csv_path} has {len(classes)} labels (the literature's models use {N_CLASSES})")
    cls_index = {c: i for i, c in enumerate(classes)}
    if not video_dir.is_dir():
        raise _manual(raw_dir, csv_path, video_dir, f"clip folder {video_dir} not found")
    clips = index_clips(video_dir)
    params = {"audio": {"sample_rate": opt.sample_rate, "tile": "x2 until >= 10 s", "window_s": 5,
                        "window_start_s": opt.window_start_s, "clip": [-1, 1], "n_fft": 256, "hop": 128,
                        "window": "hann (periodic)", "center": True, "pad_mode": "constant",
                        "transform": "log(|STFT| + 1e-7)", "decoder": "PyAV -> swresample s16 (= ffmpeg -ar)"},
              "visual": {"frames": opt.frames, "min_frames": opt.min_frames,
                         "extract": "frames k*int(fps), k = 0,1,..., below CAP_PROP_FRAME_COUNT (1 per second)",
                         "select": f"np.random.RandomState(999).choice(n_kept, {opt.frames}, replace=False), unsorted",
                         "resize": [224, 224], "interp": "PIL bilinear", "dtype": "uint8 (loader divides by 255)"}}
    cache = F.ClipCache(F.prepare_cache_dir(raw_dir) / f"{NAME}-{F.params_key(params)}")
    items, missing, seen = [], {"train": [], "test": []}, set()
    for y, t, _, split in rows:
        key = f"{y}_{t:06d}"
        if (y, t) not in clips:
            missing[split].append(key)
        elif key not in seen:
            seen.add(key)
            items.append((key, (clips[(y, t)], opt.sample_rate, opt.window_start_s, opt.frames, opt.min_frames)))
    if not items:
        raise _manual(raw_dir, csv_path, video_dir, f"none of the {len(rows)} csv clips is in {video_dir}")
    results = F.map_clips(_process_clip, items, cache, jobs=opt.jobs, desc="VGGSound clips",
                          skip_errors=(F.CorruptRawFile,))
    bad = {k: cache.skip_reason(k).replace(str(video_dir), "<video_dir>") for k, ok in results.items() if not ok}
    chosen, skipped = {"train": [], "test": []}, {}
    for i, (y, t, lab, split) in enumerate(rows):
        key = f"{y}_{t:06d}"
        if results.get(key):
            chosen[split].append((i, key, cls_index[lab]))
    for s in ("train", "test"):
        skipped[s] = {"missing": len(missing[s]), "undecodable_or_short": sum(
            1 for (y, t, _, sp) in rows if sp == s and f"{y}_{t:06d}" in bad)}
        F._log(f"vggsound: {s}: kept {len(chosen[s])}, skipped {skipped[s]}")
    tr, va = stratified_split(np.array([c for _, _, c in chosen["train"]], np.int64), opt.val_fraction,
                              opt.split_seed, "classification")
    chosen["val"] = [chosen["train"][j] for j in va]
    chosen["train"] = [chosen["train"][j] for j in tr]
    spec = DatasetSpec(NAME, Vggsound.spec.modalities, "classification", tuple(classes))
    like = next((c for s in chosen.values() for _, c, _ in s), None)
    work = cache.root / f".assembled-{os.getpid()}"
    try:
        splits = {s: assemble(cache, chosen[s], ("audio", "visual"), work / s, like) for s in ("train", "val", "test")}
        extra = {
            "source": "real",
            "class_index": cls_index,
            "class_order": "sorted label names of the csv (OGM-GE/G2D: first appearance among downloaded train rows)",
            "split_files": {"csv": {"file": csv_path.name, "sha256": F.sha256_file(csv_path), "rows": len(rows)}},
            "val": {"carved_from": "train", "fraction": opt.val_fraction, "seed": opt.split_seed, "stratified": True},
            "index": "row number in the csv (header excluded)",
            "preprocessing": params,
            "normalize": IMAGENET,
            "skipped": skipped,
            "skip_reasons": bad,
            "deviations": [
                (f"5 s window at a fixed {opt.window_start_s} s (centre of the official random start range [0, 5] s) "
                 "for train and test; the official code draws a random window per access, also at test time"),
                "class index = sorted label names (pinned), not first-appearance order of the downloaded rows",
                "frames decoded directly (no JPEG round trip); stored frames are the test-time Resize((224, 224))",
            ],
        }
        out = write_prepared(Path(out_dir), spec, splits, extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not opt.keep_cache:
        shutil.rmtree(cache.root, ignore_errors=True)
    F._log(f"vggsound: wrote {out}: {json.dumps({s: len(v) for s, v in chosen.items()})}")
    return out
