"""Suite `attention`: fused attention forward and forward+backward, bf16, against every PyTorch path.

Shapes are ANCHORS.md's attention table, written B·H·N·D (batch, heads, tokens, head dim; N queries = N keys),
each non-causal and, where the anchors have them, causal (top-left aligned, torch's `is_causal`). Impls:

  fusedkernels          ours, in whichever layout its forward is faster in, timed per case: `ops.attention` on
                        [B, N, H, D] tensors, or `ops.scaled_dot_product_attention` on torch's [B, H, N, D] ones
                        (extra `layout`; `other_layout_ms` is the other one's forward). Skipped where the build
                        has no native attention kernel (the reference path is not what this suite measures).
  fusedkernels-portable ours with FUSEDKERNELS_ATTENTION_KERNEL=portable (the mma.sync kernels, which the
                        Hopper forward replaces on sm_90 for head dims 64 and 128), same layout as ours
  fusedkernels-sm90     ours with FUSEDKERNELS_ATTENTION_KERNEL=sm90 (the Hopper forward without warp
                        specialisation, which the warp-specialised one replaces where it takes the call), forward only
                        (the variable keeps the plain backward too, which only the fwd+bwd rows would show), same layout
                        as ours, the bias rows included
  torch-sdpa-flash      F.scaled_dot_product_attention under sdpa_kernel(SDPBackend.FLASH_ATTENTION) (FA2)
  torch-sdpa-cudnn      ... SDPBackend.CUDNN_ATTENTION
  torch-sdpa-efficient  ... SDPBackend.EFFICIENT_ATTENTION (memory-efficient, xformers' kernel)
  torch-flex            torch.compile(flex_attention, dynamic=False): compiled once per shape and mask (the
                        first call's wall time, compile included, is extra `first_call_s`); causal through a
                        block mask
  torch-eager           unfused: softmax(q @ kᵀ · scale + mask) @ v, only where N <= 2048 (it materialises the
                        B·H·N² scores)

The torch impls and flex take [B, H, N, D] contiguous tensors (as the anchors measured them). Every timing is
a CUDA-graph replay over rotated input sets (`common.time_graph`); fwd+bwd is the forward and
`torch.autograd.grad` for q, k, v with a given dout. TFLOP/s counts fwd = 4·B·H·N²·D (halved when causal)
and fwd+bwd = 3.5 × fwd (FlashAttention's convention); extra `pct_matmul` is that over the bf16 matmul rate
measured at the start of the same run, `vs_flash` the flash row's time over this row's.

Bias rows (B2·H16·N4096·D128, additive bias (B, H, N, N) bf16 that does not require grad): ours with
`attn_bias` (or `attn_mask` in the [B, H, N, D] layout), cuDNN and memory-efficient with `attn_mask`, flex
with a score_mod adding bias[b, h, q, kv]; `fusedkernels-nobias` is ours on the same inputs without the
bias (the report's "vs fusedkernels-nobias" is the with-bias speed as a fraction of it).

`peak_MiB` (memory cases: 2·16·8192·128 fwd+bwd, 8·16·512·64 fwd and fwd+bwd): one eager call's
torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus what was allocated before it (the
inputs), so outputs, saved activations, grads and workspaces count.

An impl that refuses a case (no kernel for it, out of memory, a failed capture) gets a row without a time
and the reason in extra `skipped`; the suite goes on. A fallback warning from ours during a row's first
call (ours running PyTorch's implementation: said once per reason) goes to extra `warning`.
`python -m bench.attention` (no GPU needed) prints the plan: cases, impls, sets, replays and the estimated
GPU seconds.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from unittest import mock
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fusedkernels import _native, ops

from . import common
from .common import Row, sets_for, time_graph

SUITE = "attention"
DTYPE = torch.bfloat16
OURS, NOBIAS, PORTABLE, SM90 = "fusedkernels", "fusedkernels-nobias", "fusedkernels-portable", "fusedkernels-sm90"
FLASH, CUDNN, EFFICIENT = "torch-sdpa-flash", "torch-sdpa-cudnn", "torch-sdpa-efficient"
FLEX, EAGER = "torch-flex", "torch-eager"

# (B, H, N, D, causal variants): ANCHORS.md's attention table (8·16·512·64 has no causal anchor)
SHAPES = [
    (8, 16, 512, 64, (False,)),
    (16, 16, 512, 128, (False, True)),
    (4, 16, 2048, 128, (False, True)),
    (2, 16, 8192, 128, (False, True)),
    (1, 16, 16384, 128, (False, True)),
    (2, 16, 8192, 64, (False, True)),
]
BIAS_SHAPE = (2, 16, 4096, 128)
EAGER_MAX_N = 2048
PORTABLE_ENV = "FUSEDKERNELS_ATTENTION_KERNEL"
# (B, H, N, D, causal) -> directions whose rows carry peak_MiB
MEMORY = {(2, 16, 8192, 128, False): ("fwd+bwd",), (8, 16, 512, 64, False): ("fwd", "fwd+bwd")}

# Only to size the replays (and the plan's estimate): roughly what each impl reached on the H200 (ANCHORS).
ASSUMED_TFLOPS = {OURS: 400, NOBIAS: 400, PORTABLE: 250, SM90: 430, FLASH: 280, CUDNN: 450, EFFICIENT: 140, FLEX: 300, EAGER: 30}
TARGET_MS = 200.0  # GPU time of the timed replays of one row; 5..30 replays
WARMUP = 2  # graph warm-up rounds (the probe call before them has compiled / autotuned already)


@dataclass
class Case:
    B: int
    H: int
    N: int
    D: int
    causal: bool
    bias: bool = False

    def name(self, direction: str) -> str:
        shape = f"{self.B}x{self.H}x{self.N}x{self.D}"
        return f"{'bias ' if self.bias else ''}{direction} {shape}{' causal' if self.causal else ''} bf16"

    def flops(self, direction: str) -> float:
        fwd = 4 * self.B * self.H * self.N * self.N * self.D / (2 if self.causal else 1)
        return fwd * (3.5 if direction == "fwd+bwd" else 1.0)

    def set_bytes(self) -> int:  # q, k, v, dout
        return 4 * self.B * self.H * self.N * self.D * (torch.finfo(DTYPE).bits // 8)

    def impls(self) -> list[str]:
        if self.bias:
            return [OURS, SM90, NOBIAS, CUDNN, EFFICIENT, FLEX]
        return [OURS, SM90, PORTABLE, FLASH, CUDNN, EFFICIENT, FLEX] + ([EAGER] if self.N <= EAGER_MAX_N else [])

    def memory_directions(self) -> tuple:
        return () if self.bias else MEMORY.get((self.B, self.H, self.N, self.D, self.causal), ())


def cases() -> list[Case]:
    out = [Case(B, H, N, D, causal) for B, H, N, D, variants in SHAPES for causal in variants]
    return out + [Case(*BIAS_SHAPE, causal=False, bias=True)]


def n_sets_for(case: Case) -> int:
    return sets_for(case.set_bytes())


def replays_for(case: Case, direction: str, impl: str, n_sets: int) -> int:
    est_ms = case.flops(direction) / (ASSUMED_TFLOPS[impl] * 1e9)
    return max(5, min(30, int(TARGET_MS / max(est_ms * n_sets, 1e-3))))


# ------------------------------------------------------------------------------------------------
# Implementations: each is fn(q, k, v) -> out on its layout's tensors
# ------------------------------------------------------------------------------------------------


def _sdpa_backend(backend, causal: bool, mask: Optional[torch.Tensor]) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    return fn


def _eager(causal: bool, N: int, D: int) -> Callable:
    scale = 1.0 / math.sqrt(D)
    mask = torch.full((N, N), float("-inf"), device="cuda", dtype=DTYPE).triu_(1) if causal else None

    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) * scale
        if mask is not None:
            s = s + mask
        return torch.softmax(s, dim=-1) @ v

    return fn


_flex_compiled = None


def _flex(case: Case, bias: Optional[torch.Tensor]) -> Callable:
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    flex = _flex_compiled
    block_mask = None
    if case.causal:
        block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, case.N, case.N, device="cuda")
    score_mod = None
    if bias is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, q_idx, kv_idx]

    return lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block_mask)


def native_attention() -> tuple[bool, str]:
    """Whether ours has a native kernel to time here, and if not, why."""
    if getattr(ops, "attention", None) is None and getattr(ops, "scaled_dot_product_attention", None) is None:
        return False, "fusedkernels.ops has no attention op"
    if not _native.loaded:
        return False, f"native module not loaded ({_native.error})"
    if not _native.has_op("attention"):
        return False, "this build has no attention kernels (FUSEDKERNELS_FAMILIES?)"
    return True, ""


def _ours_layouts(case: Case, bias: Optional[torch.Tensor]) -> list[tuple[str, Callable]]:
    """(layout, fn) for each entry point ops has: BNHD through ops.attention, BHND through
    ops.scaled_dot_product_attention."""
    out = []
    attention = getattr(ops, "attention", None)
    sdpa = getattr(ops, "scaled_dot_product_attention", None)
    if attention is not None:
        out.append(("BNHD", lambda q, k, v: attention(q, k, v, causal=case.causal, attn_bias=bias)))
    if sdpa is not None:
        out.append(("BHND", lambda q, k, v: sdpa(q, k, v, attn_mask=bias, is_causal=case.causal)))
    return out


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def _make_sets(case: Case, n_sets: int) -> list[tuple]:
    shape = (case.B, case.H, case.N, case.D)
    return [tuple(torch.randn(shape, device="cuda", dtype=DTYPE) for _ in range(4)) for _ in range(n_sets)]


def _bnhd(sets: list[tuple]) -> list[tuple]:
    return [tuple(t.transpose(1, 2).contiguous() for t in s) for s in sets]


def _calls(fn: Callable, sets: list[tuple]) -> dict:
    """{direction: call(i)} over the sets (q, k, v, dout) in fn's layout."""
    grad_sets = [(*(t.detach().requires_grad_() for t in s[:3]), s[3]) for s in sets]

    def fwd(i):
        q, k, v, _ = sets[i]
        with torch.no_grad():
            return fn(q, k, v)

    def fwd_bwd(i):
        q, k, v, dout = grad_sets[i]
        return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _peak_extra_mib(call) -> float:
    common.free_cuda()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = call(0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - before) / 2**20


