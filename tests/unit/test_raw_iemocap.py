"""IEMOCAP real-data fetch/prepare on fixture pickles in MulT's iemocap_data.pkl layout (licence-gated: no download)."""
from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest

from g2d.data.iemocap import Iemocap
from g2d.data.prepared import Prepared
from g2d.data.raw import fetching as F
from g2d.data.raw import iemocap
from tests.fixtures_raw_affect import tree_bytes, write_iemocap_pickle

SIZES = (12, 5, 6)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def raw(tmp_path):
    d = tmp_path / "raw"
    p = write_iemocap_pickle(d / "iemocap_data.pkl", SIZES)
    return d, {"sha256": _sha(p)}


def test_class_order_matches_mult_label_rows():
    assert Iemocap.spec.classes == iemocap.EMOTIONS == ("neutral", "happy", "sad", "angry")


def test_prepare_shapes_classes_and_skips(raw, tmp_path):
    d, opts = raw
    src = pickle.loads((d / "iemocap_data.pkl").read_bytes())
    P = Prepared(iemocap.prepare(d, tmp_path / "out", opts))
    assert P.meta["source"] == "real" and P.meta["classes"] == ["neutral", "happy", "sad", "angry"]
    # rows 0 (no emotion) and 1 (two emotions) of every split have no single class
    assert P.meta["splits"] == {"train": SIZES[0] - 2, "val": SIZES[1] - 2, "test": SIZES[2] - 2}
    assert P.meta["skipped"]["val"] == {"ambiguous_labels": 2}
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        s = P.split(split)
        for m, dim in (("audio", 74), ("visual", 35), ("text", 300)):
            assert s[m].shape == (len(s["label"]), 20, dim) and s[m].dtype == np.float32
        np.testing.assert_array_equal(s["index"], np.arange(2, len(src[key]["labels"])))
        for j, i in enumerate(s["index"]):
            pairs = src[key]["labels"][i]  # (4, 2) (not, is)
            assert [k for k in range(4) if pairs[k, 1] == 1 and pairs[k, 0] == 0] == [s["label"][j]]
            np.testing.assert_array_equal(s["visual"][j], src[key]["vision"][i])
            np.testing.assert_array_equal(s["text"][j], src[key]["text"][i])
            a = src[key]["audio"][i].copy()
            a[np.isneginf(a)] = 0
            np.testing.assert_array_equal(s["audio"][j], a)
        assert s["label"].dtype == np.int64


def test_index_labels_and_seq_len(tmp_path):
    d = tmp_path / "raw"
    p = write_iemocap_pickle(d / "iemocap_data.pkl", SIZES)
    data = pickle.loads(p.read_bytes())
    for k in data:
        data[k]["labels"] = np.arange(len(data[k]["labels"])) % 4  # class indices
    p.write_bytes(pickle.dumps(data))
    P = Prepared(iemocap.prepare(d, tmp_path / "out", {"sha256": _sha(p), "seq_len": 25}))
    s = P.split("train")
    np.testing.assert_array_equal(s["label"], np.arange(SIZES[0]) % 4)
    assert s["text"].shape == (SIZES[0], 25, 300)
    np.testing.assert_array_equal(s["text"][:, :20], data["train"]["text"])
    assert not s["text"][:, 20:].any()  # zero-padded at the end


def test_ambiguous_error_mode(raw, tmp_path):
    d, opts = raw
    with pytest.raises(F.CorruptRawFile, match=r"2 sample\(s\) \(first: row 0\).*ambiguous_labels: skip"):
        iemocap.prepare(d, tmp_path / "out", {**opts, "ambiguous_labels": "error"})
    with pytest.raises(F.RawDataError, match=r"datasets\.iemocap\.real\.ambiguous_labels: must be"):
        iemocap.prepare(d, tmp_path / "out", {**opts, "ambiguous_labels": "maybe"})


def test_fetch_missing_prints_the_manual_steps(tmp_path):
    d = tmp_path / "raw"
    with pytest.raises(F.ManualStepRequired) as e:
        iemocap.fetch(d, {})
    msg = str(e.value)
    for needle in (iemocap.RELEASE_FORM, iemocap.RELEASE_PAGE, str(d / "iemocap_data.pkl"),
                   "datasets.iemocap.real.path", "datasets.iemocap.real.sha256", "g2d prepare iemocap", "  3. "):
        assert needle in msg
    with pytest.raises(F.ManualStepRequired, match="licence-gated"):
        iemocap.fetch(d, {"path": str(tmp_path / "nowhere")})
    assert not d.exists() or not any(d.iterdir())  # nothing downloaded or created


def test_fetch_user_path_pinned_then_prepare(tmp_path):
    elsewhere = tmp_path / "licensed"
    p = write_iemocap_pickle(elsewhere / "iemocap_data.pkl", SIZES)
    d = tmp_path / "raw"
    opts = {"path": str(elsewhere), "sha256": _sha(p)}
    assert iemocap.fetch(d, opts) == d
    assert F.read_manifest(d / F.MANIFEST) == {"iemocap_data.pkl": _sha(p)}
    P = Prepared(iemocap.prepare(d, tmp_path / "out", {"path": str(p)}))  # recorded checksum is enough now
    assert P.meta["raw_sha256"] == _sha(p)


def test_unverified_mismatch_truncated(raw, tmp_path):
    d, _ = raw
    with pytest.raises(F.RawDataError, match=r"refusing to unpickle.*iemocap\.real\.sha256"):
        iemocap.fetch(d, {})
    with pytest.raises(F.ChecksumMismatch, match=r"iemocap_data\.pkl: sha256 [0-9a-f]{64} != expected f{64}"):
        iemocap.fetch(d, {"sha256": "f" * 64})
    blob = (d / "iemocap_data.pkl").read_bytes()
    (d / "iemocap_data.pkl").write_bytes(blob[:1000])
    with pytest.raises(F.CorruptRawFile, match=r"iemocap_data\.pkl: cannot be unpickled"):
        iemocap.prepare(d, tmp_path / "out", {"sha256": _sha(d / "iemocap_data.pkl")})
    with pytest.warns(UserWarning, match="without a verified checksum"), pytest.raises(F.CorruptRawFile):
        iemocap.prepare(d, tmp_path / "out", {"allow_unverified_pickle": True})


def test_wrong_feature_dims_named(tmp_path):
    d = tmp_path / "raw"
    p = write_iemocap_pickle(d / "iemocap_data.pkl", SIZES)
    data = pickle.loads(p.read_bytes())
    data["test"]["vision"] = data["test"]["vision"][:, :, :20]
    p.write_bytes(pickle.dumps(data))
    with pytest.raises(F.CorruptRawFile, match=r"\['test'\]/vision: shape \(6, 20, 20\), expected \(N, T, 35\)"):
        iemocap.prepare(d, tmp_path / "out", {"sha256": _sha(p)})


def test_prepare_is_deterministic_and_atomic(raw, tmp_path, monkeypatch):
    d, opts = raw
    ref = iemocap.prepare(d, tmp_path / "ref", opts)
    out = iemocap.prepare(d, tmp_path / "out", opts)
    before = tree_bytes(out)
    import g2d.data.prepared as pm

    def boom(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pm.np, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        iemocap.prepare(d, out, opts)
    monkeypatch.undo()
    assert tree_bytes(out) == before == tree_bytes(ref)  # the killed re-prepare left the old output intact
