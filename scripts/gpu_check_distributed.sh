#!/usr/bin/env bash
# On a machine with two GPUs: the multi-GPU checks, logs to $OUT (default: ./gpu_out).
#   1. tests/test_distributed.py under torchrun, NCCL: DDP and FSDP2 with every fused optimizer against a
#      single-process run, clip_grad_norm_ / LAMB global norms, DCP round trips with torch.optim.AdamW;
#   2. one process, two GPUs: every op on cuda:1 first, then on both (per-device launch state);
#   3. the pytest variants (`cuda` markers) of the same, and the optimizer tests;
#   4. the bench suite `distributed` (FSDP2 GPT-2-medium step: FusedAdamW vs torch.optim.AdamW(fused=True)).
# Builds first unless GPU_CHECK_STEPS leaves out "build" (GPU_CHECK_STEPS="build test bench").
# NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
STEPS=${GPU_CHECK_STEPS:-build test bench}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() { echo "== $1 ($(date +%T))"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 2 ]; then
  echo "gpu_check_distributed: needs 2 GPUs, $gpus visible"
  exit 1
fi
if has build; then
  step build
  python3 setup.py build_ext --inplace >"$OUT/build_distributed.log" 2>&1 || { status=1; tail -30 "$OUT/build_distributed.log"; }
fi
if has test; then
  step "torchrun: DDP / FSDP2 / DCP on NCCL"
  timeout 900 python3 -m torch.distributed.run --standalone --nproc-per-node 2 tests/test_distributed.py --device cuda \
    >"$OUT/distributed_torchrun.log" 2>&1
  rc=$?
  grep -E "^\[rank [01]\] [a-z_0-9]+: " "$OUT/distributed_torchrun.log" | cut -c1-160
  [ $rc = 0 ] || { status=1; echo "torchrun run FAILED (exit $rc; see distributed_torchrun.log)"; }
  step "one process, two GPUs: cuda:1 first"
  timeout 600 python3 tests/test_distributed.py --per-device >"$OUT/distributed_per_device.log" 2>&1 || status=1
  tail -5 "$OUT/distributed_per_device.log"
  step "pytest: tests/test_distributed.py tests/test_optim.py"
  FUSEDKERNELS_REQUIRE_NATIVE=1 timeout 1800 python3 -m pytest -q -rfEs tests/test_distributed.py tests/test_optim.py \
    2>&1 | tee "$OUT/distributed_tests.log" | grep -v "^SKIPPED" | tail -25
  grep -qE "[0-9]+ passed" "$OUT/distributed_tests.log" && ! grep -qE "[0-9]+ (failed|error)" "$OUT/distributed_tests.log" || status=1
fi
if has bench; then
  step "bench: distributed"
  python3 -m bench distributed --out "$OUT" 2>&1 | tee "$OUT/bench_distributed.log" | tail -20 || status=1
fi
echo "== gpu_check_distributed: $([ $status = 0 ] && echo PASSED || echo FAILED) ($(date +%T))"
exit $status
