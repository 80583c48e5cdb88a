"""LayerNorm and RMSNorm over the trailing dimensions: fp32 statistics, one fused kernel each way; and the same
after a residual add (with an optional bias and dropout before it), returning the new residual too.

`layer_norm` / `rms_norm` are the C++ ops `torch.ops.fusedkernels.layer_norm` / `rms_norm`: argument checks,
the choice of kernel, autograd and autocast all happen in C++ (csrc/norm/norm_ops.cpp), so a call costs
what `F.layer_norm` costs on the host. CUDA float32 / float16 / bfloat16 inputs up to 65536 normalized
elements run the fused kernels (csrc/norm); CPU inputs run PyTorch's CPU kernels through the same autograd;
anything else (float64 on CUDA, larger rows) runs PyTorch's op, with one warning. The add + norm ops
(`add_layer_norm`, `add_rms_norm`, `bias_dropout_add_layer_norm`, `bias_dropout_add_rms_norm`) are C++ ops the same
way; what has no kernel runs `add_norm_ref`. The `*_ref` functions are the specification the tests hold the kernels
to. Algorithm and speed: docs/norm.md.
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
    if not shape:
        raise RuntimeError(f"{op}: normalized_shape must be at least 1-dimensional, got []")
    if len(shape) > input.dim() or list(input.shape[input.dim() - len(shape):]) != shape:
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


# ------------------------------------------------------------------------------------------------
# Add + norm: h = residual + dropout(x + bias), rounded to residual_dtype; returns (norm(h), h)
# ------------------------------------------------------------------------------------------------


def add_norm_ref(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    bias: Optional[Tensor] = None,
    p: float = 0.0,
    keep: Optional[Tensor] = None,
    residual_dtype: Optional[torch.dtype] = None,
    rms: bool = False,
):
    """The specification of the add + norm ops, differentiable: t = x + bias in fp32 (fp64 for fp64 x), dropped
    out with probability p (keep: the bool mask, True = kept, else drawn by F.dropout) and scaled by 1 / (1 - p),
    h = residual + t rounded to residual_dtype (None: x's), and LayerNorm (rms: RMSNorm) of the rounded h over
    the last dimension, in fp32 and then x's dtype. Returns (out, h)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    t = x.to(acc) if bias is None else x.to(acc) + bias.to(acc)
    if p > 0:
        if keep is None:
            t = F.dropout(t, p, training=True)
        else:
            t = t * keep.to(acc) / (1 - p) if p < 1 else t * 0
    h = (residual.to(acc) + t).to(residual_dtype or x.dtype)
    if eps is None:  # rms_norm's default; layer_norm's is 1e-5
        eps = torch.finfo(acc).eps if rms else 1e-5
    hf = h.to(acc)
    xc = hf if rms else hf - hf.mean(-1, keepdim=True)
    out = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(acc)
    if norm_bias is not None:
        out = out + norm_bias.to(acc)
    return out.to(x.dtype), h


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# The native ops' argument checks (csrc/norm/norm_ops.cpp: check_add_args and the schemas' types), with the same
# exception types and messages, for the reference that runs without them.
def _check_add_args(op, x, bias, residual, weight, norm_bias, p, residual_dtype, eps, training):
    for name, t, optional in (("x", x, False), ("bias", bias, True), ("residual", residual, False),
                              ("weight", weight, True), ("norm_bias", norm_bias, True)):
        if not isinstance(t, Tensor) and not (optional and t is None):
            raise TypeError(f"{op}: {name} must be a Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    for name, v, types in (("p", p, (int, float)), ("eps", eps, (int, float, type(None))), ("training", training, bool),
                           ("residual_dtype", residual_dtype, (torch.dtype, type(None)))):
        if not isinstance(v, types) or (name != "training" and isinstance(v, bool)):
            raise TypeError(f"{op}: {name} must be {'a dtype or None' if name == 'residual_dtype' else 'a number'}"
                            f"{'' if name != 'training' else ' (bool)'}, got {type(v).__name__}")
    if not x.is_floating_point():
        raise RuntimeError(f"{op}: x must be a floating-point tensor (float32, float16 or bfloat16 for the fused "
                           f"kernel), got {_name(x.dtype)}")
    if x.dim() < 1:
        raise RuntimeError(f"{op}: x must have at least one dimension (the normalized one)")
    if not residual.is_floating_point():
        raise RuntimeError(f"{op}: residual must be a floating-point tensor, got {_name(residual.dtype)}")
    rdt = torch.promote_types(x.dtype, residual.dtype) if residual_dtype is None else residual_dtype
    if rdt not in (x.dtype, torch.float32):
        raise RuntimeError(f"{op}: the residual stream's dtype (residual_dtype, else x + residual's) must be x's dtype "
                           f"({_name(x.dtype)}){'' if x.dtype == torch.float32 else ' or float32'}, got {_name(rdt)}")
    if residual.shape != x.shape:
        raise RuntimeError(f"{op}: residual must have x's shape {list(x.shape)}, got {list(residual.shape)}")
    if torch.promote_types(residual.dtype, rdt) != rdt:
        # a stream dtype the op takes that holds the residual exactly, else a residual of the stream's dtype
        holds = [t for t in (torch.float32, x.dtype) if t != rdt and torch.promote_types(residual.dtype, t) == t]
        advice = (f"pass residual_dtype=torch.{_name(holds[0])}, or a {_name(rdt)} residual" if holds
                  else f"pass a {_name(rdt)} residual")
        raise RuntimeError(f"{op}: a {_name(residual.dtype)} residual would be rounded to residual_dtype "
                           f"({_name(rdt)}): {advice}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{op}: p must be in [0, 1], got {p:f}")
    hidden = x.shape[-1]
    for name, t in (("bias", bias), ("weight", weight), ("norm_bias", norm_bias)):
        if t is not None and list(t.shape) != [hidden]:
            raise RuntimeError(f"{op}: {name} must have shape [{hidden}] (x's last dimension), got {list(t.shape)}")
    if bias is not None and bias.dtype != x.dtype:
        raise RuntimeError(f"{op}: bias must have x's dtype ({_name(x.dtype)}), got {_name(bias.dtype)}")
    for name, t in (("weight", weight), ("norm_bias", norm_bias)):
        if t is not None and t.dtype not in (x.dtype, torch.float32):
            raise RuntimeError(f"{op}: {name} must have x's dtype ({_name(x.dtype)}) or float32, got {_name(t.dtype)}")
    for name, t in (("residual", residual), ("bias", bias), ("weight", weight), ("norm_bias", norm_bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    return rdt


def _reference_op(op: str, rms: bool):
    """The reference as the native op runs it (its arguments positionally, its checks), for builds without it."""

    def call(x, bias, residual, weight, norm_bias, p, eps, training, residual_dtype):
        if isinstance(x, Tensor):  # (not fx's Proxy)
            rdt = _check_add_args(op, x, bias, residual, weight, norm_bias, p, residual_dtype, eps, training)
        else:
            rdt = residual_dtype
        return add_norm_ref(x, residual, weight, norm_bias, eps, bias=bias, p=p if training else 0.0,
                            residual_dtype=rdt, rms=rms)

    return call


_add_ln_ref, _add_rms_ref = _reference_op("add_layer_norm", False), _reference_op("add_rms_norm", True)
_bdal_ref = _reference_op("bias_dropout_add_layer_norm", False)
_bdar_ref = _reference_op("bias_dropout_add_rms_norm", True)
_INSTEAD = "the PyTorch reference"
_add_layer_norm = _native.public_op(
    "add_layer_norm", lambda x, r, w=None, b=None, eps=1e-5, rdt=None: _add_ln_ref(x, None, r, w, b, 0.0, eps, False, rdt),
    _INSTEAD)
_add_rms_norm = _native.public_op(
    "add_rms_norm", lambda x, r, w=None, eps=None, rdt=None: _add_rms_ref(x, None, r, w, None, 0.0, eps, False, rdt),
    _INSTEAD)
_bias_dropout_add_layer_norm = _native.public_op("bias_dropout_add_layer_norm", _bdal_ref, _INSTEAD)
_bias_dropout_add_rms_norm = _native.public_op(
    "bias_dropout_add_rms_norm",
    lambda x, bias, r, w, p, eps=None, training=True, rdt=None: _bdar_ref(x, bias, r, w, None, p, eps, training, rdt),
    _INSTEAD)


def _check_x(op: str, x) -> None:
    if not isinstance(x, Tensor) and not hasattr(x, "__torch_function__"):  # (fx's Proxy has it)
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    residual_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """(layer_norm(h), h) with h = x + residual, in one pass: the pre-norm transformer's residual add and the
    next norm (Ba et al. 2016, "Layer Normalization"; the fused form of flash-attention's and apex's
    residual + LayerNorm kernels).

    x: [..., H], float32 / float16 / bfloat16 (fused kernel on CUDA) or float64, any layout; normalized over the
    last dimension. residual: x's shape, any floating dtype that converts to residual_dtype without rounding.
    residual_dtype: the new residual's dtype, x's or torch.float32 (a float32 residual stream with 16-bit
    activations); None: that of x + residual as torch promotes it (float32 for a float32 residual beside a
    16-bit x, else x's). The sum is computed in
    float32 and rounded to residual_dtype; the norm reads the rounded value, so out = layer_norm(h) exactly as
    the returned h holds it. weight / bias: [H] in x's dtype or float32, or None. Returns out in x's dtype and h
    in residual_dtype. Differentiable in every tensor (the backward takes grads of both results), to any
    order; dweight / dbias are deterministic. Autocast does not cast (the op keeps x's dtype).

    Raises RuntimeError for a non-floating x, a 0-D x, a residual of another shape or one residual_dtype would
    round, a residual_dtype other than x's or float32, parameters not [H] or (weight, bias) not in x's dtype or
    float32, tensors on another device; TypeError for arguments of the wrong type. CUDA inputs without a kernel (float64, H > 65536, other parameter dtypes) run the reference with
    one UserWarning; without the native module the reference runs after the same checks.
    """
    _check_x("add_layer_norm", x)
    return _add_layer_norm(x, residual, weight, bias, eps, residual_dtype)


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    residual_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """(rms_norm(h), h) with h = x + residual, in one pass (Zhang & Sennrich 2019, "Root Mean Square Layer
    Normalization"; the fused residual add of Llama-style blocks). eps=None: float32's machine epsilon for
    float32 / float16 / bfloat16 x, as rms_norm. Otherwise as `add_layer_norm`, without bias.
    """
    _check_x("add_rms_norm", x)
    return _add_rms_norm(x, residual, weight, eps, residual_dtype)


def bias_dropout_add_layer_norm(
    x: Tensor,
    bias: Optional[Tensor],
    residual: Tensor,
    weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    p: float,
    eps: float = 1e-5,
    training: bool = True,
    residual_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """(layer_norm(h), h) with h = residual + dropout(x + bias), in one pass: a sublayer's output bias, its
    dropout, the residual add and the next LayerNorm (Megatron-LM's bias_dropout_add followed by the norm).

    bias: [H] in x's dtype, or None. p: the probability of dropping an element, in [0, 1] (1: every element
    dropped, h = residual); kept elements are scaled by 1 / (1 - p); with training=False or p = 0 there is no
    dropout. The mask comes from a counter-based generator (Philox4x32-10, Salmon et al. 2011) keyed by the
    seed and offset torch's CUDA generator hands out: the same for a fixed torch.manual_seed, CUDA-graph
    capturable, and regenerated by the backward instead of stored. weight / norm_bias: the norm's parameters.
    Otherwise as `add_layer_norm` (shapes, residual_dtype, results, errors; also ValueError for p outside [0, 1],
    as F.dropout). On the CPU the mask is drawn from a seed taken from torch's CPU generator (the same for a fixed
    torch.manual_seed) and regenerated from it by the backward. Under torch.func's grad, vjp, jacrev or jvp with
    dropout, and where no kernel takes the inputs, the PyTorch reference runs (F.dropout's mask); vmap runs the op
    per sample, a mask each whatever its `randomness` flag.
    """
    _check_x("bias_dropout_add_layer_norm", x)
    return _bias_dropout_add_layer_norm(x, bias, residual, weight, norm_bias, p, eps, training, residual_dtype)


def bias_dropout_add_rms_norm(
    x: Tensor,
    bias: Optional[Tensor],
    residual: Tensor,
    weight: Optional[Tensor],
    p: float,
    eps: Optional[float] = None,
    training: bool = True,
    residual_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """(rms_norm(h), h) with h = residual + dropout(x + bias), in one pass. As `bias_dropout_add_layer_norm`,
    with RMSNorm (eps=None: float32's machine epsilon, as rms_norm)."""
    _check_x("bias_dropout_add_rms_norm", x)
    return _bias_dropout_add_rms_norm(x, bias, residual, weight, p, eps, training, residual_dtype)
