"""executor.kind=submitit-local: the SLURM code path (g2d/executor.py, submitit job submission, polling, result
collection, requeue) through submitit's LocalExecutor. Results must equal the local pool's byte for byte."""
from __future__ import annotations

import shutil

import pytest

from g2d.executor import RunTask, make_executor
from g2d.runs import prepared_dir, train_many
from tests.helpers import tiny_config, write_tiny_cremad

BASE = ["trainer.epochs=2", "trainer.batch_size=8", "trainer.device=cpu", "trainer.checkpoint_every=1",
        "trainer.num_threads=1"]
SEEDS = [0, 1]


def _cfg(tmp_path, kind: str, extra=()):
    return tiny_config(tmp_path, [*BASE, f"executor.kind={kind}", "executor.slurm.cpus_per_job=1",
                                  f"executor.slurm.log_dir={tmp_path / 'slurm'}", "executor.slurm.poll_s=0.2",
                                  *extra])


def _train(cfg, root, pairs=(("joint", "cremad", None),)):
    return train_many(cfg, list(pairs), SEEDS, summary_dir=root / "summaries", runs_dir=root / "runs")


def _summaries(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "summaries").glob("*"))}


def test_submitit_local_equals_local_pool_and_reruns_only_unfinished(tmp_path, capfd):
    local = _cfg(tmp_path, "local", ["workers=1"])
    write_tiny_cremad(prepared_dir(local, "cremad"))
    _train(local, tmp_path / "a")
    capfd.readouterr()
    sub = _cfg(tmp_path, "submitit-local")
    _train(sub, tmp_path / "b")
    err = capfd.readouterr().err
    assert "submitit-local: submitted 2 runs (0 already finished)" in err, err
    assert "0 queued, 0 running, 2 done, 0 failed (of 2)" in err, err
    a, b = _summaries(tmp_path / "a"), _summaries(tmp_path / "b")
    assert len(a) == 2 and a == b  # the summary .json and .csv
    assert list((tmp_path / "slurm").iterdir())  # submitit wrote its per-job folders there
    # a rerun after a crash: only the run without a finished metrics.json is submitted again
    victim = tmp_path / "b" / "runs" / "joint-cremad" / "s1"
    shutil.rmtree(victim)
    _train(sub, tmp_path / "b")
    err = capfd.readouterr().err
    assert "submitted 1 runs (1 already finished)" in err, err
    assert (victim / "metrics.json").is_file() and _summaries(tmp_path / "b") == a


def test_failed_job_names_its_run_and_shows_stderr(tmp_path, capfd):
    cfg = _cfg(tmp_path, "submitit-local")  # no prepared data: the job (not the parent) fails
    with pytest.raises(RuntimeError, match=r"2 of 2 runs failed; first: \S*joint-cremad/s0"):
        _train(cfg, tmp_path / "f")
    err = capfd.readouterr().err
    assert "joint-cremad/s0 failed (job " in err and "stderr tail:" in err, err
    assert "meta.json not found: prepare the dataset first" in err, err
    assert "0 queued, 0 running, 0 done, 2 failed (of 2)" in err, err


def test_checkpoint_requeues_the_same_run(tmp_path):
    """submitit calls `checkpoint` on preemption / timeout: the same run is resubmitted (it resumes from its
    own checkpoint, which the trainer's resume tests cover)."""
    import submitit

    cfg = _cfg(tmp_path, "submitit-local")
    from g2d.runs import Job

    job = Job("joint", "cremad", 0, None, tmp_path / "runs")
    again = RunTask(cfg, job, 1).checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, RunTask) and again.function.job == job and again.function.cfg == cfg


def test_slurm_parameters_reach_submitit(tmp_path, monkeypatch):
    import submitit

    cfg = _cfg(tmp_path, "slurm", ["executor.slurm.partition=gpu", "executor.slurm.gpus_per_job=2",
                                   "executor.slurm.mem_gb=32", "+executor.slurm.sbatch.account=lab"])
    if submitit.SlurmExecutor.affinity() <= 0:
        with pytest.raises(RuntimeError, match=r"executor.kind=slurm but this machine has no SLURM .*executor.kind=local"):
            make_executor(cfg, tmp_path / "slurm" / "%j")
        monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # pretend: a login node
    ex = make_executor(cfg, tmp_path / "slurm" / "%j")
    p = ex._executor.parameters
    assert (p["partition"], p["gpus_per_node"], p["mem"], p["cpus_per_task"]) == ("gpu", 2, "32GB", 1)
    assert p["additional_parameters"] == {"account": "lab"} and p["time"] == 240
    assert ex._executor.max_num_timeout == 3
