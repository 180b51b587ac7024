"""VGGSound: csv (with/without header) + mp4 clips decoded by PyAV -> prepared tensors; skips; resume; fetch."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from g2d.data.prepared import Prepared
from g2d.data.raw import fetching as F
from g2d.data.raw import vggsound
from tests.fixtures_raw import (
    RAW_VGG_LABELS,
    raw_http_server,
    raw_vggsound_rows,
    raw_vggsound_tree,
    raw_write_video,
)

LABELS = sorted(RAW_VGG_LABELS)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    raw = tmp_path_factory.mktemp("vgg") / "raw"
    rows = raw_vggsound_rows(3, 1)
    raw_vggsound_tree(raw, rows)
    # a row whose clip is absent, a clip with only 3 frames at 1 fps, an undecodable clip
    extra = [("gone_clip", 5, "dog barking", "train"), ("short_x", 7, "playing tennis", "train"),
             ("broken", 9, "dog barking", "test")]
    raw_write_video(raw / "video" / "short_x_000007.mp4", 30, fps=10, size=(32, 48))  # no audio, 3 frames
    (raw / "video" / "broken_000009.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 50)
    with open(raw / "vggsound.csv", "a") as f:
        f.writelines(f"{y},{t},{lab},{s}\n" for y, t, lab, s in extra)
    return raw, rows


def _opts(**kw):
    return {"jobs": 1, **kw}


def _copy(raw, tmp_path):
    dst = tmp_path / "raw"
    shutil.copytree(raw, dst)
    return dst


def test_prepare_shapes_sorted_classes_and_skips(tree, tmp_path):
    raw, rows = tree
    out = vggsound.prepare(_copy(raw, tmp_path), tmp_path / "prep", _opts(val_fraction=0.34))
    p = Prepared(out)
    assert p.meta["classes"] == LABELS == ["dog barking", "people eating, crunching", "playing tennis"]
    assert p.meta["class_index"] == {c: i for i, c in enumerate(LABELS)}
    assert p.meta["splits"] == {"train": 6, "val": 3, "test": 3}
    assert p.meta["skipped"] == {"train": {"missing": 1, "undecodable_or_short": 1},
                                 "test": {"missing": 0, "undecodable_or_short": 1}}
    assert "broken_000009" in p.meta["skip_reasons"] and "short_x_000007" in p.meta["skip_reasons"]
    assert p.spec.num_outputs == 3
    for split in ("train", "val", "test"):
        a = p.split(split)
        assert a["audio"].shape[1:] == (1, 129, 626) and a["audio"].dtype == np.float32
        assert a["visual"].shape[1:] == (3, 3, 224, 224) and a["visual"].dtype == np.uint8
        want = [LABELS.index(rows[i][2]) for i in a["index"]]
        assert a["label"].tolist() == want
        # 16 kHz, n_fft 256: the label's tone sits at its bin
        peaks = a["audio"][:, 0].mean(axis=2).argmax(axis=1)
        assert peaks.tolist() == [RAW_VGG_LABELS[LABELS[y]] for y in a["label"]]
        # 50 frames at 10 fps -> 5 kept (frames 0,10,..,40); G2D order choice(5, 3) = [3, 2, 1]
        grey = a["visual"].astype(float).mean(axis=(1, 3, 4))
        np.testing.assert_allclose(grey, np.tile([240.0, 160.0, 80.0], (len(grey), 1)), atol=4)


def test_dataset_class_routes_real_options(tree, tmp_path):
    from g2d.registry import get_dataset

    cls = get_dataset("vggsound")
    ds = cls(cls.Config(real={"jobs": 1, "val_fraction": 0.0}))
    out = ds.prepare(_copy(tree[0], tmp_path), tmp_path / "prep")
    p = Prepared(out)
    assert p.meta["splits"] == {"train": 9, "val": 0, "test": 3} and p.spec.classes == tuple(LABELS)
    assert p.split("val")["audio"].shape == (0, 1, 129, 626)


def test_header_and_headerless_csv_agree(tree, tmp_path):
    raw, rows = tree
    body = vggsound.read_csv(raw / "vggsound.csv")
    hdr = tmp_path / "h.csv"
    hdr.write_text("youtube_id,time,label,split\n" + (raw / "vggsound.csv").read_text())
    assert vggsound.read_csv(hdr) == body
    assert body[1] == (rows[1][0], rows[1][1], "dog barking", "train")
    assert any(r[2] == "people eating, crunching" for r in body)  # quoted comma label
    bad = tmp_path / "bad.csv"
    bad.write_text("abc,12,dog barking,train\nxyz,13,dog barking,validation\n")
    with pytest.raises(F.CorruptRawFile, match=r"bad\.csv:2: expected"):
        vggsound.read_csv(bad)


def test_killed_prepare_resumes_byte_identical(tree, tmp_path, monkeypatch):
    raw, _ = tree
    r = _copy(raw, tmp_path)
    clean = vggsound.prepare(r, tmp_path / "clean", _opts())
    shutil.rmtree(F.prepare_cache_dir(r))

    class Killed(BaseException):
        pass

    real, calls = vggsound._process_clip, []

    def dying(arg):
        calls.append(arg)
        if len(calls) == 4:
            raise Killed
        return real(arg)

    monkeypatch.setattr(vggsound, "_process_clip", dying)
    with pytest.raises(Killed):
        vggsound.prepare(r, tmp_path / "resumed", _opts())
    monkeypatch.setattr(vggsound, "_process_clip", real)
    out = vggsound.prepare(r, tmp_path / "resumed", _opts())
    files = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert all((clean / f).read_bytes() == (out / f).read_bytes() for f in files)


def test_window_start_is_recorded_and_validated(tree, tmp_path):
    with pytest.raises(F.RawDataError, match=r"datasets\.vggsound\.real: window_start_s=6"):
        vggsound.prepare(tmp_path, tmp_path / "p", {"window_start_s": 6})


def test_fetch_gets_csv_pins_clips_and_detects_tampering(tree, tmp_path):
    raw, _ = tree
    srv = tmp_path / "srv"
    srv.mkdir()
    shutil.copy(raw / "vggsound.csv", srv / "vggsound.csv")
    r = tmp_path / "raw"
    shutil.copytree(raw / "video", r / "video")
    with raw_http_server(srv) as (url, _):
        vggsound.fetch(r, {"csv_url": f"{url}/vggsound.csv", "jobs": 1})
    assert (r / "vggsound.csv").read_bytes() == (raw / "vggsound.csv").read_bytes()
    listed = (r / "clips.txt").read_text().split()
    assert len(listed) == 14 and "gone_clip_000005.mp4" not in listed
    assert set(F.read_manifest(r / F.MANIFEST)) == set(listed)
    victim = r / "video" / listed[0]
    victim.write_bytes(victim.read_bytes()[:-7])
    with pytest.raises(F.ChecksumMismatch, match=listed[0]):
        vggsound.fetch(r, {"jobs": 1})


def test_fetch_offline_csv_host_and_no_clips_give_how_to(tmp_path):
    with pytest.raises(F.DownloadFailed) as e:
        vggsound.fetch(tmp_path / "raw", {"csv_url": "http://127.0.0.1:9/vggsound.csv", "timeout": 2})
    assert "host unreachable" in str(e.value) and "hche11/VGGSound" in str(e.value)
    (tmp_path / "raw" / "vggsound.csv").write_text("abc,12,dog barking,train\n")
    with pytest.raises(F.ManualStepRequired, match=r"(?s)none of the 1 csv clips.*Then run: g2d fetch vggsound"):
        vggsound.fetch(tmp_path / "raw", {})
