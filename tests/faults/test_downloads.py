"""Issue 12 §5: downloads against misbehaving local servers (127.0.0.1, bounded in count and time, stopping by
themselves), checksums recorded only after format validation, and prepare re-verifying what fetch verified."""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from g2d.data.raw import avmnist, cremad, misme, urfunny
from g2d.data.raw import fetching as F
from tests.fixtures_raw import (raw_avmnist_tree, raw_cremad_rows, raw_cremad_tree, raw_http_server, raw_serve,
                                raw_targz, raw_targz_bytes)
from tests.fixtures_raw_affect import write_misme_raw, write_urfunny_pickle

HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Quota exceeded</body></html>\n"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@contextlib.contextmanager
def trickle_server(data: bytes, fast: int, gap: float = 0.5, max_s: float = 8.0, max_requests: int = 2):
    """Answers GET with 200 + the full Content-Length, sends `fast` bytes at once, then 1 byte every `gap` s;
    each response ends after `max_s` s, the server after `max_requests` responses or when the test leaves."""
    stop, served = threading.Event(), []

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            served.append(self.headers.get("Range"))
            if len(served) > max_requests:
                self.send_error(503)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            t0 = time.monotonic()
            try:
                self.wfile.write(data[:fast])
                self.wfile.flush()
                i = fast
                while i < len(data) and not stop.is_set() and time.monotonic() - t0 < max_s:
                    stop.wait(gap)
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    i += 1
            except OSError:  # the client gave up
                pass

    try:
        with raw_serve(H) as url:
            yield url, served
    finally:
        stop.set()


