#!/usr/bin/env bash
# Set-up on a fresh machine: torch (if missing), test/bench tools, then an editable build of fusedkernels
# (the CUDA extension is compiled whenever a CUDA toolkit is found, GPU or not). Safe to re-run: ninja
# rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "== installing torch"
  "$PY" -m pip install -q "torch==2.14.1"
fi
"$PY" -m pip install -q pytest numpy ninja
echo "== building fusedkernels (MAX_JOBS=${MAX_JOBS:-$(nproc)})"
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "Running pip as the 'root' user" || true
"$PY" -m fusedkernels.info
