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
export PIP_ROOT_USER_ACTION=ignore
# The build runs without isolation (it compiles against the installed torch), so its tools come from here:
# setuptools >= 77 reads the SPDX license expression of pyproject.toml.
"$PY" -m pip install -q pytest numpy ninja "setuptools>=77" wheel
echo "== building fusedkernels (MAX_JOBS=${MAX_JOBS:-$(nproc)})"
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -m fusedkernels.info
