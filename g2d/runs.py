"""Run naming and the drivers that train many runs from one process (torch is imported once)."""
from __future__ import annotations

import dataclasses
import fcntl
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from g2d import config as C
from g2d.data.prepared import atomic_write_text, pid_alive
from g2d.train.provenance import VOLATILE_HISTORY, committed_view, published_view


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


# ---- one lock per run folder ----------------------------------------------------------------------------
LOCK_NAME = ".lock"  # <run_dir>/.lock: {"pid", "host", "start"} of the process training that run


def _proc_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot), to tell a live holder from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid())}


def _stale(holder: dict) -> str | None:
    """Why a lock's holder cannot be running this run any more, or None when it may be."""
    if not isinstance(holder.get("pid"), int) or not isinstance(holder.get("host"), str):
        return "unreadable lock file (its writer died mid-write?)"
    if holder.get("host") != socket.gethostname():
        return f"held by pid {holder.get('pid')} on another host ({holder.get('host')})"
    pid = holder.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return f"held by pid {pid}, which is not running"
    if pid == os.getpid():
        return "left by this process"
    start = _proc_start(pid)
    if holder.get("start") is not None and start is not None and start != holder["start"]:
        return f"held by pid {pid}, which is now another process"
    return None


@contextmanager
def _guard(folder: Path):
    """Serialise lock inspection/takeover between processes: flock on the run folder itself (released by
    the kernel when the holder dies, so it is never stale; it is held only for a few file operations)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as stale


def acquire_run_lock(run_dir: Path, wait: bool = True, poll: float = 0.5, timeout: float | None = None) -> Path:
    """Take `<run_dir>/.lock`. A lock of a live process on this host makes this wait (one stderr line), or
    raise RunLockedError when `wait` is False or after `timeout` seconds; a stale one (pid dead or reused,
    or another host's) is taken over, saying so (one stderr line)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path, t0, told = run_dir / LOCK_NAME, time.monotonic(), False
    while True:
        with _guard(run_dir):
            holder = _read_lock(path)
            why = None if holder is None else _stale(holder)
            if holder is None or why is not None:
                if holder is not None and why != "left by this process":
                    print(f"[g2d] {run_dir}: taking over a stale lock ({why})", file=sys.stderr)
                atomic_write_text(path, json.dumps(_me()) + "\n")
                return path
        msg = (f"{run_dir} is being trained by pid {holder.get('pid')} on {holder.get('host')} "
               f"(lock {path})")
        if not wait or (timeout is not None and time.monotonic() - t0 >= timeout):
            raise RunLockedError(msg + ("" if not wait else f"; gave up after {timeout:g}s"))
        if not told:
            print(f"[g2d] {msg}: waiting for it to finish, then reusing its result", file=sys.stderr)
            told = True
        time.sleep(poll)


def release_run_lock(run_dir: Path) -> None:
    path = Path(run_dir) / LOCK_NAME
    if not Path(run_dir).is_dir():
        return
    with _guard(Path(run_dir)):
        holder = _read_lock(path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            path.unlink(missing_ok=True)


class RunLockedError(RuntimeError):
    pass


@contextmanager
def run_lock(run_dir: Path, wait: bool = True, timeout: float | None = None):
    """Hold the run folder's lock for the block (the trainer then removes dead writers' temporaries)."""
    acquire_run_lock(run_dir, wait=wait, timeout=timeout)
    try:
        yield
    finally:
        release_run_lock(run_dir)


FINAL = ("history.csv", "model.pt", "selected.pt", "metrics.json")  # a finished run; metrics.json last


def scratch_root(cfg: C.Schema) -> Path:
    """The trainers' working area: `<paths.runs>/../cache/<name of paths.runs>` (data/cache/runs; git-ignored, no stage's
    output, so DVC never deletes it). Checkpoints, locks and finished runs live here; a stage's DVC output
    receives each run's final files (FINAL and their .sha256 records) when the run finishes."""
    runs = Path(cfg.paths.runs)
    return runs.parent / "cache" / runs.name


def scratch_for(cfg: C.Schema, runs_dir: Path) -> Path:
    """The scratch folder mirroring an output runs folder (data/runs/main/joint -> data/cache/runs/main/joint)."""
    root, runs_dir = Path(cfg.paths.runs), Path(runs_dir)
    try:
        rel = runs_dir.resolve().relative_to(root.resolve())
    except ValueError:  # a runs folder outside paths.runs: its own scratch next to it
        return runs_dir.parent / f".{runs_dir.name}.work"
    return scratch_root(cfg) / rel


def use_scratch() -> bool:
    """Train in the scratch area when the output folder belongs to a DVC stage (DVC deletes a stage's
    non-persistent outputs before running it, and sets DVC_STAGE), or when G2D_SCRATCH=1; a plain
    `g2d train` trains in the runs folder itself, as before."""
    flag = os.environ.get("G2D_SCRATCH", "").strip()
    return flag not in ("0",) and (flag != "" or bool(os.environ.get("DVC_STAGE")))


@dataclass(frozen=True)
class Job:
    method: str
    dataset: str
    seed: int
    modality: str | None
    runs_dir: Path
    force: bool = False  # retrain even when the run folder holds a finished run of the same fingerprint
    scratch_dir: Path | None = None  # where the trainer works (None: in run_dir itself)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / run_name(self.method, self.dataset, self.modality) / f"s{self.seed}"

    @property
    def work_dir(self) -> Path:
        if self.scratch_dir is None:
            return self.run_dir
        return Path(self.scratch_dir) / run_name(self.method, self.dataset, self.modality) / f"s{self.seed}"


def _final_files(folder: Path) -> list[str]:
    from g2d.train.checkpoint import SUFFIX

    return [n for name in FINAL for n in ((name + SUFFIX, name) if name.endswith(".pt") else (name,))]


def _published_bytes(path: Path) -> bytes:
    """metrics.json / history.csv as a DVC output holds them (provenance.published_view): deterministic, so a
    fresh clone's outputs hash to the md5 that dvc.lock records."""
    if path.name == "metrics.json":
        return (json.dumps(published_view(json.loads(path.read_text())), indent=2, sort_keys=True) + "\n").encode()
    hist = pd.read_csv(path)
    return hist.drop(columns=[c for c in VOLATILE_HISTORY if c in hist.columns]).to_csv(index=False).encode()


def _copy_run(src: Path, dst: Path, publish: bool = False) -> None:
    """Copy a finished run's files (metrics.json last, each atomically, mtimes kept; identical ones skipped).
    `publish`: metrics.json and history.csv go in their published view, without wall times."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in _final_files(src):
        a, b = src / name, dst / name
        if not a.is_file():
            continue
        tmp = dst / f".{name}.{os.getpid()}.tmp"
        if publish and name in ("metrics.json", "history.csv"):
            data = _published_bytes(a)
            if b.is_file() and b.read_bytes() == data:
                continue
            tmp.write_bytes(data)
            os.replace(tmp, b)
            continue
        sa = a.stat()
        try:
            sb = b.stat()
            if sb.st_size == sa.st_size and sb.st_mtime_ns == sa.st_mtime_ns:
                continue
        except FileNotFoundError:
            pass
        shutil.copy2(a, tmp)
        os.replace(tmp, b)


def _publish(work: Path, out: Path) -> None:
    """The run's final files into the DVC output folder (a resumable checkpoint never goes there)."""
    if work.resolve() == out.resolve():
        return
    for name in ("ckpt.pt", "ckpt.pt.sha256"):  # left by the layout that trained in the output folder
        (out / name).unlink(missing_ok=True)
    _copy_run(work, out, publish=True)


def _seed_scratch(work: Path, out: Path) -> None:
    """A finished run present only in the output (checked out / restored by DVC, or trained by an older g2d)
    is copied into an idle scratch folder, so the trainer finds and verifies it instead of retraining."""
    if work.resolve() == out.resolve() or not (out / "metrics.json").is_file():
        return
    if (work / "metrics.json").exists() or (work / "ckpt.pt").exists():
        return
    _copy_run(out, work)


def _run_job(cfg: C.Schema, job: Job) -> dict:
    from g2d.train.trainer import RunSpec, Trainer

    name = run_name(job.method, job.dataset, job.modality)
    run_dir, work = job.run_dir, job.work_dir
    if job.modality:  # a teacher: its modality is the unimodal method's parameter
        block = {**(cfg.methods.get("unimodal") or {}), "modality": job.modality}
        cfg = dataclasses.replace(cfg, methods={**cfg.methods, "unimodal": block})
    work.mkdir(parents=True, exist_ok=True)
    with run_lock(work):  # re-entered by Trainer.fit (same process): seeding and publishing are covered too
        _seed_scratch(work, run_dir)
        before = _mtime(work / "metrics.json")
        res = Trainer(cfg, RunSpec(job.method, job.dataset, job.seed, work, prepared_dir(cfg, job.dataset),
                                   Path(cfg.paths.runs), force=job.force)).fit()
        kept = before is not None and before == _mtime(work / "metrics.json")
        _publish(work, run_dir)
    res["run"] = summary_name(name)
    res["run_dir"] = run_dir.as_posix()
    res[KEPT] = kept
    return res


KEPT = "_kept"  # set on a result reused from an earlier finished run (dropped before it is written anywhere)


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


FAKE_GPUS = "G2D_FAKE_GPUS"  # tests: "0,1" pretends these GPUs are visible (runs still train on trainer.device)


def visible_gpus(cfg: C.Schema) -> list[str]:
    """The GPU ids a stage's runs are spread over: CUDA_VISIBLE_DEVICES' entries (else 0..n-1) on CUDA, only
    N for trainer.device=cuda:N, none on the CPU. G2D_FAKE_GPUS overrides it so the pool is testable without one."""
    fake = os.environ.get(FAKE_GPUS, "").strip()
    if fake:
        return [g.strip() for g in fake.split(",") if g.strip()]
    from g2d.train.seeding import resolve_device

    dev = resolve_device(cfg.trainer.device)
    if dev.type != "cuda":
        return []
    import torch

    n = torch.cuda.device_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in env.split(",") if x.strip()][:n] if env else [str(i) for i in range(n)]
    return ids[dev.index:dev.index + 1] if dev.index is not None else ids


def n_workers(cfg: C.Schema, n_jobs: int, gpus: list[str] | None = None) -> int:
    """Parallel training processes: on the CPU `workers` (0 = one per core, fork pool); on CUDA `workers_per_gpu`
    per visible GPU (spawn pool: CUDA cannot be forked)."""
    from g2d.train.seeding import resolve_device

    gpus = visible_gpus(cfg) if gpus is None else gpus
    if gpus:
        return max(1, min(len(gpus) * cfg.workers_per_gpu, n_jobs))
    if resolve_device(cfg.trainer.device).type != "cpu":
        return 1
    want = cfg.workers or (os.cpu_count() or 1)
    return max(1, min(want, n_jobs))


# ---- interrupts -------------------------------------------------------------------------------------------
class Interrupted(Exception):
    """SIGINT / SIGTERM: workers were stopped; finished runs are kept (and skipped on rerun)."""

    def __init__(self, signum: int, finished: int, left: int):
        super().__init__(f"interrupted; {finished} runs finished, {left} will resume")
        self.signum, self.finished, self.left = signum, finished, left

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Stop(BaseException):  # raised by the signal handler in a sequential run (not caught by `except Exception`)
    def __init__(self, signum: int):
        self.signum = signum


@contextmanager
def _stop_signals(raise_now: bool):
    """SIGINT/SIGTERM set `flag["signum"]` (and raise _Stop when `raise_now`) while the block runs."""
    flag: dict = {"signum": None}

    def handler(signum, frame):
        if flag["signum"] is None:
            flag["signum"] = signum
            if raise_now:
                raise _Stop(signum)

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _child(cfg: C.Schema, job: Job, conn, threads: int, gpu: str | None = None) -> None:
    """A pool worker: one run, result (or error) sent to the parent; draws no progress bar. A GPU slot's worker
    sees only its GPU (CUDA_VISIBLE_DEVICES, set before CUDA starts), so `cuda:N` becomes its `cuda`."""
    from g2d.progress import clear_line_on_stderr

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides (and kills workers) on Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    clear_line_on_stderr()  # a message must not be glued to the parent's status line
    tc = dataclasses.replace(cfg.trainer, progress="off")
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        if tc.device.startswith("cuda"):
            tc = dataclasses.replace(tc, device="cuda")
        print(f"[g2d] worker {os.getpid()}: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}: {job.run_dir}",
              file=sys.stderr, flush=True)
    _init_worker(threads)
    cfg = dataclasses.replace(cfg, trainer=tc)
    try:
        msg = ("ok", _run_job(cfg, job))
    except BaseException as e:  # noqa: BLE001 - re-raised in the parent
        try:
            pickle.dumps(e)
            msg = ("err", e)
        except Exception:  # noqa: BLE001
            msg = ("err", RuntimeError(f"{type(e).__name__}: {e}"))
    try:
        conn.send(msg)
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()


def _drop_locks(jobs: list[Job], pids: set[int]) -> None:
    """Remove the run locks of workers the parent killed (their checkpoints stay for the rerun)."""
    for j in jobs:
        path = j.work_dir / LOCK_NAME
        holder = _read_lock(path)
        if holder and holder.get("pid") in pids:
            path.unlink(missing_ok=True)


@contextmanager
def _env(name: str, value: str | None):
    """os.environ[name] = value for the block (a spawned child inherits the parent's environment at start)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _pool(cfg: C.Schema, todo: list[Job], workers: int, progress, flag: dict,
          gpus: list[str] | None = None) -> list[dict]:
    """`workers` processes at a time. CPU: forked. GPUs: spawned, one slot per (GPU, k < workers_per_gpu), each
    worker pinned to its slot's GPU; the slots are filled round-robin over the GPUs."""
    from multiprocessing.connection import wait

    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn" if gpus else "fork")
    if not gpus:  # forked children inherit it: what deterministic mode imports (~1.6 s), once, not per child
        import torch._inductor  # noqa: F401
    slots = ([g for _ in range(cfg.workers_per_gpu) for g in gpus][:workers] if gpus else [None] * workers)
    free = list(range(len(slots)))
    queue, running, done, error, late = list(range(len(todo))), {}, {}, None, set()
    try:
        while queue or running:
            while queue and free and error is None and flag["signum"] is None:
                i, slot = queue.pop(0), free.pop(0)
                r, w = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_child, args=(cfg, todo[i], w, threads, slots[slot]), daemon=True)
                with _env("CUDA_VISIBLE_DEVICES", slots[slot]):
                    p.start()
                w.close()
                running[r] = (i, p, slot)
            if flag["signum"] is not None or not running:
                break
            for r in wait(list(running), timeout=0.1):
                i, p, slot = running.pop(r)
                free.append(slot)
                free.sort()
                try:
                    kind, payload = r.recv()
                except (EOFError, OSError):
                    p.join()
                    kind, payload = "err", RuntimeError(
                        f"the worker training {todo[i].run_dir} died (exit code {p.exitcode})")
                r.close()
                p.join()
                if kind == "ok":
                    done[i] = payload
                    progress.run_done(run_name(todo[i].method, todo[i].dataset, todo[i].modality), todo[i].seed,
                                      payload, payload.get(KEPT, False))
                elif error is None:
                    error = payload  # running workers finish (their runs are kept); no new ones start
    finally:
        if running:
            pids = set()
            for r, (i, p, _) in running.items():
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
                pids.add(p.pid)
            for r, (i, p, _) in running.items():
                p.join()
                r.close()
                if (todo[i].run_dir / "metrics.json").is_file():  # published just before the kill
                    late.add(i)
            _drop_locks([todo[i] for i, _, _ in running.values()], pids)
    if flag["signum"] is not None:
        finished = len(done) + len(late)
        raise Interrupted(flag["signum"], finished, len(todo) - finished)
    if error is not None:
        raise error
    return [done[i] for i in range(len(todo))]


