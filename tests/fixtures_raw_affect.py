"""Fixture writers in the exact raw formats of UR-Funny (MultiBench pickle), IEMOCAP (MulT pickle) and MIS-ME
(release xlsx sheets + JPEG/PNG images), plus a 127.0.0.1 HTTP server for offline fetch tests."""
from __future__ import annotations

import contextlib
import functools
import http.server
import pickle
import threading
from pathlib import Path

import numpy as np

WEATHER = ("air_temperature", "relative_humidity", "precipitation", "solar_flux_density", "wind_speed",
           "barometric_pressure", "tilt_north_south", "tilt_west_east")


def _front_padded(rng, n, t, d, lengths):
    """MultiBench layout: real steps at the end, zeros in front."""
    x = np.zeros((n, t, d), np.float32)
    for i, L in enumerate(lengths):
        if L:
            x[i, t - L:] = rng.normal(size=(L, d)).astype(np.float32) + 0.1
    return x


def urfunny_split(rng, n, t=50, n_empty=1):
    lengths = rng.integers(1, t + 1, size=n)
    lengths[:n_empty] = 0  # all-zero text -> dropped by prepare
    text = _front_padded(rng, n, t, 300, lengths)
    # audio/vision carry values before the text starts too (the alignment must cut them off)
    audio = rng.normal(size=(n, t, 81)).astype(np.float32)
    audio[:, ::7, 3] = -np.inf
    vision = rng.normal(size=(n, t, 371)).astype(np.float32)
    labels = rng.choice(np.array([0.0, 1.0, 2.0], np.float32), size=(n, 1))
    ids = np.array([f"ted{i}" for i in range(n)], dtype=object)
    return {"vision": vision, "audio": audio, "text": text, "labels": labels, "id": ids}


def write_urfunny_pickle(path: Path, sizes=(10, 4, 5), t=50, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    data = {k: urfunny_split(rng, n, t) for k, n in zip(("train", "valid", "test"), sizes)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def write_urfunny_sdk_v2(folder: Path, sizes=(6, 3, 4), seed=0) -> Path:
    """ROC-HCI UR-FUNNY v2 feature pickles (README layout): per-id dicts of python lists, word-index text."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = rng.normal(size=(40, 300)).astype(np.float32)
    vocab[0] = 0  # an out-of-GloVe word
    folds, lang, cov, face, lab = {}, {}, {}, {}, {}
    k = 0
    for fold, n in zip(("train", "dev", "test"), sizes):
        folds[fold] = []
        for i in range(n):
            h = 1000 + k
            length = 60 if k == 0 else int(rng.integers(3, 20))
            idx = [int(v) for v in rng.integers(1, 40, size=length)]
            if k == 1:
                idx[0] = 0  # leading OOV word: alignment starts one step later
            audio = rng.normal(size=(length, 81))
            audio[::4, 5] = -np.inf
            lang[h] = {"punchline_embedding_indexes": idx, "context_embedding_indexes": [[1, 2], [3]],
                       "punchline_sentence": "w " * length, "context_sentences": ["a b", "c"],
                       "punchline_intervals": [[j, j + 1] for j in range(length)], "context_intervals": []}
            cov[h] = {"punchline_features": audio.tolist(), "context_features": []}
            face[h] = {"punchline_features": rng.normal(size=(length, 371)).tolist(), "context_features": []}
            lab[h] = int(k % 2)
            folds[fold].append(h)
            k += 1
    for name, obj in (("data_folds", folds), ("language_sdk", lang), ("covarep_features_sdk", cov),
                      ("openface_features_sdk", face), ("humor_label_sdk", lab),
                      ("word_embedding_list", [list(map(float, v)) for v in vocab])):
        (folder / f"{name}.pkl").write_bytes(pickle.dumps(obj, protocol=2))
    return folder


def iemocap_split(rng, n, t=20, ambiguous=2):
    cls = rng.integers(0, 4, size=n)
    pos = np.zeros((n, 4), bool)
    pos[np.arange(n), cls] = True
    if ambiguous:
        pos[0] = False  # no emotion
        if ambiguous > 1:
            pos[1, [0, 2]] = True  # two emotions
    labels = np.stack([~pos, pos], axis=2).astype(np.float32)  # (N, 4, 2) (not, is)
    audio = rng.normal(size=(n, t, 74)).astype(np.float32)
    audio[:, 0, :2] = -np.inf
    return {"audio": audio, "vision": rng.normal(size=(n, t, 35)).astype(np.float32),
            "text": rng.normal(size=(n, t, 300)).astype(np.float32), "labels": labels,
            "id": np.array([[f"Ses01F_impro01_M{i:03d}", "0", "1"] for i in range(n)], dtype=object)}


def write_iemocap_pickle(path: Path, sizes=(12, 5, 6), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    data = {k: iemocap_split(rng, n) for k, n in zip(("train", "valid", "test"), sizes)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def write_misme_raw(root: Path, sizes=(10, 4, 5), seed=0, stations=True) -> dict:
    """`<root>/labels/*.xlsx` + `<root>/images/*.{jpg,png}` as the MIS-ME release lays them out."""
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    frames = {}
    k = 0
    for split, n in zip(("train", "val", "test"), sizes):
        rows = []
        for i in range(n):
            ext = "png" if k % 3 == 0 else "jpg"
            name = f"OK00{k % 3 + 1}_2021_{k:04d}.{ext}"
            h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            if k % 5 == 4:
                img = img.convert("L")  # a grayscale image: prepare converts to RGB
            img.save(root / "images" / name)
            row = {"image": name, "vwc": float(rng.uniform(0.05, 0.45)), "date": f"2021-01-{k % 28 + 1:02d}"}
            for j, c in enumerate(WEATHER):
                row[c] = float(rng.normal(10 * j, 1 + j))
            rows.append(row)
            k += 1
        df = pd.DataFrame(rows, columns=["image", "date", "vwc", *WEATHER])
        df.loc[1, "precipitation"] = np.nan  # missing weather -> train mean
        df.to_excel(root / "labels" / f"combined_only_{split}_set.xlsx", index=False)
        frames[split] = df
    if stations:
        test = frames["test"]
        for s in ("OK001", "OK002", "OK003"):
            test[test["image"].str.startswith(s)].to_excel(root / "labels" / f"{s}_only_test_set.xlsx", index=False)
    return frames


@contextlib.contextmanager
def serve(directory: Path):
    """A threaded http.server on 127.0.0.1 (random port) serving `directory`; yields the base URL."""
    handler = functools.partial(_Quiet, directory=str(directory))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        th.join()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def tree_bytes(root: Path) -> dict[str, bytes]:
    """All files under root (relative path -> bytes), for byte-identical comparisons."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}
