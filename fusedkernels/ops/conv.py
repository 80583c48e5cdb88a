"""Convolution with a fused epilogue: out = relu(conv2d(x, W) + bias + residual) over channels_last (NHWC) tensors, the
BatchNorm fold that turns conv + BatchNorm (eval) into one such convolution, and BatchNorm + residual + ReLU
(`batch_norm_relu`) for the training-mode block.

`conv2d_bias_relu` resolves padding "same" / "valid" to numbers, then calls the C++ op
`torch.ops.fusedkernels.conv2d_bias_relu`: argument checks, the channels_last conversion, the choice of kernel,
autograd and autocast happen in C++ (csrc/conv/conv_ops.cpp). CUDA calls run, by layer class, our Hopper
implicit-GEMM kernel (1x1 stride-1 expansions from at most 64 channels, C_out >= 4 C_in, where it is faster) or cuDNN's
fused convolution + bias (+ residual) + ReLU (the rest), each falling back on the other (FUSEDKERNELS_CONV_KERNEL=sm90
or =cudnn: that one alone); where neither takes the call the reference (PyTorch's convolution, then + residual and
relu) runs with one warning; CPU inputs run the reference through the same autograd. Without the native op the
reference runs after the same checks. Details: docs/conv.md.

`conv2d_bias_relu_ref` and `batch_norm_relu_ref` are the specifications the tests hold the ops to.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import _native

__all__ = ["batch_norm_relu", "batch_norm_relu_ref", "conv2d_bias_relu", "conv2d_bias_relu_ref", "fold_batch_norm"]

IntPair = Union[int, tuple[int, int], list[int]]


def conv2d_bias_relu_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """The specification of `conv2d_bias_relu`, differentiable: F.relu(F.conv2d(x, weight, bias, stride, padding,
    dilation) (+ residual)), every step a PyTorch op in the inputs' dtype (pass float32 copies for an fp32
    reference). Raises what F.conv2d raises."""
    z = F.conv2d(x, weight, bias, stride, padding, dilation)
    return F.relu(z if residual is None else z + residual)


_OP = "conv2d_bias_relu"

# The native op's names in its messages (csrc/common/torch/checks.h's name_of, c10's names for the rest).
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64", torch.int32: "int32", torch.int64: "int64", torch.complex64: "complex64",
                torch.complex128: "complex128", torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short",
                torch.bool: "Bool", torch.complex32: "ComplexHalf"}
_LAYOUT_NAMES = {torch.sparse_coo: "Sparse", torch.sparse_csr: "SparseCsr", torch.sparse_csc: "SparseCsc",
                 torch.sparse_bsr: "SparseBsr", torch.sparse_bsc: "SparseBsc", torch._mkldnn: "Mkldnn"}


def _output_format(x: Tensor, weight: Optional[Tensor] = None) -> torch.memory_format:
    """The output layout PyTorch picks (F.conv2d from x and weight, F.batch_norm from x alone; conv_ops.cpp's
    output_format): channels_last when either has channels_last strides (suggest_memory_format), contiguous
    otherwise."""
    channels_last = any(t is not None and suggest_memory_format(t) == torch.channels_last for t in (x, weight))
    return torch.channels_last if channels_last else torch.contiguous_format


def _is_int_pair(v) -> bool:
    """An int[2] argument as the op's schema takes it and pair_of accepts it: an int or a sequence of 1 or 2."""
    return isinstance(v, int) or (isinstance(v, (list, tuple)) and len(v) in (1, 2)
                                  and all(isinstance(i, int) for i in v))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (v[0], v[-1])


def _shape(sizes) -> str:
    return "[" + ", ".join(str(s) for s in sizes) + "]"


def _check_residual(residual: Optional[Tensor], out_shape) -> None:
    if residual is not None and list(residual.shape) != list(out_shape):
        raise RuntimeError(f"{_OP}: residual must have the output's shape {_shape(out_shape)} (no broadcasting), got "
                           f"{_shape(residual.shape)}")


