"""FusedLinear: torch.nn.Linear followed by an activation (and optionally a residual add), in one fused GEMM.

A subclass of nn.Linear: nn.Linear's constructor arguments in their order (plus keyword-only `activation`), same parameters, initialisation and
state_dict (it loads an nn.Linear's and an nn.Linear loads its), and `isinstance(m, nn.Linear)` holds. forward
calls the C++ op directly: no Python work beyond the call.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import gemm as ops


class FusedLinear(nn.Linear):
    """`activation(nn.Linear(x)) (+ residual)` computed by fusedkernels.ops.linear_act.

    activation: "none", "relu", "gelu" (erf: nn.GELU()), "gelu_tanh" (nn.GELU(approximate="tanh")), "silu"
    (nn.SiLU()), "squared_relu" (relu(x)^2). An nn.Linear whose class is switched in place
    (`m.__class__ = FusedLinear`) has no activation of its own and computes what it did, as "none".
    """

    activation = "none"  # for an nn.Linear switched in place; the constructor sets the instance's own
    # TorchScript reads constants with getattr, so it finds the class's activation too (instance attributes only else)
    __constants__ = nn.Linear.__constants__ + ["activation"]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 activation: str = "gelu") -> None:
        """nn.Linear's arguments in their order, and keyword-only `activation` (default "gelu").

        bias: as nn.Linear's, truthy or not (a str is refused: FusedLinear(16, 32, "relu") means an activation).
        device, dtype: of the parameters, as nn.Linear's.

        Raises TypeError for a str bias or an activation that is not a str, ValueError for an unknown one.
        """
        if isinstance(bias, str):  # FusedLinear(16, 32, "relu") would otherwise be a gelu layer with a bias
            raise TypeError(f"FusedLinear: bias must be a bool, got {bias!r} (activation is keyword-only: "
                            f"FusedLinear(in_features, out_features, activation=...))")
        if not isinstance(activation, str):  # as ops.linear_act (and F.gelu's approximate=None) raise
            raise TypeError(f"FusedLinear: activation must be a str, got {type(activation).__name__}")
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"FusedLinear: activation must be one of {', '.join(ops.ACTIVATIONS)}, got {activation!r}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """activation(input @ weight^T + bias) (+ residual), as fusedkernels.ops.linear_act computes it.

        input: [..., in_features], floating point, the parameters' dtype and device (under autocast, any dtype
        autocast casts); residual: None or exactly the output's shape [..., out_features] (no broadcasting), the
        same dtype for the fused epilogue (one of another dtype is added after it with type promotion). Returns
        [..., out_features] in input's dtype (the autocast dtype under autocast).

        Raises RuntimeError for an input whose last dimension is not in_features, a residual not the output's
        shape, a non-floating input, dtypes or devices that differ; NotImplementedError for sparse or nested
        tensors. With activation "none" and no residual it is nn.Linear's call, `F.linear`, errors included.
        """
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return torch.ops.fusedkernels.linear_act(input, self.weight, self.bias, self.activation, residual)
        if residual is None and self.activation == "none":  # nothing to fuse: one dispatch, as nn.Linear's
            return F.linear(input, self.weight, self.bias)
        transformed = torch._C._are_functorch_transforms_active()  # vmap, grad ...: the reference, as the op runs
        linear_act = ops._linear_act_without_native if transformed else ops._linear_act
        return linear_act(input, self.weight, self.bias, self.activation, residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
