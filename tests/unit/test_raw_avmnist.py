"""AV-MNIST: manual-step message, verified download + extraction from a local server, prepare = /255 + channel."""
from __future__ import annotations

import numpy as np
import pytest

from g2d.data.prepared import Prepared
from g2d.data.raw import avmnist
from g2d.data.raw import fetching as F
from tests.fixtures_raw import raw_avmnist_tree, raw_http_server, raw_targz


@pytest.fixture
def archive(tmp_path):
    src = raw_avmnist_tree(tmp_path / "src" / "avmnist", n_train=50, n_test=20)
    return raw_targz(src, tmp_path / "srv" / "avmnist.tar.gz", "avmnist"), src


def test_no_archive_gives_manual_steps(tmp_path):
    with pytest.raises(F.ManualStepRequired) as e:
        avmnist.fetch(tmp_path / "raw", {})
    msg = str(e.value)
    assert avmnist.DRIVE_ID in msg and str(tmp_path / "raw" / "avmnist.tar.gz") in msg
    assert "Then run: g2d fetch avmnist" in msg and "CC BY-NC 3.0" in msg


def test_fetch_from_mirror_records_then_verifies_and_prepares(archive, tmp_path):
    arc, src = archive
    raw = tmp_path / "raw"
    with raw_http_server(arc.parent) as (url, h):
        root = avmnist.fetch(raw, {"url": f"{url}/avmnist.tar.gz"})
        assert len(h.log) == 1
        assert avmnist.fetch(raw, {"url": f"{url}/avmnist.tar.gz"}) == root  # nothing downloaded again
        assert len(h.log) == 1
    assert F.read_manifest(raw / F.MANIFEST) == {"avmnist.tar.gz": F.sha256_file(arc)}
    out = avmnist.prepare(raw, tmp_path / "prep", {"val_fraction": 0.2})
    p = Prepared(out)
    assert p.meta["splits"] == {"train": 40, "val": 10, "test": 20}
    assert p.meta["classes"] == [str(i) for i in range(10)] and p.meta["source"] == "real"
    assert "CC BY-SA 3.0" in p.meta["licences"]["MNIST"]
    lab_tr = np.load(src / "train_labels.npy")
    img_tr = np.load(src / "image" / "train_data.npy").reshape(-1, 28, 28)
    aud_tr = np.load(src / "audio" / "train_data.npy")
    for split in ("train", "val"):
        a = p.split(split)
        assert a["image"].shape[1:] == (1, 28, 28) and a["image"].dtype == np.float32
        assert a["audio"].shape[1:] == (1, 112, 112) and a["audio"].dtype == np.float32
        assert a["label"].tolist() == lab_tr[a["index"]].tolist()
        np.testing.assert_allclose(a["image"][:, 0], img_tr[a["index"]] / 255, rtol=1e-6)
        np.testing.assert_allclose(a["audio"][:, 0], aud_tr[a["index"]] / 255, rtol=1e-6)
        np.testing.assert_allclose(a["image"][:, 0, 0, 0], a["label"] * 20 / 255, rtol=1e-6)
    assert np.bincount(p.split("val")["label"], minlength=10).tolist() == [1] * 10  # stratified
    assert sorted([*p.split("train")["index"], *p.split("val")["index"]]) == list(range(50))


def test_tampered_archive_and_pinned_checksum(archive, tmp_path):
    arc, _ = archive
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "avmnist.tar.gz").write_bytes(arc.read_bytes())
    avmnist.fetch(raw, {})  # local copy: recorded on first use
    (raw / "avmnist.tar.gz").write_bytes(arc.read_bytes()[:-100])
    with pytest.raises(F.ChecksumMismatch, match=r"avmnist\.tar\.gz: sha256 .* recorded"):
        avmnist.fetch(raw, {})
    with pytest.raises(F.ChecksumMismatch, match="pinned"):
        avmnist.fetch(tmp_path / "raw2", {"archive": str(arc), "sha256": "0" * 64})


def test_folder_option_square_images_and_multibench_val(tmp_path):
    src = raw_avmnist_tree(tmp_path / "av", n_train=5030, n_test=10, flat_image=False, noise=False)
    out = avmnist.prepare(tmp_path / "raw", tmp_path / "prep", {"folder": str(src), "val_mode": "multibench"})
    p = Prepared(out)
    assert p.meta["splits"] == {"train": 30, "val": 5000, "test": 10}
    assert p.split("val")["index"][0] == 30 and p.meta["val"]["mode"] == "multibench"


def test_bad_inputs_name_the_file(tmp_path):
    src = raw_avmnist_tree(tmp_path / "av", n_train=20, n_test=10)
    (src / "audio" / "test_data.npy").unlink()
    with pytest.raises(F.MissingRawFile, match=r"audio/test_data\.npy: missing"):
        avmnist.prepare(tmp_path / "raw", tmp_path / "prep", {"folder": str(src)})
    src = raw_avmnist_tree(tmp_path / "av2", n_train=20, n_test=10)
    f = src / "audio" / "train_data.npy"
    f.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(F.CorruptRawFile, match=r"audio/train_data\.npy: unreadable \.npy"):
        avmnist.prepare(tmp_path / "raw", tmp_path / "prep", {"folder": str(src)})
    src = raw_avmnist_tree(tmp_path / "av3", n_train=20, n_test=10)
    np.save(src / "train_labels.npy", np.arange(20) + 5)
    with pytest.raises(F.CorruptRawFile, match=r"train_labels\.npy: labels must be digits 0\.\.9"):
        avmnist.prepare(tmp_path / "raw", tmp_path / "prep", {"folder": str(src)})
    with pytest.raises(F.MissingRawFile, match="g2d fetch avmnist"):
        avmnist.prepare(tmp_path / "empty", tmp_path / "prep", {})
    with pytest.raises(F.RawDataError, match=r"datasets\.avmnist\.real: .*val_mode"):
        avmnist.prepare(tmp_path / "empty", tmp_path / "prep", {"val_mode": "random"})
    assert not (tmp_path / "prep").exists()
