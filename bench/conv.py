"""Suite `conv`: Conv2d + bias + ReLU (+ residual) forward and forward + backward over channels_last (NHWC) bf16, against
eager PyTorch and cuDNN's fused convolution, and a torchvision ResNet-50 inference and training step.

Layer cases: ANCHORS.md's ResNet-50 layers at batch 64 and 256 (3x3 and 7x7 with "same" padding, the stem at stride
2), the bottleneck's 1x1 expansions of the later stages (128 -> 512, 256 -> 1024, 512 -> 2048), plus the first
stage's (64 -> 256, 1x1) with its residual add. x [N, C_in, H, W], weight [C_out,
C_in, k, k] (both channels_last), bias [C_out]. Impls:

  fusedkernels       ops.conv2d_bias_relu(x, w, b, stride, padding, 1, residual) as it routes by default (by layer
                     class: our kernel on 1x1 stride-1 expansions from <= 64 channels, cuDNN's fused convolution
                     elsewhere).
                     Skipped where the build has no native conv op.
  fusedkernels-sm90  the same with FUSEDKERNELS_CONV_KERNEL=sm90: our Hopper implicit-GEMM kernel (forward rows)
  torch              eager F.relu(F.conv2d(x, w, b, ...) (+ residual)): what a model runs today
  torch-cudnn-fused  torch.ops.aten.cudnn_convolution_relu (cudnn_convolution_add_relu with a residual): one cuDNN
                     call with the bias + ReLU epilogue; forward only (it has no backward), skipped with the reason
                     where this torch lacks it

Forward + backward rows take torch.autograd.grad of the output for x, w, b (and the residual), dy given. TFLOP/s
counts 2·N·H_out·W_out·C_out·C_in·k² per convolution, three of them with the backward (output, dx, dw).

ResNet-50 cases (torchvision.models.resnet50, random weights, bf16 channels_last, batch 64): inference (eval, no
grad) and a training step (train mode, forward + cross-entropy + backward; no optimizer step). Impls: torch (eager),
fusedkernels (every conv + BatchNorm + ReLU of the stem and the bottlenecks as nn.FusedConvBNReLU around the same
modules, the residual add inside the last one), torch-compile (torch.compile of the eager model). Skipped with the
reason where torchvision is missing. TFLOP/s counts 4.1 GFLOP per image forward (2 x the 2.05 G multiply-adds
torchvision lists), three times that for the training step.

BatchNorm + ReLU rows (training mode, the BatchNorm after each ResNet-50 convolution; bf16 channels_last, float32
parameters and running statistics): ops.batch_norm_relu (impl fusedkernels) against eager
F.relu(F.batch_norm(...) (+ residual)) and torch.compile of it, forward and forward + backward (dx, dweight, dbias,
dresidual). GB/s counts the two-pass algorithm's minimum traffic in units of the activation: forward reads x twice
(statistics, then normalise) and writes y, 3 units (+1 reading the residual); backward reads dy, y and x twice (sums,
then dx) and writes dx, 7 units (+1 writing dresidual); pct_copy is GB/s against the device copy ceiling measured in
the same run.

Every timing is a CUDA-graph replay over rotated input sets (`common.time_graph`). `python -m bench.conv` (no GPU
needed) prints the plan: cases, impls, sets, replays and the estimated GPU seconds.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from fusedkernels import _native, ops
from fusedkernels.nn import FusedConvBNReLU

from . import common
from .common import Row, sets_for, time_graph

SUITE = "conv"
DTYPE = torch.bfloat16
CL = torch.channels_last
OURS, SM90, TORCH, CUDNN, COMPILE = "fusedkernels", "fusedkernels-sm90", "torch", "torch-cudnn-fused", "torch-compile"
KERNEL_ENV = "FUSEDKERNELS_CONV_KERNEL"

LAYERS = [  # C_in, C_out, H (= W), kernel, stride (ANCHORS.md, "Conv2d + bias + ReLU")
    (64, 64, 56, 3, 1),
    (256, 64, 56, 1, 1),
    (64, 256, 56, 1, 1),
    (128, 128, 28, 3, 1),
    (256, 256, 14, 3, 1),
    (512, 512, 7, 3, 1),
    (3, 64, 224, 7, 2),  # the stem
    (128, 512, 28, 1, 1),  # the other stages' bottleneck expansions (64 -> 256 above): where our kernel's one-pass
    (256, 1024, 14, 1, 1),  # epilogue outran cuDNN's fused call at the first stage's (docs/perf-notes.md, conv v3)
    (512, 2048, 7, 1, 1),
]
RESIDUAL_LAYER = (64, 256, 56, 1, 1)  # the bottleneck's last convolution, with its residual add
BATCHES = (64, 256)
RESNET_BATCH = 64
RESNET_FLOPS_PER_IMAGE = 2 * 2.05e9  # torchvision's ResNet50_Weights.IMAGENET1K_V1: 4.09 GFLOPS (multiply-adds)

# Only to size the replays (and the plan's estimate): roughly what each impl reaches (ANCHORS).
ASSUMED_TFLOPS = {OURS: 150, SM90: 150, TORCH: 150, CUDNN: 200, COMPILE: 150}
TARGET_MS = 200.0
WARMUP = 2


@dataclass
class Case:
    batch: int
    c_in: int = 0
    c_out: int = 0
    hw: int = 0
    k: int = 1
    stride: int = 1
    residual: bool = False
    backward: bool = False
    model: str = ""  # "resnet50" for the whole-model rows

    @property
    def padding(self) -> int:
        return self.k // 2

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.k) // self.stride + 1

    def name(self) -> str:
        step = "train step" if self.backward else "inference"
        if self.model:
            return f"{self.model} {step} N={self.batch} bf16"
        conv = f"{self.c_in}->{self.c_out} {self.hw}^2 {self.k}x{self.k}{f' s{self.stride}' if self.stride > 1 else ''}"
        return f"{'fwd+bwd' if self.backward else 'fwd'} {conv}{' +residual' if self.residual else ''} N={self.batch}"

    def flops(self) -> float:
        if self.model:
            return RESNET_FLOPS_PER_IMAGE * self.batch * (3 if self.backward else 1)
        fwd = 2.0 * self.batch * self.out_hw**2 * self.c_out * self.c_in * self.k**2
        return fwd * (3 if self.backward else 1)

    def set_bytes(self) -> int:
        if self.model:
            return self.batch * 3 * 224 * 224 * 2
        out = self.batch * self.c_out * self.out_hw**2
        elems = self.batch * self.c_in * self.hw**2 + self.c_out * self.c_in * self.k**2 + out * (
            1 + self.residual + self.backward)
        return elems * 2

    def impls(self) -> list[str]:
        if self.model:
            return [OURS, TORCH, COMPILE]
        return [OURS, TORCH] + ([] if self.backward else [SM90, CUDNN])


def cases() -> list[Case]:
    out = []
    for backward in (False, True):
        for batch in BATCHES:
            out += [Case(batch, *layer, backward=backward) for layer in LAYERS]
            out.append(Case(batch, *RESIDUAL_LAYER, residual=True, backward=backward))
    return out + [Case(RESNET_BATCH, model="resnet50", backward=backward) for backward in (False, True)]


def n_sets_for(case: Case) -> int:
    return 1 if case.model else sets_for(case.set_bytes())


def replays_for(case: Case, impl: str, n_sets: int) -> int:
    est_ms = case.flops() / (ASSUMED_TFLOPS[impl] * 1e9)
    return max(5, min(30, int(TARGET_MS / max(est_ms * n_sets, 1e-3))))


def native_conv() -> tuple[bool, str]:
    """Whether ours has a native op to time here, and if not, why."""
    if not _native.loaded:
        return False, f"native module not loaded ({_native.error})"
    if not _native.has_op("conv2d_bias_relu"):
        return False, "this build has no conv ops (FUSEDKERNELS_FAMILIES?)"
    return True, ""


def torchvision_missing() -> Optional[str]:
    try:
        import torchvision  # noqa: F401
    except ImportError as e:
        return f"torchvision is not installed ({e})"
    return None


# ------------------------------------------------------------------------------------------------
# Layer implementations: fn(x, w, b, r, dy) -> out (forward) or the gradients (fwd+bwd)
# ------------------------------------------------------------------------------------------------


def _layer_impl(case: Case, impl: str) -> Callable:
    s, p = case.stride, case.padding
    if impl in (OURS, SM90):
        forward = lambda x, w, b, r: ops.conv2d_bias_relu(x, w, b, s, p, 1, r)  # noqa: E731
    elif impl == TORCH:
        def forward(x, w, b, r):
            z = F.conv2d(x, w, b, s, p)
            return F.relu(z if r is None else z + r)
    elif case.residual:
        forward = lambda x, w, b, r: torch.ops.aten.cudnn_convolution_add_relu(  # noqa: E731
            x, w, r, 1.0, b, [s, s], [p, p], [1, 1], 1)
    else:
        forward = lambda x, w, b, r: torch.ops.aten.cudnn_convolution_relu(  # noqa: E731
            x, w, b, [s, s], [p, p], [1, 1], 1)
    if not case.backward:
        return lambda x, w, b, r, dy: forward(x, w, b, r)

    def forward_backward(x, w, b, r, dy):
        leaves = [t for t in (x, w, b, r) if t is not None]
        return torch.autograd.grad(forward(x, w, b, r), leaves, dy)

    return forward_backward


def _layer_sets(case: Case, n_sets: int) -> list[tuple]:
    def one():
        x = torch.randn(case.batch, case.c_in, case.hw, case.hw, device="cuda", dtype=DTYPE).to(memory_format=CL)
        w = (torch.randn(case.c_out, case.c_in, case.k, case.k, device="cuda", dtype=DTYPE)
             * (case.c_in * case.k**2) ** -0.5).to(memory_format=CL)
        b = torch.randn(case.c_out, device="cuda", dtype=DTYPE)
        shape = (case.batch, case.c_out, case.out_hw, case.out_hw)
        r = torch.randn(shape, device="cuda", dtype=DTYPE).to(memory_format=CL) if case.residual else None
        dy = torch.randn(shape, device="cuda", dtype=DTYPE).to(memory_format=CL) if case.backward else None
        if case.backward:
            x, w, b = (t.requires_grad_() for t in (x, w, b))
            r = r.requires_grad_() if r is not None else None
        return x, w, b, r, dy

    return [one() for _ in range(n_sets)]


# ------------------------------------------------------------------------------------------------
# ResNet-50
# ------------------------------------------------------------------------------------------------


class _FusedBottleneck(nn.Module):
    """torchvision's Bottleneck with each conv + BatchNorm + ReLU as FusedConvBNReLU around its own modules; the
    residual add inside the last one."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.a = FusedConvBNReLU.from_modules(block.conv1, block.bn1)
        self.b = FusedConvBNReLU.from_modules(block.conv2, block.bn2)
        self.c = FusedConvBNReLU.from_modules(block.conv3, block.bn3)
        self.downsample = block.downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.c(self.b(self.a(x)), identity)


