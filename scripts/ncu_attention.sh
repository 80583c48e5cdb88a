#!/usr/bin/env bash
# Nsight Compute on the Hopper attention forward with and without the additive bias, and on cuDNN's forward
# (torch's SDPA, CUDNN_ATTENTION backend) at the same shape (docs/perf-notes.md, attention: with a (B, H, N, N) bf16
# bias ours was ~280 us slower at 2x16x4096x128, about the time its 1 GiB takes to read; without it cuDNN is 1.25-1.7x
# faster). One launch of each after warm-up, with the counters that say where the time goes: DRAM bytes and
# throughput, the tensor pipe's active cycles, SM throughput, issue slots, and the warp stall reasons (long
# scoreboard: global / cp.async data; barrier: __syncthreads; wait: fixed latency; mio throttle / short scoreboard:
# shared memory). Needs a build of the attention family. Output: $OUT/ncu_attention.txt.
# NCU_ATTENTION_SHAPE="2 16 4096 128" (batch, heads, tokens, head_dim).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum
metrics+=,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__inst_issued.avg.pct_of_peak_sustained_active
metrics+=,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,lts__t_bytes.sum
metrics+=,launch__registers_per_thread,launch__grid_size,launch__block_size,launch__shared_mem_per_block_dynamic
metrics+=,smsp__average_warp_latency_issue_stalled_long_scoreboard,smsp__average_warp_latency_issue_stalled_barrier
metrics+=,smsp__average_warp_latency_issue_stalled_wait,smsp__average_warp_latency_issue_stalled_mio_throttle
metrics+=,smsp__average_warp_latency_issue_stalled_short_scoreboard,smsp__average_warp_latency_issue_stalled_math_pipe_throttle
for bias in none float cudnn; do
  kernel=$([ $bias = cudnn ] && echo "regex:sdpa|fprop|flash" || echo "regex:attention_fwd_sm90")
  echo "== ${kernel#regex:} bias=$bias shape ${NCU_ATTENTION_SHAPE:-2 16 4096 128}"
  ncu --clock-control none --metrics "$metrics" -k "$kernel" --launch-skip 3 --launch-count 1 \
    python3 - "$bias" ${NCU_ATTENTION_SHAPE:-2 16 4096 128} <<'EOF' 2>&1 | grep -vE "^==PROF==|^\s*$" | grep -E "[a-z_]+\(|  [a-z_]+__" || true
import sys

import torch

from fusedkernels import ops

bias_kind, b, h, n, d = sys.argv[1], *map(int, sys.argv[2:])
q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
bias = torch.randn(b, h, n, n, device="cuda", dtype=torch.bfloat16) if bias_kind == "float" else None
with torch.no_grad():
    for _ in range(4):  # ncu skips the first 3 launches of the kernel it profiles and takes the 4th
        if bias_kind == "cudnn":  # torch's SDPA on the [B, H, N, D] views, cuDNN's backend forced
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                 v.transpose(1, 2))
        else:
            ops.attention(q, k, v, attn_bias=bias)
torch.cuda.synchronize()
EOF
done | tee "$OUT/ncu_attention.txt"
