"""FusedLayerNorm / FusedRMSNorm: subclasses of torch.nn.LayerNorm / RMSNorm with the fused forward and backward.

Being subclasses, they take the same arguments, hold the same parameters, load each other's state_dict
and pass `isinstance(m, nn.LayerNorm)` checks (weight-decay filters, initialisers). forward calls the C++
op directly: no Python work beyond the call. FusedCastRMSNorm is RMSNorm in Hugging Face's casting orders (what
fusedkernels.fuse swaps in for Llama- and T5-style norms).
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


_CASTS = ("input", "weight")
_HALF = (torch.float16, torch.bfloat16)


class FusedCastRMSNorm(nn.Module):
    """RMSNorm as Hugging Face transformers' models write it, computed by fusedkernels.ops.rms_norm: the statistics
    in float32 and the normalised activations cast before the weight multiply, which sets the output's dtype.

    cast="input" (Llama, Mistral, Qwen2 and the models copying LlamaRMSNorm):
        weight * rms_norm(x in float32).to(x.dtype)            dtype: promote(x, weight)
    cast="weight" (T5LayerNorm):
        weight * rms_norm(x in float32 at least), cast to weight's dtype first when it is float16 / bfloat16
                                                               dtype: weight's if half, else promote(x, float32, weight)

    Where x and weight share a dtype (a model in one dtype) the weight multiply runs inside the kernel, in float32:
    one rounding where the original rounds twice, so the result is within the original's own rounding error and
    closer to the exact one. Other dtype pairs (a float32 weight under bfloat16 autocast) normalise in the kernel and
    multiply afterwards, exactly as the original. State: `weight` [hidden_size] only, the original's key.

    Raises ValueError for a cast other than "input" or "weight".
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, cast: str = "input", device=None, dtype=None) -> None:
        if cast not in _CASTS:
            raise ValueError(f"FusedCastRMSNorm: cast must be one of {', '.join(_CASTS)}, got {cast!r}")
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps, self.cast = eps, cast

    def forward(self, input: Tensor) -> Tensor:
        weight, shape = self.weight, (self.weight.shape[-1],)
        if input.dtype == weight.dtype:
            return ops._rms_norm(input, shape, weight, self.eps)
        if self.cast == "input":
            return weight * ops._rms_norm(input, shape, None, self.eps)
        y = ops._rms_norm(input.to(torch.promote_types(input.dtype, torch.float32)), shape, None, self.eps)
        return weight * (y.to(weight.dtype) if weight.dtype in _HALF else y)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[-1]}, eps={self.eps}, cast={self.cast!r}"
