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
        # stored: the STFT of the whole tiled 10 s (160,000 / 128 + 1 columns); frames at 256 x 341, uint8
        assert a["audio"].shape[1:] == (1, 129, 1251) and a["audio"].dtype == np.float32
        assert a["visual"].shape[1:] == (3, 3, 256, 341) and a["visual"].dtype == np.uint8
        want = [LABELS.index(rows[i][2]) for i in a["index"]]
        assert a["label"].tolist() == want
        # 16 kHz, n_fft 256: the label's tone sits at its bin
        peaks = a["audio"][:, 0].mean(axis=2).argmax(axis=1)
        assert peaks.tolist() == [RAW_VGG_LABELS[LABELS[y]] for y in a["label"]]
        # 50 frames at 10 fps -> 5 kept (frames 0,10,..,40); G2D order choice(5, 3) = [3, 2, 1]
        grey = a["visual"].astype(float).mean(axis=(1, 3, 4))
        np.testing.assert_allclose(grey, np.tile([240.0, 160.0, 80.0], (len(grey), 1)), atol=4)
    # the data contract with g2d.data.transforms: model input shapes, the eval window, normalisation
    assert p.meta["inputs"] == {"audio": {"input_shape": [1, 129, 626], "window_start": 0.5, "normalize": "none"},
                                "visual": {"input_shape": [3, 3, 224, 224], "normalize": "imagenet"}}
    assert {m["name"]: m["shape"] for m in p.meta["modalities"]} == {"audio": [1, 129, 1251],
                                                                     "visual": [3, 3, 256, 341]}
    assert dict((m.name, m.shape) for m in p.spec.modalities) == {"audio": (1, 129, 626), "visual": (3, 3, 224, 224)}
    assert p.meta["preprocessing"]["audio_window"]["eval_start_column"] == 312
    # every fixture frame is 32 x 48: all 12 clips x 3 frames resized to the fixed storage size
    assert p.meta["frames_resized_to_store"] == 36 and p.meta["frame_source_sizes"] == {"32x48": 36}


def test_dataset_class_routes_real_options(tree, tmp_path):
    from g2d.registry import get_dataset

    cls = get_dataset("vggsound")
    ds = cls(cls.Config(real={"jobs": 1, "val_fraction": 0.0}))
    out = ds.prepare(_copy(tree[0], tmp_path), tmp_path / "prep")
    p = Prepared(out)
    assert p.meta["splits"] == {"train": 9, "val": 0, "test": 3} and p.spec.classes == tuple(LABELS)
    assert p.split("val")["audio"].shape == (0, 1, 129, 1251)


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


def test_stored_audio_is_the_tiled_10s_and_its_window_is_the_5s_stft(tree, tmp_path):
    raw, _ = tree
    r = _copy(raw, tmp_path)
    out = vggsound.prepare(r, tmp_path / "prep", _opts())
    clip = str(np.load(out / "test" / "clip.npy")[0])
    stored = np.load(out / "test" / "audio.npy")[0]
    # independently: decode, tile x2 until >= 10 s (4 s -> 16 s), keep 10 s, clip, STFT(256, 128)
    x = vggsound.read_audio(r / "video" / f"{clip}.mp4", 16000)
    assert 3.9 * 16000 < len(x) < 4.1 * 16000
    x = np.clip(np.tile(x, 4)[:160000], -1, 1)
    np.testing.assert_allclose(stored, vggsound.log_stft(x, 256, 128), atol=1e-5)
    assert stored.shape == (1, 129, 160000 // 128 + 1) == (1, 129, 1251)
    # the eval window (window_start 0.5 of the free 625 columns -> column 312 = 2.496 s) is the STFT of the
    # 5-s cut there, except the two border columns (the cut's centre padding vs the neighbouring audio)
    c = vggsound.eval_window_column(0.5, 1251)
    assert c == 312
    win = stored[..., c:c + 626]
    cut = vggsound.log_stft(x[128 * c:128 * c + 80000], 256, 128)
    assert cut.shape == win.shape == (1, 129, 626)
    np.testing.assert_allclose(win[..., 1:-1], cut[..., 1:-1], atol=1e-4)
    assert np.abs(win[..., 0] - cut[..., 0]).max() > 0.1 and np.abs(win[..., -1] - cut[..., -1]).max() > 0.1
    # an eval window elsewhere is recorded for the transform side
    out = vggsound.prepare(r, tmp_path / "p0", _opts(eval_window_start=0.0))
    meta = Prepared(out).meta
    assert meta["inputs"]["audio"]["window_start"] == 0.0 and meta["preprocessing"]["audio_window"]["eval_start_column"] == 0


def test_stored_frames_are_pil_bilinear_to_the_storage_size(tree, tmp_path):
    from PIL import Image

    raw, _ = tree
    r = _copy(raw, tmp_path)
    clip = "-a0_b0_000000"
    raw_write_video(r / "video" / f"{clip}.mp4", 50, fps=10, size=(90, 160), pattern=True,
                    audio=np.zeros(4 * 44100, np.float32), audio_sr=44100)
    out = vggsound.prepare(r, tmp_path / "prep", _opts(val_fraction=0.0))
    clips = np.load(out / "train" / "clip.npy").tolist()
    stored = np.load(out / "train" / "visual.npy")[clips.index(clip)]
    frames = vggsound.decode_frames_1fps(r / "video" / f"{clip}.mp4")
    for j, k in enumerate(vggsound.select_frames(len(frames), 3)):
        want = np.asarray(Image.fromarray(frames[k]).resize((341, 256), Image.BILINEAR)).transpose(2, 0, 1)
        np.testing.assert_array_equal(stored[:, j], want)
    meta = Prepared(out).meta
    assert meta["frame_source_sizes"] == {"32x48": 33, "90x160": 3} and meta["frames_resized_to_store"] == 36


def test_window_options_are_validated(tree, tmp_path):
    with pytest.raises(F.RawDataError, match=r"datasets\.vggsound\.real: eval_window_start=1\.5 must be in \[0, 1\]"):
        vggsound.prepare(tmp_path, tmp_path / "p", {"eval_window_start": 1.5})
    with pytest.raises(F.RawDataError, match=r"datasets\.vggsound\.real\.window_start_s: replaced by "
                                             r"datasets\.vggsound\.real\.eval_window_start"):
        vggsound.prepare(tmp_path, tmp_path / "p", {"window_start_s": 2.5})
    with pytest.raises(F.RawDataError, match=r"frame_size=\[256, 0\] must be \[height, width\]"):
        vggsound.options({"frame_size": [256, 0]})


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
