"""Suite `optim`: one optimizer step over a whole model's parameter list, against torch's fused and foreach
optimizers, and clip_grad_norm_ against torch's foreach version.

Steps are captured in CUDA graphs (torch's optimizers with capturable=True), so the times are the GPU's.
GB/s counts the traffic each update must move per parameter:
  AdamW fp32: read param, grad, exp_avg, exp_avg_sq, write param, exp_avg, exp_avg_sq: 28 B;
  AdamW bf16 params + fp32 masters and states: grad 2, master 4 + 4, param 2, moments 16: 28 B;
  AdamW bf16 params and states (torch's bf16 path): 14 B;
  SGD with momentum fp32: read param, grad, buffer, write param, buffer: 20 B;
  LAMB fp32: the global grad norm reads the grads (4 B), the moments pass reads grad, param, m, v and
    writes m, v (24 B), the update reads param, m, v and writes param (16 B): 44 B;
  the grad norm reads every grad once; norm + scale reads, reads, writes.
torch has no LAMB: its baseline is LAMB written with torch's _foreach ops (ForeachLAMB below).
"""

from __future__ import annotations

import gc

import torch

from fusedkernels import ops
from fusedkernels.optim import FusedAdamW, FusedLAMB, FusedSGD, clip_grad_norm_

from .common import Row, time_graph


