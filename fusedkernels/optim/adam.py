"""FusedAdam / FusedAdamW: torch.optim.Adam / AdamW in one fused multi-tensor kernel per step."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import optim as ops
from ._base import FusedOptimizer


class FusedAdam(FusedOptimizer):
    """`torch.optim.Adam` with the same arguments, checks, param groups, schedulers and state_dict, plus:

    master_weights: keep an fp32 copy of each 16-bit param (state "master_param"); the step reads it and
        writes both it and the param.
    state_dtype: torch.float32 or torch.bfloat16 for exp_avg / exp_avg_sq / max_exp_avg_sq. Default: the
        param's dtype for fp32 and bf16 params without master weights (as torch), float32 otherwise.

    float32 / float16 / bfloat16 CUDA params step in the fused kernel; float64 params take torch's fused
    Adam (one warning), CPU params torch's CPU one; complex params step as their real views, as in torch.
    `foreach`, `fused` and `capturable` are accepted for compatibility: the step is always fused and never
    syncs with the host, so it can always be captured in a CUDA graph (after a first, eager step).
    """

    _decoupled_default = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 foreach: Optional[bool] = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 decoupled_weight_decay: Optional[bool] = None, master_weights: bool = False,
                 state_dtype: Optional[torch.dtype] = None):
        betas = self._check_adam_args(lr, betas, eps, weight_decay)
        decoupled = self._decoupled_default if decoupled_weight_decay is None else decoupled_weight_decay
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled)
        super().__init__(params, defaults, master_weights, state_dtype)

    def _moment_keys(self, group: dict) -> list[str]:
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])

    def _step(self, closure):
        loss = self._evaluate(closure)
        grad_scale, found_inf, clip = self._amp_and_clip()
        for index, group in enumerate(self.param_groups):
            buckets = self._buckets(index)
            beta1, beta2 = group["betas"]
            for b, params, grads, states, masters, steps in buckets:
                lr, lr_tensor = self._lr_args(group, b.device)
                ops.adam_step_(
                    params, grads, states["exp_avg"], states["exp_avg_sq"], states.get("max_exp_avg_sq", []),
                    masters, steps, lr=lr, lr_tensor=lr_tensor, beta1=float(beta1), beta2=float(beta2),
                    eps=group["eps"], weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
                    amsgrad=group["amsgrad"], maximize=group["maximize"], grad_scale=self._on(grad_scale, b.device),
                    found_inf=self._on(found_inf, b.device), clip_coef=self._value_for(clip, params))
            self._stepped(buckets)
        return loss


class FusedAdamW(FusedAdam):
    """`torch.optim.AdamW` (decoupled weight decay, default 1e-2); see FusedAdam for the extras."""

    _decoupled_default = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, **kwargs):
        kwargs.setdefault("decoupled_weight_decay", True)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
