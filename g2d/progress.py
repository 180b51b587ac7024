"""The one progress display of a training command, owned by the parent process (pool workers draw nothing).

TTY: a status line redrawn in place on stderr (runs done/total, elapsed, ETA of the stage and, under
`dvc repro`, `train stage k/n` with an ETA of the whole suite), finished runs printed above it on stdout.
Not a TTY (CI, logs): one line per finished run and one summary line per stage, no carriage returns.

Stage k of n: a stage run by `dvc repro` knows its name (DVC sets DVC_STAGE). The first training stage of a
repro writes a small plan file (`<paths.runs>/../cache/repro-plan.json`, keyed by the pid and start time of
the `dvc repro` process): the training stages `dvc status` (same targets) reports changed, and an estimate
of each from the per-run times its last local run recorded (`<paths.runs>/<group>/<item>/**/metrics.json`;
wall times are kept out of the committed summaries, which must not change when nothing else did). Later stages of the same repro
read it. Without a plan (no DVC, `dvc exp run`, a failing status) only the stage's own progress is shown.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

NOT_TRAINING = ("codehash", "fetch", "prepare", "summarise", "aggregate", "report", "calibrate")


def _fmt(seconds: float) -> str:
    s = int(round(max(seconds, 0)))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def is_training_stage(name: str) -> bool:
    return name.split("@", 1)[0] not in NOT_TRAINING


# ---- the repro plan ---------------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _repro_process() -> tuple[int, str, list[str]] | None:
    """(pid, start time, argv) of the `dvc repro` process this command runs under, or None."""
    pid = os.getppid()
    for _ in range(6):
        st = _stat(pid)
        if st is None or pid <= 1:
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            argv = [a.decode(errors="replace") for a in argv if a]
        except OSError:
            argv = []
        if "repro" in argv and any(Path(a).name in ("dvc", "dvc.exe") or a == "dvc" for a in argv[:3]):
            return pid, st[19], argv
        pid = int(st[1])
    return None


def _stage_estimate(stage: str, runs: Path, workers: int) -> float | None:
    """Seconds a training stage took last time here: sum of its runs' train_time_s / workers (from the scratch
    copies, data/cache/runs: the published ones in data/runs carry no wall times)."""
    group, _, item = stage.partition("@")
    total, n = 0.0, 0
    for base in (runs.parent / "cache" / runs.name, runs):
        folder = base / group / item
        for f in sorted(folder.rglob("metrics.json")) if folder.is_dir() else []:
            try:
                t = json.loads(f.read_text()).get("train_time_s")
            except (OSError, ValueError, AttributeError, TypeError):
                continue
            if t is not None:
                total += float(t)
                n += 1
        if n:
            break
    return total / max(1, min(workers, n)) if n else None


# `dvc status` from inside a running stage stops at DVC's path locks (the stage write-locks its outputs, which later
# stages read), so the query runs DVC's own status with the path locks off: it only reads, for a display
_STATUS = """
import contextlib, json, sys
import dvc.rwlock
dvc.rwlock.rwlock = lambda *a, **k: contextlib.nullcontext()
from dvc.repo import Repo
with Repo() as repo:
    print(json.dumps(list(repo.status(targets=sys.argv[1:] or None, with_deps=len(sys.argv) > 1))))
"""


def _planned_stages(argv: list[str]) -> list[str] | None:
    """The stages DVC's status reports changed for the repro's own targets (with their dependencies), in pipeline
    order: the ones this repro will run. Not `dvc repro --dry` or `dvc status`: run from inside a stage both fail
    on the locks the running stage holds (data/code, its outputs)."""
    i = argv.index("repro")
    targets = [a for a in argv[i + 1:] if not a.startswith("-")]
    try:
        res = subprocess.run([sys.executable, "-c", _STATUS, *targets], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "DVC_NO_ANALYTICS": "1"})
        changed = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 and res.stdout.strip() \
            else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return [str(s) for s in changed] if isinstance(changed, list) else None


def stage_plan(stage: str | None, cache_dir: Path, runs: Path, workers: int) -> dict | None:
    """{"stages": [training stages of this repro, in order], "estimate_s": {stage: seconds}} or None."""
    if not stage:
        return None
    repro = _repro_process()
    if repro is None:
        return None
    pid, start, argv = repro
    path = Path(cache_dir) / "repro-plan.json"
    try:
        plan = json.loads(path.read_text())
        if plan.get("repro") == [pid, start] and stage in plan.get("stages", []):
            return plan
    except (OSError, ValueError, AttributeError):
        pass
    stages = _planned_stages(argv)
    if not stages or stage not in stages:
        return None
    stages = [s for s in stages if is_training_stage(s)]
    est = {s: _stage_estimate(s, Path(runs), workers) for s in stages}
    plan = {"repro": [pid, start], "stages": stages, "estimate_s": est}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(plan) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass
    return plan


# ---- the display ------------------------------------------------------------------------------------------
class ClearingStream:
    """A TTY stream whose every new line first erases the terminal line: a message a pool worker (or the trainer)
    writes to stderr then replaces the parent's status line instead of being glued to its end; the parent redraws
    the status after the next finished run."""

    def __init__(self, stream):
        self._stream, self._bol = stream, True

    def write(self, text: str) -> int:
        out = []
        for part in text.splitlines(keepends=True):
            out.append(("\r\033[K" if self._bol else "") + part)
            self._bol = part.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def clear_line_on_stderr() -> None:
    """Route this process's stderr through ClearingStream when it is a TTY (a log file gets no escape codes)."""
    if sys.stderr.isatty() and not isinstance(sys.stderr, ClearingStream):
        sys.stderr = ClearingStream(sys.stderr)


