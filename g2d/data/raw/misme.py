"""MIS-ME real data: GitHub release v1 -> soil image (3,224,224) uint8 + 8 weather floats, target vwc float32.

Release assets (OSU-Complex-Systems/MIS-ME, tag v1) have no published names or checksums: `fetch` lists them
through the GitHub releases API, downloads each (resumable; checked against GitHub's `digest` when the API
gives one, else recorded in `downloads/MANIFEST.sha256` on first download, once the file passes its format
check (zip/xlsx open with valid CRCs, no HTML page), and verified afterwards) and extracts archives
atomically. Expected content (MIS-ME `config.py`): label sheets `combined_only_{train,val,test}_set.xlsx`
(+ `OK00{1,2,3}_only_test_set.xlsx`) with columns `image`, `vwc` and the 8 weather features, and an image
folder the `image` column is relative to.

Preprocessing (MIS-ME `data_processor.py` / `utils.py` VWC_Dataset): weather NaNs filled with the train
column means, then standardised with the train mean and population std (sklearn StandardScaler; std 0 -> 1);
images `PIL.convert("RGB")` and resized to 224x224 bilinear (torchvision `Resize` on PIL images), stored
uint8 (normalise at load time with the MIS-ME dataset mean/std kept in meta). Splits are the release's.
prepare first re-checks what fetch verified (the assets against `downloads/MANIFEST.sha256`, the extracted
files against their `.extracted` marker): a file changed since is refused, naming it and the fix (`g2d fetch
misme` / `dvc repro fetch@misme`). Decoded images are cached per file in `cache_dir` (default
`data/cache/misme/`, next to `paths.raw`: never inside `<raw_dir>`, the fetch stage's output), each entry valid
only for the image's size + sha256, the recipe (image_size, resampling) and the code version (this file,
Pillow's version), so a killed prepare resumes and a changed image is decoded again.
"""
from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from g2d.data.raw import fetching as F

NAME = "misme"
PREFIX = f"datasets.{NAME}.real"
RELEASE_API = "https://api.github.com/repos/OSU-Complex-Systems/MIS-ME/releases/tags/v1"
RELEASE_PAGE = "https://github.com/OSU-Complex-Systems/MIS-ME/releases/tag/v1"
SHEETS = {"train": "combined_only_train_set.xlsx", "val": "combined_only_val_set.xlsx",
          "test": "combined_only_test_set.xlsx"}
STATIONS = ("OK001", "OK002", "OK003")
ARCHIVE = re.compile(r"\.(zip|tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$", re.IGNORECASE)
IMG_MEAN, IMG_STD = [0.507, 0.468, 0.307], [0.194, 0.201, 0.170]  # MIS-ME config.py (dataset statistics)


@dataclass
class Options:
    release_api: str = RELEASE_API
    assets: list = field(default_factory=list)  # [{url, filename, sha256?}] instead of asking the API
    labels_dir: str = ""  # folder of the xlsx sheets, relative to raw_dir ("" = search)
    image_dir: str = ""  # folder the `image` column is relative to ("" = locate the first image)
    image_size: int = 224
    on_bad_image: str = "error"  # error | skip (missing/corrupt images: skipped and counted in meta)
    jobs: int = 0  # image-decoding threads; 0 = min(8, cpu count)
    keep_cache: bool = False  # keep the decoded images in cache_dir after a successful prepare
    cache_dir: str = ""  # default data/cache/misme (<paths.raw>/../cache/misme), outside the fetch output
    timeout: float = 30.0

    def __post_init__(self):
        if self.on_bad_image not in ("error", "skip"):
            raise F.RawDataError(f"{PREFIX}.on_bad_image: must be 'error' or 'skip', got {self.on_bad_image!r}")
        if self.image_size < 1:
            raise F.RawDataError(f"{PREFIX}.image_size: must be >= 1, got {self.image_size}")
        if not isinstance(self.assets, list):
            raise F.RawDataError(f"{PREFIX}.assets: must be a list of {{url, filename, sha256?}}, got {self.assets!r}")
        for a in self.assets:
            if not isinstance(a, dict) or "url" not in a or "filename" not in a:
                raise F.RawDataError(f"{PREFIX}.assets: entries need 'url' and 'filename' (optional 'sha256'), "
                                     f"got {a!r}")


