"""benchmarks/gpu_throughput.py runs on the CPU at tiny sizes and writes its JSON and table (CI runs this)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu_throughput.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_throughput.py"), "--device", "cpu", "--tiny",
                          "--steps", "2", "--rounds", "1", "--workers", "1", "--suite-k", "1", "--suite-secs", "0.2",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["tiny"] and r["device"].startswith("cpu")
    assert set(r["configs"]) == {"reference", "g2d", "joint", "unimodal-visual"}
    for name, c in r["configs"].items():
        assert c["samples_per_s"] > 0, name
        assert set(c["breakdown_ms"]) == {"data", "forward", "backward", "optimizer"}
        assert c["gflop_per_step"] and c["gflop_per_step"] > 0 and c["profile_top_ops"]
    assert r["configs"]["g2d"]["resident_on_device"] is True
    assert r["headline"]["g2d_over_reference"] == r["configs"]["g2d"]["speedup_vs_reference"]
    assert [s["k"] for s in r["suite"]["ci_size_g2d"]] == [1] and r["suite"]["ci_size_g2d"][0]["runs"] == 1
    assert r["suite"]["paper_size_g2d"][0]["samples_per_s"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| g2d |" in md and "runs/h" in md
