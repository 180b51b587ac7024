"""Issue 16: Ctrl-C stops a stage at once and keeps finished runs; the parent's non-TTY progress output is
one line per run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.pipeline_project import make_project, run


SEEDS = "suite.seeds=[0,1,2,3,4,5,6,7]"
FIVE = "suite.seeds=[0,1,2,3,4]"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("sig"))
    run([sys.executable, "-m", "dvc", "repro", "-q", "prepare@cremad"], project)
    return project


def _train_cmd(runs: str, seeds: str = SEEDS) -> list[str]:
    return [sys.executable, "-m", "g2d.cli", "train", "method=joint", "--group", "main", "--all-seeds", seeds,
            "trainer.epochs=6", "workers=2", f"paths.runs={runs}"]


def _env(project: Path) -> dict:
    # DVC_STAGE: as under `dvc repro` (trains in the scratch area data/cache/<runs>, shows the stage name)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(project), "DVC_NO_ANALYTICS": "1",
            "DVC_STAGE": "main@joint"}


def _metrics(runs: Path) -> dict[int, dict]:
    out = {}
    for p in sorted((runs / "main/joint/joint-cremad").glob("s*/metrics.json")):
        m = json.loads(p.read_text())
        out[m["seed"]] = {"selection": m["selection"], "params_hash": m["params_hash"]}
    return out


def _interrupt_after_first_run(project: Path, runs: str, sig: int):
    p = subprocess.Popen(_train_cmd(runs), cwd=project, env=_env(project), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    t = threading.Thread(target=lambda: err.extend(p.stderr), daemon=True)
    t.start()
    out = []
    for line in p.stdout:
        out.append(line)
        if re.match(r"\[g2d\] joint-cremad seed \d+: ", line):
            break
    sent = time.monotonic()
    p.send_signal(sig)
    out += p.stdout.readlines()
    rc = p.wait(timeout=30)
    took = time.monotonic() - sent
    t.join(5)
    return rc, took, "".join(out), "".join(err)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_at_once_and_rerun_keeps_finished_runs(prepared, sig):
    runs = f"data/runs-{sig.name}"
    rc, took, out, err = _interrupt_after_first_run(prepared, runs, sig)
    lines = [li for li in err.splitlines() if re.fullmatch(r"\[g2d\] interrupted; \d+ runs finished, \d+ will "
                                                            r"resume", li)]
    assert rc == 128 + sig and took < 3.0, (rc, took, err)
    print(f"{sig.name}: exit {rc} after {took:.2f}s; {lines}")
    assert len(lines) == 1 and "Traceback" not in err + out, err
    n, m = map(int, re.findall(r"(\d+) (?:runs|will)", lines[0]))
    assert n >= 1 and n + m == 8
    finished = {seed: (prepared / runs / f"main/joint/joint-cremad/s{seed}/metrics.json")
                for seed in _metrics(prepared / runs)}
    assert len(finished) == n
    stamp = {s: (p.stat().st_mtime_ns, p.read_bytes()) for s, p in finished.items()}
    assert not list((prepared / runs).rglob("ckpt.pt")), "checkpoints belong in the scratch area"

    res = subprocess.run(_train_cmd(runs), cwd=prepared, env=_env(prepared), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {s: (p.stat().st_mtime_ns, p.read_bytes()) for s, p in finished.items()} == stamp
    kept = {int(re.search(r"seed (\d+)", li).group(1)) for li in res.stdout.splitlines()
            if "[kept: already trained]" in li}
    # every published run is kept; a run that finished in the scratch area just before the signal, but was not yet
    # published, is kept too (the rerun reuses it instead of retraining)
    assert set(finished) <= kept and len(kept) <= n + 2
    if sig == signal.SIGINT:  # uninterrupted reference run (fresh runs + scratch folders)
        ref = subprocess.run(_train_cmd("data/runs-ref"), cwd=prepared, env=_env(prepared), capture_output=True,
                             text=True, timeout=600)
        assert ref.returncode == 0, ref.stderr[-3000:]
        assert _metrics(prepared / runs) == _metrics(prepared / "data/runs-ref")
        assert len(_metrics(prepared / runs)) == 8


def test_non_tty_progress_is_one_line_per_run(prepared):
    res = subprocess.run(_train_cmd("data/runs-progress", FIVE), cwd=prepared,
                         env=_env(prepared), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "\r" not in res.stdout + res.stderr
    per_run = [li for li in res.stdout.splitlines() if re.fullmatch(r"\[g2d\] joint-cremad seed \d: test acc "
                                                                    r"[\d.]+ .*\[\d/5\]", li)]
    assert len(per_run) == 5 and sorted(li[-4:-3] for li in per_run) == list("12345"), res.stdout
    assert res.stdout.splitlines()[-1].startswith("[g2d] main@joint: 5 runs done (5 trained, 0 kept) in "), res.stdout


def test_returning_to_earlier_params_restores_from_the_run_cache(ci_project, tmp_path):
    """Issue 16: change a param, repro, change it back, repro: nothing trains. The scratch area (data/cache/runs,
    where g2d itself would find the finished runs) is removed first, so only DVC's run-cache can restore them;
    it does so only for a stage whose outputs are all cached (the summaries come from the `summarise` stage)."""
    import shutil

    import yaml

    proj = tmp_path / "proj"
    shutil.copytree(ci_project, proj, symlinks=True)
    params = proj / "params.yaml"
    original = params.read_text()
    before = (proj / "reports/runs/main/g2d/g2d-cremad.json").read_bytes()
    edited = yaml.safe_load(original)
    edited["methods"]["g2d"] = {"temperature": 2.0}
    params.write_text(yaml.safe_dump(edited, sort_keys=False))
    changed = run([sys.executable, "-m", "dvc", "repro"], proj).stdout
    assert "Running stage 'main@g2d'" in changed and re.search(r"g2d-cremad seed \d+: test acc", changed)
    # issue 16: the stage knows its place in the repro (DVC's status read from inside the running stage)
    assert re.search(r"\[g2d\] main@g2d \(train stage 1/1\): \d+ runs done", changed), changed[-2000:]
    assert (proj / "reports/runs/main/g2d/g2d-cremad.json").read_bytes() != before

    params.write_text(original)
    shutil.rmtree(proj / "data/cache/runs")
    back = run([sys.executable, "-m", "dvc", "repro"], proj).stdout
    assert "Stage 'main@g2d' is cached - skipping run, checking out outputs" in back, back[-3000:]
    assert not re.search(r"seed \d+: test acc", back) and "Running stage 'main@g2d'" not in back, back[-3000:]
    assert (proj / "reports/runs/main/g2d/g2d-cremad.json").read_bytes() == before
