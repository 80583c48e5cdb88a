"""Suite `overhead`: what an eager call costs on the host, where most users run their models.

`ms` is host milliseconds per call: calls issued back to back (no CUDA graph, no synchronize inside the
loop) and timed on the CPU clock, so it is the Python + C++ + launch cost a model pays per call. `wall_ms`
is the same loop ended by a synchronize: the call's cost when the GPU is the slower side. The impls of a row take
turns, one loop each per repeat (interleaved_host_and_wall_ms), and each reports its median. fwd+bwd runs a
chain of 8 calls and one backward through them, reported per call: a model's norms share one backward,
whose fixed cost (the autograd engine hands CUDA work to its device thread: ~0.1 ms) a single call would
otherwise be charged alone. The rows `... eager wall` report wall_ms as their time: fwd+bwd at 16384x1024
is where a fused norm must beat PyTorch in an eager model, not only inside a CUDA graph.

Impls: fusedkernels; torch (F.layer_norm / F.rms_norm, torch.optim with fused=True); liger (Liger-Kernel's
LigerLayerNorm / LigerRMSNorm) where liger_kernel is installed.

Attention rows (`sdpa ...`): ops.scaled_dot_product_attention against F.scaled_dot_product_attention (torch
picks its backend, as in a model) on [B, H, N, D] = 1x16x128x64 bf16, non-causal: forward without grad,
forward with grad, and fwd+bwd as a chain of 8 calls (each output the next call's query) and one backward.
The budget: ours within 1.2x of torch's host time.

Linear rows (`linear_act ...`): ops.linear_act(x, W, b, "gelu") against F.gelu(F.linear(x, W, b)), and
ops.linear_act(x, W, b, "none") (F.linear itself, called by ops.linear_act) against F.linear, on x [4, 1024], W
[1024, 1024] bf16 (a small shape: the host cost is the whole cost): forward without grad, forward with grad (x, W, b
require grad), and fwd+bwd as a chain of 8 calls (each output the next call's input) and one backward. Same budget.
Gated rows (`linear_gated ...`): ops.linear_gated(x, W, None, "swiglu") against its eager form on the same stacked
weight W [2048, 1024], `gate, up = F.linear(x, W).chunk(2, -1); F.silu(gate) * up`, in the same three directions.
MLP rows (`gated_mlp ...`): FusedMLP's gated op (`torch.ops.fusedkernels.gated_mlp`, one call for both GEMMs)
against the eager Llama MLP `F.linear(silu(gate) * up, W_down)` on the same weights, W_down [1024, 1024]; and
(`mlp ...`) the plain form's op (`torch.ops.fusedkernels.mlp`) against `F.linear(F.gelu(F.linear(x, W1, b1)), W2,
b2)` with W1 the first half of W and biases.

Residual rows (`add_rms_norm ...`): ops.add_rms_norm(x, residual, w) against `h = x + residual; F.rms_norm(h, ...)`
at 4x4096 bf16; fwd+bwd is one call and one backward. Conv rows (`conv2d_bias_relu ...`): ops.conv2d_bias_relu against F.relu(F.conv2d(x, W, b, padding=1)) on x [1, 64, 8, 8]
channels_last bf16, a 3x3 conv 64 -> 64 (the output feeds the next call of the chain). BatchNorm rows
(`batch_norm_relu ...`): ops.batch_norm_relu against F.relu(F.batch_norm(...)) in training on x [8, 64, 8, 8]
channels_last bf16, float32 weight, bias and running statistics. Rotary rows (`apply_rotary
...`): ops.apply_rotary(q, k, cos, sin) against Hugging Face's `q * cos + rotate_half(q) * sin` for q and k on
[1, 16, 128, 64] bf16; fwd+bwd is one call and one backward. Rotary table rows (`rotary_cos_sin ...`):
ops.rotary_cos_sin(position_ids, inv_freq) against Hugging Face's rotary embedding formula (a product, a cat, cos,
sin, two scalings, two casts) for 2048 positions, rotary_dim 128, bf16 tables. Loss rows (`linear_cross_entropy ...`):
ops.linear_cross_entropy against F.cross_entropy(F.linear(h, W).float(), t) on h [64, 256], W [1024, 256] bf16; fwd+bwd
is one call and one backward.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
import torch.nn.functional as F

from fusedkernels import ops
from fusedkernels.optim import FusedAdamW, FusedSGD

from .common import Row
from .optim import gpt2_medium_shapes

NORM_SHAPES = [(4, 4096), (16384, 1024)]
DTYPE = torch.bfloat16
DEPTH = 8  # norm calls per backward in the fwd+bwd rows


def interleaved_host_and_wall_ms(fns: dict, calls: int, ops_per_call: int = 1, repeats: int = 7, warmup: int = 10):
    """{impl: (median host ms, median wall ms) per op} for fns {impl: fn}, fn() running ops_per_call ops: the
    loop's CPU time, and the loop plus the GPU finishing. The impls take turns, one loop each per repeat, in an
    order that rotates: this shared host's speed drifts by tens of percent over seconds, which timing one impl's
    repeats after the other's charged to whichever ran in the slower stretch."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    host, wall = {impl: [] for impl in fns}, {impl: [] for impl in fns}
    order = list(fns)
    for repeat in range(repeats):
        for impl in order[repeat % len(order):] + order[:repeat % len(order)]:
            fn = fns[impl]
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            issued = time.perf_counter()
            torch.cuda.synchronize()
            done = time.perf_counter()
            host[impl].append((issued - start) / (calls * ops_per_call) * 1e3)
            wall[impl].append((done - start) / (calls * ops_per_call) * 1e3)
    return {impl: (statistics.median(host[impl]), statistics.median(wall[impl])) for impl in fns}


