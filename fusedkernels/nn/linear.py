"""FusedLinear: torch.nn.Linear followed by an activation (and optionally a residual add), in one fused GEMM.

A subclass of nn.Linear: nn.Linear's constructor arguments in their order (plus keyword-only `activation`), same parameters, initialisation and
state_dict (it loads an nn.Linear's and an nn.Linear loads its), and `isinstance(m, nn.Linear)` holds. forward
calls the C++ op directly: no Python work beyond the call.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import gemm as ops


class FusedLinear(nn.Linear):
    """`activation(nn.Linear(x)) (+ residual)` computed by fusedkernels.ops.linear_act.

    activation: "none", "relu", "gelu" (erf: nn.GELU()), "gelu_tanh" (nn.GELU(approximate="tanh")), "silu"
    (nn.SiLU()), "squared_relu" (relu(x)^2). forward(input [..., in_features], residual=None [..., out_features])
    returns [..., out_features]. Raises ValueError for an unknown activation.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 activation: str = "gelu") -> None:
        if not isinstance(bias, bool):  # FusedLinear(16, 32, "relu") would otherwise be a gelu layer with a bias
            raise TypeError(f"FusedLinear: bias must be a bool, got {bias!r} (activation is keyword-only: "
                            f"FusedLinear(in_features, out_features, activation=...))")
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"FusedLinear: activation must be one of {', '.join(ops.ACTIVATIONS)}, got {activation!r}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return torch.ops.fusedkernels.linear_act(input, self.weight, self.bias, self.activation, residual)
        return ops._linear_act(input, self.weight, self.bias, self.activation, residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
