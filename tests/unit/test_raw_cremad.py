"""CREMA-D raw -> prepared on fixture files in the exact raw format (16 kHz WAV, 30 fps FLV, CRLF split csv)."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from g2d.data.prepared import Prepared
from g2d.data.raw import cremad
from g2d.data.raw import fetching as F
from tests.fixtures_raw import (
    RAW_CREMAD_FREQ,
    raw_cremad_rows,
    raw_cremad_tree,
    raw_http_server,
    raw_sine,
    raw_write_video,
    raw_write_wav,
)

CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("cremad")
    train, test = raw_cremad_rows(3), raw_cremad_rows(1, offset=50)
    raw_cremad_tree(base / "raw" / "CREMA-D", base / "splits", train, test)
    # one train clip listed in the csv but absent on disk (the literature silently drops these)
    (base / "splits" / "cremad_train.csv").write_bytes(
        (base / "splits" / "cremad_train.csv").read_bytes() + b"1090_XXX_NEU_XX,NEU\r\n")
    return base, train, test


def _opts(base, **kw):
    return {"split_dir": str(base / "splits"), "jobs": 1, "max_missing_fraction": 0.1, **kw}


def _copy_raw(base, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(base / "raw", raw)
    return raw


def test_prepare_shapes_classes_splits_and_skips(tree, tmp_path):
    base, train, test = tree
    raw = _copy_raw(base, tmp_path)
    out = cremad.prepare(raw, tmp_path / "prep", _opts(base, val_fraction=1 / 3))
    p = Prepared(out)
    assert p.meta["source"] == "real" and p.meta["classes"] == CLASSES
    assert p.meta["class_index"] == {c: i for i, c in enumerate(CLASSES)}
    assert p.meta["splits"] == {"train": 12, "val": 6, "test": 6}  # 18 kept train rows, 1/3 per class held out
    assert p.meta["skipped"]["train"] == {"missing": 1, "corrupt": 0}
    assert p.meta["skipped_clips"]["train"]["missing"] == ["1090_XXX_NEU_XX"]
    assert p.meta["val"] == {"carved_from": "train", "fraction": 1 / 3, "seed": 0, "stratified": True}
    assert p.meta["preprocessing"]["audio"]["n_fft"] == 512 and p.meta["normalize"]["mean"][0] == 0.485
    lab = {c: CLASSES.index(y) for c, y in train + test}
    for split in ("train", "val", "test"):
        a = p.split(split)
        assert a["audio"].shape[1:] == (1, 257, 188) and a["audio"].dtype == np.float32
        assert a["visual"].shape[1:] == (3, 1, 224, 224) and a["visual"].dtype == np.uint8
        clips = np.load(out / split / "clip.npy")
        assert [lab[c] for c in clips] == a["label"].tolist()
        assert a["label"].dtype == np.int64 and np.bincount(a["label"], minlength=6).min() >= 1
        # the official row number: for train/val it indexes the train csv
        rows = train if split != "test" else test
        assert [rows[i][0] for i in a["index"]] == clips.tolist()
        # each clip's spectrogram peaks at its label's tone: 22.05 kHz, n_fft 512 -> bin = f * 512 / 22050
        peaks = a["audio"][:, 0].mean(axis=2).argmax(axis=1)
        want = [round(RAW_CREMAD_FREQ[CLASSES[y]] * 512 / 22050) for y in a["label"]]
        assert peaks.tolist() == want
    assert not set(np.load(out / "train" / "clip.npy")) & set(np.load(out / "val" / "clip.npy"))
    # the shared trainer's loader reads it: uint8 frames -> [0, 1] floats
    import torch

    from g2d.train.loader import BatchLoader

    batch = next(iter(BatchLoader(p.split("test"), 4, torch.device("cpu"))))
    assert batch["visual"].shape == (4, 3, 1, 224, 224) and batch["visual"].dtype == torch.float32
    assert 0 <= float(batch["visual"].min()) and float(batch["visual"].max()) <= 1


def test_sine_peak_bin_and_official_lengths():
    sr = 22050
    x = np.tile(raw_sine(40 * sr / 512, sr, 1.0), 3)[: 3 * sr]  # exactly bin 40
    spec = cremad.log_stft(x, 512, 353)
    assert spec.shape == (1, 257, 188) and spec.dtype == np.float32
    assert int(spec[0].mean(axis=1).argmax()) == 40
    assert spec[0, 40, 94] > np.log(0.5 * 256 * 0.5)  # |X| ~ amp * sum(hann)/2 = 0.5 * 256
    assert np.isclose(spec.min(), np.log(1e-7), atol=2) or spec.min() < 0


def test_frame_rule_follows_g2d_seeded_choice(tmp_path):
    # 30 fps; 1 frame per second kept -> n kept; G2D picks RandomState(999).choice(n, 1): n=2 -> 1, n=4 -> 2
    for n_frames, n_kept, pick in ((45, 2, 1), (100, 4, 2)):
        v = raw_write_video(tmp_path / f"v{n_frames}.flv", n_frames, fps=30)
        frames = cremad.decode_frames_1fps(v)
        assert len(frames) == n_kept
        assert cremad.select_frames(n_kept, 1).tolist() == [pick]
        grey = cremad.resize_frame(frames[pick]).mean()
        assert abs(grey - (pick * 30 * 8) % 256) < 4  # fixture frame i has grey level 8*i
    v = raw_write_video(tmp_path / "long.flv", 150, fps=30)  # 5 s
    whole = v.read_bytes()
    for frac in (0.3, 0.4, 0.5):  # a cut mid-packet fails decoding; a cut between packets decodes too few frames
        v.write_bytes(whole[: int(frac * len(whole))])
        with pytest.raises(F.CorruptRawFile, match=r"long\.flv: (undecodable|truncated) video .*re-run"):
            cremad.decode_frames_1fps(v)
    with pytest.raises(F.CorruptRawFile, match=r"truncated video \(\d+ frames = .* container says 5\.00 s"):
        cremad.decode_frames_1fps(v)


def test_truncated_wav_names_file_or_is_skipped(tree, tmp_path):
    base, train, _ = tree
    raw = _copy_raw(base, tmp_path)
    wav = raw / "CREMA-D" / "AudioWAV" / f"{train[0][0]}.wav"
    wav.write_bytes(wav.read_bytes()[:5000])
    with pytest.raises(F.CorruptRawFile, match=rf"{train[0][0]}\.wav: truncated WAV .*g2d fetch cremad"):
        cremad.prepare(raw, tmp_path / "prep", _opts(base))
    assert not (tmp_path / "prep").exists()
    out = cremad.prepare(raw, tmp_path / "prep", _opts(base, skip_corrupt=True))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"]["train"] == {"missing": 1, "corrupt": 1}
    assert "truncated WAV" in meta["corrupt_reasons"][train[0][0]]


def test_corrupt_video_and_wrong_rate(tree, tmp_path):
    base, train, _ = tree
    raw = _copy_raw(base, tmp_path)
    flv = raw / "CREMA-D" / "VideoFlash" / f"{train[1][0]}.flv"
    flv.write_bytes(b"FLV garbage" * 3)
    with pytest.raises(F.CorruptRawFile, match=rf"{train[1][0]}\.flv: undecodable video"):
        cremad.prepare(raw, tmp_path / "prep", _opts(base))
    shutil.rmtree(raw)
    raw = _copy_raw(base, tmp_path)
    raw_write_wav(raw / "CREMA-D" / "AudioWAV" / f"{train[2][0]}.wav", raw_sine(440, 44100, 1.0), 44100)
    with pytest.raises(F.CorruptRawFile, match=r"sample rate 44100 Hz, expected 16000 Hz.*source_sample_rate"):
        cremad.prepare(raw, tmp_path / "prep", _opts(base))


def test_missing_folder_is_clear(tree, tmp_path):
    base, _, _ = tree
    with pytest.raises(F.MissingRawFile, match=r"clips missing or LFS pointers.*g2d fetch cremad"):
        cremad.prepare(tmp_path / "nothing", tmp_path / "prep", _opts(base))
    with pytest.raises(F.RawDataError, match=r"datasets\.cremad\.real\.bogus"):
        cremad.prepare(tmp_path, tmp_path / "prep", {"bogus": 1})


def _tree_bytes(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_killed_prepare_resumes_byte_identical(tree, tmp_path, monkeypatch):
    base, _, _ = tree
    raw = _copy_raw(base, tmp_path)
    clean = cremad.prepare(raw, tmp_path / "clean", _opts(base))
    shutil.rmtree(F.prepare_cache_dir(raw))
    real, calls = cremad._process_clip, []

    class Killed(BaseException):  # like SIGINT/SIGKILL: not a per-clip error that could be skipped
        pass

    def dying(arg):
        calls.append(arg)
        if len(calls) == 5 and not killed:
            killed.append(1)
            raise Killed
        return real(arg)

    killed = []
    monkeypatch.setattr(cremad, "_process_clip", dying)
    with pytest.raises(Killed):
        cremad.prepare(raw, tmp_path / "resumed", _opts(base))
    assert not (tmp_path / "resumed").exists()
    assert len(list(F.prepare_cache_dir(raw).glob("*/*.npz"))) == 4
    assert not (raw / ".cache").exists()  # the fetched raw dir (a DVC output) is left untouched
    calls.clear()
    out = cremad.prepare(raw, tmp_path / "resumed", _opts(base))
    assert len(calls) == 24 - 4  # only the unfinished clips were processed
    assert _tree_bytes(out) == _tree_bytes(clean)


def test_packaged_official_split_files():
    from importlib import resources

    d = resources.files("g2d") / "data" / "splits"
    want = {"cremad_train.csv": ("68d0d3fd253830328fc92c68f3cf2e215db8c5b86757ad9c5112d2c76ba68bde", 6698),
            "cremad_test.csv": ("14866c99301fd56fb4a16f8a7048a8a6372a47069aee9f216443bc718be45f1f", 744)}
    for name, (sha, n) in want.items():
        b = (d / name).read_bytes()
        assert hashlib.sha256(b).hexdigest() == sha and b.count(b"\r\n") == n
    rows = cremad.read_split(d / "cremad_train.csv")
    counts = {c: sum(lab == c for _, lab in rows) for c in CLASSES}
    assert counts == {"NEU": 973, "HAP": 1148, "SAD": 1131, "FEA": 1138, "DIS": 1142, "ANG": 1166}


def _lfs_list(media, rels, path):
    lines = [f"{hashlib.sha256((media / r).read_bytes()).hexdigest()}  {(media / r).stat().st_size}  {r}\n" for r in rels]
    path.write_text("# test list\n" + "".join(lines))
    return str(path)


def test_fetch_downloads_missing_and_pointer_files_verified(tmp_path):
    # an HTTP "LFS media host" with the bytes; the checkout holds one real file, one LFS pointer, one absent
    media = tmp_path / "media"
    rels = ["AudioWAV/1001_DFA_ANG_XX.wav", "VideoFlash/1001_DFA_ANG_XX.flv", "AudioWAV/1002_DFA_SAD_XX.wav"]
    raw_write_wav(media / rels[0], raw_sine(440, 16000, 0.5), 16000)
    raw_write_video(media / rels[1], 10)
    raw_write_wav(media / rels[2], raw_sine(880, 16000, 0.5), 16000)
    lst = _lfs_list(media, rels, tmp_path / "lfs.txt")
    raw = tmp_path / "raw"
    root = raw / "CREMA-D"
    (root / "AudioWAV").mkdir(parents=True)
    shutil.copy(media / rels[0], root / rels[0])
    b = (media / rels[2]).read_bytes()
    (root / rels[2]).write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:"
                                f"{hashlib.sha256(b).hexdigest()}\nsize {len(b)}\n")
    with raw_http_server(media) as (url, h):
        assert cremad.fetch(raw, {"manifest": lst, "media_url": url, "jobs": 2}) == root
        assert sorted(p for p, _ in h.log) == sorted(f"/{r}" for r in rels[1:])
        for rel in rels:
            assert (root / rel).read_bytes() == (media / rel).read_bytes()
        cremad.fetch(raw, {"manifest": lst, "media_url": url})  # all verified: nothing downloaded
        assert len(h.log) == 2
    assert set(F.read_manifest(raw / F.MANIFEST)) == set(rels)
    # a corrupted copy is caught against the pinned size/sha256, naming the file (no host needed)
    (root / rels[0]).write_bytes(b"RIFF" + b"\0" * 100)
    with pytest.raises(F.ChecksumMismatch, match=r"1001_DFA_ANG_XX\.wav: size"):
        cremad.fetch(raw, {"manifest": lst, "media_url": "http://127.0.0.1:9"})
    (root / rels[0]).write_bytes(b"x" * (media / rels[0]).stat().st_size)
    with pytest.raises(F.ChecksumMismatch, match=r"1001_DFA_ANG_XX\.wav: sha256"):
        cremad.fetch(raw, {"manifest": lst, "media_url": "http://127.0.0.1:9"})
    # a media host serving wrong bytes: mismatch against the pin, nothing kept
    (root / rels[0]).unlink()
    (media / rels[0]).write_bytes(b"y" * 50)
    with (raw_http_server(media) as (url, _),
          pytest.raises(F.ChecksumMismatch, match=r"1001_DFA_ANG_XX\.wav")):
        cremad.fetch(raw, {"manifest": lst, "media_url": url})
    assert not (root / rels[0]).exists()


def test_packaged_lfs_list_matches_published_digests():
    # datasets-and-suites.md §2.1: sha256 of the sorted `<sha256>  <basename>` manifests at commit 1658cd34
    entries = cremad.lfs_manifest()
    assert len(entries) == 2 * 7442
    assert entries["AudioWAV/1001_DFA_ANG_XX.wav"] == (
        "c6f94b2592487c7556bd86df7df6e8f4420d1b9c11414aeec9d8e5e640b51495", 72862)
    want = {"AudioWAV": ("25423a2215ded4d0ab859749d980a2faf5d26b9e78d6cf9b6aa15e00609deffc", 605_899_936),
            "VideoFlash": ("15204dca7d413a54fce03a3f23f8e103f25172a6af0f146d23825040100f24a2", 2_443_021_141)}
    for d, (digest, total) in want.items():
        mine = {r: e for r, e in entries.items() if r.startswith(d + "/")}
        text = "".join(sorted(f"{sha}  {r.split('/')[1]}\n" for r, (sha, _) in mine.items()))
        assert hashlib.sha256(text.encode()).hexdigest() == digest
        assert sum(size for _, size in mine.values()) == total
    # every clip of the official split has both files
    files = cremad._split_files(cremad.options({}))
    rows = [c for name in ("train", "test") for c, _ in cremad.read_split(files[name])]
    assert len(rows) == 7442
    assert all(f"AudioWAV/{c}.wav" in entries and f"VideoFlash/{c}.flv" in entries for c in rows)


def test_fetch_offline_host_fails_fast_with_how_to(tmp_path):
    import time

    t0 = time.perf_counter()
    with pytest.raises(F.DownloadFailed) as e:
        cremad.fetch(tmp_path / "raw", {"media_url": "http://127.0.0.1:9", "timeout": 2, "jobs": 1})
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert "host unreachable" in msg and "AudioWAV/" in msg
    assert "git lfs pull --include" in msg and "Then run: g2d fetch cremad" in msg