def host_and_wall_ms(fn, calls: int, ops_per_call: int = 1, repeats: int = 7, warmup: int = 10):
    """(median host ms, median wall ms) per op of fn alone (interleaved_host_and_wall_ms)."""
    return interleaved_host_and_wall_ms({"": fn}, calls, ops_per_call, repeats, warmup)[""]


def _liger():
    try:
        from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm
    except Exception:  # not installed (optional), or its import failed here
        return None
    return LigerLayerNorm, LigerRMSNorm


def _norm_impls(kind: str, hidden: int, w, b):
    if kind == "layer_norm":
        impls = {
            "fusedkernels": lambda x: ops.layer_norm(x, (hidden,), w, b),
            "torch": lambda x: F.layer_norm(x, (hidden,), w, b),
        }
    else:
        impls = {
            "fusedkernels": lambda x: ops.rms_norm(x, (hidden,), w, 1e-6),
            "torch": lambda x: F.rms_norm(x, (hidden,), w, 1e-6),
        }
    liger = _liger()
    if liger is not None:
        cls = liger[0] if kind == "layer_norm" else liger[1]
        module = cls(hidden, eps=1e-6).to("cuda", DTYPE)
        with torch.no_grad():
            module.weight.copy_(w)
            if kind == "layer_norm":
                module.bias.copy_(b)
        impls["liger"] = module
    return impls


