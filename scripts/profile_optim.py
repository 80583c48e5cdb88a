"""Runs a few optimizer kernels once on the 355M list, for ncu (per-kernel time, DRAM bytes, grid).

    ncu --clock-control none -k regex:'scale|grad_norm|adam|lamb' --metrics ... python scripts/profile_optim.py
"""

import torch

from bench.optim import gpt2_medium_shapes
from fusedkernels import ops
from fusedkernels.optim import FusedAdamW, FusedLAMB

shapes = gpt2_medium_shapes()
for dtype in (torch.float32, torch.bfloat16):
    grads = [torch.randn(s, device="cuda", dtype=dtype) * 1e-3 for s in shapes]
    total, coef = ops.grad_norm(grads)
    ops.scale_grads_(grads, coef)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    for opt in (FusedAdamW(params, lr=1e-4), FusedLAMB(params, lr=1e-4)):
        opt.step()
        opt.step()
    del grads, params, opt
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
