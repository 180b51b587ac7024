"""IEMOCAP real data: CMU-MultimodalSDK / MulT aligned feature pickle -> 4 classes, (20, 74/35/300) sequences.

Licence-gated (USC SAIL release form): `fetch` never downloads, it checks the user-supplied file and
otherwise prints the steps. Input layout (yaohungt/Multimodal-Transformer `iemocap_data.pkl`):
`{'train'|'valid'|'test': {'audio' (N,20,74) COVAREP, 'vision' (N,20,35) FACET, 'text' (N,20,300) GloVe,
'labels' (N,4,2), ['id']}}`; the 4 label rows are the emotions Neutral, Happy, Sad, Angry (MulT's order),
each a (not, is) one-hot pair (MulT: `argmax(-1)` -> 4 binary tasks).

We turn this into one 4-way label (neutral, happy, sad, angry): class = the emotion whose pair says "is".
Also accepted: (N,4) multi-hot, or (N,)/(N,1) class indices in that order. A sample with zero or several
positive emotions has no single class: skipped and counted in meta (`ambiguous_labels: skip`) or an
error (`error`). Features as in MulT: audio `-inf` -> 0, nothing else; padded/truncated to `seq_len` at the
end (a no-op for the 20-step release). Splits are the pickle's train/valid/test.
Same pickle-safety rule as UR-Funny (see `g2d.data.raw.urfunny.load_pickle`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from g2d.data.raw import fetching as F
from g2d.data.raw.urfunny import DIGESTS, SPLITS, fixed_length, load_pickle, split_arrays

NAME = "iemocap"
PREFIX = f"datasets.{NAME}.real"
RELEASE_FORM = "https://sail.usc.edu/iemocap/Data_Release_Form_IEMOCAP.pdf"
RELEASE_PAGE = "https://sail.usc.edu/iemocap/iemocap_release.htm"
MULT_REPO = "https://github.com/yaohungt/Multimodal-Transformer"
MULT_DATA = "https://www.dropbox.com/sh/hyzpgx1hp9nj37s/AAB7FhBqJOFDw2hEyvv2ZXHxa?dl=0"  # MulT README, Datasets
MODS = {"audio": "audio", "visual": "vision", "text": "text"}
DIMS = {"audio": 74, "visual": 35, "text": 300}
EMOTIONS = ("neutral", "happy", "sad", "angry")  # MulT label-row order == our class order


@dataclass
class Options:
    path: str = ""  # where the user put the feature pickle (file, or a directory holding `filename`)
    filename: str = "iemocap_data.pkl"
    sha256: str = ""  # pinned checksum of the user's file
    allow_unverified_pickle: bool = False
    seq_len: int = 20
    ambiguous_labels: str = "skip"  # skip | error

    def __post_init__(self):
        self.path, self.sha256 = self.path or "", (self.sha256 or "").lower()
        if self.seq_len < 1:
            raise F.RawDataError(f"{PREFIX}.seq_len: must be >= 1, got {self.seq_len}")
        if self.ambiguous_labels not in ("skip", "error"):
            raise F.RawDataError(f"{PREFIX}.ambiguous_labels: must be 'skip' or 'error', got {self.ambiguous_labels!r}")
        if self.sha256 and (len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)):
            raise F.RawDataError(f"{PREFIX}.sha256: must be 64 hex digits, got {self.sha256!r}")


def _file(raw_dir: Path, o: Options) -> Path:
    if not o.path:
        return Path(raw_dir) / o.filename
    p = Path(o.path).expanduser()
    return p / o.filename if p.is_dir() else p


def how_to(raw_dir: Path, o: Options) -> F.ManualStepRequired:
    target = _file(raw_dir, o)
    return F.manual_step(
        f"IEMOCAP is licence-gated and cannot be downloaded automatically; {target} is missing.",
        [(f"Read the terms at {RELEASE_PAGE}; fill in and sign the release form {RELEASE_FORM} and email it to "
          f"USC SAIL as the page says. Approval arrives by email with a download link (days to weeks)."),
         (f"With the licence, obtain the CMU-MultimodalSDK aligned features as used by MulT: file "
          f"`iemocap_data.pkl` (audio COVAREP 74-d, visual FACET 35-d, text GloVe 300-d, 20 steps, labels "
          f"(N, 4, 2)) from the data folder linked in {MULT_REPO} README ({MULT_DATA}); CMU's own server no "
          f"longer has them. If that link is gone, ask the MulT/SDK authors (with your approval email) or "
          f"rebuild the features from the release with CMU-MultimodalSDK."),
         (f"Put the file at {Path(raw_dir) / o.filename}, or anywhere and set `{PREFIX}.path: /your/path` in "
          f"params.yaml."),
         (f"Pickles execute code when loaded: pin its checksum with `{PREFIX}.sha256: <output of sha256sum on "
          f"the file>` (or set `{PREFIX}.allow_unverified_pickle: true`, not recommended)."),
         "Do not use unofficial copies of IEMOCAP (e.g. on Hugging Face): they bypass the licence."],
        f"g2d fetch {NAME} && g2d prepare {NAME}")


def fetch(raw_dir: Path, options: dict) -> Path:
    """Never downloads: check the user's file (checksum + layout) and record it in MANIFEST.sha256."""
    o = F.parse_options(Options, options, PREFIX)
    raw_dir = Path(raw_dir)
    path = _file(raw_dir, o)
    if not path.is_file():
        raise how_to(raw_dir, o)
    _load(raw_dir, o)
    if o.sha256:  # verified against the pin: record it next to the raw data as well
        manifest = raw_dir / F.MANIFEST
        recorded = F.read_manifest(manifest) if manifest.is_file() else {}
        F.write_manifest(manifest, {**recorded, path.name: o.sha256})
    return raw_dir


