"""Suite `norm`: LayerNorm / RMSNorm forward and forward+backward, bf16, against torch eager and torch.compile.

GB/s counts the minimum traffic the anchors count (ANCHORS.md): forward reads x and writes y; forward +
backward also reads dy and writes dx. (The backward must read x again too, so the real traffic of
forward + backward is 5/4 of what GB/s assumes.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedkernels import ops

from .common import Row, sets_for, time_graph

SHAPES = [(16384, 1024), (16384, 4096), (65536, 768)]
DTYPE = torch.bfloat16


def _impls(kind):
    if kind == "layer_norm":
        torch_fn = lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)  # noqa: E731
        ours_fn = lambda x, w, b: ops.layer_norm(x, (x.shape[-1],), w, b)  # noqa: E731
    else:
        torch_fn = lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w, 1e-5)  # noqa: E731
        ours_fn = lambda x, w, b: ops.rms_norm(x, (x.shape[-1],), w, 1e-5)  # noqa: E731
    return {"fusedkernels": ours_fn, "torch": torch_fn, "torch.compile": torch.compile(torch_fn, dynamic=False)}


def run() -> list[Row]:
    rows = []
    for tokens, hidden in SHAPES:
        elem = torch.finfo(DTYPE).bits // 8
        tensor_bytes = tokens * hidden * elem
        n_sets = sets_for(4 * tensor_bytes)
        xs = [torch.randn(tokens, hidden, device="cuda", dtype=DTYPE) for _ in range(n_sets)]
        dys = [torch.randn_like(x) for x in xs]
        w = torch.rand(hidden, device="cuda", dtype=DTYPE) + 0.5
        b = torch.randn(hidden, device="cuda", dtype=DTYPE) * 0.1
        for kind in ("layer_norm", "rms_norm"):
            params = [w, b] if kind == "layer_norm" else [w]
            for impl, fn in _impls(kind).items():
                bias = b if kind == "layer_norm" else None

                def fwd(i, fn=fn, bias=bias):
                    with torch.no_grad():
                        return fn(xs[i], w, bias)

                xs_grad = [x.detach().requires_grad_() for x in xs]
                leaves = [p.detach().requires_grad_() for p in params]

                def fwd_bwd(i, fn=fn, leaves=leaves, kind=kind):
                    y = fn(xs_grad[i], leaves[0], leaves[1] if kind == "layer_norm" else None)
                    return torch.autograd.grad(y, [xs_grad[i], *leaves], dys[i])

                for direction, call, units in (("fwd", fwd, 2), ("fwd+bwd", fwd_bwd, 4)):
                    ms = time_graph(call, n_sets)
                    rows.append(
                        Row("norm", f"{kind} {direction} {tokens}x{hidden} bf16", impl, round(ms, 5),
                            GBps=round(units * tensor_bytes / ms / 1e6, 1))
                    )
                    print(f"  {rows[-1].case:<36} {impl:<14} {ms * 1e3:9.1f} us {rows[-1].GBps:8.0f} GB/s", flush=True)
        del xs, dys
        torch.cuda.empty_cache()
    return rows