class _Recorder:
    def __init__(self, matmul_tflops: float):
        self.matmul = matmul_tflops
        self.rows: list[Row] = []

    def skipped(self, case: Case, direction: str, impl: str, why: str, **extra) -> None:
        self.rows.append(Row(SUITE, case.name(direction), impl, None,
                             extra={"group": "bias" if case.bias else "plain", "skipped": why, **extra}))
        print(f"  {case.name(direction):<36} {impl:<22} skipped: {why}", flush=True)

    def measure(self, case: Case, direction: str, impl: str, call, n_sets: int, **extra) -> Optional[Row]:
        """Probe one call (compiles, autotunes, shows a refusal), peak memory where wanted, then time."""
        start = time.perf_counter()
        try:
            said = common.probe(call)
            if said and impl in (OURS, NOBIAS):  # ours running PyTorch's implementation
                extra["warning"] = said
                print(f"  {case.name(direction):<36} {impl:<22} warned: {said}", flush=True)
        except Exception as e:  # noqa: BLE001 (any refusal, OOM included, skips the row)
            why = common.why(e)
            del e
            common.free_cuda()
            return self.skipped(case, direction, impl, why, **extra)
        first_s = time.perf_counter() - start
        peak = None
        if direction in case.memory_directions():
            try:
                peak = round(_peak_extra_mib(call), 1)
            except Exception as e:  # noqa: BLE001
                extra["peak_note"] = common.why(e)
                common.free_cuda()
        replays = replays_for(case, direction, impl, n_sets)
        try:
            ms = time_graph(call, n_sets, replays=replays, warmup=WARMUP)
        except Exception as e:  # noqa: BLE001 (a backend that cannot be captured, an OOM in the graph pool)
            why = "timing: " + common.why(e)
            del e
            common.free_cuda()
            return self.skipped(case, direction, impl, why, **extra)
        tflops = case.flops(direction) / ms / 1e9
        if impl == FLEX:
            extra["first_call_s"] = round(first_s, 2)
        row = Row(SUITE, case.name(direction), impl, round(ms, 5), TFLOPs=round(tflops, 1), peak_MiB=peak,
                  extra={"group": "bias" if case.bias else "plain", "pct_matmul": round(100 * tflops / self.matmul, 1),
                         "n_sets": n_sets, "replays": replays, **extra})
        self.rows.append(row)
        mem = f" {peak:7.0f} MiB extra" if peak is not None else ""
        layout = f" [{extra['layout'].split(' ')[0]}]" if "layout" in extra else ""
        print(f"  {row.case:<36} {impl + layout:<22} {_fmt_ms(ms):>10} {tflops:6.0f} TFLOP/s "
              f"({row.extra['pct_matmul']:.0f}% of matmul){mem}", flush=True)
        return row