# ------------------------------------------------------------------------------------------------ fetch
def _how_to(raw_dir: Path) -> str:
    return str(F.manual_step(
        "MIS-ME: the release assets could not be downloaded automatically.",
        [f"Open {RELEASE_PAGE} and download every asset (the label .xlsx sheets and the image archive).",
         f"Put them, unchanged, into {raw_dir / 'downloads'}/ (archives are extracted by fetch).",
         f"Or list direct URLs in params.yaml: `{PREFIX}.assets: [{{url: ..., filename: ...}}]`."],
        f"g2d fetch {NAME} && g2d prepare {NAME}"))


def _release_assets(raw_dir: Path, o: Options) -> list[F.Remote]:
    """Asset list from options, else the releases API (saved as release.json), else the saved copy."""
    if o.assets:
        return [F.Remote(a["url"], a["filename"], (a.get("sha256") or "").lower() or None) for a in o.assets]
    saved = raw_dir / "release.json"
    try:
        req = urllib.request.Request(o.release_api, headers={"User-Agent": "g2d-bench",
                                                             "Accept": "application/vnd.github+json"})
        with urllib.request.urlopen(req, timeout=o.timeout) as r:
            body = r.read()
        release = json.loads(body)
        F.atomic_write_bytes(saved, body)
    except (urllib.error.URLError, OSError, ValueError) as e:
        if not saved.is_file():
            local = sorted(p.name for p in (raw_dir / "downloads").glob("*") if p.is_file()
                           and not p.name.endswith(".part") and p.name != F.MANIFEST) \
                if (raw_dir / "downloads").is_dir() else []
            if local:  # placed by hand: verify/record them, nothing to download
                return [F.Remote("", n) for n in local]
            raise F.ManualStepRequired(f"{o.release_api}: cannot list the release assets ({e}).\n"
                                       + _how_to(raw_dir)) from None
        F._log(f"{o.release_api} unreachable ({e}); using the asset list saved in {saved}")
        release = json.loads(saved.read_text())
    assets = release.get("assets") if isinstance(release, dict) else None
    if not assets:
        raise F.ManualStepRequired(f"{o.release_api}: the release lists no assets.\n" + _how_to(raw_dir))
    out = []
    for a in assets:
        digest = a.get("digest") or ""
        sha = digest.split(":", 1)[1].lower() if digest.startswith("sha256:") else None
        out.append(F.Remote(a["browser_download_url"], a["name"], sha, a.get("size")))
    return out


def fetch(raw_dir: Path, options: dict) -> Path:
    """Download (or verify) every release asset, extract archives, check the label sheets are there."""
    o = F.parse_options(Options, options, PREFIX)
    raw_dir = Path(raw_dir)
    dl = raw_dir / "downloads"
    try:
        remotes = _release_assets(raw_dir, o)
    except F.ManualStepRequired as manual:
        try:  # the user unpacked the release into raw_dir by hand: check it is usable and stop there
            d = _sheets(raw_dir, o)
        except F.RawDataError:
            raise manual from None
        F._log(f"release not reachable; using the label sheets already in {d}")
        return raw_dir
    manual = [r for r in remotes if not r.url]
    if manual:
        F.verify_or_record(dl, [r.filename for r in manual], rerun=f"g2d fetch {NAME}")
    else:
        F.fetch_remotes(remotes, dl, timeout=o.timeout, how_to=_how_to(raw_dir), rerun=f"g2d fetch {NAME}")
    for r in remotes:
        if ARCHIVE.search(r.filename):
            F.extract(dl / r.filename, raw_dir / "extracted" / ARCHIVE.sub("", r.filename))
    _sheets(raw_dir, o)  # fails here, naming what is missing, rather than later in prepare
    return raw_dir


