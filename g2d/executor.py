"""Training runs on a SLURM cluster through submitit (`executor.kind: slurm`), one job-array task per run.

`executor.kind: submitit-local` takes the same code path with submitit's LocalExecutor (every run a local
subprocess): how the tests exercise it, and a dry run of a cluster config on a workstation.

Why submitit: it is the engine Hydra's own SLURM launcher uses; it writes the sbatch array, pickles each task,
requeues a preempted or timed-out task (`Checkpointable.checkpoint`) and returns results or remote tracebacks.
What a task runs is exactly a local pool worker's job (`g2d.runs._run_job`): same seeds, same scratch folder,
same resume from the run's checkpoint, same published files, so results do not depend on the executor.
Rerunning a stage submits only the runs without a finished run of the same fingerprint (checked here first).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from pathlib import Path

from g2d import config as C

KINDS = ("local", "slurm", "submitit-local")


def _submitit():
    try:
        import submitit
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise RuntimeError("executor.kind needs the submitit package: pip install submitit") from e
    return submitit


class RunTask:
    """One run as a submitit task. `checkpoint` (called by submitit on preemption or timeout) resubmits the same
    task; the trainer then resumes from the run's own checkpoint (trainer.checkpoint_every)."""

    def __init__(self, cfg: C.Schema, job, threads: int):
        self.cfg, self.job, self.threads = cfg, job, threads

    def __call__(self) -> dict:
        import torch

        from g2d.runs import _run_job

        torch.set_num_threads(self.threads)
        cfg = dataclasses.replace(self.cfg, trainer=dataclasses.replace(self.cfg.trainer, progress="off"))
        return _run_job(cfg, self.job)

    def checkpoint(self, *args, **kwargs):
        submitit = _submitit()
        return submitit.helpers.DelayedSubmission(RunTask(self.cfg, self.job, self.threads))


def make_executor(cfg: C.Schema, folder: Path):
    """submitit executor for cfg.executor (parameters named as in params.yaml's `executor.slurm`)."""
    submitit = _submitit()
    s = cfg.executor.slurm
    if cfg.executor.kind == "submitit-local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=s.max_requeue)
        ex.update_parameters(timeout_min=s.timeout_min)
        return ex
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=s.max_requeue)
    except RuntimeError as e:  # submitit: 'Could not detect "srun"'
        raise RuntimeError(f"executor.kind=slurm but this machine has no SLURM ({e}): run from a cluster login "
                           "node, or set executor.kind=local (or submitit-local) in params.yaml") from None
    params = {"timeout_min": s.timeout_min, "cpus_per_task": s.cpus_per_job, "mem_gb": s.mem_gb,
              "slurm_array_parallelism": s.array_parallelism, "name": "g2d"}
    if s.gpus_per_job:
        params["gpus_per_node"] = s.gpus_per_job
    if s.partition:
        params["slurm_partition"] = s.partition
    if s.sbatch:
        params["slurm_additional_parameters"] = dict(s.sbatch)
    ex.update_parameters(**params)
    return ex


def finished(cfg: C.Schema, job) -> dict | None:
    """The job's result when its run folder (scratch or output) already holds a finished run of this config,
    else None: such a run is not submitted again."""
    from g2d.runs import KEPT, _run_job

    if not ((job.work_dir / "metrics.json").is_file() or (job.run_dir / "metrics.json").is_file()) or job.force:
        return None
    from g2d.runs import _seed_scratch, prepared_dir, run_name, summary_name
    from g2d.train.trainer import RunSpec, Trainer

    _seed_scratch(job.work_dir, job.run_dir)
    spec = RunSpec(job.method, job.dataset, job.seed, job.work_dir, prepared_dir(cfg, job.dataset),
                   Path(cfg.paths.runs))
    c = cfg
    if job.modality:
        block = {**(cfg.methods.get("unimodal") or {}), "modality": job.modality}
        c = dataclasses.replace(cfg, methods={**cfg.methods, "unimodal": block})
    if Trainer(c, spec)._completed() is None:
        return None
    res = _run_job(cfg, job)  # verifies, publishes, returns the kept result without training
    res["run"] = summary_name(run_name(job.method, job.dataset, job.modality))
    res.setdefault(KEPT, True)
    return res


def _tail(text: str | None, n: int = 15) -> str:
    lines = (text or "").rstrip().splitlines()
    return "\n".join("    " + ln for ln in lines[-n:]) or "    (empty)"