def fuse_resnet(model: nn.Module) -> nn.Module:
    """A torchvision ResNet with bottleneck blocks, its conv + BatchNorm + ReLU blocks as FusedConvBNReLU (in place)."""
    model.conv1 = FusedConvBNReLU.from_modules(model.conv1, model.bn1)
    model.bn1, model.relu = nn.Identity(), nn.Identity()
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, name)
        for i, block in enumerate(layer):
            layer[i] = _FusedBottleneck(block)
    return model


def _resnet_impl(case: Case, impl: str) -> tuple[Callable, list[tuple]]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().to("cuda", DTYPE).to(memory_format=CL).train(case.backward)
    if impl == OURS:
        model = fuse_resnet(model)
    run_model = torch.compile(model) if impl == COMPILE else model
    x = torch.randn(case.batch, 3, 224, 224, device="cuda", dtype=DTYPE).to(memory_format=CL)
    labels = torch.randint(0, 1000, (case.batch,), device="cuda")
    if not case.backward:
        return (lambda x, labels: run_model(x)), [(x, labels)]
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x, labels):
        loss = F.cross_entropy(run_model(x).float(), labels)
        return torch.autograd.grad(loss, params)

    return step, [(x, labels)]


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def _group(case: Case) -> str:
    return case.model or ("fwd+bwd" if case.backward else "fwd")


