"""Linear layers with a fused epilogue: out = act(x @ W^T + bias) + residual, and the gated form
act(x @ Wg^T + bg) * (x @ Wu^T + bu) + residual (SwiGLU, GeGLU, ReGLU), one GEMM kernel each.

`linear_act` and `linear_gated` are the C++ ops `torch.ops.fusedkernels.linear_act` / `linear_gated`: argument
checks, the choice of kernel, autograd and autocast happen in C++ (csrc/gemm/gemm_ops.cpp), so a call costs the host
about what `F.linear` does. CUDA float16 / bfloat16 inputs with in_features and out_features multiples of 8 take
the fused kernel (csrc/gemm) where
the GPU and build have one; CPU inputs run the reference (PyTorch ops in the inputs' dtype) through the same
autograd; anything else (float32 / float64 on CUDA, other sizes, an unsuitable weight layout, no kernel for the
GPU, forward-mode AD) runs the reference, with one warning per reason. Activation "none" without a residual leaves
nothing to fuse: it is `F.linear` (cuBLAS), silently. Details: docs/gemm.md.

`linear_act_ref` and `linear_gated_ref` are the specifications the tests hold the kernel to.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native

__all__ = ["linear_act", "linear_act_ref", "linear_gated", "linear_gated_ref", "gated_mlp", "gated_mlp_ref", "mlp",
           "mlp_ref", "ACTIVATIONS", "GATED_ACTIVATIONS"]

# The activations, as PyTorch defines them: gelu is F.gelu's default (erf), gelu_tanh
# F.gelu(approximate="tanh"), silu x * sigmoid(x), squared_relu relu(x)^2 (So et al. 2021, "Primer").
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "squared_relu")

_ACTIVATION_FNS = {
    "none": lambda z: z,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "squared_relu": lambda z: F.relu(z).square(),
}

# The gated linear units of Shazeer 2020, "GLU Variants Improve Transformer", by the gate's activation: SwiGLU
# (silu), GEGLU (erf gelu), GEGLU with the tanh gelu (T5 v1.1's "gated-gelu"), ReGLU (relu).
GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "reglu")
GATE_ACTIVATION = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}


def linear_act_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: str = "gelu",
    residual: Optional[Tensor] = None,
) -> Tensor:
    """The specification of `linear_act`, differentiable: act(F.linear(x, weight, bias)) (+ residual), every step
    a PyTorch op in the inputs' dtype (pass float32 copies for an fp32 reference). Raises ValueError for an
    unknown activation."""
    if activation not in _ACTIVATION_FNS:
        raise ValueError(f"linear_act: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    out = _ACTIVATION_FNS[activation](F.linear(x, weight, bias))
    return out if residual is None else out + residual


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# The native op's argument checks (csrc/gemm/gemm_ops.cpp), raising the same exception types with equivalent
# messages, for the reference that runs without it: its schema's types, then (after autocast's casts) the
# activation's name and check_args.
def _check_types(op: str, x, weight, bias, activation, residual) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if not isinstance(t, Tensor) and (t is not None or name in ("x", "weight")):
            raise TypeError(f"{op}: {name} must be a Tensor{'' if name in ('x', 'weight') else ' or None'}, got "
                            f"{type(t).__name__}")
    if not isinstance(activation, str):
        raise TypeError(f"{op}: activation must be a str, got {type(activation).__name__}")


def _check_dense(op: str, operands) -> None:
    for name, t in operands:
        if t is not None and (t.layout != torch.strided or t.is_nested):
            kind = "nested" if t.is_nested else t.layout
            raise NotImplementedError(f"{op} takes strided (dense) tensors; {name} is {kind} (F.linear takes nested "
                                      f"and sparse ones)")


def _check_operands_like_x(op: str, x, operands) -> None:
    """Each operand on x's device and of x's dtype, a residual of any dtype (its add promotes); as the native
    check_operands_like_x (csrc/common/torch/checks.h)."""
    for name, t in operands:
        if t is not None and t.dtype != x.dtype and name != "residual":
            raise RuntimeError(f"{op}: {name} must have x's dtype ({_name(x.dtype)}), got {_name(t.dtype)}")
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _check_args(op: str, x, weight, bias, activation, residual, gated: bool, names=("weight", "bias"),
                width="out_features") -> None:
    """width: what the messages call the (gated) output's width (gated_mlp: N, the hidden width)."""
    w_name, b_name = names
    activations = GATED_ACTIVATIONS if gated else ACTIVATIONS
    if activation not in activations:
        raise ValueError(f"{op}: activation must be one of {', '.join(activations)}, got {activation!r}")
    _check_dense(op, (("x", x), (w_name, weight), (b_name, bias), ("residual", residual)))
    rows = f"2 * {width}" if gated else width
    if x.dim() < 1:
        raise RuntimeError(f"{op}: x must be [..., in_features] (at least 1-D), got a 0-D tensor")
    if weight.dim() != 2:
        raise RuntimeError(f"{op}: {w_name} must be [{rows}, in_features] (2-D), got {list(weight.shape)}")
    if gated and weight.shape[0] % 2:
        raise RuntimeError(f"{op}: {w_name} must stack the gate's rows and the up projection's, [{rows}, "
                           f"in_features]; got {list(weight.shape)}, an odd number of rows")
    if x.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"{op}: x and {w_name} shapes cannot be multiplied (x {list(x.shape)}, {w_name} "
                           f"{list(weight.shape)}): x's last dimension must be {w_name}'s in_features")
    if not x.is_floating_point():
        raise RuntimeError(f"{op}: x must be a floating-point tensor (float16 or bfloat16 for the fused kernel), got "
                           f"{_name(x.dtype)}")
    _check_operands_like_x(op, x, ((w_name, weight), (b_name, bias), ("residual", residual)))
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(f"{op}: {b_name} must be [{rows}] = [{weight.shape[0]}], got {list(bias.shape)}")
    out_shape = [*x.shape[:-1], weight.shape[0] // 2 if gated else weight.shape[0]]
    if residual is not None and list(residual.shape) != out_shape:
        raise RuntimeError(f"{op}: residual must have the output's shape {out_shape} (no broadcasting), got "
                           f"{list(residual.shape)}")


def _checked_reference(op: str, reference, gated: bool):
    """`reference` as the native op would run it: autocast's casts as the op's autocast kernel makes them, then
    the op's argument checks."""

    def call(x, weight, bias, activation, residual):
        _check_types(op, x, weight, bias, activation, residual)
        x, weight, bias = _native.autocast_casts(x.device.type, x, weight, bias)  # the residual is left as it is
        _check_args(op, x, weight, bias, activation, residual, gated)
        if residual is not None and residual.dtype != x.dtype:
            # added after the op with type promotion, as the unfused form adds it
            return reference(x, weight, bias, activation, None) + residual
        return reference(x, weight, bias, activation, residual)

    return call


# Without the native op (no native module, or a build without the gemm family): the reference, with the native
# op's positional arguments and argument checks.
_linear_act_without_native = _checked_reference("linear_act", linear_act_ref, gated=False)
_linear_act = _native.public_op("linear_act", _linear_act_without_native, "the PyTorch reference")


def linear_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: str = "gelu",
    residual: Optional[Tensor] = None,
) -> Tensor:
    """out = act(x @ weight^T + bias) + residual: `nn.Linear` followed by an activation and a residual add, in
    one kernel.

    x: [..., K] (any layout: rows are read in place where their stride allows, else copied); weight: [N, K] as
    nn.Linear stores it; bias: [N] or None; residual: None or exactly the output's shape [..., N] (no
    broadcasting). x, weight and bias one dtype: float16 / bfloat16 for the fused kernel (fp32 accumulation),
    float32 / float64 run the reference; a residual of that dtype joins the fused epilogue, one of another dtype
    (a float32 residual stream, an integer tensor) is added after it with type promotion, as
    `act(F.linear(...)) + residual` adds it. activation: "none", "relu", "gelu" (erf, F.gelu's default),
    "gelu_tanh" (F.gelu(approximate="tanh")), "silu", "squared_relu" (relu(z)^2).

    Returns out [..., N] in x's dtype, or the promoted dtype of a residual of another dtype (under autocast,
    which casts x, weight and bias as it does for F.linear: the autocast dtype). Differentiable in x, weight, bias and residual, to any order: the backward
    applies act' to the pre-activation z the forward kept (only when a gradient is needed) and runs PyTorch's
    GEMMs for dx = dz W, dW = dz^T x, dbias = sum_rows(dz), dresidual = dy. Under torch.func transforms (vmap,
    grad, jacrev ...) the reference runs (`linear_act_ref`), which they transform.

    Raises ValueError for an unknown activation; RuntimeError for x and weight shapes that cannot be multiplied,
    a weight that is not 2-D, a bias not [N], a residual not the output's shape, weight / bias dtypes or devices that differ from x's
    (where F.linear raises, the same type), and for a non-floating x (which F.linear takes on CPU);
    TypeError for arguments of the wrong type (activation=None included); NotImplementedError for sparse or nested
    tensors. Without the native module the reference runs after the same checks. CUDA inputs without a kernel
    run the reference with one UserWarning per reason. Activation "none" without a residual is `F.linear(x,
    weight, bias)` itself, its checks, errors and results (sparse and nested inputs included): there is nothing
    to fuse, and cuBLAS's plain GEMM is the faster one.
    """
    if residual is None and isinstance(activation, str) and activation == "none":
        return F.linear(x, weight, bias)  # nothing to fuse (the op would run F.linear too, a dispatch later)
    transformed = torch._C._are_functorch_transforms_active()  # vmap, grad ...: the reference, whose ops they know
    return (_linear_act_without_native if transformed else _linear_act)(x, weight, bias, activation, residual)