def _norm_rows(add) -> None:
    for tokens, hidden in NORM_SHAPES:
        calls = 400 if tokens * hidden < 1 << 20 else 100  # keep the launch queue from filling
        x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE)
        dy = torch.randn_like(x)
        w = (torch.rand(hidden, device="cuda") + 0.5).to(DTYPE).requires_grad_()
        b = (torch.randn(hidden, device="cuda") * 0.1).to(DTYPE).requires_grad_()
        xg = x.clone().requires_grad_()
        for kind in ("layer_norm", "rms_norm"):
            shape = f"{tokens}x{hidden} bf16"
            directions = {"fwd (no grad)": {}, "fwd (grad)": {}, "fwd+bwd": {}}
            for impl, fn in _norm_impls(kind, hidden, w, b).items():
                leaves = [xg, *(fn.parameters() if isinstance(fn, torch.nn.Module) else
                                ([w, b] if kind == "layer_norm" else [w]))]

                def no_grad(fn=fn):
                    with torch.no_grad():
                        fn(x)

                def fwd_bwd(fn=fn, leaves=leaves):
                    y = xg
                    for _ in range(DEPTH):
                        y = fn(y)
                    torch.autograd.grad(y, leaves, dy)

                directions["fwd (no grad)"][impl] = no_grad
                directions["fwd (grad)"][impl] = lambda fn=fn: fn(xg)
                directions["fwd+bwd"][impl] = fwd_bwd
            for direction, fns in directions.items():
                ops_per_call = DEPTH if direction == "fwd+bwd" else 1
                times = interleaved_host_and_wall_ms(fns, calls // ops_per_call, ops_per_call)
                for impl, (host, wall) in times.items():
                    add(f"{kind} {direction} {shape}", impl, host, wall)
                    if direction == "fwd+bwd" and tokens * hidden >= 1 << 24:
                        add(f"{kind} fwd+bwd {shape} eager wall", impl, wall, wall)
        del x, dy, xg


def _three_directions(add, name: str, impls, args: tuple, leaves: list, dy) -> None:
    """Rows `name.format(direction)` for each (impl, fn): fn(*args) without grad, fn(*leaves) with grad, and
    fwd+bwd as DEPTH chained calls (the output feeding the next call's first argument) and one backward; the impls
    timed in turns (interleaved_host_and_wall_ms)."""
    directions = {"fwd (no grad)": {}, "fwd (grad)": {}, "fwd+bwd": {}}
    for impl, fn in impls:

        def no_grad(fn=fn):
            with torch.no_grad():
                fn(*args)

        def with_grad(fn=fn):
            fn(*leaves)

        def fwd_bwd(fn=fn):
            y = leaves[0]
            for _ in range(DEPTH):
                y = fn(y, *leaves[1:])
            torch.autograd.grad(y, leaves, dy)

        directions["fwd (no grad)"][impl], directions["fwd (grad)"][impl] = no_grad, with_grad
        directions["fwd+bwd"][impl] = fwd_bwd
    for direction, fns in directions.items():
        ops_per_call = DEPTH if direction == "fwd+bwd" else 1
        try:
            times = interleaved_host_and_wall_ms(fns, 400 // ops_per_call, ops_per_call)
        except Exception as e:  # noqa: BLE001 (an op that refuses the input: report, keep the suite going)
            print(f"  {name.format(direction)}: skipped ({type(e).__name__}: {e})", flush=True)
            continue
        for impl, (host, wall) in times.items():
            add(name.format(direction), impl, host, wall)


ATTENTION_SHAPE = (1, 16, 128, 64)  # B, H, N, D


def _attention_rows(add) -> None:
    ours = getattr(ops, "scaled_dot_product_attention", None)
    if ours is None:
        print("  sdpa: skipped (fusedkernels.ops has no scaled_dot_product_attention)", flush=True)
        return
    B, H, N, D = ATTENTION_SHAPE
    shape = f"{B}x{H}x{N}x{D} bf16"
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=DTYPE) for _ in range(3))
    dy = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _three_directions(add, f"sdpa {{}} {shape}", (("fusedkernels", ours), ("torch", F.scaled_dot_product_attention)),
                      (q, k, v), leaves, dy)
    del q, k, v, dy, leaves


LINEAR_SHAPE = (4, 1024, 1024)  # M, K, N (K == N: the fwd+bwd chain feeds each output to the next call)


