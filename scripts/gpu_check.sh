#!/usr/bin/env bash
# On a GPU machine: build with all cores, run the whole test suite (cuda tests included), run
# compute-sanitizer memcheck + racecheck over the kernels on small shapes, run the benchmarks.
# Logs and results go to $OUT (default: ./gpu_out). Exit status: non-zero if any step failed.
#   GPU_CHECK_STEPS="build test sanitize bench"  pick steps;   BENCH_SUITES="norm overhead"  pick suites;
#   FUSEDKERNELS_FAMILIES=norm  build one family;   SANITIZE_TIMEOUT=300  seconds per sanitizer tool;
#   SANITIZE_FAMILIES=gemm  sanitize those families only;
#   GPU_TESTS="tests/test_attention.py"  pytest paths (default: tests);
#   BENCH_CASES="bias|8192"  only the attention / gemm / conv cases whose name matches (bench/common.py, selected).
#   GPU_CHECK_STEPS="distributed": the two-GPU checks (scripts/gpu_check_distributed.sh: torchrun tests, the
#   `distributed` bench suite), not in the default steps.
#   GPU_CHECK_STEPS="profile": the models step's time and memory by module (scripts/profile_models.py --memory),
#   Nsight Compute of the attention forwards (scripts/ncu_attention.sh) and of the gated MLP's GEMMs against cuBLAS's
#   (scripts/ncu_gemm.sh); not in the default steps. PROFILE_TIMEOUT=240 seconds each.
# Wheels in .whl/ (e.g. Liger-Kernel's, for the overhead suite's comparison) are installed first, without
# their dependencies, into a folder on PYTHONPATH: the GPU machine cannot download.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
STEPS=${GPU_CHECK_STEPS:-build test sanitize bench}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() { echo "== $1 ($(date +%T))"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if has build; then
  step build
  python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { status=1; tail -30 "$OUT/build.log"; }
  python3 -m fusedkernels.info | tee -a "$OUT/build.log"
fi
if has test; then
  step test
  FUSEDKERNELS_REQUIRE_NATIVE=1 python3 -m pytest -q -rfEs ${GPU_TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | grep -v "^SKIPPED" | tail -25 || status=1
  grep -qE "[0-9]+ passed" "$OUT/tests.log" && ! grep -qE "[0-9]+ (failed|error)" "$OUT/tests.log" || status=1
fi
if has sanitize; then
  step sanitize
  for tool in memcheck racecheck; do
    echo "-- $tool" >>"$OUT/sanitize.log"
    args=$([ $tool = racecheck ] && echo --fp32-optim)
    timeout "${SANITIZE_TIMEOUT:-300}" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      python3 scripts/sanitize_kernels.py $args >>"$OUT/sanitize.log" 2>&1 || { status=1; echo "$tool FAILED"; }
    tail -3 "$OUT/sanitize.log"
  done
fi
if has bench; then
  step bench
  python3 -m bench ${BENCH_SUITES:-} --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60 || status=1
fi
if has profile; then
  step profile
  for cmd in "python3 scripts/profile_models.py --memory fusedkernels liger" "bash scripts/ncu_attention.sh" \
             "bash scripts/ncu_gemm.sh"; do
    echo "-- $cmd"
    timeout "${PROFILE_TIMEOUT:-240}" $cmd >>"$OUT/profile.log" 2>&1 || { status=1; echo "$cmd FAILED or timed out"; }
    tail -5 "$OUT/profile.log"
  done
fi
if has distributed; then
  step distributed
  GPU_CHECK_STEPS="test bench" OUT="$OUT" bash scripts/gpu_check_distributed.sh || status=1
fi
echo "== gpu_check: $([ $status = 0 ] && echo PASSED || echo FAILED) ($(date +%T))"
exit $status
