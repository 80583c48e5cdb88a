"""torch.compile's Triton kernels for the norm suite's forwards, kept for reading (source, PTX, cubin), and timed
beside ours (fusedkernels.ops) in one harness: a CUDA graph of 40 calls over 2 rotated input sets (as the norm suite
at these sizes) and over 4, the outputs from torch's allocator (one buffer reused call after call). Writes $OUT/compile_norm_kernels.tar.gz and prints µs per
call. On a GPU machine, after a build of the norm family: PYTHONPATH=$PWD python3 scripts/compile_norm_kernels.py
"""
import os
import pathlib
import tarfile
import tempfile

tmp = pathlib.Path(tempfile.mkdtemp())
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")
os.environ["TRITON_CACHE_DIR"] = str(tmp / "triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import time_graph  # noqa: E402

SHAPES = [(16384, 1024), (16384, 4096), (65536, 768)]
SETS, REPS = (2, 4), 40


def chains(hidden):
    """name -> (PyTorch's chain, ours)."""
    from fusedkernels import ops

    return {
        "ln": (lambda x, r, w, b: F.layer_norm(x, (hidden,), w, b),
               lambda x, r, w, b: ops.layer_norm(x, (hidden,), w, b)),
        "rms": (lambda x, r, w, b: F.rms_norm(x, (hidden,), w, 1e-5),
                lambda x, r, w, b: ops.rms_norm(x, (hidden,), w, 1e-5)),
        "add_rms": (lambda x, r, w, b: (F.rms_norm(x + r, (hidden,), w, 1e-5), x + r),
                    lambda x, r, w, b: ops.add_rms_norm(x, r, w, 1e-5)),
        "add_ln": (lambda x, r, w, b: (F.layer_norm(x + r, (hidden,), w, b), x + r),
                   lambda x, r, w, b: ops.add_layer_norm(x, r, w, b)),
    }


def time_us(fn, xs, rs, w, b, sets) -> float:
    """Median µs of one call in a graph of REPS calls over the first `sets` input sets."""
    def call(i):
        with torch.no_grad():
            return fn(xs[i], rs[i], w, b)

    return time_graph(call, sets, replays=10, min_calls=REPS) * 1e3


for rows, hidden in SHAPES:
    xs = [torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(max(SETS))]
    rs = [torch.randn_like(x) for x in xs]
    w = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
    b = torch.randn(hidden, device="cuda", dtype=torch.bfloat16) * 0.1
    for name, (chain, ours) in chains(hidden).items():
        compiled = torch.compile(chain, dynamic=False)
        for sets in SETS:
            theirs = time_us(compiled, xs, rs, w, b, sets)
            mine = time_us(ours, xs, rs, w, b, sets)
            print(f"{name:<8} {rows}x{hidden} {sets} sets: ours {mine:.1f} us, compile {theirs:.1f} us "
                  f"({theirs / mine:.3f}x)", flush=True)

out = pathlib.Path(os.environ.get("OUT", "gpu_out"))
out.mkdir(parents=True, exist_ok=True)
with tarfile.open(out / "compile_norm_kernels.tar.gz", "w:gz") as tar:
    for p in tmp.rglob("*"):
        if p.is_file() and p.suffix in (".py", ".ptx", ".cubin", ".json", ".ttgir"):
            tar.add(p, arcname=str(p.relative_to(tmp)))
print("kept", sum(1 for _ in tmp.rglob("*.cubin")), "cubins")
