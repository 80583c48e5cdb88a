"""LayerNorm and RMSNorm over the trailing dimensions, fp32 statistics, mean / rstd saved for backward.

Native kernels: csrc/norm. The `*_ref` functions below are the specification: the CPU implementation of
the ops and the fallback for inputs without a native kernel. Algorithm and speed: docs/norm.md.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _native

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_NATIVE_HIDDEN = 65536  # csrc/norm/norm.h kMaxHidden

ShapeLike = Union[int, Sequence[int], torch.Size]


# ------------------------------------------------------------------------------------------------
# Reference: x is [..., H]; weight / bias [H]; mean / rstd float32 [rows]
# ------------------------------------------------------------------------------------------------


def layer_norm_fwd_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    xc = xf - mean
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    y = xc * rstd
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), mean.reshape(-1), rstd.reshape(-1)


def rms_norm_fwd_ref(x: Tensor, weight: Optional[Tensor], eps: float):
    xf = x.float()
    rstd = torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps)
    y = xf * rstd
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype), rstd.reshape(-1)


def _norm_bwd_ref(dy, x, weight, mean, rstd):
    """dx, sum_rows(dy * xhat), sum_rows(dy) in fp32; mean None for RMSNorm."""
    hidden = x.shape[-1]
    xf, dyf = x.float().reshape(-1, hidden), dy.float().reshape(-1, hidden)
    xhat = (xf if mean is None else xf - mean[:, None]) * rstd[:, None]
    g = dyf * weight.float() if weight is not None else dyf
    dx = g - (g * xhat).mean(-1, keepdim=True) * xhat
    if mean is not None:
        dx = dx - g.mean(-1, keepdim=True)
    dx = (dx * rstd[:, None]).to(x.dtype).reshape(x.shape)
    return dx, (dyf * xhat).sum(0), dyf.sum(0)


def layer_norm_bwd_ref(dy, x, weight, bias, mean, rstd):
    dx, dw, db = _norm_bwd_ref(dy, x, weight, mean, rstd)
    dw = dw.to(weight.dtype) if weight is not None else x.new_empty(0)
    db = db.to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dw, db


def rms_norm_bwd_ref(dy, x, weight, rstd):
    dx, dw, _ = _norm_bwd_ref(dy, x, weight, None, rstd)
    return dx, (dw.to(weight.dtype) if weight is not None else x.new_empty(0))


# ------------------------------------------------------------------------------------------------
# Registration: CPU = reference, fake (meta) shapes, autograd
# ------------------------------------------------------------------------------------------------

if _native.loaded:
    _ops = torch.ops.fusedkernels

    torch.library.register_kernel("fusedkernels::layer_norm_fwd", "cpu", layer_norm_fwd_ref)
    torch.library.register_kernel("fusedkernels::layer_norm_bwd", "cpu", layer_norm_bwd_ref)
    torch.library.register_kernel("fusedkernels::rms_norm_fwd", "cpu", rms_norm_fwd_ref)
    torch.library.register_kernel("fusedkernels::rms_norm_bwd", "cpu", rms_norm_bwd_ref)

    def _stats_like(x: Tensor) -> Tensor:
        return x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)

    def _grad_like(p: Optional[Tensor], x: Tensor) -> Tensor:
        return torch.empty_like(p) if p is not None else x.new_empty(0)

    @torch.library.register_fake("fusedkernels::layer_norm_fwd")
    def _(x, weight, bias, eps):
        return torch.empty_like(x), _stats_like(x), _stats_like(x)

    @torch.library.register_fake("fusedkernels::layer_norm_bwd")
    def _(dy, x, weight, bias, mean, rstd):
        return torch.empty_like(x), _grad_like(weight, x), _grad_like(bias, x)

    @torch.library.register_fake("fusedkernels::rms_norm_fwd")
    def _(x, weight, eps):
        return torch.empty_like(x), _stats_like(x)

    @torch.library.register_fake("fusedkernels::rms_norm_bwd")
    def _(dy, x, weight, rstd):
        return torch.empty_like(x), _grad_like(weight, x)

    def _layer_norm_setup(ctx, inputs, output):
        x, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)

    def _layer_norm_backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _ops.layer_norm_bwd(dy.contiguous(), x, weight, bias, mean, rstd)
        return dx, (dw if weight is not None else None), (db if bias is not None else None), None

    def _rms_norm_setup(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])

    def _rms_norm_backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _ops.rms_norm_bwd(dy.contiguous(), x, weight, rstd)
        return dx, (dw if weight is not None else None), None

    torch.library.register_autograd(
        "fusedkernels::layer_norm_fwd", _layer_norm_backward, setup_context=_layer_norm_setup
    )
    torch.library.register_autograd("fusedkernels::rms_norm_fwd", _rms_norm_backward, setup_context=_rms_norm_setup)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def _normalized_shape(shape: ShapeLike) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _flatten_inputs(op: str, x: Tensor, normalized_shape: ShapeLike, params: dict[str, Optional[Tensor]]):
    """Validate; return x as [..., H] (contiguous) and the parameters as [H] (contiguous)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    shape = _normalized_shape(normalized_shape)
    if len(shape) == 0 or tuple(x.shape[x.dim() - len(shape):]) != shape or len(shape) > x.dim():
        raise ValueError(f"{op}: normalized_shape {list(shape)} must be the trailing dimensions of x {list(x.shape)}")
    hidden = math.prod(shape)
    if hidden == 0:
        raise ValueError(f"{op}: normalized_shape {list(shape)} has no elements")
    flat = {}
    param_dtype = None
    for name, p in params.items():
        if p is None:
            flat[name] = None
            continue
        if tuple(p.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}")
        if p.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{op}: {name} must be {x.dtype} (like x) or float32, got {p.dtype}")
        if param_dtype is not None and p.dtype != param_dtype:
            raise TypeError(f"{op}: weight and bias must have the same dtype, got {param_dtype} and {p.dtype}")
        param_dtype = p.dtype
        flat[name] = p.reshape(hidden).contiguous()
    x2 = x.reshape(*x.shape[: x.dim() - len(shape)], hidden).contiguous()
    return x2, hidden, flat


