"""g2d.data.raw.fetching: resumable verified downloads from a local HTTP server, manifests, extraction, cache."""
from __future__ import annotations

import hashlib
import io
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from g2d.data.raw import fetching as F
from tests.fixtures_raw import raw_http_server, raw_targz_bytes


def _blob(n=300_000, seed=0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_download_verifies_and_never_redownloads(tmp_path):
    srv = tmp_path / "srv"
    srv.mkdir()
    data = _blob()
    (srv / "a.bin").write_bytes(data)
    with raw_http_server(srv) as (url, h):
        out = F.download(f"{url}/a.bin", tmp_path / "raw" / "a.bin", _sha(data), progress=False)
        assert out.read_bytes() == data
        assert len(h.log) == 1
        F.download(f"{url}/a.bin", out, _sha(data), progress=False)  # verifies -> no request
        assert len(h.log) == 1
    assert not (tmp_path / "raw" / "a.bin.part").exists()


def test_download_resumes_partial_transfer(tmp_path):
    srv = tmp_path / "srv"
    srv.mkdir()
    data = _blob(500_000, 1)
    (srv / "b.bin").write_bytes(data)
    dest = tmp_path / "raw" / "b.bin"
    with (raw_http_server(srv, cut_after=200_000) as (url, _),
          pytest.raises(F.DownloadFailed, match="re-run to resume")):
        F.download(f"{url}/b.bin", dest, _sha(data), progress=False)
    part = dest.with_name("b.bin.part")
    assert part.stat().st_size == 200_000 and not dest.exists()
    with raw_http_server(srv) as (url, h):
        F.download(f"{url}/b.bin", dest, _sha(data), progress=False)
        assert h.log == [("/b.bin", "bytes=200000-")]  # only the missing tail was requested
    assert dest.read_bytes() == data and not part.exists()


def test_download_checksum_mismatch_deletes_and_names_file(tmp_path):
    srv = tmp_path / "srv"
    srv.mkdir()
    (srv / "c.bin").write_bytes(b"evil" * 100)
    dest = tmp_path / "c.bin"
    with (raw_http_server(srv) as (url, _),
          pytest.raises(F.ChecksumMismatch, match=r"c\.bin: downloaded sha256 .* re-run")):
        F.download(f"{url}/c.bin", dest, "0" * 64, progress=False, how_to="get it by hand")
    assert not dest.exists() and not dest.with_name("c.bin.part").exists()


def test_existing_file_with_wrong_checksum_is_reported(tmp_path):
    dest = tmp_path / "d.bin"
    dest.write_bytes(b"abc")
    with pytest.raises(F.ChecksumMismatch, match="delete it and re-run"):
        F.download("http://127.0.0.1:9/d.bin", dest, "1" * 64, progress=False)


def test_offline_host_fails_fast_with_how_to(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.perf_counter()
    with pytest.raises(F.DownloadFailed) as e:
        F.download(f"http://127.0.0.1:{port}/x.tar.gz", tmp_path / "x.tar.gz", None, timeout=2,
                   progress=False, how_to="Download x.tar.gz by hand into raw/x/ and run `g2d fetch x`.")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "host unreachable" in msg and "g2d fetch x" in msg
    assert isinstance(e.value, F.RawDataError)


def test_http_404_is_download_failed(tmp_path):
    srv = tmp_path / "srv"
    srv.mkdir()
    with raw_http_server(srv) as (url, _), pytest.raises(F.DownloadFailed, match="HTTP 404"):
        F.download(f"{url}/nope", tmp_path / "nope", None, progress=False)


def test_fetch_remotes_records_manifest_then_verifies(tmp_path):
    srv = tmp_path / "srv"
    srv.mkdir()
    data = _blob(1000, 3)
    (srv / "e.bin").write_bytes(data)
    raw = tmp_path / "raw"
    with raw_http_server(srv) as (url, _):
        F.fetch_remotes([F.Remote(f"{url}/e.bin", "e.bin")], raw)
    assert F.read_manifest(raw / F.MANIFEST) == {"e.bin": _sha(data)}
    (raw / "e.bin").write_bytes(b"tampered")  # later run: recorded checksum is enforced
    with pytest.raises(F.ChecksumMismatch, match="e.bin"):
        F.fetch_remotes([F.Remote("http://127.0.0.1:9/e.bin", "e.bin")], raw)


def test_verify_and_verify_or_record(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.bin").write_bytes(b"x" * 10)
    (tmp_path / "y.dat").write_bytes(b"y" * 20)
    rels = ["sub/x.bin", "y.dat"]
    m = F.verify_or_record(tmp_path, rels)  # first use: records
    assert F.read_manifest(m) == {"sub/x.bin": _sha(b"x" * 10), "y.dat": _sha(b"y" * 20)}
    assert F.verify(tmp_path, m, jobs=2) == rels
    (tmp_path / "y.dat").write_bytes(b"y" * 19)
    with pytest.raises(F.ChecksumMismatch, match=r"y\.dat: sha256 .* \(1 of 2 file\(s\) differ"):
        F.verify_or_record(tmp_path, rels)
    with pytest.raises(F.ChecksumMismatch, match="size 19 B, expected 20 B"):
        F.verify(tmp_path, m, sizes={"y.dat": 20})
    (tmp_path / "sub" / "x.bin").unlink()
    with pytest.raises(F.MissingRawFile, match=r"x\.bin: missing") as e:
        F.verify(tmp_path, m)
    assert isinstance(e.value, FileNotFoundError)  # the CLI already prints FileNotFoundError cleanly


def test_extract_atomic_idempotent_and_safe(tmp_path):
    arc = tmp_path / "a.tar.gz"
    arc.write_bytes(raw_targz_bytes({"avmnist/x.npy": b"123", "avmnist/y.npy": b"45"}))
    dest = F.extract(arc, tmp_path / "out", expect=["avmnist/x.npy"])
    assert (dest / "avmnist" / "x.npy").read_bytes() == b"123"
    stamp = (dest / "avmnist" / "x.npy").stat().st_mtime_ns
    F.extract(arc, dest)  # marker matches: nothing re-extracted
    assert (dest / "avmnist" / "x.npy").stat().st_mtime_ns == stamp
    with pytest.raises(F.CorruptRawFile, match="lacks avmnist/z.npy"):
        F.extract(arc, tmp_path / "out2", expect=["avmnist/z.npy"])
    assert not (tmp_path / "out2").exists()
    evil = tmp_path / "evil.tar.gz"
    evil.write_bytes(raw_targz_bytes({"../escape.txt": b"x"}))
    with pytest.raises(F.CorruptRawFile, match="escapes"):
        F.extract(evil, tmp_path / "out3")
    trunc = tmp_path / "t.tar.gz"
    trunc.write_bytes(arc.read_bytes()[:40])
    with pytest.raises(F.CorruptRawFile, match="truncated"):
        F.extract(trunc, tmp_path / "out4")
    assert not (tmp_path / "out4").exists() and not (tmp_path / "../escape.txt").exists()


def test_clip_cache_and_map_clips_resume(tmp_path):
    cache = F.ClipCache(tmp_path / "cache")
    calls = []

    def fn(x):
        calls.append(x)
        if x == 3:
            raise ValueError("bad clip")
        if x == 5:
            raise KeyboardInterrupt  # simulated kill
        return {"v": np.full(2, x)}

    items = [(f"c{i}", i) for i in range(8)]
    with pytest.raises(KeyboardInterrupt):
        F.map_clips(fn, items, cache, sources=lambda a: (), skip_errors=(ValueError,))
    assert calls == [0, 1, 2, 3, 4, 5]
    calls.clear()
    out = F.map_clips(lambda x: {"v": np.full(2, x)}, items, cache, sources=lambda a: (), skip_errors=(ValueError,))
    assert calls == []  # nothing recomputed (the resumed fn is a different callable)
    assert out == {f"c{i}": i != 3 for i in range(8)}
    assert cache.get("c3") is None and "bad clip" in cache.skip_reason("c3")
    assert [int(cache.get(f"c{i}")["v"][0]) for i in (0, 1, 2, 4, 5, 6, 7)] == [0, 1, 2, 4, 5, 6, 7]
    stacked = F.stack_cached(cache, ["c7", "c0"], ["v"], tmp_path / "stack")
    assert isinstance(stacked["v"], np.memmap) and stacked["v"].tolist() == [[7, 7], [0, 0]]


def test_parse_options_names_keys():
    @dataclass
    class Opt:
        fraction: float = 0.1
        path: str | None = None
        jobs: int = 1

    assert F.parse_options(Opt, {"fraction": 1, "path": "/x"}, "datasets.d.real") == Opt(1.0, "/x", 1)
    with pytest.raises(F.RawDataError, match=r"datasets\.d\.real\.bogus: unknown option"):
        F.parse_options(Opt, {"bogus": 1}, "datasets.d.real")
    with pytest.raises(F.RawDataError, match=r"datasets\.d\.real\.jobs: expected int"):
        F.parse_options(Opt, {"jobs": "many"}, "datasets.d.real")


def test_run_tool_missing_tool_is_manual_step():
    with pytest.raises(F.ManualStepRequired, match="not installed"):
        F.run_tool(["g2d-no-such-tool-xyz", "--help"], how_to="install it")


def test_manual_step_message_is_numbered():
    e = F.manual_step("AV-MNIST needs a manual download.", ["Open the link.", "Save it to raw/."], "g2d fetch avmnist")
    assert str(e).splitlines()[2:4] == ["  1. Open the link.", "  2. Save it to raw/."]
    assert str(e).endswith("Then run: g2d fetch avmnist")


def test_format_problem_per_format(tmp_path):
    import pickle
    import zipfile

    def w(name, b):
        (tmp_path / name).write_bytes(b)
        return F.format_problem(tmp_path / name)

    html = b"<!DOCTYPE html><html><body>Sign in</body></html>"
    assert "HTML page" in w("a.pkl", html) and "HTML page" in w("a.bin", html) and w("a.html", html) is None
    pk = pickle.dumps({"x": np.arange(3)}, protocol=4)
    assert w("ok.pkl", pk) is None and "STOP" in w("cut.pkl", pk[:-5])
    tg = raw_targz_bytes({"a/x.bin": _blob(40_000)})
    assert w("ok.tar.gz", tg) is None and "truncated" in w("cut.tar.gz", tg[: len(tg) // 2])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.bin", _blob(5000))
    zb = buf.getvalue()
    assert w("ok.zip", zb) is None and w("cut.zip", zb[:-30]) is not None
    bad_crc = bytearray(zb)
    bad_crc[100] ^= 0xFF
    assert "CRC" in w("crc.zip", bytes(bad_crc))
    np.save(tmp_path / "ok.npy", np.zeros((10, 4), np.float32))
    npy = (tmp_path / "ok.npy").read_bytes()
    assert F.format_problem(tmp_path / "ok.npy") is None and "needs" in w("cut.npy", npy[:-8])
    assert w("e.csv", b"") == "not a csv file: the file is empty"
    assert w("x.part", html) and F.format_problem(tmp_path / "x.part", "x.zip").startswith("not a zip archive")


def test_digest_store_remembers_by_stat_and_notices_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(F.DigestStore, "RACY_S", 0.0)
    f = tmp_path / "a.bin"
    f.write_bytes(b"a" * 100)
    store = F.DigestStore(tmp_path / "d.json")
    assert store.sha256(f) == _sha(b"a" * 100)
    store.save()
    calls = []
    monkeypatch.setattr(F, "sha256_file", lambda p: calls.append(p) or _sha(Path(p).read_bytes()))
    again = F.DigestStore(tmp_path / "d.json")  # persisted: not hashed again
    assert again.sha256(f) == _sha(b"a" * 100) and calls == []
    st = f.stat()
    f.write_bytes(b"b" * 100)  # same size, in place (same inode), old mtime restored
    import os

    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert again.sha256(f) == _sha(b"b" * 100) and len(calls) == 1  # ctime changed: hashed afresh


def test_forget_command_resets_an_entry(tmp_path):
    import subprocess
    import sys

    m = F.write_manifest(tmp_path / F.MANIFEST, {"a.bin": "0" * 64, "b.bin": "1" * 64})
    assert F.main(["forget", str(m), "a.bin"]) == 0 and F.read_manifest(m) == {"b.bin": "1" * 64}
    assert F.main(["forget", str(m), "a.bin"]) == 1
    r = subprocess.run([sys.executable, "-m", "g2d.data.raw.fetching", "forget", str(m), "b.bin"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "removed b.bin" in r.stdout and F.read_manifest(m) == {}
