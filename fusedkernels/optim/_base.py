"""What the fused optimizers share: bucketing params by device and dtype, AMP and deferred clipping."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


class FusedOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer whose step is one fused kernel per (device, dtype) bucket of each group.

    Works with torch.amp.GradScaler without host syncs: the scaler hands over `grad_scale` and `found_inf`
    and the kernel unscales the grads and skips the step on inf/NaN, on the device.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, master_weights: bool, state_dtype: Optional[torch.dtype] = None):
        if defaults.get("differentiable"):
            raise ValueError(f"{type(self).__name__} does not support differentiable=True")
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        super().__init__(params, defaults)
        self.master_weights = bool(master_weights)
        self.state_dtype = state_dtype
        self._clip_coef: Optional[Tensor] = None

    @staticmethod
    def _check_adam_args(lr, betas, eps: float, weight_decay: float) -> None:
        """torch.optim.Adam's checks of its arguments, with its messages."""
        if not (isinstance(lr, Tensor) or 0.0 <= lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that state tensors keep their saved dtype: torch casts every floating state
        tensor to its param's dtype, which would round fp32 masters and fp32 states of 16-bit params."""
        super().load_state_dict(state_dict)
        saved_state = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for param_id, p in zip(saved_group["params"], group["params"]):
                for key, value in saved_state.get(param_id, {}).items():
                    if (key != "step" and isinstance(value, Tensor) and value.is_floating_point()
                            and value.dtype != p.dtype):
                        self.state[p][key] = value.to(device=p.device, copy=True)

    def defer_grad_clip(self, coef: Tensor) -> None:
        """Multiply the grads by `coef` (a one-element device tensor) inside the next step instead of in a
        separate pass: what `fusedkernels.optim.clip_grad_norm_(..., defer_to=optimizer)` does."""
        self._clip_coef = coef

    def _amp_and_clip(self):
        clip, self._clip_coef = self._clip_coef, None
        return getattr(self, "grad_scale", None), getattr(self, "found_inf", None), clip

    @staticmethod
    def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
        return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())

    def _lr_args(self, group: dict, device: torch.device):
        lr = group["lr"]
        if isinstance(lr, Tensor):
            return 0.0, self._on(lr, device)
        return float(lr), None

    def _params_with_grads(self, group: dict):
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"{type(self).__name__}: params must be float32, float16 or bfloat16, got {p.dtype}")
            if p.grad.dtype != p.dtype:
                raise TypeError(f"{type(self).__name__}: a grad must have its param's dtype, got {p.grad.dtype} "
                                f"for a {p.dtype} param")
            yield p

    def _master(self, p: Tensor, state: dict) -> Optional[Tensor]:
        """The fp32 master copy of a 16-bit param (created from the param when missing, e.g. after loading
        a torch.optim state dict), or None."""
        if not self.master_weights or p.dtype == torch.float32:
            return None
        master = state.get("master_param")
        if master is None or master.device != p.device or master.dtype != torch.float32:
            master = (master if master is not None else p.detach()).to(device=p.device, dtype=torch.float32).clone()
            state["master_param"] = master
        return master

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        """The dtype of the moments: state_dtype when given; else the param's dtype for fp32 and bf16 params
        without master weights (as torch), float32 otherwise."""
        if self.state_dtype is not None:
            return self.state_dtype
        if p.dtype == torch.float16 or (self.master_weights and p.dtype != torch.float32):
            return torch.float32
        return p.dtype

    def _moments(self, p: Tensor, keys: list[str]) -> dict:
        """The param's state with a float32 device "step" and the moment tensors `keys` (zeros when new);
        loaded state (torch's included) is brought to the param's device and to the moments' dtype."""
        state = self.state[p]
        dtype = self._state_dtype(p)
        step = state.get("step")
        if step is None:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        elif not (isinstance(step, Tensor) and step.dtype == torch.float32 and step.device == p.device
                  and step.dim() == 0):  # e.g. a CPU step from torch.optim's state dict
            state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device).reshape(())
        for key in keys:
            t = state.get(key)
            if t is None:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            elif t.dtype != dtype or t.device != p.device:
                state[key] = t.to(device=p.device, dtype=dtype)
        return state

    def _moment_buckets(self, group: dict, keys: list[str]) -> dict:
        """The group's params with grads and their state (moments `keys`, "step", masters), bucketed by
        (device, dtype, moment dtype, has masters): per bucket the lists "p", "g", "master", "step" and
        one per key, ready for one fused step each."""
        buckets: dict = {}
        for p in self._params_with_grads(group):
            state = self._moments(p, keys)
            master = self._master(p, state)
            key = (p.device, p.dtype, state[keys[0]].dtype, master is not None)
            b = buckets.setdefault(key, {k: [] for k in ("p", "g", "master", "step", *keys)})
            b["p"].append(p)
            b["g"].append(p.grad)
            b["step"].append(state["step"])
            if master is not None:
                b["master"].append(master)
            for k in keys:
                b[k].append(state[k])
        return buckets

    @staticmethod
    def _count_step(steps: list[Tensor], found_inf: Optional[Tensor]):
        """Increments the step counters before a step; call the result after it: a step skipped for
        found_inf does not count (as in torch's fused Adam)."""
        torch._foreach_add_(steps, 1.0)

        def undo_if_skipped():
            if found_inf is not None:
                torch._foreach_sub_(steps, [found_inf] * len(steps))

        return undo_if_skipped

    @staticmethod
    def _evaluate(closure: Optional[Callable]):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()