def _linear_rows(add) -> None:
    ours = getattr(ops, "linear_act", None)
    if ours is None:
        print("  linear_act: skipped (fusedkernels.ops has no linear_act)", flush=True)
        return
    M, K, N = LINEAR_SHAPE
    x = torch.randn(M, K, device="cuda", dtype=DTYPE)
    dy = torch.randn(M, N, device="cuda", dtype=DTYPE)
    w = (torch.randn(N, K, device="cuda") * K**-0.5).to(DTYPE)
    b = torch.randn(N, device="cuda", dtype=DTYPE)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    # gelu: our kernel; none: F.linear behind ops.linear_act (no epilogue to fuse): its cost is our Python layer
    for act, eager in (("gelu", lambda x, w, b: F.gelu(F.linear(x, w, b))), ("none", F.linear)):
        impls = (("fusedkernels", lambda x, w, b, act=act: ours(x, w, b, act)), ("torch", eager))
        _three_directions(add, f"linear_act {{}} {M}x{K}x{N} {act} bf16", impls, (x, w, b), leaves, dy)
    del x, dy, w, b, leaves


def _swiglu(x, w):
    gate, up = F.linear(x, w).chunk(2, -1)
    return F.silu(gate) * up


def _gated_rows(add) -> None:
    ours = getattr(ops, "linear_gated", None)
    if ours is None:
        print("  linear_gated: skipped (fusedkernels.ops has no linear_gated)", flush=True)
        return
    M, K, N = LINEAR_SHAPE
    shape = f"{M}x{K}x{N} swiglu bf16"
    x = torch.randn(M, K, device="cuda", dtype=DTYPE)
    dy = torch.randn(M, N, device="cuda", dtype=DTYPE)
    w = (torch.randn(2 * N, K, device="cuda") * K**-0.5).to(DTYPE)
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    impls = (("fusedkernels", lambda x, w: ours(x, w, None, "swiglu")), ("torch", _swiglu))
    _three_directions(add, f"linear_gated {{}} {shape}", impls, (x, w), leaves, dy)
    del x, dy, w, leaves


def _mlp_rows(add) -> None:
    """FusedMLP's ops (gated_mlp, mlp) against the eager Llama MLP and Linear -> GELU -> Linear on the same weights, in
    the three directions."""
    ours = getattr(ops.gemm, "_gated_mlp", None)
    if ours is None:
        print("  gated_mlp: skipped (fusedkernels.ops.gemm has no _gated_mlp)", flush=True)
        return
    M, K, N = LINEAR_SHAPE
    shape = f"{M}x{K}x{N} swiglu bf16"
    x = torch.randn(M, K, device="cuda", dtype=DTYPE)
    dy = torch.randn(M, K, device="cuda", dtype=DTYPE)
    w = (torch.randn(2 * N, K, device="cuda") * K**-0.5).to(DTYPE)
    wd = (torch.randn(K, N, device="cuda") * N**-0.5).to(DTYPE)
    leaves = [t.clone().requires_grad_() for t in (x, w, wd)]
    impls = (("fusedkernels", lambda x, w, wd: ours(x, w, None, wd, None, "swiglu", None)),
             ("torch", lambda x, w, wd: F.linear(_swiglu(x, w), wd)))
    _three_directions(add, f"gated_mlp {{}} {shape}", impls, (x, w, wd), leaves, dy)
    plain = getattr(ops.gemm, "_mlp", None)
    if plain is None:
        print("  mlp: skipped (fusedkernels.ops.gemm has no _mlp)", flush=True)
        return
    w1, b1 = w[:N].contiguous(), torch.randn(N, device="cuda", dtype=DTYPE)
    b2 = torch.randn(K, device="cuda", dtype=DTYPE)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, wd, b2)]
    impls = (("fusedkernels", lambda *t: plain(*t, "gelu", None)),
             ("torch", lambda x, w1, b1, wd, b2: F.linear(F.gelu(F.linear(x, w1, b1)), wd, b2)))
    _three_directions(add, f"mlp {{}} {M}x{K}x{N} gelu bf16", impls, (x, w1, b1, wd, b2), leaves, dy)
    del x, dy, w, wd, w1, b1, b2, leaves


