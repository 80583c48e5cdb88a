"""clip_grad_norm_: the total grad norm in one deterministic multi-tensor pass, the scaling fused."""

from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from ..ops import optim as ops
from ._base import FusedOptimizer


def total_grad_norm(grads: list[Tensor], norm_type: float, max_norm: float):
    """The total 2- or inf-norm of grads on any devices and dtypes, and min(max_norm / (total + 1e-6), 1),
    as float32 tensors on the first grad's device; also the grads grouped by (device, dtype)."""
    groups: dict = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    results = [ops.grad_norm(group, norm_type, max_norm) for group in groups.values()]
    if len(results) == 1:
        return groups, *results[0]
    device = results[0][0].device
    totals = torch.stack([t.to(device) for t, _ in results])
    total = totals.max() if math.isinf(norm_type) else totals.norm()
    return groups, total, torch.clamp(max_norm / (total + 1e-6), max=1.0)


def clip_grad_norm_(parameters: Union[Tensor, Iterable[Tensor]], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None, *,
                    defer_to: Optional[FusedOptimizer] = None) -> Tensor:
    """Like `torch.nn.utils.clip_grad_norm_`: returns the total norm of the grads (a float32 tensor) and
    scales them by min(max_norm / (total + 1e-6), 1), without a host sync.

    norm_type 2 and inf have native kernels (other norms use torch's implementation). With
    `defer_to=optimizer` (one of the fused optimizers) the grads are not touched here: the optimizer's
    next step multiplies them by the coefficient as it reads them, saving a read and a write of every grad.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    if norm_type != 2.0 and not math.isinf(norm_type):
        if defer_to is not None:
            raise ValueError("clip_grad_norm_: defer_to needs norm_type 2 or inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    groups, total, coef = total_grad_norm([p.grad for p in params], norm_type, max_norm)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                           "so it cannot be clipped. To disable this error and scale the gradients by the "
                           "non-finite norm anyway, set `error_if_nonfinite=False`")
    if defer_to is not None:
        defer_to.defer_grad_clip(coef)
    else:
        for (device, _), grads in groups.items():
            ops.scale_grads_(grads, coef.to(device))
    return total