def _skipped(rows: list, case: Case, impl: str, why: str) -> None:
    rows.append(Row(SUITE, case.name(), impl, None, extra={"group": _group(case), "skipped": why}))
    print(f"  {case.name():<44} {impl:<18} skipped: {why}", flush=True)


def _measure(rows: list, case: Case, impl: str, fn: Callable, sets: list, matmul: float) -> None:
    """Probe one call (shows a refusal or a fallback warning), then time the graph replays."""
    n_sets = len(sets)
    extra: dict = {}

    def call(i):
        with torch.set_grad_enabled(case.backward):
            return fn(*sets[i])

    try:
        said = common.probe(call)
        if said and impl == OURS:  # ours running the reference
            extra["warning"] = said
            print(f"  {case.name():<44} {impl:<18} warned: {said}", flush=True)
        replays = replays_for(case, impl, n_sets)
        ms = time_graph(call, n_sets, replays=replays, warmup=WARMUP)
    except Exception as e:  # noqa: BLE001 (any refusal, OOM or a failed capture skips the row)
        why = common.why(e)
        del e
        common.free_cuda()
        return _skipped(rows, case, impl, why)
    tflops = case.flops() / ms / 1e9
    rows.append(Row(SUITE, case.name(), impl, round(ms, 5), TFLOPs=round(tflops, 1),
                    extra={"group": _group(case), "pct_matmul": round(100 * tflops / matmul, 1), "n_sets": n_sets,
                           "replays": replays, **extra}))
    print(f"  {case.name():<44} {impl:<18} {ms * 1e3:9.1f} us {tflops:6.0f} TFLOP/s", flush=True)


