"""FusedSGD: torch.optim.SGD in one fused multi-tensor kernel per step."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import optim as ops
from ._base import FusedOptimizer


class FusedSGD(FusedOptimizer):
    """`torch.optim.SGD` with the same arguments, groups and state_dict ("momentum_buffer"), plus
    `master_weights`: fp32 copies of 16-bit params (state "master_param"), with fp32 momentum buffers."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize: bool = False, foreach: Optional[bool] = None, differentiable: bool = False,
                 fused: Optional[bool] = None, master_weights: bool = False):
        if not (isinstance(lr, torch.Tensor) or 0.0 <= lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, master_weights)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate(closure)
        grad_scale, found_inf, clip = self._amp_and_clip()
        for group in self.param_groups:
            momentum = group["momentum"]
            buckets: dict = {}
            for p in self._params_with_grads(group):
                state = self.state[p]
                master = self._master(p, state)
                first = False
                if momentum != 0:
                    buf = state.get("momentum_buffer")
                    buf_dtype = torch.float32 if master is not None else p.dtype
                    if buf is None:  # torch starts the buffer from the first grad
                        buf = torch.empty_like(p, dtype=buf_dtype, memory_format=torch.contiguous_format)
                        state["momentum_buffer"] = buf
                        first = True
                    elif buf.dtype != buf_dtype or buf.device != p.device:
                        state["momentum_buffer"] = buf.to(device=p.device, dtype=buf_dtype)
                key = (p.device, p.dtype, master is not None, first)
                b = buckets.setdefault(key, {"p": [], "g": [], "buf": [], "master": []})
                b["p"].append(p)
                b["g"].append(p.grad)
                if momentum != 0:
                    b["buf"].append(state["momentum_buffer"])
                if master is not None:
                    b["master"].append(master)
            for (device, _, _, first), b in buckets.items():
                lr, lr_tensor = self._lr_args(group, device)
                ops.sgd_step_(b["p"], b["g"], b["buf"], b["master"], lr=lr, lr_tensor=lr_tensor, momentum=momentum,
                              dampening=group["dampening"], weight_decay=group["weight_decay"],
                              nesterov=group["nesterov"], maximize=group["maximize"], first_step=first,
                              grad_scale=self._on(grad_scale, device), found_inf=self._on(found_inf, device),
                              clip_coef=self._on(clip, device))
        return loss
