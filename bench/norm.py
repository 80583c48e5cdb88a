"""Suite `norm`: LayerNorm / RMSNorm forward and forward+backward, bf16, against torch eager and torch.compile;
and the residual forms (add_rms_norm, add_layer_norm, bias_dropout_add_layer_norm with p = 0.1) against the same
chains unfused (eager) and compiled, and Liger-Kernel's fused add + RMSNorm where liger_kernel is installed.

GB/s counts the minimum traffic. Norms, as the anchors count it (ANCHORS.md): forward reads x and writes y;
forward + backward also reads dy and writes dx. (The backward must read x again too, so the real traffic of
forward + backward is 5/4 of what GB/s assumes.) Residual forms: forward reads x and the residual and writes
y and the new residual h (4 units; the bias is [H]); the backward reads dy, dh and h and writes dresidual, which
is x's grad too (one tensor for both, as autograd's add) for add_rms_norm / add_layer_norm (4 more: 8 for forward +
backward), and also writes dx = mask * dresidual / (1 - p) for bias_dropout_add_layer_norm (5 more: 9), the mask
regenerated rather than read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedkernels import ops

from .common import Row, sets_for, time_graph

DROPOUT_P = 0.1
# Calls per CUDA-graph replay: the replay's launch (~2-3 µs on the H200) would otherwise add ~1.5 µs to each of the
# two calls a graph of the 16384x1024 inputs holds, 7% of a 20 µs forward.
MIN_CALLS = 16

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


def _liger_fused_add_rms_norm():
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    except Exception:  # not installed (optional), or its import failed here
        return None
    # (x, residual, weight, eps, offset, casting_mode, in_place), as LigerFusedAddRMSNorm calls it
    return lambda x, bias, r, w, nb: LigerFusedAddRMSNormFunction.apply(x, r, w, 1e-5, 0.0, "llama", False)


def _residual_impls(kind, hidden):
    """fn(x, bias, residual, weight, norm_bias) -> (out, h) per implementation."""
    shape = (hidden,)
    if kind == "add_rms_norm":
        def chain(x, bias, r, w, nb):
            h = x + r
            return F.rms_norm(h, shape, w, 1e-5), h

        ours = lambda x, bias, r, w, nb: ops.add_rms_norm(x, r, w, 1e-5)  # noqa: E731
    elif kind == "add_layer_norm":
        def chain(x, bias, r, w, nb):
            h = x + r
            return F.layer_norm(h, shape, w, nb), h

        ours = lambda x, bias, r, w, nb: ops.add_layer_norm(x, r, w, nb)  # noqa: E731
    else:
        def chain(x, bias, r, w, nb):
            h = r + F.dropout(x + bias, DROPOUT_P, training=True)
            return F.layer_norm(h, shape, w, nb), h

        ours = lambda x, bias, r, w, nb: ops.bias_dropout_add_layer_norm(x, bias, r, w, nb, DROPOUT_P)  # noqa: E731
    impls = {"fusedkernels": ours, "torch": chain, "torch.compile": torch.compile(chain, dynamic=False)}
    liger = _liger_fused_add_rms_norm() if kind == "add_rms_norm" else None  # Liger fuses the add with RMSNorm only
    if liger is not None:
        impls["liger"] = liger
    return impls


def _residual_rows(tokens, hidden, xs, dys, w, b) -> list[Row]:
    rows = []
    tensor_bytes = tokens * hidden * (torch.finfo(DTYPE).bits // 8)
    residuals = [torch.randn_like(x) for x in xs]
    dhs = [torch.randn_like(x) for x in xs]
    bias = torch.randn(hidden, device="cuda", dtype=DTYPE) * 0.1
    for kind in ("add_rms_norm", "add_layer_norm", "bias_dropout_add_layer_norm"):
        # (bias, weight, norm bias) as each kind takes them; the ones given get grads
        params = {"add_rms_norm": (None, w, None), "add_layer_norm": (None, w, b)}.get(kind, (bias, w, b))
        for impl, fn in _residual_impls(kind, hidden).items():
            def fwd(i, fn=fn):
                with torch.no_grad():
                    return fn(xs[i], bias, residuals[i], w, b)

            leaves = [t.detach().requires_grad_() if t is not None else None for t in params]
            xs_grad = [x.detach().requires_grad_() for x in xs]
            rs_grad = [r.detach().requires_grad_() for r in residuals]

            def fwd_bwd(i, fn=fn, leaves=leaves, xs_grad=xs_grad, rs_grad=rs_grad):
                out, h = fn(xs_grad[i], leaves[0], rs_grad[i], leaves[1], leaves[2])
                wrt = [xs_grad[i], rs_grad[i], *(t for t in leaves if t is not None)]
                return torch.autograd.grad([out, h], wrt, [dys[i], dhs[i]])

            for direction, call, units in (("fwd", fwd, 4), ("fwd+bwd", fwd_bwd, 9 if "dropout" in kind else 8)):
                ms = time_graph(call, len(xs), min_calls=MIN_CALLS)
                rows.append(Row("norm", f"{kind} {direction} {tokens}x{hidden} bf16", impl, round(ms, 5),
                                GBps=round(units * tensor_bytes / ms / 1e6, 1)))
                print(f"  {rows[-1].case:<52} {impl:<14} {ms * 1e3:9.1f} us {rows[-1].GBps:8.0f} GB/s", flush=True)
    return rows


def run() -> list[Row]:
    rows = []
    for tokens, hidden in SHAPES:
        elem = torch.finfo(DTYPE).bits // 8
        tensor_bytes = tokens * hidden * elem
        n_sets = sets_for(8 * tensor_bytes)  # the residual cases' x, residual, dy, dh and results
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
                    ms = time_graph(call, n_sets, min_calls=MIN_CALLS)
                    rows.append(
                        Row("norm", f"{kind} {direction} {tokens}x{hidden} bf16", impl, round(ms, 5),
                            GBps=round(units * tensor_bytes / ms / 1e6, 1))
                    )
                    print(f"  {rows[-1].case:<36} {impl:<14} {ms * 1e3:9.1f} us {rows[-1].GBps:8.0f} GB/s", flush=True)
        rows += _residual_rows(tokens, hidden, xs, dys, w, b)
        del xs, dys
        torch.cuda.empty_cache()
    return rows