# The native op's argument checks (csrc/conv/conv_ops.cpp: the schema's types, pair_of, check_args), raising the
# same exception types with the same messages (the schema's TypeErrors in words of their own), for the reference
# that runs without it.
def _check_types(x, weight, bias, stride, padding, dilation, residual) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if not isinstance(t, Tensor) and (t is not None or name in ("x", "weight")):
            raise TypeError(f"{_OP}: {name} must be a Tensor{'' if name in ('x', 'weight') else ' or None'}, got "
                            f"{type(t).__name__}")
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if not isinstance(v, (int, list, tuple)) or isinstance(v, (list, tuple)) and not all(
                isinstance(i, int) for i in v):
            raise TypeError(f"{_OP}: {name} must be an int or a list of ints, got {v!r}")
        if not _is_int_pair(v):
            raise RuntimeError(f"{_OP}: expected {name} to be a single integer value or a list of 2 values to match "
                               f"the convolution dimensions, but got {name}={_shape(v)}")


def _check_args(x, weight, bias, stride, padding, dilation, residual, unbatched=False) -> None:
    """check_args for a 4-D x (residual_any_dtype: the public op adds a residual of another dtype after the
    convolution); unbatched: x has the batch of one added, the residual the unbatched output's shape."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and (t.layout != torch.strided or t.is_nested):
            kind = "nested" if t.is_nested else _LAYOUT_NAMES.get(t.layout, str(t.layout))
            raise NotImplementedError(f"{_OP} takes strided (dense) tensors; {name} is {kind}")
    if x.dim() != 4:
        raise RuntimeError(f"{_OP}: Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: "
                           f"{_shape(x.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"{_OP}: Expected 4-dimensional weight [out_channels, in_channels, kernel_h, kernel_w] "
                           f"for 4-dimensional input {_shape(x.shape)}, but got {weight.dim()}-dimensional weight of "
                           f"size {_shape(weight.shape)} instead")
    if weight.shape[0] <= 0:
        raise RuntimeError(f"{_OP}: Given groups=1, expected weight to be at least 1 at dimension 0, but got weight "
                           f"of size {_shape(weight.shape)} instead")
    if x.shape[1] != weight.shape[1]:
        raise RuntimeError(f"{_OP}: Given groups=1, weight of size {_shape(weight.shape)}, expected input"
                           f"{_shape(x.shape)} to have {weight.shape[1]} channels, but got {x.shape[1]} channels "
                           f"instead")
    name_of = lambda dtype: _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))  # noqa: E731
    if not x.is_floating_point():
        raise RuntimeError(f"{_OP}: x must be a floating-point tensor (float16 or bfloat16 for the fused kernel), got "
                           f"{name_of(x.dtype)}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.dtype != x.dtype and name != "residual":
            raise RuntimeError(f"{_OP}: {name} must have x's dtype ({name_of(x.dtype)}), got {name_of(t.dtype)}")
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{_OP}: {name} is on {t.device} but x is on {x.device}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(f"{_OP}: Given weight of size {_shape(weight.shape)}, expected bias to be 1-dimensional "
                           f"with {weight.shape[0]} elements, but got bias of size {_shape(bias.shape)} instead")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    pair = lambda v: f"({v[0]} x {v[1]})"  # noqa: E731
    for d in range(2):
        if stride[d] <= 0:
            raise RuntimeError(f"{_OP}: non-positive stride is not supported, got stride={pair(stride)}")
        if padding[d] < 0:
            raise RuntimeError(f"{_OP}: negative padding is not supported, got padding={pair(padding)}")
        if dilation[d] <= 0:
            raise RuntimeError(f"{_OP}: dilation should be greater than zero, got dilation={pair(dilation)}")
    kernel = [dilation[d] * (weight.shape[2 + d] - 1) + 1 for d in range(2)]
    if any(x.shape[2 + d] + 2 * padding[d] < kernel[d] for d in range(2)):
        raise RuntimeError(f"{_OP}: Calculated padded input size per channel: {_shape(x.shape[2:])} with padding "
                           f"{pair(padding)}. Kernel size: {_shape(weight.shape[2:])} with dilation {pair(dilation)}. "
                           f"Kernel size can't be greater than actual input size")
    out_shape = [x.shape[0], weight.shape[0],
                 *((x.shape[2 + d] + 2 * padding[d] - kernel[d]) // stride[d] + 1 for d in range(2))]
    _check_residual(residual, out_shape[1:] if unbatched else out_shape)


def _without_native(x, weight, bias=None, stride=1, padding=0, dilation=1, residual=None):
    """The reference as the native op runs it (no native module, or a build without the conv family): its
    argument types, autocast's casts, its checks and its output layout (x's)."""
    _check_types(x, weight, bias, stride, padding, dilation, residual)
    x, weight, bias = _native.autocast_casts(x.device.type, x, weight, bias)  # the residual is left as it is
    if x.dim() == 3:  # unbatched, as the op takes it: a batch of one
        return _checked_reference(x.unsqueeze(0), weight, bias, stride, padding, dilation, residual,
                                  unbatched=True).squeeze(0)
    return _checked_reference(x, weight, bias, stride, padding, dilation, residual)


def _checked_reference(x, weight, bias, stride, padding, dilation, residual, unbatched=False):
    _check_args(x, weight, bias, stride, padding, dilation, residual, unbatched)
    if unbatched and residual is not None:
        residual = residual.unsqueeze(0)
    out = conv2d_bias_relu_ref(x, weight, bias, stride, padding, dilation, residual)
    if torch._C._are_functorch_transforms_active():  # as the native op: no layout copy they cannot batch
        return out
    return out.contiguous(memory_format=_output_format(x, weight))


def _resolve_padding(x, weight, stride, padding: str, dilation):
    """(x, padding as numbers) for padding "valid" / "same", as F.conv2d resolves them: "same" pads dilation (k - 1)
    in all, half on each side, the odd one at the end (bottom / right), which F.conv2d pads explicitly (a copy of x).
    Arguments the op will refuse are left for its checks."""
    if padding == "valid":
        return x, 0
    if padding != "same":
        raise RuntimeError(f"{_OP}: Invalid padding string: {padding!r}")
    if _is_int_pair(stride) and _pair(stride) != (1, 1):
        raise RuntimeError(f"{_OP}: padding='same' is not supported for strided convolutions")
    if not (isinstance(weight, Tensor) and weight.dim() == 4 and _is_int_pair(dilation)):
        return x, 0
    total = [d * (k - 1) for d, k in zip(_pair(dilation), weight.shape[2:])]
    if (total[0] % 2 or total[1] % 2) and isinstance(x, Tensor) and x.layout == torch.strided and not x.is_nested:
        x = F.pad(x, (0, total[1] % 2, 0, total[0] % 2))
    return x, [total[0] // 2, total[1] // 2]


_conv2d_bias_relu = _native.public_op("conv2d_bias_relu", _without_native, "the PyTorch reference")


def conv2d_bias_relu(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """out = relu(conv2d(x, weight, stride, padding, dilation) + bias + residual): `nn.Conv2d` followed by a
    residual add and `nn.ReLU`, as one op (groups = 1).

    x: [N, C_in, H, W] (or unbatched [C_in, H, W]); weight: [C_out, C_in, kh, kw] as nn.Conv2d stores it; bias:
    [C_out] or None; residual: None or exactly the output's shape [N, C_out, H_out, W_out] (no broadcasting), added
    before the ReLU (the last convolution of a ResNet bottleneck). stride, padding, dilation: an int or a pair, as
    F.conv2d's; padding also "valid" (0) or "same" (stride 1; an odd total dilation (k - 1) pads x's bottom / right
    explicitly first, a copy of x, as F.conv2d does); H_out = (H + 2 padding - dilation (kh - 1) - 1) // stride + 1,
    likewise W_out. x, weight and bias one dtype: float16 / bfloat16 are the
    fused kernel's (fp32 accumulation), float32 / float64 run the reference; a residual of that dtype joins the
    epilogue, one of another dtype is added with type promotion, as `relu(F.conv2d(...) + residual)` adds it.

    Layout: the output's is F.conv2d's: channels_last when x or weight has channels_last strides, contiguous otherwise.
    The CUDA kernel reads and writes channels_last (NHWC) tensors: a CUDA x, weight or residual in another layout is
    converted (a copy on every call; for an NCHW x the output's copy back to NCHW too), with one UserWarning naming
    the cost: convert the model and its input once (model.to(memory_format=torch.channels_last)). CPU tensors are
    never converted. Returns out in x's dtype (under autocast, which casts x, weight and bias as it does for
    F.conv2d: the autocast dtype).

    Differentiable in x, weight, bias and residual, to any order: the backward masks dy with out > 0 (the saved
    output), then dx, dweight and dbias (the sum of the masked gradient) come from PyTorch's convolution backward,
    and dresidual is the masked gradient. Under torch.func transforms (vmap, grad, jacrev, hessian ...) the reference
    runs, which they transform as F.conv2d.

    Raises RuntimeError where F.conv2d does, in its words (x not 3-D / 4-D, weight not 4-D, channels that do not
    match, a bias not [C_out], a non-positive stride or dilation, a negative padding, a kernel larger than the
    padded input, dtypes or devices that differ) and for a non-floating x or a residual not the output's shape;
    TypeError for arguments of the wrong type; NotImplementedError for sparse or nested tensors; RuntimeError, as
    F.conv2d, for an unknown padding string and for "same" with a stride other than 1. Without the native module
    the reference runs after the same checks, with the same messages. CUDA inputs without a kernel (docs/conv.md,
    Routing) run the reference with one UserWarning per reason.
    """
    if isinstance(padding, str):
        x, padding = _resolve_padding(x, weight, stride, padding, dilation)
    if torch._C._are_functorch_transforms_active():  # vmap, grad ...: the reference, transformed as F.conv2d
        return _without_native(x, weight, bias, stride, padding, dilation, residual)
    return _conv2d_bias_relu(x, weight, bias, stride, padding, dilation, residual)


def fold_batch_norm(
    weight: Tensor,
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(weight', bias') of one convolution that computes BatchNorm(conv2d(x, weight) + bias) with running statistics
    (BatchNorm in eval mode):

        s = bn_weight / sqrt(running_var + eps)     (per output channel; bn_weight None: 1, bn_bias None: 0)
        weight' = weight * s,  bias' = (bias - running_mean) * s + bn_bias

    the standard fold (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", section 3.2; torch.nn.utils.fusion.fuse_conv_bn_weights computes the same).
    Computed in float32 (float64 for float64 weights), returned in weight's dtype and bias's (weight's when bias is
    None); differentiable in every tensor. weight: [C_out, ...]; the others [C_out]. The rounding to a float16
    weight's dtype overflows to inf where |weight * s| or |bias'| passes 65504 (a small running_var: s = 1/sqrt(eps)
    is 316 at eps=1e-5), where BatchNorm(conv2d(x, weight)) itself may stay finite; nothing checks it (a check
    would read the values on the host): torch.isfinite(weight'), as fuse(model, inference=True) does.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    scale = running_var.to(dtype).add(eps).rsqrt()
    if bn_weight is not None:
        scale = scale * bn_weight.to(dtype)
    shift = -running_mean.to(dtype) if bias is None else bias.to(dtype) - running_mean.to(dtype)
    new_bias = shift * scale if bn_bias is None else shift * scale + bn_bias.to(dtype)
    new_weight = weight.to(dtype) * scale.reshape([-1] + [1] * (weight.dim() - 1))
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype if bias is None else bias.dtype)


def batch_norm_relu_ref(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """The specification of `batch_norm_relu`, differentiable: F.relu(F.batch_norm(input, running_mean, running_var,
    weight, bias, training, momentum, eps) (+ residual)) in PyTorch ops. Raises what F.batch_norm raises."""
    z = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.relu(z if residual is None else z + residual)


def _check_eps(eps: float, training: bool, zero_refused: bool = torch.__version__ < (2, 12)) -> None:
    """F.batch_norm's check of eps, as the installed torch makes it (zero_refused: before 2.12 eval refused a zero eps
    too; a default, which TorchScript takes as a constant, as it compiles this for FusedConvBNReLU; NaN passes), for
    the fold, which would otherwise turn a bad eps into NaN."""
    if zero_refused and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive, but got {eps}")
    if training and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _batch_norm_relu_without_native(input, running_mean, running_var, weight=None, bias=None, training=False,
                                    momentum=0.1, eps=1e-5, residual=None):
    """The reference after the native op's own checks (the residual's shape and device; F.batch_norm makes the
    others), for builds without it."""
    if residual is not None and isinstance(input, Tensor):
        if list(residual.shape) != list(input.shape):
            raise RuntimeError(f"batch_norm_relu: residual must have input's shape {_shape(input.shape)} (no "
                               f"broadcasting), got {_shape(residual.shape)}")
        if residual.device != input.device:
            raise RuntimeError(f"batch_norm_relu: residual is on {residual.device} but input is on {input.device}")
    out = batch_norm_relu_ref(input, running_mean, running_var, weight, bias, training, momentum, eps, residual)
    return out.contiguous(memory_format=_output_format(input)) if input.dim() == 4 else out


_batch_norm_relu = _native.public_op("batch_norm_relu", _batch_norm_relu_without_native,
                                     "the PyTorch reference (F.batch_norm, + residual, relu)")


def batch_norm_relu(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """out = relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual):
    BatchNorm, the residual add of a ResNet block and ReLU as one op.

    Arguments as F.batch_norm's: input [N, C, ...]; running_mean, running_var [C] or None (training only), updated in
    place in training as torch updates them (running_mean = (1 - momentum) running_mean + momentum mean, running_var
    likewise with the unbiased batch variance n / (n - 1) var; momentum is the exponential-average factor, as
    nn.BatchNorm2d passes it: 1 / num_batches_tracked when its momentum is None); weight, bias [C] or None (1, 0);
    eval (training=False) normalises with the running statistics. residual: None or exactly input's shape (no
    broadcasting), added before the ReLU; one of another dtype is added with type promotion, unfused.

    Native kernel (CUDA): 4-D channels_last (NHWC) input of float32, float16 or bfloat16, weight, bias and running
    statistics float32 or input's dtype, any N, H, W and C; statistics in float32 (Welford's update per thread, Chan et
    al.'s pairwise combination across threads and blocks: no E[x²] - E[x]² cancellation), the output in input's dtype.
    Everything else (another layout, 2-D / 3-D / 5-D input, float64, forward-mode AD, CPU) runs the reference, CUDA
    inputs with one UserWarning per reason; CPU 4-D inputs go through the same op and autograd with PyTorch's batch
    norm underneath. Returns the output in input's dtype and memory format (channels_last for channels_last input).

    Differentiable in input, weight, bias and residual as F.batch_norm is (second derivatives in training, any order
    in eval): the backward reads the ReLU's mask from the saved output (out > 0), dresidual = the masked gradient g,
    dbias = Σ g, dweight = Σ g·xhat and, in training, dx = weight·invstd·(g - mean(g) - xhat·mean(g·xhat)) (eval:
    weight·invstd·g). Under torch.func transforms (vmap, grad, jacrev, hessian ...) the reference runs, which they
    transform as F.batch_norm.

    Raises ValueError as F.batch_norm for training with one value per channel ("Expected more than 1 value per
    channel when training") and for eps <= 0 in training or < 0 in eval; RuntimeError for running statistics that
    require grad (the op is not differentiable in them), for weight, bias or running statistics without C elements
    ("running_mean should contain C elements not ..."), input with fewer than 2 dimensions, a residual not input's
    shape or on another device, and whatever F.batch_norm raises on the reference path (eval without running
    statistics).
    """
    if torch._C._are_functorch_transforms_active():  # vmap, grad, jacfwd ...: transformed as F.batch_norm
        return batch_norm_relu_ref(input, running_mean, running_var, weight, bias, training, momentum, eps, residual)
    return _batch_norm_relu(input, running_mean, running_var, weight, bias, training, momentum, eps, residual)
