#!/usr/bin/env bash
# Builds scripts/norm_sweep.cu (the forward and backward register-path sweep) for the bench's three norm
# shapes, in parallel, and runs each on the GPU. Argument: fwd, bwd, small (the forwards in blocks of one to four
# warps) or full (the full-row instances against the general ones) to run one part only.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT" /tmp/norm_sweep
NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
shapes="16384x1024 16384x4096 65536x768"
for s in $shapes; do
  $NVCC -O3 -std=c++20 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Icsrc -DSWEEP_ROWS=${s%x*} -DSWEEP_HIDDEN=${s#*x} \
    scripts/norm_sweep.cu -o /tmp/norm_sweep/$s &
done
wait
for s in $shapes; do /tmp/norm_sweep/$s "$@"; done | tee "$OUT/norm_sweep.log"