# ------------------------------------------------------------------------------------------------ prepare
def _sheets(raw_dir: Path, o: Options) -> Path:
    """The folder holding the three combined_only_* sheets."""
    if o.labels_dir:
        d = raw_dir / o.labels_dir
        if not (d / SHEETS["train"]).is_file():
            raise F.MissingRawFile(f"{d / SHEETS['train']}: missing (from {PREFIX}.labels_dir). "
                                   f"Fix the option or run `g2d fetch {NAME}`.")
    else:
        found = sorted({p.parent for p in raw_dir.rglob(SHEETS["train"]) if ".cache" not in p.parts})
        if not found:
            raise F.MissingRawFile(f"{raw_dir}: no {SHEETS['train']} anywhere below it. Run `g2d fetch {NAME}` "
                                   f"(or place the release assets as it explains).")
        if len(found) > 1:
            raise F.RawDataError(f"{raw_dir}: several folders hold {SHEETS['train']}: {[str(p) for p in found]}; "
                                 f"choose one with {PREFIX}.labels_dir")
        d = found[0]
    missing = [s for s in SHEETS.values() if not (d / s).is_file()]
    if missing:
        raise F.MissingRawFile(f"{d / missing[0]}: missing next to {SHEETS['train']}; run `g2d fetch {NAME}`.")
    return d


def read_sheet(path: Path):
    """One label sheet as a DataFrame with `image`, `vwc` and the weather columns as numbers."""
    import pandas as pd

    from g2d.data.misme import WEATHER

    try:
        df = pd.read_excel(path, engine="openpyxl")
    except Exception as e:  # noqa: BLE001 zipfile.BadZipFile, KeyError, ValueError...: all mean "not a readable xlsx"
        raise F.CorruptRawFile(f"{path}: cannot be read as .xlsx ({type(e).__name__}: {e}); the file is "
                               f"truncated or corrupt: delete it and run `g2d fetch {NAME}` again.") from None
    missing = [c for c in ("image", "vwc", *WEATHER) if c not in df.columns]
    if missing:
        raise F.CorruptRawFile(f"{path}: missing column(s) {missing}; has {list(df.columns)}")
    for c in ("vwc", *WEATHER):
        try:
            df[c] = pd.to_numeric(df[c], errors="raise").astype(np.float64)
        except (ValueError, TypeError) as e:
            raise F.CorruptRawFile(f"{path}: column {c!r} is not numeric ({e})") from None
    bad = np.flatnonzero(df["vwc"].isna().to_numpy() | df["image"].isna().to_numpy())
    if len(bad):
        raise F.CorruptRawFile(f"{path}: {len(bad)} row(s) without image or vwc (first: sheet row {bad[0] + 2})")
    df["image"] = df["image"].astype(str)
    return df


def _image_root(raw_dir: Path, first: str, o: Options) -> Path:
    if o.image_dir:
        return raw_dir / o.image_dir
    rel = Path(first)
    for p in sorted(raw_dir.rglob(rel.name)):
        if ".cache" in p.parts:
            continue
        root = p.parents[len(rel.parts) - 1]
        if (root / rel).is_file():
            return root
    raise F.MissingRawFile(f"{raw_dir}: image {first!r} (first row of {SHEETS['train']}) is nowhere below it; "
                           f"run `g2d fetch {NAME}` or set {PREFIX}.image_dir")


def decode_image(path: Path, size: int) -> dict[str, np.ndarray]:
    """MIS-ME transform without the float normalisation: RGB, bilinear resize to size x size, (3,H,W) uint8."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise F.MissingRawFile(f"{path}: image missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise F.CorruptRawFile(f"{path}: cannot decode image ({type(e).__name__}: {e}); restore the file "
                               f"(`g2d fetch {NAME}` re-extracts) or set {PREFIX}.on_bad_image: skip") from None
    return {"image": np.ascontiguousarray(arr.transpose(2, 0, 1))}


def code_version() -> dict[str, str]:
    """The code the cached images depend on (part of the cache key): this file and Pillow's version."""
    return F.code_version(__file__, libraries=("pillow", "numpy"))


