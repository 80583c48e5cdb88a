#!/usr/bin/env bash
# Set up, then run the test suite. Tests marked `cuda` skip (with the reason) where no GPU is visible.
# Where a CUDA toolkit is present the native module must have built and loaded: a build break fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -n "$(python3 -c 'import fusedkernels._build as b; print(b.find_cuda_home() or "")')" ]; then
  export FUSEDKERNELS_REQUIRE_NATIVE=1
fi
python3 -m pytest -q tests "$@"
