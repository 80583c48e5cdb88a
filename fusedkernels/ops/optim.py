"""Multi-tensor optimizer steps and grad norms: one fused pass over all the tensors of a list.

Native kernels: csrc/optim. The `*_ref` functions are the specification (and the CPU implementation):
per element, fp32 arithmetic whatever the storage types, in the order torch.optim uses, with the
hyperparameters rounded to fp32 as the kernels take them (1 - beta2 for beta2 = 0.999 is then
0.00099998713, not 0.001: 1.3e-5 apart, which shows when nothing cancels it).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _native

List = Sequence[Tensor]


def _scalar(t: Optional[Tensor], default: float) -> float:
    return default if t is None else float(t.item())


def _f32(*values: float) -> list[float]:
    return torch.tensor(values, dtype=torch.float32).tolist()


def _grad_factors(grad_scale, clip_coef, maximize):
    unscale = 1.0 / _scalar(grad_scale, 1.0)
    return unscale, unscale * _scalar(clip_coef, 1.0) * (-1.0 if maximize else 1.0)


def _read_grad(grad: Tensor, grad_scale: Optional[Tensor], unscale: float, factor: float) -> Tensor:
    """The grad as the step uses it (fp32, a new tensor); the unscaled grad is stored back under AMP."""
    g = grad.float() * factor
    if grad_scale is not None:
        grad.copy_(grad.float() * unscale)
    return g


def adam_step_ref(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, max_exp_avg_sqs: List,
                  masters: List, steps: List, lr: float, lr_tensor: Optional[Tensor], beta1: float, beta2: float,
                  eps: float, weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
                  grad_scale: Optional[Tensor], found_inf: Optional[Tensor], clip_coef: Optional[Tensor]) -> None:
    if _scalar(found_inf, 0.0) != 0.0:
        return
    lr, beta1, beta2, eps, weight_decay = _f32(_scalar(lr_tensor, lr), beta1, beta2, eps, weight_decay)
    unscale, factor = _grad_factors(grad_scale, clip_coef, maximize)
    for i, p in enumerate(params):
        g = _read_grad(grads[i], grad_scale, unscale, factor)
        w = masters[i].clone() if masters else p.float()
        m, v = exp_avgs[i].float(), exp_avg_sqs[i].float()
        if weight_decay != 0:
            if decoupled:
                w = w * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * w
        m = m + (1 - beta1) * (g - m)
        v = beta2 * v + (1 - beta2) * g * g
        second = v
        if amsgrad:
            second = torch.maximum(max_exp_avg_sqs[i].float(), v)
            max_exp_avg_sqs[i].copy_(second)
        step = float(steps[i].item())
        step_size = lr / (1 - beta1**step)
        w = w - step_size * m / (second.sqrt() / math.sqrt(1 - beta2**step) + eps)
        p.copy_(w)
        if masters:
            masters[i].copy_(w)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)


def sgd_step_ref(params: List, grads: List, momentum_buffers: List, masters: List, lr: float,
                 lr_tensor: Optional[Tensor], momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                 maximize: bool, first_step: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                 clip_coef: Optional[Tensor]) -> None:
    if _scalar(found_inf, 0.0) != 0.0:
        return
    lr, momentum, dampening, weight_decay = _f32(_scalar(lr_tensor, lr), momentum, dampening, weight_decay)
    unscale, factor = _grad_factors(grad_scale, clip_coef, maximize)
    for i, p in enumerate(params):
        g = _read_grad(grads[i], grad_scale, unscale, factor)
        w = masters[i].clone() if masters else p.float()
        if weight_decay != 0:
            g = g + weight_decay * w
        if momentum != 0:
            buf = g if first_step else momentum * momentum_buffers[i].float() + (1 - dampening) * g
            momentum_buffers[i].copy_(buf)
            g = g + momentum * buf if nesterov else buf
        w = w - lr * g
        p.copy_(w)
        if masters:
            masters[i].copy_(w)


def lamb_step_ref(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, masters: List, steps: List,
                  lr: float, lr_tensor: Optional[Tensor], beta1: float, beta2: float, eps: float, weight_decay: float,
                  decoupled: bool, bias_correction: bool, grad_averaging: bool, always_adapt: bool,
                  grad_norm: Optional[Tensor], max_grad_norm: float, maximize: bool, grad_scale: Optional[Tensor],
                  found_inf: Optional[Tensor], clip_coef: Optional[Tensor]) -> None:
    if _scalar(found_inf, 0.0) != 0.0:
        return
    lr, beta1, beta2, eps, weight_decay, max_grad_norm = _f32(_scalar(lr_tensor, lr), beta1, beta2, eps, weight_decay,
                                                              max_grad_norm)
    unscale, factor = _grad_factors(grad_scale, clip_coef, maximize)
    if grad_norm is not None:
        norm = float(grad_norm.item()) * abs(factor)  # the norm of the grads as the step sees them
        if norm > max_grad_norm:
            factor /= norm / max_grad_norm
    grad_weight = 1 - beta1 if grad_averaging else 1.0
    for i, p in enumerate(params):
        g = _read_grad(grads[i], grad_scale, unscale, factor)
        w = masters[i].clone() if masters else p.float()
        if not decoupled and weight_decay != 0:
            g = g + weight_decay * w
        # the moments as stored (rounded to their dtype): the update is computed from those
        exp_avgs[i].copy_(beta1 * exp_avgs[i].float() + grad_weight * g)
        exp_avg_sqs[i].copy_(beta2 * exp_avg_sqs[i].float() + (1 - beta2) * g * g)
        step = float(steps[i].item())
        bc1, bc2 = (1 - beta1**step, 1 - beta2**step) if bias_correction else (1.0, 1.0)
        u = (exp_avgs[i].float() / bc1) / ((exp_avg_sqs[i].float() / bc2).sqrt() + eps)
        if decoupled:
            u = u + weight_decay * w
        w_norm, u_norm = float(w.norm()), float(u.norm())
        adapt = (always_adapt or weight_decay != 0) and w_norm > 0 and u_norm > 0
        w = w - lr * (w_norm / u_norm if adapt else 1.0) * u
        p.copy_(w)
        if masters:
            masters[i].copy_(w)


def grad_norm_ref(grads: List, norm_type: float, max_norm: float):
    if math.isinf(norm_type):
        total = torch.stack([g.float().abs().max() for g in grads if g.numel()]).max() if any(
            g.numel() for g in grads) else grads[0].new_zeros((), dtype=torch.float32)
    else:
        total = torch.stack([g.float().square().sum() for g in grads]).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total.float(), coef.float()


def scale_grads_ref(grads: List, coef: Tensor) -> None:
    for g in grads:
        g.copy_(g.float() * coef)


if _native.loaded:
    torch.library.register_kernel("fusedkernels::adam_step_", "cpu", adam_step_ref)
    torch.library.register_kernel("fusedkernels::sgd_step_", "cpu", sgd_step_ref)
    torch.library.register_kernel("fusedkernels::lamb_step_", "cpu", lamb_step_ref)
    torch.library.register_kernel("fusedkernels::grad_norm", "cpu", grad_norm_ref)
    torch.library.register_kernel("fusedkernels::scale_grads_", "cpu", scale_grads_ref)

    @torch.library.register_fake("fusedkernels::adam_step_")
    def _(*args):
        return None

    @torch.library.register_fake("fusedkernels::sgd_step_")
    def _(*args):
        return None

    @torch.library.register_fake("fusedkernels::lamb_step_")
    def _(*args):
        return None

    @torch.library.register_fake("fusedkernels::grad_norm")
    def _(grads, norm_type, max_norm):
        return grads[0].new_empty((), dtype=torch.float32), grads[0].new_empty((), dtype=torch.float32)

    @torch.library.register_fake("fusedkernels::scale_grads_")
    def _(grads, coef):
        return None


def _route(op: str, device: torch.device):
    """The custom op when it can run here, else the reference (with one warning for CUDA tensors)."""
    if not _native.loaded:
        if device.type == "cuda":
            _native.warn_fallback(op, f"the native module is not loaded ({_native.error})")
        return None
    if device.type == "cuda" and not _native.has_cuda_kernel(op):
        _native.warn_fallback(op, "this build has no CUDA kernel for it (see FUSEDKERNELS_FAMILIES)")
        return None
    return getattr(torch.ops.fusedkernels, op)


def adam_step_(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, max_exp_avg_sqs: List, masters: List,
               steps: List, *, lr: float, lr_tensor: Optional[Tensor] = None, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled: bool, amsgrad: bool = False, maximize: bool = False,
               grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
               clip_coef: Optional[Tensor] = None) -> None:
    """One Adam (decoupled=False) or AdamW (decoupled=True) step over every tensor of the lists, in place.

    params / grads: one dtype (fp32, fp16 or bf16); states fp32 or bf16; masters: fp32 copies of 16-bit
    params (read and written) or empty; steps: per-param float32 step counts, already incremented.
    """
    op = _route("adam_step_", params[0].device) if params else None
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(masters),
            list(steps), lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
            grad_scale, found_inf, clip_coef)
    if params:
        (op or adam_step_ref)(*args)


def sgd_step_(params: List, grads: List, momentum_buffers: List, masters: List, *, lr: float,
              lr_tensor: Optional[Tensor] = None, momentum: float = 0.0, dampening: float = 0.0,
              weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False, first_step: bool = False,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
              clip_coef: Optional[Tensor] = None) -> None:
    """One SGD step (torch.optim.SGD's formulas) over every tensor of the lists, in place."""
    op = _route("sgd_step_", params[0].device) if params else None
    args = (list(params), list(grads), list(momentum_buffers), list(masters), lr, lr_tensor, momentum, dampening,
            weight_decay, nesterov, maximize, first_step, grad_scale, found_inf, clip_coef)
    if params:
        (op or sgd_step_ref)(*args)


def lamb_step_(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, masters: List, steps: List, *,
               lr: float, lr_tensor: Optional[Tensor] = None, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled: bool = True, bias_correction: bool = True, grad_averaging: bool = True,
               always_adapt: bool = False, grad_norm: Optional[Tensor] = None, max_grad_norm: float = math.inf,
               maximize: bool = False, grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
               clip_coef: Optional[Tensor] = None) -> None:
    """One LAMB step (apex FusedLAMB's formulas) over every tensor of the lists, in place.

    Lists as in `adam_step_`. grad_norm: the total 2-norm of the raw grads (a one-element float32 device
    tensor, e.g. from `grad_norm`); the grads are then clipped to max_grad_norm inside the step.
    decoupled: weight decay inside the update (apex's adam_w_mode) rather than added to the grad;
    always_adapt: apply the trust ratio to params without weight decay too (apex's use_nvlamb).
    """
    op = _route("lamb_step_", params[0].device) if params else None
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(masters), list(steps), lr, lr_tensor,
            beta1, beta2, eps, weight_decay, decoupled, bias_correction, grad_averaging, always_adapt, grad_norm,
            max_grad_norm, maximize, grad_scale, found_inf, clip_coef)
    if params:
        (op or lamb_step_ref)(*args)


