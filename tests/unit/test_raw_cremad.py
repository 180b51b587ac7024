"""CREMA-D raw -> prepared on fixture files in the exact raw format (16 kHz WAV, 30 fps FLV, CRLF split csv)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from g2d.data.prepared import Prepared
from g2d.data.raw import cremad
from g2d.data.raw import fetching as F
from tests.fixtures_raw import (
    RAW_CREMAD_FREQ,
    raw_cremad_names,
    raw_cremad_rows,
    raw_cremad_tree,
    raw_http_server,
    raw_mla_list,
    raw_sine,
    raw_synib_folds,
    raw_write_video,
    raw_write_wav,
)

CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("cremad")
    train, test = raw_cremad_rows(3), raw_cremad_rows(1, offset=50)
    # CREMA-D's native 480x360 (H x W = 360 x 480), with ramps so that any resampling would show
    raw_cremad_tree(base / "raw" / "CREMA-D", base / "splits", train, test, size=(360, 480), pattern=True)
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
    assert p.meta["split_variant"] == "ogm_ge"
    for split in ("train", "val", "test"):
        a = p.split(split)
        assert a["audio"].shape[1:] == (1, 257, 188) and a["audio"].dtype == np.float32
        # stored: the decoded frame at its native 360 x 480, uint8 (the transform pipeline makes the 224 x 224)
        assert a["visual"].shape[1:] == (3, 1, 360, 480) and a["visual"].dtype == np.uint8
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
    # the data contract with g2d.data.transforms: what the model sees, and how to get there from the stored array
    assert p.meta["inputs"] == {"visual": {"input_shape": [3, 1, 224, 224], "normalize": "imagenet"}}
    assert {m["name"]: m["shape"] for m in p.meta["modalities"]} == {"audio": [1, 257, 188], "visual": [3, 1, 360, 480]}
    assert dict((m.name, m.shape) for m in p.spec.modalities) == {"audio": (1, 257, 188), "visual": (3, 1, 224, 224)}
    assert p.meta["frames_resized_to_store"] == 0 and p.meta["frame_source_sizes"] == {"360x480": 24}
    assert p.meta["preprocessing"]["visual"]["store_size"] == [360, 480]
    assert not any("Resize((224, 224)); train-time RandomResizedCrop must crop" in d for d in p.meta["deviations"])


def _pyav_frames(path):
    """Every frame of the video as (H, W, 3) RGB, straight from PyAV (independent of cremad's 1-fps reader)."""
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_stored_frame_is_the_decoded_frame(tree, tmp_path):
    base, _, _ = tree
    raw = _copy_raw(base, tmp_path)
    out = cremad.prepare(raw, tmp_path / "prep", _opts(base))
    # 45 frames at 30 fps -> frames 0 and 30 kept at 1 fps; G2D's RandomState(999).choice(2, 1) picks the 2nd
    pick = 30 * int(np.random.RandomState(999).choice(2, 1, replace=False)[0])
    for split in ("train", "test"):
        vis = np.load(out / split / "visual.npy")
        for i, clip in enumerate(np.load(out / split / "clip.npy")):
            frame = _pyav_frames(raw / "CREMA-D" / "VideoFlash" / f"{clip}.flv")[pick]
            assert frame.shape == (360, 480, 3)
            np.testing.assert_array_equal(vis[i, :, 0], frame.transpose(2, 0, 1))


def test_frame_of_another_size_is_resized_and_counted(tree, tmp_path):
    from PIL import Image

    base, train, _ = tree
    raw = _copy_raw(base, tmp_path)
    flv = raw / "CREMA-D" / "VideoFlash" / f"{train[4][0]}.flv"
    raw_write_video(flv, 45, fps=30, size=(240, 320), pattern=True)
    out = cremad.prepare(raw, tmp_path / "prep", _opts(base, val_fraction=0.0))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["frames_resized_to_store"] == 1
    assert meta["frame_source_sizes"] == {"240x320": 1, "360x480": 23}
    clips = np.load(out / "train" / "clip.npy").tolist()
    stored = np.load(out / "train" / "visual.npy")[clips.index(train[4][0]), :, 0]
    src = _pyav_frames(flv)[30]
    want = np.asarray(Image.fromarray(src).resize((480, 360), Image.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(stored, want)
    nearest = np.asarray(Image.fromarray(src).resize((480, 360), Image.NEAREST)).transpose(2, 0, 1)
    assert not np.array_equal(stored, nearest)  # the ramps tell the filters apart
    # another storage size is an option (and part of the cache key)
    out = cremad.prepare(raw, tmp_path / "small", _opts(base, val_fraction=0.0, frame_size=[240, 320]))
    meta = json.loads((out / "meta.json").read_text())
    assert np.load(out / "test" / "visual.npy").shape[1:] == (3, 1, 240, 320)
    assert meta["frames_resized_to_store"] == 23 and meta["preprocessing"]["visual"]["store_size"] == [240, 320]
    with pytest.raises(F.RawDataError, match=r"datasets\.cremad\.real: frame_size=\[360\] must be"):
        cremad.options({"frame_size": [360]})


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
        grey = cremad.store_frame(frames[pick], (224, 224))[0].mean()
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


# ----------------------------------------------------------------------------------------------- split variants
ACTORS = [str(a) for a in range(1001, 1092)]  # CREMA-D's 91 actors


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """819 tiny clips with realistic names (91 actors x 9), a 744-row OGM-style test list in shuffled order, MLA
    lists and a SynIB-format fold file over them; one warm-up prepare fills the per-clip cache for all."""
    base = tmp_path_factory.mktemp("cremad_variants")
    names = raw_cremad_names(ACTORS, 9)
    order = np.random.default_rng(7).permutation(len(names))
    test, train = [names[i] for i in order[:744]], [names[i] for i in order[744:]]
    # 22.05 kHz wavs (source_sample_rate: 0) skip the resampler, the slow part of a tiny clip
    raw_cremad_tree(base / "raw" / "CREMA-D", base / "splits", train, test, n_frames=2, seconds=0.3, size=(16, 16),
                    sr=22050)
    mla_test, mla_train = [names[i] for i in order[-119:]], [names[i] for i in order[:-119]]
    raw_mla_list(base / "splits" / "cremad_mla_train.txt", mla_train)
    raw_mla_list(base / "splits" / "cremad_mla_test.txt", mla_test)
    folds = {}
    for f in range(1, 6):  # 63/14/14 actors per fold, a different rotation each
        a = np.roll(ACTORS, -14 * (f - 1)).tolist()
        part = {"test": set(a[:14]), "val": set(a[14:28]), "train": set(a[28:])}
        folds[str(f)] = {s: [c for c, _ in names if c[:4] in acts] for s, acts in part.items()}
    raw_synib_folds(base / "splits" / "cremad_synib_folds.json", folds)
    opts = {"split_dir": str(base / "splits"), "jobs": 1, "frame_size": [16, 16], "val_fraction": 0.1,
            "source_sample_rate": 0}
    cremad.prepare(base / "raw", base / "warm", opts)
    return base, opts, {"train": train, "test": test, "mla_train": mla_train, "mla_test": mla_test, "folds": folds}


def _clips(out, split):
    return np.load(out / split / "clip.npy").tolist()


def test_split_ogm_ge_704_keeps_the_first_704_test_rows_in_file_order(variants, tmp_path):
    base, opts, lists = variants
    full = Prepared(base / "warm")
    assert full.meta["split_variant"] == "ogm_ge" and full.meta["splits"]["test"] == 744
    out = cremad.prepare(base / "raw", tmp_path / "p704", {**opts, "split": "ogm_ge_704"})
    p = Prepared(out)
    assert p.meta["split_variant"] == "ogm_ge_704"
    assert p.meta["splits"] == {"train": full.meta["splits"]["train"], "val": full.meta["splits"]["val"], "test": 704}
    rows = [c for c, _ in lists["test"]]
    assert _clips(out, "test") == rows[:704] and p.split("test")["index"].tolist() == list(range(704))
    assert p.meta["split"]["test_rule"]["kept"] == 704
    assert p.meta["split"]["test_rule"]["dropped_by_drop_last"] == rows[704:]
    assert _clips(out, "train") == _clips(base / "warm", "train")  # train/val as ogm_ge
    # the rule on the kept clips: a missing row shifts the batches as in the official loaders
    kept, dropped = cremad.drop_last(list(range(743)))
    assert kept == list(range(704)) and dropped == list(range(704, 743))
    assert cremad.drop_last(list(range(700)))[0] == list(range(640))


def test_split_speaker_folds_use_the_folds_val_and_disjoint_actors(variants, tmp_path):
    base, opts, lists = variants
    out = cremad.prepare(base / "raw", tmp_path / "f3", {**opts, "split": "speaker_folds", "fold": 3})
    p = Prepared(out)
    fold = lists["folds"]["3"]
    assert p.meta["split_variant"] == "speaker_folds/3"
    assert p.meta["splits"] == {"train": 63 * 9, "val": 14 * 9, "test": 14 * 9}
    actors = {}
    for s in ("train", "val", "test"):
        assert _clips(out, s) == fold[s]  # the fold's lists, in order (val is the fold's, not carved)
        assert p.split(s)["index"].tolist() == list(range(len(fold[s])))
        assert [CLASSES[y] for y in p.split(s)["label"]] == [c.split("_")[2] for c in fold[s]]
        actors[s] = {c[:4] for c in _clips(out, s)}
    assert not (actors["train"] & actors["val"] or actors["train"] & actors["test"] or actors["val"] & actors["test"])
    assert actors["train"] | actors["val"] | actors["test"] == set(ACTORS)
    assert [len(actors[s]) for s in ("train", "val", "test")] == [63, 14, 14]
    assert p.meta["val"] == {"from": "speaker fold", "fold": 3, "actors": sorted(actors["val"])}
    assert p.meta["split"]["actors"]["test"] == sorted(actors["test"])
    # another fold, other actors in test
    out1 = cremad.prepare(base / "raw", tmp_path / "f1", {**opts, "split": "speaker_folds", "fold": 1})
    assert {c[:4] for c in _clips(out1, "test")} != actors["test"]
    # a fold file that is not speaker-independent is refused
    bad = tmp_path / "bad"
    bad.mkdir()
    broken = {f: dict(v) for f, v in lists["folds"].items()}
    broken["2"] = {**broken["2"], "val": broken["2"]["val"] + broken["2"]["test"][:1]}
    raw_synib_folds(bad / "cremad_synib_folds.json", broken)
    with pytest.raises(F.CorruptRawFile, match=r"fold 2 is not speaker-independent"):
        cremad.prepare(base / "raw", tmp_path / "x", {**opts, "split_dir": str(bad), "split": "speaker_folds",
                                                      "fold": 2})


def test_split_mla_reads_mlas_lists(variants, tmp_path):
    base, opts, lists = variants
    out = cremad.prepare(base / "raw", tmp_path / "mla", {**opts, "split": "mla", "val_fraction": 0.0})
    p = Prepared(out)
    assert p.meta["split_variant"] == "mla"
    assert p.meta["splits"] == {"train": 700, "val": 0, "test": 119}
    assert _clips(out, "test") == [c for c, _ in lists["mla_test"]]
    assert _clips(out, "train") == [c for c, _ in lists["mla_train"]]
    assert [CLASSES[y] for y in p.split("test")["label"]] == [lab for _, lab in lists["mla_test"]]
    assert set(p.meta["split_files"]) == {"train", "test"}
    assert p.meta["split_files"]["test"]["file"] == "cremad_mla_test.txt"
    # a label that does not match the clip name is an error naming file and line
    bad = tmp_path / "bad"
    shutil.copytree(base / "splits", bad)
    lines = (bad / "cremad_mla_test.txt").read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + (" Happy" if "_HAP_" not in lines[2] else " Sad")
    (bad / "cremad_mla_test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(F.CorruptRawFile, match=r"cremad_mla_test\.txt:3: expected"):
        cremad.prepare(base / "raw", tmp_path / "x", {**opts, "split_dir": str(bad), "split": "mla"})


def test_split_variant_missing_file_names_split_dir(variants, tmp_path):
    base, opts, _ = variants
    with pytest.raises(F.MissingRawFile, match=r"cremad_mla_train\.txt: CREMA-D split 'mla' file .*split_dir"):
        cremad.prepare(base / "raw", tmp_path / "x", {**opts, "split_dir": str(tmp_path), "split": "mla"})


@pytest.mark.parametrize("opts, pattern", [
    ({"split": "bogus"}, r"datasets\.cremad\.real\.split: 'bogus' is not a split option; valid: ogm_ge, ogm_ge_704, "
                         r"speaker_folds, mla"),
    ({"split": "speaker_folds", "fold": 0}, r"datasets\.cremad\.real\.fold: 0 is not a speaker fold; valid: 1, 2, 3, 4, 5"),
    ({"split": "speaker_folds", "fold": 6}, r"datasets\.cremad\.real\.fold: 6 is not a speaker fold"),
    ({"fold": 2}, r"datasets\.cremad\.real\.fold: 2 is set but split is 'ogm_ge'; fold applies to split: speaker_folds"),
    ({"split": "speaker_folds", "fold": "2"}, r"datasets\.cremad\.real\.fold: expected int"),
])
def test_bad_split_or_fold_is_a_one_line_error(tmp_path, opts, pattern):
    with pytest.raises(F.RawDataError, match=pattern) as e:
        cremad.prepare(tmp_path, tmp_path / "p", opts)
    assert "\n" not in str(e.value)


def test_packaged_speaker_folds_are_synibs():
    from importlib import resources

    path = resources.files("g2d") / "data" / "splits" / "cremad_synib_folds.json.gz"
    import gzip

    raw = gzip.decompress(path.read_bytes())  # byte-identical to SynIB's data_splits_val.pkl (a JSON)
    assert hashlib.sha256(raw).hexdigest() == "02c360a960a90c9b92a40123cde0dc338e63a6670b8280c20d3e908dbee725a0"
    folds = cremad.read_speaker_folds(Path(str(path)))
    d = resources.files("g2d") / "data" / "splits"
    ogm = {c for n in ("train", "test") for c, _ in cremad.read_split(d / f"cremad_{n}.csv")}
    sizes = {}
    for f, v in folds.items():
        acts = {s: {c.split("_")[0] for c in v[s]} for s in v}
        assert [len(acts[s]) for s in ("train", "val", "test")] == [63, 14, 14]
        assert not (acts["train"] & acts["val"] or acts["train"] & acts["test"] or acts["val"] & acts["test"])
        assert acts["train"] | acts["val"] | acts["test"] == set(ACTORS)
        clips = [c for s in v.values() for c in s]
        assert len(clips) == len(set(clips)) == 5820 and set(clips) <= ogm  # SynIB lists 5,820 of the 7,442
        sizes[f] = [len(v[s]) for s in ("train", "val", "test")]
    assert sizes["1"] == [4043, 878, 899]
    rows, info = cremad.split_rows(cremad.options({"split": "speaker_folds", "fold": 1}),
                                   cremad._split_files(cremad.options({"split": "speaker_folds"})))
    assert {s: len(r) for s, r in rows.items()} == {"train": 4043, "val": 878, "test": 899}
    assert rows["train"][0] == ("1026_IEO_ANG_HI", "ANG") and info["variant"] == "speaker_folds/1"


def test_packaged_mla_split():
    from importlib import resources

    d = resources.files("g2d") / "data" / "splits"
    want = {"cremad_mla_train.txt": ("97f63197fd7c238cf19e29feb7b952726bb4c5ee6cde6dd516797d06b2e867cc", 6698),
            "cremad_mla_test.txt": ("348c6ffc707303fa344380c94ec27e7b1f86927efada6ccd67bb74164aad97f9", 744)}
    for name, (sha, n) in want.items():
        b = (d / name).read_bytes()
        assert hashlib.sha256(b).hexdigest() == sha and b.count(b"\n") == n
    tr, te = cremad.read_mla_list(d / "cremad_mla_train.txt"), cremad.read_mla_list(d / "cremad_mla_test.txt")
    ogm_test = {c for c, _ in cremad.read_split(d / "cremad_test.csv")}
    ogm_all = ogm_test | {c for c, _ in cremad.read_split(d / "cremad_train.csv")}
    assert {c for c, _ in tr} | {c for c, _ in te} == ogm_all and not {c for c, _ in tr} & {c for c, _ in te}
    assert len({c for c, _ in te} & ogm_test) == 71  # anchors-and-protocols.md §3.4
