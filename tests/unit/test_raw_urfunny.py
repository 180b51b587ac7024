"""UR-Funny real-data fetch/prepare on fixture pickles in MultiBench's humor.pkl layout (no network)."""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile

import numpy as np
import pytest

from g2d.data import prepared as prepared_mod
from g2d.data.prepared import Prepared
from g2d.data.raw import fetching as F
from g2d.data.raw import urfunny
from g2d.data.urfunny import Urfunny
from tests.fixtures_raw_affect import serve, tree_bytes, write_urfunny_pickle, write_urfunny_sdk_v2

SIZES = (10, 4, 5)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def raw(tmp_path):
    d = tmp_path / "raw"
    p = write_urfunny_pickle(d / "humor.pkl", SIZES)
    return d, {"sha256": _sha(p)}


def _expected(raw_split, i, seq_len):
    """Independent per-sample recipe (MMPareto Humor_Dataset): first non-zero text row, slice, pad at end."""
    text = raw_split["text"][i]
    rows = [t for t in range(len(text)) if np.any(text[t] != 0)]
    start = rows[0]
    out = {}
    for m, key in (("text", "text"), ("audio", "audio"), ("visual", "vision")):
        x = np.array(raw_split[key][i][start:], dtype=np.float32)
        if m == "audio":
            x = np.where(np.isneginf(x), 0.0, x).astype(np.float32)
        x = x[:seq_len]
        out[m] = np.concatenate([x, np.zeros((seq_len - len(x), x.shape[1]), np.float32)])
    return out, int(raw_split["labels"][i][0] >= 1)


def test_prepare_shapes_alignment_labels(raw, tmp_path):
    d, opts = raw
    src = pickle.loads((d / "humor.pkl").read_bytes())
    P = Prepared(urfunny.prepare(d, tmp_path / "out", opts))
    assert P.meta["source"] == "real"
    assert P.meta["classes"] == ["not_humor", "humor"] == P.meta["class_order"]
    assert P.meta["splits"] == {"train": SIZES[0] - 1, "val": SIZES[1] - 1, "test": SIZES[2] - 1}
    assert P.meta["skipped"]["train"]["dropped_all_zero_text"] == 1
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        s = P.split(split)
        for m in Urfunny.spec.modalities:
            assert s[m.name].shape[1:] == m.shape == (50, {"text": 300, "audio": 81, "visual": 371}[m.name])
            assert s[m.name].dtype == np.float32
        assert s["label"].dtype == np.int64 and set(np.unique(s["label"])) <= {0, 1}
        assert 0 not in s["index"]  # row 0 has all-zero text
        for j, i in enumerate(s["index"]):
            exp, lab = _expected(src[key], i, 50)
            for m in exp:
                np.testing.assert_array_equal(s[m][j], exp[m])
            assert s["label"][j] == lab
    # raw labels 2.0 map to 1, 0.0 to 0
    raw_lab = src["train"]["labels"][P.split("train")["index"], 0]
    np.testing.assert_array_equal(P.split("train")["label"], (raw_lab >= 1).astype(np.int64))
    assert np.isfinite(P.split("train")["audio"]).all()


def test_truncation_to_seq_len(raw, tmp_path):
    d, opts = raw
    src = pickle.loads((d / "humor.pkl").read_bytes())
    P = Prepared(urfunny.prepare(d, tmp_path / "out", {**opts, "seq_len": 12}))
    s = P.split("train")
    assert s["text"].shape == (SIZES[0] - 1, 12, 300)
    lengths = [int(np.any(src["train"]["text"][i] != 0, axis=1).sum()) for i in s["index"]]
    assert P.meta["skipped"]["train"]["truncated"] == sum(L > 12 for L in lengths) > 0
    for j, i in enumerate(s["index"]):
        exp, _ = _expected(src["train"], i, 12)
        np.testing.assert_array_equal(s["visual"][j], exp["visual"])


def test_unverified_pickle_refused_then_allowed_with_warning(raw, tmp_path):
    d, _ = raw
    with pytest.raises(F.RawDataError, match=r"refusing to unpickle.*datasets\.urfunny\.real\.sha256: [0-9a-f]{64}"):
        urfunny.prepare(d, tmp_path / "out", {})
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="without a verified checksum"):
        urfunny.prepare(d, tmp_path / "out", {"allow_unverified_pickle": True})
    assert (tmp_path / "out" / "meta.json").is_file()


