"""FusedLayerNorm / FusedRMSNorm: subclasses of torch.nn.LayerNorm / RMSNorm with the fused forward and backward.

Being subclasses, they take the same arguments, hold the same parameters, load each other's state_dict
and pass `isinstance(m, nn.LayerNorm)` checks (weight-decay filters, initialisers).
"""

from torch import Tensor, nn

from ..ops import norm as ops


class FusedLayerNorm(nn.LayerNorm):
    """`torch.nn.LayerNorm` computed by fusedkernels.ops.layer_norm."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class FusedRMSNorm(nn.RMSNorm):
    """`torch.nn.RMSNorm` computed by fusedkernels.ops.rms_norm."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.normalized_shape, self.weight, self.eps)