def run_jobs(cfg: C.Schema, jobs: list[Job], progress=None) -> list[dict]:
    """Train every job; on CPU each run goes to a forked worker (torch is imported once, runs are independent
    and seeded, so results equal a sequential run's); on CUDA to a spawned worker per (GPU, k) slot
    (`workers_per_gpu`). Results come back in job order; jobs naming the
    same run folder are trained once (each run folder is also locked while it trains, see run_lock).
    SIGINT/SIGTERM stop every worker at once and raise Interrupted (finished runs are kept)."""
    from g2d.progress import Progress

    unique: dict[Path, Job] = {}
    for j in jobs:
        unique.setdefault(j.run_dir, j)
    todo = list(unique.values())
    progress = progress or Progress(len(todo), live=False)
    if cfg.executor.kind != "local":  # SLURM (or submitit's local executor): g2d.executor
        from g2d.executor import submit

        with _stop_signals(raise_now=False) as flag:
            try:
                done = submit(cfg, todo, progress, flag)
            finally:
                progress.close()
        return _in_job_order(jobs, todo, unique, done)
    gpus = visible_gpus(cfg)
    workers = n_workers(cfg, len(todo), gpus)
    with _stop_signals(raise_now=workers <= 1) as flag:
        if workers <= 1:
            done = []
            try:
                for j in todo:
                    if flag["signum"] is not None:
                        raise _Stop(flag["signum"])
                    res = _run_job(cfg, j)
                    done.append(res)
                    progress.run_done(run_name(j.method, j.dataset, j.modality), j.seed, res,
                                      res.get(KEPT, False))
            except _Stop as e:
                progress.close()
                raise Interrupted(e.signum, len(done), len(todo) - len(done)) from None
            except KeyboardInterrupt:
                progress.close()
                raise Interrupted(signal.SIGINT, len(done), len(todo) - len(done)) from None
        else:
            try:
                done = _pool(cfg, todo, workers, progress, flag, gpus)
            finally:
                progress.close()
    return _in_job_order(jobs, todo, unique, done)