def _single_call_directions(add, name: str, impls, args: tuple, leaves: list) -> None:
    """Rows `name.format(direction)` for each (impl, fn): fn(*args) without grad, fn(*leaves) with grad, and one call
    plus one backward (for ops whose outputs cannot feed the next call: a tuple, a loss); the impls timed in turns."""
    directions = {"fwd (no grad)": {}, "fwd (grad)": {}, "fwd+bwd": {}}
    for impl, fn in impls:
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        dys = [torch.randn_like(o) for o in outs]
        grad_leaves = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]

        def no_grad(fn=fn):
            with torch.no_grad():
                fn(*args)

        def with_grad(fn=fn):
            fn(*leaves)

        def fwd_bwd(fn=fn, dys=dys, grad_leaves=grad_leaves):
            out = fn(*leaves)
            torch.autograd.grad(out if isinstance(out, tuple) else (out,), grad_leaves, dys)

        directions["fwd (no grad)"][impl], directions["fwd (grad)"][impl] = no_grad, with_grad
        directions["fwd+bwd"][impl] = fwd_bwd
    for direction, fns in directions.items():
        for impl, (host, wall) in interleaved_host_and_wall_ms(fns, 200).items():
            add(name.format(direction), impl, host, wall)


def _conv_rows(add) -> None:
    shape = "1x64x8x8 3x3 pad 1 bf16"
    x = torch.randn(1, 64, 8, 8, device="cuda", dtype=DTYPE).to(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    w = (torch.randn(64, 64, 3, 3, device="cuda") * (64 * 9) ** -0.5).to(DTYPE).to(memory_format=torch.channels_last)
    b = torch.randn(64, device="cuda", dtype=DTYPE)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    impls = (("fusedkernels", lambda x, w, b: ops.conv2d_bias_relu(x, w, b, padding=1)),
             ("torch", lambda x, w, b: F.relu(F.conv2d(x, w, b, padding=1))))
    _three_directions(add, f"conv2d_bias_relu {{}} {shape}", impls, (x, w, b), leaves, dy)
    del x, dy, w, b, leaves


def _batch_norm_rows(add) -> None:
    shape = "8x64x8x8 training bf16"
    x = torch.randn(8, 64, 8, 8, device="cuda", dtype=DTYPE).to(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    w, b = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda") * 0.1
    rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    impls = (("fusedkernels", lambda x, w, b: ops.batch_norm_relu(x, rm, rv, w, b, True)),
             ("torch", lambda x, w, b: F.relu(F.batch_norm(x, rm, rv, w, b, True))))
    _three_directions(add, f"batch_norm_relu {{}} {shape}", impls, (x, w, b), leaves, dy)
    del x, dy, w, b, rm, rv, leaves


def _rotate_half(x):
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary_eager(q, k, cos, sin):
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotary_rows(add) -> None:
    B, H, N, D = ATTENTION_SHAPE
    shape = f"{B}x{H}x{N}x{D} bf16"
    q, k = (torch.randn(B, H, N, D, device="cuda", dtype=DTYPE) for _ in range(2))
    angles = torch.arange(N, device="cuda")[:, None] * (1e4 ** (-torch.arange(0, D, 2, device="cuda") / D))
    cos, sin = (torch.cat((f(angles), f(angles)), -1)[None].to(DTYPE) for f in (torch.cos, torch.sin))
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_(), cos, sin]
    impls = (("fusedkernels", lambda q, k, c, s: ops.apply_rotary(q, k, c, s)),
             ("torch", lambda q, k, c, s: _rotary_eager(q, k, c[:, None], s[:, None])))
    _single_call_directions(add, f"apply_rotary {{}} {shape}", impls, (q, k, cos, sin), leaves)
    del q, k, cos, sin, leaves


def _hf_cos_sin(ids, inv_freq, dtype):
    """Hugging Face's LlamaRotaryEmbedding.forward (transformers 5)."""
    freqs = ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * 1.0).to(dtype), (emb.sin() * 1.0).to(dtype)


