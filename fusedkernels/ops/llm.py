"""LLM building blocks: rotary position embeddings of q and k in one kernel, their cos / sin table in another,
and a linear layer + cross-entropy loss that never materialises the [tokens, vocab] logits.

`apply_rotary`, `rotary_cos_sin` and `linear_cross_entropy` are the C++ ops `torch.ops.fusedkernels.apply_rotary` /
`apply_rotary_` / `rotary_cos_sin` / `linear_cross_entropy`: argument checks, the choice of kernel, autograd and
autocast happen in C++ (csrc/llm/llm_ops.cpp). CUDA float32 / float16 / bfloat16 inputs run the fused kernels
(csrc/llm); CPU inputs run the references through the same autograd (linear_cross_entropy: the same chunked loop,
its softmax step in PyTorch ops); anything else runs the reference, with one warning per reason. Without the native
module the references below run after the same checks. Algorithms, memory and limits: docs/llm.md.

`apply_rotary_ref`, `rotary_cos_sin_ref` and `linear_cross_entropy_ref` are the specifications the tests hold the
kernels to.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native

__all__ = ["apply_rotary", "apply_rotary_ref", "rotate_half", "rotary_cos_sin", "rotary_cos_sin_ref",
           "linear_cross_entropy", "linear_cross_entropy_ref"]

_LAYOUTS = ("bhnd", "bnhd")
_REDUCTIONS = ("none", "mean", "sum")


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in (t.shape if isinstance(t, Tensor) else t)) + "]"


def _check_dense(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and (t.layout != torch.strided or t.is_nested):
            kind = "nested" if t.is_nested else t.layout
            raise NotImplementedError(f"{op} takes strided (dense) tensors; {name} is {kind}")


def _check_tensor_types(op: str, **tensors) -> None:
    for name, t in tensors.items():
        optional = name in ("position_ids", "bias")
        if not isinstance(t, Tensor) and not (optional and t is None):
            raise TypeError(f"{op}: {name} must be a Tensor{' or None' if optional else ''}, got {type(t).__name__}")


# ------------------------------------------------------------------------------------------------
# Rotary position embeddings
# ------------------------------------------------------------------------------------------------


def rotate_half(x: Tensor, interleaved: bool = False) -> Tensor:
    """(x_a, x_b) -> (-x_b, x_a) for each pair: Hugging Face's rotate_half (pairs (i, i + d/2)), or GPT-J's
    interleaved pairs (2i, 2i + 1)."""
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


def _table_rows(table: Tensor, position_ids: Optional[Tensor], seq_first: bool) -> Tensor:
    """cos / sin rows per token, broadcastable against q / k."""
    rows = table if table.dim() == 3 else table.unsqueeze(0)
    if position_ids is not None:
        ids = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
        rows = table[ids.long()]  # [1 or batch, seq, rotary_dim]
    return rows.unsqueeze(2 if seq_first else 1)


def _rotary_one(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = cos.shape[-1]
    xr, c, s = x[..., :r].to(acc), cos.to(acc), sin.to(acc)
    out = (xr * c + rotate_half(xr, interleaved) * s).to(x.dtype)
    return torch.cat((out, x[..., r:]), -1) if r < x.shape[-1] else out


def apply_rotary_ref(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
                     interleaved: bool = False, layout: str = "bhnd") -> tuple[Tensor, Tensor]:
    """The specification of `apply_rotary`, differentiable: Hugging Face's `q * cos + rotate_half(q) * sin` (and the
    same for k) over the first rotary_dim = cos.shape[-1] elements of each head, the rest passed through, in float32
    (float64 for float64 inputs), returned in q's dtype. Arguments as `apply_rotary`'s (unchecked)."""
    seq_first = layout == "bnhd"
    c, s = _table_rows(cos, position_ids, seq_first), _table_rows(sin, position_ids, seq_first)
    return _rotary_one(q, c, s, interleaved), _rotary_one(k, c, s, interleaved)


# The native ops' argument checks (csrc/llm/llm_ops.cpp: check_rotary_args), raising the same exception types with
# the same messages, for the reference that runs without them.
def _check_rotary_args(op: str, q, k, cos, sin, position_ids, interleaved, layout) -> bool:
    _check_tensor_types(op, q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    if not isinstance(interleaved, bool):
        raise TypeError(f"{op}: interleaved must be a bool, got {type(interleaved).__name__}")
    if not isinstance(layout, str):
        raise TypeError(f"{op}: layout must be a str, got {type(layout).__name__}")
    if layout not in _LAYOUTS:
        raise ValueError(f"{op}: layout must be one of bhnd, bnhd, got '{layout}'")
    seq_first = layout == "bnhd"
    _check_dense(op, q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    dims = "[batch, seq, heads, head_dim]" if seq_first else "[batch, heads, seq, head_dim]"
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise RuntimeError(f"{op}: {name} must be {dims} (layout {layout}), got {_shape(t)}")
    if not q.is_floating_point():
        raise RuntimeError(f"{op}: q must be a floating-point tensor, got {_name(q.dtype)}")
    if k.dtype != q.dtype:
        raise RuntimeError(f"{op}: k must have q's dtype ({_name(q.dtype)}), got {_name(k.dtype)}")
    seq = 1 if seq_first else 2
    if q.shape[0] != k.shape[0] or q.shape[seq] != k.shape[seq] or q.shape[3] != k.shape[3]:
        raise RuntimeError(f"{op}: q and k must share batch, seq and head_dim, got {_shape(q)} and {_shape(k)}")
    if cos.shape != sin.shape:
        raise RuntimeError(f"{op}: cos and sin must have one shape, got {_shape(cos)} and {_shape(sin)}")
    if not cos.is_floating_point() or sin.dtype != cos.dtype:
        raise RuntimeError(f"{op}: cos and sin must be floating-point tensors of one dtype, got {_name(cos.dtype)} "
                           f"and {_name(sin.dtype)}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if cos.dim() < 1:
        raise RuntimeError(f"{op}: cos must be [seq, rotary_dim] or [batch, seq, rotary_dim], got a 0-D tensor")
    r = cos.shape[-1]
    if r % 2 or r < 2 or r > q.shape[3]:
        raise RuntimeError(f"{op}: cos / sin's last dimension (rotary_dim, one value per rotated element) must be even "
                           f"and in [2, head_dim = {q.shape[3]}], got {_shape(cos)}")
    if position_ids is None:
        ok = (cos.dim() == 2 or (cos.dim() == 3 and cos.shape[0] in (1, q.shape[0]))) and cos.shape[-2] == q.shape[seq]
        if not ok:
            raise RuntimeError(f"{op}: cos / sin must be [seq, rotary_dim] or [batch or 1, seq, rotary_dim] for q "
                               f"{_shape(q)} (layout {layout}), got {_shape(cos)}")
        return seq_first
    if cos.dim() != 2:
        raise RuntimeError(f"{op}: with position_ids, cos / sin are tables [positions, rotary_dim], got {_shape(cos)}")
    if position_ids.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(f"{op}: position_ids must be int64 or int32, got {_name(position_ids.dtype)}")
    if position_ids.device != q.device:
        raise RuntimeError(f"{op}: position_ids is on {position_ids.device} but q is on {q.device}")
    ids = position_ids
    if not ((ids.dim() == 1 or (ids.dim() == 2 and ids.shape[0] in (1, q.shape[0]))) and ids.shape[-1] == q.shape[seq]):
        raise RuntimeError(f"{op}: position_ids must be [seq] or [batch or 1, seq] for q {_shape(q)}, got {_shape(ids)}")
    if ids.device.type == "cpu" and ids.numel():  # values cost nothing to read here (CUDA: NaN rows, see docs)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= cos.shape[0]:
            raise IndexError(f"apply_rotary: position_ids must be in [0, {cos.shape[0]}) (the rows of cos / sin), got "
                             f"values in [{low}, {high}]")
    return seq_first


def _rotary_without_native(q, k, cos, sin, position_ids=None, interleaved=False, layout="bhnd"):
    """The reference as the native op runs it (no native module, or a build without the llm family)."""
    if isinstance(q, Tensor) or not hasattr(q, "__torch_function__"):  # (not fx's Proxy)
        _check_rotary_args("apply_rotary", q, k, cos, sin, position_ids, interleaved, layout)
        q_out, k_out = apply_rotary_ref(q, k, cos, sin, position_ids, interleaved, layout)
        return _like(q, q_out), _like(k, k_out)  # in the inputs' memory layout, as the native op's
    return apply_rotary_ref(q, k, cos, sin, position_ids, interleaved, layout)


def _like(t: Tensor, value: Tensor) -> Tensor:
    """value in t's memory layout (the head dim contiguous), differentiably."""
    out = torch.empty_like(t, dtype=value.dtype)
    return value if out.stride(-1) != 1 else out.copy_(value)


