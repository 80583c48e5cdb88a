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


def _acc(t: Tensor) -> torch.dtype:
    """The arithmetic's type: float64 for float64 lists (no kernel: torch's precision), else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _hyper(acc: torch.dtype, *values: float) -> list[float]:
    """Hyperparameters as the arithmetic takes them: rounded to fp32 as the kernels take them, or as given."""
    return torch.tensor(values, dtype=acc).tolist()


def _skipped(found_inf: Optional[Tensor]) -> bool:
    return found_inf is not None and float(found_inf.item()) != 0.0


def _grad_factors(grad_scale, clip_coef, maximize):
    unscale = 1.0 / _scalar(grad_scale, 1.0)
    return unscale, unscale * _scalar(clip_coef, 1.0) * (-1.0 if maximize else 1.0)


def _read_grad(grad: Tensor, grad_scale: Optional[Tensor], unscale: float, factor: float, acc: torch.dtype) -> Tensor:
    """The grad as the step uses it (a new tensor in the arithmetic's type); the unscaled grad is stored back
    under AMP."""
    g = grad.to(acc) * factor
    if grad_scale is not None:
        grad.copy_(grad.to(acc) * unscale)
    return g


def _count_steps(steps: List) -> None:
    for s in steps:
        s.add_(1)


def adam_step_ref(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, max_exp_avg_sqs: List,
                  masters: List, steps: List, lr: float, lr_tensor: Optional[Tensor], beta1: float, beta2: float,
                  eps: float, weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
                  grad_scale: Optional[Tensor], found_inf: Optional[Tensor], clip_coef: Optional[Tensor]) -> None:
    if _skipped(found_inf):
        return
    acc = _acc(params[0])
    lr, beta1, beta2, eps, weight_decay = _hyper(acc, _scalar(lr_tensor, lr), beta1, beta2, eps, weight_decay)
    unscale, factor = _grad_factors(grad_scale, clip_coef, maximize)
    for i, p in enumerate(params):
        g = _read_grad(grads[i], grad_scale, unscale, factor, acc)
        w = masters[i].clone() if masters else p.to(acc)
        m, v = exp_avgs[i].to(acc), exp_avg_sqs[i].to(acc)
        if weight_decay != 0:
            if decoupled:
                w = w * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * w
        m = m + (1 - beta1) * (g - m)
        v = beta2 * v + (1 - beta2) * g * g
        second = v
        if amsgrad:
            second = torch.maximum(max_exp_avg_sqs[i].to(acc), v)
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
    if _skipped(found_inf):
        return
    acc = _acc(params[0])
    lr, momentum, dampening, weight_decay = _hyper(acc, _scalar(lr_tensor, lr), momentum, dampening, weight_decay)
    unscale, factor = _grad_factors(grad_scale, clip_coef, maximize)
    for i, p in enumerate(params):
        g = _read_grad(grads[i], grad_scale, unscale, factor, acc)
        w = masters[i].clone() if masters else p.to(acc)
        if weight_decay != 0:
            g = g + weight_decay * w
        if momentum != 0:
            first = float(steps[i].item()) == 0  # a param's first step starts its buffer from the grad
            buf = g if first else momentum * momentum_buffers[i].to(acc) + (1 - dampening) * g
            momentum_buffers[i].copy_(buf)
            g = g + momentum * buf if nesterov else buf
        w = w - lr * g
        p.copy_(w)
        if masters:
            masters[i].copy_(w)
    if momentum != 0:
        _count_steps(steps)


def _lamb_update(m: Tensor, v: Tensor, w: Tensor, step: Tensor, acc: torch.dtype, beta1: float, beta2: float,
                 eps: float, weight_decay: float, decoupled: bool, bias_correction: bool) -> Tensor:
    """u from the moments as stored (rounded to their dtype): both phases compute the same u."""
    step = float(step.item()) + 1
    bc1, bc2 = (1 - beta1**step, 1 - beta2**step) if bias_correction else (1.0, 1.0)
    u = (m.to(acc) / bc1) / ((v.to(acc) / bc2).sqrt() + eps)
    return u + weight_decay * w if decoupled else u


def lamb_moments_ref(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, masters: List, steps: List,
                     beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
                     bias_correction: bool, grad_averaging: bool, grad_norm: Optional[Tensor], max_grad_norm: float,
                     maximize: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                     clip_coef: Optional[Tensor]) -> Tensor:
    acc = _acc(params[0])
    sums = torch.zeros(len(params), 2, dtype=acc, device=params[0].device)
    if _skipped(found_inf):
        return sums
    beta1, beta2, eps, weight_decay, max_grad_norm = _hyper(acc, beta1, beta2, eps, weight_decay, max_grad_norm)
    unscale, factor = _grad_factors(grad_scale, clip_coef, maximize)
    if grad_norm is not None:
        norm = float(grad_norm.item()) * abs(factor)  # the norm of the grads as the step sees them
        if norm > max_grad_norm:
            factor /= norm / max_grad_norm
    grad_weight = 1 - beta1 if grad_averaging else 1.0
    for i, p in enumerate(params):
        g = _read_grad(grads[i], grad_scale, unscale, factor, acc)
        w = masters[i] if masters else p.to(acc)
        if not decoupled and weight_decay != 0:
            g = g + weight_decay * w
        exp_avgs[i].copy_(beta1 * exp_avgs[i].to(acc) + grad_weight * g)
        exp_avg_sqs[i].copy_(beta2 * exp_avg_sqs[i].to(acc) + (1 - beta2) * g * g)
        u = _lamb_update(exp_avgs[i], exp_avg_sqs[i], w, steps[i], acc, beta1, beta2, eps, weight_decay, decoupled,
                         bias_correction)
        sums[i, 0], sums[i, 1] = w.square().sum(), u.square().sum()
    return sums


def lamb_apply_ref(params: List, exp_avgs: List, exp_avg_sqs: List, masters: List, steps: List, sums: Tensor,
                   lr: float, lr_tensor: Optional[Tensor], beta1: float, beta2: float, eps: float, weight_decay: float,
                   decoupled: bool, bias_correction: bool, always_adapt: bool, found_inf: Optional[Tensor]) -> None:
    if _skipped(found_inf):
        return
    acc = _acc(params[0])
    lr, beta1, beta2, eps, weight_decay = _hyper(acc, _scalar(lr_tensor, lr), beta1, beta2, eps, weight_decay)
    norms = sums.to(acc).sqrt().tolist()
    for i, p in enumerate(params):
        w = masters[i].clone() if masters else p.to(acc)
        u = _lamb_update(exp_avgs[i], exp_avg_sqs[i], w, steps[i], acc, beta1, beta2, eps, weight_decay, decoupled,
                         bias_correction)
        w_norm, u_norm = norms[i]
        adapt = (always_adapt or weight_decay != 0) and w_norm > 0 and u_norm > 0
        w = w - lr * (w_norm / u_norm if adapt else 1.0) * u
        p.copy_(w)
        if masters:
            masters[i].copy_(w)
    _count_steps(steps)


def lamb_step_ref(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, masters: List, steps: List,
                  lr: float, lr_tensor: Optional[Tensor], beta1: float, beta2: float, eps: float, weight_decay: float,
                  decoupled: bool, bias_correction: bool, grad_averaging: bool, always_adapt: bool,
                  grad_norm: Optional[Tensor], max_grad_norm: float, maximize: bool, grad_scale: Optional[Tensor],
                  found_inf: Optional[Tensor], clip_coef: Optional[Tensor]) -> None:
    sums = lamb_moments_ref(params, grads, exp_avgs, exp_avg_sqs, masters, steps, beta1, beta2, eps, weight_decay,
                            decoupled, bias_correction, grad_averaging, grad_norm, max_grad_norm, maximize, grad_scale,
                            found_inf, clip_coef)
    lamb_apply_ref(params, exp_avgs, exp_avg_sqs, masters, steps, sums, lr, lr_tensor, beta1, beta2, eps, weight_decay,
                   decoupled, bias_correction, always_adapt, found_inf)


def grad_norm_ref(grads: List, norm_type: float, max_norm: float):
    if norm_type == math.inf:
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


def check_lists(op: str, params: List, grads: List, *states: tuple[str, List], masters: List = (),
                steps: List = (), scalars: tuple = (), state_dtypes=(torch.float32, torch.bfloat16)) -> None:
    """The native ops' checks, for the lists that take PyTorch's ops instead (CPU, float64): the same
    rules and messages, so no list is read past its end or in another layout than its param's."""
    named = [("grads", grads), *states, ("masters", masters), ("steps", steps)]
    for name, ts in named:
        if ts and len(ts) != len(params):
            raise ValueError(f"{op}: every tensor list must have {len(params)} tensors (one per param), "
                             f"{name} has {len(ts)}")
    if not (params[0].is_floating_point() or params[0].is_complex()) or any(p.dtype != params[0].dtype for p in params):
        raise TypeError(f"{op}: params must share one floating-point dtype, got "
                        f"{sorted({str(p.dtype) for p in params})}")
    if masters and params[0].dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: master weights are for 16-bit params, got {params[0].dtype}")
    for name, ts in named[:-1]:
        for i, (p, t) in enumerate(zip(params, ts)):
            if t.device != p.device or t.shape != p.shape:
                raise ValueError(f"{op}: {name} {i} must have its param's shape {list(p.shape)} and device "
                                 f"{p.device}, got {list(t.shape)} on {t.device}")
            if t.layout != torch.strided:
                raise ValueError(f"{op}: {name} {i} is sparse; the fused optimizers support dense gradients only")
    for i, g in enumerate(grads):
        if g.dtype != params[i].dtype:
            raise TypeError(f"{op}: grad {i} must be {params[i].dtype} (its param's), got {g.dtype}")
    for name, ts in states:
        if ts and (ts[0].dtype not in state_dtypes + (params[0].dtype,) or any(t.dtype != ts[0].dtype for t in ts)):
            raise TypeError(f"{op}: {name} must share one dtype, float32 or bfloat16 (or the params'), "
                            f"got {sorted({str(t.dtype) for t in ts})}")
    if masters and any(m.dtype != torch.float32 for m in masters):
        raise TypeError(f"{op}: masters must be float32")
    for name, t in scalars:
        if t is not None and not (isinstance(t, Tensor) and t.numel() == 1):
            raise ValueError(f"{op}: {name} must be a one-element tensor, got {type(t).__name__}")


def _same_layouts(params: List, *lists: List) -> bool:
    """Whether every tensor is laid out as its param: torch's fused ops walk memory in order."""
    return all(t.stride() == p.stride() for ts in lists for p, t in zip(params, ts))


def _skip_flag(found_inf: Optional[Tensor]) -> Optional[Tensor]:
    """found_inf as 0 / 1: torch's fused steps skip on exactly 1, GradScaler sums the flags of its devices."""
    return None if found_inf is None else (found_inf != 0).float()


def _undo_skipped_count(steps: List, skip: Optional[Tensor]) -> None:
    if skip is not None:  # a skipped step does not count; no host sync
        torch._foreach_sub_(list(steps), [skip.to(steps[0].device)] * len(steps))


def adam_step_torch(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, max_exp_avg_sqs: List,
                    masters: List, steps: List, lr: float, lr_tensor: Optional[Tensor], beta1: float, beta2: float,
                    eps: float, weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
                    grad_scale: Optional[Tensor], found_inf: Optional[Tensor], clip_coef: Optional[Tensor]) -> None:
    moments = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    if not exp_avgs or not exp_avg_sqs or len(steps) != len(params) or (amsgrad and not max_exp_avg_sqs):
        raise ValueError("adam_step_: exp_avgs, exp_avg_sqs and steps are required (max_exp_avg_sqs with amsgrad)")
    check_lists("adam_step_", params, grads, ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                ("max_exp_avg_sqs", max_exp_avg_sqs if amsgrad else []), masters=masters, steps=steps,
                scalars=(("lr_tensor", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf),
                         ("clip_coef", clip_coef)))
    # (traced by torch.compile, without the native op: torch's fused ops fail in inductor, the reference compiles)
    if (masters or clip_coef is not None or exp_avgs[0].dtype != params[0].dtype
            or not _same_layouts(params, grads, *moments) or torch.compiler.is_compiling()):
        return adam_step_ref(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, lr, lr_tensor,
                             beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf,
                             clip_coef)
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    skip = _skip_flag(found_inf)
    torch._foreach_add_(list(steps), 1.0)
    fused(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs) if amsgrad else [],
          list(steps), lr=lr if lr_tensor is None else lr_tensor, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
          eps=eps, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, found_inf=skip)
    _undo_skipped_count(steps, skip)


