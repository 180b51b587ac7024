"""VGGSound real data: a user-supplied folder of clips + the official csv, decoded with PyAV (no ffmpeg CLI).

The videos live on YouTube (the VGG host is gone; large parts of YouTube are gone too), so `fetch` only
gets the csv (when its host answers), indexes the clips present and pins them in a manifest; getting the
clips is a manual step. prepare follows OGM-GE/G2D (g2d-spec §3.2): 16 kHz audio tiled x2 until >= 10 s,
log|STFT(256, 128)|; frames at 1 fps, clips with <= 3 frames dropped, 3 frames by RandomState(999).choice(n, 3),
uint8. Class index = sorted label names of the csv.

Audio storage. The official loader takes a random 5-s window of the tiled clip, at train and at test time
(random.randint(0, 5 * sr) as start). Stored here: the STFT of the whole tiled 10 s (first 160,000 samples,
clipped to [-1, 1]) -> (1, 129, 1251) float32 (160,000 / 128 + 1 frames). The model input (1, 129, 626) is a
626-column window of it, cut on the fly by g2d.data.transforms (`meta.inputs.audio`): a uniformly random
start column in [0, 625] at train time, a fixed start at evaluation: column round(eval_window_start * 625),
default 0.5 -> column 312 = 2.496 s (the old fixed 5-s cut at 2.5 s started mid-hop, sample 40,000 = column
312.5; start columns are on the 128-sample hop, 8 ms). A column window at start column c equals the STFT of
the 5-s cut x[128c : 128c + 80,000] in every column except the two border ones (0 and 625): there the cut's
STFT sees its centre padding (zeros, librosa >= 0.10's pad_mode="constant" as OGM-GE's code runs today;
reflection under older librosa) where the 10-s STFT sees the neighbouring audio. The old option
`window_start_s` (seconds) is replaced by `eval_window_start` (fraction of the free range [0, 5] s).

Frame storage. VGGSound clips come at mixed resolutions, so every frame is stored at one fixed size,
`frame_size` (H, W) = (256, 341) (shorter side 256, 4:3), PIL bilinear; eval Resize((224, 224)) and train
RandomResizedCrop(224) + flip run on the fly from it (`meta.inputs.visual`, ImageNet normalisation). This
store-resize is a deviation: it changes the aspect ratio of non-4:3 clips before the crop (the official
pipeline crops/resizes the native-resolution JPEG frame once) and adds a second resampling at eval.

Storage cost per clip: frames 3 * 3 * 256 * 341 = 785,664 B (was 451,584 at 224x224), audio 129 * 1251 * 4
= 645,516 B (was 323,016 for 626 columns): 1,431,180 B. For the csv's 199,176 train+test clips that is
285.1 GB (frames 156.5 GB, audio 128.6 GB); for OGM-GE's downloaded 182,572 (168,618 + 13,954) 261.3 GB.
The per-clip prepare cache (keep_cache: true) holds a second copy of the same size.

Re-verification and cache. prepare re-checks every clip it reads that `fetch` pinned in
`<raw_dir>/MANIFEST.sha256` (hash_clips) against that sha256 (a changed clip is refused, naming it and the fix
`g2d fetch vggsound` / `dvc repro fetch@vggsound`); clips added after fetch are counted in the log. Per-clip
results are cached in `cache_dir` (default `data/cache/vggsound/`, next to `paths.raw`, outside every stage's
output): `clips/<ytid>_<start>.npz`, each valid only for the size + sha256 of its mp4, the preprocessing
parameters (sample rate, frames, min_frames, frame_size, recipe) and the code version (this file, the cremad
decoders it uses, the decoding libraries' versions); a skipped (undecodable / short) clip is re-evaluated
once its file changes.
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
from g2d.data.raw.cremad import (IMAGENET, assemble, decode_frames_1fps, log_stft, select_frames,
                                 source_size_counts, store_frame)

NAME = "vggsound"
PREFIX = "datasets.vggsound.real"
CSV_URL = "https://www.robots.ox.ac.uk/~vgg/data/vggsound/vggsound.csv"
N_CLASSES = 309
SECONDS_STORED, WINDOW_S, HOP = 10, 5, 128  # tiled clip kept, model window, STFT hop (samples)
INPUT_AUDIO = (1, 129, 626)  # what the model sees (Vggsound.spec): a 5-s window of the stored 10-s STFT
INPUT_HW = (224, 224)


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
    eval_window_start: float = 0.5  # eval 5-s window start, fraction of the free range [0, 5] s (0.5 ~ 2.5 s)
    frames: int = 3
    frame_size: list = dataclasses.field(default_factory=lambda: [256, 341])  # stored frame (H, W)
    min_frames: int = 4          # OGM-GE/G2D keep a clip only with more than 3 frames
    keep_cache: bool = True
    cache_dir: str = ""          # per-clip cache (default data/cache/vggsound: <paths.raw>/../cache/vggsound)

    def __post_init__(self):
        if not 0 <= self.eval_window_start <= 1:
            raise ValueError(f"eval_window_start={self.eval_window_start} must be in [0, 1] (fraction of the "
                             "free range [0, 5] s of the tiled 10-s clip)")
        if (len(self.frame_size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                 for v in self.frame_size)):
            raise ValueError(f"frame_size={self.frame_size!r} must be [height, width], positive integers")
        if self.min_frames < self.frames:
            raise ValueError(f"min_frames={self.min_frames} must be >= frames={self.frames}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")


def options(opts) -> Options:
    if "window_start_s" in (opts or {}):
        raise F.RawDataError(f"{PREFIX}.window_start_s: replaced by {PREFIX}.eval_window_start, a fraction of the "
                             f"free range [0, 5] s (the 10-s STFT is stored; 0.5 = column 312 = 2.496 s)")
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
        F.download(opt.csv_url, csv_path, None, timeout=opt.timeout, how_to=how, rerun="g2d fetch vggsound")
    rows = read_csv(csv_path)
    clips = index_clips(video_dir) if video_dir.is_dir() else {}
    found = sorted({str(clips[(y, t)].relative_to(video_dir)) for y, t, _, _ in rows if (y, t) in clips})
    if not found:
        raise _manual(raw_dir, csv_path, video_dir, f"none of the {len(rows)} csv clips is in {video_dir}")
    if opt.hash_clips:
        # only clips that pass the container check are pinned (an HTML page saved as .mp4 is not)
        problems = F.map_parallel(lambda r: F.format_problem(video_dir / r), found, jobs=opt.jobs, desc="validate")
        bad = [(r, why) for r, why in zip(found, problems) if why]
        if bad:
            F._log(f"vggsound: {len(bad)} clip(s) fail the container check and are not pinned "
                   f"(e.g. {video_dir / bad[0][0]}: {bad[0][1]})")
            found = [r for r, why in zip(found, problems) if not why]
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


def tiled_10s(x: np.ndarray, sr: int) -> np.ndarray:
    """OGM-GE VGGSoundDataset: tile x2 until >= 10 s; the first 10 s hold every 5-s window it can draw
    (start = random.randint(0, 5 * sr)); clipped to [-1, 1] as the official code clips its window."""
    while len(x) < SECONDS_STORED * sr:
        x = np.tile(x, 2)
    return np.clip(x[: SECONDS_STORED * sr], -1.0, 1.0)


def eval_window_column(fraction: float, n_stored: int, n_input: int = INPUT_AUDIO[-1]) -> int:
    """Start column of the fixed eval window, as g2d.data.transforms cuts it: round(fraction * free)."""
    return int(round(fraction * (n_stored - n_input)))


def code_version() -> dict[str, str]:
    """The code the per-clip results depend on (part of the cache key): this file, the cremad decoders it
    borrows, and the decoding libraries' versions."""
    from g2d.data.raw import cremad

    return F.code_version(__file__, cremad.__file__, libraries=("numpy", "torch", "av", "pillow"))