def linear_gated_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: str = "swiglu",
    residual: Optional[Tensor] = None,
) -> Tensor:
    """The specification of `linear_gated`, differentiable: with weight = [Wg; Wu] and bias = [bg; bu] (the gate's
    rows first), act(F.linear(x, Wg, bg)) * F.linear(x, Wu, bu) (+ residual), every step a PyTorch op in the
    inputs' dtype (pass float32 copies for an fp32 reference). Raises ValueError for an unknown activation,
    RuntimeError for a weight that is not 2-D with an even number of rows."""
    if activation not in GATE_ACTIVATION:
        raise ValueError(f"linear_gated: activation must be one of {', '.join(GATED_ACTIVATIONS)}, got {activation!r}")
    if weight.dim() != 2 or weight.shape[0] % 2:
        raise RuntimeError(f"linear_gated: weight must stack the gate's rows and the up projection's, "
                           f"[2 * out_features, in_features]; got {list(weight.shape)}")
    w_gate, w_up = weight.chunk(2)
    b_gate, b_up = bias.chunk(2) if bias is not None else (None, None)
    out = _ACTIVATION_FNS[GATE_ACTIVATION[activation]](F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)
    return out if residual is None else out + residual


_linear_gated_without_native = _checked_reference("linear_gated", linear_gated_ref, gated=True)
_linear_gated = _native.public_op("linear_gated", _linear_gated_without_native, "the PyTorch reference")


