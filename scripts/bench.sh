#!/usr/bin/env bash
# Set up, then run the benchmark suites (python -m bench [suite ...] [--out DIR]); without a GPU, a CPU demo.
# $PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" -m bench "$@"