def _rotary_inplace_without_native(q, k, cos, sin, position_ids=None, interleaved=False, layout="bhnd"):
    _check_rotary_args("apply_rotary_", q, k, cos, sin, position_ids, interleaved, layout)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):  # (their gradients read q and k)
        q_out, k_out = apply_rotary_ref(q.clone(), k.clone(), cos, sin, position_ids, interleaved, layout)
    else:
        q_out, k_out = apply_rotary_ref(q, k, cos, sin, position_ids, interleaved, layout)
    q.copy_(q_out)
    k.copy_(k_out)


_apply_rotary = _native.public_op("apply_rotary", _rotary_without_native, "the PyTorch reference")
_apply_rotary_ = _native.public_op("apply_rotary_", _rotary_inplace_without_native, "the PyTorch reference")


def apply_rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    position_ids: Optional[Tensor] = None,
    interleaved: bool = False,
    layout: str = "bhnd",
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """Rotary position embeddings (Su et al. 2021, "RoFormer") of q and k, one kernel for both: Hugging Face's
    `apply_rotary_pos_emb(q, k, cos, sin)`, i.e. `q * cos + rotate_half(q) * sin`, over the first rotary_dim
    elements of each head (rotary_dim = cos.shape[-1]; the rest passed through unchanged: partial rotary).

    q: [batch, heads_q, seq, head_dim] (layout="bhnd", what HF's attention passes) or [batch, seq, heads_q,
    head_dim] (layout="bnhd", flash-attn's); k likewise, with its own head count (GQA / MQA); any strides.
    float32 / float16 / bfloat16 (fused kernel on CUDA) or float64; k has q's dtype.
    cos / sin: one value per rotated element, as HF's rotary embedding produces them (both halves of a pair's
    angle present: torch.cat((freqs, freqs), -1).cos()): [seq, rotary_dim] or [batch or 1, seq, rotary_dim];
    with position_ids: tables [positions, rotary_dim] gathered per token. q's dtype or float32 (read in fp32) for
    the fused kernel; another floating dtype works too (CUDA: the reference, one warning), and the outputs are q's
    dtype whatever the table's (HF's products would promote q to a float64 table's dtype: cast q first for that).
    flash-attn-style half tables [seq, rotary_dim / 2] become this form with torch.cat((cos, cos), -1) (or
    cos.repeat_interleave(2, -1) when interleaved).
    position_ids: [seq] or [batch or 1, seq] int64 / int32, the row of cos / sin for each token (packed sequences:
    positions restart per sequence). On CUDA a position outside the table gives NaN for that token's rotated
    elements (the kernel cannot raise without a host sync); on the CPU it raises IndexError.
    interleaved: pairs (2i, 2i + 1) (GPT-J, Meta's original Llama) instead of (i, i + rotary_dim / 2).
    inplace: write q and k and return them. Where no gradient is recorded the kernel writes them directly (inference:
    no new memory); under autograd the result is copied into them, which autograd records (so it saves no memory
    then, and a leaf that requires grad refuses it, as for any in-place op).

    Returns (q_out, k_out) in q's dtype and q's / k's memory layout (out of place; contiguous where that layout
    would leave the head dim strided). Arithmetic in fp32. Differentiable in q and k, to
    any order: the backward is the same kernel with the transposed rotation (rotation by -theta). A cos or sin that
    requires grad (a learned table) runs the differentiable reference, with one warning on CUDA.

    Under torch.func transforms (vmap, grad, jacrev ...) the reference runs (`apply_rotary_ref`), which they transform.

    Raises RuntimeError for shapes, dtypes and devices that do not fit (messages name the argument), ValueError for an
    unknown layout, TypeError for arguments of the wrong type, NotImplementedError for sparse or nested tensors.
    """
    transformed = torch._C._are_functorch_transforms_active()  # vmap, grad ...: the reference, whose ops they know
    if inplace:
        (_rotary_inplace_without_native if transformed else _apply_rotary_)(q, k, cos, sin, position_ids, interleaved,
                                                                            layout)
        return q, k
    return (_rotary_without_native if transformed else _apply_rotary)(q, k, cos, sin, position_ids, interleaved, layout)


