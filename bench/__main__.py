"""`python -m bench [suite ...]`: run the benchmark suites (all by default) and write bench/results/<gpu>.{json,md,png}.

Without a GPU it says so and runs a small CPU demo of the drop-in modules instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

def _suites() -> tuple[str, ...]:
    """Every module of bench/ with a run() -> list[Row] is a suite."""
    import pkgutil

    here = os.path.dirname(os.path.abspath(__file__))
    return tuple(m.name for m in pkgutil.iter_modules([here]) if m.name not in ("__main__", "common", "report"))


SUITES = _suites()


def cpu_demo() -> None:
    from torch import nn

    import fusedkernels.nn as fnn
    from fusedkernels import _native

    print("No CUDA GPU is visible: the benchmarks need one (they time CUDA kernels against PyTorch's).")
    print(f"Native module: {'loaded' if _native.loaded else 'not loaded (' + str(_native.error) + ')'}.")
    print("CPU demo: swap the norms of a small model for the fused modules and compare.\n")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.GELU(), nn.Linear(256, 256), nn.RMSNorm(256))
    fused = nn.Sequential(nn.Linear(64, 256), fnn.FusedLayerNorm(256), nn.GELU(), nn.Linear(256, 256), fnn.FusedRMSNorm(256))
    fused.load_state_dict(model.state_dict())  # same parameters, same keys
    x = torch.randn(8, 128, 64, requires_grad=True)
    y_ref, y = model(x), fused(x)
    g_ref = torch.autograd.grad(y_ref.square().sum(), x)[0]
    g = torch.autograd.grad(y.square().sum(), x)[0]
    print(f"  output max |fused - torch|: {(y - y_ref).abs().max().item():.2e}")
    print(f"  grad   max |fused - torch|: {(g - g_ref).abs().max().item():.2e}")
    print("\nOn a machine with a CUDA GPU, `python -m bench` times the kernels instead.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suites", nargs="*", help=f"suites to run, of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="also copy the result files here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suites {unknown}; known: {', '.join(SUITES)}")
    if not torch.cuda.is_available():
        cpu_demo()
        return 0

    from . import common, report

    print("measuring ceilings ...", flush=True)
    ceilings = common.measure_ceilings()
    print(f"  copy {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul {ceilings['matmul_bf16_TFLOPs']:.0f} TFLOP/s")
    rows = []
    for suite in args.suites or SUITES:
        print(f"suite {suite}", flush=True)
        module = __import__(f"bench.{suite}", fromlist=["run"])
        rows += module.run()
    path = common.save(common.meta(ceilings), rows, common.RESULTS_DIR)
    written = report.write_reports(path)
    with open(written[1]) as f:
        print("\n" + f.read())
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for p in written:
            shutil.copy(p, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