def linear_gated(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: str = "swiglu",
    residual: Optional[Tensor] = None,
) -> Tensor:
    """out = act(x @ Wg^T + bg) * (x @ Wu^T + bu) + residual: a gated linear unit (the first half of a SwiGLU /
    GeGLU MLP) as one GEMM over the stacked weight, with the gate, the product and the residual add in its
    epilogue.

    x: [..., K] (any layout, as linear_act's); weight: [2N, K], the gate projection's N rows (Wg) then the up
    projection's (Wu), as torch.cat([gate_proj.weight, up_proj.weight]) stacks them; bias: [2N] (bg then bu) or
    None; residual: None or exactly the output's shape [..., N]. dtypes as linear_act's: float16 / bfloat16 for the
    fused kernel (fp32 accumulation), float32 / float64 run the reference; a residual of another dtype is added
    after the op with type promotion. activation, of the gate (Shazeer 2020, "GLU
    Variants Improve Transformer"): "swiglu" (silu), "geglu" (erf gelu), "geglu_tanh" (tanh gelu, T5 v1.1's
    "gated-gelu"), "reglu" (relu).

    Returns out [..., N] in x's dtype (under autocast, as for linear_act: the autocast dtype). Differentiable in x,
    weight, bias and residual, to any order: the forward keeps z = [gate | up] [..., 2N] when a gradient is needed,
    and the backward forms dz = [dy * up * act'(gate) | dy * act(gate)] and runs PyTorch's GEMMs for dx = dz W,
    dW = dz^T x, dbias = sum_rows(dz), dresidual = dy. Under torch.func transforms the reference runs
    (`linear_gated_ref`), which they transform.

    Raises ValueError for an unknown activation; RuntimeError for a weight with an odd number of rows (it must
    stack two halves), and as linear_act does for shapes that cannot be multiplied, a weight that is not 2-D, a
    bias not [2N], a residual not the output's shape, a non-floating x, dtypes or devices that differ; TypeError
    for arguments of the wrong type; NotImplementedError for sparse or nested tensors. Without the native module
    the reference runs after the same checks. CUDA inputs without a kernel (N or K not a multiple of 8, float32,
    ...) run the reference with one UserWarning per reason.
    """
    transformed = torch._C._are_functorch_transforms_active()  # vmap, grad ...: the reference, whose ops they know
    return (_linear_gated_without_native if transformed else _linear_gated)(x, weight, bias, activation, residual)


