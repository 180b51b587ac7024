"""CREMA-D real data: git clone (LFS pointers) + verified per-file download, then OGM-GE/G2D preprocessing.

fetch: every AudioWAV/*.wav and VideoFlash/*.flv is checked against the sha256 + size of its git-lfs pointer
(packaged list, repo commit 1658cd34); missing or pointer-only files are downloaded from GitHub's LFS media
host (resumable, verified; no git or git-lfs needed). `clone:` uses an existing checkout instead.
prepare (g2d-spec §3.1): audio 22.05 kHz, tiled x3, first 3 s, clipped, log|STFT(512, 353)| -> (1, 257, 188)
float32; one frame = frame k*int(fps) with k = RandomState(999).choice(n_kept, 1), stored as decoded.

Frame storage. The frame is stored at `frame_size` (H, W) = (360, 480), CREMA-D's native 480x360, as
decoded (no resampling); a frame of another size is resized to it with PIL bilinear and counted in the meta
(`frames_resized_to_store`, `frame_source_sizes`). The model input (3, 1, 224, 224) is made on the fly by
g2d.data.transforms from `meta.inputs.visual` (uint8 /255, ImageNet normalisation; eval Resize((224, 224)),
train RandomResizedCrop(224) + flip, as OGM-GE/G2D do on the native-resolution JPEG frames).
Storage cost: 3 * 360 * 480 = 518,400 B per clip (was 150,528 B at 224x224), i.e. 3,857,932,800 B (3.86 GB,
3.59 GiB) for all 7,442 clips; with the audio (257 * 188 * 4 = 193,264 B per clip, 1.44 GB) the prepared
dataset is 711,664 B per clip, 5.30 GB for 7,442 clips (speaker_folds: 5,820 clips, 4.14 GB). The per-clip
prepare cache (keep_cache: true) holds a second copy of the same size.

Split variants (`split:`, recorded as meta `split_variant`; never table or average runs of different ones):
  ogm_ge         the OGM-GE/G2D split (6,698 train / 744 test, speaker-overlapping); val carved from train.
  ogm_ge_704     ogm_ge, but the test split keeps only the first floor(n_test / 64) * 64 clips in file order
                 (704 of 744): the test loader of ReconBoost (batch 64, shuffle=False, drop_last=True) and of
                 BalanceBenchmark at the time of its results table (eff_batch_size 64, no shuffle, drop_last).
  speaker_folds  kkontras/SynIB's 5 speaker-independent folds (63/14/14 actors train/val/test; `fold: 1..5`);
                 the fold's val actors are the val split. Only 5,820 of the 7,442 clips are in SynIB's lists.
  mla            MLA's own random split (Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation,
                 data/my_{train,test}_cre.txt; 6,698 / 744, only 71 of its test clips are in the OGM-GE test).
The packaged lists and their sources: g2d/data/splits/SOURCE.md.

Re-verification and cache. prepare first re-checks every wav/flv it reads against the sha256 that `fetch`
verified (`<raw_dir>/MANIFEST.sha256`): a file changed since is refused, naming it and the fix (`g2d fetch
cremad` / `dvc repro fetch@cremad`). Per-clip results are cached in `cache_dir` (default `data/cache/cremad/`,
next to `paths.raw`, outside every stage's output; see fetching.prepare_cache_dir): `clips/<clip>.npz`, each
valid only for the size + sha256 of its wav and flv, the preprocessing parameters (`sample_rate`,
`source_sample_rate`, `frame_size`, the recipe) and the code version (this file, the decoding libraries'
versions); `digests.json` remembers file digests by stat stamp so unchanged files are not re-hashed. A clip
skipped under `skip_corrupt: true` is re-evaluated once its files change or `skip_corrupt` is off.
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
INPUT_HW = (224, 224)  # what the model sees (Cremad.spec); made from the stored frame by g2d.data.transforms

# split variants -> the packaged files they read (a `split_dir` must hold files of the same names)
SPLITS = {
    "ogm_ge": {"train": "cremad_train.csv", "test": "cremad_test.csv"},
    "ogm_ge_704": {"train": "cremad_train.csv", "test": "cremad_test.csv"},
    "speaker_folds": {"folds": "cremad_synib_folds.json.gz"},  # a split_dir may hold the plain .json instead
    "mla": {"train": "cremad_mla_train.txt", "test": "cremad_mla_test.txt"},
}
N_FOLDS = 5
# ogm_ge_704: the test loader's batch size with drop_last=True and shuffle=False, i.e. the first
# floor(n / 64) * 64 test clips in file order (744 -> 704). Sources:
#   huacong/ReconBoost train.py @441eb5190f8799a0fa04338159b927e1ced0c00d: l.56 `--batch_size` default 64,
#     l.228-232 test DataLoader(shuffle=False, drop_last=True); loaders/CramedDataset.py reads test.csv in file
#     order, keeping rows whose wav and frame folder exist.
#   GeWu-Lab/BalanceBenchmark balancemm/utils/data_utils.py @4c1482fca5aaa8d4278af8e26020daa039e3ccf3 l.58:
#     test DataLoader(batch_size, drop_last=config drop_last) without shuffle (default False);
#     configs/global_config.yaml `drop_last: true`, `eff_batch_size: 64` until 62b8227 (2025-02-06; 32 at HEAD,
#     which would keep 736); balancemm/datasets/cremad_dataset.py reads the test csv in file order. 18 of the
#     20 CREMA-D accuracies of its results table are k/704 to two decimals (3 fit k/736).
DROP_LAST_BATCH = 64
MLA_LABELS = {"Anger": "ANG", "Disgust": "DIS", "Fear": "FEA", "Happy": "HAP", "Neutral": "NEU", "Sad": "SAD"}


@dataclass
class Options:
    clone: str = ""             # existing CREMA-D checkout (else <raw_dir>/CREMA-D); completed + verified by fetch
    media_url: str = MEDIA_URL  # LFS objects: <media_url>/<AudioWAV|VideoFlash>/<file>
    manifest: str = ""          # `sha256  size  path` list (default: packaged g2d/data/checksums/cremad_lfs.txt.gz)
    timeout: float = 15.0
    jobs: int = dataclasses.field(default_factory=F.default_jobs)
    split: str = "ogm_ge"       # ogm_ge | ogm_ge_704 | speaker_folds | mla (module docstring; meta split_variant)
    fold: int = 1               # speaker_folds only: SynIB fold 1..5 (= its json key; SynIB config fold = this - 1)
    split_dir: str = ""         # folder with the variant's split files (names in SPLITS; default: the packaged ones)
    val_fraction: float = 0.1   # val carved from train (all variants but speaker_folds, whose val is the fold's)
    split_seed: int = 0
    sample_rate: int = 22050
    source_sample_rate: int = 16000  # CREMA-D AudioWAV is 16 kHz; 0 accepts any rate (resampled)
    frame_size: list = dataclasses.field(default_factory=lambda: [360, 480])  # stored frame (H, W): native 480x360
    max_missing_fraction: float = 0.05  # more missing clips than this = wrong folder, not the literature's drops
    skip_corrupt: bool = False  # undecodable clip: error (default) or logged skip
    keep_cache: bool = True
    cache_dir: str = ""         # per-clip cache (default data/cache/cremad: <paths.raw>/../cache/cremad)

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.split not in SPLITS:
            raise F.RawDataError(f"{PREFIX}.split: {self.split!r} is not a split option; valid: "
                                 f"{', '.join(SPLITS)} (default ogm_ge)")
        if isinstance(self.fold, bool) or self.fold not in range(1, N_FOLDS + 1):
            raise F.RawDataError(f"{PREFIX}.fold: {self.fold!r} is not a speaker fold; valid: "
                                 f"{', '.join(map(str, range(1, N_FOLDS + 1)))} (with split: speaker_folds)")
        if self.fold != 1 and self.split != "speaker_folds":
            raise F.RawDataError(f"{PREFIX}.fold: {self.fold} is set but split is {self.split!r}; "
                                 f"fold applies to split: speaker_folds only")
        if (len(self.frame_size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                 for v in self.frame_size)):
            raise ValueError(f"frame_size={self.frame_size!r} must be [height, width], positive integers")


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
                   timeout=opt.timeout, how_to=how_to, progress=False, rerun="g2d fetch cremad")

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


def store_frame(img: np.ndarray, size) -> tuple[np.ndarray, bool]:
    """(H, W, 3) uint8 -> ((3, h, w) uint8, resized): the frame as decoded when it is already `size` = (h, w),
    else PIL bilinear-resized to it (PIL's antialiased bilinear, as torchvision Resize on PIL images)."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if img.shape[:2] == (h, w):
        return np.ascontiguousarray(img.transpose(2, 0, 1), np.uint8), False
    out = Image.fromarray(img).resize((w, h), Image.BILINEAR)
    return np.asarray(out, np.uint8).transpose(2, 0, 1), True


def source_size_counts(cache: F.ClipCache, keys) -> dict[str, int]:
    """{"HxW": n} of the decoded frames of `keys` (the `src_hw` array each clip's cache entry holds)."""
    out: dict[str, int] = {}
    for k in keys:
        with np.load(cache.path(k), allow_pickle=False) as z:
            for h, w in np.asarray(z["src_hw"]).reshape(-1, 2).tolist():
                out[f"{h}x{w}"] = out.get(f"{h}x{w}", 0) + 1
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------- prepare
PARAMS = {"audio": {"sample_rate": 22050, "tile": 3, "seconds": 3, "clip": [-1, 1], "n_fft": 512, "hop": 353,
                    "window": "hann (periodic)", "center": True, "pad_mode": "constant",
                    "transform": "log(|STFT| + 1e-7)", "resampler": "torchaudio.functional.resample (sinc_interp_hann)",
                    "source_sample_rate": 16000},
          "visual": {"frames": 1, "extract": "frames k*int(fps), k = 0,1,..., below CAP_PROP_FRAME_COUNT (1 per second)",
                     "select": "np.random.RandomState(999).choice(n_kept, 1, replace=False)",
                     "store_size": [360, 480], "store_resize": "PIL bilinear, only frames not already store_size",
                     "dtype": "uint8 (the transform pipeline divides by 255)"}}


def code_version() -> dict[str, str]:
    """The code the per-clip results depend on (part of the cache key): this file and the decoders' versions."""
    return F.code_version(__file__, libraries=("numpy", "torch", "torchaudio", "av", "soundfile", "pillow"))


def _process_clip(arg) -> dict[str, np.ndarray]:
    wav, flv, sr, src_sr, frame_size = arg
    x, rate = read_wav(wav, src_sr)
    x = resample(x, rate, sr)
    x = np.tile(x, 3)[: 3 * sr]  # OGM-GE: tile x3, keep the first 3 s
    x = np.clip(x, -1.0, 1.0)
    audio = log_stft(x, 512, 353)
    frames = decode_frames_1fps(flv)
    k = select_frames(len(frames), 1)
    visual = np.stack([store_frame(frames[i], frame_size)[0] for i in k], axis=1)  # (3, 1, H, W)
    src_hw = np.array([frames[i].shape[:2] for i in k], np.int32)
    return {"audio": audio, "visual": visual, "src_hw": src_hw}


def read_split(path: Path) -> list[tuple[str, str]]:
    """OGM-GE split csv: `clip,LABEL` per line, no header (a UTF-8 BOM is accepted)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [(r[0].strip(), r[1].strip()) for r in csv.reader(f) if r]


def read_mla_list(path: Path) -> list[tuple[str, str]]:
    """MLA's data/my_{train,test}_cre.txt: `<clip>.flv <Label>` per line -> (clip, LABEL)."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        name, _, label = line.strip().partition(".flv ")
        code = MLA_LABELS.get(label.strip())
        if not name or code is None or name.split("_")[2:3] != [code]:
            raise F.CorruptRawFile(f"{path}:{n}: expected `<actor>_<sentence>_<EMO>_<level>.flv <Label>` with "
                                   f"Label in {sorted(MLA_LABELS)} matching EMO, got {line!r}")
        rows.append((name, code))
    return rows


def read_speaker_folds(path: Path) -> dict[str, dict[str, list[str]]]:
    """SynIB assets/metadata/data_splits_val.pkl (JSON despite the name; .json or .json.gz here):
    {"1".."5": {"train"|"val"|"test": ["<clip>.wav-<k>", ...]}} -> {fold: {split: [clip, ...]}}.
    SynIB's loader keeps `entry.split("-")[0]` and takes the label from the name; so does this."""
    import gzip

    b = Path(path).read_bytes()
    try:
        d = json.loads(gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b)
        return {str(f): {s: [e.split("-")[0].removesuffix(".wav") for e in d[str(f)][s]]
                         for s in ("train", "val", "test")} for f in range(1, N_FOLDS + 1)}
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise F.CorruptRawFile(f"{path}: not SynIB's fold file ({type(e).__name__}: {e}); expected "
                               f'{{"1".."{N_FOLDS}": {{"train"|"val"|"test": ["<clip>.wav-<k>", ...]}}}}') from None


def _split_files(opt: Options) -> dict[str, Path]:
    names = dict(SPLITS[opt.split])
    if opt.split_dir:
        d = Path(opt.split_dir)
        files = {s: d / n for s, n in names.items()}
        if opt.split == "speaker_folds" and not files["folds"].is_file():
            files["folds"] = d / names["folds"].removesuffix(".gz")
    else:
        d = resources.files("g2d") / "data" / "splits"
        files = {s: Path(str(d / n)) for s, n in names.items()}
    want = ", ".join(names.values()) + (" (or the plain .json)" if opt.split == "speaker_folds" else "")
    for s, p in files.items():
        if not p.is_file():
            raise F.MissingRawFile(f"{p}: CREMA-D split {opt.split!r} file ({s}) missing (set {PREFIX}.split_dir "
                                   f"to a folder with {want}, or reinstall g2d).")
    return files


def split_rows(opt: Options, files: dict[str, Path]) -> tuple[dict[str, list[tuple[str, str]]], dict]:
    """{split: [(clip, LABEL), ...]} in file order for the chosen variant, and what the meta says about it."""
    if opt.split == "speaker_folds":
        folds = read_speaker_folds(files["folds"])[str(opt.fold)]
        rows = {s: [(c, c.split("_")[2] if c.count("_") >= 2 else "?") for c in folds[s]] for s in ("train", "val", "test")}
        actors = {s: sorted({c.split("_")[0] for c in folds[s]}) for s in rows}
        shared = sorted(set(actors["train"]) & set(actors["val"]) | set(actors["train"]) & set(actors["test"])
                        | set(actors["val"]) & set(actors["test"]))
        if shared:
            raise F.CorruptRawFile(f"{files['folds']}: fold {opt.fold} is not speaker-independent "
                                   f"(actor(s) {shared[:3]} in more than one split)")
        info = {"variant": f"speaker_folds/{opt.fold}", "actors": actors,
                "source": "kkontras/SynIB src/synib/mydatasets/Irony_Cremad/assets/metadata/data_splits_val.pkl "
                          "@1e59f5d8 (non_inclusive split; SynIB config fold = this fold - 1)"}
        return rows, info
    read = read_mla_list if opt.split == "mla" else read_split
    rows = {s: read(files[s]) for s in ("train", "test")}
    info = {"variant": opt.split}
    if opt.split == "mla":
        info["source"] = ("Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation "
                          "data/my_{train,test}_cre.txt @ab6c1845 (random 90/10 split of all clips)")
    else:
        info["source"] = "GeWu-Lab/OGM-GE_CVPR2022 data/CREMAD/{train,test}.csv (= rAIson-Lab/G2D)"
    return rows, info


def drop_last(chosen: list, batch: int = DROP_LAST_BATCH) -> tuple[list, list]:
    """(kept, dropped): an unshuffled DataLoader(batch_size=batch, drop_last=True) sees the first
    floor(n / batch) * batch items in order."""
    n = len(chosen) // batch * batch
    return chosen[:n], chosen[n:]


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
    rows, split_info = split_rows(opt, files)
    cls_index = {c: i for i, c in enumerate(CLASSES)}
    for s, rs in rows.items():
        bad = [(c, lab) for c, lab in rs if lab not in cls_index]
        if bad:
            where = files.get(s, files.get("folds"))
            raise F.RawDataError(f"{where}: unknown label {bad[0][1]!r} ({bad[0][0]}); expected one of {list(CLASSES)}")
    frame_size = [int(v) for v in opt.frame_size]
    params = {**PARAMS, "audio": {**PARAMS["audio"], "sample_rate": opt.sample_rate,
                                  "source_sample_rate": opt.source_sample_rate},
              "visual": {**PARAMS["visual"], "store_size": frame_size}}
    cache_dir = F.prepare_cache_dir(raw_dir, opt.cache_dir, out_dir=out_dir, option=f"{PREFIX}.cache_dir")
    digests = F.DigestStore(cache_dir / "digests.json")
    items, missing, seen = [], {}, set()
    for s, rs in rows.items():
        for clip, _ in rs:
            wav, flv = root / "AudioWAV" / f"{clip}.wav", root / "VideoFlash" / f"{clip}.flv"
            if wav.is_file() and flv.is_file() and not _is_pointer(wav) and not _is_pointer(flv):
                if clip not in seen:
                    seen.add(clip)
                    items.append((clip, (wav, flv, opt.sample_rate, opt.source_sample_rate, frame_size)))
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
    # what fetch verified is re-verified before anything is computed from it (absent clips are counted above)
    F.verify_fetched(raw_dir / F.MANIFEST, root, NAME, digests=digests, jobs=opt.jobs, missing="ignore",
                     rels=[f"{d}/{c}{ext}" for c, _ in items for d, ext in SUBDIRS.values()])
    cache = F.ClipCache(cache_dir / "clips", params=params, code=code_version(), digests=digests)
    skip = (F.CorruptRawFile,) if opt.skip_corrupt else ()
    results = F.map_clips(_process_clip, items, cache, sources=lambda a: a[:2], jobs=opt.jobs, desc="CREMA-D clips",
                          skip_errors=skip)
    corrupt = {k: cache.skip_reason(k).replace(str(root), "<root>") for k, ok in results.items() if not ok}
    skipped, chosen = {}, {}
    for s, rs in rows.items():
        chosen[s] = [(i, clip, cls_index[lab]) for i, (clip, lab) in enumerate(rs) if results.get(clip)]
        skipped[s] = {"missing": missing.get(s, []), "corrupt": [c for c, _ in rs if c in corrupt]}
    if "val" in rows:  # speaker_folds: the fold's val actors
        split_info["val"] = {"from": "speaker fold", "fold": opt.fold, "actors": split_info["actors"]["val"]}
    else:
        tr, va = stratified_split(np.array([y for _, _, y in chosen["train"]]), opt.val_fraction, opt.split_seed,
                                  "classification")
        chosen["val"] = [chosen["train"][j] for j in va]
        chosen["train"] = [chosen["train"][j] for j in tr]
        split_info["val"] = {"carved_from": "train", "fraction": opt.val_fraction, "seed": opt.split_seed,
                             "stratified": True}
    if opt.split == "ogm_ge_704":
        chosen["test"], dropped = drop_last(chosen["test"])
        split_info["test_rule"] = {
            "rule": f"first floor(n_kept / {DROP_LAST_BATCH}) * {DROP_LAST_BATCH} kept test clips in file order "
                    f"(DataLoader batch_size={DROP_LAST_BATCH}, shuffle=False, drop_last=True)",
            "kept": len(chosen["test"]), "dropped_by_drop_last": [c for _, c, _ in dropped],
            "source": "huacong/ReconBoost train.py@441eb519 l.56, l.228-232; GeWu-Lab/BalanceBenchmark "
                      "balancemm/utils/data_utils.py@4c1482fc l.58 with configs/global_config.yaml "
                      "eff_batch_size 64 (before 62b8227)"}
        if len(chosen["test"]) != 704:
            F._log(f"cremad: ogm_ge_704 keeps {len(chosen['test'])} test clips (704 with all 744 present)")
    work = cache_dir / f"assembled-{os.getpid()}"
    like = next((c for s in chosen.values() for _, c, _ in s), None)
    try:
        splits = {s: assemble(cache, chosen[s], ("audio", "visual"), work / s, like) for s in ("train", "val", "test")}
        sizes = source_size_counts(cache, [c for s in splits.values() for c in s["clip"].tolist()])
        out = _write(out_dir, splits, opt, files, rows, cls_index, params, skipped, corrupt, split_info, sizes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not opt.keep_cache:
        shutil.rmtree(cache.root, ignore_errors=True)
    return out


def _file_info(p: Path, n_rows: int) -> dict:
    import gzip
    import hashlib

    b = p.read_bytes()
    out = {"file": p.name, "sha256": hashlib.sha256(b).hexdigest(), "rows": n_rows}
    if b[:2] == b"\x1f\x8b":
        out["sha256_uncompressed"] = hashlib.sha256(gzip.decompress(b)).hexdigest()
    return out


def _write(out_dir, splits, opt, files, rows, cls_index, params, skipped, corrupt, split_info, sizes) -> Path:
    from g2d.data.cremad import Cremad

    h, w = (int(v) for v in opt.frame_size)
    store = f"{h}x{w}"
    if opt.split == "speaker_folds":
        index = "row number in the fold's list of that split (SynIB data_splits_val.pkl[fold][split])"
        split_files = {"folds": _file_info(files["folds"], sum(len(r) for r in rows.values()))}
    else:
        index = "row number in the split file (val rows index the train file)"
        split_files = {s: _file_info(p, len(rows[s])) for s, p in files.items()}
    extra = {
        "source": "real",
        "class_index": cls_index,
        "split_variant": split_info["variant"],
        "split": {k: v for k, v in split_info.items() if k != "val"},
        "split_files": split_files,
        "val": split_info["val"],
        "index": index,
        "preprocessing": params,
        "normalize": IMAGENET,
        "inputs": {"visual": {"input_shape": [3, 1, *INPUT_HW], "normalize": "imagenet"}},
        "frames_resized_to_store": sum(n for k, n in sizes.items() if k != store),
        "frame_source_sizes": sizes,
        "skipped": {s: {"missing": len(v["missing"]), "corrupt": len(v["corrupt"])} for s, v in skipped.items()},
        "skipped_clips": skipped,
        "corrupt_reasons": corrupt,
        "deviations": [
            "frame taken from the decoded video directly (OGM-GE goes through an OpenCV JPEG round trip)",
            (f"stored frame: the decoded frame at {store} (H x W; CREMA-D's native 480x360), frames of another size "
             "PIL-bilinear resized to it (frames_resized_to_store); the test-time Resize((224, 224)) and the "
             "train-time RandomResizedCrop(224) + flip are applied to it on the fly (g2d.data.transforms)"),
            "resampling 16 -> 22.05 kHz with torchaudio's sinc resampler instead of librosa/soxr",
        ],
    }
    out = write_prepared(Path(out_dir), Cremad.spec, splits, extra)
    F._log(f"cremad[{split_info['variant']}]: {json.dumps(extra['skipped'])} skipped; "
           f"{extra['frames_resized_to_store']} frame(s) resized to {store}; wrote {out}")
    return out
