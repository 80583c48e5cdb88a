"""Times our linear_act / linear_gated alone on the gemm suite's forward shapes (no baselines): an A/B of two builds in
one run, or of two kernel settings in one process.

    python3 scripts/time_gemm.py LABEL [REGEX]
    python3 scripts/time_gemm.py --settings=A,B [REGEX]

The first form prints one line: LABEL, then `shape act: µs` per case whose name matches REGEX (all by default), bf16,
no grad, CUDA-graph replays over rotating input sets (bench/common.py). Run it from each build in turn, alternating,
for two rounds or more: the K = 4096 rows move ±5% between rounds of one build (the clock under a long GEMM), and a
case's time can differ as much between processes. The second form times each case's kernels under
FUSEDKERNELS_GEMM_KERNEL=A and =B ("default": unset), 24 calls each, interleaved A B, B A, ... in one stream on the
same tensors (the profiler's kernel times), and prints a line a case: the medians, B / A and each one's range. Eager
calls leave gaps between the kernels, so long GEMMs run at a higher clock than in the first form's graphs.
"""

import os
import re
import statistics
import sys

import torch

from bench import common
from fusedkernels import ops

CASES = [(16384, 768, 3072, act, False) for act in ("gelu", "gelu_tanh", "relu", "silu")]
CASES += [(16384, 768, 3072, "gelu", True), (16384, 3072, 768, "none", True)]
CASES += [(16384, 3072, 768, act, False) for act in ("gelu", "gelu_tanh", "relu", "silu")]
CASES += [(4096, 1024, 4096, act, False) for act in ("gelu", "gelu_tanh", "relu", "silu")]
CASES += [(8192, 2048, 4096, act, False) for act in ("gelu", "relu")]
CASES += [(8192, 4096, 16384, act, False) for act in ("gelu", "gelu_tanh", "relu")]
CASES += [(8192, 4096, 11008, "silu", False)]
CASES += [(128, 4096, 4096, "gelu", False), (64, 4096, 4096, "gelu", False), (200, 4096, 4096, "relu", False)]
CASES += [(m, 4096, 4096, "gelu", False) for m in (96, 136, 150, 192, 256, 320)]  # small m: tiles and split K
CASES += [(128, 4096, 5000, "gelu", False), (128, 1024, 4096, "gelu", False), (256, 2048, 2048, "gelu", False)]
CASES += [(200, 4096, 1024, "gelu", False), (32, 4096, 11008, "silu", False), (160, 8192, 2048, "gelu", False)]
CASES += [(8192, 4096, 11008, "swiglu", False), (8192, 2048, 5632, "swiglu", False)]  # linear_gated
CASES += [(4096, 4096, 11008, "swiglu", False), (16384, 768, 2048, "geglu", False)]
CASES += [(4096, 1024, 2816, "swiglu", False)]
CASES += [(8192, 4096, 4096, "none", True), (4096, 1024, 4096, "gelu", True), (8192, 11008, 4096, "none", True)]
CASES += [(8192, 2048, 5632, "swiglu", True)]


def _set_kernel(setting: str) -> None:
    if setting == "default":
        os.environ.pop("FUSEDKERNELS_GEMM_KERNEL", None)
    else:
        os.environ["FUSEDKERNELS_GEMM_KERNEL"] = setting


def _interleaved(call, settings: list[str], sets: int, calls: int = 24) -> dict[str, list[float]]:
    """The GPU time (µs) of each call(i) under each setting, the settings' calls interleaved A B, B A, ... in one
    stream (so clocks and L2 treat them alike) and timed kernel by kernel by the profiler."""
    order = [setting for c in range(calls) for setting in (settings if c % 2 == 0 else settings[::-1])]

    def kernel_times(prof) -> list:
        return sorted((e.time_range for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda t: t.start)

    per_call = {}  # kernels a call launches under each setting (split K adds a second)
    with torch.no_grad():
        for setting in settings:  # first calls outside the profile
            _set_kernel(setting)
            call(0)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                call(0)
                torch.cuda.synchronize()
            per_call[setting] = len(kernel_times(prof))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for j, setting in enumerate(order):
                _set_kernel(setting)
                call(j // len(settings) % sets)
            torch.cuda.synchronize()
    kernels = kernel_times(prof)
    assert len(kernels) == sum(per_call[setting] for setting in order), (len(kernels), per_call)
    times, first = {setting: [] for setting in settings}, 0
    for setting in order:
        times[setting].append(sum(t.end - t.start for t in kernels[first:first + per_call[setting]]))
        first += per_call[setting]
    return times


def main() -> None:
    label, pattern = sys.argv[1], re.compile(sys.argv[2] if len(sys.argv) > 2 else "")
    settings = label.removeprefix("--settings=").split(",") if label.startswith("--settings=") else None
    g = torch.Generator("cuda").manual_seed(0)
    out = []
    for m, k, n, act, residual in CASES:
        name = f"{m}x{k}x{n} {act}{' +residual' if residual else ''}"
        if not pattern.search(name):
            continue
        sets = common.sets_for((m * k + 2 * n * k + m * n) * 2, max_sets=4)
        xs = [torch.randn(m, k, device="cuda", generator=g).bfloat16() for _ in range(sets)]
        gated = act in ops.gemm.GATED_ACTIVATIONS
        w = (torch.randn(2 * n if gated else n, k, device="cuda", generator=g) * k**-0.5).bfloat16()
        b = torch.randn(2 * n if gated else n, device="cuda", generator=g).bfloat16()
        fn = ops.linear_gated if gated else ops.linear_act
        r = torch.randn(m, n, device="cuda", generator=g).bfloat16() if residual else None

        def time_us() -> float:
            with torch.no_grad():
                return common.time_graph(lambda i: fn(xs[i], w, b, act, r), sets, replays=20, min_calls=8) * 1e3

        if settings is None:
            out.append(f"{name}: {time_us():.1f}")
            continue
        times = _interleaved(lambda i: fn(xs[i], w, b, act, r), settings, sets)
        a, b_ = (statistics.median(times[setting]) for setting in settings)
        spread = " ".join(f"{min(t):.1f}-{max(t):.1f}" for t in times.values())
        print(f"{name}: {settings[0]} {a:.1f} {settings[1]} {b_:.1f} ({b_ / a:.3f}; ranges {spread})", flush=True)
    if settings is None:
        print(label, " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
