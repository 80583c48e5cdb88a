#!/usr/bin/env bash
# Nsight Compute on the norm forwards where torch.compile still leads (docs/perf-notes.md, norm): ours against
# compile's Triton kernel on the same inputs, one launch each after warm-up, with the counters that tell a memory
# kernel's story (DRAM throughput, achieved occupancy, warp stall reasons, bytes in flight). Needs a build of the
# norm family. Output: $OUT/ncu_norm.txt. NCU_NORM_SHAPES="16384x1024 65536x768", NCU_NORM_OPS="layer_norm rms_norm
# add_rms_norm" (defaults: 16384x1024; layer_norm, add_rms_norm: each case compiles once, ~30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum
metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size,launch__block_size
metrics+=,smsp__average_warp_latency_issue_stalled_long_scoreboard,smsp__average_warp_latency_issue_stalled_barrier
metrics+=,smsp__average_warp_latency_issue_stalled_short_scoreboard,smsp__average_warp_latency_issue_stalled_wait
metrics+=,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,lts__t_sectors_srcunit_tex_op_read.sum
for shape in ${NCU_NORM_SHAPES:-16384x1024}; do
  for op in ${NCU_NORM_OPS:-layer_norm add_rms_norm}; do
    for kernel in fwd_registers triton; do  # ours, then compile's (each after its warm-up launches)
      echo "== $op $shape $kernel"
      ncu --clock-control none --metrics "$metrics" -k "regex:$kernel" --launch-skip 3 --launch-count 1 \
        python3 - "$op" "${shape%x*}" "${shape#*x}" <<'EOF' 2>&1 | grep -vE "^==PROF==|^\s*$" | grep -E "$kernel|  [a-z_]+__" || true
import sys

import torch
import torch.nn.functional as F

from fusedkernels import ops

op, rows, hidden = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x, r = (torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
w, b = (torch.randn(hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
ours = {"layer_norm": lambda: ops.layer_norm(x, (hidden,), w, b),
        "rms_norm": lambda: ops.rms_norm(x, (hidden,), w, 1e-5),
        "add_rms_norm": lambda: ops.add_rms_norm(x, r, w, 1e-5)}[op]
plain = {"layer_norm": lambda x, r: F.layer_norm(x, (hidden,), w, b),
         "rms_norm": lambda x, r: F.rms_norm(x, (hidden,), w, 1e-5),
         "add_rms_norm": lambda x, r: (F.rms_norm(x + r, (hidden,), w, 1e-5), x + r)}[op]
compiled = torch.compile(plain, dynamic=False)
with torch.no_grad():
    for _ in range(4):  # ncu skips the first 3 launches of the kernel it profiles and takes the 4th
        ours()
        compiled(x, r)
torch.cuda.synchronize()
EOF
    done
  done
done | tee "$OUT/ncu_norm.txt"