def _in_job_order(jobs: list[Job], todo: list[Job], unique: dict[Path, Job], done: list[dict]) -> list[dict]:
    for r in done:
        r.pop(KEPT, None)
    by_dir = {j.run_dir: r for j, r in zip(todo, done)}
    return [by_dir[j.run_dir] if unique[j.run_dir] is j else json.loads(json.dumps(by_dir[j.run_dir]))
            for j in jobs]


def write_summary(summary_dir: Path, results: list[dict], method: str, dataset: str,
                  modality: str | None) -> None:
    """The committed per-(method, dataset) files: metrics of every seed (json) and histories (csv). Each result
    names its run folder (`run_dir`) whose history.csv the csv concatenates."""
    summary_dir = Path(summary_dir)
    summary_dir.mkdir(parents=True, exist_ok=True)
    name = summary_name(run_name(method, dataset, modality))
    from g2d.codehash import code_id

    seeds = [committed_view(r, code_id(method)) for r in results]
    atomic_write_text(summary_dir / f"{name}.json", json.dumps(
        {"run": name, "method": method, "dataset": dataset, "modality": modality, "seeds": seeds},
        indent=2, sort_keys=True) + "\n")
    hist = pd.concat([pd.read_csv(Path(r["run_dir"]) / "history.csv") for r in results], ignore_index=True)
    hist = hist.drop(columns=[c for c in VOLATILE_HISTORY if c in hist.columns])
    summary_dir.joinpath(f".{name}.csv.tmp").unlink(missing_ok=True)  # fixed name of older versions
    atomic_write_text(summary_dir / f"{name}.csv", hist.to_csv(index=False, float_format="%.6g"))


