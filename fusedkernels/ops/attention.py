"""Fused attention (FlashAttention-style): softmax(scale * q k^T + bias, masked) v in one kernel each way.

`attention` / `attention_varlen` are the C++ ops `torch.ops.fusedkernels.attention` / `attention_varlen`:
argument checks, the choice of kernel, autograd and autocast all happen in C++ (csrc/attention/
attention_ops.cpp), so a call costs what `F.scaled_dot_product_attention` costs on the host. CUDA float16 /
bfloat16 inputs with head_dim 32, 64, 96, 128 or 256 run the fused kernels (csrc/attention); CPU inputs run
the reference math (PyTorch ops, fp32) through the same autograd; anything else (float32 / float64 on CUDA,
other head dims, forward-mode AD) runs the reference, with one warning. `scaled_dot_product_attention` is
`F.scaled_dot_product_attention` (same signature, semantics and errors) on the same op.

Masking is TOP-LEFT aligned: query i sees key j iff
    (not causal or j <= i) and (left < 0 or j >= i - left) and (right < 0 or j <= i + right)
which for causal with Nq != Nk is exactly `F.scaled_dot_product_attention(is_causal=True)` (torch's
`tril(ones(Nq, Nk))`), not FlashAttention's bottom-right alignment. A row that sees no key gets output 0,
lse -inf and zero gradients (never NaN).

The `*_ref` functions are the specification the tests hold the kernels to.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native

__all__ = ["attention", "attention_varlen", "scaled_dot_product_attention", "attention_ref", "attention_varlen_ref"]


# ------------------------------------------------------------------------------------------------
# Reference (fp32 math): q [B, Nq, Hq, D], k / v [B, Nk, Hkv, D]
# ------------------------------------------------------------------------------------------------


def attention_mask_ref(nq: int, nk: int, causal: bool, window_left: int, window_right: int, device=None) -> Tensor:
    """[Nq, Nk] bool, True where query i sees key j (top-left aligned)."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    keep = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if causal:
        keep = keep & (j <= i)
    if window_left >= 0:
        keep = keep & (j >= i - window_left)
    if window_right >= 0:
        keep = keep & (j <= i + window_right)
    return keep


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    window: Optional[Tuple[int, int]] = None,
    attn_bias: Optional[Tensor] = None,
    dropout_mask: Optional[Tensor] = None,
    return_lse: bool = False,
    upcast: bool = True,
):
    """The specification of `attention`, differentiable. With upcast (default) the arithmetic is fp32 (fp64 for
    fp64 inputs); upcast=False computes in the inputs' dtype (PyTorch's own low-precision error, which the
    tests' tolerance is relative to). dropout_mask: bool [B, Hq, Nq, Nk] (True = kept), else drawn with
    torch.rand when dropout_p > 0. Returns out in q's dtype, or (out, lse) with lse [B, Hq, Nq] float32."""
    B, Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    if Hq % Hkv != 0:
        raise RuntimeError(f"attention: heads of q ({Hq}) must be a multiple of heads of k/v ({Hkv})")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    wl, wr = (-1, -1) if window is None else window
    acc = (torch.float64 if q.dtype == torch.float64 else torch.float32) if upcast else q.dtype
    qf = q.transpose(1, 2).to(acc)  # [B, Hq, Nq, D]
    kf = k.transpose(1, 2).to(acc)
    vf = v.transpose(1, 2).to(acc)
    if Hq != Hkv:
        kf = kf.repeat_interleave(Hq // Hkv, dim=1)
        vf = vf.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, Hq, Nq, Nk]
    keep = attention_mask_ref(Nq, Nk, causal, wl, wr, q.device)
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            keep = keep & attn_bias
        else:
            s = s + attn_bias.to(acc)
    s = s.masked_fill(~keep, float("-inf"))
    # softmax that gives 0 (not NaN) for a row that sees no key, also in its gradient
    m = s.detach().amax(-1, keepdim=True) if Nk > 0 else s.new_full((*s.shape[:-1], 1), float("-inf"))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    p = e / torch.where(l == 0, torch.ones_like(l), l)
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand(p.shape, device=p.device) >= dropout_p
        p = p * dropout_mask.to(acc) / (1.0 - dropout_p)
    out = torch.matmul(p, vf).transpose(1, 2).to(q.dtype)
    if not return_lse:
        return out
    lse = (torch.log(l) + m).squeeze(-1).float().detach()
    return out, lse


