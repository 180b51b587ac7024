"""Damaged prepared data (issue 12, section 3): each damage is one PreparedError naming the file and the fix,
on open (`Prepared`, hence before any training) or from `g2d verify <dataset>` (exit 1)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from g2d import cli
from g2d.data import prepared as P
from g2d.data.prepared import Prepared, PreparedError
from g2d.runs import prepared_dir
from g2d.train.trainer import RunSpec, Trainer
from tests.helpers import tiny_config, tmp_params, write_tiny_cremad


@pytest.fixture
def data(tmp_path):
    return write_tiny_cremad(tmp_path / "prepared" / "cremad")


def _invert(path: Path, n: int = 4096, at: int = 128) -> None:
    b = bytearray(path.read_bytes())
    for i in range(at, min(len(b), at + n)):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


def _save_keep_hash(path: Path, arr: np.ndarray) -> None:
    """Replace an array and record its new sha256: only the structural checks can catch it."""
    np.save(path, arr)
    meta_path = path.parents[1] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["arrays"][path.parent.name][path.stem]["sha256"] = P.file_sha256(path)
    meta_path.write_text(json.dumps(meta))


def _damage(root: Path, how: str) -> Path:
    """Damage the prepared data; returns the file the error must name."""
    audio, label = root / "train" / "audio.npy", root / "train" / "label.npy"
    if how == "inverted":
        _invert(audio)
        return audio
    if how == "wrong_shape":
        _save_keep_hash(audio, np.zeros((24, 1, 8, 7), np.float32))
        return audio
    if how == "wrong_dtype":
        _save_keep_hash(audio, np.zeros((24, 1, 8, 6), np.float64))
        return audio
    if how == "truncated_npy":
        audio.write_bytes(audio.read_bytes()[:-100])
        return audio
    if how == "truncated_meta":
        meta = root / "meta.json"
        meta.write_text(meta.read_text()[:200])
        return meta
    if how == "labels_out_of_range":
        y = np.load(label)
        y[3] = 99
        _save_keep_hash(label, y)
        return label
    if how == "rows":
        _save_keep_hash(audio, np.load(audio)[:-1])
        return audio
    if how == "missing":
        audio.unlink()
        return audio
    raise ValueError(how)


DAMAGES = ["inverted", "wrong_shape", "wrong_dtype", "truncated_npy", "truncated_meta", "labels_out_of_range",
           "rows", "missing"]
WHAT = {"inverted": "sha256", "wrong_shape": "shape [24, 1, 8, 7]", "wrong_dtype": "dtype <f8",
        "truncated_npy": "truncated", "truncated_meta": "unreadable or truncated",
        "labels_out_of_range": "labels span [0, 99]", "rows": "23 rows", "missing": "missing"}


def _fix_named(msg: str, root: Path) -> None:
    assert f"dvc checkout {root.as_posix()}" in msg and "g2d prepare cremad" in msg


@pytest.mark.parametrize("how", DAMAGES)
def test_damage_is_one_prepared_error_naming_file_and_fix(data, how):
    bad = _damage(data, how)
    with pytest.raises(PreparedError) as err:
        Prepared(data)
    msg = str(err.value)
    assert str(bad) in msg and WHAT[how] in msg, msg
    assert msg.count(str(data)) >= 1 and msg.count(";") >= 1
    _fix_named(msg, data)


def test_the_trainer_refuses_damaged_data_before_training(tmp_path):
    cfg = tiny_config(tmp_path, ["trainer.epochs=1"])
    root = write_tiny_cremad(prepared_dir(cfg, "cremad"))
    bad = _damage(root, "inverted")
    run_dir = tmp_path / "run"
    with pytest.raises(PreparedError, match=str(bad)):
        Trainer(cfg, RunSpec("joint", "cremad", 0, run_dir, root)).fit()
    assert not run_dir.exists()


def test_structure_checks_do_not_need_hashes(data):
    """Wrong shape is caught by the header check even without hashing; inverted bytes only by the hash."""
    _damage(data, "inverted")
    Prepared(data, check="structure")  # cannot see it
    _damage(data, "wrong_shape")
    with pytest.raises(PreparedError, match="shape"):
        Prepared(data, check="structure")


def test_large_data_is_hashed_by_verify_only(tmp_path, monkeypatch, capsys):
    params = tmp_params(tmp_path)
    cfg = tiny_config(tmp_path)
    root = write_tiny_cremad(prepared_dir(cfg, "cremad"))
    monkeypatch.setattr(P, "HASH_CHECK_MAX_BYTES", 0)  # as if the arrays were larger than the threshold
    _damage(root, "inverted")
    Prepared(root)  # opening hashes nothing above the threshold
    capsys.readouterr()
    assert cli.main(["--params", str(params), "verify", "cremad"]) == 1
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{root / 'train' / 'audio.npy'}: sha256 "), lines
    assert "g2d: error:" in cap.err and "1 problem(s)" in cap.err and "g2d prepare cremad" in cap.err


def test_verify_exit_codes(tmp_path, capsys):
    params = tmp_params(tmp_path)
    cfg = tiny_config(tmp_path)
    root = write_tiny_cremad(prepared_dir(cfg, "cremad"))
    assert cli.main(["--params", str(params), "verify", "cremad"]) == 0
    assert "12 arrays match meta.json" in capsys.readouterr().out
    _invert(root / "val" / "visual.npy")
    _damage(root, "rows")
    assert cli.main(["--params", str(params), "verify", "cremad"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2  # one line per problem
    assert any(str(root / "val" / "visual.npy") in x and "sha256" in x for x in out)
    assert any(str(root / "train" / "audio.npy") in x and "23 rows" in x for x in out)
    _damage(root, "truncated_meta")
    assert cli.main(["--params", str(params), "verify", "cremad"]) == 1
    assert "meta.json" in capsys.readouterr().err


def _drop_hashes(root: Path) -> None:
    meta = json.loads((root / "meta.json").read_text())
    del meta["arrays"]
    meta["format_version"] = 1
    (root / "meta.json").write_text(json.dumps(meta))


def test_older_prepared_dirs_without_hashes(tmp_path, capsys):
    params = tmp_params(tmp_path)
    cfg = tiny_config(tmp_path)
    root = write_tiny_cremad(prepared_dir(cfg, "cremad"))
    _drop_hashes(root)
    capsys.readouterr()
    Prepared(root)
    Prepared(root)
    err = capsys.readouterr().err
    assert err.count("records no sha256") == 1 and "g2d prepare cremad" in err  # said once
    np.save(root / "train" / "audio.npy", np.zeros((24, 1, 8, 7), np.float32))
    with pytest.raises(PreparedError, match="shape"):  # what can be checked still is
        Prepared(root)
    write_tiny_cremad(root)
    _drop_hashes(root)
    assert cli.main(["--params", str(params), "verify", "cremad"]) == 1
    assert "records no sha256" in capsys.readouterr().out


def test_write_prepared_records_every_array(data):
    meta = json.loads((data / "meta.json").read_text())
    assert meta["format_version"] == 2
    for split in ("train", "val", "test"):
        for key in ("audio", "visual", "label", "index"):
            rec = meta["arrays"][split][key]
            arr = np.load(data / split / f"{key}.npy")
            assert rec["shape"] == list(arr.shape) and np.dtype(rec["dtype"]) == arr.dtype
            assert rec["sha256"] == P.file_sha256(data / split / f"{key}.npy")


def test_stored_shape_not_input_shape_is_checked(tmp_path):
    """meta `inputs` (model input smaller than the stored frames) does not confuse the stored-array check."""
    from g2d.data.prepared import write_prepared
    from g2d.registry import get_dataset

    rng = np.random.default_rng(0)
    splits = {s: {"audio": rng.standard_normal((n, 1, 8, 6)).astype(np.float32),
                  "visual": rng.integers(0, 256, (n, 3, 1, 18, 24)).astype(np.uint8),
                  "label": np.arange(n) % 6, "index": np.arange(n)} for s, n in (("train", 12), ("val", 6),
                                                                                   ("test", 6))}
    root = write_prepared(tmp_path / "cremad", get_dataset("cremad").spec, splits,
                          {"inputs": {"visual": {"input_shape": [3, 1, 12, 12]}}})
    p = Prepared(root)
    assert p.spec.modality("visual").shape == (3, 1, 12, 12) and p.split("train")["visual"].shape[1:] == (3, 1, 18, 24)
    np.save(root / "train" / "visual.npy", splits["train"]["visual"][:, :, :, :12, :12])  # the input shape
    with pytest.raises(PreparedError, match=r"shape \[12, 3, 1, 12, 12\], meta.json says \[12, 3, 1, 18, 24\]"):
        Prepared(root)
