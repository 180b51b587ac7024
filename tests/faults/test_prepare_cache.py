"""Issue 12 §2: the per-clip prepare cache is keyed by content, parameters and code, and lives outside every
stage's output. CREMA-D fixture (tests/fixtures_raw.py `raw_cremad_tree`); MIS-ME for the cache location."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from g2d.data.raw import cremad, misme
from g2d.data.raw import fetching as F
from tests.fixtures_raw import RAW_CREMAD_FREQ, raw_cremad_rows, raw_cremad_tree, raw_sine, raw_write_wav
from tests.fixtures_raw_affect import tree_bytes, write_misme_raw


@pytest.fixture(autouse=True)
def no_racy_window(monkeypatch):
    """Fixture files are seconds old; real raw files are not. Without the 2-s "racy" window every digest is
    remembered by its stat stamp, so these tests exercise the fast path a real prepare takes."""
    monkeypatch.setattr(F.DigestStore, "RACY_S", 0.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """12 tiny clips (6 train, 6 test; 48x64 frames) in the standard layout data/raw/cremad/CREMA-D."""
    b = tmp_path_factory.mktemp("cache")
    train, test = raw_cremad_rows(1), raw_cremad_rows(1, offset=50)
    raw_cremad_tree(b / "data" / "raw" / "cremad" / "CREMA-D", b / "splits", train, test, n_frames=35,
                    seconds=0.5, size=(48, 64))
    return b, train, test


@pytest.fixture
def raw(base, tmp_path):
    b, train, _ = base
    d = tmp_path / "data" / "raw" / "cremad"
    shutil.copytree(b / "data" / "raw" / "cremad", d)
    return d, b / "splits", train


def _opts(splits, **kw):
    return {"split_dir": str(splits), "jobs": 1, "frame_size": [48, 64], "val_fraction": 0.0, **kw}


def _wav(raw, clip):
    return raw / "CREMA-D" / "AudioWAV" / f"{clip}.wav"


def _audio_of(out, clip):
    for s in ("train", "val", "test"):
        clips = np.load(out / s / "clip.npy").tolist()
        if clip in clips:
            return np.load(out / s / "audio.npy")[clips.index(clip)]
    return None


@pytest.fixture
def counted(monkeypatch):
    """Counts the clips prepare actually computes (cache misses)."""
    real, calls = cremad._process_clip, []

    def process(arg):
        calls.append(Path(arg[0]).stem)
        return real(arg)

    monkeypatch.setattr(cremad, "_process_clip", process)
    return calls


def test_cache_lives_next_to_raw_not_in_any_stage_output(raw, tmp_path, counted):
    d, splits, _ = raw
    before = tree_bytes(d)
    out = cremad.prepare(d, tmp_path / "data" / "prepared" / "cremad", _opts(splits))
    cache = F.prepare_cache_dir(d)
    assert cache == (tmp_path / "data" / "cache" / "cremad").resolve()  # data/raw/<name> -> data/cache/<name>
    assert len(list((cache / "clips").glob("*.npz"))) == 12 and len(counted) == 12
    assert tree_bytes(d) == before  # the fetch output is untouched
    assert not any(p.suffix == ".npz" for p in out.rglob("*"))  # nothing of the cache in the prepare output
    # an explicit cache_dir is used as given, and one inside either stage's output is refused
    mine = tmp_path / "elsewhere"
    cremad.prepare(d, tmp_path / "p2", _opts(splits, cache_dir=str(mine)))
    assert len(list((mine / "clips").glob("*.npz"))) == 12
    with pytest.raises(F.RawDataError, match=r"cache_dir: .* is inside .*the output of the `fetch` stage"):
        cremad.prepare(d, tmp_path / "p3", _opts(splits, cache_dir=str(d / ".cache")))
    with pytest.raises(F.RawDataError, match=r"cache_dir: .* is inside .*the output of the `prepare` stage"):
        cremad.prepare(d, tmp_path / "p4", _opts(splits, cache_dir=str(tmp_path / "p4" / "c")))


def test_truncated_wav_after_warm_cache_is_detected(raw, tmp_path, counted):
    d, splits, train = raw
    clip = train[2][0]
    cremad.prepare(d, tmp_path / "warm", _opts(splits))
    wav = _wav(d, clip)
    wav.write_bytes(wav.read_bytes()[: wav.stat().st_size // 2])
    counted.clear()
    with pytest.raises(F.CorruptRawFile, match=rf"{clip}\.wav: truncated WAV"):
        cremad.prepare(d, tmp_path / "out", _opts(splits))
    assert counted == [clip]  # only the changed clip was recomputed
    out = cremad.prepare(d, tmp_path / "skip", _opts(splits, skip_corrupt=True))
    assert _audio_of(out, clip) is None
    import json

    meta = json.loads((out / "meta.json").read_text())
    assert clip in meta["skipped_clips"]["train"]["corrupt"] and "truncated WAV" in meta["corrupt_reasons"][clip]


def test_replaced_wav_gives_new_content_equal_to_cold_cache(raw, tmp_path, counted):
    d, splits, train = raw
    clip, lab = train[0]
    warm = cremad.prepare(d, tmp_path / "warm", _opts(splits))
    old_audio = _audio_of(warm, clip)
    wav = _wav(d, clip)
    st = wav.stat()
    other = next(f for k, f in RAW_CREMAD_FREQ.items() if k != lab)
    raw_write_wav(wav, raw_sine(other, 16000, 0.5), 16000)  # same size, other content
    assert wav.stat().st_size == st.st_size
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime (cp -p, rsync -a)
    assert wav.stat().st_ino == st.st_ino  # rewritten in place: size, mtime and inode all as before
    counted.clear()
    out = cremad.prepare(d, tmp_path / "out", _opts(splits))
    assert counted == [clip]
    assert not np.array_equal(_audio_of(out, clip), old_audio)
    cold = cremad.prepare(d, tmp_path / "cold", _opts(splits, cache_dir=str(tmp_path / "cold-cache")))
    assert tree_bytes(out) == tree_bytes(cold)


def test_skip_record_is_reevaluated_when_file_fixed_or_option_off(raw, tmp_path, counted):
    d, splits, train = raw
    clip = train[3][0]
    wav = _wav(d, clip)
    good = wav.read_bytes()
    wav.write_bytes(good[:100])
    out = cremad.prepare(d, tmp_path / "skip", _opts(splits, skip_corrupt=True))
    assert _audio_of(out, clip) is None
    # the option turned off, the file still broken: an error, not the cached skip
    with pytest.raises(F.CorruptRawFile, match=rf"{clip}\.wav"):
        cremad.prepare(d, tmp_path / "off", _opts(splits))
    # the file fixed, the option still on: prepared again (the skip record names the broken file's content)
    wav.write_bytes(good)
    counted.clear()
    out = cremad.prepare(d, tmp_path / "fixed-on", _opts(splits, skip_corrupt=True))
    assert counted == [clip] and _audio_of(out, clip) is not None
    # skipped again, then fixed and the option off: prepared and present, equal to a cold prepare
    wav.write_bytes(good[:100])
    cremad.prepare(d, tmp_path / "skip2", _opts(splits, skip_corrupt=True))
    wav.write_bytes(good)
    out = cremad.prepare(d, tmp_path / "fixed-off", _opts(splits))
    assert _audio_of(out, clip) is not None
    cold = cremad.prepare(d, tmp_path / "cold", _opts(splits, cache_dir=str(tmp_path / "cold-cache")))
    assert tree_bytes(out) == tree_bytes(cold)


@pytest.mark.parametrize("change", [{"sample_rate": 16000}, {"frame_size": [24, 32]}])
def test_parameter_change_invalidates(raw, tmp_path, counted, change):
    d, splits, _ = raw
    cremad.prepare(d, tmp_path / "warm", _opts(splits))
    counted.clear()
    out = cremad.prepare(d, tmp_path / "changed", _opts(splits, **change))
    assert len(counted) == 12  # every clip recomputed under the new parameters
    cold = cremad.prepare(d, tmp_path / "cold", _opts(splits, **change, cache_dir=str(tmp_path / "cold-cache")))
    assert tree_bytes(out) == tree_bytes(cold)
    counted.clear()
    back = cremad.prepare(d, tmp_path / "back", _opts(splits))  # and back: the entries follow the parameters
    assert len(counted) == 12 and tree_bytes(back) == tree_bytes(tmp_path / "warm")


def test_code_version_change_invalidates(raw, tmp_path, counted, monkeypatch):
    d, splits, _ = raw
    cremad.prepare(d, tmp_path / "warm", _opts(splits))
    counted.clear()
    cremad.prepare(d, tmp_path / "same", _opts(splits))
    assert counted == []  # nothing changed: everything from the cache
    real = cremad.code_version
    monkeypatch.setattr(cremad, "code_version", lambda: {**real(), "cremad.py": "edited"})
    cremad.prepare(d, tmp_path / "edited", _opts(splits))
    assert len(counted) == 12


def test_misme_cache_is_not_under_its_raw_dir(tmp_path):
    d = tmp_path / "data" / "raw" / "misme"
    write_misme_raw(d, (6, 3, 3))
    before = tree_bytes(d)
    misme.prepare(d, tmp_path / "data" / "prepared" / "misme", {"jobs": 1, "keep_cache": True})
    assert not (d / ".cache").exists() and tree_bytes(d) == before  # the fetch output is untouched
    cache = tmp_path / "data" / "cache" / "misme"
    assert F.prepare_cache_dir(d) == cache.resolve()
    assert len(list((cache / "images").glob("*.npz"))) == 12
    # a changed image is decoded again (content key), not served from the cache
    img = sorted((d / "images").glob("*.png"))[0]
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    out = misme.prepare(d, tmp_path / "p2", {"jobs": 1, "keep_cache": True})
    cold = misme.prepare(d, tmp_path / "p3", {"jobs": 1, "cache_dir": str(tmp_path / "cold")})
    assert tree_bytes(out) == tree_bytes(cold)