def _fmt_ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def _run_case(case: Case, rec: _Recorder, ours_ok: bool, ours_why: str) -> None:
    n_sets = n_sets_for(case)
    sets = _make_sets(case, n_sets)
    bias = None
    if case.bias:
        bias = torch.randn(case.B, case.H, case.N, case.N, device="cuda", dtype=DTYPE)  # 1 GiB: past the L2 alone
    first = len(rec.rows)
    for impl in case.impls():
        if impl in (OURS, NOBIAS, PORTABLE, SM90):
            if impl != OURS:
                continue  # timed with OURS, in the layout OURS chose
            _run_ours(case, rec, sets, n_sets, bias, ours_ok, ours_why)
            continue
        try:
            if impl == FLEX:
                fn = _flex(case, bias)
            elif impl == EAGER:
                fn = _eager(case.causal, case.N, case.D)
            else:
                from torch.nn.attention import SDPBackend

                backend = {FLASH: SDPBackend.FLASH_ATTENTION, CUDNN: SDPBackend.CUDNN_ATTENTION,
                           EFFICIENT: SDPBackend.EFFICIENT_ATTENTION}[impl]
                fn = _sdpa_backend(backend, case.causal, bias)
        except Exception as e:  # noqa: BLE001 (flex missing from this torch, a block mask out of memory)
            why = common.why(e)
            del e
            common.free_cuda()
            for direction in ("fwd", "fwd+bwd"):
                rec.skipped(case, direction, impl, why)
            continue
        calls = _calls(fn, sets)
        for direction in ("fwd", "fwd+bwd"):
            rec.measure(case, direction, impl, calls[direction], n_sets)
        del fn, calls
        common.free_cuda()
    # group the rows by case (fwd rows, then fwd+bwd rows), and each row's speed against flash
    rows = rec.rows[first:]
    del rec.rows[first:]
    for direction in ("fwd", "fwd+bwd"):
        group = [r for r in rows if r.case == case.name(direction)]
        flash = next((r for r in group if r.impl == FLASH and r.ms is not None), None)
        for r in group:
            if flash is not None and r.ms is not None:
                r.extra["vs_flash"] = round(flash.ms / r.ms, 3)
        rec.rows += group
    del sets, bias
    common.free_cuda()


