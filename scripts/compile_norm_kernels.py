"""torch.compile's Triton kernels for the norm suite's forwards, kept for reading (source, PTX, cubin) and timed
about as scripts/norm_sweep.cu times ours: a CUDA graph of 40 back-to-back launches over 4 rotated input sets
(the outputs: one buffer of torch's allocator, reused call after call; the sweep rotates four). Writes
$OUT/compile_norm_kernels.tar.gz and prints µs per call. Run on a GPU machine: python3 scripts/compile_norm_kernels.py"""
import os
import pathlib
import tarfile
import tempfile

tmp = pathlib.Path(tempfile.mkdtemp())
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")
os.environ["TRITON_CACHE_DIR"] = str(tmp / "triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = [(16384, 1024), (16384, 4096), (65536, 768)]
SETS, REPS = 4, 40


def chains(hidden):
    return {
        "ln": lambda x, r, w, b: F.layer_norm(x, (hidden,), w, b),
        "rms": lambda x, r, w, b: F.rms_norm(x, (hidden,), w, 1e-5),
        "add_rms": lambda x, r, w, b: (F.rms_norm(x + r, (hidden,), w, 1e-5), x + r),
        "add_ln": lambda x, r, w, b: (F.layer_norm(x + r, (hidden,), w, b), x + r),
    }


for rows, hidden in SHAPES:
    xs = [torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(SETS)]
    rs = [torch.randn_like(x) for x in xs]
    w = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
    b = torch.randn(hidden, device="cuda", dtype=torch.bfloat16) * 0.1
    for name, fn in chains(hidden).items():
        compiled = torch.compile(fn, dynamic=False)
        with torch.no_grad():
            for i in range(SETS):
                compiled(xs[i], rs[i], w, b)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for k in range(REPS):
                    compiled(xs[k % SETS], rs[k % SETS], w, b)
            g.replay()
            torch.cuda.synchronize()
            times = []
            for _ in range(10):
                a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                e.record()
                e.synchronize()
                times.append(a.elapsed_time(e) * 1e3 / REPS)
        print(f"compile {name:<8} {rows}x{hidden}: {sorted(times)[len(times) // 2]:.1f} us", flush=True)

out = pathlib.Path(os.environ.get("OUT", "gpu_out"))
out.mkdir(parents=True, exist_ok=True)
with tarfile.open(out / "compile_norm_kernels.tar.gz", "w:gz") as tar:
    for p in tmp.rglob("*"):
        if p.is_file() and p.suffix in (".py", ".ptx", ".cubin", ".json", ".ttgir"):
            tar.add(p, arcname=str(p.relative_to(tmp)))
print("kept", sum(1 for _ in tmp.rglob("*.cubin")), "cubins")
