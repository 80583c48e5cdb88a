"""Drop-in modules: same constructor arguments, parameters and state_dict as the torch modules they replace."""

from .attention import FusedMultiheadAttention, FusedSelfAttention
from .conv import FusedConv2dReLU, FusedConvBNReLU
from .linear import FusedLinear
from .loss import FusedLinearCrossEntropyLoss
from .mlp import FusedMLP
from .norm import (
    FusedAddLayerNorm,
    FusedAddRMSNorm,
    FusedBiasDropoutAddLayerNorm,
    FusedBiasDropoutAddRMSNorm,
    FusedCastRMSNorm,
    FusedLayerNorm,
    FusedRMSNorm,
)

__all__ = ["FusedLayerNorm", "FusedRMSNorm", "FusedCastRMSNorm", "FusedAddLayerNorm", "FusedAddRMSNorm",
           "FusedBiasDropoutAddLayerNorm", "FusedBiasDropoutAddRMSNorm", "FusedMultiheadAttention", "FusedSelfAttention",
           "FusedLinear", "FusedMLP", "FusedConv2dReLU", "FusedConvBNReLU", "FusedLinearCrossEntropyLoss"]