def _use_native(op: str, x: Tensor, hidden: int) -> bool:
    """The one place that decides between the custom op and the reference."""
    if not _native.loaded:
        if x.is_cuda:
            _native.warn_fallback(op, f"the native module is not loaded ({_native.error})")
        return False
    if x.is_cuda:
        if not _native.has_cuda_kernel(f"{op}_fwd"):
            _native.warn_fallback(op, "this build has no CUDA kernel for it (see FUSEDKERNELS_FAMILIES)")
            return False
        if hidden > MAX_NATIVE_HIDDEN:
            _native.warn_fallback(op, f"normalized size {hidden} is past the native limit {MAX_NATIVE_HIDDEN}")
            return False
    return True


def layer_norm(
    x: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization over the trailing `normalized_shape` dimensions, like `F.layer_norm`.

    x: float32, float16 or bfloat16, any layout. weight / bias: shape `normalized_shape`, dtype of x or
    float32. Statistics and arithmetic in fp32; the output has x's dtype. Differentiable in x, weight and
    bias; dweight / dbias are deterministic.
    """
    x2, hidden, p = _flatten_inputs("layer_norm", x, normalized_shape, {"weight": weight, "bias": bias})
    if _use_native("layer_norm", x, hidden):
        y = torch.ops.fusedkernels.layer_norm_fwd(x2, p["weight"], p["bias"], eps)[0]
    else:
        y = layer_norm_fwd_ref(x2, p["weight"], p["bias"], eps)[0]
    return y.view(x.shape)


def rms_norm(
    x: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """Root-mean-square normalization over the trailing `normalized_shape` dimensions, like `F.rms_norm`.

    eps defaults to `torch.finfo(x.dtype).eps`, as in PyTorch. Otherwise as `layer_norm`, without bias.
    """
    x2, hidden, p = _flatten_inputs("rms_norm", x, normalized_shape, {"weight": weight})
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if _use_native("rms_norm", x, hidden):
        y = torch.ops.fusedkernels.rms_norm_fwd(x2, p["weight"], eps)[0]
    else:
        y = rms_norm_fwd_ref(x2, p["weight"], eps)[0]
    return y.view(x.shape)


# What `python -m fusedkernels.info` reports for this family.
SUPPORT = {
    "layer_norm": {
        "kernel": "layer_norm_fwd",
        "dtypes": "float32, float16, bfloat16 (weight/bias in x's dtype or float32)",
        "sizes": f"normalized size 1..{MAX_NATIVE_HIDDEN}; fastest path when it is a multiple of 16 bytes",
    },
    "rms_norm": {
        "kernel": "rms_norm_fwd",
        "dtypes": "float32, float16, bfloat16 (weight in x's dtype or float32)",
        "sizes": f"normalized size 1..{MAX_NATIVE_HIDDEN}; fastest path when it is a multiple of 16 bytes",
    },
}
