"""Issue 12 section 4: one clear line for every user error.

Every case runs `g2d ...` on a fresh temp project (params.yaml with every path inside it, a tiny prepared
CREMA-D) and must give the documented exit code (2: configuration, 1: data / runtime / I/O; see `g2d --help`),
exactly one stderr line starting with `g2d: error:`, no traceback, and nothing written or changed anywhere in
the project (paths.runs included). The cases run `g2d.cli.main` in-process (torch is imported once);
`test_real_cli` runs a few of them as real subprocesses for the process exit code and the terminal output.
`origin` says what the case did before the fix (issue 12's count): issue-traceback, issue-accepted, clear
(already a clear line), new (a check the issue did not list) or io (file-system and data errors).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import io
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from g2d.cli import main
from tests.helpers import ROOT, TINY_MODEL, write_tiny_cremad

BASE = [*TINY_MODEL, "trainer.progress=off", "trainer.epochs=1", "trainer.device=cpu"]
PLACEHOLDER = "@@ROOT@@"


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...] = ()  # overrides after `train BASE...`; "{root}" = the project folder
    code: int = 2  # the documented exit code
    origin: str = "new"
    cmd: tuple[str, ...] | None = None  # another command line (after `--params P`), "{root}" formatted
    params: str | None = None  # --params value instead of the project's params.yaml
    edit: Callable[[str], str | bytes] | None = None  # params.yaml text -> new text (or bytes)
    setup: Callable[[Path], None] | None = None  # files the case needs, created before the snapshot
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None  # a simulated environment failure
    env: dict = field(default_factory=dict)
    skip: Callable[[], str | None] | None = None
    midrun: bool = False  # a failure while training: the run's scratch folder may already exist


def _sub(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    return edit


def _no_cuda_skip() -> str | None:
    import torch

    return "a CUDA device is visible: trainer.device=cuda is valid here" if torch.cuda.is_available() else None


def _root_skip() -> str | None:
    return "runs as root: chmod does not stop root's writes (see read-only-simulated)" if os.geteuid() == 0 else None


def _runs_file(root: Path) -> None:
    (root / "runs_file").write_text("not a folder\n")


def _read_only(root: Path) -> None:
    (root / "ro").mkdir()
    (root / "ro").chmod(0o555)


def _bad_splits(root: Path) -> None:
    d = root / "splits"
    d.mkdir()
    for name in ("cremad_train.csv", "cremad_test.csv"):
        (d / name).write_bytes(b"1001_DFA_ANG_XX,ANG\n1002_caf\xe9_SAD_XX,SAD\n")  # Latin-1, not UTF-8


def _raise_in_fit(exc: Callable[[Path], BaseException]):
    def patch(mp: pytest.MonkeyPatch, root: Path) -> None:
        def fit(self):
            raise exc(root)

        mp.setattr("g2d.train.trainer.Trainer.fit", fit)

    return patch


def _oserror(code: int) -> Callable[[Path], OSError]:
    return lambda root: OSError(code, os.strerror(code), str(root / "data" / "runs" / "joint-cremad" / "s0" / "history.csv"))


def _nonfinite(root: Path) -> BaseException:
    from g2d.methods.base import NonFiniteLoss

    return NonFiniteLoss("non-finite loss at epoch 0 step 3: terms {'task': nan}; training stopped "
                         "(lower trainer.lr, enable trainer.grad_clip, or check the prepared data)")


T, A, K, IO = "issue-traceback", "issue-accepted", "clear", "io"
CASES = [
    # ---- issue 12: tracebacks -------------------------------------------------------------------------------
    Case("epochs=0", ("trainer.epochs=0",), origin=T),
    Case("epochs=-3", ("trainer.epochs=-3",), origin=T),
    Case("lr=-0.1", ("trainer.lr=-0.1",), origin=T),
    Case("lr=1e30", ("trainer.lr=1e30",), origin=T),
    Case("lr=nan", ("trainer.lr=nan",), origin=T),
    Case("batch_size=0", ("trainer.batch_size=0",), origin=T),
    Case("momentum=-1", ("trainer.momentum=-1",), origin=T),
    Case("device=cuda-without-gpu", ("trainer.device=cuda",), origin=T, skip=_no_cuda_skip),
    Case("device=tpu", ("trainer.device=tpu",), origin=T),
    Case("fusion=bogus", ("model.fusion=bogus",), origin=T),
    Case("resnet.width=0", ("model.resnet.width=0",), origin=T),
    Case("temperature=0", ("method=g2d", "++methods.g2d.temperature=0"), origin=T),
    Case("yaml-syntax-error", edit=_sub("  epochs: 20\n", "  epochs: 20: 3\n"), origin=T),
    Case("yaml-tab-indent", edit=_sub("  epochs: 20\n", "\tepochs: 20\n"), origin=T),
    Case("yaml-duplicate-key", edit=_sub("  epochs: 20\n", "  epochs: 20\n  epochs: 3\n"), origin=T),
    # ---- issue 12: silently accepted ------------------------------------------------------------------------
    Case("batch_size=-4", ("trainer.batch_size=-4",), origin=A),
    Case("paths.runs=empty", ("paths.runs=",), origin=A),
    Case("lr=0", ("trainer.lr=0",), origin=A),
    Case("progress=maybe", ("trainer.progress=maybe",), origin=A),
    Case("checkpoint_every=-1", ("trainer.checkpoint_every=-1",), origin=A),
    Case("seed=-1", ("seed=-1",), origin=A),
    Case("data_source=bogus", ("data_source=bogus",), origin=A),
    Case("prepare-only-key-to-train", ("+datasets.cremad.real.split=mla",), origin=A),
    # ---- already one clear line before the fix (must stay so) -----------------------------------------------
    Case("method=nope", ("method=nope",), origin=K),
    Case("dataset=nope", ("dataset=nope",), origin=K),
    Case("unknown-key", ("trainer.epochz=3",), origin=K),
    Case("wrong-type", ("trainer.epochs=abc",), origin=K),
    Case("bool-type", ("trainer.amp=maybe",), origin=K),
    Case("profile=fast", ("profile=fast",), origin=K),
    Case("select=best", ("trainer.select=best",), origin=K),
    Case("override-grammar", ("trainer.epochs=[1",), origin=K),
    Case("method-block-typo", ("++methods.joint.bogus=1",), origin=K),
    Case("augment-recipe", ("++datasets.cremad.augment.visual.recipe=bogus",), origin=K),
    Case("params-missing", params="{root}/nope.yaml", origin=K),
    Case("group=nope", cmd=("train", "--group", "nope", *BASE), origin=K),
    Case("teacher-modality", cmd=("teacher", "--modality", "smell", "cremad", *BASE), origin=K),
    # ---- the rest of the check table (g2d/config_checks.py CHECKS) and the methods' own checks ---------------------
    Case("eval_batch_size=0", ("trainer.eval_batch_size=0",)),
    Case("optimizer=rmsprop", ("trainer.optimizer=rmsprop",)),
    Case("momentum=1", ("trainer.momentum=1",)),
    Case("weight_decay=-1", ("trainer.weight_decay=-1",)),
    Case("lr_step_epochs=-1", ("trainer.lr_step_epochs=-1",)),
    Case("lr_gamma=0", ("trainer.lr_gamma=0",)),
    Case("lr_gamma=1.5", ("trainer.lr_gamma=1.5",)),
    Case("device=cuda:x", ("trainer.device=cuda:x",)),
    Case("num_threads=-1", ("trainer.num_threads=-1",)),
    Case("grad_clip=-1", ("trainer.grad_clip=-1",)),
    Case("grad_clip=nan", ("trainer.grad_clip=nan",)),
    Case("workers=-1", ("++workers=-1",)),
    Case("suite.seeds=[]", ("suite.seeds=[]",)),
    Case("suite.seeds=[-1]", ("suite.seeds=[-1]",)),
    Case("suite.seeds=[0,0]", ("suite.seeds=[0,0]",)),
    Case("paths.raw=empty", ("paths.raw=",)),
    Case("paths.prepared=empty", ("paths.prepared=",)),
    Case("paths.reports=empty", ("paths.reports=",)),
    Case("resnet.blocks=[]", ("model.resnet.blocks=[]",)),
    Case("resnet.blocks=[1,0]", ("model.resnet.blocks=[1,0]",)),
    Case("resnet.stem=big", ("model.resnet.stem=big",)),
    Case("mlp_hidden=0", ("model.mlp_hidden=0",)),
    Case("mlp_layers=0", ("model.mlp_layers=0",)),
    Case("seq_hidden=0", ("model.seq_hidden=0",)),
    Case("fusion_dim=0", ("model.fusion_dim=0",)),
    Case("dataset-trainer-lr", ("++datasets.cremad.trainer.lr=-1",)),
    Case("dataset-trainer-typo", ("++datasets.cremad.trainer.lrr=1",)),
    Case("profile-value", ("profile=ci", "++profiles.ci.trainer.epochs=0")),
    Case("temperatures.audio=-1", ("method=g2d", "++methods.g2d.temperatures.audio=-1")),
    Case("smp-phases", ("method=g2d", "++methods.g2d.smp_phases=[0.3,0.3]")),
    Case("unimodal-modality", ("method=unimodal", "methods.unimodal.modality=smell")),
    Case("standin-key-to-train", ("+datasets.cremad.standin.n_train=50",)),
    Case("real-option-typo", cmd=("prepare", "cremad", "+datasets.cremad.real.bogus=1")),
    Case("real-option-value", cmd=("prepare", "cremad", "datasets.urfunny.real.seq_len=0")),
    # ---- file system and data ---------------------------------------------------------------------------------
    Case("runs-is-a-file", ("paths.runs={root}/runs_file",), code=1, origin=IO, setup=_runs_file),
    Case("runs-under-a-file", ("paths.runs={root}/runs_file/runs",), code=1, origin=IO, setup=_runs_file),
    Case("read-only-folder", ("paths.runs={root}/ro/runs",), code=1, origin=IO, setup=_read_only, skip=_root_skip),
    Case("read-only-simulated", code=1, midrun=True, origin=IO, patch=_raise_in_fit(_oserror(errno.EROFS))),
    Case("disk-full-simulated", code=1, midrun=True, origin=IO, patch=_raise_in_fit(_oserror(errno.ENOSPC))),
    Case("disk-full-dev-full", cmd=("list",), code=1, origin=IO, env={"G2D_TIMING_LOG": "/dev/full"},
         skip=lambda: None if os.path.exists("/dev/full") else "no /dev/full"),
    Case("params-not-utf8", edit=lambda t: t.encode() + b"# caf\xe9 (Latin-1)\n", origin=IO),
    Case("params-is-a-folder", params="{root}/data", origin=IO),
    Case("split-files-not-utf8", cmd=("prepare", "cremad", "data_source=real",
                                      "+datasets.cremad.real.split_dir={root}/splits"),
         code=1, origin=IO, setup=_bad_splits),
    Case("prepared-missing", ("paths.prepared={root}/nowhere",), code=1, origin=IO),
    Case("prepared-meta-corrupt", code=1, origin=IO,
         setup=lambda root: (root / "data" / "prepared" / "cremad" / "meta.json").write_text("{truncated")),
    Case("teachers-missing", ("method=g2d",), code=1, origin=IO),
    Case("nan-loss-simulated", code=1, midrun=True, origin=IO, patch=_raise_in_fit(_nonfinite)),
]


# ---------------------------------------------------------------------------------------------------- runner
@functools.cache
def _params_template() -> str:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"] = {k: f"{PLACEHOLDER}/{v}" for k, v in params["paths"].items()}
    return yaml.safe_dump(params, sort_keys=False)


def make_project(root: Path) -> Path:
    """A temp project: params.yaml (every path inside `root`) and a tiny prepared stand-in CREMA-D."""
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_cremad(root / "data" / "prepared" / "cremad")
    p = root / "params.yaml"
    p.write_text(_params_template().replace(PLACEHOLDER, str(root)))
    return p


def prepare_case(case: Case, root: Path) -> list[str]:
    """Create the case's project; return its argv (after `g2d`)."""
    params = make_project(root)
    if case.edit:
        new = case.edit(params.read_text())
        params.write_bytes(new if isinstance(new, bytes) else new.encode())
    if case.setup:
        case.setup(root)
    fmt = [a.replace("{root}", str(root)) for a in (case.cmd or ("train", *BASE, *case.args))]
    return ["--params", (case.params or str(params)).replace("{root}", str(root)), *fmt]


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in root.rglob("*"):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def changes(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@dataclass
class Outcome:
    rc: int | None
    out: str
    err: str
    exc: BaseException | None
    written: list[str]

    @property
    def kind(self) -> str:
        """clear (one `g2d: error:` line, non-zero exit) | traceback | accepted (exit 0) | unclear."""
        if self.exc is not None or "Traceback" in self.err:
            return "traceback"
        if self.rc == 0:
            return "accepted"
        lines = self.err.strip().splitlines()
        return "clear" if len(lines) == 1 and lines[0].startswith("g2d: error: ") else "unclear"


def run_case(case: Case, root: Path, mp: pytest.MonkeyPatch) -> Outcome:
    argv = prepare_case(case, root)
    if case.patch:
        case.patch(mp, root)
    for k, v in case.env.items():
        mp.setenv(k, v.replace("{root}", str(root)))
    mp.chdir(root)  # relative paths (paths.runs=) land inside the project
    before = snapshot(root)
    out, err = io.StringIO(), io.StringIO()
    exc = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except Exception as e:  # noqa: BLE001 - what a user would see as a traceback
            rc, exc = None, e
    return Outcome(rc, out.getvalue(), err.getvalue(), exc, changes(before, snapshot(root)))


# ----------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_param(case: Case, tmp_path, monkeypatch):
    why = case.skip() if case.skip else None
    if why:
        pytest.skip(why)
    o = run_case(case, tmp_path / "proj", monkeypatch)
    if o.exc is not None:
        raise o.exc  # the traceback a user would have seen
    assert o.kind == "clear", f"{o.kind}: rc={o.rc}\n{o.err}"
    assert o.rc == case.code, o.err
    if case.midrun:  # failed inside training: only run folders under the scratch/run roots may exist
        assert all(str(p).split("/")[:2] in (["data"], ["data", "runs"], ["data", "cache"]) for p in o.written), o.written
    else:
        assert not o.written, f"written: {o.written}"


def test_messages_name_key_and_fix(tmp_path, monkeypatch):
    """The line names the params file, the key, the value and what is allowed."""
    o = run_case(CASES[0], tmp_path / "p0", monkeypatch)
    assert o.err.startswith(f"g2d: error: {tmp_path / 'p0' / 'params.yaml'}: trainer.epochs=0 "), o.err
    assert "integer >= 1" in o.err and "command line" in o.err
    dup = next(c for c in CASES if c.id == "yaml-duplicate-key")
    o = run_case(dup, tmp_path / "p1", monkeypatch)
    assert "params.yaml:" in o.err and "duplicate key 'epochs'" in o.err, o.err
    tab = next(c for c in CASES if c.id == "yaml-tab-indent")
    o = run_case(tab, tmp_path / "p2", monkeypatch)
    assert "tab" in o.err, o.err
    split = next(c for c in CASES if c.id == "split-files-not-utf8")
    o = run_case(split, tmp_path / "p3", monkeypatch)
    assert "cremad_train.csv" in o.err and "UTF-8" in o.err, o.err


def test_debug_shows_traceback(tmp_path, monkeypatch):
    """`--debug` (or G2D_DEBUG=1) prints the traceback, then the same one line and exit code."""
    argv = prepare_case(CASES[0], tmp_path / "proj")
    for before, after, env in ((["--debug"], [], None), ([], ["--debug"], None), ([], [], "1")):
        if env:
            monkeypatch.setenv("G2D_DEBUG", env)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main([*before, *argv, *after])
        lines = err.getvalue().strip().splitlines()
        assert rc == 2 and lines[0].startswith("Traceback") and lines[-1].startswith("g2d: error: "), err.getvalue()


def test_every_schema_field_is_checked():
    """Each field of the typed schema has a rule in CHECKS or is listed as checked elsewhere."""
    from g2d import config as C

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            sub = f.type if isinstance(f.type, type) else getattr(C, str(f.type), None)
            if dataclasses.is_dataclass(sub):
                yield from leaves(sub, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    keys = set(leaves(C.Schema))
    from g2d.config_checks import CHECKED_ELSEWHERE, CHECKS

    missing = keys - set(CHECKS) - set(CHECKED_ELSEWHERE)
    assert not missing, f"fields without a check: {sorted(missing)}"
    assert not (set(CHECKS) | set(CHECKED_ELSEWHERE)) - keys, "rules for keys the schema does not have"


SUBPROCESS = ("epochs=0", "yaml-duplicate-key", "runs-is-a-file")


def test_real_cli(tmp_path):
    """The real `python -m g2d.cli` (run in parallel): exit code, one stderr line, no traceback, nothing
    written; with G2D_DEBUG=1 the traceback comes first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("G2D_DEBUG", None)
    runs = []
    for cid in SUBPROCESS:
        case = next(c for c in CASES if c.id == cid)
        root = tmp_path / cid
        argv = prepare_case(case, root)
        runs.append((case, root, snapshot(root), {}, argv))
    debug_root = tmp_path / "debug"
    runs.append((CASES[0], debug_root, None, {"G2D_DEBUG": "1"}, prepare_case(CASES[0], debug_root)))
    procs = [(case, root, snap, extra, subprocess.Popen([sys.executable, "-m", "g2d.cli", *argv], cwd=root,
                                                         env={**env, **extra}, stdout=subprocess.PIPE,
                                                         stderr=subprocess.PIPE, text=True))
             for case, root, snap, extra, argv in runs]
    for case, root, snap, extra, p in procs:
        out, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == case.code, (case.id, err)
        assert lines and lines[-1].startswith("g2d: error: "), (case.id, err)
        if extra:
            assert lines[0].startswith("Traceback"), err
        else:
            assert len(lines) == 1 and "Traceback" not in err, (case.id, err)
            assert not changes(snap, snapshot(root)), case.id
