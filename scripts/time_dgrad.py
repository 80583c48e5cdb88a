"""Times the MLP backward's dgrad step on the H200: dh = dy @ W2 by cuBLAS alone, cuBLAS + act_backward's pass (the
unfused step) and act_dgrad (act' and the bias gradient in the GEMM's epilogue), for an A/B of two builds in one run.

    python3 scripts/time_dgrad.py LABEL

One line a shape: LABEL, tokens x hidden x intermediate, then µs each (bf16, gelu; CUDA-graph replays over rotating
inputs, bench/common.py). Run it from each build in turn, alternating, for two rounds or more.
"""

import sys

import torch

from bench import common
from fusedkernels import _native  # noqa: F401 (registers the ops)
from fusedkernels.ops.gemm import ACTIVATIONS

SHAPES = [(16384, 768, 3072), (8192, 1024, 4096), (8192, 4096, 16384)]  # BERT-base, BERT-large, GPT-3 6.7B FFNs


def main() -> None:
    ops, gelu = torch.ops.fusedkernels, ACTIVATIONS.index("gelu")
    g = torch.Generator("cuda").manual_seed(0)
    for m, h, f in SHAPES:
        sets = common.sets_for((m * h + 2 * m * f) * 2, max_sets=4)
        dys = [torch.randn(m, h, device="cuda", generator=g).bfloat16() for _ in range(sets)]
        zs = [torch.randn(m, f, device="cuda", generator=g).bfloat16() for _ in range(sets)]
        w = (torch.randn(h, f, device="cuda", generator=g) * f**-0.5).bfloat16()
        with torch.no_grad():
            times = {name: common.time_graph(call, sets, replays=20, min_calls=6) * 1e3 for name, call in (
                ("cublas", lambda i: dys[i] @ w),
                ("unfused", lambda i: ops.act_backward(dys[i] @ w, zs[i], gelu)),
                ("act_dgrad", lambda i: ops.act_dgrad(dys[i], w, zs[i], gelu)))}
        print(sys.argv[1], f"{m}x{h}x{f}", " ".join(f"{k} {v:.1f}" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
