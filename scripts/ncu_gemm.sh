#!/usr/bin/env bash
# Nsight Compute on the gated MLP's GEMMs at the models suite's shape (tokens 8192, hidden 2048, intermediate 5632;
# docs/perf-notes.md, gemm "gated MLP backward v1.3"): ours (linear_gated's gate/up GEMM, linear_act's down GEMM,
# gated_dgrad's GEMM with the gated backward in its epilogue) against cuBLAS's GEMM of the same sizes, one launch
# each after warm-up, with the counters that tell where a GEMM loses to cuBLAS: tensor-pipe activity, L2 and DRAM
# traffic (operand reuse: our 64 x 256 ping-pong tiles fill shared memory with ~1.7x the bytes per FLOP of
# cuBLAS's 256 x 128 cooperative ones), and the warps' stall reasons. Needs a build of the gemm family.
# Output: $OUT/ncu_gemm.txt. NCU_GEMM_SHAPE="8192 2048 5632" (tokens, hidden, intermediate); NCU_GEMM_CALLS="gate_up
# down dgrad" (default), or an activation name (relu, gelu, ...): linear_act(x [tokens, hidden], W [intermediate,
# hidden], bias, that activation) against cuBLAS's x @ W^T. NCU_GEMM_SOURCE=1: also our kernel's warp-stall samples
# by SASS instruction ($OUT/ncu_<call>_sass.csv, the hottest lines printed): which instructions its warps wait at.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
metrics=gpu__time_duration.sum,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active
metrics+=,lts__t_bytes.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum
metrics+=,launch__registers_per_thread,launch__grid_size,launch__block_size,launch__cluster_dim_x
metrics+=,smsp__average_warp_latency_issue_stalled_barrier,smsp__average_warp_latency_issue_stalled_long_scoreboard
metrics+=,smsp__average_warp_latency_issue_stalled_wait,smsp__average_warp_latency_issue_stalled_math_pipe_throttle
metrics+=,smsp__average_warp_latency_issue_stalled_mio_throttle,smsp__average_warp_latency_issue_stalled_short_scoreboard
metrics+=,smsp__inst_executed.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum
read -r tokens hidden inter <<<"${NCU_GEMM_SHAPE:-8192 2048 5632}"
program=$(mktemp --suffix .py)
cat >"$program" <<'EOF'
import sys

import torch

from fusedkernels import _native, ops  # (_native: registers the internal ops)

call, m, h, f = sys.argv[1], *map(int, sys.argv[2:])
g = torch.Generator("cuda").manual_seed(0)
rand = lambda *shape: torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16)  # noqa: E731
x, gate_up, down = rand(m, h), rand(2 * f, h) * h**-0.5, rand(h, f) * f**-0.5
act, z, dy = rand(m, f), rand(m, 2 * f), rand(m, h)  # down's input, the gate / up pre-activation, the MLP's grad
w, b = rand(f, h) * h**-0.5, rand(f)  # an activation call's Linear
ours = {"gate_up": lambda: ops.linear_gated(x, gate_up, None, "swiglu"),
        "down": lambda: ops.linear_act(act, down, None, "none"),
        "dgrad": lambda: torch.ops.fusedkernels.gated_dgrad(dy, down, z, 4)}.get(  # 4: silu (gemm.h)
            call, lambda: ops.linear_act(x, w, b, call))
cublas = {"gate_up": lambda: x @ gate_up.t(), "down": lambda: act @ down.t(), "dgrad": lambda: dy @ down}.get(
    call, lambda: x @ w.t())
with torch.no_grad():
    for _ in range(4):  # ncu skips the first 3 launches of the kernel it profiles and takes the 4th
        ours()
        cublas()
torch.cuda.synchronize()
EOF
for call in ${NCU_GEMM_CALLS:-gate_up down dgrad}; do
  for kernel in linear_act_sm90 nvjet; do  # ours, then cuBLAS's (each after its warm-up launches)
    echo "== $call ${tokens}x${hidden}x${inter} $kernel"
    ncu --clock-control none --metrics "$metrics" -k "regex:$kernel" --launch-skip 3 --launch-count 1 \
      python3 "$program" "$call" "$tokens" "$hidden" "$inter" 2>&1 | grep -vE "^==PROF==|^\s*$" |
      grep -E "$kernel|  [a-z_]+__" || true
  done
  if [ "${NCU_GEMM_SOURCE:-0}" = 1 ]; then
    report="$OUT/ncu_$call"
    ncu --clock-control none --section SourceCounters --section WarpStateStats -k regex:linear_act_sm90 \
      --launch-skip 3 --launch-count 1 -f -o "$report" python3 "$program" "$call" "$tokens" "$hidden" "$inter" \
      >/dev/null 2>&1 || true
    ncu -i "$report.ncu-rep" --page source --csv --print-source sass >"${report}_sass.csv" || true
    rm -f "$report.ncu-rep"
    echo "== $call: the SASS lines with the most warp-stall samples"
    python3 - "${report}_sass.csv" <<'PY' || true
import csv
import sys

lines = open(sys.argv[1]).read().splitlines()
header = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))  # after the kernel's name
rows = list(csv.DictReader(lines[header:]))
samples = next(c for c in rows[0] if c.startswith("Warp Stall Sampling (All"))
value = lambda r, c: float((r.get(c) or "0").replace(",", "") or 0)  # noqa: E731
total = sum(value(r, samples) for r in rows)
reasons = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
by_reason = {c: sum(value(r, c) for r in rows) for c in reasons}
top = sorted(by_reason.items(), key=lambda item: -item[1])[:8]
print(f"{len(rows)} instructions, {total:.0f} samples; by reason:",
      ", ".join(f"{c[6:]} {v / sum(by_reason.values()):.0%}" for c, v in top))
for r in sorted(rows, key=lambda r: -value(r, samples))[:40]:
    print(f"{value(r, samples) / total:6.1%}  {r.get('Address', '')}  {r.get('Source', '')}")
PY
  fi
done | tee "$OUT/ncu_gemm.txt"
