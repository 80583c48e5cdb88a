"""Suite `gemm`: Linear + bias + activation (+ residual) forward, the gated form and the MLP block, bf16, against
eager PyTorch and cuBLASLt's epilogue.

`linear_act` cases: ANCHORS.md's GEMM table, written M·K·N (x [M, K], weight [N, K] as nn.Linear stores it), each
with its activations gelu (erf), gelu_tanh and relu; plus the Llama-7B FFN up projection M=8192, K=4096, N=11008
with silu, and the FFN2 shape with no activation and a residual (the epilogue of a second FFN GEMM). Every such
case has a bias. Impls:

  fusedkernels    ops.linear_act(x, W, b, activation, residual). Skipped where the build has no native gemm op
                  (without it, the op is the reference, not what this suite measures); where it runs the
                  reference (no kernel for this GPU), its first call's warning goes to extra `warning`.
  fusedkernels-portable  ours with FUSEDKERNELS_GEMM_KERNEL=portable (the mma.sync kernel, what an A100 runs, which
                  the Hopper kernel replaces on sm_90), for PORTABLE_CASES only
  torch           eager F.linear(x, W, b), then the activation (F.gelu, F.gelu(approximate="tanh"), F.relu,
                  F.silu), then + residual: what a model runs today
  torch-cublaslt  torch._addmm_activation(b, x, W.t(), use_gelu=...): one cuBLASLt GEMM with its bias +
                  activation epilogue. It computes relu(b + x W^T) (use_gelu=False) or, on CUDA, the tanh
                  approximation of GELU (use_gelu=True; cuBLASLt has no erf GELU): so only the relu and
                  gelu_tanh cases, and none with a residual (there is no residual epilogue)
  torch-matmul    torch.mm(x, W.t()) alone, the same shape's GEMM without bias or activation: the ceiling an
                  epilogue should cost nothing against (ANCHORS' "matmul only" column)

`linear_act` fwd+bwd cases (FusedLinear's training step; BACKWARD_CASES): the output's gradient for x, W and b
(torch.autograd.grad, dy given), ours against eager F.linear + activation; no cuBLASLt row (torch's
_addmm_activation has no backward of its own).

`linear_gated` case: the Llama-7B FFN's gate and up projections, SwiGLU, no biases (Llama's): x [8192, 4096],
W [2·11008, 4096] (gate rows, then up rows), out [8192, 11008].

  fusedkernels    ops.linear_gated(x, W, None, "swiglu"): one GEMM over the stacked weight
  torch           F.silu(F.linear(x, Wg)) * F.linear(x, Wu), Wg and Wu the halves of W: what Llama runs
  torch-stacked   a, b = F.linear(x, W).chunk(2, -1); F.silu(a) * b: one GEMM, then the elementwise ops
  torch-matmul    torch.mm(x, W.t()), the stacked GEMM alone

`mlp` cases: the whole Llama-7B MLP, down(silu(gate(x)) * up(x)) without biases, the models suite's (M 8192,
hidden 2048, intermediate 5632: a shorter K, where the epilogue weighs more), and BERT-base's / GPT-2's plain FFN,
fc2(gelu(fc1(x))) with biases (M 16384, hidden 768, intermediate 3072), forward (no_grad) and forward + backward
(torch.autograd.grad of the output for x and the parameters, dy given):

  fusedkernels    nn.FusedMLP(hidden, intermediate, activation=..., bias=...): gated, linear_gated then linear_act
                  (with a gradient: ops.gated_mlp, the gate's derivative in the dgrad GEMM's epilogue); plain,
                  linear_act then linear_act (the activation's gradient and fc1's bias gradient in one pass)
  torch           gated: F.linear(F.silu(F.linear(x, Wg)) * F.linear(x, Wu), Wd) on three separate weights (the same
                  values): two GEMMs, silu, mul, a third GEMM, as transformers' LlamaMLP; plain:
                  F.linear(F.gelu(F.linear(x, W1, b1)), W2, b2)

Every timing is a CUDA-graph replay over rotated input sets (`common.time_graph`): x and the weights (and b,
residual) per set, so weights come from HBM as in a model. TFLOP/s counts 2·M·N·K per GEMM (2 for linear_gated,
3 for the MLP, three times that with the backward); extra `pct_matmul` is that over the bf16 matmul rate (8192³)
measured at the start of the same run, `vs_torch` / `vs_cublaslt` / `vs_torch_stacked` the baseline's time over
this row's, `group` the op (one table each). An impl that refuses a case gets a row without
a time and the reason in extra `skipped`. `python -m bench.gemm` (no GPU needed) prints the plan: cases, impls,
sets, replays and the estimated GPU seconds.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from unittest import mock
from typing import Callable

import torch
import torch.nn.functional as F

from fusedkernels import _native, ops
from fusedkernels.nn import FusedMLP

from . import common
from .common import Row, sets_for, time_graph

SUITE = "gemm"
DTYPE = torch.bfloat16
OURS, PORTABLE = "fusedkernels", "fusedkernels-portable"
TORCH, CUBLASLT, MATMUL, STACKED = "torch", "torch-cublaslt", "torch-matmul", "torch-stacked"
PORTABLE_ENV = "FUSEDKERNELS_GEMM_KERNEL"

ANCHOR_SHAPES = [  # M, K, N (ANCHORS.md, "GEMM + bias + activation")
    (16384, 768, 3072),  # BERT-base FFN1
    (16384, 3072, 768),  # FFN2
    (8192, 4096, 16384),  # LLM FFN1
    (4096, 1024, 4096),
    (128, 4096, 4096),  # small batch
]
ANCHOR_ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
EXTRA_CASES = [  # (M, K, N, activation, residual)
    (8192, 4096, 11008, "silu", False),  # Llama-7B FFN up projection
    (16384, 3072, 768, "none", True),  # FFN2 with the residual add in its epilogue
]
BACKWARD_CASES = [(16384, 768, 3072, "gelu"), (8192, 4096, 16384, "gelu")]  # (M, K, N, activation)
LLAMA_FFN = (8192, 4096, 11008)  # M, K (hidden), N (intermediate): Llama-7B's MLP
MODELS_FFN = (8192, 2048, 5632)  # the models suite's Llama step (bench/models.py): its MLP per layer
PLAIN_FFN = (16384, 768, 3072, "gelu")  # M, K, N, activation: BERT-base's / GPT-2's MLP, with biases
TORCH_ACTIVATIONS: dict[str, Callable] = {
    "none": lambda z: z,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
CUBLASLT_GELU = {"relu": False, "gelu_tanh": True}  # activation -> use_gelu
# (M, K, N, activation) with a portable row: the large GEMM, and a small K where the epilogue weighs most
PORTABLE_CASES = {(8192, 4096, 16384, "relu"), (16384, 768, 3072, "gelu")}

# Only to size the replays (and the plan's estimate): roughly what each impl reached on the H200 (ANCHORS).
ASSUMED_TFLOPS = {OURS: 550, PORTABLE: 350, TORCH: 480, CUBLASLT: 600, MATMUL: 650, STACKED: 480}
TARGET_MS = 200.0  # GPU time of the timed replays of one row; 5..30 replays
WARMUP = 2


@dataclass
class Case:
    M: int
    K: int
    N: int
    activation: str
    residual: bool = False
    op: str = "linear_act"  # or "linear_gated", "mlp"
    backward: bool = False

    def name(self) -> str:
        op = "" if self.op == "linear_act" else f"{self.op} "
        return (f"{'fwd+bwd' if self.backward else 'fwd'} {op}{self.M}x{self.K}x{self.N} {self.activation}"
                f"{' +residual' if self.residual else ''} bf16")

    def gemms(self) -> int:
        """Products of M·N·K in the forward."""
        return {"linear_act": 1, "linear_gated": 2, "mlp": 3 if self.gated() else 2}[self.op]

    def gated(self) -> bool:
        return self.activation == "swiglu"

    def flops(self) -> float:
        return 2.0 * self.M * self.N * self.K * self.gemms() * (3 if self.backward else 1)

    def set_bytes(self) -> int:
        if self.op == "linear_act":  # x, W, b, (residual), out, (dy)
            outs = 1 + self.residual + self.backward
            elems = self.M * self.K + self.N * self.K + self.N + self.M * self.N * outs
        else:  # x, the weights (twice for the mlp: ours and torch's), out; dy
            weights = self.gemms() * self.N * self.K * (2 if self.op == "mlp" else 1)
            out = self.M * (self.K if self.op == "mlp" else self.N)
            elems = self.M * self.K + weights + out * (2 if self.backward else 1)
        return elems * (torch.finfo(DTYPE).bits // 8)

    def impls(self) -> list[str]:
        if self.op == "linear_gated":
            return [OURS, TORCH, STACKED, MATMUL]
        if self.op == "mlp" or self.backward:
            return [OURS, TORCH]
        cublaslt = [CUBLASLT] if self.activation in CUBLASLT_GELU and not self.residual else []
        portable = [PORTABLE] if (self.M, self.K, self.N, self.activation) in PORTABLE_CASES else []
        return [OURS, *portable, TORCH, *cublaslt, MATMUL]


def cases() -> list[Case]:
    out = [Case(M, K, N, act) for M, K, N in ANCHOR_SHAPES for act in ANCHOR_ACTIVATIONS]
    out += [Case(*c) for c in EXTRA_CASES]
    out += [Case(*c, backward=True) for c in BACKWARD_CASES]
    out.append(Case(*LLAMA_FFN, "swiglu", op="linear_gated"))
    out += [Case(*ffn, "swiglu", op="mlp", backward=backward) for ffn in (LLAMA_FFN, MODELS_FFN)
            for backward in (False, True)]
    return out + [Case(*PLAIN_FFN, op="mlp", backward=backward) for backward in (False, True)]


def n_sets_for(case: Case) -> int:
    return sets_for(case.set_bytes())


def replays_for(case: Case, impl: str, n_sets: int) -> int:
    est_ms = case.flops() / (ASSUMED_TFLOPS[impl] * 1e9)
    return max(5, min(30, int(TARGET_MS / max(est_ms * n_sets, 1e-3))))


def native_gemm() -> tuple[bool, str]:
    """Whether ours has a native op to time here, and if not, why."""
    if not _native.loaded:
        return False, f"native module not loaded ({_native.error})"
    if not _native.has_op("linear_act") or not _native.has_op("linear_gated"):
        return False, "this build has no gemm ops (FUSEDKERNELS_FAMILIES?)"
    return True, ""


# ------------------------------------------------------------------------------------------------
# Implementations: each is fn(*one input set) -> out (linear_act: x, w, b, residual; linear_gated: x, W, Wg, Wu;
# mlp: x, FusedMLP, torch's weights (Wg, Wu, Wd), dy)
# ------------------------------------------------------------------------------------------------


def _impl(case: Case, impl: str) -> Callable:
    if case.op == "linear_gated":
        return _gated_impl(impl)
    if case.op == "mlp":
        return _mlp_impl(case, impl)
    act = case.activation
    if case.backward:  # sets (x, w, b, dy), x, w and b requiring grad
        fn = TORCH_ACTIVATIONS[act]
        if impl == OURS:
            forward = lambda x, w, b: ops.linear_act(x, w, b, act)  # noqa: E731
        else:
            forward = lambda x, w, b: fn(F.linear(x, w, b))  # noqa: E731
        return lambda x, w, b, dy: torch.autograd.grad(forward(x, w, b), (x, w, b), dy)
    if impl in (OURS, PORTABLE):
        return lambda x, w, b, r: ops.linear_act(x, w, b, act, r)
    if impl == TORCH:
        fn = TORCH_ACTIVATIONS[act]
        if case.residual:
            return lambda x, w, b, r: fn(F.linear(x, w, b)) + r
        return lambda x, w, b, r: fn(F.linear(x, w, b))
    if impl == CUBLASLT:
        use_gelu = CUBLASLT_GELU[act]
        return lambda x, w, b, r: torch._addmm_activation(b, x, w.t(), use_gelu=use_gelu)
    return lambda x, w, b, r: torch.mm(x, w.t())


def _gated_impl(impl: str) -> Callable:
    if impl == OURS:
        return lambda x, w, wg, wu: ops.linear_gated(x, w, None, "swiglu")
    if impl == TORCH:
        return lambda x, w, wg, wu: F.silu(F.linear(x, wg)) * F.linear(x, wu)
    if impl == STACKED:
        def stacked(x, w, wg, wu):
            gate, up = F.linear(x, w).chunk(2, -1)
            return F.silu(gate) * up

        return stacked
    return lambda x, w, wg, wu: torch.mm(x, w.t())


def _mlp_impl(case: Case, impl: str) -> Callable:
    def forward(x, mlp, weights, dy):
        """The output and the tensors whose gradients the backward computes."""
        if impl == OURS:
            return mlp(x), (x, *mlp.parameters())
        if not case.gated():
            w1, b1, w2, b2 = weights
            return F.linear(TORCH_ACTIVATIONS[case.activation](F.linear(x, w1, b1)), w2, b2), (x, *weights)
        wg, wu, wd = weights
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd), (x, *weights)

    if not case.backward:
        return lambda *s: forward(*s)[0]

    def forward_backward(x, mlp, weights, dy):
        out, leaves = forward(x, mlp, weights, dy)
        return torch.autograd.grad(out, leaves, dy)

    return forward_backward


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def _make_sets(case: Case, n_sets: int) -> list[tuple]:
    if case.op != "linear_act":
        return [_ffn_set(case) for _ in range(n_sets)]

    def one():
        x = torch.randn(case.M, case.K, device="cuda", dtype=DTYPE)
        w = torch.randn(case.N, case.K, device="cuda", dtype=DTYPE) * case.K**-0.5
        b = torch.randn(case.N, device="cuda", dtype=DTYPE)
        r = torch.randn(case.M, case.N, device="cuda", dtype=DTYPE) if case.residual else None
        if case.backward:
            dy = torch.randn(case.M, case.N, device="cuda", dtype=DTYPE)
            return x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), dy
        return x, w, b, r

    return [one() for _ in range(n_sets)]


def _ffn_set(case: Case) -> tuple:
    """One input set of the FFN cases (linear_gated, the MLPs), as their impls take it."""
    x = torch.randn(case.M, case.K, device="cuda", dtype=DTYPE)
    if case.op == "linear_gated":
        w = torch.randn(2 * case.N, case.K, device="cuda", dtype=DTYPE) * case.K**-0.5
        return (x, w, *w.chunk(2))
    gated = case.gated()
    mlp = FusedMLP(case.K, case.N, bias=not gated, activation=case.activation, device="cuda", dtype=DTYPE)
    torch_params = (*mlp.gate_up_proj.weight.chunk(2), mlp.down_proj.weight) if gated else tuple(mlp.parameters())
    weights = tuple(t.detach().clone().requires_grad_() for t in torch_params)
    dy = torch.randn(case.M, case.K, device="cuda", dtype=DTYPE)
    return x.requires_grad_(case.backward), mlp, weights, dy


def _skipped(rows: list, case: Case, impl: str, why: str) -> None:
    rows.append(Row(SUITE, case.name(), impl, None, extra={"group": case.op, "skipped": why}))
    print(f"  {case.name():<40} {impl:<15} skipped: {why}", flush=True)


def _measure(rows: list, case: Case, impl: str, fn: Callable, sets: list, matmul: float) -> None:
    """Probe one call (shows a refusal or a fallback warning), then time the graph replays."""
    n_sets = len(sets)
    extra: dict = {}

    def call(i):
        with torch.set_grad_enabled(case.backward):
            return fn(*sets[i])

    try:
        said = common.probe(call)
        if said and impl in (OURS, PORTABLE):  # ours running the reference
            extra["warning"] = said
            print(f"  {case.name():<40} {impl:<15} warned: {said}", flush=True)
        replays = replays_for(case, impl, n_sets)
        ms = time_graph(call, n_sets, replays=replays, warmup=WARMUP)
    except Exception as e:  # noqa: BLE001 (any refusal, OOM or a failed capture skips the row)
        why = common.why(e)
        del e
        common.free_cuda()
        return _skipped(rows, case, impl, why)
    tflops = case.flops() / ms / 1e9
    rows.append(Row(SUITE, case.name(), impl, round(ms, 5), TFLOPs=round(tflops, 1),
                    extra={"group": case.op, "pct_matmul": round(100 * tflops / matmul, 1), "n_sets": n_sets,
                           "replays": replays, **extra}))
    print(f"  {case.name():<40} {impl:<15} {ms * 1e3:9.1f} us {tflops:6.0f} TFLOP/s "
          f"({100 * tflops / matmul:.0f}% of matmul)", flush=True)


def _run_case(case: Case, rows: list, matmul: float, ours_ok: bool, ours_why: str) -> None:
    sets = _make_sets(case, n_sets_for(case))
    first = len(rows)
    for impl in case.impls():
        if impl in (OURS, PORTABLE) and not ours_ok:
            _skipped(rows, case, impl, ours_why)
            continue
        if impl == PORTABLE:
            with mock.patch.dict(os.environ, {PORTABLE_ENV: "portable"}):  # the kernel is chosen per call
                _measure(rows, case, impl, _impl(case, impl), sets, matmul)
            continue
        _measure(rows, case, impl, _impl(case, impl), sets, matmul)
    timed = {r.impl: r for r in rows[first:] if r.ms is not None}
    for mine in (timed.get(OURS), timed.get(PORTABLE)):
        if mine is not None:
            for base, key in ((TORCH, "vs_torch"), (CUBLASLT, "vs_cublaslt"), (STACKED, "vs_torch_stacked")):
                if base in timed:
                    mine.extra[key] = round(timed[base].ms / mine.ms, 3)
    del sets
    common.free_cuda()


def run() -> list[Row]:
    matmul = common.ceilings()["matmul_bf16_TFLOPs"]
    ours_ok, ours_why = native_gemm()
    if not ours_ok:
        print(f"  fusedkernels: skipped ({ours_why})", flush=True)
    rows: list[Row] = []
    for case in common.selected(cases(), lambda c: c.name()):
        _run_case(case, rows, matmul, ours_ok, ours_why)
    return rows


# ------------------------------------------------------------------------------------------------
# The plan, without a GPU: python -m bench.gemm
# ------------------------------------------------------------------------------------------------


def plan() -> list[dict]:
    """Every row the suite times, with its sets, replays and estimated GPU seconds (at ASSUMED_TFLOPS)."""
    return common.plan_rows(common.selected(cases(), lambda c: c.name()), n_sets_for, replays_for, ASSUMED_TFLOPS,
                            WARMUP)


if __name__ == "__main__":
    rows = plan()
    for p in rows:
        print(f"{p['case']:<40} {p['impl']:<15} sets {p['n_sets']}  replays {p['replays']:>2}  ~{p['est_s']:.2f} s")
    ours_ok, ours_why = native_gemm()
    print(f"\n{len(rows)} rows, ~{sum(p['est_s'] for p in rows):.0f} s of GPU time at the assumed rates; "
          f"ours: {'native op' if ours_ok else 'skipped (' + ours_why + ')'}")
    sys.exit(0)
