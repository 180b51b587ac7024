#!/usr/bin/env bash
# Copy the pure-Python packages the device machine's image lacks (hydra-core, omegaconf, antlr4-python3-runtime;
# /work/.library/device/KINDS.md lists what it has) from this machine's environment into ./.gpu_site (git-ignored),
# so benchmarks/gpu_check.sh can import g2d there with no registry access. Run here, then carry .gpu_site.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SITE=$("$PY" -c "import omegaconf, os; print(os.path.dirname(os.path.dirname(omegaconf.__file__)))")
rm -rf .gpu_site && mkdir -p .gpu_site
for pkg in omegaconf hydra antlr4; do
  cp -r "$SITE/$pkg" .gpu_site/
done
cp -r "$SITE"/omegaconf-*.dist-info "$SITE"/hydra_core-*.dist-info "$SITE"/antlr4_python3_runtime-*.dist-info .gpu_site/ 2>/dev/null || true
find .gpu_site -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu_site
