"""Functional API: one typed function per fused op, with autograd, torch.compile and CUDA-graph support.

Each op is a `torch.ops.fusedkernels` custom op. Its CPU kernel is PyTorch's own implementation (or the
reference where PyTorch has none), so everything runs without a GPU. Where no fused kernel covers a CUDA
input (native module not built, a dtype or size without a kernel), the op runs PyTorch's implementation,
with one warning.
"""

from .attention import attention, attention_varlen, scaled_dot_product_attention
from .conv import batch_norm_relu, conv2d_bias_relu, fold_batch_norm
from .gemm import gated_mlp, linear_act, linear_gated, mlp
from .llm import apply_rotary, linear_cross_entropy, rotary_cos_sin
from .norm import (
    add_layer_norm,
    add_rms_norm,
    bias_dropout_add_layer_norm,
    bias_dropout_add_rms_norm,
    layer_norm,
    rms_norm,
)
from .optim import adam_step_, grad_norm, lamb_apply_, lamb_moments_, lamb_step_, scale_grads_, sgd_step_

__all__ = [
    "attention",
    "attention_varlen",
    "scaled_dot_product_attention",
    "conv2d_bias_relu",
    "batch_norm_relu",
    "fold_batch_norm",
    "linear_act",
    "linear_gated",
    "gated_mlp",
    "mlp",
    "apply_rotary",
    "rotary_cos_sin",
    "linear_cross_entropy",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "bias_dropout_add_layer_norm",
    "bias_dropout_add_rms_norm",
    "adam_step_",
    "sgd_step_",
    "lamb_step_",
    "lamb_moments_",
    "lamb_apply_",
    "grad_norm",
    "scale_grads_",
]