def sgd_step_torch(params: List, grads: List, momentum_buffers: List, masters: List, steps: List, lr: float,
                   lr_tensor: Optional[Tensor], momentum: float, dampening: float, weight_decay: float,
                   nesterov: bool, maximize: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                   clip_coef: Optional[Tensor]) -> None:
    if momentum != 0 and (not momentum_buffers or len(steps) != len(params)):
        raise ValueError("sgd_step_: momentum needs momentum_buffers and steps")
    buffers = list(momentum_buffers) if momentum != 0 else []
    check_lists("sgd_step_", params, grads, ("momentum_buffers", buffers), masters=masters,
                steps=steps if momentum != 0 else [], state_dtypes=(torch.float32,),
                scalars=(("lr_tensor", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf),
                         ("clip_coef", clip_coef)))
    first = [float(s.item()) == 0 for s in steps] if momentum != 0 else [False]
    if (masters or clip_coef is not None or len(set(first)) > 1 or (buffers and buffers[0].dtype != params[0].dtype)
            or not _same_layouts(params, grads, buffers) or torch.compiler.is_compiling()):  # (as adam_step_torch)
        return sgd_step_ref(params, grads, momentum_buffers, masters, steps, lr, lr_tensor, momentum, dampening,
                            weight_decay, nesterov, maximize, grad_scale, found_inf, clip_coef)
    skip = _skip_flag(found_inf)
    torch._fused_sgd_(list(params), list(grads), buffers, weight_decay=weight_decay, momentum=momentum,
                      lr=lr if lr_tensor is None else lr_tensor, dampening=dampening, nesterov=nesterov,
                      maximize=maximize, is_first_step=first[0], grad_scale=grad_scale, found_inf=skip)
    if momentum != 0:
        torch._foreach_add_(list(steps), 1.0)
        _undo_skipped_count(steps, skip)