def _process_clip(arg) -> dict[str, np.ndarray]:
    path, sr, k, min_frames, frame_size = arg
    x = tiled_10s(read_audio(path, sr), sr)
    audio = log_stft(x, 256, HOP)  # (1, 129, 1251) at 16 kHz
    frames = decode_frames_1fps(path, rerun="g2d prepare vggsound")
    if len(frames) < min_frames:
        raise F.CorruptRawFile(f"{path}: {len(frames)} frame(s) at 1 fps; OGM-GE/G2D keep clips with > 3")
    idx = select_frames(len(frames), k)  # G2D order (not sorted)
    visual = np.stack([store_frame(frames[i], frame_size)[0] for i in idx], axis=1)  # (3, k, H, W)
    src_hw = np.array([frames[i].shape[:2] for i in idx], np.int32)
    return {"audio": audio, "visual": visual, "src_hw": src_hw}


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
    frame_size = [int(v) for v in opt.frame_size]
    n_cols = SECONDS_STORED * opt.sample_rate // HOP + 1
    n_in = (WINDOW_S * opt.sample_rate) // HOP + 1
    params = {"audio": {"sample_rate": opt.sample_rate, "tile": "x2 until >= 10 s", "seconds_stored": SECONDS_STORED,
                        "clip": [-1, 1], "n_fft": 256, "hop": HOP,
                        "window": "hann (periodic)", "center": True, "pad_mode": "constant",
                        "transform": "log(|STFT| + 1e-7)", "decoder": "PyAV -> swresample s16 (= ffmpeg -ar)"},
              "visual": {"frames": opt.frames, "min_frames": opt.min_frames,
                         "extract": "frames k*int(fps), k = 0,1,..., below CAP_PROP_FRAME_COUNT (1 per second)",
                         "select": f"np.random.RandomState(999).choice(n_kept, {opt.frames}, replace=False), unsorted",
                         "store_size": frame_size, "store_resize": "PIL bilinear, every frame not already store_size",
                         "dtype": "uint8 (the transform pipeline divides by 255)"}}
    window = {"window_s": WINDOW_S, "stored_columns": n_cols, "input_columns": n_in,
              "eval_window_start": opt.eval_window_start,
              "eval_start_column": eval_window_column(opt.eval_window_start, n_cols, n_in),
              "train": "uniformly random start column in [0, stored_columns - input_columns] (g2d.data.transforms)"}
    cache_dir = F.prepare_cache_dir(raw_dir, opt.cache_dir, out_dir=out_dir, option=f"{PREFIX}.cache_dir")
    digests = F.DigestStore(cache_dir / "digests.json")
    items, missing, seen = [], {"train": [], "test": []}, set()
    for y, t, _, split in rows:
        key = f"{y}_{t:06d}"
        if (y, t) not in clips:
            missing[split].append(key)
        elif key not in seen:
            seen.add(key)
            items.append((key, (clips[(y, t)], opt.sample_rate, opt.frames, opt.min_frames, frame_size)))
    if not items:
        raise _manual(raw_dir, csv_path, video_dir, f"none of the {len(rows)} csv clips is in {video_dir}")
    # what fetch pinned is re-verified before anything is computed from it
    rels = [str(a[0].relative_to(video_dir)) for _, a in items]
    checked = F.verify_fetched(raw_dir / F.MANIFEST, video_dir, NAME, rels=rels, digests=digests, jobs=opt.jobs,
                               missing="ignore")
    if (raw_dir / F.MANIFEST).is_file() and len(checked) < len(rels):
        F._log(f"vggsound: {len(rels) - len(checked)} clip(s) are not in {raw_dir / F.MANIFEST} (added after "
               f"fetch): run `g2d fetch vggsound` to pin them")
    cache = F.ClipCache(cache_dir / "clips", params=params, code=code_version(), digests=digests)
    results = F.map_clips(_process_clip, items, cache, sources=lambda a: a[:1], jobs=opt.jobs,
                          desc="VGGSound clips", skip_errors=(F.CorruptRawFile,))
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
    work = cache_dir / f"assembled-{os.getpid()}"
    try:
        splits = {s: assemble(cache, chosen[s], ("audio", "visual"), work / s, like) for s in ("train", "val", "test")}
        sizes = source_size_counts(cache, [c for s in splits.values() for c in s["clip"].tolist()])
        extra = {
            "source": "real",
            "class_index": cls_index,
            "class_order": "sorted label names of the csv (OGM-GE/G2D: first appearance among downloaded train rows)",
            "split_files": {"csv": {"file": csv_path.name, "sha256": F.sha256_file(csv_path), "rows": len(rows)}},
            "val": {"carved_from": "train", "fraction": opt.val_fraction, "seed": opt.split_seed, "stratified": True},
            "index": "row number in the csv (header excluded)",
            "preprocessing": {**params, "audio_window": window},
            "normalize": IMAGENET,
            "inputs": {"audio": {"input_shape": [1, 129, n_in], "window_start": opt.eval_window_start,
                                 "normalize": "none"},
                       "visual": {"input_shape": [3, opt.frames, *INPUT_HW], "normalize": "imagenet"}},
            "frames_resized_to_store": sum(n for k, n in sizes.items() if k != f"{frame_size[0]}x{frame_size[1]}"),
            "frame_source_sizes": sizes,
            "skipped": skipped,
            "skip_reasons": bad,
            "deviations": [
                (f"eval: a fixed 5-s window (start column {window['eval_start_column']} of the stored 10-s STFT, "
                 f"eval_window_start={opt.eval_window_start}); the official code draws a random window per access, "
                 "also at test time. Train: a random window, as official, but on the 8-ms hop grid and "
                 "differing from the STFT of a 5-s cut in the two border columns"),
                "class index = sorted label names (pinned), not first-appearance order of the downloaded rows",
                "frames decoded directly (no JPEG round trip)",
                (f"frames stored at one fixed size {frame_size[0]}x{frame_size[1]} (H x W, PIL bilinear; the clips have "
                 "mixed resolutions): an anisotropic resize of non-4:3 clips before the train-time "
                 "RandomResizedCrop(224) + flip, and a second resampling before the eval Resize((224, 224))"),
            ],
        }
        out = write_prepared(Path(out_dir), spec, splits, extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not opt.keep_cache:
        shutil.rmtree(cache.root, ignore_errors=True)
    F._log(f"vggsound: wrote {out}: {json.dumps({s: len(v) for s, v in chosen.items()})}")
    return out
