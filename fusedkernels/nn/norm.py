"""FusedLayerNorm / FusedRMSNorm: subclasses of torch.nn.LayerNorm / RMSNorm with the fused forward and backward.

Being subclasses, they take the same arguments, hold the same parameters, load each other's state_dict
and pass `isinstance(m, nn.LayerNorm)` checks (weight-decay filters, initialisers). forward calls the C++
op directly: no Python work beyond the call.
"""

import torch
from torch import Tensor, nn

from ..ops import norm as ops


class FusedLayerNorm(nn.LayerNorm):
    """`torch.nn.LayerNorm` computed by fusedkernels.ops.layer_norm."""

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return torch.ops.fusedkernels.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return ops._layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class FusedRMSNorm(nn.RMSNorm):
    """`torch.nn.RMSNorm` computed by fusedkernels.ops.rms_norm (eps=None: float32's machine epsilon for
    16-bit inputs, as torch)."""

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return torch.ops.fusedkernels.rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return ops._rms_norm(input, self.normalized_shape, self.weight, self.eps)
