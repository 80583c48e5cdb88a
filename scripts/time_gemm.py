"""Times our linear_act alone on the gemm suite's forward shapes (no baselines: an A/B of two builds in one run).

    python3 scripts/time_gemm.py LABEL [REGEX]

One line: LABEL, then `shape act: µs` per case whose name matches REGEX (all by default), bf16, no grad, CUDA-graph
replays over rotating input sets (bench/common.py). Run it from each build in turn, alternating, for two rounds or
more: the K = 4096 rows move ±5% between rounds of one build (the clock under a long GEMM).
"""

import re
import sys

import torch

from bench import common
from fusedkernels import ops

CASES = [(16384, 768, 3072, act, False) for act in ("gelu", "gelu_tanh", "relu", "silu")]
CASES += [(16384, 768, 3072, "gelu", True), (16384, 3072, 768, "relu", False), (16384, 3072, 768, "none", True)]
CASES += [(4096, 1024, 4096, act, False) for act in ("gelu", "relu")]
CASES += [(8192, 4096, 16384, act, False) for act in ("gelu", "relu")] + [(8192, 4096, 11008, "silu", False)]
CASES += [(128, 4096, 4096, "gelu", False), (64, 4096, 4096, "gelu", False), (200, 4096, 4096, "relu", False)]


def main() -> None:
    label, pattern = sys.argv[1], re.compile(sys.argv[2] if len(sys.argv) > 2 else "")
    g = torch.Generator("cuda").manual_seed(0)
    out = []
    for m, k, n, act, residual in CASES:
        name = f"{m}x{k}x{n} {act}{' +residual' if residual else ''}"
        if not pattern.search(name):
            continue
        sets = common.sets_for((m * k + n * k + m * n) * 2, max_sets=4)
        xs = [torch.randn(m, k, device="cuda", generator=g).bfloat16() for _ in range(sets)]
        w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).bfloat16()
        b = torch.randn(n, device="cuda", generator=g).bfloat16()
        r = torch.randn(m, n, device="cuda", generator=g).bfloat16() if residual else None
        with torch.no_grad():
            ms = common.time_graph(lambda i: ops.linear_act(xs[i], w, b, act, r), sets, replays=20, min_calls=8)
        out.append(f"{name}: {ms * 1e3:.1f}")
    print(label, " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
