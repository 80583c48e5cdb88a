"""Suite `models`: a whole Hugging Face Llama-style training step, eager PyTorch against the same model with
`fusedkernels.fuse()`, Liger-Kernel's patches and `model.compile()`.

The model (ANCHORS.md, "A whole training step"): `LlamaForCausalLM` from a config with random weights, hidden
2048, 8 layers, 16 query / 4 key-value heads, intermediate 5632 (TinyLlama's ratio), vocab 32000, bf16 parameters;
batch 4 x 2048 tokens with labels (the loss inside the model), SDPA attention, torch.optim.AdamW(fused=True).
A step is zero_grad, forward with the loss, backward, optimizer step. Impls:

  torch          the model as built (eager, attn_implementation="sdpa")
  fusedkernels   fusedkernels.fuse(model, merge=True) (norms, gated MLPs, rotary on ops.apply_rotary, the LM head +
                 loss on ops.linear_cross_entropy: the step never builds the [tokens, vocab] logits); attention
                 stays on torch's SDPA (cuDNN's kernel on the H200 here), as in the liger row; its report goes to
                 extra `fused`, and extra `lm_head_loss` says whether the head + loss swap went in
  fusedkernels+attention   the same with attn_implementation="fusedkernels" (fusedkernels.integrations.transformers):
                 our attention kernels too (docs/perf-notes.md: their backward trails cuDNN's at this shape)
  fusedkernels+optim   the fusedkernels row with fusedkernels.optim.FusedAdamW (same arguments; bf16 states for the
                 bf16 parameters, as torch's) in place of torch's fused AdamW: the whole library's step. The other
                 rows, and the comparison with Liger-Kernel (which has no optimizer), keep torch's.
  liger          Liger-Kernel's apply_liger_kernel_to_llama(model=...) with every patch (RMSNorm, SwiGLU, RoPE,
                 fused linear + cross-entropy); skipped with the reason where liger_kernel is not importable
  torch-compile  model.compile() (default mode)

Each impl runs in a process of its own (Liger patches transformers' Llama classes for the rest of a process, and a
fresh process's peak memory owes nothing to earlier suites), builds the model from the same seed and trains on the
same batches: extra `loss_first` / `loss_last` are its losses at the first and the last timed step, to compare with
eager's (bf16 noise apart, they match). A process's time is the median of its eager steps between CUDA events (a
step is long: no graph). torch, fusedkernels and liger run ROUNDS times, interleaved (torch, fusedkernels, liger,
torch, ...), since one process's time drifted ±2% from the next's (docs/perf-notes.md, models): a row's ms is the
median of its rounds, extra `ms_rounds` lists them. peak_MiB is the peak allocated memory over the timed steps
(weights, AdamW states and activations), the largest of the rounds. Without transformers the suite says so and
measures nothing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Optional

import torch

from . import common
from .common import Row

SUITE = "models"
OURS, OURS_ATTENTION, OURS_OPTIM = "fusedkernels", "fusedkernels+attention", "fusedkernels+optim"
TORCH, LIGER, COMPILE = "torch", "liger", "torch-compile"
IMPLS = (TORCH, OURS, OURS_OPTIM, OURS_ATTENTION, COMPILE, LIGER)
# the verdict's impls run ROUNDS times, interleaved (BENCH_ROUNDS=5: a run whose ratio should not hang on one round)
ROUNDS, REPEATED = int(os.environ.get("BENCH_ROUNDS", "3")), (TORCH, OURS, OURS_OPTIM, LIGER)
WORKER_TIMEOUT_S = 900  # one impl's process (torch-compile's compilation is the long one)
CONFIG = dict(hidden_size=2048, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
              intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)
BATCH, SEQ = 4, 2048
CASE = "llama h2048 L8 16q/4kv v32000 B4x2048 bf16 train step"
WARMUP, STEPS = 3, 10


def missing() -> Optional[str]:
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        return f"transformers is not installed ({e})"
    return None


def _model(impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).train()
    extra = {}
    if impl in (OURS, OURS_ATTENTION, OURS_OPTIM):
        import fusedkernels
        import fusedkernels.integrations.transformers as fk_hf

        report = fusedkernels.fuse(model, merge=True)
        if impl == OURS_ATTENTION:
            fk_hf.register()
            model.set_attn_implementation(fk_hf.NAME)
        extra["fused"] = str(report).replace("\n", "; ")[:300]
        extra["lm_head_loss"] = any(e.path == "" and e.status == "swapped" for e in report.entries)
    elif impl == LIGER:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
    elif impl == COMPILE:
        model.compile()
    return model, extra


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator("cuda").manual_seed(1)
    return [torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), device="cuda", generator=g) for _ in range(n)]


def _optimizer(impl: str, params):
    if impl == OURS_OPTIM:
        from fusedkernels.optim import FusedAdamW

        return FusedAdamW(params, lr=1e-4, weight_decay=0.1)
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)


def _train(model, opt, batches: list[torch.Tensor]) -> tuple[float, float, list[float]]:
    """Median step ms over the timed steps, peak MiB over them, and every step's loss."""
    losses, times = [], []
    for i, ids in enumerate(batches):
        if i == WARMUP:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        end.record()
        end.synchronize()
        losses.append(loss.item())
        if i >= WARMUP:
            times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**20, losses