def attention_varlen_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    window: Optional[Tuple[int, int]] = None,
    dropout_masks=None,
    return_lse: bool = False,
    upcast: bool = True,
):
    """`attention_ref` per sequence of the packed q [total_q, Hq, D], k / v [total_k, Hkv, D]; lse [Hq, total_q].
    dropout_masks: a list of bool [1, Hq, nq, nk] masks, one per sequence."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        o, lse = attention_ref(
            q[None, cq[b] : cq[b + 1]], k[None, ck[b] : ck[b + 1]], v[None, ck[b] : ck[b + 1]],
            causal=causal, scale=scale, dropout_p=dropout_p, window=window,
            dropout_mask=None if dropout_masks is None else dropout_masks[b], return_lse=True, upcast=upcast,
        )
        outs.append(o[0])
        lses.append(lse[0])
    out = torch.cat(outs, 0) if outs else q.new_empty((0, q.shape[1], q.shape[2]))
    if out.shape[0] < q.shape[0]:  # rows past cu_seqlens_q[-1] belong to no sequence: 0
        out = torch.cat([out, q.new_zeros(q.shape[0] - out.shape[0], *q.shape[1:])])
    if not return_lse:
        return out
    lse = torch.cat(lses, 1) if lses else torch.empty(q.shape[1], 0, device=q.device)
    if lse.shape[1] < q.shape[0]:  # rows past cu_seqlens_q[-1] belong to no sequence
        lse = torch.cat([lse, lse.new_full((q.shape[1], q.shape[0] - lse.shape[1]), float("-inf"))], 1)
    return out, lse


# Without the native op (no native module, or a build without the attention family): the reference, with the
# native ops' positional arguments and results.


def _attention_without_native(q, k, v, attn_bias=None, dropout_p=0.0, causal=False, window_left=-1,
                              window_right=-1, scale=None, return_lse=False, deterministic=False):
    out, lse = attention_ref(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p,
                             window=(window_left, window_right), attn_bias=attn_bias, return_lse=True)
    return out, (lse if return_lse else lse.new_empty(0))


def _attention_varlen_without_native(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                     causal=False, window_left=-1, window_right=-1, scale=None, return_lse=False,
                                     deterministic=False):
    out, lse = attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                    scale=scale, dropout_p=dropout_p, window=(window_left, window_right),
                                    return_lse=True)
    return out, (lse if return_lse else lse.new_empty(0))


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------

_attention = _native.public_op("attention", _attention_without_native, "the PyTorch reference")


def _sdpa_torch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


_sdpa = _native.public_op("scaled_dot_product_attention", _sdpa_torch,
                          "torch.nn.functional.scaled_dot_product_attention")
_attention_varlen = _native.public_op("attention_varlen", _attention_varlen_without_native, "the PyTorch reference")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    window: Optional[Tuple[int, int]] = None,
    attn_bias: Optional[Tensor] = None,
    return_lse: bool = False,
    deterministic: bool = False,
):
    """softmax(scale * q k^T + attn_bias, masked) v, per head.

    q: [B, Nq, Hq, D]; k, v: [B, Nk, Hkv, D] with Hq % Hkv == 0 (GQA / MQA: q head h reads kv head
    h // (Hq // Hkv)); any batch / row / head strides (the head_dim elements contiguous). scale: default
    1 / sqrt(D). causal: query i sees key j <= i, TOP-LEFT aligned as F.scaled_dot_product_attention's
    is_causal when Nq != Nk. window: None or (left, right), -1 = unbounded: query i sees keys
    i - left .. i + right. attn_bias: broadcastable to [B, Hq, Nq, Nk]; bool (True = takes part, as SDPA's
    attn_mask) or float (added to scale * q.k; differentiable). dropout_p in [0, 1]: dropout on the
    probabilities (scaled by 1 / (1 - p)), applied whenever > 0 (pass 0 in eval, as with
    F.scaled_dot_product_attention); drawn from torch's default generator for the device (reproducible for a
    seed, CUDA-graph safe); under torch.func.vmap every batch element draws its own mask (vmap's randomness
    argument is not consulted).
    deterministic: a bitwise reproducible dq (slower backward).

    Returns out [B, Nq, Hq, D] in q's dtype, or (out, lse) with lse [B, Hq, Nq] float32, the natural-log
    log-sum-exp of the scaled, biased, masked scores. A row that sees no key: out 0, lse -inf, zero grads.

    Raises RuntimeError (as torch's SDPA) for q, k, v of other ranks, dtypes or devices than each other, heads
    of q not a multiple of k's, unequal head dims, a bias that does not broadcast or is not bool / float, a
    dropout_p outside [0, 1] or window sizes below -1; TypeError for arguments of the wrong type. Inputs
    without a kernel (float32 / float64 on CUDA, other head dims, GPUs before sm_80) run the reference, with
    one UserWarning.
    """
    if type(q) is not Tensor and isinstance(q, Tensor) and q.is_nested:  # (a plain Tensor pays one type check)
        return _nested_attention(q, k, v, causal, scale, dropout_p, window, attn_bias, return_lse)
    wl, wr = (-1, -1) if window is None else window
    out, lse = _attention(q, k, v, attn_bias, dropout_p, causal, wl, wr, scale, return_lse, deterministic)
    return (out, lse) if return_lse else out


def _nested_attention(q, k, v, causal, scale, dropout_p, window, attn_bias, return_lse):
    """Nested (jagged) q / k / v [B, j, H, D]: torch's SDPA takes them, as [B, H, j, D] views."""
    if attn_bias is not None or window is not None or return_lse:
        raise RuntimeError("attention: nested tensors take no attn_bias, window or return_lse (they run "
                           "torch.nn.functional.scaled_dot_product_attention); attention_varlen takes packed sequences")
    if q.is_cuda:
        _native.warn_fallback("attention", "nested tensors have no fused kernel",
                              "torch.nn.functional.scaled_dot_product_attention")
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, dropout_p,
                                         causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    window: Optional[Tuple[int, int]] = None,
    return_lse: bool = False,
    deterministic: bool = False,
):
    """`attention` over packed sequences (FlashAttention's varlen API): q [total_q, Hq, D], k / v
    [total_k, Hkv, D]; cu_seqlens_q / cu_seqlens_k int32 [B + 1], non-decreasing, sequence b being rows
    cu_seqlens[b] .. cu_seqlens[b + 1]; max_seqlen_q / max_seqlen_k at least the longest sequence. Masks
    apply per sequence (top-left aligned within each). cu_seqlens must start at 0, not decrease and end
    within the packed rows: checked for CPU tensors (ValueError); for CUDA ones a check would need a
    device-to-host copy, so, as FlashAttention's varlen API, they are trusted (a longer sequence than
    max_seqlen is cut short; an end past the rows reads out of bounds). Returns out [total_q, Hq, D], or (out, lse) with
    lse [Hq, total_q] float32."""
    wl, wr = (-1, -1) if window is None else window
    out, lse = _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal,
                                 wl, wr, scale, return_lse, deterministic)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """`F.scaled_dot_product_attention`, same signature, semantics and errors, on the fused kernel: query
    [B, Hq, Nq, D], key / value [B, Hkv, Nk, D] (Hkv == Hq unless enable_gqa). Inputs the op does not take
    (not 4-D, a value head dim unlike the query's, attn_mask with is_causal, batch sizes that broadcast,
    dropout_p outside [0, 1], mask dtypes torch may refuse, nested tensors) go to
    F.scaled_dot_product_attention itself, which computes them or raises its own error. The choice and autograd
    happen in C++ (the op `fusedkernels::scaled_dot_product_attention`), on the [B, H, N, D] tensors as they are
    (no transposed views), so a call costs the host about what torch's does. The output is [B, H, N, D] over
    [B, N, H, D] memory, as torch's flash backend returns it."""
    if type(query) is not Tensor and isinstance(query, Tensor) and query.is_nested:  # (one type check)
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