def _check_lamb_lists(op: str, params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, masters: List,
                      steps: List) -> None:
    if not exp_avgs or not exp_avg_sqs or len(steps) != len(params):
        raise ValueError(f"{op}: exp_avgs, exp_avg_sqs and steps are required")
    check_lists(op, params, grads, ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), masters=masters, steps=steps)


def lamb_step_torch(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, masters: List, steps: List,
                    *args) -> None:
    """LAMB has no PyTorch op: the reference, after the native op's checks."""
    _check_lamb_lists("lamb_step_", params, grads, exp_avgs, exp_avg_sqs, masters, steps)
    lamb_step_ref(params, grads, exp_avgs, exp_avg_sqs, masters, steps, *args)


def lamb_moments_torch(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, masters: List, steps: List,
                       *args) -> Tensor:
    _check_lamb_lists("lamb_moments_", params, grads, exp_avgs, exp_avg_sqs, masters, steps)
    return lamb_moments_ref(params, grads, exp_avgs, exp_avg_sqs, masters, steps, *args)


def lamb_apply_torch(params: List, exp_avgs: List, exp_avg_sqs: List, masters: List, steps: List, sums: Tensor,
                     *args) -> None:
    _check_lamb_lists("lamb_apply_", params, [], exp_avgs, exp_avg_sqs, masters, steps)
    if sums.shape != (len(params), 2) or sums.device != params[0].device:
        raise ValueError(f"lamb_apply_: sums must have shape [{len(params)}, 2] (one row per param) on "
                         f"{params[0].device}, got {list(sums.shape)} on {sums.device}")
    lamb_apply_ref(params, exp_avgs, exp_avg_sqs, masters, steps, sums, *args)