def test_checksum_mismatch_pinned_and_recorded(raw, tmp_path):
    d, opts = raw
    with pytest.raises(F.ChecksumMismatch, match=r"humor\.pkl: sha256 .* != expected 0{64}.*delete it"):
        urfunny.prepare(d, tmp_path / "out", {"sha256": "0" * 64})
    F.write_manifest(d / F.MANIFEST, {"humor.pkl": opts["sha256"]})
    urfunny.prepare(d, tmp_path / "out", {})  # recorded checksum suffices
    data = bytearray((d / "humor.pkl").read_bytes())
    data[-10] ^= 0xFF
    (d / "humor.pkl").write_bytes(bytes(data))
    with pytest.raises(F.ChecksumMismatch, match="MANIFEST.sha256"):
        urfunny.prepare(d, tmp_path / "out2", {})


def test_truncated_and_missing_file(raw, tmp_path):
    d, _ = raw
    blob = (d / "humor.pkl").read_bytes()
    (d / "humor.pkl").write_bytes(blob[: len(blob) // 2])
    with pytest.warns(UserWarning), pytest.raises(F.CorruptRawFile, match=r"humor\.pkl: cannot be unpickled.*truncated"):
        urfunny.prepare(d, tmp_path / "out", {"allow_unverified_pickle": True})
    (d / "humor.pkl").unlink()
    with pytest.raises(F.MissingRawFile, match=r"humor\.pkl: missing.*g2d fetch urfunny"):
        urfunny.prepare(d, tmp_path / "out", {"allow_unverified_pickle": True})
    with pytest.raises(F.ManualStepRequired) as e:
        urfunny.fetch(d, {})
    msg = str(e.value)
    assert urfunny.DRIVE_FOLDER in msg and str(d / "humor.pkl") in msg and "g2d prepare urfunny" in msg
    assert "  1. " in msg and "sha256" in msg


def test_code_in_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "raw"
    d.mkdir()
    (d / "humor.pkl").write_bytes(pickle.dumps({"train": Evil()}))
    with pytest.warns(UserWarning), pytest.raises(F.CorruptRawFile, match="refusing global"):
        urfunny.prepare(d, tmp_path / "out", {"allow_unverified_pickle": True})
    assert not marker.exists()


def test_hkt_layout_is_named(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    hkt = {k: [(("a joke", np.zeros((2, 91)), np.zeros((2, 81)), np.zeros((2, 4))), (), 1, 1)]
           for k in ("train", "dev", "test")}
    p = d / "humor.pkl"
    p.write_bytes(pickle.dumps(hkt))
    with pytest.raises(F.CorruptRawFile, match="HKT"):
        urfunny.prepare(d, tmp_path / "out", {"sha256": _sha(p)})


def test_bad_option_names_key(raw, tmp_path):
    d, _ = raw
    with pytest.raises(F.RawDataError, match=r"datasets\.urfunny\.real\.seqlen"):
        urfunny.prepare(d, tmp_path / "out", {"seqlen": 3})
    with pytest.raises(F.RawDataError, match=r"datasets\.urfunny\.real\.sha256: must be 64 hex"):
        urfunny.fetch(d, {"sha256": "abc"})


def test_fetch_over_local_http_records_then_verifies(tmp_path):
    site = tmp_path / "site"
    write_urfunny_pickle(site / "humor.pkl", SIZES)
    d = tmp_path / "raw"
    with serve(site) as base:
        opts = {"url": f"{base}/humor.pkl"}
        assert urfunny.fetch(d, opts) == d  # first download: checksum recorded (no published one)
    rec = F.read_manifest(d / F.MANIFEST)
    assert rec == {"humor.pkl": _sha(site / "humor.pkl")}
    assert (d / "humor.pkl").read_bytes() == (site / "humor.pkl").read_bytes()
    # offline second run: verifies against the recorded checksum, nothing downloaded
    urfunny.fetch(d, opts)
    P = Prepared(urfunny.prepare(d, tmp_path / "out", opts))
    assert P.meta["raw_sha256"] == rec and P.meta["raw_source"] == "multibench"
    (d / "humor.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(F.ChecksumMismatch, match=r"humor\.pkl"):
        urfunny.fetch(d, opts)


def test_killed_prepare_resumes_byte_identical(raw, tmp_path, monkeypatch):
    d, opts = raw
    ref = urfunny.prepare(d, tmp_path / "ref", opts)
    out = tmp_path / "out"
    real_save, calls = np.save, {"n": 0}

    def dying_save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("killed")
        return real_save(*a, **k)

    monkeypatch.setattr(prepared_mod.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        urfunny.prepare(d, out, opts)
    assert not out.exists()  # nothing half-written is visible
    monkeypatch.setattr(prepared_mod.np, "save", real_save)
    urfunny.prepare(d, out, opts)
    assert tree_bytes(out) == tree_bytes(ref)


def test_sdk_v2_fetch_over_local_http_and_prepare(tmp_path):
    """ROC-HCI v2 feature zip (Dropbox in real life) -> extracted pickles recorded -> same recipe as humor.pkl."""
    src = write_urfunny_sdk_v2(tmp_path / "sdk" / "urfunny_v2", sizes=(6, 3, 4))
    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "v2.zip", "w") as z:
        z.writestr(zipfile.ZipInfo("/"), b"")  # Dropbox folder zips carry a bare "/" entry (libarchive#982)
        for p in sorted(src.iterdir()):
            z.write(p, f"urfunny_v2/{p.name}")
    d = tmp_path / "raw"
    with serve(site) as base:
        opts = {"source": "sdk_v2", "sdk_url": f"{base}/v2.zip"}
        urfunny.fetch(d, opts)
    rec = F.read_manifest(d / F.MANIFEST)
    assert sorted(rec) == sorted(f"sdk_v2/urfunny_v2/{f}" for f in urfunny.SDK_FILES)
    assert "urfunny_v2_features.zip" in F.read_manifest(d / "downloads" / F.MANIFEST)
    P = Prepared(urfunny.prepare(d, tmp_path / "out", opts))
    assert P.meta["raw_source"] == "sdk_v2" and P.meta["splits"] == {"train": 6, "val": 3, "test": 4}
    assert P.meta["skipped"]["train"]["sdk_truncated"] == 1  # the 60-word punchline
    sdk = {f: pickle.loads((src / f).read_bytes()) for f in urfunny.SDK_FILES}
    folds, lang, cov, face, lab = (sdk[f] for f in urfunny.SDK_FILES[:5])
    emb = np.asarray(sdk["word_embedding_list.pkl"], np.float32)
    s = P.split("train")
    for j, h in enumerate(folds["train"]):
        idx = lang[h]["punchline_embedding_indexes"][:50]
        t = emb[idx]
        start = next(k for k in range(len(t)) if np.any(t[k] != 0))  # leading OOV (zero) words are cut
        exp_t = np.zeros((50, 300), np.float32)
        exp_t[: len(t) - start] = t[start:]
        np.testing.assert_array_equal(s["text"][j], exp_t)
        a = np.asarray(cov[h]["punchline_features"], np.float32)[:50][start:]
        a[np.isneginf(a)] = 0
        np.testing.assert_array_equal(s["audio"][j, : len(a)], a)
        assert not s["audio"][j, len(a):].any()
        v = np.asarray(face[h]["punchline_features"], np.float32)[:50][start:]
        np.testing.assert_array_equal(s["visual"][j, : len(v)], v)
        assert s["label"][j] == lab[h]
    # a tampered extracted pickle is caught before it is unpickled
    f = d / "sdk_v2" / "urfunny_v2" / "humor_label_sdk.pkl"
    f.write_bytes(f.read_bytes() + b"\0")
    with pytest.raises(F.ChecksumMismatch, match=r"humor_label_sdk\.pkl"):
        urfunny.prepare(d, tmp_path / "out2", opts)


def test_sdk_v2_html_instead_of_zip(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "v2.zip").write_text("<html>Dropbox sign-in</html>")
    d = tmp_path / "raw"
    with serve(site) as base:
        opts = {"source": "sdk_v2", "sdk_url": f"{base}/v2.zip"}
        with pytest.raises(F.CorruptRawFile, match=r"urfunny_v2_features\.zip: not a zip.*HTML.*deleted"):
            urfunny.fetch(d, opts)
        assert not (d / "downloads" / urfunny.SDK_ZIP).exists()
        m = d / "downloads" / F.MANIFEST
        assert not m.exists() or F.read_manifest(m) == {}  # the HTML's checksum is never recorded
        src = write_urfunny_sdk_v2(tmp_path / "sdk", sizes=(2, 2, 2))  # the host recovers: retry works
        with zipfile.ZipFile(site / "v2.zip", "w") as z:
            for p in sorted(src.iterdir()):
                z.write(p, p.name)
        urfunny.fetch(d, opts)
    assert Prepared(urfunny.prepare(d, tmp_path / "ok", opts)).meta["splits"]["test"] == 2
    with pytest.raises(F.MissingRawFile, match=r"sdk_v2: no data_folds\.pkl"):
        urfunny.prepare(tmp_path / "empty", tmp_path / "out", {"source": "sdk_v2"})
