#!/usr/bin/env bash
# Nsight Compute on the Hopper attention forward with and without the additive bias (docs/perf-notes.md, attention:
# with a (B, H, N, N) bf16 bias the forward is ~280 us slower at 2x16x4096x128, about the time its 1 GiB takes to
# read, as if the bias loads were not hidden under the products). One launch of each after warm-up, with the
# counters that say where the time goes: DRAM bytes and throughput, SM throughput, issue slots, and the
# warp stall reasons (long scoreboard: global / cp.async data; barrier: __syncthreads; wait: fixed latency; mio
# throttle / short scoreboard: shared memory). Needs a build of the attention family. Output:
# $OUT/ncu_attention.txt. NCU_ATTENTION_SHAPE="2 16 4096 128" (batch, heads, tokens, head_dim).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum
metrics+=,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__inst_issued.avg.pct_of_peak_sustained_active
metrics+=,launch__registers_per_thread,launch__grid_size,launch__block_size,launch__shared_mem_per_block_dynamic
metrics+=,smsp__average_warp_latency_issue_stalled_long_scoreboard,smsp__average_warp_latency_issue_stalled_barrier
metrics+=,smsp__average_warp_latency_issue_stalled_wait,smsp__average_warp_latency_issue_stalled_mio_throttle
metrics+=,smsp__average_warp_latency_issue_stalled_short_scoreboard,smsp__average_warp_latency_issue_stalled_math_pipe_throttle
for bias in none float; do
  echo "== attention_fwd_sm90 bias=$bias shape ${NCU_ATTENTION_SHAPE:-2 16 4096 128}"
  ncu --clock-control none --metrics "$metrics" -k "regex:attention_fwd_sm90" --launch-skip 3 --launch-count 1 \
    python3 - "$bias" ${NCU_ATTENTION_SHAPE:-2 16 4096 128} <<'EOF' 2>&1 | grep -vE "^==PROF==|^\s*$" | grep -E "attention_fwd_sm90|  [a-z_]+__" || true
import sys

import torch

from fusedkernels import ops

bias_kind, b, h, n, d = sys.argv[1], *map(int, sys.argv[2:])
q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
bias = torch.randn(b, h, n, n, device="cuda", dtype=torch.bfloat16) if bias_kind == "float" else None
with torch.no_grad():
    for _ in range(4):  # ncu skips the first 3 launches of the kernel it profiles and takes the 4th
        ops.attention(q, k, v, attn_bias=bias)
torch.cuda.synchronize()
EOF
done | tee "$OUT/ncu_attention.txt"