def gated_mlp_ref(
    x: Tensor,
    gate_up_weight: Tensor,
    gate_up_bias: Optional[Tensor],
    down_weight: Tensor,
    down_bias: Optional[Tensor] = None,
    activation: str = "swiglu",
    residual: Optional[Tensor] = None,
) -> Tensor:
    """The specification of `gated_mlp`, differentiable: linear_act_ref(linear_gated_ref(x, gate_up_weight,
    gate_up_bias, activation), down_weight, down_bias, "none", residual)."""
    hidden = linear_gated_ref(x, gate_up_weight, gate_up_bias, activation)
    return linear_act_ref(hidden, down_weight, down_bias, "none", residual)


# The MLP ops' operand names: the first projection's weight and bias, the second's.
_MLP_NAMES = {True: ("gate_up_weight", "gate_up_bias", "down_weight", "down_bias"),
              False: ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")}


def _check_mlp_types(gated, x, weight1, bias1, weight2, bias2, activation, residual) -> None:
    """The native gated_mlp's (gated) or mlp's schema types, for the reference without it."""
    op, names = "gated_mlp" if gated else "mlp", _MLP_NAMES[gated]
    for name, t in (("x", x), (names[0], weight1), (names[1], bias1), (names[2], weight2), (names[3], bias2),
                    ("residual", residual)):
        required = name in ("x", names[0], names[2])
        if not isinstance(t, Tensor) and (t is not None or required):
            raise TypeError(f"{op}: {name} must be a Tensor{'' if required else ' or None'}, got "
                            f"{type(t).__name__}")
    if not isinstance(activation, str):
        raise TypeError(f"{op}: activation must be a str, got {type(activation).__name__}")


def _check_mlp_args(gated, x, weight1, bias1, weight2, bias2, activation, residual) -> None:
    """The native gated_mlp's or mlp's checks (gemm_ops.cpp: check_mlp_args), for the reference without it."""
    op, names = "gated_mlp" if gated else "mlp", _MLP_NAMES[gated]
    _check_args(op, x, weight1, bias1, activation, None, gated, names[:2], "N")
    second = ((names[2], weight2), (names[3], bias2), ("residual", residual))
    _check_dense(op, second)
    hidden = weight1.shape[0] // 2 if gated else weight1.shape[0]
    if weight2.dim() != 2 or weight2.shape[1] != hidden:
        raise RuntimeError(f"{op}: {names[2]} must be [out_features, N], N the hidden width ({names[0]} is "
                           f"[{'2 * ' if gated else ''}N, in_features] = {list(weight1.shape)}), got "
                           f"{list(weight2.shape)}")
    _check_operands_like_x(op, x, second)
    if bias2 is not None and (bias2.dim() != 1 or bias2.shape[0] != weight2.shape[0]):
        raise RuntimeError(f"{op}: {names[3]} must be [out_features] = [{weight2.shape[0]}], got "
                           f"{list(bias2.shape)}")
    out_shape = [*x.shape[:-1], weight2.shape[0]]
    if residual is not None and list(residual.shape) != out_shape:
        raise RuntimeError(f"{op}: residual must have the output's shape {out_shape} (no broadcasting), got "
                           f"{list(residual.shape)}")


def _checked_mlp(gated, x, weight1, bias1, weight2, bias2, activation, residual):
    """The reference as the native gated_mlp (gated) or mlp runs it: autocast's casts (as for F.linear), its checks,
    then the reference, a residual of another dtype added after it with promotion."""
    _check_mlp_types(gated, x, weight1, bias1, weight2, bias2, activation, residual)
    x, weight1, bias1, weight2, bias2 = _native.autocast_casts(x.device.type, x, weight1, bias1, weight2, bias2)
    _check_mlp_args(gated, x, weight1, bias1, weight2, bias2, activation, residual)
    ref = gated_mlp_ref if gated else mlp_ref
    if residual is not None and residual.dtype != x.dtype:
        return ref(x, weight1, bias1, weight2, bias2, activation) + residual
    return ref(x, weight1, bias1, weight2, bias2, activation, residual)


def _gated_mlp_without_native(x, gate_up_weight, gate_up_bias, down_weight, down_bias, activation, residual):
    return _checked_mlp(True, x, gate_up_weight, gate_up_bias, down_weight, down_bias, activation, residual)


_gated_mlp = _native.public_op("gated_mlp", _gated_mlp_without_native, "the PyTorch reference")


def gated_mlp(
    x: Tensor,
    gate_up_weight: Tensor,
    gate_up_bias: Optional[Tensor],
    down_weight: Tensor,
    down_bias: Optional[Tensor] = None,
    activation: str = "swiglu",
    residual: Optional[Tensor] = None,
) -> Tensor:
    """out = down(act(gate) * up) + residual with [gate | up] = x @ gate_up_weight^T + gate_up_bias: the gated MLP of
    Llama / T5-style transformers (`nn.FusedMLP`'s gated form), as linear_gated then linear_act, with a backward
    that forms the gated unit's gradient in the epilogue of the GEMM producing the hidden layer's gradient.

    x: [..., K]; gate_up_weight: [2N, K], the gate projection's N rows then the up projection's (linear_gated's
    stacking); gate_up_bias: [2N] or None; down_weight: [M, N] as nn.Linear(N, M) stores it; down_bias: [M] or None;
    residual: None or exactly the output's shape [..., M]. dtypes as linear_act's (float16 / bfloat16 for the fused
    kernels; a residual of another dtype is added after the op with promotion). activation: the gate's, "swiglu",
    "geglu", "geglu_tanh" or "reglu".

    Returns [..., M] in x's dtype (the autocast dtype under autocast, which casts x, the weights and the biases as
    for F.linear). Differentiable in every tensor, to any order. With a gradient to compute and fused kernels for
    both GEMMs, one autograd node keeps x, the weights, the gated output h [..., N] and the pre-activation z
    [..., 2N] (what linear_gated and linear_act would keep between them); its backward computes dz from dy and
    down_weight in one GEMM (the gate's derivative in its epilogue, on the Hopper kernel) where linear_gated's
    backward would read a stored dh. Otherwise (no gradient, another residual dtype, a size without a kernel) it is
    linear_gated then linear_act, with their warnings. Under torch.func transforms the reference runs
    (`gated_mlp_ref`).

    Raises ValueError for an unknown activation; RuntimeError, naming the argument, for shapes that do not chain
    (x and gate_up_weight, down_weight's in_features against N, the biases, a residual not the output's shape),
    dtypes or devices that differ from x's; TypeError for arguments of the wrong type; NotImplementedError for
    sparse or nested tensors.
    """
    transformed = torch._C._are_functorch_transforms_active()  # vmap, grad ...: the reference, whose ops they know
    return (_gated_mlp_without_native if transformed else _gated_mlp)(x, gate_up_weight, gate_up_bias, down_weight,
                                                                      down_bias, activation, residual)


def mlp_ref(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor] = None,
    activation: str = "gelu",
    residual: Optional[Tensor] = None,
) -> Tensor:
    """The specification of `mlp`, differentiable: linear_act_ref(linear_act_ref(x, fc1_weight, fc1_bias,
    activation), fc2_weight, fc2_bias, "none", residual)."""
    hidden = linear_act_ref(x, fc1_weight, fc1_bias, activation)
    return linear_act_ref(hidden, fc2_weight, fc2_bias, "none", residual)