def _skip_reason(impl: str) -> Optional[str]:
    if impl == LIGER:
        try:
            import liger_kernel.transformers  # noqa: F401
        except Exception as e:  # noqa: BLE001 (ImportError, or triton missing underneath)
            return f"liger_kernel is not importable ({common.why(e)})"
    return None


RESULT = "models-result: "  # the line a worker prints its result on


def _measure(impl: str) -> dict:
    """One impl in this process: {"ms", "peak_MiB", "loss_first", "loss_last", ...} or {"skipped": why}."""
    why = _skip_reason(impl)
    if why is not None:
        return {"skipped": why}
    try:
        model, extra = _model(impl)
        ms, peak, losses = _train(model, _optimizer(impl, model.parameters()), _batches(WARMUP + STEPS))
    except Exception as e:  # noqa: BLE001 (a refusal or an OOM skips the row)
        return {"skipped": common.why(e)}
    return {"ms": ms, "peak_MiB": peak, "loss_first": losses[WARMUP], "loss_last": losses[-1], **extra}


def _in_a_process(impl: str) -> dict:
    """_measure(impl) in a fresh interpreter (python -m bench.models --impl IMPL)."""
    try:
        done = subprocess.run([sys.executable, "-m", "bench.models", "--impl", impl], capture_output=True, text=True,
                              timeout=WORKER_TIMEOUT_S, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"skipped": f"its process ran past {WORKER_TIMEOUT_S} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"skipped": f"its process ended with status {done.returncode}: {tail[:200]}"}


def _row(impl: str, results: list[dict]) -> Row:
    timed = [r for r in results if "ms" in r]
    if not timed:
        why = results[0]["skipped"]
        print(f"  {impl:<22} skipped: {why}", flush=True)
        return Row(SUITE, CASE, impl, None, extra={"skipped": why})
    rounds = [round(r["ms"], 3) for r in timed]
    ms, peak = statistics.median(rounds), max(r["peak_MiB"] for r in timed)
    first = timed[0]
    extra = {k: v for k, v in first.items() if k not in ("ms", "peak_MiB", "loss_first", "loss_last")}
    print(f"  {impl:<22} step {ms:8.2f} ms (rounds {', '.join(f'{t:.2f}' for t in rounds)})  peak {peak:8.0f} MiB  "
          f"loss {first['loss_first']:.4f} -> {first['loss_last']:.4f}", flush=True)
    return Row(SUITE, CASE, impl, round(ms, 3), peak_MiB=round(peak, 1),
               extra={"ms_rounds": rounds, "loss_first": round(first["loss_first"], 4),
                      "loss_last": round(first["loss_last"], 4), **extra})


def run() -> list[Row]:
    why = missing()
    if why:
        print(f"  skipped: {why}", flush=True)
        return []
    results: dict = {impl: [] for impl in IMPLS}
    for i in range(ROUNDS):
        for impl in IMPLS:
            if i == 0 or (impl in REPEATED and "ms" in results[impl][0]):
                results[impl].append(_in_a_process(impl))
    rows = [_row(impl, results[impl]) for impl in IMPLS]
    timed = {r.impl: r for r in rows if r.ms is not None}
    for ours in (OURS, OURS_OPTIM, OURS_ATTENTION):
        for base in (TORCH, LIGER, COMPILE):
            if ours in timed and base in timed:
                timed[ours].extra[f"vs_{base.replace('-', '_')}"] = round(timed[base].ms / timed[ours].ms, 3)
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--impl":  # a worker of run()
        print(RESULT + json.dumps(_measure(sys.argv[2])), flush=True)
    else:  # the plan, without a GPU
        print(f"{CASE}: impls {', '.join(IMPLS)}, each in a process of its own; {', '.join(REPEATED)} {ROUNDS} "
              f"rounds, interleaved; {WARMUP} warm-up + {STEPS} timed steps each; {missing() or 'transformers found'}")