def _load(raw_dir: Path, o: Options) -> dict:
    path = _file(raw_dir, o)
    if not path.is_file():
        raise how_to(raw_dir, o)
    data = load_pickle(path, raw_dir=raw_dir, pinned=o.sha256, allow_unverified=o.allow_unverified_pickle,
                       prefix=PREFIX, rerun=f"g2d fetch {NAME}")
    if not isinstance(data, dict) or any(k not in data for k in SPLITS):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise F.CorruptRawFile(f"{path}: expected a dict with {list(SPLITS)} (MulT layout), got {keys}")
    return data


def class_labels(labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(class index, ok mask) from (N,4,2) pairs, (N,4) multi-hot or (N,)/(N,1) indices."""
    lab = np.asarray(labels)
    n = len(lab)
    if lab.ndim == 3 and lab.shape[1:] == (4, 2):
        pos = lab.argmax(axis=2) == 1  # MulT: argmax over (not, is)
    elif lab.ndim == 2 and lab.shape[1] == 4:
        pos = lab > 0.5
    elif lab.ndim == 1 or (lab.ndim == 2 and lab.shape[1] == 1):
        idx = lab.reshape(n)
        if not np.all(np.isin(idx, np.arange(4))):
            raise F.CorruptRawFile(f"{where}/labels: class indices outside 0..3: {np.unique(idx)[:10]}")
        return idx.astype(np.int64), np.ones(n, bool)
    else:
        raise F.CorruptRawFile(f"{where}/labels: shape {lab.shape}; expected (N, 4, 2), (N, 4) or (N,)")
    ok = pos.sum(axis=1) == 1
    return pos.argmax(axis=1).astype(np.int64), ok


def process_split(d: dict, where: str, o: Options) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    a = split_arrays(d, where, DIMS, MODS)
    cls, ok = class_labels(a["labels"], where)
    if not ok.all() and o.ambiguous_labels == "error":
        bad = np.flatnonzero(~ok)
        raise F.CorruptRawFile(f"{where}/labels: {len(bad)} sample(s) (first: row {bad[0]}) have zero or several "
                               f"positive emotions; set {PREFIX}.ambiguous_labels: skip to drop them")
    keep = np.flatnonzero(ok)
    out = {}
    for m, key in MODS.items():
        x = a[m][keep]
        if m == "audio":
            x = x.copy()
            x[x == -np.inf] = 0.0  # MulT src/dataset.py
        if not np.isfinite(x).all():
            raise F.CorruptRawFile(f"{where}/{key}: {int((~np.isfinite(x)).sum())} non-finite value(s); "
                                   f"not the expected release")
        out[m] = fixed_length(x, np.zeros(len(keep), np.int64), o.seq_len)
    out["label"] = cls[keep]
    out["index"] = keep.astype(np.int64)
    return out, {"ambiguous_labels": int((~ok).sum())}


def prepare(raw_dir: Path, out_dir: Path, options: dict) -> Path:
    from g2d.data.iemocap import Iemocap
    from g2d.data.prepared import write_prepared

    o = F.parse_options(Options, options, PREFIX)
    raw_dir = Path(raw_dir)
    path = _file(raw_dir, o)
    data = _load(raw_dir, o)
    splits, skips = {}, {}
    for key, split in SPLITS.items():
        splits[split], skips[split] = process_split(data[key], f"{path}[{key!r}]", o)
        if skips[split]["ambiguous_labels"]:
            F._log(f"iemocap/{split}: skipped {skips[split]['ambiguous_labels']} sample(s) without a single "
                   f"emotion label")
    extra = {
        "source": "real",
        "raw_file": path.name,
        "raw_sha256": DIGESTS[str(path)],
        "class_order": list(Iemocap.spec.classes),
        "label_mapping": "MulT labels (N,4,2) rows Neutral/Happy/Sad/Angry, (not,is) pairs -> index of the "
                         "single positive row",
        "split_provenance": "pickle folds train/valid/test (CMU-MultimodalSDK / MulT) -> train/val/test",
        "preprocessing": {"audio_neg_inf_to": 0.0, "seq_len": o.seq_len, "pad": "zeros at the end",
                          "truncate": "keep first seq_len steps", "ambiguous_labels": o.ambiguous_labels},
        "skipped": skips,
        "options": {k: v for k, v in asdict(o).items() if k != "path"},
    }
    return write_prepared(Path(out_dir), Iemocap.spec, splits, extra)
