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
    # differentiable (its gradient in the scores is p), and -inf with a zero gradient where a row sees no key
    empty_row = l == 0
    lse = torch.where(empty_row, float("-inf"), torch.log(torch.where(empty_row, 1.0, l)) + m).squeeze(-1).float()
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
# native ops' positional arguments, argument checks and results.


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_types(op: str, names: Tuple[str, ...], kinds: str, args) -> None:
    """The schema's types, as the native op's Python entry point checks them (csrc/common/python/fast_call.h):
    kinds has one letter per argument: T Tensor, t Tensor or None, f float, F float or None, b bool, i int."""
    for position, (name, kind, a) in enumerate(zip(names, kinds, args), 1):
        # (objects taking part in __torch_function__, as fx's Proxy, pass on, as the entry point lets them)
        if kind == "T":
            ok, want = hasattr(a, "__torch_function__"), "Tensor"
        elif kind == "t":
            ok, want = a is None or hasattr(a, "__torch_function__"), "Tensor?"
        elif kind in "fF":
            ok = isinstance(a, (int, float)) or (kind == "F" and a is None)
            want = "float" if kind == "f" else "float?"
        elif kind == "b":
            ok, want = isinstance(a, bool), "bool"
        else:
            ok, want = isinstance(a, int) and not isinstance(a, bool), "int"
        if not ok:
            raise TypeError(f"{op}(): argument '{name}' (position {position}) must be {want}, not {type(a).__name__}")


