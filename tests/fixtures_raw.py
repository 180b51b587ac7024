"""Fixture writers for raw-data tests: files in each dataset's exact raw format, plus a local HTTP server.

Helpers are prefixed `raw_`; other agents add their own fixture modules rather than editing this one.
"""
from __future__ import annotations

import contextlib
import http.server
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np


def raw_sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def raw_write_wav(path: Path, signal: np.ndarray, sr: int) -> Path:
    """16-bit PCM WAV like CREMA-D's AudioWAV files."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), signal, sr, subtype="PCM_16")
    return path


def raw_frame_image(index: int, h: int, w: int, pattern: bool = False) -> np.ndarray:
    """A frame whose flat grey level encodes its index (survives lossy coding to within a few levels);
    `pattern` adds ramps (red across, green down) so that resampling filters and crops are told apart."""
    img = np.full((h, w, 3), (index * 8) % 256, np.uint8)
    if pattern:
        img[..., 0] = (index * 8 + np.arange(w)[None, :] * 255 // max(w - 1, 1)) % 256
        img[..., 1] = (index * 8 + np.arange(h)[:, None] * 255 // max(h - 1, 1)) % 256
    return img


def raw_write_video(path: Path, n_frames: int, fps: int = 30, size: tuple[int, int] = (48, 64),
                    audio: np.ndarray | None = None, audio_sr: int = 44100, fmt: str | None = None,
                    pattern: bool = False) -> Path:
    """FLV (CREMA-D, codec flv1) or MP4 (VGGSound, mpeg4 + aac) via PyAV; frame i has grey level 8*i
    (`size` = (height, width); `pattern`: see raw_frame_image)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or ("flv" if path.suffix == ".flv" else "mp4")
    h, w = size
    with av.open(str(path), "w", format=fmt) as c:
        vs = c.add_stream("flv" if fmt == "flv" else "mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"qscale": "2"} if fmt != "flv" else {}
        as_ = None
        if audio is not None:
            as_ = c.add_stream("aac" if fmt == "mp4" else "mp3", rate=audio_sr)
            as_.layout = "mono"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(raw_frame_image(i, h, w, pattern), format="rgb24")
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if as_ is not None:
            frame_size = as_.codec_context.frame_size or 1024
            pcm = np.asarray(audio, np.float32)
            for s in range(0, len(pcm), frame_size):
                chunk = pcm[s:s + frame_size]
                af = av.AudioFrame.from_ndarray(chunk[None, :].copy(), format="fltp", layout="mono")
                af.sample_rate = audio_sr
                af.pts = s
                for p in as_.encode(af):
                    c.mux(p)
            for p in as_.encode():
                c.mux(p)
    return path


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support; `cut_after` bytes per response simulate a dropped transfer."""

    cut_after: int | None = None
    log: ClassVar[list] = []  # replaced per server by raw_http_server

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        self.log.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.cut_after is not None:
            body = body[: self.cut_after]
        self.wfile.write(body)


@contextlib.contextmanager
def raw_serve(handler):
    """Run an http.server handler on 127.0.0.1 (random port) in a thread; yields the base URL."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def raw_http_server(root: Path, cut_after: int | None = None):
    """Serve `root` on 127.0.0.1 (random port) in a thread; yields (base_url, handler class with .log)."""
    handler = type("H", (_RangeHandler,), {"cut_after": cut_after, "log": []})

    def make(*a, **kw):
        return handler(*a, directory=str(root), **kw)

    with raw_serve(make) as url:
        yield url, handler


def raw_targz_bytes(files: dict[str, bytes]) -> bytes:
    """A .tar.gz archive in memory holding `files` (member name -> bytes)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, b in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(b)
            t.addfile(info, io.BytesIO(b))
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- CREMA-D
RAW_CREMAD_FREQ = {"NEU": 430.7, "HAP": 861.3, "SAD": 1722.7, "FEA": 2584.0, "DIS": 3445.3, "ANG": 4306.6}


def raw_cremad_tree(root: Path, split_dir: Path, train: list[tuple[str, str]], test: list[tuple[str, str]],
                    n_frames: int = 45, seconds: float = 1.0, sr: int = 16000, size: tuple[int, int] = (48, 64),
                    pattern: bool = False, extra: list[tuple[str, str]] = ()) -> Path:
    """CREMA-D layout: AudioWAV/<clip>.wav (16 kHz PCM16 sine per label), VideoFlash/<clip>.flv (30 fps, frames
    `size` = (H, W)); split files in the official format (no header, `clip,LABEL`, CRLF). Clips of one label
    share their bytes (encoded once). `extra` clips get media but are in no split file."""
    root, split_dir = Path(root), Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    media: dict[str, tuple[bytes, bytes]] = {}
    for name, rows in (("train", train), ("test", test), ("", list(extra))):
        if name:
            (split_dir / f"cremad_{name}.csv").write_bytes("".join(f"{c},{lab}\r\n" for c, lab in rows).encode())
        for clip, lab in rows:
            wav, flv = root / "AudioWAV" / f"{clip}.wav", root / "VideoFlash" / f"{clip}.flv"
            if lab not in media:
                raw_write_wav(wav, raw_sine(RAW_CREMAD_FREQ[lab], sr, seconds), sr)
                raw_write_video(flv, n_frames, fps=30, size=size, pattern=pattern)
                media[lab] = (wav.read_bytes(), flv.read_bytes())
            else:
                wav.parent.mkdir(parents=True, exist_ok=True)
                flv.parent.mkdir(parents=True, exist_ok=True)
                wav.write_bytes(media[lab][0])
                flv.write_bytes(media[lab][1])
    return root


def raw_cremad_rows(n_per_class: int, offset: int = 0) -> list[tuple[str, str]]:
    labs = list(RAW_CREMAD_FREQ)
    return [(f"{1001 + offset + i}_IEO_{lab}_XX", lab) for i in range(n_per_class) for lab in labs]


RAW_CREMAD_SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")


def raw_cremad_names(actors, n_per_actor: int) -> list[tuple[str, str]]:
    """Realistic clip names `<actor>_<sentence>_<EMO>_<level>` (actors 1001..1091, the 12 sentences; IEO
    clips carry an intensity LO/MD/HI, others XX), n_per_actor per actor, emotions cycling."""
    labs, out = list(RAW_CREMAD_FREQ), []
    for a in actors:
        for j in range(n_per_actor):
            lab, sent = labs[j % 6], RAW_CREMAD_SENTENCES[(j // 6) % 12]
            level = ("LO", "MD", "HI")[(j // 72) % 3] if sent == "IEO" else "XX"
            out.append((f"{a}_{sent}_{lab}_{level}", lab))
    return out


def raw_synib_folds(path: Path, folds: dict[str, dict[str, list[str]]]) -> Path:
    """SynIB's data_splits_val.pkl format (JSON): {"1".."5": {split: ["<clip>.wav-<k>", ...]}}."""
    import json

    body = {f: {s: [f"{c}.wav-{i % 5}" for i, c in enumerate(clips)] for s, clips in v.items()}
            for f, v in folds.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(body))
    return Path(path)


RAW_MLA_LABELS = {"ANG": "Anger", "DIS": "Disgust", "FEA": "Fear", "HAP": "Happy", "NEU": "Neutral", "SAD": "Sad"}


def raw_mla_list(path: Path, rows: list[tuple[str, str]]) -> Path:
    """MLA's data/my_{train,test}_cre.txt format: `<clip>.flv <Label>` per line, LF."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(f"{c}.flv {RAW_MLA_LABELS[lab]}\n" for c, lab in rows))
    return Path(path)


# ----------------------------------------------------------------------------------------------- AV-MNIST
def raw_avmnist_tree(root: Path, n_train: int = 40, n_test: int = 20, flat_image: bool = True, seed: int = 0,
                     noise: bool = True) -> Path:
    """MultiBench avmnist layout; image pixel (0, 0) and audio pixel (0, 0) encode the label (x 20)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", n_train), ("test", n_test)):
        lab = np.arange(n) % 10
        rng.shuffle(lab)
        img = rng.integers(0, 256, (n, 28, 28)).astype(np.float64) if noise else np.zeros((n, 28, 28))
        aud = rng.integers(0, 256, (n, 112, 112), dtype=np.uint8) if noise else np.zeros((n, 112, 112), np.uint8)
        img[:, 0, 0] = lab * 20
        aud[:, 0, 0] = lab * 20
        (root / "image").mkdir(parents=True, exist_ok=True)
        (root / "audio").mkdir(parents=True, exist_ok=True)
        np.save(root / "image" / f"{split}_data.npy", img.reshape(n, 784) if flat_image else img)
        np.save(root / "audio" / f"{split}_data.npy", aud)
        np.save(root / f"{split}_labels.npy", lab.astype(np.int64))
    return root


def raw_targz(src_dir: Path, archive: Path, arcname: str) -> Path:
    import tarfile

    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as t:
        t.add(src_dir, arcname=arcname)
    return archive


# ----------------------------------------------------------------------------------------------- VGGSound
RAW_VGG_LABELS = {"dog barking": 40, "people eating, crunching": 80, "playing tennis": 20}  # label -> STFT bin


def raw_vggsound_tree(raw_dir: Path, rows: list[tuple[str, int, str, str]], header: bool = False,
                      seconds: float = 4.0, fps: int = 10, n_frames: int = 50, sr: int = 44100) -> Path:
    """vggsound.csv (`youtube_id,start,label,split`, quoted labels) + video/<id>_<start:06d>.mp4 clips whose
    audio is a sine at bin*16000/256 Hz (bin per label) and frame i has grey level 8*i."""
    import csv as _csv
    import io as _io

    raw_dir = Path(raw_dir)
    buf = _io.StringIO()
    w = _csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(["youtube_id", "time", "label", "split"])
    for y, t, lab, split in rows:
        w.writerow([y, t, lab, split])
        freq = RAW_VGG_LABELS[lab] * 16000 / 256
        raw_write_video(raw_dir / "video" / f"{y}_{t:06d}.mp4", n_frames, fps=fps, size=(32, 48),
                        audio=raw_sine(freq, sr, seconds), audio_sr=sr)
    (raw_dir / "vggsound.csv").write_text(buf.getvalue())
    return raw_dir


def raw_vggsound_rows(n_train_per: int, n_test_per: int) -> list[tuple[str, int, str, str]]:
    rows = []
    for j, lab in enumerate(RAW_VGG_LABELS):
        for i in range(n_train_per + n_test_per):
            rows.append((f"-a{j}_b{i}", 10 * i + j, lab, "train" if i < n_train_per else "test"))
    return rows
