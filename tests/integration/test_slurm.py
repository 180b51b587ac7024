"""A real single-node SLURM (Debian's slurm-wlm + munge, configured for this host by .ci/slurm_localhost.sh,
started and stopped here): `dvc repro` of the CI profile with `executor.kind: slurm` gives the local run's
summaries byte for byte, and a job cancelled mid-run (`scancel`) is resubmitted by the rerun and resumes from
its checkpoint. Slow (minutes) and needs the packages: `bash .ci/slurm_localhost.sh install` (root or sudo)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipeline_project import ROOT, make_project, run

pytestmark = pytest.mark.slow
SCRIPT = ROOT / ".ci" / "slurm_localhost.sh"
SLURM = {"kind": "slurm", "slurm": {"partition": "", "gpus_per_job": 0, "cpus_per_job": 1, "mem_gb": 1,
                                    "timeout_min": 30, "array_parallelism": 8, "max_requeue": 3, "poll_s": 1.0,
                                    "log_dir": "data/slurm", "sbatch": {}}}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not (shutil.which("slurmctld") and shutil.which("munged")):
        pytest.skip("SLURM is not installed here: bash .ci/slurm_localhost.sh install")
    state = tmp_path_factory.mktemp("slurm")
    res = subprocess.run(["bash", str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    conf = str(state / "slurm.conf")
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", conf)
    yield conf
    subprocess.run(["bash", str(SCRIPT), "stop", str(state)], timeout=60)
    mp.undo()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dvc_repro_with_slurm_executor_equals_local(slurm, ci_project, tmp_path):
    proj = make_project(tmp_path / "proj", edit=lambda p: p.update(executor=SLURM))
    t0 = time.monotonic()
    res = run([sys.executable, "-m", "dvc", "repro", "-q"], proj)
    wall = time.monotonic() - t0
    assert "slurm: submitted" in res.stderr, res.stderr[-3000:]
    local, remote = _tree(ci_project / "reports" / "runs"), _tree(proj / "reports" / "runs")
    assert local and remote == local
    print(f"dvc repro on SLURM: {wall:.0f}s, {len(remote)} summary files identical to the local run's")


def _squeue_running() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True).stdout
    return [x for x in out.split() if x]


def test_scancelled_job_is_resubmitted_and_resumes(slurm, ci_project, tmp_path):
    proj = ci_project
    cmd = [str(Path(sys.executable).parent / "g2d"), "train", "method=joint", "dataset=cremad", "seed=7",
           "+datasets.cremad.trainer.epochs=400", "trainer.checkpoint_every=1", f"paths.runs={tmp_path / 'runs'}",
           *(f"executor.slurm.{k}={v}" for k, v in SLURM["slurm"].items() if k not in ("sbatch", "partition")),
           "executor.kind=slurm", f"executor.slurm.log_dir={tmp_path / 'logs'}"]
    run_dir = tmp_path / "runs" / "joint-cremad" / "s7"
    env_run = dict(cwd=proj)
    p = subprocess.Popen(cmd, **env_run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(proj), "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (run_dir / "ckpt.pt").is_file():
        time.sleep(0.5)
    assert (run_dir / "ckpt.pt").is_file(), "the job never wrote a checkpoint"
    jobs = _squeue_running()
    assert len(jobs) == 1, jobs
    subprocess.run(["scancel", "--full", "--signal=KILL", jobs[0]], check=True)  # killed, not asked to stop
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0 and "failed (job" in err and "1 of 1 runs failed" in err, err[-3000:]
    assert not (run_dir / "metrics.json").exists()
    # the rerun submits the unfinished run again; the trainer resumes from its checkpoint
    res = run(cmd, proj)
    assert "submitted 1 runs (0 already finished)" in res.stderr, res.stderr[-3000:]
    logs = "".join(f.read_text() for f in (tmp_path / "logs").rglob("*.err"))
    assert f"resuming {run_dir}" in logs, logs[-3000:]
    # same metrics as an uninterrupted local run of the same config
    # (a pool worker and a SLURM task both train with trainer.progress=off, part of the run's fingerprint)
    local = [c for c in cmd if not c.startswith(("executor.", "paths.runs="))] + [
        f"paths.runs={tmp_path / 'local'}", "trainer.progress=off"]
    run(local, proj)
    a = json.loads((run_dir / "metrics.json").read_text())
    b = json.loads((tmp_path / "local" / "joint-cremad" / "s7" / "metrics.json").read_text())
    assert a["selection"] == b["selection"] and a["params_hash"] == b["params_hash"]
