"""UR-Funny real data: MultiBench-style feature pickle -> prepared (text 300 / audio 81 / visual 371, 50 steps).

Sources (`source` option):
* `multibench` (default): `humor.pkl`, MultiBench's UR-FUNNY release (a Google Drive folder: manual download,
  or `url` for a direct mirror); the G2D lineage's `urfunny_punchline.pkl` has the same layout:
  `{'train'|'valid'|'test': {'text' (N,T,300), 'audio' (N,T,81), 'vision' (N,T,371), 'labels', ['id']}}`,
  word-aligned, zero-padded at the front.
* `sdk_v2`: ROC-HCI's UR-FUNNY v2 feature pickles (direct Dropbox zip, fully automatic), turned into the
  same layout from the punchline words (GloVe via word_embedding_list, COVAREP 81, OpenFace2 371).

Preprocessing (MohammedRakib/MMPareto:code/dataset/text_dataset.py `Humor_Dataset`, aligned=True):
drop samples whose text is all zeros; audio `-inf` -> 0; keep steps from the first non-zero text step on
(all modalities); label = 1 if label >= 1 else 0. The lineage pads each batch at the end with zeros
(`pad_sequence`); we store fixed length `seq_len` (50): the aligned steps, zero-padded at the end, and
truncated to the first `seq_len` steps if longer. Folds are the pickle's (speaker-independent) ones.

Pickles execute code when loaded: a pickle is only unpickled after its sha256 matches a pinned
(`sha256` option) or recorded (MANIFEST.sha256 written by `fetch` on download, once the file passed the pickle
format check: protocol header, final STOP opcode, no HTML page) checksum, or with
`allow_unverified_pickle: true`; in every case through a restricted unpickler that only admits numpy
arrays and builtin containers.
"""
from __future__ import annotations

import os
import pickle
import shutil
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from g2d.data.raw import fetching as F

NAME = "urfunny"
PREFIX = f"datasets.{NAME}.real"
DRIVE_FOLDER = "https://drive.google.com/drive/folders/1Agzm157lciMONHOHemHRSySmjn1ahHX1"
HKT_URL = "https://www.dropbox.com/s/5y8q52vj3jklwmm/ur_funny.pkl?dl=1"
SDK_V2_URL = "https://www.dropbox.com/sh/9h0pcqmqoplx9p2/AAC8yYikSBVYCSFjm3afFHQva?dl=1"  # ROC-HCI/UR-FUNNY README
SDK_ZIP = "urfunny_v2_features.zip"
SDK_FILES = ("data_folds.pkl", "language_sdk.pkl", "covarep_features_sdk.pkl", "openface_features_sdk.pkl",
             "humor_label_sdk.pkl", "word_embedding_list.pkl")
SDK_FOLDS = {"train": "train", "dev": "valid", "test": "test"}  # data_folds key -> pickle-layout key
SPLITS = {"train": "train", "valid": "val", "test": "test"}  # pickle key -> prepared split
MODS = {"text": "text", "audio": "audio", "visual": "vision"}  # prepared modality -> pickle key
DIMS = {"text": 300, "audio": 81, "visual": 371}


@dataclass
class Options:
    source: str = "multibench"  # multibench (humor.pkl, manual Drive download) | sdk_v2 (ROC-HCI Dropbox zip)
    sdk_url: str = SDK_V2_URL
    filename: str = "humor.pkl"  # the MultiBench pickle inside raw_dir
    url: str = ""  # optional direct URL of a MultiBench-style pickle (a mirror); "" = manual Drive download
    sha256: str = ""  # pinned checksum; "" = the one recorded in MANIFEST.sha256 on first download
    allow_unverified_pickle: bool = False
    seq_len: int = 50
    nonfinite_to_zero: bool = False  # NaN/inf left after cleaning: error (default) or 0, counted in meta
    timeout: float = 30.0

    def __post_init__(self):
        self.url, self.sha256 = self.url or "", (self.sha256 or "").lower()
        if self.source not in ("multibench", "sdk_v2"):
            raise F.RawDataError(f"{PREFIX}.source: must be 'multibench' or 'sdk_v2', got {self.source!r}")
        if self.seq_len < 1:
            raise F.RawDataError(f"{PREFIX}.seq_len: must be >= 1, got {self.seq_len}")
        if self.sha256 and (len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)):
            raise F.RawDataError(f"{PREFIX}.sha256: must be 64 hex digits, got {self.sha256!r}")