def _rotary_table_rows(add) -> None:
    ids = torch.arange(2048, device="cuda")[None]
    inv = 1.0 / (1e4 ** (torch.arange(0, 128, 2, device="cuda", dtype=torch.float) / 128))
    impls = (("fusedkernels", lambda: ops.rotary_cos_sin(ids, inv, dtype=DTYPE)),
             ("torch", lambda: _hf_cos_sin(ids, inv, DTYPE)))
    for impl, (host, wall) in interleaved_host_and_wall_ms(dict(impls), 200).items():
        add("rotary_cos_sin fwd 1x2048 rotary_dim 128 bf16", impl, host, wall)


def _loss_rows(add) -> None:
    T, Hd, V = 64, 256, 1024
    shape = f"{T}x{Hd} V {V} bf16"
    h = torch.randn(T, Hd, device="cuda", dtype=DTYPE)
    w = (torch.randn(V, Hd, device="cuda") * Hd**-0.5).to(DTYPE)
    t = torch.randint(0, V, (T,), device="cuda")
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_(), t]
    impls = (("fusedkernels", ops.linear_cross_entropy),
             ("torch", lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t)))
    _single_call_directions(add, f"linear_cross_entropy {{}} {shape}", impls, (h, w, t), leaves)
    del h, w, t, leaves


def _add_norm_rows(add) -> None:
    tokens, hidden = NORM_SHAPES[0]
    shape = f"{tokens}x{hidden} bf16"
    x, residual = (torch.randn(tokens, hidden, device="cuda", dtype=DTYPE) for _ in range(2))
    w = (torch.rand(hidden, device="cuda") + 0.5).to(DTYPE)
    leaves = [x.clone().requires_grad_(), residual.clone().requires_grad_(), w.clone().requires_grad_()]

    def eager(x, residual, w):
        h = x + residual
        return F.rms_norm(h, (hidden,), w, 1e-6), h

    impls = (("fusedkernels", lambda x, residual, w: ops.add_rms_norm(x, residual, w, 1e-6)), ("torch", eager))
    _single_call_directions(add, f"add_rms_norm {{}} {shape}", impls, (x, residual, w), leaves)
    del x, residual, w, leaves


def _model(shapes):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _optim_rows(add) -> None:
    lists = (("355M (292 tensors)", gpt2_medium_shapes()), ("1000 small tensors", [(i % 97 + 1, 64) for i in range(1000)]))
    makers = (
        ("AdamW", "fusedkernels", lambda ps: FusedAdamW(ps, lr=1e-4)),
        ("AdamW", "torch-fused", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
        ("SGD momentum", "fusedkernels", lambda ps: FusedSGD(ps, lr=1e-4, momentum=0.9)),
        ("SGD momentum", "torch-fused", lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, fused=True)),
    )
    for label, shapes in lists:
        for name, impl, make in makers:
            params = _model(shapes)
            opt = make(params)
            host, wall = host_and_wall_ms(opt.step, calls=20, repeats=5, warmup=3)
            add(f"{name} step() fp32 {label}", impl, host, wall)
            del params, opt
            gc.collect()
            torch.cuda.empty_cache()


def run() -> list[Row]:
    rows = []

    def add(case, impl, ms, wall_ms):
        rows.append(Row("overhead", case, impl, round(ms, 5), extra={"wall_ms": round(wall_ms, 5)}))
        print(f"  {case:<44} {impl:<14} host {ms * 1e3:8.1f} us   wall {wall_ms * 1e3:8.1f} us", flush=True)

    _norm_rows(add)
    _add_norm_rows(add)
    _attention_rows(add)
    _linear_rows(add)
    _gated_rows(add)
    _mlp_rows(add)
    _conv_rows(add)
    _batch_norm_rows(add)
    _rotary_rows(add)
    _rotary_table_rows(add)
    _loss_rows(add)
    _optim_rows(add)
    return rows