def grad_norm_torch(grads: List, norm_type: float, max_norm: float):
    """torch's foreach norm: float32 results for 16-bit and float32 grads (as the kernel), the grads' own
    precision for float64 and complex ones; any norm_type."""
    if not grads or any(g.dtype != grads[0].dtype or g.device != grads[0].device for g in grads):
        raise ValueError("grad_norm: grads must be a non-empty list of one dtype on one device")
    low = all(g.dtype in (torch.float16, torch.bfloat16, torch.float32) for g in grads)
    dtype = torch.float32 if low else None
    if norm_type == math.inf:  # empty tensors (an empty local shard) add nothing, as in the kernel
        grads = [g for g in grads if g.numel()] or [grads[0].new_zeros(1)]
    norms = torch._foreach_norm(list(grads), norm_type, dtype=dtype)
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    return total, torch.clamp(max_norm / (total + 1e-6), max=1.0)


def scale_grads_torch(grads: List, coef: Tensor) -> None:
    torch._foreach_mul_(list(grads), coef)


if _native.has_op("adam_step_"):
    torch.library.register_kernel("fusedkernels::adam_step_", "cpu", adam_step_torch)
    torch.library.register_kernel("fusedkernels::sgd_step_", "cpu", sgd_step_torch)
    torch.library.register_kernel("fusedkernels::lamb_step_", "cpu", lamb_step_torch)
    torch.library.register_kernel("fusedkernels::lamb_moments_", "cpu", lamb_moments_torch)
    torch.library.register_kernel("fusedkernels::lamb_apply_", "cpu", lamb_apply_torch)
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
        op = _native.route("lamb_step_", params[0], lamb_step_torch, "the reference LAMB")
        op(params, grads, exp_avgs, exp_avg_sqs, masters, steps, lr, lr_tensor, beta1, beta2, eps, weight_decay,
           decoupled, bias_correction, grad_averaging, always_adapt, grad_norm, max_grad_norm, maximize, grad_scale,
           found_inf, clip_coef)


