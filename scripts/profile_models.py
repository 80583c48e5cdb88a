"""Where a `models` suite step spends its GPU time: the Llama step of bench/models.py under torch.profiler, per
impl, kernels grouped by name, plus the memory snapshot's peak. Writes one table per impl to stdout and to
$OUT/profile_models.txt.

    python scripts/profile_models.py [fusedkernels liger torch torch-compile]
"""

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench import models


def profile_impl(impl: str, batches, out) -> None:
    model, _ = models._model(impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step(ids):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    for ids in batches[:3]:
        step(ids)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for ids in batches[3:5]:
            step(ids)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) / 2
    lines = [f"== {impl}: {total / 1e3:.2f} ms of kernels a step, peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"]
    for e in events[:30]:
        lines.append(f"{e.device_time_total / 2e3:9.3f} ms {e.count // 2:5d}x  {e.key[:150]}")
    print("\n".join(lines), flush=True)
    out.write("\n".join(lines) + "\n\n")
    del model, opt
    torch.cuda.empty_cache()


if __name__ == "__main__":
    impls = sys.argv[1:] or [models.OURS, models.LIGER]
    batches = models._batches(5)
    path = os.path.join(os.environ.get("OUT", "."), "profile_models.txt")
    with open(path, "w") as out:
        for impl in impls:  # liger last: its patches are process-wide
            profile_impl(impl, batches, out)