def rotary_cos_sin_ref(position_ids: Tensor, inv_freq: Tensor, attention_scaling: float = 1.0,
                       dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """The specification of `rotary_cos_sin`: Hugging Face's LlamaRotaryEmbedding.forward, differentiable in
    inv_freq. Arguments as `rotary_cos_sin`'s (unchecked)."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    angles = torch.cat((freqs, freqs), -1)
    out = dtype or torch.float32
    return (angles.cos() * attention_scaling).to(out), (angles.sin() * attention_scaling).to(out)


def _check_rotary_cos_sin_args(op: str, position_ids, inv_freq, attention_scaling, dtype) -> None:
    _check_tensor_types(op, position_ids=position_ids, inv_freq=inv_freq)
    if isinstance(attention_scaling, bool) or not isinstance(attention_scaling, (int, float)):
        raise TypeError(f"{op}: attention_scaling must be a float, got {type(attention_scaling).__name__}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{op}: dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    _check_dense(op, position_ids=position_ids, inv_freq=inv_freq)
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise RuntimeError(f"{op}: position_ids must be an integer tensor, got {_name(position_ids.dtype)}")
    if inv_freq.dim() != 1 or not inv_freq.is_floating_point():
        raise RuntimeError(f"{op}: inv_freq must be a 1-D floating-point tensor [rotary_dim / 2], got "
                           f"{_name(inv_freq.dtype)} {_shape(inv_freq)}")
    if inv_freq.device != position_ids.device:
        raise RuntimeError(f"{op}: inv_freq is on {inv_freq.device} but position_ids is on {position_ids.device}")
    if dtype is not None and not dtype.is_floating_point:
        raise RuntimeError(f"{op}: dtype must be a floating-point dtype, got {_name(dtype)}")


def _rotary_cos_sin_without_native(position_ids, inv_freq, attention_scaling=1.0, dtype=None):
    """The reference as the native op runs it (no native module, or a build without the llm family)."""
    if isinstance(position_ids, Tensor) or not hasattr(position_ids, "__torch_function__"):  # (not fx's Proxy)
        _check_rotary_cos_sin_args("rotary_cos_sin", position_ids, inv_freq, attention_scaling, dtype)
    return rotary_cos_sin_ref(position_ids, inv_freq, attention_scaling, dtype)


_rotary_cos_sin = _native.public_op("rotary_cos_sin", _rotary_cos_sin_without_native, "the PyTorch reference")


def rotary_cos_sin(position_ids: Tensor, inv_freq: Tensor, *, attention_scaling: float = 1.0,
                   dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """The rotary table of each token's position in one kernel: Hugging Face's rotary embedding
    (`LlamaRotaryEmbedding.forward`, and every model's that computes the same), the (cos, sin) that
    `apply_rotary` and HF's apply_rotary_pos_emb take:

        angles = position_ids[..., None].float() * inv_freq.float()      # fp32, as HF
        cos = (torch.cat((angles, angles), -1).cos() * attention_scaling).to(dtype)     (sin likewise)

    HF's forward runs these as about eight ops (a product, a cat, cos, sin, two scalings, two casts), whose host
    time a training step waits for before its first layer; here one launch writes both tables, equal to HF's bit for
    bit (the same fp32 product and CUDA's accurate cosf / sinf, which PyTorch's kernels call).

    position_ids: integer tensor of any shape ([batch, seq] as HF's models pass it).
    inv_freq: [rotary_dim / 2] floating (HF's `rotary_emb.inv_freq`: base ** (-2i / rotary_dim), after the rope
    type's scaling), read in float32.
    attention_scaling: the factor both tables are multiplied by (HF's `attention_scaling`; 1 except for YaRN-style
    rope types).
    dtype: the tables' dtype (HF: the hidden states'); float32 when None.

    Returns (cos, sin), each [*position_ids.shape, rotary_dim] in dtype (float64 ones computed in float32 and cast,
    as HF does). Never requires grad unless inv_freq does (a learned frequency), which runs the differentiable
    reference, with one warning on CUDA. CPU tensors run `rotary_cos_sin_ref`.

    Raises RuntimeError for a non-integer position_ids, an inv_freq that is not 1-D floating point, tensors on two
    devices or a non-floating dtype; TypeError for arguments of the wrong type; NotImplementedError for sparse or
    nested tensors.
    """
    # (the native entry would take anything with __float__: a tensor's gradient would be lost without a word)
    if type(attention_scaling) not in (float, int) and not isinstance(attention_scaling, float):
        raise TypeError(f"rotary_cos_sin: attention_scaling must be a float, got {type(attention_scaling).__name__}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"rotary_cos_sin: dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    attention_scaling = float(attention_scaling)  # (numpy's float64, a large int: one value on every path)
    if torch._C._are_functorch_transforms_active():  # vmap, grad ...: the reference, whose ops they know
        return _rotary_cos_sin_without_native(position_ids, inv_freq, attention_scaling, dtype)
    return _rotary_cos_sin(position_ids, inv_freq, attention_scaling, dtype)


# ------------------------------------------------------------------------------------------------
# Linear + cross entropy
# ------------------------------------------------------------------------------------------------


def linear_cross_entropy_ref(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                             ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                             z_loss: float = 0.0, softcap: Optional[float] = None, upcast: bool = True) -> Tensor:
    """The specification of `linear_cross_entropy`, differentiable and unchunked (it materialises the logits):
    F.cross_entropy(softcap(F.linear(hidden, weight, bias)), target, ...) plus z_loss * logsumexp^2 per token that
    is not ignored. upcast: the logits in float32 (float64 for float64 inputs) and the loss returned in that type;
    False: every step in the inputs' dtype, as an eager model computes it (torch's own rounding)."""
    logits = F.linear(hidden, weight, bias)
    if upcast:
        logits = logits.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    logits = logits.reshape(-1, logits.shape[-1])
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = target.reshape(-1)
    loss = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + torch.where(flat != ignore_index, z_loss * torch.logsumexp(logits, -1).square(), 0.0)
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (flat != ignore_index).sum()


def _auto_chunk(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk (llm_ops.cpp's auto_chunk): logits about the size of the hidden states, at least 768 rows."""
    rows = -(-(-(-tokens * hidden // vocab)) // 128) * 128
    return max(1, min(tokens, max(rows, 768)))


def _chunk_step(z: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                softcap: Optional[float], lse: Optional[Tensor] = None, scale: Optional[Tensor] = None):
    """The kernel's formulas (csrc/llm/llm.h) on one chunk of float logits: (loss rows, lse rows, d(loss)/d(z) times
    scale, or None without scale). Ignored rows: 0."""
    vocab = z.shape[1]
    valid = target != ignore_index
    c = softcap * torch.tanh(z / softcap) if softcap is not None else z
    if lse is None:
        lse = torch.logsumexp(c, 1)
    safe = torch.where(valid, target, 0).unsqueeze(1)
    e = label_smoothing
    loss = lse - (1 - e) * c.gather(1, safe).squeeze(1) - e / vocab * c.sum(1) + z_loss * lse.square()
    loss, lse = torch.where(valid, loss, 0.0), torch.where(valid, lse, 0.0)
    if scale is None:
        return loss, lse, None
    g = torch.exp(c - lse.unsqueeze(1)) * (1 + 2 * z_loss * lse).unsqueeze(1) - e / vocab
    g.scatter_add_(1, safe, torch.full_like(safe, -(1 - e), dtype=g.dtype))
    if softcap is not None:
        g = g * (1 - (c / softcap).square())
    return loss, lse, torch.where(valid.unsqueeze(1), g * scale.unsqueeze(1), 0.0)


def _mm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ b in out_dtype without rounding to the operands' dtype first (the native op's GEMMs into float32)."""
    if a.dtype == out_dtype:
        return a @ b
    return torch.mm(a, b, out_dtype=out_dtype) if a.is_cuda else a.to(out_dtype) @ b.to(out_dtype)


def _grad_sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dweight sum's and the forward's dhidden's dtype (llm_ops.cpp, grad_sum_type): the inputs', float32 for
    float16 (whose range neither a sum over every token nor a mean's 1/T gradients fit; docs/llm.md)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _accumulate(total: Tensor, a: Tensor, b: Tensor) -> None:
    """total += a @ b in total's dtype, the sum rounded once per call (the native op's addmm)."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    else:
        total += _mm(a, b, total.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The chunked algorithm of the native op in PyTorch ops (docs/llm.md), for builds without it: mean / sum compute
    the gradients in the forward, none recomputes each chunk in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        want = ctx.needs_input_grad[:3] if reduction != "none" else (False, False, False)
        tokens = hidden.shape[0]
        valid = (target != ignore_index).sum().to(acc)
        # dhidden and the dweight sum in _grad_sum_dtype (a float32 one: a mean scales the sums, not dz); dbias in acc
        sums = _grad_sum_dtype(hidden.dtype)
        scale_after = reduction == "mean" and sums != hidden.dtype
        one = torch.ones((), dtype=acc, device=hidden.device)
        grad_scale = torch.where(valid > 0, 1 / valid, 0.0)  # no token counts: zero gradients, as torch's
        scale = (grad_scale if reduction == "mean" and not scale_after else one).expand(chunk)
        loss_rows, lse_rows = [], []
        dh = torch.empty(hidden.shape, dtype=sums, device=hidden.device) if want[0] else None
        dw = torch.zeros(weight.shape, dtype=sums, device=weight.device) if want[1] else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want[2] and bias is not None else None
        for start in range(0, tokens, chunk):
            h = hidden[start:start + chunk]
            z = F.linear(h, weight, bias)
            loss, lse, g = _chunk_step(z.to(acc), target[start:start + chunk], ignore_index, label_smoothing, z_loss,
                                       softcap, scale=scale[:h.shape[0]] if any(want) else None)
            loss_rows.append(loss)
            lse_rows.append(lse)
            if g is None:
                continue
            g = g.to(hidden.dtype)
            if dh is not None:
                dh[start:start + chunk] = _mm(g, weight, sums)
            if dw is not None:
                _accumulate(dw, g.t(), h)
            if db is not None:
                db += g.sum(0, dtype=acc)
        if scale_after:
            for t in (dh, dw, db):
                if t is not None:
                    t.mul_(grad_scale)
        loss = torch.cat(loss_rows) if loss_rows else hidden.new_zeros(0, dtype=acc)
        lse = torch.cat(lse_rows) if lse_rows else hidden.new_zeros(0, dtype=acc)
        ctx.reduction, ctx.chunk = reduction, chunk
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, target, lse)
            return loss
        ctx.grads, ctx.dtype = (dh, dw, db), hidden.dtype
        return loss.sum() if reduction == "sum" else loss.sum() / valid

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduction != "none":
            return tuple(None if g is None else (g * grad).to(ctx.dtype) for g in ctx.grads) + (None,) * 7
        hidden, weight, bias, target, lse = ctx.saved_tensors
        acc = lse.dtype
        want = ctx.needs_input_grad[:3]
        dh = torch.empty_like(hidden) if want[0] else None
        dw = torch.zeros(weight.shape, dtype=_grad_sum_dtype(hidden.dtype), device=weight.device) if want[1] else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want[2] and bias is not None else None
        grad = grad.to(acc)
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start:start + ctx.chunk]
            z = F.linear(h, weight, bias)
            g = _chunk_step(z.to(acc), target[start:start + ctx.chunk], *ctx.options, lse=lse[start:start + ctx.chunk],
                            scale=grad[start:start + ctx.chunk])[2].to(hidden.dtype)
            if dh is not None:
                dh[start:start + ctx.chunk] = g @ weight
            if dw is not None:
                _accumulate(dw, g.t(), h)
            if db is not None:
                db += g.sum(0, dtype=acc)
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype)) + (None,) * 7


