#!/usr/bin/env bash
# The whole GPU check in one call (~8 minutes on one H200): the full-size throughput benchmark (reference loop vs
# our trainer, runs per GPU k = 1, 2, 4, 8, g2d also compiled) and the GPU-marked tests. Outputs go to $OUT (the
# device tool's folder; else reports/benchmarks/gpu-run): gpu_throughput.json/.md, bench.log, pytest_gpu.log,
# nvidia-smi.txt. Needs only torch, torchvision, numpy, pandas, pyyaml, tqdm, jinja2 and pytest there; hydra and
# omegaconf come from ./.gpu_site (made here by benchmarks/gpu_site.sh) when the image lacks them.
#
#   bash benchmarks/gpu_site.sh                    # here, once
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_site"], timeout_s=590)
#   BENCH_ARGS="--device cpu --tiny" OUT=/tmp/gc bash benchmarks/gpu_check.sh   # dry run of the script on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/benchmarks/gpu-run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import omegaconf, hydra" 2>/dev/null; then
  if [ ! -d .gpu_site ]; then echo "hydra/omegaconf missing: run benchmarks/gpu_site.sh first and carry .gpu_site"; exit 2; fi
  export PYTHONPATH="$PWD/.gpu_site:$PYTHONPATH"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
t0=$(date +%s)
timeout 370 "$PY" benchmarks/gpu_throughput.py ${BENCH_ARGS:---device cuda --compile --budget-s 250} --out "$OUT/gpu_throughput.json" \
  2>&1 | tee "$OUT/bench.log" | grep -v '^\[g2d\]'
bench=${PIPESTATUS[0]}
echo "benchmark: exit $bench after $(( $(date +%s) - t0 )) s"
timeout 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_gpu.py tests/faults/test_checkpoints.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
tests=${PIPESTATUS[0]}
echo "gpu tests: exit $tests; total $(( $(date +%s) - t0 )) s"
[ -f "$OUT/gpu_throughput.md" ] && cat "$OUT/gpu_throughput.md"
exit $(( bench != 0 || tests != 0 ))
