"""Suite `optim`: one optimizer step over a whole model's parameter list, against torch's fused and foreach
optimizers, and clip_grad_norm_ against torch's foreach version.

Steps are captured in CUDA graphs (torch's optimizers with capturable=True), so the times are the GPU's.
GB/s counts each update's minimum traffic per parameter: AdamW reads param, grad, exp_avg, exp_avg_sq and
writes param, exp_avg, exp_avg_sq (fp32: 28 B);
SGD with momentum reads param, grad, buffer and writes param, buffer (fp32: 20 B); the grad norm reads
every grad once.
"""

from __future__ import annotations

import gc

import torch

from fusedkernels.optim import FusedAdamW, FusedSGD, clip_grad_norm_

from .common import Row, time_graph


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
    """Rows for one parameter list: AdamW and SGD (fp32: the native steps take fp32 params), clip_grad_norm_."""
    n = sum(torch.Size(s).numel() for s in shapes)
    tag = f"{label} ({len(shapes)} tensors)"
    lr = lambda: torch.tensor(1e-4, device="cuda")  # noqa: E731  (capturable lr)

    # AdamW, fp32 params, grads and states: 28 B / param
    for impl, make in (
        ("fusedkernels", lambda ps: FusedAdamW(ps, lr=lr())),
        ("torch-fused", lambda ps: torch.optim.AdamW(ps, lr=lr(), fused=True, capturable=True)),
        ("torch-foreach", lambda ps: torch.optim.AdamW(ps, lr=lr(), foreach=True, capturable=True)),
    ):
        if label == "7B" and impl == "torch-foreach":
            continue  # foreach's temporaries do not fit beside a 7B fp32 model's 108 GB
        params = _model(shapes, torch.float32)
        add(f"AdamW fp32 {tag}", impl, _time_step(make(params)), 28 * n)
        del params
        _free()

    if label == "7B":
        return

    # SGD with momentum, fp32: 20 B / param (a float lr: torch's foreach SGD reads a tensor lr on the host)
    for impl, make in (
        ("fusedkernels", lambda ps: FusedSGD(ps, lr=1e-4, momentum=0.9)),
        ("torch-fused", lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, fused=True)),
        ("torch-foreach", lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, foreach=True)),
    ):
        params = _model(shapes, torch.float32)
        add(f"SGD momentum fp32 {tag}", impl, _time_step(make(params)), 20 * n)
        del params
        _free()

    # clip_grad_norm_: the total norm (one read of the grads) and norm + scale (read, read, write)
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        params = _model(shapes, dtype)
        name = str(dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")
        # max_norm 1e9: the coefficient is 1, so replays leave the grads as they are
        ours = time_graph(lambda i: clip_grad_norm_(params, 1e9), 1, replays=20)
        theirs = time_graph(lambda i: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True), 1, replays=20)
        add(f"clip_grad_norm {name} {tag}", "fusedkernels", ours, 3 * size * n)
        add(f"clip_grad_norm {name} {tag}", "torch-foreach", theirs, 3 * size * n)
        del params
        _free()
