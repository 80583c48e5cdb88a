"""DTensor params and grads (FSDP2's fully_shard, tensor parallel): the fused steps run on the local shards;
what spans a whole tensor (a norm) is computed on the shards and all-reduced over the mesh dims the tensor is
split on."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # torch built without distributed
    DTensor = None


def is_dtensor(t: Tensor) -> bool:
    """Whether t is a DTensor (False when torch has no torch.distributed)."""
    return DTensor is not None and isinstance(t, DTensor)


def sharding(t: Tensor) -> Optional[tuple]:
    """(mesh, placements) of a DTensor, None for a plain tensor."""
    if is_dtensor(t):
        return t.device_mesh, t.placements
    return None


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the tensor itself otherwise). `_local_tensor` rather than `to_local()`:
    the latter is an autograd function costing ~10 µs a call, paid per tensor per step."""
    return t._local_tensor if is_dtensor(t) else t


def versions(t: Tensor) -> tuple:
    """Version counters that move when t is written in place: a DTensor's own (writes through it, e.g.
    load_state_dict) and its local shard's (writes to the shard: our steps, FSDP2's grad accumulation), which
    are separate counters."""
    shard = local(t)
    return (t._version, shard._version) if shard is not t else (t._version,)


def local_grad(grad: Tensor, param: Tensor) -> Tensor:
    """The local shard of a DTensor param's grad, laid out as the param's shard (a grad with other placements,
    e.g. a partial sum, is redistributed first, as torch's optimizers do through DTensor's dispatch)."""
    if not isinstance(grad, DTensor):
        raise TypeError(f"a DTensor param needs a DTensor grad, got a {type(grad).__name__}")
    if grad.placements != param.placements or grad.device_mesh != param.device_mesh:
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad._local_tensor


def without_partial(grad: Tensor) -> Tensor:
    """The grad with no partial-sum placements (a DTensor's local values are then its own, and norms of the
    local shard mean something): partial placements are reduced (an all-reduce), others stay."""
    if DTensor is None or not isinstance(grad, DTensor) or not any(p.is_partial() for p in grad.placements):
        return grad
    return grad.redistribute(placements=[Replicate() if p.is_partial() else p for p in grad.placements])


def all_reduce(value: Tensor, layout: tuple, op: str) -> Tensor:
    """value, computed from local shards of tensors laid out as `layout` (mesh, placements), over the whole
    tensors: reduced with op ("sum" for sums of squares, "max" for max-norms) across the mesh dims the
    tensors are sharded on (dims where they are replicated hold the same values, counted once); a NaN on any
    rank makes the max NaN, as torch's max does. On CUDA the collective runs on the device, ordered with the
    current stream: no host sync."""
    mesh, placements = layout
    if all(p.is_replicate() for p in placements):
        return value
    reduce = [Replicate() if p.is_replicate() else Partial(op) for p in placements]
    if op != "max":
        return DTensor.from_local(value, mesh, reduce, run_check=False).full_tensor()
    # A max all-reduce may drop a NaN (gloo's drops one not on rank 0): NaNs travel as a flag beside the max
    nan = value.isnan()
    both = torch.stack([value.masked_fill(nan, -math.inf), nan.to(value.dtype)])
    top, any_nan = DTensor.from_local(both, mesh, reduce, run_check=False).full_tensor().unbind()
    return top.masked_fill(any_nan != 0, math.nan)


def replicated(value: Tensor, layout: tuple) -> Tensor:
    """A full value (the same on every rank) as a replicated DTensor on layout's mesh: what torch's
    clip_grad_norm_ returns for DTensor grads."""
    mesh, _ = layout
    return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)