class ForeachLAMB:
    """LAMB (FusedLAMB's defaults: global clip to 1.0, decoupled decay, bias correction) written with
    torch's _foreach ops and no host syncs: what a PyTorch user without a LAMB kernel would run."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.wd, self.max_norm = weight_decay, max_grad_norm
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = torch.zeros((), device=params[0].device)

    @torch.no_grad()
    def step(self):
        (b1, b2), grads = self.betas, [p.grad for p in self.params]
        self.t += 1
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        g = torch._foreach_div(grads, torch.clamp(norm / self.max_norm, min=1.0))
        torch._foreach_lerp_(self.m, g, 1 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, g, g, value=1 - b2)
        u = torch._foreach_div(self.m, 1 - b1**self.t)
        denom = torch._foreach_div(self.v, 1 - b2**self.t)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_div_(u, denom)
        torch._foreach_add_(u, self.params, alpha=self.wd)
        w_norm, u_norm = torch.stack(torch._foreach_norm(self.params)), torch.stack(torch._foreach_norm(u))
        trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0) * -self.lr
        torch._foreach_mul_(u, list(trust.unbind()))
        torch._foreach_add_(self.params, u)


def gpt2_medium_shapes():
    """355 M parameters in 292 tensors (GPT-2 medium: 24 layers, width 1024, vocabulary 50257)."""
    d, shapes = 1024, [(50257, 1024), (1024, 1024)]
    for _ in range(24):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def llama_7b_shapes():
    """6.74 B parameters in 291 tensors (Llama-2 7B: 32 layers, width 4096, MLP 11008, vocabulary 32000)."""
    d, f, shapes = 4096, 11008, [(32000, 4096)]
    for _ in range(32):
        shapes += [(d, d)] * 4 + [(f, d), (f, d), (d, f), (d,), (d,)]
    return shapes + [(d,), (32000, 4096)]


def _model(shapes, dtype):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _time_step(opt) -> float:
    opt.step()  # creates the state outside the graph
    return time_graph(lambda i: opt.step(), 1, replays=20, warmup=2)


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def run() -> list[Row]:
    rows = []

    def add(case, impl, ms, nbytes):
        rows.append(Row("optim", case, impl, round(ms, 4), GBps=round(nbytes / ms / 1e6, 1)))
        print(f"  {case:<40} {impl:<14} {ms:8.3f} ms {rows[-1].GBps:8.0f} GB/s", flush=True)

    for label, shapes_fn in (("355M", gpt2_medium_shapes), ("7B", llama_7b_shapes)):
        try:
            _model_rows(label, shapes_fn(), add)
        except torch.cuda.OutOfMemoryError as e:  # a smaller card: keep what was measured
            print(f"  {label}: skipped, out of memory ({e})")
            _free()
    return rows


def _model_rows(label, shapes, add):
    """Rows for one parameter list: AdamW (fp32; bf16 with fp32 masters; pure bf16), SGD, LAMB,
    clip_grad_norm_. The 7B list (108 GB in fp32) runs AdamW only, and not torch's foreach, whose
    temporaries do not fit beside it."""
    n = sum(torch.Size(s).numel() for s in shapes)
    tag = f"{label} ({len(shapes)} tensors)"
    lr = lambda: torch.tensor(1e-4, device="cuda")  # noqa: E731  (capturable lr)
    big = label == "7B"

    def measure(case, impl, dtype, make, nbytes):
        params = _model(shapes, dtype)
        add(f"{case} {tag}", impl, _time_step(make(params)), nbytes * n)
        del params
        _free()

    measure("AdamW fp32", "fusedkernels", torch.float32, lambda ps: FusedAdamW(ps, lr=lr()), 28)
    measure("AdamW fp32", "torch-fused", torch.float32,
            lambda ps: torch.optim.AdamW(ps, lr=lr(), fused=True, capturable=True), 28)
    if not big:
        measure("AdamW fp32", "torch-foreach", torch.float32,
                lambda ps: torch.optim.AdamW(ps, lr=lr(), foreach=True, capturable=True), 28)
    # bf16 params with fp32 master weights and states: torch's optimizers have no such mode
    measure("AdamW bf16 + fp32 master", "fusedkernels", torch.bfloat16,
            lambda ps: FusedAdamW(ps, lr=lr(), master_weights=True), 28)
    measure("AdamW bf16 (bf16 states)", "fusedkernels", torch.bfloat16, lambda ps: FusedAdamW(ps, lr=lr()), 14)
    measure("AdamW bf16 (bf16 states)", "torch-fused", torch.bfloat16,
            lambda ps: torch.optim.AdamW(ps, lr=lr(), fused=True, capturable=True), 14)
    if big:
        return

    # SGD with momentum, fp32 (a float lr: torch's foreach SGD reads a tensor lr on the host)
    for impl, make in (
        ("fusedkernels", lambda ps: FusedSGD(ps, lr=1e-4, momentum=0.9)),
        ("torch-fused", lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, fused=True)),
        ("torch-foreach", lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, foreach=True)),
    ):
        measure("SGD momentum fp32", impl, torch.float32, make, 20)

    # LAMB, fp32, global clip to 1.0
    measure("LAMB fp32", "fusedkernels", torch.float32, lambda ps: FusedLAMB(ps, lr=lr()), 44)
    measure("LAMB fp32", "torch-foreach", torch.float32, lambda ps: ForeachLAMB(ps, lr=lr()), 44)

    # clip_grad_norm_: the total norm alone (one read of the grads: what defer_to leaves), and norm + scale
    # (read, read, write)
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        params = _model(shapes, dtype)
        grads = [p.grad for p in params]
        name = str(dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")
        ours = time_graph(lambda i: ops.grad_norm(grads), 1, replays=20)
        theirs = time_graph(lambda i: torch.nn.utils.get_total_norm(grads, foreach=True), 1, replays=20)
        add(f"clip_grad_norm {name} norm only {tag}", "fusedkernels", ours, size * n)
        add(f"clip_grad_norm {name} norm only {tag}", "torch-foreach", theirs, size * n)
        # max_norm 1e9: the coefficient is 1, so replays leave the grads as they are
        ours = time_graph(lambda i: clip_grad_norm_(params, 1e9), 1, replays=20)
        theirs = time_graph(lambda i: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True), 1, replays=20)
        add(f"clip_grad_norm {name} {tag}", "fusedkernels", ours, 3 * size * n)
        add(f"clip_grad_norm {name} {tag}", "torch-foreach", theirs, 3 * size * n)
        del params, grads
        _free()