@contextlib.contextmanager
def silent_server(max_s: float = 10.0, max_conns: int = 4):
    """Accepts connections and never answers (reads nothing, sends nothing); closes everything after `max_s`
    s, after `max_conns` connections, or when the test leaves."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.1)
    stop, conns = threading.Event(), []

    def loop():
        t0 = time.monotonic()
        while not stop.is_set() and time.monotonic() - t0 < max_s and len(conns) < max_conns:
            try:
                conns.append(sock.accept()[0])
            except (TimeoutError, OSError):
                continue
        stop.wait(max(0.0, max_s - (time.monotonic() - t0)))

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", conns
    finally:
        stop.set()
        th.join(timeout=2)
        for c in conns:
            c.close()
        sock.close()


# ----------------------------------------------------------------------------------------------- (a) HTML page
def test_html_error_page_for_unpinned_file_is_rejected_and_not_recorded(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "humor.pkl").write_bytes(HTML)  # served with 200, as a quota / sign-in page is
    raw = tmp_path / "raw"
    with raw_http_server(site) as (url, _):
        with pytest.raises(F.CorruptRawFile, match=r"humor\.pkl: not a pickle: it is an HTML page.*deleted, "
                                                   r"nothing recorded"):
            F.fetch_remotes([F.Remote(f"{url}/humor.pkl", "humor.pkl")], raw, rerun="g2d fetch urfunny")
        assert not (raw / F.MANIFEST).exists()
        assert not (raw / "humor.pkl").exists() and not (raw / "humor.pkl.part").exists()
        # the same through a dataset's fetch (UR-Funny's `url` mirror)
        with pytest.raises(F.CorruptRawFile, match="HTML page"):
            urfunny.fetch(raw, {"url": f"{url}/humor.pkl"})
        assert not (raw / F.MANIFEST).exists()
        # the host recovers: the genuine file is downloaded and its checksum recorded, no dead end
        write_urfunny_pickle(site / "humor.pkl")
        urfunny.fetch(raw, {"url": f"{url}/humor.pkl"})
    assert F.read_manifest(raw / F.MANIFEST) == {"humor.pkl": _sha((site / "humor.pkl").read_bytes())}


def test_html_page_saved_by_hand_is_not_recorded(tmp_path):
    dl = tmp_path / "downloads"
    dl.mkdir()
    (dl / "MIS-ME-data.zip").write_bytes(HTML)
    with pytest.raises(F.CorruptRawFile, match=r"MIS-ME-data\.zip: not a zip archive: it is an HTML page.*no "
                                               r"checksum recorded"):
        F.verify_or_record(dl, ["MIS-ME-data.zip"], rerun="g2d fetch misme")
    assert not (dl / F.MANIFEST).exists()


# ----------------------------------------------------------------------------------------------- (b) trickle / stall
def test_trickling_server_hits_stall_timeout_keeps_partial_and_resumes(tmp_path):
    data = _blob(200_000, 1)
    dest = tmp_path / "raw" / "big.bin"
    part = dest.with_name("big.bin.part")
    with trickle_server(data, fast=60_000, gap=0.5) as (url, served):
        t0 = time.monotonic()
        with pytest.raises(F.DownloadFailed, match=r"transfer stalled: .* below the minimum 1024 B/s over 1 s; "
                                                   r".*big\.bin\.part keeps \d+ B, re-run to resume"):
            F.download(f"{url}/big.bin", dest, _sha(data), timeout=5, stall_timeout=1.0, min_rate=1024,
                       progress=False)
        assert time.monotonic() - t0 < 6  # bounded: not "downloading" forever
        assert served == [None]
    kept = part.stat().st_size
    assert 60_000 <= kept < 60_020 and part.read_bytes() == data[:kept]  # the bytes before the stall are kept
    assert not dest.exists()
    site = tmp_path / "site"
    site.mkdir()
    (site / "big.bin").write_bytes(data)
    with raw_http_server(site) as (url, log):
        F.download(f"{url}/big.bin", dest, _sha(data), progress=False)
        assert log.log == [("/big.bin", f"bytes={kept}-")]  # resumed from the kept bytes
    assert dest.read_bytes() == data and not part.exists()


def test_server_going_silent_mid_transfer_times_out_and_keeps_partial(tmp_path):
    data = _blob(100_000, 2)
    dest = tmp_path / "x.bin"
    with trickle_server(data, fast=30_000, gap=30.0) as (url, _):  # 30 kB, then silence
        t0 = time.monotonic()
        with pytest.raises(F.DownloadFailed, match=r"no data for 1 s \(stalled transfer\); .*keeps 30000 B"):
            F.download(f"{url}/x.bin", dest, None, timeout=1, progress=False)
        assert time.monotonic() - t0 < 5
    assert dest.with_name("x.bin.part").read_bytes() == data[:30_000]


# ----------------------------------------------------------------------------------------------- (c) no answer
def test_server_that_accepts_and_never_answers_is_reported_as_such(tmp_path):
    with silent_server() as (url, conns):
        t0 = time.monotonic()
        with pytest.raises(F.DownloadFailed) as e:
            F.download(f"{url}/a.tar.gz", tmp_path / "a.tar.gz", None, timeout=1, progress=False,
                       how_to="Download a.tar.gz by hand.")
        assert time.monotonic() - t0 < 5
        assert len(conns) == 1
    msg = str(e.value)
    assert "server accepted the connection but did not answer within 1 s" in msg
    assert "host unreachable" not in msg and "Download a.tar.gz by hand." in msg
    # a port where nothing listens is still "host unreachable"
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(F.DownloadFailed, match="host unreachable"):
        F.download(f"http://127.0.0.1:{port}/a.tar.gz", tmp_path / "b.tar.gz", None, timeout=1, progress=False)


# ----------------------------------------------------------------------------------------------- (d) truncated archive
@pytest.mark.parametrize("name", ["data.tar.gz", "data.zip"])
def test_truncated_first_download_of_unpinned_archive_is_rejected(tmp_path, name):
    site = tmp_path / "site"
    site.mkdir()
    files = {"d/a.bin": _blob(50_000, 3), "d/b.bin": _blob(50_000, 4)}
    if name.endswith(".zip"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for n, b in files.items():
                z.writestr(n, b)
        good = buf.getvalue()
    else:
        good = raw_targz_bytes(files)
    (site / name).write_bytes(good[: len(good) * 2 // 3])  # the server itself holds a cut copy
    raw = tmp_path / "raw"
    with raw_http_server(site) as (url, _):
        with pytest.raises(F.CorruptRawFile, match=rf"{name}: not a valid .*(truncated|another format).*deleted, "
                                                   rf"nothing recorded|{name}: not a zip archive: no zip directory"):
            F.fetch_remotes([F.Remote(f"{url}/{name}", name)], raw)
        assert not (raw / F.MANIFEST).exists() and not (raw / name).exists()
        (site / name).write_bytes(good)
        F.fetch_remotes([F.Remote(f"{url}/{name}", name)], raw)  # a good copy is recorded
    assert F.read_manifest(raw / F.MANIFEST) == {name: _sha(good)}


def test_avmnist_truncated_archive_from_mirror_is_not_recorded(tmp_path):
    src = raw_avmnist_tree(tmp_path / "src" / "avmnist", n_train=20, n_test=10)
    arc = raw_targz(src, tmp_path / "srv" / "avmnist.tar.gz", "avmnist")
    good = arc.read_bytes()
    arc.write_bytes(good[: len(good) // 2])
    raw = tmp_path / "raw"
    with raw_http_server(arc.parent) as (url, _):
        with pytest.raises(F.CorruptRawFile, match=r"avmnist\.tar\.gz: not a valid tar archive"):
            avmnist.fetch(raw, {"url": f"{url}/avmnist.tar.gz"})
        assert not (raw / F.MANIFEST).exists() and not (raw / "extracted").exists()
        arc.write_bytes(good)
        avmnist.fetch(raw, {"url": f"{url}/avmnist.tar.gz"})
    assert F.read_manifest(raw / F.MANIFEST) == {"avmnist.tar.gz": _sha(good)}


def test_avmnist_truncated_archive_placed_by_hand_is_not_recorded(tmp_path):
    src = raw_avmnist_tree(tmp_path / "src" / "avmnist", n_train=20, n_test=10)
    good = raw_targz(src, tmp_path / "srv" / "avmnist.tar.gz", "avmnist").read_bytes()
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "avmnist.tar.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(F.CorruptRawFile, match=r"avmnist\.tar\.gz: not a valid tar archive.*no checksum recorded"):
        avmnist.fetch(raw, {})
    assert not (raw / F.MANIFEST).exists()
    (raw / "avmnist.tar.gz").write_bytes(good)  # following the advice works: nothing stale to fight
    avmnist.fetch(raw, {})
    assert F.read_manifest(raw / F.MANIFEST) == {"avmnist.tar.gz": _sha(good)}


# ----------------------------------------------------------------------------------------------- TOFU dead end
def test_wrong_recorded_checksum_can_be_reset_as_the_message_says(tmp_path):
    """A manifest entry recorded from a bad first download (an older g2d): the genuine file is not deleted,
    the message gives the reset command, and following it records the genuine file without a re-download."""
    site = tmp_path / "site"
    site.mkdir()
    genuine = raw_targz_bytes({"x/y.bin": _blob(20_000, 5)})
    (site / "rel.tar.gz").write_bytes(genuine)
    raw = tmp_path / "raw"
    F.write_manifest(raw / F.MANIFEST, {"rel.tar.gz": _sha(HTML)})  # trust on first use of an HTML page
    with raw_http_server(site) as (url, h):
        remotes = [F.Remote(f"{url}/rel.tar.gz", "rel.tar.gz")]
        with pytest.raises(F.ChecksumMismatch) as e:
            F.fetch_remotes(remotes, raw, rerun="g2d fetch x")
        msg = str(e.value)
        cmd = f"python -m g2d.data.raw.fetching forget {raw / F.MANIFEST} rel.tar.gz"
        assert cmd in msg and "then run `g2d fetch x`" in msg and "is kept as" in msg
        assert (raw / "rel.tar.gz.part").read_bytes() == genuine
        res = subprocess.run([sys.executable, "-m", "g2d.data.raw.fetching", "forget", str(raw / F.MANIFEST),
                              "rel.tar.gz"], capture_output=True, text=True, cwd=Path(__file__).parents[2])
        assert res.returncode == 0, res.stderr
        n = len(h.log)
        F.fetch_remotes(remotes, raw, rerun="g2d fetch x")
        assert h.log[n:] == [("/rel.tar.gz", f"bytes={len(genuine)}-")]  # nothing downloaded again (416)
    assert F.read_manifest(raw / F.MANIFEST) == {"rel.tar.gz": _sha(genuine)}
    assert (raw / "rel.tar.gz").read_bytes() == genuine


# ----------------------------------------------------------------------------------------------- prepare re-verifies
def test_cremad_prepare_refuses_a_file_corrupted_after_fetch(tmp_path):
    media = tmp_path / "media"
    train, test = raw_cremad_rows(1), raw_cremad_rows(1, offset=50)
    raw_cremad_tree(media, tmp_path / "splits", train, test, n_frames=35, seconds=0.5, size=(48, 64))
    rels = sorted(str(p.relative_to(media)) for p in media.rglob("*") if p.is_file())
    lst = tmp_path / "lfs.txt"
    lst.write_text("".join(f"{_sha((media / r).read_bytes())}  {(media / r).stat().st_size}  {r}\n" for r in rels))
    raw = tmp_path / "data" / "raw" / "cremad"
    with raw_http_server(media) as (url, _):
        root = cremad.fetch(raw, {"manifest": str(lst), "media_url": url, "jobs": 2})
    opts = {"split_dir": str(tmp_path / "splits"), "jobs": 1, "frame_size": [48, 64], "val_fraction": 0.0}
    cremad.prepare(raw, tmp_path / "ok", opts)
    wav = root / "AudioWAV" / f"{train[1][0]}.wav"
    b = bytearray(wav.read_bytes())
    b[-10] ^= 0xFF  # same size, one sample changed: still a valid WAV
    wav.write_bytes(bytes(b))
    with pytest.raises(F.ChecksumMismatch) as e:
        cremad.prepare(raw, tmp_path / "bad", opts)
    msg = str(e.value)
    assert str(wav) in msg and "changed after `g2d fetch cremad` verified it" in msg
    assert "`g2d fetch cremad`" in msg and "`dvc repro fetch@cremad`" in msg
    assert not (tmp_path / "bad").exists()


def test_misme_prepare_refuses_changed_download_or_extracted_file(tmp_path):
    src = tmp_path / "src"
    write_misme_raw(src, (6, 3, 3))
    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "MIS-ME-data.zip", "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, f"data/{p.relative_to(src)}")
    raw = tmp_path / "data" / "raw" / "misme"
    with raw_http_server(site) as (url, _):
        assets = [{"url": f"{url}/MIS-ME-data.zip", "filename": "MIS-ME-data.zip"}]
        misme.fetch(raw, {"assets": assets})
    misme.prepare(raw, tmp_path / "ok", {"jobs": 1})
    img = sorted((raw / "extracted").rglob("*.jpg"))[0]
    b = bytearray(img.read_bytes())
    b[len(b) // 2] ^= 0x01
    img.write_bytes(bytes(b))
    with pytest.raises(F.ChecksumMismatch, match=rf"{img.name}: changed after `g2d fetch misme` extracted it.*"
                                                 rf"`dvc repro fetch@misme`"):
        misme.prepare(raw, tmp_path / "bad", {"jobs": 1})
    zp = raw / "downloads" / "MIS-ME-data.zip"
    zp.write_bytes(zp.read_bytes() + b"\0")
    with pytest.raises(F.ChecksumMismatch, match=r"MIS-ME-data\.zip: sha256 .* the file changed after `g2d fetch "
                                                 r"misme` verified it.*`g2d fetch misme` \(or `dvc repro fetch@misme`\)"):
        misme.prepare(raw, tmp_path / "bad", {"jobs": 1})


def test_avmnist_prepare_refuses_extracted_array_changed_after_fetch(tmp_path):
    src = raw_avmnist_tree(tmp_path / "src" / "avmnist", n_train=20, n_test=10)
    arc = raw_targz(src, tmp_path / "srv" / "avmnist.tar.gz", "avmnist")
    raw = tmp_path / "data" / "raw" / "avmnist"
    raw.mkdir(parents=True)
    (raw / "avmnist.tar.gz").write_bytes(arc.read_bytes())
    root = avmnist.fetch(raw, {})
    avmnist.prepare(raw, tmp_path / "ok", {})
    f = root / "test_labels.npy"
    a = np.load(f)
    a[0] = (a[0] + 1) % 10
    np.save(f, a)
    with pytest.raises(F.ChecksumMismatch, match=r"test_labels\.npy: changed after `g2d fetch avmnist` extracted"):
        avmnist.prepare(raw, tmp_path / "bad", {})
