"""FusedMultiheadAttention (a drop-in `torch.nn.MultiheadAttention`) and FusedSelfAttention (one fused QKV
projection, GQA, causal / sliding window), both computing attention with `fusedkernels.ops.attention`.

FusedMultiheadAttention subclasses nn.MultiheadAttention: same constructor, parameters and state_dict, and
`isinstance(m, nn.MultiheadAttention)` still holds, so an existing module can switch class in place
(`m.__class__ = FusedMultiheadAttention`). Its forward takes the fused path when torch would return no
weights (`need_weights=False`, as nn.TransformerEncoderLayer / DecoderLayer call it) and the op can take the
input: CPU tensors (the op's reference math, as every fusedkernels op on CPU) and CUDA tensors with a kernel
(float16 / bfloat16, also through autocast; head dims 32, 64, 96, 128, 256). Everything else is
nn.MultiheadAttention.forward itself: need_weights=True (torch's default: the weights exist only there),
nested tensors, inputs it would reject (it raises its own errors), and CUDA inputs without a kernel (one
warning). Never a different answer: the fused path follows F.multi_head_attention_forward step by step.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _native
from .. import ops
from ..ops.attention import _window_pair

__all__ = ["FusedMultiheadAttention", "FusedSelfAttention"]

_KERNEL_HEAD_DIMS = (32, 64, 96, 128, 256)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _effective_dtype(x: Tensor) -> torch.dtype:
    """The dtype the projections hand to attention: the autocast dtype under autocast, else x's."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) and x.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _no_kernel_reason(x: Tensor, head_dim: int) -> Optional[str]:
    """None when fusedkernels.ops.attention takes x without falling back: CPU (its reference is the CPU
    path of every fusedkernels op) or CUDA with a kernel. Else why not (for the one warning)."""
    if x.device.type == "cpu":
        return None
    if x.device.type != "cuda":
        return f"{x.device.type} tensors have no fused kernel"
    if not _native.has_op("attention"):
        return "the native attention op is not in this build"
    dtype = _effective_dtype(x)
    if dtype not in _KERNEL_DTYPES:
        return f"{dtype} has no fused kernel (float16 / bfloat16 have)"
    if head_dim not in _KERNEL_HEAD_DIMS:
        return f"head_dim {head_dim} has no fused kernel (32, 64, 96, 128, 256 have)"
    if torch.cuda.get_device_capability(x.device)[0] < 8:
        return "GPUs before compute capability 8.0 have no fused kernel"
    return None


def _is_mask_type(m: Optional[Tensor]) -> bool:
    return m is None or m.dtype == torch.bool or torch.is_floating_point(m)


def _as_float_mask(m: Tensor, dtype: torch.dtype) -> Tensor:
    """torch's F._canonical_mask: a bool mask (True = masked out) becomes 0 / -inf in `dtype`."""
    if m.dtype == torch.bool:
        return torch.zeros_like(m, dtype=dtype).masked_fill_(m, float("-inf"))
    return m


