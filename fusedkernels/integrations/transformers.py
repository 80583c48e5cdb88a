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

import contextvars
import functools
import inspect
import sys
import types
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
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


# ------------------------------------------------------------------------------------------------
# fuse(model)'s Llama-family rewrites (fusedkernels/fusion.py: RotaryAttention, CausalLMLoss; docs/fuse.md)
# ------------------------------------------------------------------------------------------------


def _unwrapped(fn):
    """The function under fn's functools.wraps decorators (transformers' deprecate_kwarg, can_return_tuple)."""
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _with_global(fn, name: str, value):
    """A copy of fn, through its functools.wraps decorators, whose innermost function sees `value` for its
    module-level `name`: that function gets a copy of its module's globals (names as they are now), the decorators
    new closure cells pointing at the copy. Nothing of the module changes."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        namespace = dict(fn.__globals__)
        namespace[name] = value
        new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    else:
        new_inner = _with_global(inner, name, value)
        cells = fn.__closure__ or ()
        holds = [i for i, c in enumerate(cells) if c.cell_contents is inner]
        if not holds:
            raise TypeError(f"{fn.__qualname__}: a decorator that does not hold the function it wraps")
        cells = tuple(types.CellType(new_inner) if i in holds else c for i, c in enumerate(cells))
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__ = fn.__qualname__
    if inner is not None:
        new.__wrapped__ = new_inner
    return new


def hf_rotary_function(module: torch.nn.Module):
    """The module-level `apply_rotary_pos_emb(q, k, cos, sin, ...)` that module's class calls in its forward (Llama,
    Mistral, Qwen2, Qwen3, ... attention), or None."""
    inner = _unwrapped(type(module).forward)
    code = getattr(inner, "__code__", None)
    if code is None or "apply_rotary_pos_emb" not in code.co_names:
        return None
    fn = inner.__globals__.get("apply_rotary_pos_emb")
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return fn if params[:4] == ["q", "k", "cos", "sin"] else None


def rotary_matches(fn, head_dim: int) -> bool:
    """Whether fn(q, k, cos, sin) (a modeling file's apply_rotary_pos_emb) computes the rotation `_ops_rotary` does,
    on unit-scale q, k and a table in HF's form (both halves of each angle: torch.cat((freqs, freqs), -1)), in
    float64. The attention probe cannot tell on its own: with freshly initialised weights the attention scores
    are ~1e-4 and every rotation gives a near-uniform softmax (Cohere's interleaved pairs passed it)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 5, head_dim, generator=g, dtype=torch.float64)
    freqs = torch.rand(1, 5, head_dim // 2, generator=g, dtype=torch.float64) * 3
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    try:
        want = fn(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - a function that takes another table is not this one
        return False
    got = _ops_rotary(q, k, cos, sin)
    return all(isinstance(w, Tensor) and w.shape == o.shape and torch.allclose(w, o, rtol=1e-9, atol=1e-9)
               for o, w in zip(got, want))


def rotary_keeps_dtype(fn) -> bool:
    """Whether fn (a modeling file's apply_rotary_pos_emb) returns q and k in their own dtype when the table's is
    wider (OLMo's casts back; Llama's products promote to the table's), on bfloat16 q, k and a float32 table."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 3, 4, generator=g).to(torch.bfloat16) for _ in range(2))
    cos, sin = torch.rand(1, 3, 4, generator=g), torch.rand(1, 3, 4, generator=g)
    try:
        out = fn(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - rotary_matches decides on such a function
        return False
    return all(isinstance(t, Tensor) and t.dtype == torch.bfloat16 for t in out)


def _rebuild_switched(factory, args):
    """An empty instance of factory(*args), the class fuse() switched a module to; pickle then restores its state."""
    return object.__new__(factory(*args))


def _reduce_switched(self, protocol):
    """Pickles a class-switched module by the factory that makes its class (which pickle cannot find by name: it
    carries the name of the class it derives from) and its nn.Module state."""
    factory, args = type(self)._fusedkernels_rebuild
    return _rebuild_switched, (factory, args), self.__getstate__()


def _switched_class(cls: type, marker: type, factory, args: tuple, namespace: dict, marker_first: bool = False) -> type:
    """A subclass of cls and marker with cls's name (transformers writes class names into configs), whose instances
    pickle through factory(*args)."""
    namespace = {**namespace, "__qualname__": cls.__qualname__, "__module__": cls.__module__,
                 "__reduce_ex__": _reduce_switched, "_fusedkernels_rebuild": (factory, args)}
    return type(cls.__name__, (marker, cls) if marker_first else (cls, marker), namespace)


class FusedRotaryAttention:
    """Marks an attention module whose class fuse() switched to `rotary_attention_class(cls)`."""


def _ops_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb on ops.apply_rotary: cos / sin [batch, seq, dim] unsqueezed at 1 (q, k
    [batch, heads, seq, dim]) or at 2 ([batch, seq, heads, dim])."""
    # HF's products promote: a float32 table with half q / k (autocast over float32 weights) gives float32
    dtype = torch.promote_types(q.dtype, cos.dtype)
    return ops.apply_rotary(q.to(dtype), k.to(dtype), cos, sin, layout={1: "bhnd", 2: "bnhd"}[unsqueeze_dim])


def _ops_rotary_in_dtype(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """_ops_rotary for the apply_rotary_pos_emb that returns q and k in their own dtype (OLMo's): the op computes in
    float32 and writes q's dtype whatever the table's."""
    return ops.apply_rotary(q, k, cos, sin, layout={1: "bhnd", 2: "bnhd"}[unsqueeze_dim])


_ROTARY_CLASSES: dict = {}


def rotary_attention_class(cls: type, keeps_dtype: bool = False) -> type:
    """cls with the same forward, except that its call of apply_rotary_pos_emb runs `ops.apply_rotary` (returning q
    and k in their own dtype where keeps_dtype, as rotary_keeps_dtype finds the original does): a subclass keeping
    cls's name (transformers writes class names into configs), cached per class."""
    if (cls, keeps_dtype) not in _ROTARY_CLASSES:
        forward = _with_global(cls.forward, "apply_rotary_pos_emb", _ops_rotary_in_dtype if keeps_dtype else _ops_rotary)
        _ROTARY_CLASSES[cls, keeps_dtype] = _switched_class(cls, FusedRotaryAttention, rotary_attention_class,
                                                            (cls, keeps_dtype), {"forward": forward})
    return _ROTARY_CLASSES[cls, keeps_dtype]


class FusedRotaryEmbedding:
    """Marks a rotary embedding module whose class fuse() switched to `rotary_embedding_class(cls)`."""


_ROTARY_EMBEDDING_CLASSES: dict = {}


_INTEGER_IDS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def rotary_embedding_class(cls: type, per_layer_type: bool = False) -> type:
    """cls (a Hugging Face rotary embedding: forward(x, position_ids) -> (cos, sin) from `inv_freq` and
    `attention_scaling`, or per_layer_type: forward(x, position_ids, layer_type) from `<layer_type>_inv_freq` and
    `<layer_type>_attention_scaling`) whose forward is one `ops.rotary_cos_sin` launch; a call it does not cover
    (position ids that are not integers, an x that is not floating point or not on the ids' device; a `layer_type`
    for the plain form, none for the other) runs cls's own forward. A subclass keeping cls's name, cached per class."""
    if (cls, per_layer_type) not in _ROTARY_EMBEDDING_CLASSES:
        original = cls.forward

        def covered(x, position_ids, inv_freq) -> bool:
            return (position_ids.dtype in _INTEGER_IDS and x.is_floating_point() and x.device == position_ids.device
                    and inv_freq.device == x.device)

        if per_layer_type:
            def forward(self, x, position_ids, layer_type):
                inv_freq = self._buffers.get(f"{layer_type}_inv_freq") if isinstance(layer_type, str) else None
                if inv_freq is None or not covered(x, position_ids, inv_freq):
                    return original(self, x, position_ids, layer_type)
                return ops.rotary_cos_sin(position_ids, inv_freq,
                                          attention_scaling=getattr(self, f"{layer_type}_attention_scaling"),
                                          dtype=x.dtype)
        else:
            def forward(self, x, position_ids, layer_type=None):
                if layer_type is not None:
                    return original(self, x, position_ids, layer_type)
                if not covered(x, position_ids, self.inv_freq):
                    return original(self, x, position_ids)
                return ops.rotary_cos_sin(position_ids, self.inv_freq, attention_scaling=self.attention_scaling,
                                          dtype=x.dtype)

        forward.__qualname__ = f"{cls.__qualname__}.forward"
        _ROTARY_EMBEDDING_CLASSES[cls, per_layer_type] = _switched_class(
            cls, FusedRotaryEmbedding, rotary_embedding_class, (cls, per_layer_type), {"forward": forward})
    return _ROTARY_EMBEDDING_CLASSES[cls, per_layer_type]


def is_hf_causal_lm_loss(fn) -> bool:
    """fn is transformers' ForCausalLMLoss (by name: transformers is not imported here)."""
    return getattr(fn, "__name__", None) == "ForCausalLMLoss"


# The *ForCausalLM whose labelled forward is running: its lm_head then passes the hidden states through, and its
# loss_function is the fused linear + cross entropy on them (per context, so threads do not see each other's).
_LM_LOSS: contextvars.ContextVar = contextvars.ContextVar("fusedkernels_lm_loss", default=None)


class _PassThroughHead:
    """lm_head during a labelled forward: hands the hidden states through, remembering what it returned (the
    forward's "logits", removed from its outputs)."""

    def __init__(self) -> None:
        self.returned: list = []

    def __call__(self, hidden: Tensor) -> Tensor:
        self.returned.append(hidden)
        return hidden


def _plain_head(head) -> bool:
    """lm_head is a plain nn.Linear that nothing intercepts now (a wrapper such as a LoRA adapter, or a hook, added
    after fuse() would be skipped by the fused loss, which reads weight and bias)."""
    module = torch.nn.modules.module
    return (type(head) is torch.nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)
            and not (module._global_forward_hooks or module._global_forward_pre_hooks))


def _causal_lm_loss(lm_head: torch.nn.Linear, logits: Tensor, labels: Tensor, vocab_size: int,
                    num_items_in_batch: Optional[Tensor] = None, ignore_index: int = -100,
                    shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """transformers' ForCausalLMLoss with `logits` the hidden states before lm_head: labels shifted left (the last
    position ignored) unless shift_labels is given; mean over the tokens not ignored, or the sum divided by
    num_items_in_batch where given (gradient accumulation); float32, as HF's upcast logits give it."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    shift_labels = shift_labels.to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = ops.linear_cross_entropy(logits.reshape(-1, logits.shape[-1]), lm_head.weight, shift_labels.reshape(-1),
                                    lm_head.bias, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    return loss


# Config values *ForCausalLM forwards apply to the logits before the loss (Gemma 2's soft cap, Granite's and Cohere's
# scales): fuse() probed the head and the loss with the values of its time, so a forward after one changed runs the
# class's own.
_LOGIT_SETTINGS = ("final_logit_softcapping", "logits_scaling", "logit_scale", "softcap", "output_logit_soft_cap")


def logit_settings(model) -> tuple:
    """The model's config values of _LOGIT_SETTINGS (None where it has none)."""
    config = getattr(model, "config", None)
    return tuple(getattr(config, name, None) for name in _LOGIT_SETTINGS)


class FusedLinearCrossEntropyCausalLM:
    """Mixin of `causal_lm_loss_class(cls)`: in training mode with labels, the model's own forward runs with lm_head
    passing the hidden states through and loss_function computing ops.linear_cross_entropy on them, and logits come
    back None (Liger-Kernel's rule: evaluation keeps its logits for metrics); otherwise, or when lm_head is no longer
    a plain nn.Linear (wrapped, hooked), loss_function is not ForCausalLMLoss, or a config value that changes the
    logits (_LOGIT_SETTINGS) is not what fuse() probed, the forward is cls's. Only the forward's own `self.lm_head`
    reads get the pass-through: a hook or other code reading model.lm_head meanwhile gets the nn.Linear."""

    def forward(self, *args, **kwargs):
        at = _LABELS_AT[type(self)]
        labels = kwargs.get("labels", args[at] if at is not None and len(args) > at else None)
        # (under torch.compile the class's own forward: dynamo cannot trace the context variable that hands the
        # hidden states past lm_head, and would run lm_head and the fused loss on its logits)
        if (labels is None or not self.training or torch.compiler.is_compiling()
                or not _plain_head(self._modules.get("lm_head"))
                or not is_hf_causal_lm_loss(super().loss_function)
                or logit_settings(self) != self.__dict__.get("_fusedkernels_logit_settings")):
            return super().forward(*args, **kwargs)
        head = _PassThroughHead()
        token = _LM_LOSS.set((self, head))
        try:
            out = super().forward(*args, **kwargs)
        finally:
            _LM_LOSS.reset(token)
        if isinstance(out, tuple):  # return_dict=False: the fields that are not None, in order; drop the "logits"
            return tuple(v for v in out if not any(v is r for r in head.returned))
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})

    def _labelled_call(self):
        """The pass-through head of this model's labelled forward running in this context, or None."""
        running = _LM_LOSS.get()
        return running[1] if running is not None and running[0] is self else None

    def __getattr__(self, name: str):
        if name == "lm_head":
            head = self._labelled_call()
            if head is not None and sys._getframe(1).f_code is _FORWARD_CODE[type(self)]:  # the forward's own read
                return head
        return super().__getattr__(name)

    @property
    def loss_function(self):
        if self._labelled_call() is not None:
            return functools.partial(_causal_lm_loss, self._modules["lm_head"])
        return super().loss_function

    @loss_function.setter
    def loss_function(self, value):
        super(FusedLinearCrossEntropyCausalLM, type(self)).loss_function.__set__(self, value)


_LM_CLASSES: dict = {}
_LABELS_AT: dict = {}  # class -> index of `labels` in forward's positional arguments (after self), or None
_FORWARD_CODE: dict = {}  # class -> the code of the original class's forward (under its decorators)


def unfused_class(cls: type) -> type:
    """The class a switched class (`_switched_class`) was made from."""
    return cls._fusedkernels_rebuild[1][0]


def causal_lm_loss_class(cls: type) -> type:
    """cls with FusedLinearCrossEntropyCausalLM's forward around its own, keeping cls's name, cached per class."""
    if cls not in _LM_CLASSES:
        def forward(self, *args, **kwargs):
            return FusedLinearCrossEntropyCausalLM.forward(self, *args, **kwargs)

        # cls's signature: transformers reads it (generate's attention mask and logits_to_keep, Trainer's labels
        # and the columns its collator keeps)
        forward.__signature__ = inspect.signature(cls.forward)
        forward.__qualname__ = f"{cls.__qualname__}.forward"
        new = _switched_class(cls, FusedLinearCrossEntropyCausalLM, causal_lm_loss_class, (cls,),
                              {"forward": forward}, marker_first=True)
        params = [p for p in inspect.signature(cls.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params[1:]]
        _LABELS_AT[new] = names.index("labels") if "labels" in names else None
        _FORWARD_CODE[new] = _unwrapped(cls.forward).__code__
        _LM_CLASSES[cls] = new
    return _LM_CLASSES[cls]
