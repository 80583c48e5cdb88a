"""Timing, ceilings and result files shared by the suites.

Every timed call runs inside a CUDA graph that calls the function on several input sets in turn: the
graph removes Python and launch overhead from every implementation alike, and rotating inputs whose
total is several times the L2 keeps the cache from serving reads that a real model would take from HBM.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import re
import statistics
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Row:
    suite: str
    case: str
    impl: str
    ms: float
    GBps: Optional[float] = None
    TFLOPs: Optional[float] = None
    peak_MiB: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        d.update(self.extra)
        return d


def time_graph(call: Callable[[int], object], n_sets: int, replays: int = 30, warmup: int = 3,
               min_calls: int = 1) -> float:
    """Median ms of one call(i), timed as a CUDA graph of call(0) .. call(n_sets - 1), repeated until the graph
    holds at least min_calls calls (a replay's own launch, a few µs, then counts little in each call)."""
    rounds = -(-min_calls // n_sets)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):  # compile, autotune, allocate outside the capture
            for i in range(n_sets):
                call(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for i in range(n_sets):
                call(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (rounds * n_sets))
    del graph
    return statistics.median(times)


def sets_for(bytes_per_set: int, min_total: int = 256 << 20, max_sets: int = 8) -> int:
    """How many input sets to rotate so that together they are well past the L2 (tens of MB)."""
    return max(2, min(max_sets, -(-min_total // max(bytes_per_set, 1))))


def time_eager(fn: Callable[[], object], runs: int = 20, warmup: int = 3) -> float:
    """Median ms of fn() between CUDA events, for single launches long enough that overhead is noise."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_ceilings() -> dict:
    """Device copy bandwidth (1 GiB, read + write) and bf16 matmul rate (8192^3), measured now.

    Timed eagerly: captured in a CUDA graph, the same copy measured 2.8 TB/s on the H200 against 4.2 TB/s
    eagerly (a graph turns it into a memcpy node)."""
    n = 1 << 30
    src = torch.empty(n // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy_ms = time_eager(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = time_eager(lambda: torch.mm(a, b), runs=10)
    del a, b
    torch.cuda.empty_cache()
    _measured.clear()
    _measured.update({"copy_GBps": 2 * n / copy_ms / 1e6, "matmul_bf16_TFLOPs": 2 * 8192**3 / mm_ms / 1e9})
    return dict(_measured)


_measured: dict = {}


def ceilings() -> dict:
    """The ceilings measured in this run (`python -m bench` measures them before the suites), for suites that
    report a fraction of one per row; measured now when a suite runs on its own."""
    return dict(_measured) if _measured else measure_ceilings()


def gpu_slug() -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_")


def meta(ceilings: dict) -> dict:
    try:
        import subprocess

        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip().split("\n")[0]  # one line per GPU
    except OSError:
        driver = "?"
    return {
        "gpu": torch.cuda.get_device_name(),
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **{k: round(v, 1) for k, v in ceilings.items()},
    }


def save(meta_info: dict, rows: list[Row], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{gpu_slug()}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta_info, "rows": [r.as_dict() for r in rows]}, f, indent=1)
    return path


def why(e: BaseException) -> str:
    """One line for a row that has no time: the exception's type and first line."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def free_cuda() -> None:
    """Drop what a row left behind (a failed capture may leave an error to report once)."""
    gc.collect()
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        pass
    torch.cuda.empty_cache()


def probe(call: Callable[[int], object]) -> Optional[str]:
    """Run call(0) once (it compiles, autotunes, or raises a refusal) and return what fusedkernels warned
    during it, if anything: a fallback to PyTorch's implementation, said once per reason (so only the first
    case that meets a reason reports it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call(0)
        torch.cuda.synchronize()
    del out
    said = [str(w.message) for w in caught if "fusedkernels" in str(w.message)]
    return said[0][:300] if said else None


def selected(cases: list, name: Callable[[object], str]) -> list:
    """The cases whose name(case) matches the regular expression in BENCH_CASES (searched, so "8192" or
    "bias|causal" will do); all of them when it is unset. For a run that measures only what a change touched."""
    pattern = os.environ.get("BENCH_CASES")
    return [c for c in cases if not pattern or re.search(pattern, name(c))]


def plan_rows(cases, n_sets_for: Callable, replays_for: Callable, assumed_tflops: dict, warmup: int) -> list[dict]:
    """Every row a GEMM-like suite times, with its sets, replays and estimated GPU seconds (probe, graph warm-up,
    one replay after capture, the timed replays; at assumed_tflops[impl])."""
    out = []
    for case in cases:
        n_sets = n_sets_for(case)
        for impl in case.impls():
            replays = replays_for(case, impl, n_sets)
            est_ms = case.flops() / (assumed_tflops[impl] * 1e9)
            calls = 1 + n_sets * (warmup + 1 + replays)
            out.append({"case": case.name(), "impl": impl, "n_sets": n_sets, "replays": replays,
                        "est_s": calls * est_ms / 1e3})
    return out