def _mlp_without_native(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, residual):
    return _checked_mlp(False, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, residual)


_mlp = _native.public_op("mlp", _mlp_without_native, "the PyTorch reference")


def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor] = None,
    activation: str = "gelu",
    residual: Optional[Tensor] = None,
) -> Tensor:
    """out = fc2(act(fc1(x))) + residual: the transformer FFN of BERT / GPT-2 / ViT (`nn.FusedMLP`'s plain form), as
    linear_act(x, fc1_weight, fc1_bias, activation) then F.linear (linear_act "none" with the residual), with a
    backward that forms dz = dh * act'(z) and fc1_bias's gradient in the epilogue of the GEMM producing dh.

    x: [..., K]; fc1_weight: [N, K] as nn.Linear(K, N) stores it; fc1_bias: [N] or None; fc2_weight: [M, N];
    fc2_bias: [M] or None; residual: None or exactly the output's shape [..., M]. dtypes as linear_act's (float16 /
    bfloat16 for the fused kernels; a residual of another dtype is added after the op with promotion). activation:
    linear_act's ("none", "relu", "gelu", "gelu_tanh", "silu", "squared_relu").

    Returns [..., M] in x's dtype (the autocast dtype under autocast, which casts x, the weights and the biases as
    for F.linear). Differentiable in every tensor, to any order. With a gradient to compute, an activation other
    than none and fused kernels for both GEMMs, one autograd node keeps x, the weights, the hidden output h [..., N]
    and the pre-activation z [..., N] (what linear_act and F.linear would keep between them); its backward computes
    dz and fc1_bias's gradient from dy and fc2_weight in one GEMM (act' and the column sums in its epilogue, on the
    Hopper kernel) where linear_act's backward would read a stored dh in a separate pass. Otherwise it is linear_act
    then F.linear / linear_act, with their warnings. Under torch.func transforms the reference runs (`mlp_ref`).

    Raises ValueError for an unknown activation; RuntimeError, naming the argument, for shapes that do not chain
    (x and fc1_weight, fc2_weight's in_features against N, the biases, a residual not the output's shape), dtypes or
    devices that differ from x's; TypeError for arguments of the wrong type; NotImplementedError for sparse or nested
    tensors.
    """
    transformed = torch._C._are_functorch_transforms_active()  # vmap, grad ...: the reference, whose ops they know
    return (_mlp_without_native if transformed else _mlp)(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation,
                                                          residual)
