#!/usr/bin/env bash
# Set up, then run the benchmark suites (python -m bench [suite ...]); without a GPU, a CPU demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m bench "$@"