def reverify(raw_dir: Path, digests: F.DigestStore, jobs: int = 1) -> None:
    """What fetch verified, checked again before prepare trusts it: the release assets in downloads/ against
    downloads/MANIFEST.sha256, each extracted archive's files against its `.extracted` marker."""
    dl = raw_dir / "downloads"
    if (dl / F.MANIFEST).is_file():
        F.verify_fetched(dl / F.MANIFEST, dl, NAME, digests=digests, jobs=jobs)
    ext = raw_dir / "extracted"
    for d in sorted(p for p in ext.iterdir() if p.is_dir()) if ext.is_dir() else []:
        archive = next((a for a in sorted(dl.glob("*")) if ARCHIVE.search(a.name) and ARCHIVE.sub("", a.name) == d.name),
                       None) if dl.is_dir() else None
        F.verify_extracted(d, NAME, archive=archive, digests=digests, jobs=jobs)


def _key(rel: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", rel) + "-" + F.params_key({"rel": rel})[:6]


def prepare(raw_dir: Path, out_dir: Path, options: dict) -> Path:
    import shutil

    from g2d.data.misme import WEATHER, Misme
    from g2d.data.prepared import write_prepared

    o = F.parse_options(Options, options, PREFIX)
    raw_dir = Path(raw_dir)
    cache_dir = F.prepare_cache_dir(raw_dir, o.cache_dir, out_dir=out_dir, option=f"{PREFIX}.cache_dir")
    digests = F.DigestStore(cache_dir / "digests.json")
    jobs = o.jobs or F.default_jobs()
    if (raw_dir / ".cache").is_dir():
        F._log(f"misme: {raw_dir / '.cache'} is a prepare cache left by an older g2d inside the fetch output; it is "
               f"no longer used (now {cache_dir}) and can be deleted")
    reverify(raw_dir, digests, jobs)
    sheet_dir = _sheets(raw_dir, o)
    dfs = {s: read_sheet(sheet_dir / f) for s, f in SHEETS.items()}
    root = _image_root(raw_dir, dfs["train"]["image"].iloc[0], o)
    skipped = {s: {"missing_image": 0, "corrupt_image": 0} for s in SHEETS}
    keep_rows = {}
    for s, df in dfs.items():
        present = np.array([(root / r).is_file() for r in df["image"]], bool)
        if not present.all():
            first = int(np.flatnonzero(~present)[0])
            msg = (f"{sheet_dir / SHEETS[s]}: {int((~present).sum())} row(s) name images absent from {root} "
                   f"(first: sheet row {first + 2}, image {df['image'].iloc[first]!r})")
            if o.on_bad_image == "error":
                raise F.MissingRawFile(msg + f". Restore them (`g2d fetch {NAME}`) or set {PREFIX}.on_bad_image: skip")
            F._log("skipping: " + msg)
        skipped[s]["missing_image"] = int((~present).sum())
        keep_rows[s] = np.flatnonzero(present)
    recipe = {"size": o.image_size, "resample": "PIL.BILINEAR", "mode": "RGB", "v": 1}
    cache = F.ClipCache(cache_dir / "images", params=recipe, code=code_version(), digests=digests)
    rels = sorted({dfs[s]["image"].iloc[i] for s in dfs for i in keep_rows[s]})
    ok_by_key = F.map_clips(lambda rel: decode_image(root / rel, o.image_size), [(_key(r), r) for r in rels],
                            cache, sources=lambda rel: [root / rel], jobs=jobs, desc="misme images",
                            skip_errors=(F.CorruptRawFile,) if o.on_bad_image == "skip" else ())
    for s, df in dfs.items():
        ok = np.array([ok_by_key[_key(df["image"].iloc[i])] for i in keep_rows[s]], bool)
        skipped[s]["corrupt_image"] = int((~ok).sum())
        if not ok.all():
            F._log(f"misme/{s}: skipped {int((~ok).sum())} undecodable image(s)")
        keep_rows[s] = keep_rows[s][ok]
    # weather: fill NaN with train means, standardise with train mean / population std (MIS-ME data_processor.py)
    train_w = dfs["train"][list(WEATHER)].to_numpy()[keep_rows["train"]]
    mean = np.nanmean(train_w, axis=0) if len(train_w) else np.full(len(WEATHER), np.nan)
    if not np.isfinite(mean).all():
        bad = [w for w, m in zip(WEATHER, mean) if not np.isfinite(m)]
        raise F.CorruptRawFile(f"{sheet_dir / SHEETS['train']}: no usable train values in column(s) {bad}")
    filled_train = np.where(np.isnan(train_w), mean, train_w)
    std = filled_train.std(axis=0)
    scale = np.where(std == 0, 1.0, std)
    splits, fills = {}, {}
    work = cache_dir / f"stack-{os.getpid()}"  # memory-mapped stacking area, removed after the write
    shutil.rmtree(work, ignore_errors=True)
    for s, df in dfs.items():
        rows = keep_rows[s]
        w = df[list(WEATHER)].to_numpy()[rows]
        fills[s] = {c: int(n) for c, n in zip(WEATHER, np.isnan(w).sum(axis=0))}
        w = (np.where(np.isnan(w), mean, w) - mean) / scale
        keys = [_key(df["image"].iloc[i]) for i in rows]
        like = next((k for k, ok in ok_by_key.items() if ok), None)
        imgs = F.stack_cached(cache, keys, ["image"], work / s, like=like)["image"]  # memory-mapped
        splits[s] = {"image": imgs, "weather": w.astype(np.float32),
                     "label": df["vwc"].to_numpy()[rows].astype(np.float32), "index": rows.astype(np.int64)}
    extra = {"source": "real", "target": "vwc (volumetric water content), regression",
             "split_provenance": "release sheets combined_only_{train,val,test}_set.xlsx -> train/val/test "
                                 "(index = sheet row, 0-based, header excluded)",
             "sheets_sha256": {s: F.sha256_file(sheet_dir / f) for s, f in SHEETS.items()},
             "weather_columns": list(WEATHER), "weather_train_mean": mean.tolist(),
             "weather_train_std": std.tolist(), "weather_nan_filled": fills, "skipped": skipped,
             "preprocessing": {"weather": "NaN -> train mean; (x - train_mean) / train_std (population, std 0 -> 1)",
                               "image": recipe, "image_norm_mean": IMG_MEAN, "image_norm_std": IMG_STD},
             "options": {k: v for k, v in asdict(o).items() if k not in ("timeout", "jobs", "keep_cache", "cache_dir")}}
    _stations(sheet_dir, dfs["test"], keep_rows["test"], splits["test"], extra)
    try:
        out = write_prepared(Path(out_dir), Misme.spec, splits, extra)
    finally:
        del splits
        shutil.rmtree(work, ignore_errors=True)
    if not o.keep_cache:
        shutil.rmtree(cache.root, ignore_errors=True)
    return out


def _stations(sheet_dir: Path, test_df, rows: np.ndarray, test: dict, extra: dict) -> None:
    """Optional station sheets OK00x_only_test_set.xlsx -> test/station.npy (index into STATIONS, -1 none)."""
    present = [s for s in STATIONS if (sheet_dir / f"{s}_only_test_set.xlsx").is_file()]
    if not present:
        return
    station = np.full(len(rows), -1, np.int64)
    names = test_df["image"].to_numpy()[rows]
    for k, s in enumerate(STATIONS):
        if s in present:
            imgs = set(read_sheet(sheet_dir / f"{s}_only_test_set.xlsx")["image"])
            station[np.array([n in imgs for n in names], bool)] = k
    test["station"] = station
    extra["stations"] = {"names": list(STATIONS), "test_counts": {s: int((station == k).sum())
                                                                  for k, s in enumerate(STATIONS) if s in present}}
