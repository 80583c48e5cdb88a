"""Multi-tensor optimizer steps and grad norms: one fused pass over all the tensors of a list.

Native kernels: csrc/optim, for CUDA float32 / float16 / bfloat16 lists. Other lists run PyTorch's own fused
or foreach ops where they compute the same thing (CPU lists, float64 on CUDA, with one warning for CUDA),
else the reference. The `*_ref` functions are the specification: per element, fp32 arithmetic whatever the
storage types, in the order torch.optim uses, with the hyperparameters rounded to fp32 as the kernels take
them (1 - beta2 for beta2 = 0.999 is then 0.00099998713, not 0.001: 1.3e-5 apart, which shows when nothing
cancels it).

Step counts: `steps` hold each param's count before the step (float32 scalars on the params' device); an op
adds 1 to each unless `found_inf` is nonzero, in which case the whole step is skipped.
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


def _count_steps(steps: List) -> None:
    for s in steps:
        s.add_(1)


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
        step = float(steps[i].item()) + 1
        step_size = lr / (1 - beta1**step)
        w = w - step_size * m / (second.sqrt() / math.sqrt(1 - beta2**step) + eps)
        p.copy_(w)
        if masters:
            masters[i].copy_(w)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
    _count_steps(steps)


def sgd_step_ref(params: List, grads: List, momentum_buffers: List, masters: List, steps: List, lr: float,
                 lr_tensor: Optional[Tensor], momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                 maximize: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
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
            first = float(steps[i].item()) == 0  # a param's first step starts its buffer from the grad
            buf = g if first else momentum * momentum_buffers[i].float() + (1 - dampening) * g
            momentum_buffers[i].copy_(buf)
            g = g + momentum * buf if nesterov else buf
        w = w - lr * g
        p.copy_(w)
        if masters:
            masters[i].copy_(w)
    if momentum != 0:
        _count_steps(steps)


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
        step = float(steps[i].item()) + 1
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
    _count_steps(steps)


def grad_norm_ref(grads: List, norm_type: float, max_norm: float):
    if math.isinf(norm_type):
        nonempty = [g.float().abs().max() for g in grads if g.numel()]
        total = torch.stack(nonempty).max() if nonempty else grads[0].new_zeros((), dtype=torch.float32)
    else:
        total = torch.stack([g.float().square().sum() for g in grads]).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total.float(), coef.float()


def scale_grads_ref(grads: List, coef: Tensor) -> None:
    for g in grads:
        g.copy_(g.float() * coef)


# ------------------------------------------------------------------------------------------------
# PyTorch's own ops where they compute the same thing: the CPU kernels, and the path of dtypes without a
# fused kernel. Cases they do not cover (fp32 masters of 16-bit params, moments in another dtype than the
# params, a deferred clip, LAMB) run the reference.
# ------------------------------------------------------------------------------------------------


def _undo_skipped_count(steps: List, found_inf: Optional[Tensor]) -> None:
    if found_inf is not None:  # a skipped step does not count; no host sync
        torch._foreach_sub_(list(steps), [found_inf.to(steps[0].device)] * len(steps))


def adam_step_torch(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, max_exp_avg_sqs: List,
                    masters: List, steps: List, lr: float, lr_tensor: Optional[Tensor], beta1: float, beta2: float,
                    eps: float, weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
                    grad_scale: Optional[Tensor], found_inf: Optional[Tensor], clip_coef: Optional[Tensor]) -> None:
    if masters or clip_coef is not None or exp_avgs[0].dtype != params[0].dtype:
        return adam_step_ref(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, lr, lr_tensor,
                             beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf,
                             clip_coef)
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    torch._foreach_add_(list(steps), 1.0)
    fused(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs) if amsgrad else [],
          list(steps), lr=lr if lr_tensor is None else lr_tensor, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
          eps=eps, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
    _undo_skipped_count(steps, found_inf)


def sgd_step_torch(params: List, grads: List, momentum_buffers: List, masters: List, steps: List, lr: float,
                   lr_tensor: Optional[Tensor], momentum: float, dampening: float, weight_decay: float,
                   nesterov: bool, maximize: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                   clip_coef: Optional[Tensor]) -> None:
    first = momentum != 0 and [float(s.item()) == 0 for s in steps]
    mixed = momentum != 0 and len(set(first)) > 1
    buffers_ok = momentum == 0 or momentum_buffers[0].dtype == params[0].dtype
    if masters or clip_coef is not None or mixed or not buffers_ok:
        return sgd_step_ref(params, grads, momentum_buffers, masters, steps, lr, lr_tensor, momentum, dampening,
                            weight_decay, nesterov, maximize, grad_scale, found_inf, clip_coef)
    torch._fused_sgd_(list(params), list(grads), list(momentum_buffers) if momentum != 0 else [],
                      weight_decay=weight_decay, momentum=momentum, lr=lr if lr_tensor is None else lr_tensor,
                      dampening=dampening, nesterov=nesterov, maximize=maximize,
                      is_first_step=bool(momentum != 0 and first[0]), grad_scale=grad_scale, found_inf=found_inf)
    if momentum != 0:
        torch._foreach_add_(list(steps), 1.0)
        _undo_skipped_count(steps, found_inf)


def grad_norm_torch(grads: List, norm_type: float, max_norm: float):
    norms = torch._foreach_norm(list(grads), norm_type, dtype=torch.float32)
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    return total, torch.clamp(max_norm / (total + 1e-6), max=1.0)


def scale_grads_torch(grads: List, coef: Tensor) -> None:
    torch._foreach_mul_(list(grads), coef)


if _native.has_op("adam_step_"):
    torch.library.register_kernel("fusedkernels::adam_step_", "cpu", adam_step_torch)
    torch.library.register_kernel("fusedkernels::sgd_step_", "cpu", sgd_step_torch)
    torch.library.register_kernel("fusedkernels::lamb_step_", "cpu", lamb_step_ref)
    torch.library.register_kernel("fusedkernels::grad_norm", "cpu", grad_norm_torch)
    torch.library.register_kernel("fusedkernels::scale_grads_", "cpu", scale_grads_torch)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def adam_step_(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, max_exp_avg_sqs: List, masters: List,
               steps: List, *, lr: float, lr_tensor: Optional[Tensor] = None, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled: bool, amsgrad: bool = False, maximize: bool = False,
               grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
               clip_coef: Optional[Tensor] = None) -> None:
    """One Adam (decoupled=False) or AdamW (decoupled=True) step over every tensor of the lists, in place
    (Kingma & Ba, 2015; Loshchilov & Hutter, 2019; torch.optim.Adam's formulas).

    params / grads: one dtype and device; states float32 or bfloat16, like each param; masters: float32
    copies of 16-bit params (read and written) or empty; steps: float32 scalar step counts before this step
    (incremented here unless skipped). lr_tensor overrides lr (a capturable schedule); grad_scale divides
    the grads (written back unscaled), found_inf != 0 skips the step, clip_coef multiplies the grads: all
    one-element float32 tensors on the params' device.
    """
    if params:
        op = _native.route("adam_step_", params[0], adam_step_torch, "torch._fused_adam(w)_")
        op(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, lr, lr_tensor, beta1, beta2, eps,
           weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf, clip_coef)


def sgd_step_(params: List, grads: List, momentum_buffers: List, masters: List, steps: List, *, lr: float,
              lr_tensor: Optional[Tensor] = None, momentum: float = 0.0, dampening: float = 0.0,
              weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
              clip_coef: Optional[Tensor] = None) -> None:
    """One SGD step (torch.optim.SGD's formulas) over every tensor of the lists, in place. With momentum,
    steps (float32 scalars, incremented here) mark each param's first step, which starts its buffer from
    the grad; without, steps and momentum_buffers may be empty. Otherwise as `adam_step_`."""
    if params:
        op = _native.route("sgd_step_", params[0], sgd_step_torch, "torch._fused_sgd_")
        op(params, grads, momentum_buffers, masters, steps, lr, lr_tensor, momentum, dampening, weight_decay,
           nesterov, maximize, grad_scale, found_inf, clip_coef)


def lamb_step_(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, masters: List, steps: List, *,
               lr: float, lr_tensor: Optional[Tensor] = None, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled: bool = True, bias_correction: bool = True, grad_averaging: bool = True,
               always_adapt: bool = False, grad_norm: Optional[Tensor] = None, max_grad_norm: float = math.inf,
               maximize: bool = False, grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
               clip_coef: Optional[Tensor] = None) -> None:
    """One LAMB step (You et al., 2020; apex FusedLAMB's formulas) over every tensor of the lists, in place.

    Lists as in `adam_step_`. grad_norm: the total 2-norm of the raw grads (a one-element float32 device
    tensor, e.g. from `grad_norm`); the grads are then clipped to max_grad_norm inside the step.
    decoupled: weight decay inside the update (apex's adam_w_mode) rather than added to the grad;
    always_adapt: apply the trust ratio to params without weight decay too (apex's use_nvlamb).
    """
    if params:
        op = _native.route("lamb_step_", params[0], lamb_step_ref, "the reference LAMB")
        op(params, grads, exp_avgs, exp_avg_sqs, masters, steps, lr, lr_tensor, beta1, beta2, eps, weight_decay,
           decoupled, bias_correction, grad_averaging, always_adapt, grad_norm, max_grad_norm, maximize, grad_scale,
           found_inf, clip_coef)


def grad_norm(grads: List, norm_type: float = 2.0, max_norm: float = math.inf) -> tuple[Tensor, Tensor]:
    """Total 2- or inf-norm of the tensors (float32 0-dim tensor on their device; deterministic) and
    min(max_norm / (total + 1e-6), 1). grads: a non-empty list of one dtype on one device."""
    op = _native.route("grad_norm", grads[0], grad_norm_torch, "torch._foreach_norm")
    return op(grads, float(norm_type), float(max_norm))


def scale_grads_(grads: List, coef: Tensor) -> None:
    """grads *= coef (a one-element float32 tensor on the grads' device), in place."""
    if grads:
        _native.route("scale_grads_", grads[0], scale_grads_torch, "torch._foreach_mul_")(grads, coef)
