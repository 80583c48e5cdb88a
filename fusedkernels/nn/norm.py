"""FusedLayerNorm / FusedRMSNorm: subclasses of torch.nn.LayerNorm / RMSNorm with the fused forward and backward.

Being subclasses, they take the same arguments, hold the same parameters, load each other's state_dict
and pass `isinstance(m, nn.LayerNorm)` checks (weight-decay filters, initialisers). forward calls the C++
op directly: no Python work beyond the call. FusedCastRMSNorm is RMSNorm in Hugging Face's casting orders (what
fusedkernels.fuse swaps in for Llama- and T5-style norms).

FusedAddLayerNorm / FusedAddRMSNorm / FusedBiasDropoutAdd{LayerNorm,RMSNorm} are the residual add (and bias +
dropout) fused with the norm that follows it: they hold the norm's parameters (subclasses of nn.LayerNorm /
nn.RMSNorm, so state_dicts load both ways and isinstance-based parameter groups still find them), and their
forward takes the residual stream and returns the new one with the normalized output.
"""

from typing import List, Optional

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


_CASTS = ("input", "weight", "offset")


def _rms_norm(input: Tensor, shape: List[int], weight: Optional[Tensor], eps: Optional[float]) -> Tensor:
    """FusedCastRMSNorm's op, which TorchScript compiles too."""
    if torch.jit.is_scripting():  # TorchScript compiles this branch only
        return torch.ops.fusedkernels.rms_norm(input, shape, weight, eps)
    return ops._rms_norm(input, shape, weight, eps)


class FusedCastRMSNorm(nn.Module):
    """RMSNorm as Hugging Face transformers' models write it, computed by fusedkernels.ops.rms_norm: the statistics
    in float32 and the normalised activations cast before the weight multiply, which sets the output's dtype.

    cast="input" (Llama, Mistral, Qwen2 and the models copying LlamaRMSNorm):
        weight * rms_norm(x in float32).to(x.dtype)            dtype: promote(x, weight)
    cast="weight" (T5LayerNorm):
        weight * rms_norm(x in float32 at least), cast to weight's dtype first when it is float16 / bfloat16
                                                               dtype: weight's if half, else promote(x, float32, weight)
    cast="offset" (Gemma's RMSNorm, whose weight starts at zero, as this module's does):
        (rms_norm(x in float32) * (1 + weight in float32)).to(x.dtype)      dtype: x's

    Where x and weight share a dtype (a model in one dtype) the weight multiply runs inside the kernel, in float32:
    one rounding where the original rounds twice, so the result is within the original's own rounding error and
    closer to the exact one. Other dtype pairs (a float32 weight under bfloat16 autocast) normalise in the kernel and
    multiply afterwards, exactly as the original. "offset" hands the kernel 1 + weight in float32 (a [hidden_size]
    op a call), which it multiplies in float32 before its one rounding, as Gemma's. State: `weight` [hidden_size]
    only, the original's key.

    torch.jit.script compiles it (on torch.ops.fusedkernels.rms_norm, as the other modules here: a build without the
    norm family cannot script it). Raises ValueError for a cast other than "input", "weight" or "offset".
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, cast: str = "input", device=None, dtype=None) -> None:
        if cast not in _CASTS:
            raise ValueError(f"FusedCastRMSNorm: cast must be one of {', '.join(_CASTS)}, got {cast!r}")
        super().__init__()
        init = torch.zeros if cast == "offset" else torch.ones  # Gemma's weight is the offset from 1
        self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.eps, self.cast = eps, cast

    def forward(self, input: Tensor) -> Tensor:
        weight, shape = self.weight, [self.weight.shape[-1]]
        if self.cast == "offset":
            return _rms_norm(input, shape, 1.0 + weight.float(), self.eps)
        if input.dtype == weight.dtype:
            return _rms_norm(input, shape, weight, self.eps)
        if self.cast == "input":
            return weight * _rms_norm(input, shape, None, self.eps)
        y = _rms_norm(input.to(torch.promote_types(input.dtype, torch.float32)), shape, None, self.eps)
        return weight * (y.to(weight.dtype) if weight.dtype == torch.float16 or weight.dtype == torch.bfloat16 else y)

    # Hugging Face's name for eps: modules around a norm that fuse() swapped in may read it (Mamba-style mixers)
    __jit_unused_properties__ = ["variance_epsilon"]

    @property
    def variance_epsilon(self) -> float:
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value: float) -> None:
        self.eps = value

    def extra_repr(self) -> str:
        return f"{self.weight.shape[-1]}, eps={self.eps}, cast={self.cast!r}"


def _last_dim(cls_name: str, normalized_shape) -> None:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"{cls_name} normalizes the last dimension: normalized_shape must be one size, got {shape}")


def _check_input(x: Tensor, normalized_shape: List[int]) -> None:
    """nn.LayerNorm's check of its input, with its message (the ops take x's last dimension as the size)."""
    if x.dim() == 0 or x.shape[-1] != normalized_shape[0]:
        raise RuntimeError("Given normalized_shape={}, expected input with shape [*, {}], but got input of size{}"
                           .format(normalized_shape, normalized_shape[0], list(x.shape)))


class FusedAddLayerNorm(nn.LayerNorm):
    """out, new_residual = layer_norm(x + residual), x + residual, in one kernel (fusedkernels.ops.add_layer_norm).

    Takes nn.LayerNorm's arguments (normalized_shape: one size, the last dimension) and keyword-only residual_dtype:
    None (the dtype of x + residual as torch promotes it: x's, or float32 for a float32 residual stream beside a
    16-bit x) or torch.float32. forward(x, residual) -> (out, new_residual): out in x's dtype, new_residual in
    residual_dtype. Raises ValueError for a normalized_shape of more than one dimension or another residual_dtype, and
    RuntimeError (as nn.LayerNorm) for an input whose last dimension is not that size.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, residual_dtype: Optional[torch.dtype] = None) -> None:
        _last_dim(type(self).__name__, normalized_shape)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.residual_dtype = _check_residual_dtype(type(self).__name__, residual_dtype)

    def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        _check_input(x, list(self.normalized_shape))
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return torch.ops.fusedkernels.add_layer_norm(x, residual, self.weight, self.bias, self.eps,
                                                         self.residual_dtype)
        return ops._add_layer_norm(x, residual, self.weight, self.bias, self.eps, self.residual_dtype)

    def extra_repr(self) -> str:
        return _with_residual_dtype(super().extra_repr(), self.residual_dtype)


