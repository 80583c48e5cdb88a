"""Where a `models` suite step spends its GPU time and memory: the Llama step of bench/models.py under
torch.profiler, per impl, kernels grouped by name; with --memory, also what is alive at the step's peak allocation
(CUDA caching-allocator history: the tensors allocated during the step and still held then, grouped by the line of
our, transformers' or Liger's code that made them); with --gaps, where the GPU waits for the host: its idle time per
phase of the step (forward, backward, optimizer) and the longest idle stretches with the host ops that ran in them
(a step whose GPU idles is host-bound there: faster kernels do not shorten it); with --timeline, the same without the
profiler (whose host cost hides what a plain step waits for): at the step's landmarks (each layer's entry, the final
norm, the backward, the optimizer) the host's time and the GPU's (CUDA events), both from the step's start: where
the GPU's time is not ahead of the host's, it waited for the launch. Writes one table per impl to stdout and to
$OUT/profile_models.txt.

    python scripts/profile_models.py [--memory] [--gaps] [--timeline] [fusedkernels liger torch torch-compile fusedkernels+attention]
"""

import collections
import json
import os
import statistics
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile, record_function

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
    launches = sum(e.count for e in events) // 2
    lines = [f"== {impl}: {total / 1e3:.2f} ms of kernels a step ({launches} launches), "
             f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"]
    for e in events[:40]:
        lines.append(f"{e.device_time_total / 2e3:9.3f} ms {e.count // 2:5d}x  {e.key[:150]}")
    print("\n".join(lines), flush=True)
    out.write("\n".join(lines) + "\n\n")
    if "--gaps" in sys.argv:
        lines = idle_gaps(model, opt, batches[5])
        print("\n".join(lines), flush=True)
        out.write("\n".join(lines) + "\n\n")
    if "--timeline" in sys.argv:
        lines = timeline(model, opt, batches[5])
        print("\n".join(lines), flush=True)
        out.write("\n".join(lines) + "\n\n")
    if "--memory" in sys.argv:
        opt.zero_grad(set_to_none=True)  # the last step's grads: freed before the baseline is read
        lines = peak_allocations(step, batches[5])
        print("\n".join(lines), flush=True)
        out.write("\n".join(lines) + "\n\n")
    del model, opt
    torch.cuda.empty_cache()


PHASES = ("forward", "backward", "optimizer")


def idle_gaps(model, opt, ids, top: int = 20, min_us: float = 5.0) -> list:
    """One step (as bench/models.py times it) under the profiler with host ops: the GPU's idle time per phase, and
    the longest idle stretches with the host's top-level ops between the GPU going idle and the next launch."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("step"):
            opt.zero_grad(set_to_none=True)
            with record_function("forward"):
                loss = model(input_ids=ids, labels=ids).loss
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                opt.step()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))["traceEvents"]
    gpu = sorted((e for e in trace if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launch = {e["args"]["correlation"]: e["ts"] for e in trace
              if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    phases = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in trace
              if e.get("cat") == "user_annotation" and e["name"] in PHASES + ("step",)}
    host_ops = sorted((e for e in trace if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])

    def phase_of(t):
        return next((p for p in PHASES if p in phases and phases[p][0] <= t < phases[p][1]), "between")

    def top_level(a, b):  # the outermost host ops overlapping [a, b]
        names, end = collections.Counter(), -1.0
        for e in host_ops:
            if e["ts"] >= b:
                break
            if e["ts"] + e["dur"] > a and e["ts"] >= end:
                names[e["name"]] += 1
                end = e["ts"] + e["dur"]
        return ", ".join(f"{n}{f' x{c}' if c > 1 else ''}" for n, c in names.most_common(6))

    step_start, step_end = phases["step"]
    idle, gaps, busy_until = collections.Counter(), [], gpu[0]["ts"] if gpu else step_start
    idle["before the first kernel"] = busy_until - step_start
    for e in gpu:
        gap = e["ts"] - busy_until
        if gap > min_us:
            idle[phase_of(busy_until)] += gap
            issued = launch.get(e.get("args", {}).get("correlation"), e["ts"])
            gaps.append((gap, phase_of(busy_until), e["name"][:60], top_level(busy_until, issued)))
        busy_until = max(busy_until, e["ts"] + e["dur"])
    busy = sum(e["dur"] for e in gpu)
    lines = [f"-- GPU idle in one step ({(step_end - step_start) / 1e3:.2f} ms host span, {busy / 1e3:.2f} ms of GPU "
             f"work; stretches over {min_us:.0f} us): " + ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in idle.items())]
    for gap, phase, kernel, ops in sorted(gaps, reverse=True)[:top]:
        lines.append(f"{gap:9.1f} us  {phase:9s} before {kernel}  host: {ops[:200]}")
    return lines


def timeline(model, opt, ids, steps: int = 5) -> list:
    """The host's and the GPU's time (ms from the step's start) at the step's landmarks, median over steps as
    bench/models.py times them (a sync after each), with no profiler."""
    import time

    marks = collections.defaultdict(list)  # landmark -> [(host s, event)] per step
    current = []

    def mark(name):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        current.append((name, time.perf_counter(), event))

    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hooks = [body.embed_tokens.register_forward_pre_hook(lambda *_: mark("embed_tokens")),
             body.rotary_emb.register_forward_pre_hook(lambda *_: mark("rotary_emb")),
             body.norm.register_forward_pre_hook(lambda *_: mark("final norm")),
             body.register_forward_hook(lambda *_: mark("decoder returned"))]
    hooks += [layer.register_forward_pre_hook(lambda *_, i=i: mark(f"layer {i}")) for i, layer in enumerate(body.layers)]
    try:
        for _ in range(steps):
            torch.cuda.synchronize()
            current.clear()
            mark("start")
            opt.zero_grad(set_to_none=True)
            mark("zero_grad done")
            loss = model(input_ids=ids, labels=ids).loss
            mark("forward returned")
            loss.backward()
            mark("backward returned")
            opt.step()
            mark("step returned")
            torch.cuda.synchronize()
            (_, host0, event0), seen = current[0], collections.Counter()
            for name, host, event in current:
                seen[name] += 1
                key = name if seen[name] == 1 else f"{name} ({seen[name]})"
                marks[key].append(((host - host0) * 1e3, event0.elapsed_time(event)))
    finally:
        for h in hooks:
            h.remove()
    lines = ["-- timeline (ms from the step's start, median of 5 steps; GPU lead = how far the GPU's queue runs "
             "behind the host there: ~0 means it was idle, waiting for this launch)", f"{'landmark':22s} "
             f"{'host':>8s} {'GPU':>8s} {'lead':>8s}"]
    for key, values in marks.items():
        host = statistics.median(v[0] for v in values)
        gpu = statistics.median(v[1] for v in values)
        lines.append(f"{key:22s} {host:8.3f} {gpu:8.3f} {gpu - host:8.3f}")
    return lines


def _where(frame) -> str:
    return f"{frame['filename'].split('site-packages/')[-1]}:{frame['line']} {frame['name']}"


def _origin(frames) -> str:
    """Where a tensor came from: the innermost frame of the package, transformers, Liger or bench (past the native
    op dispatcher, which every fused op goes through), and the model line that called it; else the innermost frame."""
    ours = [f for f in frames if any(k in f["filename"] for k in ("fusedkernels", "transformers", "liger_kernel", "bench"))
            and not f["filename"].endswith("fusedkernels/_native.py")]
    if not ours:
        return _where(frames[0]) if frames else "?"
    caller = next((f for f in ours[1:] if "transformers" in f["filename"]), None)
    return _where(ours[0]) + (f" <- {_where(caller)}" if caller and caller is not ours[0] else "")


def peak_allocations(step, ids, top: int = 25) -> list:
    """One step under the allocator's history: the bytes alive at its peak that the step allocated, by origin."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    step(ids)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    live, now, peak, at_peak, peak_event = {}, 0, 0, {}, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            now += event["size"]
            if now > peak:
                peak, at_peak, peak_event = now, dict(live), event
        elif event["action"] == "free_requested" and event["addr"] in live:
            now -= live.pop(event["addr"])["size"]
    by_origin = collections.Counter()
    for event in at_peak.values():
        by_origin[_origin(event.get("frames", []))] += event["size"]
    lines = [f"-- peak: {(base + peak) / 2**20:.0f} MiB = {base / 2**20:.0f} held before the step "
             f"(weights, grads, optimizer states) + {peak / 2**20:.0f} allocated in it, reached at "
             f"{_origin(peak_event.get('frames', []))}; alive then, by origin:"]
    lines += [f"{size / 2**20:9.1f} MiB  {origin[:160]}" for origin, size in by_origin.most_common(top)]
    return lines


if __name__ == "__main__":
    impls = [a for a in sys.argv[1:] if not a.startswith("--")] or [models.OURS, models.LIGER]
    batches = models._batches(6)
    path = os.path.join(os.environ.get("OUT", "."), "profile_models.txt")
    with open(path, "w") as out:
        for impl in impls:  # liger last: its patches are process-wide
            profile_impl(impl, batches, out)
