"""FusedLAMB: LAMB (You et al., 2019) as apex's FusedLAMB computes it, without host syncs."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..ops import optim as ops
from . import _dtensor
from ._base import FusedOptimizer
from .clip import total_grad_norm


class FusedLAMB(FusedOptimizer):
    """LAMB with apex.optimizers.FusedLAMB's arguments and formulas. Per step:

        g = grad / max(1, |all grads| / max_grad_norm)        (one global 2-norm over every group)
        m = beta1 m + (1 - beta1) g      (grad_averaging; else m = beta1 m + g)
        v = beta2 v + (1 - beta2) g^2
        u = m^ / (sqrt(v^) + eps) + weight_decay * w           (^: bias-corrected when bias_correction)
        w -= lr * |w| / |u| * u                                 (per tensor; ratio 1 when a norm is 0)

    adam_w_mode=False adds weight_decay * w to g instead of to u. The trust ratio applies to groups with
    weight decay, or to all with use_nvlamb=True. max_grad_norm=None or 0 turns the global clip off.

    Extras, as in FusedAdam: master_weights (fp32 copies of 16-bit params, state "master_param"),
    state_dtype (float32 or bfloat16 moments), maximize, a tensor lr; the step never syncs with the host,
    so it can be captured in a CUDA graph after a first eager step.

    DTensor params (FSDP2): the global grad norm and each param's |w| and |u| are taken over all its shards
    (the per-shard sums all-reduced over the mesh), so a sharded run steps as a single-device one.
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 amsgrad=False, adam_w_mode=True, grad_averaging=True, set_grad_none=True,
                 max_grad_norm: Optional[float] = 1.0, use_nvlamb=False, *, maximize: bool = False,
                 master_weights: bool = False, state_dtype: Optional[torch.dtype] = None):
        if amsgrad:
            raise RuntimeError("FusedLAMB does not support the AMSGrad variant.")  # apex's error
        betas = self._check_adam_args(lr, betas, eps, weight_decay)
        if max_grad_norm is not None and max_grad_norm < 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, maximize=maximize)
        super().__init__(params, defaults, master_weights, state_dtype)
        self.adam_w_mode = bool(adam_w_mode)
        self.use_nvlamb = bool(use_nvlamb)
        self.set_grad_none = bool(set_grad_none)

    _option_attributes = FusedOptimizer._option_attributes + ("adam_w_mode", "use_nvlamb", "set_grad_none")

    def zero_grad(self, set_to_none: Optional[bool] = None) -> None:
        super().zero_grad(self.set_grad_none if set_to_none is None else set_to_none)

    def _moment_keys(self, group: dict) -> list[str]:
        return ["exp_avg", "exp_avg_sq"]

    _step_in_state = False  # apex's state dicts keep the count in the param group

    def _init_step(self, p, state: dict, started: bool, group: dict) -> None:
        """apex counts steps per group: a param's first step in a group that has stepped before continues the
        group's count (its bias correction is apex's), and an apex checkpoint's group "step" seeds the
        counts of its params."""
        if state.get("step") is None:
            counts = [self.state[q]["step"] for q in group["params"]
                      if q is not p and isinstance(self.state.get(q, {}).get("step"), torch.Tensor)]
            if counts:
                state["step"] = torch.stack([c.to(p.device) for c in counts]).max().reshape(())
            elif "step" in group:  # apex's state dict
                state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32, device=p.device)
        super()._init_step(p, state, started, group)

    def _global_grad_norm(self) -> Optional[torch.Tensor]:
        """The 2-norm of every grad of every group (as apex), or None when the clip is off."""
        max_norm = self.defaults["max_grad_norm"]
        if not max_norm:
            return None
        params, grads = self._grads_with_params()
        if not grads:
            return None
        for p in params:
            self._check_grad(p)
        return total_grad_norm(grads, 2.0)[1]

    def _step(self, closure):
        loss = self._evaluate(closure)
        grad_scale, found_inf, clip = self._amp_and_clip()
        grad_norm = self._global_grad_norm()
        max_grad_norm = float(self.defaults["max_grad_norm"] or math.inf)
        for index, group in enumerate(self.param_groups):
            buckets = self._buckets(index)
            beta1, beta2 = group["betas"]
            for b, params, grads, states, masters, steps in buckets:
                lr, lr_tensor = self._lr_args(group, b.device)
                options = dict(beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                               weight_decay=group["weight_decay"], decoupled=self.adam_w_mode,
                               bias_correction=group["bias_correction"])
                found = self._on(found_inf, b.device)
                moments = dict(grad_averaging=group["grad_averaging"], grad_norm=self._value_for(grad_norm, params),
                               max_grad_norm=max_grad_norm, maximize=group["maximize"],
                               grad_scale=self._on(grad_scale, b.device), found_inf=found,
                               clip_coef=self._value_for(clip, params))
                if b.layout is None or all(p.is_replicate() for p in b.layout[1]):
                    ops.lamb_step_(params, grads, states["exp_avg"], states["exp_avg_sq"], masters, steps, lr=lr,
                                   lr_tensor=lr_tensor, always_adapt=self.use_nvlamb, **options, **moments)
                    continue
                # Sharded params: the trust ratio |w| / |u| of a param needs the sums over all its shards
                sums = ops.lamb_moments_(params, grads, states["exp_avg"], states["exp_avg_sq"], masters, steps,
                                         **options, **moments)
                sums = _dtensor.all_reduce(sums, b.layout, "sum")
                ops.lamb_apply_(params, states["exp_avg"], states["exp_avg_sq"], masters, steps, sums, lr=lr,
                                lr_tensor=lr_tensor, always_adapt=self.use_nvlamb, found_inf=found, **options)
            self._stepped(buckets)
        return loss
