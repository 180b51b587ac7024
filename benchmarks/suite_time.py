"""Wall time of the default suite and the CI profile, and where it goes.

Runs `dvc repro` in a throwaway copy of the project (git + DVC initialised) for the CI profile (the
tests' small suite) and the embedded default suite (as committed), and writes
reports/benchmarks/suite_time.json: total wall time, number of stage processes, time spent starting
them (interpreter + torch and registry imports), training (sum of per-run train time), and the rest.

    python benchmarks/suite_time.py [--profiles embedded ci] [--out reports/benchmarks/suite_time.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.pipeline_project import make_project  # noqa: E402


def measure(profile: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"g2d-bench-{profile}-") as tmp:
        # ci: the CI profile on the tests' small suite; embedded: the default suite exactly as committed
        proj = make_project(Path(tmp), small=profile == "ci")
        log = proj / "timing.jsonl"
        env = {**os.environ, "G2D_TIMING_LOG": str(log), "DVC_NO_ANALYTICS": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=proj, env=env,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode:
            raise SystemExit(f"dvc repro ({profile}) failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        recs = [json.loads(li) for li in log.read_text().splitlines()]
        train = 0.0
        runs = 0
        for f in (proj / "data/cache/runs").rglob("metrics.json"):  # wall times: only in the scratch copies
            train += json.loads(f.read_text())["train_time_s"]
            runs += 1
        by_cmd: dict[str, float] = {}
        for r in recs:
            by_cmd[r["argv"][0]] = by_cmd.get(r["argv"][0], 0.0) + r["startup_s"] + r["run_s"]
        startup = sum(r["startup_s"] for r in recs)
        return {
            "profile": profile, "wall_s": round(wall, 1), "stage_processes": len(recs), "training_runs": runs,
            "startup_s": round(startup, 1), "training_s": round(train, 1),
            "per_run_training_s": round(train / max(runs, 1), 2),
            "dvc_and_other_s": round(wall - sum(r["startup_s"] + r["run_s"] for r in recs), 1),
            "by_command_s": {k: round(v, 1) for k, v in sorted(by_cmd.items())},
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", nargs="+", default=["ci", "embedded"], choices=["ci", "embedded"])
    ap.add_argument("--out", type=Path, default=ROOT / "reports/benchmarks/suite_time.json")
    args = ap.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
               "profiles": [measure(p) for p in args.profiles]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
