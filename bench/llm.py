"""Suite `llm`: the fused linear + cross-entropy and rotary embeddings, bf16, against eager PyTorch, torch.compile and
Liger-Kernel (where liger_kernel is installed).

Linear + cross entropy (`lce fwd+bwd T x H x V`): loss (mean) and the gradients of hidden and weight. torch:
F.cross_entropy(F.linear(h, W), t) (its [T, V] logits in bf16); torch.compile: the same function compiled; liger:
LigerFusedLinearCrossEntropyLoss. Timed eagerly with CUDA events (each call is 10-200 ms, so host time is noise, and
Liger's forward syncs with .item(), which a CUDA graph cannot capture). TFLOP/s counts 6 T H V (the forward GEMM and
the two gradient GEMMs); `peak_MiB` is one call's peak allocation above what was allocated before it (inputs
excluded), the number this op exists to cut.

Rotary (`rope fwd / fwd+bwd B x N, 32 q / 8 kv heads, D 128`): q [B, 32, N, 128], k [B, 8, N, 128], cos / sin
[B, N, 128] as Hugging Face Llama passes them. torch: HF's `q * cos + rotate_half(q) * sin` written out;
torch.compile: that function compiled; liger: liger_rotary_pos_emb. CUDA-graph timings over rotated inputs; GB/s
counts reading q and k and writing the outputs (fwd), and the same again for the gradients (fwd+bwd); the tables'
reads (1/40 of that) are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedkernels import ops

from . import common
from .common import Row, sets_for, time_eager, time_graph

SUITE = "llm"
DTYPE = torch.bfloat16
LCE_SHAPES = [(8192, 4096, 32000), (8192, 4096, 128256), (32768, 4096, 32000), (32768, 4096, 128256)]
ROPE_SHAPES = [(4, 2048), (8, 4096)]  # (batch, seq); 32 q heads, 8 kv heads, head_dim 128
HEADS_Q, HEADS_K, HEAD_DIM = 32, 8, 128


def _liger_lce():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception:  # not installed (optional), or its import failed here
        return None
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, t: loss(w, h, t)


def _liger_rope():
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception:
        return None
    return liger_rotary_pos_emb


def _torch_lce(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def _skipped(rows: list, case: str, impl: str, e: BaseException) -> None:
    """A row without a time (an OOM or a refusal), and the memory it left freed."""
    why = common.why(e)
    common.free_cuda()
    rows.append(Row(SUITE, case, impl, None, extra={"skipped": why}))
    print(f"  {case:<40} {impl:<14} skipped: {why}", flush=True)


def _peak_extra_mib(fn) -> float:
    common.free_cuda()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - before) / 2**20


def _lce_rows() -> list[Row]:
    rows = []
    impls = {"fusedkernels": lambda h, w, t: ops.linear_cross_entropy(h, w, t), "torch": _torch_lce,
             "torch.compile": torch.compile(_torch_lce, dynamic=False)}
    liger = _liger_lce()
    if liger is not None:
        impls["liger"] = liger
    ceiling = common.ceilings()["matmul_bf16_TFLOPs"]
    for tokens, hidden, vocab in LCE_SHAPES:
        case = f"lce fwd+bwd {tokens}x{hidden}x{vocab} bf16"
        h = (torch.randn(tokens, hidden, device="cuda") * 0.5).to(DTYPE).requires_grad_()
        w = (torch.randn(vocab, hidden, device="cuda") / hidden**0.5).to(DTYPE).requires_grad_()
        t = torch.randint(0, vocab, (tokens,), device="cuda")
        flops = 6 * tokens * hidden * vocab
        for impl, fn in impls.items():
            def call(fn=fn):
                return torch.autograd.grad(fn(h, w, t), [h, w])

            try:
                said = common.probe(lambda i: call())
                peak = round(_peak_extra_mib(call), 1)
                ms = time_eager(call, runs=5, warmup=1)
            except Exception as e:  # noqa: BLE001 (an OOM or a refusal skips the row)
                _skipped(rows, case, impl, e)
                continue
            tflops = flops / ms / 1e9
            extra = {"pct_matmul": round(100 * tflops / ceiling, 1), "timing": "eager"}
            if said:
                extra["warning"] = said
            rows.append(Row(SUITE, case, impl, round(ms, 4), TFLOPs=round(tflops, 1), peak_MiB=peak, extra=extra))
            print(f"  {case:<40} {impl:<14} {ms:9.2f} ms {tflops:6.0f} TFLOP/s {peak:9.0f} MiB extra", flush=True)
        del h, w, t
        common.free_cuda()
    return rows


def _rope_rows() -> list[Row]:
    rows = []
    impls = {"fusedkernels": lambda q, k, c, s: ops.apply_rotary(q, k, c, s), "torch": hf_rotary,
             "torch.compile": torch.compile(hf_rotary, dynamic=False)}
    liger = _liger_rope()
    if liger is not None:
        impls["liger"] = liger
    elem = torch.finfo(DTYPE).bits // 8
    for batch, seq in ROPE_SHAPES:
        qk_bytes = batch * seq * (HEADS_Q + HEADS_K) * HEAD_DIM * elem
        n_sets = sets_for(2 * qk_bytes)
        sets = []
        for _ in range(n_sets):
            q = torch.randn(batch, HEADS_Q, seq, HEAD_DIM, device="cuda", dtype=DTYPE)
            k = torch.randn(batch, HEADS_K, seq, HEAD_DIM, device="cuda", dtype=DTYPE)
            freqs = torch.rand(batch, seq, HEAD_DIM // 2, device="cuda") * seq
            emb = torch.cat((freqs, freqs), -1)
            sets.append((q, k, emb.cos().to(DTYPE), emb.sin().to(DTYPE), torch.randn_like(q), torch.randn_like(k)))
        grad_sets = [(q.detach().requires_grad_(), k.detach().requires_grad_(), c, s, dq, dk)
                     for q, k, c, s, dq, dk in sets]
        for impl, fn in impls.items():
            def fwd(i, fn=fn):
                q, k, c, s = sets[i][:4]
                with torch.no_grad():
                    return fn(q, k, c, s)

            def fwd_bwd(i, fn=fn):
                q, k, c, s, dq, dk = grad_sets[i]
                qo, ko = fn(q, k, c, s)
                return torch.autograd.grad([qo, ko], [q, k], [dq, dk])

            for direction, call, units in (("fwd", fwd, 2), ("fwd+bwd", fwd_bwd, 4)):
                case = f"rope {direction} {batch}x{seq} {HEADS_Q}/{HEADS_K} heads d{HEAD_DIM} bf16"
                try:
                    said = common.probe(call)
                    ms = time_graph(call, n_sets)
                except Exception as e:  # noqa: BLE001
                    _skipped(rows, case, impl, e)
                    continue
                gbps = units * qk_bytes / ms / 1e6
                extra = {"pct_copy": round(100 * gbps / common.ceilings()["copy_GBps"], 1)}
                if said:
                    extra["warning"] = said
                rows.append(Row(SUITE, case, impl, round(ms, 5), GBps=round(gbps, 1), extra=extra))
                print(f"  {case:<40} {impl:<14} {ms * 1e3:9.1f} us {gbps:8.0f} GB/s", flush=True)
        del sets, grad_sets
        common.free_cuda()
    return rows


def run() -> list[Row]:
    return _rope_rows() + _lce_rows()