def _skip_reason(case: Case, impl: str, ours_why: str) -> Optional[str]:
    if impl in (OURS, SM90) and ours_why:
        return ours_why
    if case.model:
        return torchvision_missing()
    if impl == CUDNN:
        name = "cudnn_convolution_add_relu" if case.residual else "cudnn_convolution_relu"
        if not hasattr(torch.ops.aten, name):
            return f"this torch has no aten.{name}"
    return None


def _run_case(case: Case, rows: list, matmul: float, ours_why: str) -> None:
    first = len(rows)
    layer_sets = None if case.model else _layer_sets(case, n_sets_for(case))
    for impl in case.impls():
        why = _skip_reason(case, impl, ours_why)
        if why:
            _skipped(rows, case, impl, why)
            continue
        if case.model:
            try:
                fn, sets = _resnet_impl(case, impl)
            except Exception as e:  # noqa: BLE001
                _skipped(rows, case, impl, common.why(e))
                continue
        else:
            fn, sets = _layer_impl(case, impl), layer_sets
        with mock.patch.dict(os.environ, {KERNEL_ENV: "sm90" if impl == SM90 else ""}):  # chosen per call
            _measure(rows, case, impl, fn, sets, matmul)
        if case.model:
            del fn, sets
            common.free_cuda()
    timed = {r.impl: r for r in rows[first:] if r.ms is not None}
    for ours in (OURS, SM90):
        for base, key in ((TORCH, "vs_torch"), (CUDNN, "vs_cudnn_fused"), (COMPILE, "vs_compile")):
            if ours in timed and base in timed:
                timed[ours].extra[key] = round(timed[base].ms / timed[ours].ms, 3)
    del layer_sets
    common.free_cuda()


# ------------------------------------------------------------------------------------------------
# BatchNorm + ReLU (training)
# ------------------------------------------------------------------------------------------------

BN_CASES = [  # N, C, H (= W), residual: after conv1 / conv2 of layer1, layer2's conv2, layer4's conv3 (+ residual)
    (64, 256, 56, False),
    (64, 256, 56, True),
    (64, 512, 28, False),
    (64, 2048, 7, True),
]


def _bn_impls() -> dict[str, Callable]:
    def eager(x, rm, rv, w, b, r):
        z = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        return F.relu(z if r is None else z + r)

    ours = lambda x, rm, rv, w, b, r: ops.batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5, r)  # noqa: E731
    return {OURS: ours, TORCH: eager, COMPILE: torch.compile(eager)}