def summary_plan(cfg: C.Schema) -> list[tuple[Path, str, str, str | None, list[Path]]]:
    """(summary folder relative to reports/runs, method, dataset, modality, run folders in seed order) of every
    committed summary of the suite: the teachers of each dataset, then each group's methods on its datasets."""
    from g2d import registry

    runs = Path(cfg.paths.runs)
    plan = []
    for ds in cfg.suite.datasets:
        seeds = C.suite_seeds(cfg, ds)
        for mod in registry.get_dataset(ds).spec.modality_names:
            dirs = [runs / run_name("unimodal", ds, mod) / f"s{s}" for s in seeds]
            plan.append((Path("teachers") / ds, "unimodal", ds, mod, dirs))
    for group, g in cfg.suite.groups.items():
        for method in g.methods:
            for ds in g.datasets:
                dirs = [runs / group / method / run_name(method, ds) / f"s{s}" for s in C.suite_seeds(cfg, ds)]
                plan.append((Path(group) / method, method, ds, None, dirs))
    return plan


def summarise(cfg: C.Schema, out_root: Path) -> int:
    """`g2d summarise`: the committed summaries (reports/runs) rebuilt from the published runs (data/runs, the
    train stages' DVC outputs, deterministic bytes). A separate stage so that the train stages have only
    cached outputs: DVC's run-cache skips a stage with any uncached non-metric output, and with it restoring
    earlier params without training. Returns the number of summaries written."""
    plan = summary_plan(cfg)
    missing = [d / "metrics.json" for *_, dirs in plan for d in dirs if not (d / "metrics.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} not found ({len(missing)} runs missing): the summaries are built "
                                f"from finished runs; run `dvc repro` (or the train stage of that run) first")
    for sub, method, ds, mod, dirs in plan:
        results = []
        for d in dirs:
            res = json.loads((d / "metrics.json").read_text())
            res["run"] = summary_name(run_name(method, ds, mod))
            res["run_dir"] = d.as_posix()
            results.append(res)
        write_summary(Path(out_root) / sub, results, method, ds, mod)
    return len(plan)


def train_many(cfg: C.Schema, pairs: list[tuple[str, str, str | None]], seeds: list[int] | dict[str, list[int]],
               summary_dir: Path | None = None, runs_dir: Path | None = None, force: bool = False,
               progress=None) -> list[dict]:
    """Train each (method, dataset, modality) pair for every seed (`seeds`: one list, or one per dataset), all
    in one worker pool. Runs train in the scratch area (scratch_for) and their final files are copied to
    `runs_dir`; a finished run of the same fingerprint (in the scratch area or the output) is reused, unless
    `force`."""
    runs = Path(runs_dir or cfg.paths.runs)
    scratch = scratch_for(cfg, runs) if use_scratch() else None
    per = {d: list(seeds[d] if isinstance(seeds, dict) else seeds) for (_, d, _) in pairs}
    jobs = [Job(m, d, s, mod, runs, force, scratch) for (m, d, mod) in pairs for s in per[d]]
    results = run_jobs(cfg, jobs, progress)
    if summary_dir is not None:
        start = 0
        for m, d, mod in pairs:
            write_summary(summary_dir, results[start:start + len(per[d])], m, d, mod)
            start += len(per[d])
    return results


def train_group(cfg: C.Schema, method: str, dataset: str, seeds: list[int], modality: str | None = None,
                summary_dir: Path | None = None, runs_dir: Path | None = None, force: bool = False,
                progress=None) -> list[dict]:
    """Train `method` on `dataset` for each seed; write the committed summary files of this run group."""
    return train_many(cfg, [(method, dataset, modality)], seeds, summary_dir, runs_dir, force, progress)