# The native ops' checks (csrc/attention/attention_ops.cpp: check_qkv, check_options, check_bias,
# check_cu_seqlens, check_cu_seqlens_values), the same exception types with the same messages.
def _check_qkv(op: str, q, k, v, dims: int) -> None:
    layout = "[batch, seqlen, heads, head_dim]" if dims == 4 else "[total, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != dims:
            raise RuntimeError(f"{op}: {name} must be {layout} ({dims}-D), got {list(t.shape)}")
    if not q.is_floating_point():
        raise RuntimeError(f"{op}: q must be a floating-point tensor (float16 or bfloat16 for the fused kernel), got "
                           f"{_name(q.dtype)}")
    if not k.dtype == v.dtype == q.dtype:
        raise RuntimeError(f"{op}: q, k and v must have the same dtype, got {_name(q.dtype)}, {_name(k.dtype)} and "
                           f"{_name(v.dtype)}")
    if not k.device == v.device == q.device:
        raise RuntimeError(f"{op}: q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    row = dims - 3
    ok = k.shape[row] == v.shape[row] and k.shape[-2] == v.shape[-2]
    if dims == 4:
        ok = ok and k.shape[0] == v.shape[0] == q.shape[0]
    if not ok:
        qs_batch = " (and q's batch)" if dims == 4 else ""
        raise RuntimeError(f"{op}: k and v must have the same batch, length and heads{qs_batch}, got q "
                           f"{list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if not q.shape[-1] == k.shape[-1] == v.shape[-1]:
        raise RuntimeError(f"{op}: q, k and v must have the same head_dim, got {list(q.shape)}, {list(k.shape)}, "
                           f"{list(v.shape)}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if not (hq == hkv == 0 or (hkv > 0 and hq % hkv == 0)):
        raise RuntimeError(f"{op}: the heads of q ([{hq}]) must be a multiple of the heads of k and v ([{hkv}])")


def _check_options(op: str, dropout_p: float, window_left: int, window_right: int) -> None:
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"{op}: dropout_p must be in [0, 1], got {dropout_p:f}")
    if window_left < -1 or window_right < -1:
        raise RuntimeError(f"{op}: window sizes must be >= 0, or -1 for unbounded, got ({window_left}, {window_right})")


def _check_bias(op: str, bias, q, k) -> None:
    if bias.device != q.device:
        raise RuntimeError(f"{op}: attn_bias is on {bias.device} but q is on {q.device}")
    if bias.dtype != torch.bool and not bias.is_floating_point():
        raise RuntimeError(f"{op}: attn_bias must be bool or floating-point, got {_name(bias.dtype)}")
    full = [q.shape[0], q.shape[2], q.shape[1], k.shape[1]]
    if bias.dim() > 4 or any(size not in (1, want) for size, want in zip(reversed(bias.shape), reversed(full))):
        raise RuntimeError(f"{op}: attn_bias must be broadcastable to [batch, heads_q, seqlen_q, seqlen_k] = {full}, "
                           f"got {list(bias.shape)}")


def _check_cu_seqlens(op: str, cu_q, cu_k, q, max_q: int, max_k: int) -> None:
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if t.dtype != torch.int32 or t.dim() != 1:
            raise RuntimeError(f"{op}: {name} must be int32 [batch + 1], got {_name(t.dtype)} {list(t.shape)}")
        if t.device != q.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if cu_q.shape[0] != cu_k.shape[0] or cu_q.shape[0] < 1:
        raise RuntimeError(f"{op}: cu_seqlens_q and cu_seqlens_k must both have batch + 1 >= 1 elements, got "
                           f"{list(cu_q.shape)} and {list(cu_k.shape)}")
    if max_q < 0 or max_k < 0:
        raise RuntimeError(f"{op}: max_seqlen_q and max_seqlen_k must be >= 0")


def _check_cu_seqlens_values(name: str, cu, rows: int, max_seqlen: int) -> None:
    """Varlen's contract, checked on CPU only (on CUDA it would cost a device-to-host copy)."""
    c = cu.tolist()
    if c[0] != 0:
        raise ValueError(f"attention_varlen: {name} must start at 0, got {c[0]}")
    for b, (start, end) in enumerate(zip(c, c[1:])):
        if end < start:
            raise ValueError(f"attention_varlen: {name} must be non-decreasing, got {start} then {end}")
        if end - start > max_seqlen:
            raise ValueError(f"attention_varlen: sequence {b} has {end - start} rows, more than max_seqlen "
                             f"({max_seqlen}) for {name}")
    if c[-1] > rows:
        raise ValueError(f"attention_varlen: {name} ends at {c[-1]} but the packed tensor has {rows} rows")


_ATTENTION_ARGS = ("q", "k", "v", "attn_bias", "dropout_p", "causal", "window_left", "window_right", "scale",
                   "return_lse", "deterministic")
_VARLEN_ARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p", "causal",
                "window_left", "window_right", "scale", "return_lse", "deterministic")


def _attention_without_native(q, k, v, attn_bias=None, dropout_p=0.0, causal=False, window_left=-1,
                              window_right=-1, scale=None, return_lse=False, deterministic=False):
    args = (q, k, v, attn_bias, dropout_p, causal, window_left, window_right, scale, return_lse, deterministic)
    _check_types("attention", _ATTENTION_ARGS, "TTTtfbiiFbb", args)
    q, k, v, attn_bias = _native.autocast_casts(q.device.type, q, k, v, attn_bias)
    _check_qkv("attention", q, k, v, 4)
    _check_options("attention", dropout_p, window_left, window_right)
    if attn_bias is not None:
        _check_bias("attention", attn_bias, q, k)
    if dropout_p == 1.0:  # every probability dropped: zeros and zero grads (the reference's 1 / (1 - p) is inf)
        out, lse = _attention_without_native(q, k, v, attn_bias, 0.0, *args[5:])
        return out * 0, lse
    if q.shape[2] == 0:  # no heads: empty results, as torch's SDPA
        return q.contiguous() * 0, q.new_empty((q.shape[0], 0, q.shape[1]), dtype=torch.float32)
    out, lse = attention_ref(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p,
                             window=(window_left, window_right), attn_bias=attn_bias, return_lse=True)
    return out, (lse if return_lse else lse.new_empty(0))


def _attention_varlen_without_native(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                     causal=False, window_left=-1, window_right=-1, scale=None, return_lse=False,
                                     deterministic=False):
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, window_left,
            window_right, scale, return_lse, deterministic)
    _check_types("attention_varlen", _VARLEN_ARGS, "TTTTTiifbiiFbb", args)
    q, k, v = _native.autocast_casts(q.device.type, q, k, v)
    _check_qkv("attention_varlen", q, k, v, 3)
    _check_options("attention_varlen", dropout_p, window_left, window_right)
    _check_cu_seqlens("attention_varlen", cu_seqlens_q, cu_seqlens_k, q, max_seqlen_q, max_seqlen_k)
    if dropout_p == 1.0:  # every probability dropped: zeros and zero grads (the reference's 1 / (1 - p) is inf)
        out, lse = _attention_varlen_without_native(*args[:7], 0.0, *args[8:])
        return out * 0, lse
    if q.shape[1] == 0:
        raise RuntimeError("attention_varlen: q, k and v need heads")
    if q.device.type == "cpu":
        _check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
        _check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
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
    log-sum-exp of the scaled, biased, masked scores, differentiable (its gradient in the scores is the
    probabilities, which the backward adds at no extra pass: dsum - dlse), for z-losses and merging partial
    attentions. A row that sees no key: out 0, lse -inf, zero grads.

    Raises RuntimeError (as torch's SDPA) for q, k, v of other ranks, dtypes or devices than each other, heads
    of q not a multiple of k's, unequal head dims, a bias that does not broadcast or is not bool / float, a
    dropout_p outside [0, 1] or window sizes below -1; TypeError for arguments of the wrong type (window: not
    None or a pair of ints). Inputs without a kernel (float32 / float64 on CUDA, other head dims, GPUs before
    sm_80) run the reference, with one UserWarning.
    """
    if type(q) is not Tensor and isinstance(q, Tensor) and q.is_nested:  # (a plain Tensor pays one type check)
        return _nested_attention(q, k, v, causal, scale, dropout_p, window, attn_bias, return_lse)
    wl, wr = (-1, -1) if window is None else _window_pair("attention", window)
    out, lse = _attention(q, k, v, attn_bias, dropout_p, causal, wl, wr, scale, return_lse, deterministic)
    return (out, lse) if return_lse else out


_INT64_MAX = 2**63 - 1


def _window_pair(op: str, window) -> Tuple[int, int]:
    """(left, right) from a window argument, or TypeError. A size past int64 is -1 (a window wider than any
    sequence is unbounded: the same mask); one below int64's range raises as a size below -1 does. The op
    checks the rest (types, sizes below -1)."""
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"{op}: window must be None or a pair (left, right) of ints (-1: unbounded), got {window!r}")
    ints = [isinstance(w, int) and not isinstance(w, bool) for w in window]
    if any(i and w < -_INT64_MAX for i, w in zip(ints, window)):
        raise RuntimeError(f"{op}: window sizes must be >= 0, or -1 for unbounded, got {tuple(window)}")
    left, right = (-1 if i and w > _INT64_MAX else w for i, w in zip(ints, window))
    return left, right


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
    lse [Hq, total_q] float32 (differentiable, as attention's)."""
    wl, wr = (-1, -1) if window is None else _window_pair("attention_varlen", window)
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
    *,
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
