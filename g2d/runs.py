"""Run naming and the drivers that train many runs from one process (torch is imported once)."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from g2d import config as C
from g2d.data.prepared import atomic_write_text


def run_name(method: str, dataset: str, modality: str | None = None) -> str:
    """Group name = DVC stage key: `<method>-<dataset>`, teachers `teachers/<dataset>/<modality>`."""
    return f"teachers/{dataset}/{modality}" if modality else f"{method}-{dataset}"


def summary_name(name: str) -> str:
    return name.replace("teachers/", "teacher-").replace("/", "-")


def base_dataset(dataset: str) -> str:
    """A view (e.g. urfunny-av) reads its parent's prepared data and teachers."""
    from g2d import registry

    return registry.get_dataset(dataset).view_of or dataset


def prepared_dir(cfg: C.Schema, dataset: str) -> Path:
    """Prepared arrays of a dataset (meta.json records whether they are a stand-in or real)."""
    return Path(cfg.paths.prepared) / base_dataset(dataset)


@dataclass(frozen=True)
class Job:
    method: str
    dataset: str
    seed: int
    modality: str | None
    runs_dir: Path


def _run_job(cfg: C.Schema, job: Job) -> dict:
    from g2d.train.trainer import RunSpec, Trainer

    name = run_name(job.method, job.dataset, job.modality)
    run_dir = Path(job.runs_dir) / name / f"s{job.seed}"
    if job.modality:  # a teacher: its modality is the unimodal method's parameter
        block = {**(cfg.methods.get("unimodal") or {}), "modality": job.modality}
        cfg = dataclasses.replace(cfg, methods={**cfg.methods, "unimodal": block})
    res = Trainer(cfg, RunSpec(job.method, job.dataset, job.seed, run_dir, prepared_dir(cfg, job.dataset),
                               Path(cfg.paths.runs))).fit()
    res["run"] = summary_name(name)
    res["run_dir"] = run_dir.as_posix()
    sel, key = res["selection"]["best_val"], res["primary_metric"]
    print(f"[g2d] {name} seed {job.seed}: test {key} {sel['test'][key]:.2f} (best-val epoch {sel['epoch']}), "
          f"{res['train_time_s']:.1f}s", flush=True)
    return res


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def n_workers(cfg: C.Schema, n_jobs: int) -> int:
    """Parallel training processes: `workers` (0 = one per CPU core), never on CUDA (fork + CUDA)."""
    from g2d.train.seeding import resolve_device

    if resolve_device(cfg.trainer.device).type != "cpu":
        return 1
    want = cfg.workers or (os.cpu_count() or 1)
    return max(1, min(want, n_jobs))


def run_jobs(cfg: C.Schema, jobs: list[Job]) -> list[dict]:
    """Train every job; on CPU the runs go to a fork pool (torch is imported once, runs are independent
    and seeded, so results equal a sequential run's). Results come back in job order."""
    workers = n_workers(cfg, len(jobs))
    if workers <= 1:
        return [_run_job(cfg, j) for j in jobs]
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(_run_job, cfg, j) for j in jobs]
        return [f.result() for f in futures]


def write_summary(summary_dir: Path, results: list[dict], method: str, dataset: str,
                  modality: str | None) -> None:
    """The committed per-(method, dataset) files: metrics of every seed (json) and histories (csv)."""
    summary_dir = Path(summary_dir)
    summary_dir.mkdir(parents=True, exist_ok=True)
    name = summary_name(run_name(method, dataset, modality))
    seeds = [{k: v for k, v in r.items() if k != "run_dir"} for r in results]
    atomic_write_text(summary_dir / f"{name}.json", json.dumps(
        {"run": name, "method": method, "dataset": dataset, "modality": modality, "seeds": seeds},
        indent=2, sort_keys=True) + "\n")
    hist = pd.concat([pd.read_csv(Path(r["run_dir"]) / "history.csv") for r in results], ignore_index=True)
    tmp = summary_dir / f".{name}.csv.tmp"
    hist.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(summary_dir / f"{name}.csv")


def train_many(cfg: C.Schema, pairs: list[tuple[str, str, str | None]], seeds: list[int],
               summary_dir: Path | None = None, runs_dir: Path | None = None) -> list[dict]:
    """Train each (method, dataset, modality) pair for every seed, all in one worker pool."""
    runs = Path(runs_dir or cfg.paths.runs)
    jobs = [Job(m, d, s, mod, runs) for (m, d, mod) in pairs for s in seeds]
    results = run_jobs(cfg, jobs)
    if summary_dir is not None:
        for i, (m, d, mod) in enumerate(pairs):
            write_summary(summary_dir, results[i * len(seeds):(i + 1) * len(seeds)], m, d, mod)
    return results


def train_group(cfg: C.Schema, method: str, dataset: str, seeds: list[int], modality: str | None = None,
                summary_dir: Path | None = None, runs_dir: Path | None = None) -> list[dict]:
    """Train `method` on `dataset` for each seed; write the committed summary files of this run group."""
    return train_many(cfg, [(method, dataset, modality)], seeds, summary_dir, runs_dir)