def _run_ours(case: Case, rec: _Recorder, sets, n_sets, bias, ours_ok: bool, ours_why: str) -> None:
    impls = [OURS, SM90, NOBIAS] if case.bias else [OURS, SM90, PORTABLE]
    if not ours_ok:
        for impl in impls:
            for direction in ("fwd", "fwd+bwd"):
                rec.skipped(case, direction, impl, ours_why)
        return
    bnhd = None
    # Forward in each layout ops offers; the faster one is ours for this case, fwd+bwd included.
    fwd_rows, fns = {}, {}
    for layout, fn in _ours_layouts(case, bias):
        if layout == "BNHD" and bnhd is None:
            bnhd = _bnhd(sets)
        layout_sets = bnhd if layout == "BNHD" else sets
        fns[layout] = (fn, layout_sets)
        n = len(rec.rows)
        rec.measure(case, "fwd", OURS, _calls(fn, layout_sets)["fwd"], n_sets, layout=_layout_name(layout))
        fwd_rows[layout] = rec.rows.pop(n) if len(rec.rows) > n else None
    timed = {k: r for k, r in fwd_rows.items() if r is not None and r.ms is not None}
    if timed:
        layout = min(timed, key=lambda k: timed[k].ms)
        chosen = timed[layout]
        others = {_layout_name(k): r.ms for k, r in timed.items() if k != layout}
        if others:
            chosen.extra["other_layout_ms"] = others
    else:  # every layout refused: keep the first layout's skipped row
        layout = next(iter(fwd_rows), None)
        chosen = fwd_rows.get(layout)
    if chosen is not None:
        rec.rows.append(chosen)
    if bnhd is not None and layout != "BNHD":
        del bnhd
        fns.pop("BNHD", None)
        common.free_cuda()
    if layout is None:
        return
    fn, layout_sets = fns[layout]
    rec.measure(case, "fwd+bwd", OURS, _calls(fn, layout_sets)["fwd+bwd"], n_sets, layout=_layout_name(layout))
    if not case.bias:  # the mma.sync kernels, which Hopper kernels replace where they exist
        with mock.patch.dict(os.environ, {PORTABLE_ENV: "portable"}):  # the kernel is chosen per call
            calls = _calls(fn, layout_sets)
            for direction in ("fwd", "fwd+bwd"):
                rec.measure(case, direction, PORTABLE, calls[direction], n_sets, layout=_layout_name(layout))
        if torch.cuda.get_device_capability() == (9, 0) and case.D in (64, 128):
            with mock.patch.dict(os.environ, {PORTABLE_ENV: "sm90"}):
                rec.measure(case, "fwd", SM90, _calls(fn, layout_sets)["fwd"], n_sets, layout=_layout_name(layout))
    if case.bias and torch.cuda.get_device_capability() == (9, 0):
        with mock.patch.dict(os.environ, {PORTABLE_ENV: "sm90"}):
            rec.measure(case, "fwd", SM90, _calls(fn, layout_sets)["fwd"], n_sets, layout=_layout_name(layout))
    if case.bias:
        nobias = dict(_ours_layouts(case, None))[layout]
        calls = _calls(nobias, layout_sets)
        for direction in ("fwd", "fwd+bwd"):
            row = rec.measure(case, direction, NOBIAS, calls[direction], n_sets, layout=_layout_name(layout))
            ours = next((r for r in rec.rows if r.impl == OURS and r.case == case.name(direction)), None)
            if row is not None and ours is not None and ours.ms is not None:
                ours.extra["vs_nobias"] = round(row.ms / ours.ms, 3)  # the bias's cost: >= 0.8 wanted