# The native op's argument checks (csrc/llm/llm_ops.cpp: parse_reduction, check_lce_args), raising the same exception
# types with the same messages, for the reference that runs without them.
def _check_lce_args(op, hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                    chunk_size) -> None:
    if not isinstance(reduction, str):
        raise TypeError(f"{op}: reduction must be a str, got {type(reduction).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of none, mean, sum, got '{reduction}'")
    _check_dense(op, hidden=hidden, weight=weight, target=target, bias=bias)
    if hidden.dim() < 1:
        raise RuntimeError(f"{op}: hidden must be [..., H] (at least 1-D), got a 0-D tensor")
    if weight.dim() != 2:
        raise RuntimeError(f"{op}: weight must be [V, H] (2-D, nn.Linear's), got {_shape(weight)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"{op}: hidden and weight shapes cannot be multiplied (hidden {_shape(hidden)}, weight "
                           f"{_shape(weight)}): hidden's last dimension must be weight's H")
    if weight.shape[0] < 1:
        raise RuntimeError(f"{op}: weight must have at least one class (row), got {_shape(weight)}")
    if not hidden.is_floating_point():
        raise RuntimeError(f"{op}: hidden must be a floating-point tensor, got {_name(hidden.dtype)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != hidden.dtype:
            raise RuntimeError(f"{op}: {name} must have hidden's dtype ({_name(hidden.dtype)}), got {_name(t.dtype)}")
        if t.device != hidden.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but hidden is on {hidden.device}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(f"{op}: bias must be [V] = [{weight.shape[0]}], got {_shape(bias)}")
    if target.device != hidden.device:
        raise RuntimeError(f"{op}: target is on {target.device} but hidden is on {hidden.device}")
    if target.dtype != torch.int64:
        raise RuntimeError(f"{op}: target must be int64 class indices, got {_name(target.dtype)}")
    if target.shape != hidden.shape[:-1]:
        raise RuntimeError(f"{op}: target must have hidden's leading shape {_shape(hidden.shape[:-1])}, got "
                           f"{_shape(target)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"{op}: label_smoothing must be between 0.0 and 1.0, got {label_smoothing:f}")
    if not (z_loss >= 0.0 and z_loss != float("inf")):
        raise ValueError(f"{op}: z_loss must be finite and >= 0, got {z_loss:f}")
    if softcap is not None and not (0.0 < softcap < float("inf")):
        raise ValueError(f"{op}: softcap must be None or finite and > 0, got {softcap:f}")
    if chunk_size < 0:
        raise ValueError(f"{op}: chunk_size must be >= 0 (0: chosen from the sizes), got {chunk_size}")


def _lce_without_native(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                        z_loss=0.0, softcap=None, chunk_size=0):
    """The chunked algorithm in PyTorch ops, as the native op runs it: its argument types, autocast's casts, its
    checks."""
    op = "linear_cross_entropy"
    _check_tensor_types(op, hidden=hidden, weight=weight, target=target, bias=bias)
    for name, v in (("ignore_index", ignore_index), ("chunk_size", chunk_size)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    hidden, weight, bias = _native.autocast_casts(hidden.device.type, hidden, weight, bias)
    _check_lce_args(op, hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                    chunk_size)
    if torch._C._are_functorch_transforms_active():  # torch.func differentiates ATen's formulas, as the native op
        return linear_cross_entropy_ref(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss,
                                        softcap)  # (its F.cross_entropy raises on a target out of range)
    if hidden.device.type == "cpu":
        bad = (target != ignore_index) & ((target < 0) | (target >= weight.shape[0]))
        if bad.any():
            row = int(bad.reshape(-1).nonzero()[0])
            raise IndexError(f"{op}: target {int(target.reshape(-1)[row])} at position {row} is out of bounds for "
                             f"{weight.shape[0]} classes (and is not ignore_index)")
    h = hidden.reshape(-1, hidden.shape[-1])
    tokens = h.shape[0]
    chunk = min(chunk_size, max(tokens, 1)) if chunk_size else _auto_chunk(tokens, h.shape[1], weight.shape[0])
    loss = _ChunkedLinearCrossEntropy.apply(h, weight, bias, target.reshape(-1), ignore_index, reduction,
                                            float(label_smoothing), float(z_loss), softcap, chunk)
    return loss.reshape(target.shape) if reduction == "none" else loss


_linear_cross_entropy = _native.public_op("linear_cross_entropy", _lce_without_native, "the chunked PyTorch reference")


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: int = 0,
) -> Tensor:
    """F.cross_entropy(F.linear(hidden, weight, bias), target, ...) without the [tokens, vocab] logits: a language
    model's output layer and loss in chunks of tokens.

    hidden: [..., H] float32 / float16 / bfloat16 (fused on CUDA) or float64; weight: [V, H] as nn.Linear (an LM
    head) stores it; bias: [V] or None; all one dtype. target: int64 class indices of shape hidden.shape[:-1];
    ignore_index rows contribute nothing. reduction: "mean" (over the tokens not ignored: all ignored gives NaN, as
    torch), "sum" or "none" (per token, target's shape, 0 for ignored tokens). label_smoothing: torch's (the target
    distribution (1 - e) onehot + e / V, on tokens not ignored). z_loss: adds z_loss * logsumexp(logits)^2 per token
    not ignored (PaLM, Chowdhery et al. 2022, section 5: 1e-4), inside the returned loss. softcap: logits ->
    softcap * tanh(logits / softcap) before the softmax (Gemma 2's final logit soft-capping, 30.0). chunk_size:
    tokens per chunk, 0 = logits about as large as hidden (and at least 768 rows).

    Returns the loss in float32 (float64 for float64 inputs), the fp32 value before any rounding (as Liger-Kernel;
    F.cross_entropy on bf16 logits returns bf16: `.to(hidden.dtype)` for that). Under autocast hidden, weight and bias
    are cast as F.linear's. Per chunk: logits = h W^T + b (PyTorch's GEMM, the inputs' dtype as F.linear's output),
    then one kernel computes each row's logsumexp, loss and, when a gradient is needed, d(loss)/d(logits) over the
    chunk in place; then dhidden = dz W and dweight += dz^T h (PyTorch GEMMs accumulating in fp32; for bfloat16 the
    dweight sum is kept in bfloat16 and so rounded once per chunk, as Liger-Kernel's: `chunk_size=tokens` rounds once,
    at the cost of the whole logits; float16 keeps float32 sums, docs/llm.md). mean / sum compute the gradients during
    the forward (nothing but them is kept for the backward, which scales them by the loss's grad, in place where
    nothing else sees them); none keeps hidden and the logsumexp and recomputes each chunk's logits in the backward
    (8 T H V FLOPs instead of 6). Deterministic (no atomics; the same reduction order every call).

    Raises RuntimeError for shapes, dtypes and devices that do not fit, a target not int64, label_smoothing outside
    [0, 1]; ValueError for an unknown reduction, a negative z_loss, a softcap <= 0, a negative chunk_size; TypeError for
    arguments of the wrong type; NotImplementedError for sparse or nested tensors, forward-mode AD, and a backward
    that is itself differentiated (create_graph=True). A target outside [0, V) that is not ignore_index raises
    IndexError on the CPU; on CUDA its token's loss and gradients are NaN (no host sync). Under torch.func transforms
    (grad, vjp, vmap) the unchunked reference runs (`linear_cross_entropy_ref`: it builds the logits), whose ATen
    formulas the transforms differentiate.
    """
    run = _lce_without_native if torch._C._are_functorch_transforms_active() else _linear_cross_entropy
    return run(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size)
