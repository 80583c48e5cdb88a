"""LayerNorm and RMSNorm over the trailing dimensions: fp32 statistics, one fused kernel each way.

`layer_norm` / `rms_norm` are the C++ ops `torch.ops.fusedkernels.layer_norm` / `rms_norm`: argument checks,
the choice of kernel, autograd and autocast all happen in C++ (csrc/norm/norm_ops.cpp), so a call costs
what `F.layer_norm` costs on the host. CUDA float32 / float16 / bfloat16 inputs up to 65536 normalized
elements run the fused kernels (csrc/norm); CPU inputs run PyTorch's CPU kernels through the same autograd;
anything else (float64 on CUDA, larger rows) runs PyTorch's op, with one warning. The `*_ref` functions are
the specification the tests hold the kernels to. Algorithm and speed: docs/norm.md.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native

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


def norm_bwd_ref(dy, x, weight, mean, rstd):
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


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------

# The native ops' argument checks (csrc/norm/norm_ops.cpp: check_args), with the same messages, for PyTorch's
# op that runs without them: it refuses the same inputs, some with other exception types (NotImplementedError
# for an integer input) and messages that do not name the argument.
def _check_args(op: str, input: Tensor, normalized_shape, weight, bias) -> None:
    if not input.is_floating_point():
        raise RuntimeError(f"{op}: input must be a floating-point tensor (float32, float16 or bfloat16 for the fused "
                           f"kernel), got {str(input.dtype).removeprefix('torch.')}")
    shape = list(normalized_shape)
    if not shape or len(shape) > input.dim() or list(input.shape[input.dim() - len(shape):]) != shape:
        raise RuntimeError(f"{op}: normalized_shape {shape} must be the trailing dimensions of input "
                           f"{list(input.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if list(p.shape) != shape:
            raise RuntimeError(f"{op}: {name} must have shape {shape}, got {list(p.shape)}")
        if p.device != input.device:
            raise RuntimeError(f"{op}: {name} is on {p.device} but input is on {input.device}")


def _checked_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    if isinstance(input, Tensor):  # (not fx's Proxy: F.layer_norm traces as one call)
        _check_args("layer_norm", input, normalized_shape, weight, bias)
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def _checked_rms_norm(input, normalized_shape, weight=None, eps=None):
    if isinstance(input, Tensor):
        _check_args("rms_norm", input, normalized_shape, weight, None)
    return F.rms_norm(input, normalized_shape, weight, eps)


_layer_norm = _native.public_op("layer_norm", _checked_layer_norm, "torch.nn.functional.layer_norm")
_rms_norm = _native.public_op("rms_norm", _checked_rms_norm, "torch.nn.functional.rms_norm")


def layer_norm(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization over the trailing `normalized_shape` dimensions, like `F.layer_norm`.

    input: [..., *normalized_shape], float32 / float16 / bfloat16 (fused kernel on CUDA) or float64, any
    layout. weight / bias: shape `normalized_shape`, input's dtype or float32. Statistics and arithmetic in
    fp32; the output has input's dtype (float32 under CUDA autocast, as `F.layer_norm`). Differentiable in
    input, weight and bias, to any order; dweight / dbias are deterministic.

    Raises RuntimeError, as F.layer_norm, for a non-floating input, shapes that do not match
    `normalized_shape` and parameters on another device (a dtype mix the kernels lack runs PyTorch's op,
    which computes it or raises its own error); TypeError for arguments of the wrong type.
    """
    if not isinstance(input, Tensor) and not hasattr(input, "__torch_function__"):  # (fx's Proxy has it)
        raise TypeError(f"layer_norm: input must be a Tensor, got {type(input).__name__}")
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    return _layer_norm(input, normalized_shape, weight, bias, eps)


def rms_norm(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """Root-mean-square normalization over the trailing `normalized_shape` dimensions, like `F.rms_norm`:
    y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019).

    eps=None uses the machine epsilon of the arithmetic's type, as PyTorch: float32's (1.19e-7) for float32,
    float16 and bfloat16 inputs, float64's for float64. Otherwise as `layer_norm`, without bias.
    """
    if not isinstance(input, Tensor) and not hasattr(input, "__torch_function__"):  # (fx's Proxy has it)
        raise TypeError(f"rms_norm: input must be a Tensor, got {type(input).__name__}")
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    return _rms_norm(input, normalized_shape, weight, eps)
