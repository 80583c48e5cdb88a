"""FusedMLP: the transformer MLP block on the fused GEMM ops, Linear -> activation -> Linear or its gated form
down(act(gate(x)) * up(x)) (SwiGLU, GeGLU, ReGLU), with the activation (and the gate's product) in the first GEMM's
epilogue and an optional residual add in the second's.

Its state_dict loads from the modules it replaces, nn.Sequential(nn.Linear, act, nn.Linear) and Llama-style gated
MLPs (gate_proj / up_proj / down_proj), and can be written in their layout (`state_dict_layout`), so a model with
a FusedMLP swapped in keeps its checkpoint keys. Details: docs/gemm.md.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import gemm as ops

LAYOUTS = ("native", "sequential", "llama")


class FusedMLP(nn.Module):
    """`Linear -> activation -> Linear` (a plain activation) or `down(act(gate(x)) * up(x))` (a gated one) computed by
    fusedkernels.ops.linear_act / linear_gated: the first GEMM applies the activation (gated: one GEMM over the
    stacked gate and up weights), the second adds the residual.

    Args:
        in_features: x's last dimension.
        hidden_features: the hidden width H (gated: the intermediate size, the gate's and the up projection's
            width each).
        out_features: the output's last dimension; default in_features.
        bias: biases on both projections.
        activation: plain "none", "relu", "gelu" (erf), "gelu_tanh", "silu", "squared_relu", or gated "swiglu"
            (silu gate), "geglu" (erf gelu), "geglu_tanh" (tanh gelu), "reglu" (relu) (Shazeer 2020, "GLU Variants
            Improve Transformer").
        state_dict_layout: the keys state_dict() writes: "native", "sequential" (nn.Sequential's; plain
            activations) or "llama" (gated ones). load_state_dict takes every layout, whatever this says.
        device, dtype: of the parameters.

    Parameters, native keys (each projection an nn.Linear, initialised as nn.Linear initialises itself):
        plain: fc1.weight [H, in_features], fc1.bias [H], fc2.weight [out_features, H], fc2.bias [out_features]
        gated: gate_up_proj.weight [2H, in_features] (the gate's H rows, then the up projection's),
            gate_up_proj.bias [2H] (likewise), down_proj.weight [out_features, H], down_proj.bias [out_features]
    Other layouts, loaded (and written with state_dict_layout):
        "sequential": 0.weight, 0.bias, 2.weight, 2.bias (nn.Sequential(nn.Linear, act, nn.Linear))
        "llama": gate_proj.weight [H, in_features], up_proj.weight, down_proj.weight, and the three biases where
            bias=True (transformers' LlamaMLP); written as views of gate_up_proj's halves.

    forward(x [..., in_features], residual=None [..., out_features]) -> [..., out_features], x's dtype (the autocast
    dtype under autocast). Raises ValueError for an unknown activation or layout (or one that does not fit the
    activation), TypeError for a non-bool bias.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None, bias: bool = True,
                 activation: str = "gelu", *, state_dict_layout: str = "native", device=None, dtype=None) -> None:
        if not isinstance(bias, bool):  # FusedMLP(16, 64, 16, "relu") would otherwise be a gelu MLP with biases
            raise TypeError(f"FusedMLP: bias must be a bool, got {bias!r}")
        gated = activation in ops.GATED_ACTIVATIONS
        if not gated and activation not in ops.ACTIVATIONS:
            raise ValueError(f"FusedMLP: activation must be one of {', '.join(ops.ACTIVATIONS)} or gated "
                             f"{', '.join(ops.GATED_ACTIVATIONS)}, got {activation!r}")
        if state_dict_layout not in LAYOUTS:
            raise ValueError(f"FusedMLP: state_dict_layout must be one of {', '.join(LAYOUTS)}, got "
                             f"{state_dict_layout!r}")
        if state_dict_layout == ("sequential" if gated else "llama"):
            raise ValueError(f"FusedMLP: state_dict_layout {state_dict_layout!r} does not fit activation "
                             f"{activation!r} ('sequential' is for plain activations, 'llama' for gated ones)")
        super().__init__()
        out_features = in_features if out_features is None else out_features
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.activation, self.gated, self.state_dict_layout = activation, gated, state_dict_layout
        factory = {"device": device, "dtype": dtype}
        if gated:
            self.gate_up_proj = nn.Linear(in_features, 2 * hidden_features, bias, **factory)
            self.down_proj = nn.Linear(hidden_features, out_features, bias, **factory)
        else:
            self.fc1 = nn.Linear(in_features, hidden_features, bias, **factory)
            self.fc2 = nn.Linear(hidden_features, out_features, bias, **factory)
        self._register_load_state_dict_pre_hook(_to_native_keys, with_module=True)
        self._register_state_dict_hook(_to_layout_keys)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.gated:
            first, second = self.gate_up_proj, self.down_proj
            h = ops._linear_gated(x, first.weight, first.bias, self.activation, None)
        else:
            first, second = self.fc1, self.fc2
            h = ops._linear_act(x, first.weight, first.bias, self.activation, None)
        return ops._linear_act(h, second.weight, second.bias, "none", residual)

    @classmethod
    def from_module(cls, module: nn.Module, activation: Optional[str] = None) -> "FusedMLP":
        """A FusedMLP computing what `module` computes, with a copy of its weights (same device and dtype), whose
        state_dict() writes `module`'s layout.

        module: nn.Sequential(nn.Linear, act, nn.Linear), or a Llama-style gated MLP: nn.Linear attributes
        gate_proj, up_proj, down_proj and an act_fn, computing down_proj(act_fn(gate_proj(x)) * up_proj(x))
        (transformers' LlamaMLP and the MLPs of the models built like it). Every projection with a bias, or none.
        activation: the FusedMLP's; by default identified by evaluating the module's activation on a probe input
        (nn.GELU(), nn.SiLU(), nn.ReLU(), transformers' activation classes, ...).

        Raises ValueError for another structure, biases on some projections only, or an activation that matches
        none of FusedMLP's.
        """
        if isinstance(module, nn.Sequential):
            if len(module) != 3 or not isinstance(module[0], nn.Linear) or not isinstance(module[2], nn.Linear):
                raise ValueError(f"FusedMLP.from_module: an nn.Sequential must be (nn.Linear, activation, nn.Linear), "
                                 f"got {module}")
            first, act, second = module
            linears, layout, names = (first, second), "sequential", ops.ACTIVATIONS
        elif all(isinstance(getattr(module, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")) \
                and hasattr(module, "act_fn"):
            first, up, second, act = module.gate_proj, module.up_proj, module.down_proj, module.act_fn
            if (up.in_features, up.out_features) != (first.in_features, first.out_features):
                raise ValueError(f"FusedMLP.from_module: gate_proj and up_proj must have one shape, got {first} "
                                 f"and {up}")
            linears, layout, names = (first, up, second), "llama", ops.GATED_ACTIVATIONS
        else:
            raise ValueError(f"FusedMLP.from_module: expected nn.Sequential(nn.Linear, activation, nn.Linear) or a "
                             f"module with gate_proj, up_proj, down_proj and act_fn, got {type(module).__name__}")
        hidden = first.out_features
        if second.in_features != hidden:
            raise ValueError(f"FusedMLP.from_module: the projections do not chain: {hidden} hidden features, the "
                             f"last one takes {second.in_features}")
        biased = {lin.bias is not None for lin in linears}
        if len(biased) != 1:
            raise ValueError("FusedMLP.from_module: FusedMLP has biases on every projection or none; this module "
                             "has them on some only")
        if activation is None:
            activation = _identify(act, names)
            if activation is None:
                raise ValueError(f"FusedMLP.from_module: {act} matches none of the activations "
                                 f"{', '.join(names)}; pass activation= to choose one")
        elif activation not in names:
            raise ValueError(f"FusedMLP.from_module: this module takes one of {', '.join(names)}, got {activation!r}")
        w = first.weight
        mlp = cls(first.in_features, hidden, second.out_features, biased.pop(), activation, state_dict_layout=layout,
                  device=w.device, dtype=w.dtype)
        mlp.load_state_dict(module.state_dict())
        return mlp

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
             f"out_features={self.out_features}, activation={self.activation!r}")
        return s if self.state_dict_layout == "native" else s + f", state_dict_layout={self.state_dict_layout!r}"


def _identify(act, names) -> Optional[str]:
    """The first of `names` (plain or gated activations) whose activation `act` computes on a float64 probe, or
    None."""
    z = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = act(z)
    except Exception:  # noqa: BLE001 (an activation that cannot take the probe matches nothing)
        return None
    for name in names:
        want = ops._ACTIVATION_FNS[ops.GATE_ACTIVATION.get(name, name)](z)
        if isinstance(y, Tensor) and y.shape == z.shape and torch.allclose(y.double(), want, rtol=1e-6, atol=1e-6):
            return name
    return None


# The other layouts' keys, by the native projection they belong to.
_SEQUENTIAL = {"fc1.": "0.", "fc2.": "2."}
_LLAMA_HALVES = ("gate_proj.", "up_proj.")
_NATIVE_GATED = ("gate_up_proj.weight", "gate_up_proj.bias", "down_proj.weight", "down_proj.bias")


def _to_native_keys(module: FusedMLP, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                    error_msgs) -> None:
    """load_state_dict's pre-hook: renames the keys of a sequential or llama layout to the native ones (stacking
    gate_proj and up_proj into gate_up_proj) in the dict load_state_dict works on (its own copy)."""
    for name in ("weight", "bias"):
        if module.gated:
            gate, up = (prefix + half + name for half in _LLAMA_HALVES)
            native = prefix + "gate_up_proj." + name
            if native not in state_dict and gate in state_dict and up in state_dict \
                    and state_dict[gate].shape == state_dict[up].shape:
                state_dict[native] = torch.cat((state_dict.pop(gate), state_dict.pop(up)))
        else:
            for native_name, other in _SEQUENTIAL.items():
                native, key = prefix + native_name + name, prefix + other + name
                if native not in state_dict and key in state_dict:
                    state_dict[native] = state_dict.pop(key)


def _to_layout_keys(module: FusedMLP, state_dict, prefix, local_metadata) -> None:
    """state_dict's hook: rewrites the module's native keys in its state_dict_layout, in the order the module it
    replaces lists them."""
    if module.state_dict_layout == "sequential":
        for native_name, other in _SEQUENTIAL.items():
            for name in ("weight", "bias"):
                if prefix + native_name + name in state_dict:
                    state_dict[prefix + other + name] = state_dict.pop(prefix + native_name + name)
    elif module.state_dict_layout == "llama":
        own = {key: state_dict.pop(prefix + key) for key in _NATIVE_GATED if prefix + key in state_dict}
        for half, other in enumerate(_LLAMA_HALVES):
            for name in ("weight", "bias"):
                if "gate_up_proj." + name in own:
                    state_dict[prefix + other + name] = own["gate_up_proj." + name].chunk(2)[half]
        for name in ("weight", "bias"):
            if "down_proj." + name in own:
                state_dict[prefix + "down_proj." + name] = own["down_proj." + name]