class Progress:
    """Runs done / total of one command (a DVC stage), drawn by the parent process only."""

    def __init__(self, total: int, stage: str | None = None, plan: dict | None = None, live: bool | None = None,
                 out=None, err=None):
        self.total, self.stage, self.plan = total, stage, plan
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.live = self.err.isatty() if live is None else live  # redraw a status line (TTY only)
        self.done = self.kept = 0
        self.t0 = time.monotonic()
        self._drawn = False

    # where this stage is in the suite
    def _position(self) -> str:
        if not self.stage:
            return ""
        if self.plan and self.stage in self.plan["stages"]:
            k = self.plan["stages"].index(self.stage) + 1
            return f"{self.stage} (train stage {k}/{len(self.plan['stages'])})"
        return self.stage

    def _eta(self) -> str:
        elapsed = time.monotonic() - self.t0
        trained = self.done - self.kept
        left = self.total - self.done
        if left <= 0:
            own = 0.0
        elif trained > 0:
            own = elapsed / self.done * left
        else:
            est = (self.plan or {}).get("estimate_s", {}).get(self.stage) if self.stage else None
            own = None if est is None else max(est - elapsed, 0.0)
        parts = [] if own is None else [f"ETA {_fmt(own)}"]
        if self.plan and self.stage in self.plan["stages"] and own is not None:
            later = self.plan["stages"][self.plan["stages"].index(self.stage) + 1:]
            known = [v for v in self.plan["estimate_s"].values() if v is not None]
            fill = sum(known) / len(known) if known else 0.0
            rest = sum(self.plan["estimate_s"].get(s) or fill for s in later)
            parts.append(f"suite ETA ~{_fmt(own + rest)}")
        return ", ".join(parts)

    def status(self) -> str:
        head = self._position()
        eta = self._eta()
        return (f"[g2d] {head + ': ' if head else ''}runs {self.done}/{self.total}, "
                f"{_fmt(time.monotonic() - self.t0)} elapsed" + (f", {eta}" if eta else ""))

    def _clear(self) -> None:
        if self._drawn:
            self.err.write("\r\033[K")
            self.err.flush()
            self._drawn = False

    def draw(self) -> None:
        if self.live:
            self.err.write("\r\033[K" + self.status())
            self.err.flush()
            self._drawn = True

    def run_done(self, name: str, seed: int, res: dict, kept: bool) -> None:
        self.done += 1
        self.kept += bool(kept)
        try:
            rule = (res.get("selected_checkpoint") or {}).get("rule") or "best_val"  # what the tables report
            sel, key = res["selection"][rule], res["primary_metric"]
            what = (f"test {key} {sel['test'][key]:.2f} ({rule} epoch {sel['epoch']}), "
                    f"{res.get('train_time_s', 0.0):.1f}s")
        except (KeyError, TypeError, ValueError):
            what = "done"
        self._clear()
        print(f"[g2d] {name} seed {seed}: {what}{' [kept: already trained]' if kept else ''} "
              f"[{self.done}/{self.total}]", file=self.out, flush=True)
        self.draw()

    def finish(self) -> str:
        self._clear()
        head = self._position()
        line = (f"[g2d] {head + ': ' if head else ''}{self.total} runs done ({self.done - self.kept} trained, "
                f"{self.kept} kept) in {_fmt(time.monotonic() - self.t0)}")
        if self.plan and self.stage in self.plan["stages"]:
            eta = self._eta()
            if "suite" in eta:
                line += f"; {eta.split(', ')[-1]} for the remaining training stages"
        print(line, file=self.out, flush=True)
        return line

    def close(self) -> None:
        self._clear()