class FusedMultiheadAttention(nn.MultiheadAttention):
    """`torch.nn.MultiheadAttention` whose attention runs on fusedkernels.ops.attention.

    Same arguments, parameters, state_dict and forward as torch's module. The fused path needs
    `need_weights=False`: with torch's default `need_weights=True` the attention weights are asked for, and
    they are computed exactly as torch does (by nn.MultiheadAttention.forward). See the module docstring for
    which inputs take the fused path; the others run torch's forward, so results never differ beyond
    rounding, except that dropout (training mode) draws its own random numbers.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if not need_weights and self._fused_path_takes(query, key, value, key_padding_mask, attn_mask, is_causal):
            return self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal), None
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)

    # -- which inputs the fused path takes ------------------------------------------------------------------

    def _fused_path_takes(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> bool:
        """True when the fused path computes what torch's forward would; False hands the call to torch's
        forward (which also raises torch's errors for inputs it refuses)."""
        if torch.jit.is_scripting() or any(t.is_nested for t in (query, key, value)):
            return False
        if not (_is_mask_type(key_padding_mask) and _is_mask_type(attn_mask)):
            return False
        if any(m is not None and m.dtype not in (torch.bool, torch.float32, _effective_dtype(query))
               for m in (key_padding_mask, attn_mask)):
            return False  # torch's SDPA refuses other float mask dtypes: its forward raises that error
        if is_causal and attn_mask is None:
            return False  # torch raises: the hint needs the mask
        nd = query.dim()
        if nd not in (2, 3) or key.dim() != nd or value.dim() != nd:
            return False
        if (self.bias_k is None) != (self.bias_v is None):
            return False
        if query.shape[-1] != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            return False
        if key.shape[:-1] != value.shape[:-1]:
            return False
        if nd == 3:
            b_dim = 0 if self.batch_first else 1
            if key.shape[b_dim] != query.shape[b_dim]:
                return False
            bsz, tgt, src = query.shape[b_dim], query.shape[1 - b_dim], key.shape[1 - b_dim]
        else:
            bsz, tgt, src = 1, query.shape[0], key.shape[0]
        if key_padding_mask is not None and key_padding_mask.shape != ((bsz, src) if nd == 3 else (src,)):
            return False
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt, src):
                    return False
            elif attn_mask.dim() != 3 or attn_mask.shape != (bsz * self.num_heads, tgt, src):
                return False
        head_dim = self.embed_dim // self.num_heads
        if head_dim * self.num_heads != self.embed_dim:
            return False
        why = _no_kernel_reason(query, head_dim)
        if why is not None:
            _native.warn_fallback("nn.FusedMultiheadAttention", why, "torch.nn.MultiheadAttention.forward")
            return False
        return True

    # -- the fused path: F.multi_head_attention_forward with SDPA replaced by ops.attention -------------------

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """q, k, v [.., E] as torch's in-projection computes them (one GEMM for self-attention, two when
        key is value), as views of the GEMM outputs."""
        E = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if not self._qkv_same_embed_dim:
            bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        if query is key and key is value:
            return F.linear(query, w, b).chunk(3, dim=-1)
        if key is value:
            q = F.linear(query, w[:E], b[:E] if b is not None else None)
            k, v = F.linear(key, w[E:], b[E:] if b is not None else None).chunk(2, dim=-1)
            return q, k, v
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _fused_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> Tensor:
        batched = query.dim() == 3
        H, E = self.num_heads, self.embed_dim
        D = E // H
        mismatched = (key_padding_mask is not None and attn_mask is not None
                      and key_padding_mask.dtype != attn_mask.dtype)
        if mismatched:  # as torch's F._canonical_mask says it
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for "
                          "both instead.", stacklevel=3)
        mask_dtype = query.dtype  # torch turns bool masks into 0 / -inf of the input's dtype
        q, k, v = self._project(query, key, value)
        # batch-first views [B, N, E] of the projections: no copies
        if not batched:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        B, L = q.shape[0], q.shape[1]

        # is_causal is a hint that attn_mask is the causal mask: without a key padding mask, torch's forward
        # (need_weights=False) drops attn_mask and runs SDPA with is_causal; with one, it merges both masks.
        causal = False
        if is_causal and key_padding_mask is None:
            attn_mask, causal = None, True
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.dim() == 2 else attn_mask.reshape(B, H, L, -1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.reshape(B, 1, 1, -1)

        def extend_keys(k, v, k_extra, v_extra, attn_mask, key_padding_mask):
            k, v = torch.cat([k, k_extra], dim=1), torch.cat([v, v_extra], dim=1)
            # torch pads the masks with 0 (float) / False (bool): the new key takes part
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
            return k, v, attn_mask, key_padding_mask

        if self.bias_k is not None:
            k, v, attn_mask, key_padding_mask = extend_keys(
                k, v, self.bias_k.to(k.dtype).expand(B, 1, E), self.bias_v.to(v.dtype).expand(B, 1, E),
                attn_mask, key_padding_mask)
        if self.add_zero_attn:
            k, v, attn_mask, key_padding_mask = extend_keys(
                k, v, k.new_zeros(B, 1, E), v.new_zeros(B, 1, E), attn_mask, key_padding_mask)

        # one bias: bool (True = takes part) when every mask given is bool, else torch's float sum
        masks = [m for m in (attn_mask, key_padding_mask) if m is not None]
        if not masks:
            bias = None
        elif all(m.dtype == torch.bool for m in masks):
            bias = ~masks[0] if len(masks) == 1 else ~(masks[0] | masks[1])
        else:
            bias = _as_float_mask(masks[0], mask_dtype)
            if len(masks) == 2:
                bias = bias + _as_float_mask(masks[1], mask_dtype)
            bias = bias.to(q.dtype)

        out = ops.attention(
            q.unflatten(-1, (H, D)), k.unflatten(-1, (H, D)), v.unflatten(-1, (H, D)),
            causal=causal, dropout_p=self.dropout if self.training else 0.0, attn_bias=bias,
        )  # [B, L, H, D]
        if not batched:
            return self.out_proj(out.reshape(L, E))
        if self.batch_first:
            return self.out_proj(out.reshape(B, L, E))
        # torch returns a contiguous (L, B, E) here
        return self.out_proj(out.transpose(0, 1).reshape(L, B, E))


class FusedSelfAttention(nn.Module):
    """Self-attention with one fused QKV projection: x -> Linear -> q, k, v -> fusedkernels.ops.attention ->
    Linear.

    Args:
        embed_dim: model width E (= num_heads * head_dim).
        num_heads: query heads.
        num_kv_heads: key / value heads (GQA / MQA); default num_heads. Must divide num_heads.
        bias: biases on both projections.
        dropout: attention-probability dropout, in training mode only.
        causal: query i sees keys j <= i.
        window: None or (left, right) (-1 unbounded): query i sees keys i - left .. i + right.
        batch_first: x is [B, N, E] (default) or [N, B, E]; a 2-D x is one unbatched sequence [N, E].

    Parameters are named as nn.MultiheadAttention's (`in_proj_weight` [(Hq + 2 Hkv) * D, E] holding q, k, v
    rows in that order, `in_proj_bias`, `out_proj.weight`, `out_proj.bias`), so with num_kv_heads equal to
    num_heads the state dicts of the two load into each other; `from_torch(mha)` builds one from an
    nn.MultiheadAttention.

    forward(x, key_padding_mask=None, attn_bias=None) -> Tensor of x's shape. key_padding_mask: [B, N] with
    nn.MultiheadAttention's meaning (bool True = padding, ignored; float added). attn_bias: broadcastable to
    [B, Hq, N, N] with fusedkernels.ops.attention's meaning (bool True = takes part; float added to scores).
    q, k and v reach the op as [B, N, H, D] views of the projection's output: no copies. Raises ValueError for
    a key_padding_mask of another shape or a non-bool, non-float dtype.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None, bias: bool = True,
                 dropout: float = 0.0, causal: bool = False, window: Optional[Tuple[int, int]] = None,
                 batch_first: bool = True, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"FusedSelfAttention: {name} must be an int, got {value!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"FusedSelfAttention: causal must be a bool, got {causal!r}")
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} and "
                             f"num_heads={num_heads}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout, self.causal, self.batch_first = dropout, causal, batch_first
        if window is not None:
            if (not isinstance(window, (tuple, list)) or len(window) != 2
                    or any(not isinstance(w, int) or isinstance(w, bool) for w in window)):
                raise TypeError(f"FusedSelfAttention: window must be None or a pair (left, right) of ints, got {window}")
            if any(w < -1 for w in window):
                raise ValueError(f"FusedSelfAttention: window sizes must be >= -1 (-1: unbounded), got {tuple(window)}")
            window = _window_pair("FusedSelfAttention", window)
        self.window = window
        factory = {"device": device, "dtype": dtype}
        qkv_dim = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(qkv_dim, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(qkv_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, *, causal: bool = False,
                   window: Optional[Tuple[int, int]] = None) -> "FusedSelfAttention":
        """A FusedSelfAttention holding a copy of an nn.MultiheadAttention's weights (same device and dtype,
        dropout and batch_first). The MHA must use one embed dim for q, k, v and neither add_bias_kv nor
        add_zero_attn."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("FusedSelfAttention.from_torch: the MultiheadAttention must have kdim = vdim = "
                             "embed_dim, no add_bias_kv and no add_zero_attn")
        w = mha.in_proj_weight
        m = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, dropout=mha.dropout,
                causal=causal, window=window, batch_first=mha.batch_first, device=w.device, dtype=w.dtype)
        m.load_state_dict(mha.state_dict())
        return m

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None) -> Tensor:
        if x.dim() not in (2, 3):
            raise ValueError(f"FusedSelfAttention: x must be [batch, seq, embed_dim] (batch_first), [seq, batch, "
                             f"embed_dim] or unbatched [seq, embed_dim], got {x.dim()} dimensions")
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(0)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:
            x = x.transpose(0, 1)
        B, N, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        bias = self._merge_masks(key_padding_mask, attn_bias, B, N, qkv.dtype)
        out = ops.attention(
            q.unflatten(-1, (H, D)), k.unflatten(-1, (Hkv, D)), v.unflatten(-1, (Hkv, D)),
            causal=self.causal, window=self.window, attn_bias=bias,
            dropout_p=self.dropout if self.training else 0.0,
        ).flatten(-2)  # [B, N, E]
        out = self.out_proj(out)
        if not batched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)

    @staticmethod
    def _merge_masks(key_padding_mask, attn_bias, B, N, dtype):
        if key_padding_mask is None:
            return attn_bias
        if key_padding_mask.dtype != torch.bool and not torch.is_floating_point(key_padding_mask):
            raise ValueError(f"FusedSelfAttention: key_padding_mask must be bool or floating-point, got "
                             f"{key_padding_mask.dtype}")
        if key_padding_mask.shape != (B, N):
            raise ValueError(f"FusedSelfAttention: key_padding_mask must have shape (batch, seq) = {(B, N)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        kpm = key_padding_mask.reshape(B, 1, 1, N)
        if kpm.dtype == torch.bool and (attn_bias is None or attn_bias.dtype == torch.bool):
            keep = ~kpm
            return keep if attn_bias is None else keep & attn_bias
        kpm = _as_float_mask(kpm, dtype).to(dtype)
        if attn_bias is None:
            return kpm
        if attn_bias.dtype == torch.bool:
            attn_bias = torch.zeros_like(attn_bias, dtype=dtype).masked_fill_(~attn_bias, float("-inf"))
        return attn_bias.to(dtype) + kpm

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}"
        s += f", bias={self.in_proj_bias is not None}, dropout={self.dropout}, causal={self.causal}"
        if self.window is not None:
            s += f", window={self.window}"
        return s + f", batch_first={self.batch_first}"
