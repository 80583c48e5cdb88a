"""FusedAdam / FusedAdamW: torch.optim.Adam / AdamW in one fused multi-tensor kernel per step."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import optim as ops
from ._base import FusedOptimizer


class FusedAdam(FusedOptimizer):
    """`torch.optim.Adam` with the same arguments, param groups, schedulers and state_dict, plus:

    master_weights: keep an fp32 copy of each 16-bit param (state "master_param"); the step reads it and
        writes both it and the param.
    state_dtype: torch.float32 or torch.bfloat16 for exp_avg / exp_avg_sq / max_exp_avg_sq. Default: the
        param's dtype for fp32 and bf16 params without master weights (as torch), float32 otherwise.

    `foreach`, `fused` and `capturable` are accepted for compatibility: the step is always fused and never
    syncs with the host, so it can always be captured in a CUDA graph (after a first, eager step).
    """

    _decoupled_default = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 foreach: Optional[bool] = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 decoupled_weight_decay: Optional[bool] = None, master_weights: bool = False,
                 state_dtype: Optional[torch.dtype] = None):
        self._check_adam_args(lr, betas, eps, weight_decay)
        decoupled = self._decoupled_default if decoupled_weight_decay is None else decoupled_weight_decay
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled)
        super().__init__(params, defaults, master_weights, state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate(closure)
        grad_scale, found_inf, clip = self._amp_and_clip()
        for group in self.param_groups:
            keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
            beta1, beta2 = group["betas"]
            for (device, *_), b in self._moment_buckets(group, keys).items():
                lr, lr_tensor = self._lr_args(group, device)
                inf = self._on(found_inf, device)
                undo_if_skipped = self._count_step(b["step"], inf)
                ops.adam_step_(
                    b["p"], b["g"], b["exp_avg"], b["exp_avg_sq"], b.get("max_exp_avg_sq", []), b["master"],
                    b["step"], lr=lr, lr_tensor=lr_tensor, beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                    weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
                    amsgrad=group["amsgrad"], maximize=group["maximize"], grad_scale=self._on(grad_scale, device),
                    found_inf=inf, clip_coef=self._on(clip, device))
                undo_if_skipped()
        return loss


class FusedAdamW(FusedAdam):
    """`torch.optim.AdamW` (decoupled weight decay, default 1e-2); see FusedAdam for the extras."""

    _decoupled_default = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, **kwargs):
        kwargs.setdefault("decoupled_weight_decay", True)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
