"""MIS-ME real-data fetch/prepare on fixture release files (xlsx sheets + JPEG/PNG images), offline."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from g2d.data.misme import WEATHER, Misme
from g2d.data.prepared import Prepared
from g2d.data.raw import fetching as F
from g2d.data.raw import misme
from tests.fixtures_raw_affect import serve, tree_bytes, write_misme_raw

SIZES = (10, 4, 5)


@pytest.fixture
def raw(tmp_path):
    d = tmp_path / "raw"
    frames = write_misme_raw(d, SIZES)
    return d, frames


def test_prepare_shapes_standardisation_images(raw, tmp_path):
    d, frames = raw
    P = Prepared(misme.prepare(d, tmp_path / "out", {"jobs": 2}))
    assert P.meta["source"] == "real" and P.meta["task"] == "regression" and P.meta["classes"] == []
    assert P.meta["splits"] == dict(zip(("train", "val", "test"), SIZES))
    # hand computation: NaN -> train mean (NaN-skipping), then (x - mean) / population std of the filled column
    tr = pd.read_excel(d / "labels" / "combined_only_train_set.xlsx")[list(WEATHER)].to_numpy(float)
    mean = np.array([np.mean(c[~np.isnan(c)]) for c in tr.T])
    filled = np.where(np.isnan(tr), mean, tr)
    std = np.sqrt(((filled - mean) ** 2).mean(axis=0))
    np.testing.assert_allclose(P.meta["weather_train_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(P.meta["weather_train_std"], std, rtol=1e-12)
    for split in ("train", "val", "test"):
        s = P.split(split)
        df = pd.read_excel(d / "labels" / f"combined_only_{split}_set.xlsx")
        assert s["image"].shape == (len(df), 3, 224, 224) and s["image"].dtype == np.uint8
        assert s["weather"].shape == (len(df), 8) and s["weather"].dtype == np.float32
        assert s["label"].dtype == np.float32
        np.testing.assert_array_equal(s["index"], np.arange(len(df)))
        np.testing.assert_allclose(s["label"], df["vwc"].to_numpy(np.float32))
        w = df[list(WEATHER)].to_numpy(float)
        exp = (np.where(np.isnan(w), mean, w) - mean) / std
        np.testing.assert_allclose(s["weather"], exp, rtol=1e-5, atol=1e-6)
        assert s["weather"][1, WEATHER.index("precipitation")] == pytest.approx((mean[2] - mean[2]) / std[2])
        assert P.meta["weather_nan_filled"][split]["precipitation"] == 1
    # an image (a grayscale PNG in the fixture) against PIL directly
    s = P.split("train")
    name = frames["train"]["image"].iloc[4]
    with Image.open(d / "images" / name) as im:
        assert im.mode == "L"
        exp = np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(s["image"][4], exp)
    assert np.abs(np.mean(P.split("train")["weather"], axis=0)).max() < 1e-5  # train is centred
    st = np.load(P.root / "test" / "station.npy")
    names = frames["test"]["image"].to_numpy()
    np.testing.assert_array_equal(st, [int(n[4]) - 1 for n in names])
    assert not (d / ".cache").exists() or not any((d / ".cache").iterdir())


def test_missing_image_error_and_skip(raw, tmp_path):
    d, frames = raw
    gone = frames["val"]["image"].iloc[2]
    (d / "images" / gone).unlink()
    with pytest.raises(F.MissingRawFile, match=rf"combined_only_val_set\.xlsx: 1 row\(s\) name images absent.*"
                                               rf"sheet row 4, image '{gone}'.*on_bad_image: skip"):
        misme.prepare(d, tmp_path / "out", {"jobs": 1})
    P = Prepared(misme.prepare(d, tmp_path / "out", {"jobs": 1, "on_bad_image": "skip"}))
    assert P.meta["splits"]["val"] == SIZES[1] - 1
    assert P.meta["skipped"]["val"] == {"missing_image": 1, "corrupt_image": 0}
    np.testing.assert_array_equal(P.split("val")["index"], [0, 1, 3])


def test_corrupt_image_error_and_skip(raw, tmp_path):
    d, frames = raw
    bad = frames["test"]["image"].iloc[1]  # a JPEG
    blob = (d / "images" / bad).read_bytes()
    (d / "images" / bad).write_bytes(blob[:60])
    with pytest.raises(F.CorruptRawFile, match=rf"{bad}: cannot decode image"):
        misme.prepare(d, tmp_path / "out", {"jobs": 1})
    P = Prepared(misme.prepare(d, tmp_path / "out", {"jobs": 1, "on_bad_image": "skip"}))
    assert P.meta["skipped"]["test"] == {"missing_image": 0, "corrupt_image": 1}
    assert 1 not in P.split("test")["index"]


def test_bad_or_missing_sheets(raw, tmp_path):
    d, _ = raw
    train = d / "labels" / "combined_only_train_set.xlsx"
    good = train.read_bytes()
    pd.read_excel(train).drop(columns=["wind_speed"]).to_excel(train, index=False)
    with pytest.raises(F.CorruptRawFile, match=r"combined_only_train_set\.xlsx: missing column\(s\) \['wind_speed'\]"):
        misme.prepare(d, tmp_path / "out", {"labels_dir": "labels"})
    train.write_bytes(good)
    sheet = d / "labels" / "combined_only_val_set.xlsx"
    sheet.write_bytes(sheet.read_bytes()[:100])
    with pytest.raises(F.CorruptRawFile, match=r"combined_only_val_set\.xlsx: cannot be read as \.xlsx"):
        misme.prepare(d, tmp_path / "out", {})
    sheet.unlink()
    with pytest.raises(F.MissingRawFile, match=r"combined_only_val_set\.xlsx: missing"):
        misme.prepare(d, tmp_path / "out", {})
    with pytest.raises(F.MissingRawFile, match="no combined_only_train_set.xlsx"):
        misme.prepare(tmp_path / "empty", tmp_path / "out", {})
    assert not (tmp_path / "out").exists()


def test_killed_prepare_resumes_byte_identical(raw, tmp_path, monkeypatch):
    d, _ = raw
    ref = misme.prepare(d, tmp_path / "ref", {"jobs": 1})
    real, calls = misme.decode_image, {"n": 0}

    def dying(path, size):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("killed")
        return real(path, size)

    monkeypatch.setattr(misme, "decode_image", dying)
    with pytest.raises(KeyboardInterrupt):
        misme.prepare(d, tmp_path / "out", {"jobs": 1})
    assert not (tmp_path / "out").exists()
    calls["n"] = -10_000  # no more deaths; count what the resumed run decodes
    misme.prepare(d, tmp_path / "out", {"jobs": 1})
    assert calls["n"] + 10_000 == sum(SIZES) - 7  # the 7 cached images were not decoded again
    assert tree_bytes(tmp_path / "out") == tree_bytes(ref)


def _site(tmp_path, digest=None):
    """A fake GitHub: releases API JSON + one zip asset holding labels/ and images/."""
    src = tmp_path / "src"
    write_misme_raw(src, SIZES)
    site = tmp_path / "site"
    (site / "dl").mkdir(parents=True)
    with zipfile.ZipFile(site / "dl" / "MIS-ME-data.zip", "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, f"data/{p.relative_to(src)}")
    return site, src


def _api(site, base, digest=None):
    asset = {"name": "MIS-ME-data.zip", "browser_download_url": f"{base}/dl/MIS-ME-data.zip",
             "size": (site / "dl" / "MIS-ME-data.zip").stat().st_size}
    if digest:
        asset["digest"] = digest
    (site / "api.json").write_text(json.dumps({"tag_name": "v1", "assets": [asset]}))
    return f"{base}/api.json"


def test_fetch_over_local_http_then_prepare(tmp_path):
    site, src = _site(tmp_path)
    d = tmp_path / "raw"
    with serve(site) as base:
        opts = {"release_api": _api(site, base)}
        assert misme.fetch(d, opts) == d
    rec = F.read_manifest(d / "downloads" / F.MANIFEST)
    assert rec == {"MIS-ME-data.zip": F.sha256_file(site / "dl" / "MIS-ME-data.zip")}
    assert (d / "extracted" / "MIS-ME-data" / "data" / "labels" / "combined_only_train_set.xlsx").is_file()
    misme.fetch(d, opts)  # server gone: saved release.json + recorded checksum, no network needed
    P = Prepared(misme.prepare(d, tmp_path / "out", {"jobs": 1}))
    Q = Prepared(misme.prepare(src, tmp_path / "direct", {"jobs": 1}))
    assert tree_bytes(P.root) == tree_bytes(Q.root)  # the downloaded release prepares like the local one
    blob = bytearray((d / "downloads" / "MIS-ME-data.zip").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (d / "downloads" / "MIS-ME-data.zip").write_bytes(bytes(blob))
    with pytest.raises(F.ChecksumMismatch, match=r"MIS-ME-data\.zip.*delete it"):
        misme.fetch(d, opts)


def test_fetch_digest_mismatch_and_unreachable(tmp_path):
    site, _ = _site(tmp_path)
    with serve(site) as base:
        api = _api(site, base, digest="sha256:" + "0" * 64)
        with pytest.raises(F.ChecksumMismatch, match=r"MIS-ME-data\.zip: downloaded sha256 .* != expected 0{64}"):
            misme.fetch(tmp_path / "raw", {"release_api": api})
        dead = f"{base}/no-such-release"
    with pytest.raises(F.ManualStepRequired) as e:
        misme.fetch(tmp_path / "raw2", {"release_api": dead, "timeout": 2.0})
    assert misme.RELEASE_PAGE in str(e.value) and str(tmp_path / "raw2" / "downloads") in str(e.value)


def test_manual_placement_is_recorded(tmp_path):
    site, _ = _site(tmp_path)
    d = tmp_path / "raw"
    (d / "downloads").mkdir(parents=True)
    (d / "downloads" / "MIS-ME-data.zip").write_bytes((site / "dl" / "MIS-ME-data.zip").read_bytes())
    with serve(site) as base:
        dead = f"{base}/missing"
    misme.fetch(d, {"release_api": dead, "timeout": 2.0})
    assert "MIS-ME-data.zip" in F.read_manifest(d / "downloads" / F.MANIFEST)
    assert Prepared(misme.prepare(d, tmp_path / "out", {"jobs": 1})).meta["splits"]["train"] == SIZES[0]


def test_spec_matches_prepared():
    assert Misme.spec.modality("image").shape == (3, 224, 224)
    assert Misme.spec.modality("weather").shape == (len(WEATHER),)
    with pytest.raises(F.RawDataError, match=r"datasets\.misme\.real\.on_bad_image"):
        misme.prepare(".", ".", {"on_bad_image": "ignore"})


def test_fetch_with_explicit_asset_list(tmp_path):
    site, _ = _site(tmp_path)
    d = tmp_path / "raw"
    sha = F.sha256_file(site / "dl" / "MIS-ME-data.zip")
    with serve(site) as base:
        assets = [{"url": f"{base}/dl/MIS-ME-data.zip", "filename": "MIS-ME-data.zip", "sha256": sha}]
        misme.fetch(d, {"assets": assets, "release_api": f"{base}/never-asked"})
    assert not (d / "release.json").exists()  # the API was not consulted
    assert F.read_manifest(d / "downloads" / F.MANIFEST) == {"MIS-ME-data.zip": sha}
    with pytest.raises(F.RawDataError, match=r"datasets\.misme\.real\.assets: entries need 'url'"):
        misme.fetch(d, {"assets": [{"filename": "x.zip"}]})


def test_fetch_accepts_a_release_unpacked_by_hand(raw, tmp_path):
    d, _ = raw
    with serve(tmp_path) as base:
        dead = f"{base}/no-release"
    assert misme.fetch(d, {"release_api": dead, "timeout": 2.0}) == d  # sheets found: nothing to download