# ------------------------------------------------------------------------------------------- pickle safety
_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"), ("collections", "OrderedDict"), ("_codecs", "encode"),
            ("collections", "defaultdict"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"),
            ("builtins", "set"), ("builtins", "bytearray")}


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only numpy arrays/scalars and builtin containers: no arbitrary callables."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name} (only numpy arrays and containers allowed)")


DIGESTS: dict[str, str] = {}  # path -> sha256 verified by the last load_pickle of that path


def load_pickle(path: Path, *, raw_dir: Path, pinned: str, allow_unverified: bool, prefix: str, rerun: str) -> Any:
    """Verify `path` against the pinned or recorded sha256 (or the explicit opt-out), then unpickle safely.

    Records the verified digest in `DIGESTS[path]` (meta provenance without hashing GBs twice)."""
    path = Path(path)
    if not path.is_file():
        raise F.MissingRawFile(f"{path}: missing. Run `{rerun}` (it explains how to obtain the file).")
    got = F.sha256_file(path)
    manifest = Path(raw_dir) / F.MANIFEST
    try:
        key = str(path.resolve().relative_to(Path(raw_dir).resolve()))
    except ValueError:  # a user-supplied file outside raw_dir is recorded by name
        key = path.name
    recorded = F.read_manifest(manifest).get(key) if manifest.is_file() else None
    expected, source = (pinned.lower(), f"{prefix}.sha256") if pinned else (recorded, str(manifest))
    if expected is not None:
        if got != expected:
            raise F.ChecksumMismatch(
                f"{path}: sha256 {got} != expected {expected} (from {source}). The file is corrupt, truncated "
                f"or a different release: delete it and run `{rerun}` again, or, if this file is the one you "
                f"mean to use, set {prefix}.sha256: {got} (and delete the stale entry in {manifest})."
                + ("" if pinned else "\n" + F.reset_hint(manifest, key, rerun)))
    elif not allow_unverified:
        raise F.RawDataError(
            f"{path}: refusing to unpickle a file with no pinned or recorded checksum (pickles can execute "
            f"code). Its sha256 is {got}. If you trust where it came from, pin it with "
            f"`{prefix}.sha256: {got}` in params.yaml (or set `{prefix}.allow_unverified_pickle: true`).")
    else:
        msg = f"{path}: unpickling without a verified checksum (sha256 {got}) because " \
              f"{prefix}.allow_unverified_pickle is true"
        warnings.warn(msg, stacklevel=2)
        F._log("WARNING " + msg)
    for enc in ("ASCII", "latin1"):  # latin1: Python-2 pickles of numpy arrays
        try:
            with open(path, "rb") as f:  # streamed: feature pickles are GBs
                obj = _ArrayUnpickler(f, encoding=enc).load()
            DIGESTS[str(path)] = got
            return obj
        except UnicodeDecodeError:
            continue
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
            raise F.CorruptRawFile(f"{path}: cannot be unpickled ({type(e).__name__}: {e}): truncated or not "
                                   f"a feature pickle. Delete it and run `{rerun}` again.") from None
    raise F.CorruptRawFile(f"{path}: undecodable string data in the pickle")


def fixed_length(x: np.ndarray, start: np.ndarray, length: int) -> np.ndarray:
    """out[i, t] = x[i, start_i + t] while inside x, else 0: left-align from `start`, zero-pad at the end."""
    t0 = x.shape[1]
    idx = start[:, None] + np.arange(length)[None, :]
    valid = idx < t0
    out = np.take_along_axis(x, np.minimum(idx, t0 - 1)[:, :, None], axis=1)
    out[~valid] = 0
    return out


def split_arrays(d: Any, where: str, dims: dict[str, int], mods: dict[str, str]) -> dict[str, np.ndarray]:
    """Check one pickle split: the modality keys exist, are (N, T, D) with the documented D, N agrees."""
    if not isinstance(d, dict):
        raise F.CorruptRawFile(f"{where}: expected a dict of arrays, got {type(d).__name__}")
    need = [*mods.values(), "labels"]
    missing = [k for k in need if k not in d]
    if missing:
        raise F.CorruptRawFile(f"{where}: missing key(s) {missing}; has {sorted(d)} (not the expected layout)")
    out = {}
    for m, key in mods.items():
        a = np.asarray(d[key])
        if a.ndim != 3 or a.shape[2] != dims[m]:
            raise F.CorruptRawFile(f"{where}/{key}: shape {a.shape}, expected (N, T, {dims[m]})")
        out[m] = a.astype(np.float32, copy=False)
    out["labels"] = np.asarray(d["labels"])
    n = {k: len(v) for k, v in out.items()}
    if len(set(n.values())) != 1:
        raise F.CorruptRawFile(f"{where}: arrays disagree on the number of samples: {n}")
    return out