class FusedAddRMSNorm(nn.RMSNorm):
    """out, new_residual = rms_norm(x + residual), x + residual, in one kernel (fusedkernels.ops.add_rms_norm).
    As FusedAddLayerNorm, with nn.RMSNorm's arguments (eps=None: float32's machine epsilon for 16-bit x)."""

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, residual_dtype: Optional[torch.dtype] = None) -> None:
        _last_dim(type(self).__name__, normalized_shape)
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.residual_dtype = _check_residual_dtype(type(self).__name__, residual_dtype)

    def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        _check_input(x, list(self.normalized_shape))
        if torch.jit.is_scripting():
            return torch.ops.fusedkernels.add_rms_norm(x, residual, self.weight, self.eps, self.residual_dtype)
        return ops._add_rms_norm(x, residual, self.weight, self.eps, self.residual_dtype)

    def extra_repr(self) -> str:
        return _with_residual_dtype(super().extra_repr(), self.residual_dtype)


class FusedBiasDropoutAddLayerNorm(nn.LayerNorm):
    """out, new_residual = layer_norm(h), h with h = residual + dropout(x + bias), in one kernel
    (fusedkernels.ops.bias_dropout_add_layer_norm): a sublayer's output bias (the bias of the linear before it,
    kept out of that GEMM), dropout, the residual add and the next LayerNorm.

    Takes nn.LayerNorm's arguments, in its order (normalized_shape: one size), then keyword-only p (the dropout
    probability, as nn.Dropout's; applied in training mode only) and residual_dtype (as FusedAddLayerNorm's). Holds
    the norm's weight and bias (nn.LayerNorm's state_dict keys). forward(x, bias, residual) -> (out, new_residual):
    bias is the [H] bias added to x before the dropout, or None. Raises ValueError for p outside [0, 1], a
    normalized_shape of more than one dimension or a residual_dtype other than None or torch.float32.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, p: float = 0.5, residual_dtype: Optional[torch.dtype] = None) -> None:
        _last_dim(type(self).__name__, normalized_shape)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{type(self).__name__}: p must be in [0, 1], got {p}")
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.p, self.residual_dtype = p, _check_residual_dtype(type(self).__name__, residual_dtype)

    def forward(self, x: Tensor, bias: Optional[Tensor], residual: Tensor) -> tuple[Tensor, Tensor]:
        _check_input(x, list(self.normalized_shape))
        if torch.jit.is_scripting():
            return torch.ops.fusedkernels.bias_dropout_add_layer_norm(x, bias, residual, self.weight, self.bias, self.p,
                                                                      self.eps, self.training, self.residual_dtype)
        return ops._bias_dropout_add_layer_norm(x, bias, residual, self.weight, self.bias, self.p, self.eps,
                                                self.training, self.residual_dtype)

    def extra_repr(self) -> str:
        return _with_residual_dtype(f"{super().extra_repr()}, p={self.p}", self.residual_dtype)


class FusedBiasDropoutAddRMSNorm(nn.RMSNorm):
    """out, new_residual = rms_norm(h), h with h = residual + dropout(x + bias), in one kernel
    (fusedkernels.ops.bias_dropout_add_rms_norm). As FusedBiasDropoutAddLayerNorm, with nn.RMSNorm's arguments
    (in its order; then keyword-only p and residual_dtype) and state."""

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, p: float = 0.5, residual_dtype: Optional[torch.dtype] = None) -> None:
        _last_dim(type(self).__name__, normalized_shape)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{type(self).__name__}: p must be in [0, 1], got {p}")
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.p, self.residual_dtype = p, _check_residual_dtype(type(self).__name__, residual_dtype)

    def forward(self, x: Tensor, bias: Optional[Tensor], residual: Tensor) -> tuple[Tensor, Tensor]:
        _check_input(x, list(self.normalized_shape))
        if torch.jit.is_scripting():
            return torch.ops.fusedkernels.bias_dropout_add_rms_norm(x, bias, residual, self.weight, self.p, self.eps,
                                                                    self.training, self.residual_dtype)
        return ops._bias_dropout_add_rms_norm(x, bias, residual, self.weight, self.p, self.eps, self.training,
                                              self.residual_dtype)

    def extra_repr(self) -> str:
        return _with_residual_dtype(f"{super().extra_repr()}, p={self.p}", self.residual_dtype)


def _check_residual_dtype(cls_name: str, residual_dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    if residual_dtype is not None and residual_dtype != torch.float32:
        raise ValueError(f"{cls_name}: residual_dtype must be None (x + residual's promoted dtype) or torch.float32, "
                         f"got {residual_dtype}")
    return residual_dtype


def _with_residual_dtype(repr_: str, residual_dtype: Optional[torch.dtype]) -> str:
    return repr_ if residual_dtype is None else f"{repr_}, residual_dtype={residual_dtype}"