def lamb_moments_(params: List, grads: List, exp_avgs: List, exp_avg_sqs: List, masters: List, steps: List, *,
                  beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool = True,
                  bias_correction: bool = True, grad_averaging: bool = True, grad_norm: Optional[Tensor] = None,
                  max_grad_norm: float = math.inf, maximize: bool = False, grad_scale: Optional[Tensor] = None,
                  found_inf: Optional[Tensor] = None, clip_coef: Optional[Tensor] = None) -> Tensor:
    """The first phase of `lamb_step_` for params sharded across processes (FSDP2): updates the moments and
    returns each param's sum of w^2 and of u^2 over its elements here, a [len(params), 2] tensor on their
    device (float32; float64 for float64 params). Add those up across the shards (an all-reduce), then call
    `lamb_apply_` with the totals. Arguments as in `lamb_step_`; the step count is not advanced yet."""
    if not params:
        raise ValueError("lamb_moments_: params must be a non-empty list")
    op = _native.route("lamb_moments_", params[0], lamb_moments_torch, "the reference LAMB")
    return op(params, grads, exp_avgs, exp_avg_sqs, masters, steps, beta1, beta2, eps, weight_decay, decoupled,
              bias_correction, grad_averaging, grad_norm, max_grad_norm, maximize, grad_scale, found_inf, clip_coef)


def lamb_apply_(params: List, exp_avgs: List, exp_avg_sqs: List, masters: List, steps: List, sums: Tensor, *,
                lr: float, lr_tensor: Optional[Tensor] = None, beta1: float, beta2: float, eps: float,
                weight_decay: float, decoupled: bool = True, bias_correction: bool = True, always_adapt: bool = False,
                found_inf: Optional[Tensor] = None) -> None:
    """The second phase of `lamb_step_`: the trust ratios from `sums` (each param's sum of w^2 and of u^2 over
    all its shards), the update, and the step count. The same lists and options as `lamb_moments_`."""
    if params:
        op = _native.route("lamb_apply_", params[0], lamb_apply_torch, "the reference LAMB")
        op(params, exp_avgs, exp_avg_sqs, masters, steps, sums, lr, lr_tensor, beta1, beta2, eps, weight_decay,
           decoupled, bias_correction, always_adapt, found_inf)


def grad_norm(grads: List, norm_type: float = 2.0, max_norm: float = math.inf) -> tuple[Tensor, Tensor]:
    """Total norm of the tensors (a 0-dim tensor on their device) and min(max_norm / (total + 1e-6), 1).

    grads: a non-empty list of one dtype on one device. The 2- and inf-norms of float32 / float16 /
    bfloat16 CUDA grads run the fused kernel (float32 result, deterministic); other norm types and dtypes
    run torch's foreach norm (float32 for float32 and 16-bit grads, float64 for float64, the real dtype for
    complex grads, whose norm counts their magnitudes).
    """
    norm_type, max_norm = float(norm_type), float(max_norm)
    if not grads:
        raise ValueError("grad_norm: grads must be a non-empty list of one dtype on one device")
    if norm_type not in (2.0, math.inf):
        return grad_norm_torch(grads, norm_type, max_norm)
    op = _native.route("grad_norm", grads[0], grad_norm_torch, "torch._foreach_norm")
    return op(grads, norm_type, max_norm)


def scale_grads_(grads: List, coef: Tensor) -> None:
    """grads *= coef (a one-element float32 tensor on the grads' device), in place."""
    if grads:
        _native.route("scale_grads_", grads[0], scale_grads_torch, "torch._foreach_mul_")(grads, coef)
