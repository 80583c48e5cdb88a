"""Convolution with a fused epilogue: out = relu(conv2d(x, W) + bias + residual) over channels_last (NHWC) tensors, and
the BatchNorm fold that turns conv + BatchNorm (eval) into one such convolution.

`conv2d_bias_relu` is the C++ op `torch.ops.fusedkernels.conv2d_bias_relu`: argument checks, the channels_last
conversion, the choice of kernel, autograd and autocast happen in C++ (csrc/conv/conv_ops.cpp). There is no fused
CUDA kernel yet: CUDA calls run the reference (PyTorch's convolution, i.e. cuDNN, then + residual and relu) through
the same op layer, with one warning; CPU inputs run the reference through the same autograd. Details: docs/conv.md.

`conv2d_bias_relu_ref` is the specification the tests hold the op to.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native

__all__ = ["conv2d_bias_relu", "conv2d_bias_relu_ref", "fold_batch_norm"]

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


def _without_native(x, weight, bias=None, stride=1, padding=0, dilation=1, residual=None):
    """The reference with the native op's one check F.conv2d does not make: a residual of the output's shape."""
    out = F.conv2d(x, weight, bias, stride, padding, dilation)
    if residual is not None and residual.shape != out.shape:
        raise RuntimeError(f"conv2d_bias_relu: residual must have the output's shape {list(out.shape)} (no "
                           f"broadcasting), got {list(residual.shape)}")
    return F.relu(out if residual is None else out + residual)


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
    F.conv2d's (padding as numbers: pad first for "same" or another padding mode); H_out = (H + 2 padding -
    dilation (kh - 1) - 1) // stride + 1, likewise W_out. x, weight and bias one dtype: float16 / bfloat16 are the
    fused kernel's (fp32 accumulation), float32 / float64 run the reference; a residual of that dtype joins the
    epilogue, one of another dtype is added with type promotion, as `relu(F.conv2d(...) + residual)` adds it.

    Layout: the kernel reads channels_last (NHWC) tensors. A CUDA x, weight or residual in another layout is
    converted (a copy on every call), with one UserWarning naming the cost: convert the model and its input once
    (model.to(memory_format=torch.channels_last)). Returns out channels_last in x's dtype (under autocast, which
    casts x, weight and bias as it does for F.conv2d: the autocast dtype).

    Differentiable in x, weight, bias and residual, to any order: the backward masks dy with out > 0 (the saved
    output), then dx, dweight and dbias (the sum of the masked gradient) come from PyTorch's convolution backward,
    and dresidual is the masked gradient.

    Raises RuntimeError where F.conv2d does, in its words (x not 3-D / 4-D, weight not 4-D, channels that do not
    match, a bias not [C_out], a non-positive stride or dilation, a negative padding, a kernel larger than the
    padded input, dtypes or devices that differ) and for a non-floating x or a residual not the output's shape;
    TypeError for arguments of the wrong type; NotImplementedError for sparse or nested tensors. CUDA inputs
    without a kernel (today: all) run the reference with one UserWarning per reason.
    """
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
    None); differentiable in every tensor. weight: [C_out, ...]; the others [C_out].
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    scale = running_var.to(dtype).add(eps).rsqrt()
    if bn_weight is not None:
        scale = scale * bn_weight.to(dtype)
    shift = -running_mean.to(dtype) if bias is None else bias.to(dtype) - running_mean.to(dtype)
    new_bias = shift * scale if bn_bias is None else shift * scale + bn_bias.to(dtype)
    new_weight = weight.to(dtype) * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype if bias is None else bias.dtype)