def _layout_name(layout: str) -> str:
    return {"BNHD": "BNHD (ops.attention)", "BHND": "BHND (ops.scaled_dot_product_attention)"}[layout]


class _RecompileLimit:
    """Every (shape, mask) compiles flex_attention anew; dynamo's default of 8 recompiles per function would
    send the rest to flex's eager path (which materialises the scores)."""

    def __enter__(self):
        import torch._dynamo.config as config

        self.config = config
        self.key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        self.old = getattr(config, self.key)
        setattr(config, self.key, max(self.old, 64))

    def __exit__(self, *exc):
        setattr(self.config, self.key, self.old)


def run() -> list[Row]:
    matmul = common.ceilings()["matmul_bf16_TFLOPs"]
    ours_ok, ours_why = native_attention()
    if not ours_ok:
        print(f"  fusedkernels: skipped ({ours_why})", flush=True)
    rec = _Recorder(matmul)
    with _RecompileLimit():
        for case in common.selected(cases(), lambda c: c.name("fwd")):
            _run_case(case, rec, ours_ok, ours_why)
    return rec.rows


# ------------------------------------------------------------------------------------------------
# The plan, without a GPU: python -m bench.attention
# ------------------------------------------------------------------------------------------------


def plan() -> list[dict]:
    """Every row the suite times, with its sets, replays and estimated GPU seconds (probe, peak-memory call,
    graph warm-up, one replay after capture, the timed replays; at ASSUMED_TFLOPS; compiles not counted).
    Ours is counted twice for the forward (both layouts are timed)."""
    out = []
    for case in common.selected(cases(), lambda c: c.name("fwd")):
        n_sets = n_sets_for(case)
        for impl in case.impls():
            for direction in ("fwd", "fwd+bwd"):
                replays = replays_for(case, direction, impl, n_sets)
                est_ms = case.flops(direction) / (ASSUMED_TFLOPS[impl] * 1e9)
                calls = 1 + (direction in case.memory_directions()) + n_sets * (WARMUP + 1 + replays)
                layouts = 2 if impl == OURS and direction == "fwd" else 1
                out.append({"case": case.name(direction), "impl": impl, "n_sets": n_sets, "replays": replays,
                            "est_s": layouts * calls * est_ms / 1e3})
    return out


if __name__ == "__main__":
    total = 0.0
    for p in plan():
        total += p["est_s"]
        print(f"{p['case']:<36} {p['impl']:<22} sets {p['n_sets']}  replays {p['replays']:>2}  ~{p['est_s']:.2f} s")
    ours_ok, ours_why = native_attention()
    print(f"\n{len(plan())} rows, ~{total:.0f} s of GPU time at the assumed rates (+ flex compiles, ~2 per case); "
          f"ours: {'native kernel' if ours_ok else 'skipped (' + ours_why + ')'}")
    sys.exit(0)
