"""Hugging Face transformers: `attn_implementation="fusedkernels"` runs a model's attention on
fusedkernels.ops.attention.

    import fusedkernels.integrations.transformers as fk_hf
    fk_hf.register()                    # once per process; needs transformers 4.48 or newer
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fusedkernels", dtype=torch.bfloat16)
    # or, on a built model: model.set_attn_implementation("fusedkernels")

`register()` puts `attention_forward` into transformers' AttentionInterface (ALL_ATTENTION_FUNCTIONS before
4.51) and, where transformers has one (masking_utils, >= 4.53), gives the name the mask builder "sdpa" uses:
models then hand this function exactly the masks they hand SDPA (None for a plain causal or unpadded
bidirectional batch, else a 4-D bool mask with padding, sliding window, packed sequences or cache offsets
already in it; older versions build 4-D float masks, taken as they are). transformers is imported only inside
`register()` and `attention_forward`'s fallback: `import fusedkernels` never needs it.

`attention_forward` has the calling convention of transformers' `sdpa_attention_forward`: (module, query,
key, value, attention_mask, dropout, scaling, sliding_window, is_causal, **kwargs) with query [B, Hq, Nq, D],
key / value [B, Hkv, Nk, D]; returns (attn_output [B, Nq, Hq, D], None). Differences from SDPA's path:
GQA / MQA run natively (key / value are never repeated), the [B, N, H, D] views go to the op without copies,
and a query row that sees no key gives 0 (SDPA's math path gives 0 too; some of its CUDA kernels NaN).

Where the op has no fused kernel for a CUDA input (float32 / float64 without autocast, head dims other than
32, 64, 96, 128, 256, no native module) or the call needs what the op does not take (value head dim unlike
the query's, as in MLA; a BlockMask), the call runs transformers' own `sdpa_attention_forward` (one warning
for the kernel cases). softcap and attention sinks (s_aux) raise, as the sdpa path cannot honour them either.
CPU tensors run the op's reference (fp32 math), as every fusedkernels op does on CPU.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _native, ops
from ..nn.attention import _no_kernel_reason

__all__ = ["NAME", "register", "attention_forward"]

NAME = "fusedkernels"
_warned_output_attentions = False


def register(name: str = NAME) -> str:
    """Register `attention_forward` (and the SDPA mask builder) under `name` with transformers, so that
    `attn_implementation=name` works for every model that dispatches through AttentionInterface (Llama,
    Mistral, Qwen, Gemma, recent BERT, ... : those with `_supports_attention_backend`). Idempotent. Returns name."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        try:  # 4.48 - 4.50: a plain dict
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        except ImportError as e:
            raise ImportError(
                "fusedkernels.integrations.transformers.register() needs transformers 4.48 or newer "
                f"(ALL_ATTENTION_FUNCTIONS / AttentionInterface): {e}"
            ) from e
        ALL_ATTENTION_FUNCTIONS[name] = attention_forward
    else:
        AttentionInterface.register(name, attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        # Before masking_utils (4.48 - 4.52) models built their masks themselves: a 4-D float mask (or None
        # for sdpa alone), which attention_forward takes as it is.
        pass
    else:
        # Without a registered mask function transformers hands custom implementations no mask at all.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name


def _sdpa_attention_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _unsupported(query: Tensor, key: Tensor, value: Tensor, attention_mask) -> Optional[tuple[str, bool]]:
    """(why, warn) when the call goes to transformers' sdpa_attention_forward, else None."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "inputs are not 4-D", False
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        return f"the mask is a {type(attention_mask).__name__}", False
    if key.shape[-1] != query.shape[-1] or value.shape[-1] != query.shape[-1]:
        return "query, key and value head dims differ", False
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0:
        return "query heads are not a multiple of key / value heads", False
    why = _no_kernel_reason(query, query.shape[-1])
    if why is not None:
        return why, True
    return None


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function convention (see the module docstring) on fusedkernels.ops.attention.

    attention_mask: None, or 4-D [B or 1, 1 or Hq, Nq, >= Nk] (bool True = takes part, or float added to the
    scores, as SDPA's attn_mask). is_causal: the module's `is_causal` when None; used, as in SDPA's path, only
    without a mask and for more than one query (decoding one token sees the whole cache). sliding_window:
    HF's meaning (a query sees itself and the sliding_window - 1 keys before it); the masks transformers builds
    already hold it, so it is applied only on the unmasked causal path. position_bias (kwargs): a float bias
    [B or 1, Hq, Nq, Nk] added to the scores, merged with the mask as SDPA's path does."""
    global _warned_output_attentions
    if kwargs.get("softcap") is not None:
        raise ValueError("`fusedkernels` attention does not support `softcap`; use `eager` or `flex_attention`")
    if kwargs.get("s_aux") is not None:
        raise ValueError("`fusedkernels` attention does not support attention sinks (`s_aux`); use `eager`")
    if kwargs.get("output_attentions", False) and not _warned_output_attentions:
        _warned_output_attentions = True
        warnings.warn("`fusedkernels` attention does not return attention weights (output_attentions=True); "
                      "use attn_implementation='eager' for them", UserWarning, stacklevel=2)

    unsupported = _unsupported(query, key, value, attention_mask)
    if unsupported is not None:
        why, warn = unsupported
        if warn:
            _native.warn_fallback("integrations.transformers", why, "transformers' sdpa_attention_forward")
        return _sdpa_attention_forward()(module, query, key, value, attention_mask, dropout=dropout,
                                         scaling=scaling, is_causal=is_causal, sliding_window=sliding_window,
                                         **kwargs)

    position_bias = kwargs.get("position_bias")
    q_len, kv_len = query.shape[2], key.shape[2]
    # SDPA's path: the module's flag, and causal only for a prefill without a mask (a mask holds the
    # causal pattern itself; one query token sees every cached key)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and kv_len > q_len:
        # top-left causal never reaches keys past q_len (an empty static cache's prefill): skip them
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
        kv_len = q_len

    bias = attention_mask
    if bias is not None:
        bias = bias[..., :kv_len]  # eager's slice: a mask may be built for a longer (static) cache
        if bias.dtype != torch.bool and bias.dtype != query.dtype:
            bias = bias.to(query.dtype)
    if position_bias is not None:
        position_bias = position_bias.to(query.dtype)
        if bias is None:
            bias = position_bias
        elif bias.dtype == torch.bool:
            bias = position_bias.masked_fill(~bias, torch.finfo(query.dtype).min)  # as SDPA's path
        else:
            bias = position_bias + bias

    window = None
    if is_causal and sliding_window is not None and 0 < sliding_window < kv_len:
        window = (sliding_window - 1, 0)  # only reached without a mask; HF's masks hold the window

    out = ops.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=is_causal,
                        scale=scaling, dropout_p=dropout, window=window, attn_bias=bias)
    return out, None