def _left_queue(h, gone: dict, polls: int = 3) -> bool:
    """True once a job is neither in `squeue` nor has a result for `polls` polls in a row. submitit reads job
    states from sacct; where accounting is disabled a killed job would otherwise be waited for forever."""
    import subprocess

    if (h.state or "").upper() not in ("UNKNOWN", "PENDING", "RUNNING", "REQUEUED", ""):
        return False
    out = subprocess.run(["squeue", "-h", "-j", str(h.job_id), "-o", "%T"], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        gone.pop(h.job_id, None)
        return False
    if h.paths.result_pickle.exists():
        return False
    gone[h.job_id] = gone.get(h.job_id, 0) + 1
    return gone[h.job_id] >= polls


def submit(cfg: C.Schema, todo: list, progress, flag: dict | None = None) -> list[dict]:
    """Train `todo` (g2d.runs.Job list) through submitit; results in job order. Shows queued / running / done /
    failed counts while waiting; a failed run's stderr tail is printed with its run folder, the other runs still
    finish, then the first failure is raised."""
    from g2d.runs import KEPT, run_name

    s = cfg.executor.slurm
    done: dict[int, dict] = {}
    for i, j in enumerate(todo):
        res = finished(cfg, j)
        if res is not None:
            done[i] = res
            progress.run_done(run_name(j.method, j.dataset, j.modality), j.seed, res, True)
    pending = [i for i in range(len(todo)) if i not in done]
    if not pending:
        return [done[i] for i in range(len(todo))]
    folder = Path(s.log_dir) / "%j"
    ex = make_executor(cfg, folder)
    threads = max(1, s.cpus_per_job)
    with ex.batch():
        handles = {i: ex.submit(RunTask(cfg, todo[i], threads)) for i in pending}
    print(f"[g2d] {cfg.executor.kind}: submitted {len(handles)} runs ({len(done)} already finished); "
          f"logs in {s.log_dir}/<job id>", file=sys.stderr, flush=True)
    failures: list[tuple[int, BaseException]] = []
    last = None
    flag = flag if flag is not None else {"signum": None}
    kind, gone = cfg.executor.kind, {}
    while handles:
        if flag["signum"] is not None:  # Ctrl-C / SIGTERM: cancel what is queued or running (checkpoints stay)
            from g2d.runs import Interrupted

            for h in handles.values():
                h.cancel(check=False)
            raise Interrupted(flag["signum"], len(done), len(todo) - len(done))
        states = Counter()
        for i, h in list(handles.items()):
            if h.done():
                del handles[i]
                try:
                    res = h.result()
                except Exception as e:  # noqa: BLE001 - reported with its run, raised below
                    failures.append((i, e))
                    j = todo[i]
                    print(f"[g2d] {j.run_dir} failed (job {h.job_id}): {type(e).__name__}; stderr tail:\n"
                          f"{_tail(h.stderr())}", file=sys.stderr, flush=True)
                    continue
                done[i] = res
                j = todo[i]
                progress.run_done(run_name(j.method, j.dataset, j.modality), j.seed, res, res.get(KEPT, False))
            elif kind == "slurm" and _left_queue(h, gone):
                failures.append((i, RuntimeError("the job left the SLURM queue without a result (killed, cancelled "
                                                 "or its node failed; sacct gave no final state)")))
                del handles[i]
                print(f"[g2d] {todo[i].run_dir} failed (job {h.job_id}): it left the queue without a result; "
                      f"stderr tail:\n{_tail(h.stderr())}", file=sys.stderr, flush=True)
            else:
                st = (h.state or "UNKNOWN").upper()
                states["running" if st.startswith("RUNNING") else "queued"] += 1
        line = (f"[g2d] {cfg.executor.kind}: {states['queued']} queued, {states['running']} running, "
                f"{len(done)} done, {len(failures)} failed (of {len(todo)})")
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line
        if handles:
            time.sleep(s.poll_s if cfg.executor.kind == "slurm" else min(s.poll_s, 0.5))
    if failures:
        i, e = min(failures, key=lambda f: f[0])  # the first in job order
        raise RuntimeError(f"{len(failures)} of {len(todo)} runs failed; first: {todo[i].run_dir}: {e}") from e
    return [done[i] for i in range(len(todo))]
