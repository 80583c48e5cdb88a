"""Functional API: one typed function per fused op, with autograd, torch.compile and CUDA-graph support.

Each op is a `torch.ops.fusedkernels` custom op whose CPU implementation is the PyTorch reference, so
everything runs (slowly) without a GPU. Where no native kernel covers the input (native module not built,
or a size past the kernel's limit) a CUDA tensor runs the reference too, with one warning.
"""

from .norm import layer_norm, rms_norm
from .optim import adam_step_, grad_norm, scale_grads_, sgd_step_

__all__ = ["layer_norm", "rms_norm", "adam_step_", "sgd_step_", "grad_norm", "scale_grads_"]