def _check_finite(arrays: dict[str, np.ndarray], where: str, to_zero: bool) -> dict[str, int]:
    counts = {}
    for k, a in arrays.items():
        bad = ~np.isfinite(a)
        counts[k] = int(bad.sum())
        if counts[k] and not to_zero:
            raise F.CorruptRawFile(f"{where}/{k}: {counts[k]} non-finite value(s) left after the documented "
                                   f"cleaning (audio -inf -> 0); not the expected release, or set "
                                   f"{PREFIX}.nonfinite_to_zero: true to zero them (counted in meta)")
        a[bad] = 0.0
    return counts


# ------------------------------------------------------------------------------------------- fetch / prepare
def _how_to(raw_dir: Path, o: Options) -> F.ManualStepRequired:
    return F.manual_step(
        f"UR-Funny: the MultiBench feature pickle {raw_dir / o.filename} is needed (MultiBench only serves it "
        f"from a Google Drive folder, which cannot be fetched with a plain HTTP request).",
        [f"Open {DRIVE_FOLDER} (or `pip install gdown && gdown --folder {DRIVE_FOLDER} -O {raw_dir}`).",
         f"Download `humor.pkl` and save it as {raw_dir / o.filename}.",
         (f"Pickles execute code when loaded: pin the file's checksum with `{PREFIX}.sha256: <sha256sum of the "
          f"file>` in params.yaml (or set `{PREFIX}.url` to a direct-download mirror so fetch records it)."),
         (f"Or set `{PREFIX}.source: sdk_v2` to build the same layout automatically from ROC-HCI's UR-FUNNY v2 "
          f"features ({SDK_V2_URL}); a different build, so numbers are not directly comparable."),
         (f"Note: HKT's `ur_funny.pkl` ({HKT_URL}) is a different layout (raw words, 91-d OpenFace subset) and "
          f"cannot produce the 300/81/371-d features; use MultiBench's file.")],
        f"g2d fetch {NAME} && g2d prepare {NAME}")


def fetch(raw_dir: Path, options: dict) -> Path:
    """multibench: download `url` (checksum recorded on first download) or verify a manually placed pickle.
    sdk_v2: download + extract ROC-HCI's feature zip, record the extracted pickles' checksums."""
    o = F.parse_options(Options, options, PREFIX)
    raw_dir = Path(raw_dir)
    if o.source == "sdk_v2":
        dl = raw_dir / "downloads"
        F.fetch_remotes([F.Remote(o.sdk_url, SDK_ZIP, o.sha256 or None)], dl, timeout=o.timeout,
                        how_to=f"Or download {o.sdk_url} by hand and save it as {dl / SDK_ZIP}.",
                        rerun=f"g2d fetch {NAME}")
        if not zipfile.is_zipfile(dl / SDK_ZIP):  # e.g. an HTML page: drop it and its recorded checksum
            (dl / SDK_ZIP).unlink()
            rec = F.read_manifest(dl / F.MANIFEST) if (dl / F.MANIFEST).is_file() else {}
            rec.pop(SDK_ZIP, None)
            F.write_manifest(dl / F.MANIFEST, rec)
            raise F.CorruptRawFile(f"{dl / SDK_ZIP}: not a zip archive (Dropbox may have served an HTML page); "
                                   f"deleted. Run `g2d fetch {NAME}` again, or download {o.sdk_url} in a "
                                   f"browser and save it as {dl / SDK_ZIP}.")
        _extract_zip(dl / SDK_ZIP, raw_dir / "sdk_v2")
        d = _sdk_dir(raw_dir)
        F.verify_or_record(raw_dir, [str((d / f).relative_to(raw_dir)) for f in SDK_FILES],
                           rerun=f"g2d fetch {NAME}")
        _sdk_load(raw_dir, o)
        return raw_dir
    if o.url:
        F.fetch_remotes([F.Remote(o.url, o.filename, o.sha256 or None)], raw_dir, timeout=o.timeout,
                        how_to=str(_how_to(raw_dir, o)), rerun=f"g2d fetch {NAME}")
    elif not (raw_dir / o.filename).is_file():
        raise _how_to(raw_dir, o)
    _load(raw_dir, o)  # verifies the pin / manifest (or honours the opt-out) and the layout
    return raw_dir