def _bn_rows(rows: list, copy_gbps: float, ours_why: str) -> None:
    impls = _bn_impls()
    for n, c, hw, residual in BN_CASES:
        act_bytes = n * c * hw * hw * torch.finfo(DTYPE).bits // 8
        n_sets = sets_for(6 * act_bytes)
        sets = []
        for _ in range(n_sets):
            x = torch.randn(n, c, hw, hw, device="cuda", dtype=DTYPE).to(memory_format=CL)
            r = torch.randn_like(x) if residual else None
            sets.append((x, r, torch.randn_like(x)))
        rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
        w, b = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda") * 0.1
        for backward in (False, True):
            name = f"bn+relu {'fwd+bwd' if backward else 'fwd'} {n}x{c}x{hw}^2{' +residual' if residual else ''}"
            units = (10 + 2 * residual) if backward else (3 + residual)
            if not common.selected([name], str):  # BENCH_CASES
                continue
            for impl, fn in impls.items():
                if impl == OURS and ours_why:
                    rows.append(Row(SUITE, name, impl, None, extra={"group": "bn+relu", "skipped": ours_why}))
                    continue
                grads = [(x.detach().requires_grad_(), None if r is None else r.detach().requires_grad_(), dy)
                         for x, r, dy in sets]
                leaves = [w.detach().requires_grad_(), b.detach().requires_grad_()]

                def call(i, fn=fn, backward=backward, grads=grads, leaves=leaves):
                    if not backward:
                        with torch.no_grad():
                            return fn(sets[i][0], rm, rv, w, b, sets[i][1])
                    x, r, dy = grads[i]
                    y = fn(x, rm, rv, *leaves, r)
                    return torch.autograd.grad(y, [t for t in (x, *leaves, r) if t is not None], dy)

                try:
                    ms = time_graph(call, n_sets, warmup=WARMUP)
                except Exception as e:  # noqa: BLE001 (a refusal or a failed capture skips the row)
                    rows.append(Row(SUITE, name, impl, None, extra={"group": "bn+relu", "skipped": common.why(e)}))
                    common.free_cuda()
                    continue
                gbps = units * act_bytes / ms / 1e6
                rows.append(Row(SUITE, name, impl, round(ms, 5), GBps=round(gbps, 1),
                                extra={"group": "bn+relu", "pct_copy": round(100 * gbps / copy_gbps, 1)}))
                print(f"  {name:<44} {impl:<18} {ms * 1e3:9.1f} us {gbps:8.0f} GB/s", flush=True)
        del sets
        common.free_cuda()


def run() -> list[Row]:
    matmul = common.ceilings()["matmul_bf16_TFLOPs"]
    ours_ok, ours_why = native_conv()
    if not ours_ok:
        print(f"  fusedkernels: skipped ({ours_why})", flush=True)
    rows: list[Row] = []
    for case in common.selected(cases(), lambda c: c.name()):
        _run_case(case, rows, matmul, ours_why)
    bn_why = ours_why or ("" if _native.has_op("batch_norm_relu") else "this build has no batch_norm_relu op")
    _bn_rows(rows, common.ceilings()["copy_GBps"], bn_why)
    return rows


# ------------------------------------------------------------------------------------------------
# The plan, without a GPU: python -m bench.conv
# ------------------------------------------------------------------------------------------------


def plan() -> list[dict]:
    """Every row the suite times, with its sets, replays and estimated GPU seconds (at ASSUMED_TFLOPS; torch.compile's compile time not included)."""
    return common.plan_rows(common.selected(cases(), lambda c: c.name()), n_sets_for, replays_for, ASSUMED_TFLOPS,
                            WARMUP)


if __name__ == "__main__":
    rows = plan()
    for p in rows:
        print(f"{p['case']:<44} {p['impl']:<18} sets {p['n_sets']}  replays {p['replays']:>2}  ~{p['est_s']:.2f} s")
    ours_ok, ours_why = native_conv()
    missing = torchvision_missing()
    print(f"\n{len(rows)} rows, ~{sum(p['est_s'] for p in rows):.0f} s of GPU time at the assumed rates; "
          f"ours: {'native op' if ours_ok else 'skipped (' + ours_why + ')'}; "
          f"resnet50 rows: {'torchvision present' if not missing else 'skipped (' + missing + ')'}")
    sys.exit(0)
