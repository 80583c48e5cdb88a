#!/usr/bin/env bash
# Set up, then run the test suite; extra arguments go to pytest (e.g. -k layer_norm, -x). Tests marked
# `cuda` skip, with the reason shown, where no GPU is visible. Where a CUDA toolkit is present (and
# FUSEDKERNELS_SKIP_CUDA is not 1) the native module must have built and loaded: a build break fails here.
# $PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
if [ "$("$PY" -c 'import fusedkernels._build as b; print(int(b.native_required()))')" = 1 ]; then
  export FUSEDKERNELS_REQUIRE_NATIVE=1
fi
# The whole suite, unless the arguments name test paths themselves (scripts/test.sh tests/test_norm.py::...).
paths=tests
for arg in "$@"; do [[ "$arg" == tests* ]] && paths=; done
"$PY" -m pytest -q -rs $paths "$@"
