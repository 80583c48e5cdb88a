"""clip_grad_norm_: the total grad norm in one deterministic multi-tensor pass, the scaling fused."""

from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from .. import _native
from ..ops import optim as ops
from . import _dtensor
from ._base import FusedOptimizer


def total_grad_norm(grads: list[Tensor], norm_type: float, max_norm: float = math.inf):
    """The total 2- or +inf-norm of grads of any devices and dtypes, on the first grad's device, and
    min(max_norm / (total + 1e-6), 1). float32, float16 and bfloat16 grads go through the fused kernel (a
    float32 result); float64 and complex ones through torch's foreach norm, in their own precision (a
    float64 result when any grad is float64), as torch.nn.utils.clip_grad_norm_.

    DTensor grads (FSDP2, tensor parallel) count whole: the norm of their local shards, squared and summed
    (or maxed) across the mesh dims they are sharded on, per (mesh, placements) group (partial-sum grads are
    reduced first). Also returns the local grads grouped by (device, dtype), to scale them in place."""
    measured: dict = {}
    local_groups: dict = {}
    for g in grads:
        shard = _dtensor.local(g)
        local_groups.setdefault((shard.device, g.dtype), []).append(shard)
        whole = _dtensor.without_partial(g)
        measured.setdefault((shard.device, g.dtype, _dtensor.sharding(whole)), []).append(_dtensor.local(whole))
    results = []
    for (_, dtype, layout), group in measured.items():
        # float64 and complex groups: torch's foreach norm, without the warning a CUDA list without a kernel gets
        total, coef = (ops.grad_norm(group, norm_type, max_norm) if dtype in _native.KERNEL_DTYPES
                       else ops.grad_norm_torch(group, norm_type, max_norm))
        if layout is not None and not all(p.is_replicate() for p in layout[1]):
            if norm_type == math.inf:
                total = _dtensor.all_reduce(total, layout, "max")
            else:
                total = _dtensor.all_reduce(total.square(), layout, "sum").sqrt()
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        results.append((total, coef))
    if len(results) == 1:
        return local_groups, *results[0]
    device = _dtensor.local(grads[0]).device
    dtype = torch.float64 if any(t.dtype == torch.float64 for t, _ in results) else torch.float32
    totals = torch.stack([t.to(device=device, dtype=dtype) for t, _ in results])
    total = totals.max() if norm_type == math.inf else totals.norm()
    return local_groups, total, torch.clamp(max_norm / (total + 1e-6), max=1.0)


def clip_grad_norm_(parameters: Union[Tensor, Iterable[Tensor]], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None, *,
                    defer_to: Optional[FusedOptimizer] = None) -> Tensor:
    """Like `torch.nn.utils.clip_grad_norm_`: returns the total norm of the grads and scales them by
    min(max_norm / (total + 1e-6), 1), without a host sync.

    The norm is a float32 tensor for float32 / float16 / bfloat16 grads (computed by the fused kernel,
    deterministic), float64 when a grad is float64; complex grads count through their magnitudes, as in
    torch. norm_type 2 and inf are fused (other norms, -inf included, use torch's implementation).

    DTensor grads (FSDP2's fully_shard, tensor parallel) count whole, as in torch: each rank norms its local
    shards and the squared partial norms are all-reduced over the mesh (a max for inf); every rank then
    scales its shards by the same coefficient. The norm is then returned as a replicated DTensor, as torch
    returns it (`.full_tensor()` gives the value).

    defer_to=optimizer (one of fusedkernels.optim's): the grads are not touched here; the optimizer's next
    step multiplies them by the coefficient as it reads them, saving a read and a write of every grad.
    The params must be exactly the optimizer's params that have grads. The clip is pending until that
    step, dropped by `optimizer.zero_grad()`, and composes with a clip still pending (returning the norm
    of the grads as that clip left them, as two clips in a row would); a step that finds the grads
    changed since the clip raises RuntimeError.
    """
    if defer_to is not None and not isinstance(defer_to, FusedOptimizer):
        raise TypeError("clip_grad_norm_: defer_to must be one of fusedkernels.optim's optimizers (FusedAdamW, "
                        f"FusedAdam, FusedSGD, FusedLAMB), got {type(defer_to).__name__}; without defer_to the grads "
                        "are scaled here")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    sparse = any(p.grad.is_sparse for p in params)
    if norm_type not in (2.0, math.inf) or sparse:  # torch's implementation
        if defer_to is not None:
            raise ValueError(f"clip_grad_norm_: defer_to needs dense grads and norm_type 2 or inf, got "
                             f"norm_type {norm_type}{' and sparse grads' if sparse else ''}")
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    pending = defer_to.deferred_clip_coef() if defer_to is not None else None
    groups, total, coef = total_grad_norm([p.grad for p in params], norm_type, max_norm)
    if pending is not None:  # the grads as the pending clip leaves them
        total = total * pending
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                           "so it cannot be clipped. To disable this error and scale the gradients by the "
                           "non-finite norm anyway, set `error_if_nonfinite=False`")
    if defer_to is not None:
        defer_to.defer_grad_clip(coef if pending is None else coef * pending, params)
    else:
        for (device, dtype), grads in groups.items():
            if dtype in _native.KERNEL_DTYPES:
                ops.scale_grads_(grads, coef.to(device=device, dtype=torch.float32))
            else:
                torch._foreach_mul_(grads, coef.to(device))
    layout = next(filter(None, map(_dtensor.sharding, (p.grad for p in params))), None)
    return total if layout is None else _dtensor.replicated(total, layout)