def grad_norm(grads: List, norm_type: float = 2.0, max_norm: float = math.inf) -> tuple[Tensor, Tensor]:
    """Total 2- or inf-norm of the tensors (fp32, deterministic) and min(max_norm / (total + 1e-6), 1)."""
    op = _route("grad_norm", grads[0].device)
    return (op or grad_norm_ref)(list(grads), float(norm_type), float(max_norm))


def scale_grads_(grads: List, coef: Tensor) -> None:
    """grads *= coef (a one-element float32 tensor on the grads' device), in place."""
    if grads:
        op = _route("scale_grads_", grads[0].device)
        (op or scale_grads_ref)(list(grads), coef)


# What `python -m fusedkernels.info` reports for this family.
SUPPORT = {
    "adam_step_": {
        "kernel": "adam_step_",
        "dtypes": "fp32 / fp16 / bf16 params (16-bit: optional fp32 masters), fp32 or bf16 states",
        "sizes": "any number of tensors (384 a launch), any size (64-bit offsets)",
    },
    "sgd_step_": {
        "kernel": "sgd_step_",
        "dtypes": "fp32 / fp16 / bf16 params (16-bit: optional fp32 masters and buffers)",
        "sizes": "any number of tensors (384 a launch), any size (64-bit offsets)",
    },
    "lamb_step_": {
        "kernel": "lamb_step_",
        "dtypes": "fp32 / fp16 / bf16 params (16-bit: optional fp32 masters), fp32 or bf16 states",
        "sizes": "any number of tensors (384 a launch), any size (64-bit offsets)",
    },
    "grad_norm": {"kernel": "grad_norm", "dtypes": "fp32 / fp16 / bf16 grads", "sizes": "2-norm and inf-norm"},
    "scale_grads_": {"kernel": "scale_grads_", "dtypes": "fp32 / fp16 / bf16 grads", "sizes": "any"},
}
