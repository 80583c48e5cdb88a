"""FusedSGD: torch.optim.SGD in one fused multi-tensor kernel per step."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops import optim as ops
from ._base import FusedOptimizer


class FusedSGD(FusedOptimizer):
    """`torch.optim.SGD` with the same arguments, checks, groups and state_dict ("momentum_buffer"), plus
    `master_weights`: fp32 copies of 16-bit params (state "master_param"), with fp32 momentum buffers.

    With momentum each param also keeps a device-side "step" count: its first step (the first one not
    skipped by GradScaler) starts the buffer from the grad, as torch's does. state_dict() saves what torch's
    SGD saves (no count: a buffer means started). dtypes as in FusedAdam.
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize: bool = False, foreach: Optional[bool] = None, differentiable: bool = False,
                 fused: Optional[bool] = None, master_weights: bool = False):
        self._check_lr(lr)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, master_weights)

    _strict_state = False  # torch's SGD keeps no step count: a buffer alone is a started state

    def state_dict(self) -> dict:
        """What torch's SGD saves: each started param's momentum buffer (and master), without the step count,
        which a buffer implies (loading one counts the param as started). So torch.distributed.checkpoint loads
        a torch.optim.SGD checkpoint into FusedSGD: it wants every key the template has. A param whose every
        step was skipped (found_inf) has not started: its state is left out, as torch's SGD has none."""
        saved = super().state_dict()
        state = saved["state"]
        started, by_device = {}, {}
        for i, st in state.items():
            count = st.get("step")
            if isinstance(count, Tensor):
                by_device.setdefault(count.device, []).append(i)
            elif count is not None:
                started[i] = float(count) != 0
        for ids in by_device.values():  # one host sync per device
            counts = torch.stack([state[i]["step"].reshape(()).float() for i in ids]).tolist()
            started.update((i, count != 0) for i, count in zip(ids, counts))
        saved["state"] = {i: {k: v for k, v in st.items() if k != "step"} for i, st in state.items()
                          if started.get(i, True)}
        return saved

    def _moment_keys(self, group: dict) -> list[str]:
        return ["momentum_buffer"] if group["momentum"] != 0 else []

    def _counts_steps(self, group: dict) -> bool:
        return group["momentum"] != 0

    def _moment_dtype(self, p: Tensor, has_master: bool) -> torch.dtype:
        return torch.float32 if has_master else p.dtype  # torch's buffer is a copy of the grad

    def _step(self, closure):
        loss = self._evaluate(closure)
        grad_scale, found_inf, clip = self._amp_and_clip()
        for index, group in enumerate(self.param_groups):
            buckets = self._buckets(index)
            for b, params, grads, states, masters, steps in buckets:
                lr, lr_tensor = self._lr_args(group, b.device)
                ops.sgd_step_(params, grads, states.get("momentum_buffer", []), masters, steps, lr=lr,
                              lr_tensor=lr_tensor, momentum=group["momentum"], dampening=group["dampening"],
                              weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                              maximize=group["maximize"], grad_scale=self._on(grad_scale, b.device),
                              found_inf=self._on(found_inf, b.device), clip_coef=self._value_for(clip, params))
            self._stepped(buckets)
        return loss