def _load(raw_dir: Path, o: Options) -> dict:
    path = raw_dir / o.filename
    data = load_pickle(path, raw_dir=raw_dir, pinned=o.sha256, allow_unverified=o.allow_unverified_pickle,
                       prefix=PREFIX, rerun=f"g2d fetch {NAME}")
    if isinstance(data, dict) and "dev" in data and "valid" not in data:
        raise F.CorruptRawFile(f"{path}: looks like HKT's ur_funny.pkl (train/dev/test lists of raw words); "
                               f"prepare needs MultiBench's humor.pkl ({DRIVE_FOLDER}) or {PREFIX}.source: sdk_v2.")
    if not isinstance(data, dict) or any(k not in data for k in SPLITS):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise F.CorruptRawFile(f"{path}: expected a dict with {list(SPLITS)}, got {keys}")
    return data


def _extract_zip(archive: Path, dest: Path) -> Path:
    """`F.extract`, except that the bare "/" root entry of Dropbox folder zips (libarchive/libarchive#982),
    which `F.extract` refuses as an absolute path, is skipped. Same marker, same atomic rename."""
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
    if "/" not in names:
        return F.extract(archive, dest)
    digest = F.sha256_file(archive)
    if F.marker_digest(dest) == digest:
        return dest
    tmp = dest.with_name(f".{dest.name}.extract-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.infolist() if m.filename != "/"]
            for m in members:
                p = PurePosixPath(m.filename)
                if p.is_absolute() or ".." in p.parts:
                    raise F.CorruptRawFile(f"{archive}: member {m.filename!r} escapes the target directory")
            z.extractall(tmp, members)
        F.write_extract_marker(tmp, digest)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _sdk_dir(raw_dir: Path) -> Path:
    found = sorted(p.parent for p in (raw_dir / "sdk_v2").rglob(SDK_FILES[0])) if (raw_dir / "sdk_v2").is_dir() else []
    if not found:
        raise F.MissingRawFile(f"{raw_dir / 'sdk_v2'}: no {SDK_FILES[0]} (UR-FUNNY v2 features); run `g2d fetch "
                               f"{NAME}` with {PREFIX}.source: sdk_v2")
    missing = [f for f in SDK_FILES if not (found[0] / f).is_file()]
    if missing:
        raise F.MissingRawFile(f"{found[0] / missing[0]}: missing from the UR-FUNNY v2 features; delete "
                               f"{raw_dir / 'sdk_v2'} and run `g2d fetch {NAME}` again")
    return found[0]


def _sdk_load(raw_dir: Path, o: Options) -> dict:
    """UR-FUNNY v2 SDK pickles -> MultiBench-style dict (punchline words, front-padded to seq_len).

    Per id (ROC-HCI/UR-FUNNY README): text = word_embedding_list[punchline_embedding_indexes] (GloVe 840B
    300-d), audio = covarep punchline_features (n x 81), visual = openface punchline_features (n x 371);
    the first seq_len words are kept. `process_split` then applies the same recipe as to humor.pkl.
    """
    d = _sdk_dir(raw_dir)
    sdk = {f: load_pickle(d / f, raw_dir=raw_dir, pinned="", allow_unverified=o.allow_unverified_pickle,
                          prefix=PREFIX, rerun=f"g2d fetch {NAME}") for f in SDK_FILES}
    folds, lang, cov, face, lab = (sdk[f] for f in SDK_FILES[:5])
    emb = np.asarray(sdk["word_embedding_list.pkl"], np.float32)
    if emb.ndim != 2 or emb.shape[1] != DIMS["text"]:
        raise F.CorruptRawFile(f"{d / 'word_embedding_list.pkl'}: shape {emb.shape}, expected (V, 300)")
    out, L = {"sdk_truncated": {}, "sdk_length_mismatch": {}}, o.seq_len
    for fold, key in SDK_FOLDS.items():
        if fold not in folds:
            raise F.CorruptRawFile(f"{d / 'data_folds.pkl'}: no {fold!r} fold; has {sorted(folds)}")
        ids = list(folds[fold])
        x = {m: np.zeros((len(ids), L, DIMS[m]), np.float32) for m in DIMS}
        trunc = mism = 0
        for i, h in enumerate(ids):
            try:
                seqs = {"text": emb[np.asarray(lang[h]["punchline_embedding_indexes"], np.int64).reshape(-1)],
                        "audio": np.asarray(cov[h]["punchline_features"], np.float32).reshape(-1, DIMS["audio"]),
                        "visual": np.asarray(face[h]["punchline_features"], np.float32).reshape(-1, DIMS["visual"])}
            except (KeyError, IndexError, ValueError, TypeError) as e:
                raise F.CorruptRawFile(f"{d}: sample {h!r} ({fold}) is malformed ({type(e).__name__}: {e})") from None
            n = min(len(v) for v in seqs.values())
            mism += len({len(v) for v in seqs.values()}) > 1
            trunc += n > L
            n = min(n, L)
            for m, v in seqs.items():
                if n:
                    x[m][i, L - n:] = v[:n]
        out[key] = {"text": x["text"], "audio": x["audio"], "vision": x["visual"],
                    "labels": np.array([float(lab[h]) for h in ids]).reshape(-1, 1)}
        out["sdk_truncated"][SPLITS[key]], out["sdk_length_mismatch"][SPLITS[key]] = trunc, mism
    return out


def process_split(d: dict, where: str, seq_len: int, to_zero: bool = False) -> tuple[dict, dict]:
    """MMPareto `Humor_Dataset` cleaning + fixed length; returns arrays and skip counts."""
    a = split_arrays(d, where, DIMS, MODS)
    audio = a["audio"].copy()
    audio[audio == -np.inf] = 0.0
    a["audio"] = audio
    nz = np.any(a["text"] != 0, axis=2)  # (N, T): text step has a word
    keep = np.flatnonzero(nz.any(axis=1))
    start = nz[keep].argmax(axis=1)
    out = {m: fixed_length(a[m][keep], start, seq_len) for m in MODS}
    nonfinite = _check_finite(out, where, to_zero)
    lab = a["labels"].reshape(len(a["labels"]), -1)
    if lab.shape[1] != 1:
        raise F.CorruptRawFile(f"{where}/labels: shape {a['labels'].shape}, expected one value per sample")
    lab = lab[keep, 0].astype(np.float64)
    if not np.isfinite(lab).all():
        raise F.CorruptRawFile(f"{where}/labels: non-finite labels")
    out["label"] = (lab >= 1).astype(np.int64)
    out["index"] = keep.astype(np.int64)
    skips = {"dropped_all_zero_text": int(len(nz) - len(keep)), "truncated": int(((nz.shape[1] - start) > seq_len).sum())}
    return out, {**skips, **({"nonfinite_zeroed": nonfinite} if to_zero else {})}


def prepare(raw_dir: Path, out_dir: Path, options: dict) -> Path:
    from g2d.data.prepared import write_prepared
    from g2d.data.urfunny import Urfunny

    o = F.parse_options(Options, options, PREFIX)
    raw_dir = Path(raw_dir)
    if o.source == "sdk_v2":
        data, d = _sdk_load(raw_dir, o), _sdk_dir(raw_dir)
        files = {str((d / f).relative_to(raw_dir)): DIGESTS[str(d / f)] for f in SDK_FILES}
        where = str(d)
    else:
        data = _load(raw_dir, o)
        files = {o.filename: DIGESTS[str(raw_dir / o.filename)]}
        where = str(raw_dir / o.filename)
    splits, skips = {}, {}
    for key, split in SPLITS.items():
        splits[split], skips[split] = process_split(data[key], f"{where}[{key!r}]", o.seq_len, o.nonfinite_to_zero)
        if o.source == "sdk_v2":
            skips[split]["sdk_truncated"] = data["sdk_truncated"][split]
            skips[split]["sdk_length_mismatch"] = data["sdk_length_mismatch"][split]
    extra = {
        "source": "real",
        "raw_source": o.source,
        "raw_sha256": files,
        "class_order": list(Urfunny.spec.classes),
        "split_provenance": ("UR-FUNNY data_folds (speaker-independent) train/valid(dev)/test -> train/val/test; "
                             "no re-splitting"),
        "preprocessing": {"recipe": "MMPareto Humor_Dataset aligned=True", "drop": "all-zero text",
                          "audio_neg_inf_to": 0.0, "align": "from first non-zero text step",
                          "label": "1 if label >= 1 else 0", "seq_len": o.seq_len,
                          "pad": "zeros at the end", "truncate": "keep first seq_len aligned steps",
                          "sdk_v2": "punchline words only; text = word_embedding_list[index]; first seq_len words"
                          if o.source == "sdk_v2" else None,
                          "nonfinite_to_zero": o.nonfinite_to_zero},
        "skipped": skips,
        "options": {k: v for k, v in asdict(o).items() if k != "timeout"},
    }
    return write_prepared(Path(out_dir), Urfunny.spec, splits, extra)
