"""fusedkernels.ops.attention / attention_varlen / scaled_dot_product_attention and their op layer.

CPU tests hold the reference (the CPU kernels of the internal ops) to torch's own scaled_dot_product_attention
and check the op layer (errors, autograd, opcheck, compile). `cuda` tests hold the fused kernels to an fp32
reference on fresh random inputs, with a tolerance relative to PyTorch's own low-precision error (the same
reference run in the inputs' dtype).
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedkernels.ops as fops
from fusedkernels import _native
from fusedkernels.ops.attention import attention_mask_ref, attention_ref, attention_varlen_ref

from .helpers import assert_close_to_ref, check_graph_replays, hopper_kernels_run, max_err, poison_allocator

needs_native = pytest.mark.skipif(not _native.has_op("attention"), reason="needs the native attention ops")
LOWP = [torch.float16, torch.bfloat16]


def _qkv(b, nq, nk, hq, hkv, d, dtype=torch.float32, device="cpu", scale=1.0):
    q = (torch.randn(b, nq, hq, d, device=device) * scale).to(dtype)
    k = torch.randn(b, nk, hkv, d, device=device).to(dtype)
    v = torch.randn(b, nk, hkv, d, device=device).to(dtype)
    return q, k, v


def _sdpa(q, k, v, **kw):
    """torch's SDPA on our [B, N, H, D] layout."""
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    return t(F.scaled_dot_product_attention(t(q), t(k), t(v), enable_gqa=q.shape[2] != k.shape[2], **kw))


def _grads(fn, tensors, dout):
    """fn(*leaves) and the grads of the leaves (None where a tensor is not floating)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]
    out = fn(*leaves)
    lse = None
    if isinstance(out, tuple):
        out, lse = out
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None and t.requires_grad], dout)
    return out.detach(), lse, list(grads)


def _check_lse(ours, ref, lowp, name="lse"):
    """Same -inf rows (rows that see no key), and the finite ones within tolerance."""
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert not torch.isnan(ours).any(), f"{name}: NaN"
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), f"{name}: -inf rows differ"
    finite = torch.isfinite(ref)
    assert_close_to_ref(ours[finite], ref[finite], lowp[finite], name, floor=1e-5)


# ------------------------------------------------------------------------------------------------
# Reference semantics (CPU)
# ------------------------------------------------------------------------------------------------

CPU_SHAPES = [  # B, Nq, Nk, Hq, Hkv, D
    (2, 7, 7, 4, 4, 16),
    (1, 5, 13, 4, 2, 8),  # Nq < Nk, GQA
    (2, 13, 5, 6, 1, 32),  # Nq > Nk, MQA
    (1, 1, 1, 1, 1, 4),
]


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_torch_sdpa_including_top_left_causal(shape, causal, dtype):
    q, k, v = _qkv(*shape, dtype=dtype)
    dout = torch.randn_like(q)
    ours = _grads(lambda q, k, v: fops.attention(q, k, v, causal=causal), (q, k, v), dout)
    want = _grads(lambda q, k, v: _sdpa(q, k, v, is_causal=causal), (q.double(), k.double(), v.double()), dout.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for o, w in zip([ours[0]] + ours[2], [want[0]] + want[2]):
        assert o.dtype == dtype
        assert max_err(o, w) <= tol * max(w.abs().max().item(), 1.0)


@pytest.mark.parametrize("kind", ["bool", "float", "float_broadcast", "bool_2d"])
def test_attn_bias_matches_torch_attn_mask(kind):
    b, nq, nk, hq, hkv, d = 2, 6, 9, 4, 2, 8
    q, k, v = _qkv(b, nq, nk, hq, hkv, d, dtype=torch.float64)
    bias = {
        "bool": lambda: torch.rand(b, 1, nq, nk) > 0.3,
        "float": lambda: torch.randn(b, hq, nq, nk, dtype=torch.float64),
        "float_broadcast": lambda: torch.randn(1, hq, 1, nk, dtype=torch.float64),
        "bool_2d": lambda: torch.rand(nq, nk) > 0.5,
    }[kind]()
    dout = torch.randn_like(q)
    ours = _grads(lambda q, k, v, m: fops.attention(q, k, v, attn_bias=m), (q, k, v, bias), dout)
    want = _grads(lambda q, k, v, m: _sdpa(q, k, v, attn_mask=m), (q, k, v, bias), dout)
    # (rows a bool mask hides entirely: torch gives 0 there too, since 2.5)
    for o, w in zip([ours[0]] + ours[2], [want[0]] + want[2]):
        assert o.shape == w.shape and max_err(o, w) < 1e-10
    if not kind.startswith("bool"):
        assert ours[2][3].shape == bias.shape  # dbias reduced over the broadcast dimensions


@pytest.mark.parametrize("window", [(2, 0), (0, 3), (1, 1), (4, -1), (-1, 2), (0, 0)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("nq,nk", [(9, 9), (5, 11), (11, 5)])
def test_sliding_window_is_the_documented_mask(window, causal, nq, nk):
    q, k, v = _qkv(2, nq, nk, 2, 2, 8, dtype=torch.float64)
    keep = attention_mask_ref(nq, nk, causal, *window)
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    expected = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        expected &= j <= i
    if window[0] >= 0:
        expected &= j >= i - window[0]
    if window[1] >= 0:
        expected &= j <= i + window[1]
    assert torch.equal(keep, expected)
    dout = torch.randn_like(q)
    ours = _grads(lambda q, k, v: fops.attention(q, k, v, causal=causal, window=window, return_lse=True), (q, k, v),
                  dout)
    want = _grads(lambda q, k, v: _sdpa(q, k, v, attn_mask=keep), (q, k, v), dout)
    for o, w in zip([ours[0]] + ours[2], [want[0]] + want[2]):
        assert max_err(o, w) < 1e-10
    # rows that see no key: output 0, lse -inf, zero grads, no NaN anywhere
    blind = ~keep.any(1)
    assert torch.equal(torch.isinf(ours[1]), blind.expand_as(ours[1]))
    assert (ours[0][:, blind] == 0).all() and (ours[2][0][:, blind] == 0).all()
    assert all(not torch.isnan(g).any() for g in ours[2])


def test_lse_is_logsumexp_of_scaled_biased_scores():
    q, k, v = _qkv(2, 6, 10, 4, 2, 16, dtype=torch.float64)
    bias = torch.randn(2, 4, 6, 10, dtype=torch.float64)
    _, lse = fops.attention(q, k, v, attn_bias=bias, scale=0.3, causal=True, return_lse=True)
    s = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(2, dim=2)) * 0.3 + bias
    s = s.masked_fill(~attention_mask_ref(6, 10, True, -1, -1), float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 6)
    assert max_err(lse, torch.logsumexp(s, -1)) < 1e-5


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = _qkv(1, 4, 6, 2, 2, 8)
    mask = torch.ones(1, 2, 4, 6, dtype=torch.bool)
    mask[:, :, 1] = False  # row 1 sees nothing
    bias = torch.zeros(1, 2, 4, 6).masked_fill(~mask, float("-inf")).requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    for attn_bias in (mask, bias):
        out, lse = fops.attention(*leaves, attn_bias=attn_bias, return_lse=True)
        assert (out[:, 1] == 0).all() and torch.isinf(lse[:, :, 1]).all() and (lse[:, :, 1] < 0).all()
        grads = torch.autograd.grad(out.square().sum(), leaves + ([bias] if attn_bias is bias else []))
        assert all(torch.isfinite(g).all() for g in grads)
        assert (grads[0][:, 1] == 0).all()


def test_python_reference_equals_the_cpu_kernel():
    """attention_ref (Python, the tests' yardstick) and the C++ CPU kernel are the same math."""
    q, k, v = _qkv(2, 9, 12, 4, 2, 16)
    bias = torch.randn(2, 1, 9, 12)
    for kw in (dict(), dict(causal=True), dict(window=(3, 1), attn_bias=bias), dict(scale=0.1, causal=True)):
        out, lse = fops.attention(q, k, v, return_lse=True, **kw)
        ref, ref_lse = attention_ref(q, k, v, return_lse=True, **kw)
        assert max_err(out, ref) < 1e-6 and max_err(lse, ref_lse) < 1e-5


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", [None, (2, 1)], ids=str)
def test_varlen_is_the_per_sequence_loop(causal, window):
    lq, lk = [3, 0, 7, 1, 5], [4, 2, 7, 3, 1]
    hq, hkv, d = 4, 2, 8
    q = torch.randn(sum(lq), hq, d, dtype=torch.float64)
    k = torch.randn(sum(lk), hkv, d, dtype=torch.float64)
    v = torch.randn(sum(lk), hkv, d, dtype=torch.float64)
    cu_q, cu_k = _cu(lq), _cu(lk)
    dout = torch.randn_like(q)
    ours = _grads(lambda q, k, v: fops.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                        window=window, return_lse=True), (q, k, v), dout)
    # one attention call per sequence
    outs, lses = [], []
    for b in range(len(lq)):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        o, l = fops.attention(q[None, sq], k[None, sk], v[None, sk], causal=causal, window=window, return_lse=True)
        outs.append(o[0])
        lses.append(l[0])
    assert max_err(ours[0], torch.cat(outs)) < 1e-12
    assert torch.equal(torch.isinf(ours[1]), torch.isinf(torch.cat(lses, 1)))
    want = _grads(lambda q, k, v: attention_varlen_ref(q, k, v, cu_q, cu_k, causal=causal, window=window), (q, k, v),
                  dout)
    assert max_err(ours[0], want[0]) < 1e-12
    for o, w in zip(ours[2], want[2]):
        assert max_err(o, w) < 1e-12


def test_sdpa_wrapper_matches_torch_and_raises_as_torch():
    q = torch.randn(2, 4, 7, 16)
    k = torch.randn(2, 2, 9, 16)
    v = torch.randn(2, 2, 9, 16)
    mask = torch.rand(7, 9) > 0.2
    for kw in (dict(enable_gqa=True), dict(enable_gqa=True, is_causal=True), dict(enable_gqa=True, attn_mask=mask),
               dict(enable_gqa=True, scale=0.5)):
        ours = fops.scaled_dot_product_attention(q, k, v, **kw)
        want = F.scaled_dot_product_attention(q, k, v, **kw)
        assert ours.shape == want.shape and max_err(ours, want) < 1e-5
    # what torch refuses raises the same type; what torch takes gives torch's result (versions differ: torch
    # 2.11 takes an attn_mask of another float dtype)
    for args, kw in (((q, k, v), dict()),  # mismatched heads without enable_gqa
                     ((q, q, q), dict(attn_mask=mask[:, :7], is_causal=True)),
                     ((q.bfloat16(),) * 3, dict(attn_mask=torch.randn(7, 7, dtype=torch.float16)))):
        try:
            want = F.scaled_dot_product_attention(*args, **kw)
        except Exception as e:  # noqa: BLE001
            with pytest.raises(type(e)):
                fops.scaled_dot_product_attention(*args, **kw)
            continue
        got = fops.scaled_dot_product_attention(*args, **kw)
        assert got.dtype == want.dtype and max_err(got, want) <= 1e-2 * max(want.abs().max().item(), 1.0)
    # what the kernel does not take goes to torch: 3-D inputs, a value head dim unlike the query's
    q3, k3, v3 = torch.randn(4, 7, 16), torch.randn(4, 9, 16), torch.randn(4, 9, 16)
    assert max_err(fops.scaled_dot_product_attention(q3, k3, v3), F.scaled_dot_product_attention(q3, k3, v3)) < 1e-6
    v8 = torch.randn(2, 4, 9, 8)
    assert fops.scaled_dot_product_attention(q, k.repeat(1, 2, 1, 1), v8).shape == (2, 4, 7, 8)
    # scale and enable_gqa are keyword-only, as torch's: code written against ours runs against torch's
    for fn in (fops.scaled_dot_product_attention, F.scaled_dot_product_attention):
        with pytest.raises(TypeError):
            fn(q, q, q, None, 0.0, False, 0.5)


def test_window_must_be_a_pair():
    q = torch.randn(1, 3, 1, 4)
    for bad in (3, (1,), (1, 2, 3), "ab"):
        with pytest.raises(TypeError, match="window must be None or a pair"):
            fops.attention(q, q, q, window=bad)
        with pytest.raises(TypeError, match="window must be None or a pair"):
            fops.attention_varlen(q[0], q[0], q[0], _cu([3]), _cu([3]), 3, 3, window=bad)
    assert fops.attention(q, q, q, window=[1, 0]).shape == q.shape  # a list is a pair too
    # a size past int64 is a window wider than any sequence: unbounded; one below its range is a size below -1
    torch.testing.assert_close(fops.attention(q, q, q, window=(2**63, 0)), fops.attention(q, q, q, window=(-1, 0)))
    with pytest.raises(RuntimeError, match="window sizes must be >= 0"):
        fops.attention(q, q, q, window=(0, -2**64))


@pytest.mark.parametrize("varlen", [False, True], ids=["", "varlen"])
def test_lse_is_differentiable(varlen):
    """The returned lse has a gradient (d lse / d s = P): the gradients from out's and lse's together match autograd
    through the reference (fp64), bias included, rows that see no key (lse -inf: a zero gradient, no NaN), GQA, and
    a loss of lse alone; varlen packed too. (lse is float32 whatever the inputs, so gradcheck's finite differences
    would measure its rounding.)"""
    torch.manual_seed(0)
    if varlen:  # sequence 1: two queries, no key
        q, k, v = (torch.randn(n, h, 8, dtype=torch.float64) for n, h in ((7, 4), (9, 2), (9, 2)))
        lengths_q, lengths_k = [3, 2, 2], [5, 0, 4]
        cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
        ours = lambda q, k, v: fops.attention_varlen(q, k, v, cu_q, cu_k, 3, 5, causal=True,  # noqa: E731
                                                     return_lse=True)
        ref = lambda q, k, v: attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, return_lse=True)  # noqa: E731
        inputs = (q, k, v)
        dlse = torch.randn(4, 7, dtype=torch.float64)
    else:  # query 5 sees keys 4 .. 5, which do not exist
        q, k, v = (torch.randn(2, n, h, 8, dtype=torch.float64) for n, h in ((6, 4), (4, 2), (4, 2)))
        bias = torch.randn(2, 4, 6, 4, dtype=torch.float64)
        ours = lambda q, k, v, b: fops.attention(q, k, v, attn_bias=b, window=(1, 0), return_lse=True)  # noqa: E731
        ref = lambda q, k, v, b: attention_ref(q, k, v, attn_bias=b, window=(1, 0), return_lse=True)  # noqa: E731
        inputs = (q, k, v, bias)
        dlse = torch.randn(2, 4, 6, dtype=torch.float64)
    dout = torch.randn_like(q)
    for grad_outputs in ((dout, dlse), (None, dlse)):  # (None: a loss of lse alone)
        got, want = [], []
        for fn, into in ((ours, got), (ref, want)):
            leaves = [t.clone().requires_grad_() for t in inputs]
            out, lse = fn(*leaves)
            assert lse.requires_grad and not torch.isfinite(lse).all()
            pairs = [(o, g) for o, g in zip((out, lse), grad_outputs) if g is not None]
            grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g.to(o.dtype) for o, g in pairs],
                                        allow_unused=True)  # (lse does not depend on v)
            into.extend(torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves))
        for g, w in zip(got, want):
            assert torch.isfinite(g).all() and max_err(g, w) < 1e-6 * max(w.abs().max().item(), 1.0)
        assert got[0].abs().sum() > 0
    # a merge's logaddexp hands the -inf rows NaN: they still get zero gradients, and nothing else is touched
    leaves = [t.clone().requires_grad_() for t in inputs]
    out, lse = ours(*leaves)
    grads = torch.autograd.grad(torch.logaddexp(lse, lse).exp().sum() + (out * dout).sum(), leaves,
                                allow_unused=True)
    finite = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    assert all(torch.isfinite(g).all() for g in finite)


def _heads_first_out_strides(shape):
    """The strides of out for [B, H, N, D] inputs: [B, N, H, D] memory, as torch's flash backend returns it."""
    b, h, n, d = shape
    return torch.empty(b, n, h, d, device="meta").transpose(1, 2).stride()


def test_sdpa_takes_heads_first_tensors_as_they_are():
    """[B, H, N, D] tensors go to the op as they are (heads_first): one autograd node, whose edges are the inputs'
    own; out over [B, N, H, D] memory; values and grads those of `attention` on [B, N, H, D] views."""
    if not _native.has_op("attention"):
        pytest.skip("needs the custom ops")
    qkv = torch.randn(2, 9, 3, 4, 16).unbind(2)  # [B, N, H, D] slices of a packed tensor
    for make in (lambda t: t.transpose(1, 2).contiguous(), lambda t: t.transpose(1, 2)):
        leaves = [make(t).requires_grad_() for t in qkv]
        kh, vh = (t[:, :2].detach().requires_grad_() for t in leaves[1:])  # GQA: 2 kv heads
        out = fops.scaled_dot_product_attention(leaves[0], kh, vh, is_causal=True, enable_gqa=True)
        node = out.grad_fn
        assert node.name() == "fusedkernels::AttentionBackward"
        assert all(f.variable is t for (f, _), t in zip(node.next_functions, (leaves[0], kh, vh)))
        assert out.shape == leaves[0].shape and out.stride() == _heads_first_out_strides(out.shape)
        rows = [t.detach().transpose(1, 2).requires_grad_() for t in (leaves[0], kh, vh)]
        want = fops.attention(*rows, causal=True)
        assert torch.equal(out, want.transpose(1, 2))
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (leaves[0], kh, vh), dout)
        want_grads = torch.autograd.grad(want, rows, dout.transpose(1, 2))
        for g, w, t in zip(grads, want_grads, (leaves[0], kh, vh)):
            assert torch.equal(g, w.transpose(1, 2))
            assert g.stride() == torch.empty_like(t).stride()
    q, k, v = (t.transpose(1, 2).double().requires_grad_() for t in _qkv(1, 3, 4, 2, 2, 4))
    fn = lambda q, k, v: fops.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v)) and torch.autograd.gradgradcheck(fn, (q, k, v))


def test_internal_ops_heads_first():
    """The internal ops' heads_first flag: opcheck (fake tensors agree on out's [B, N, H, D] memory), and what it
    refuses."""
    if not _native.has_op("attention"):
        pytest.skip("needs the custom ops")
    ops = torch.ops.fusedkernels
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in _qkv(2, 9, 13, 4, 2, 32))
    args = (q, k, v, None, None, None, 9, 13, 0.0, 0.125, True, -1, -1)
    torch.library.opcheck(ops.attention_fwd, args, {"heads_first": True})
    out, lse, rng = ops.attention_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                      heads_first=True)
    assert out.stride() == _heads_first_out_strides(out.shape)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, None, None, None, 9, 13, 0.0,
                0.125, True, -1, -1, rng, False, [True, True, True, False])
    torch.library.opcheck(ops.attention_bwd, bwd_args, {"heads_first": True})
    fn = lambda q, k, v: fops.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for n in (9, 12):  # symbolic sizes through the meta kernels
        leaves = [torch.randn(2, h, n, 32, requires_grad=True) for h in (4, 2, 2)]
        a, b = compiled(*leaves), fn(*leaves)
        assert max_err(a, b) <= 1e-6 and a.stride() == b.stride()
        for ga, gb in zip(torch.autograd.grad(a.sum(), leaves), torch.autograd.grad(b.sum(), leaves)):
            assert max_err(ga, gb) <= 1e-5
    qp, kp, vp = (torch.randn(n, 2, 8) for n in (5, 6, 6))
    with pytest.raises(ValueError, match="heads_first is not supported with varlen"):
        ops.attention_fwd(qp, kp, vp, None, _cu([2, 3]), _cu([4, 2]), 3, 4, 0.0, 0.3, False, -1, -1, heads_first=True)


def test_strided_inputs_need_no_copy_and_compute_right():
    """The SDPA layout ([B, H, N, D] transposed) and slices of a packed qkv tensor."""
    qkv = torch.randn(2, 11, 3, 4, 16, requires_grad=True)
    q, k, v = qkv.unbind(2)
    out = fops.attention(q, k, v, causal=True)
    want = _sdpa(q.double(), k.double(), v.double(), is_causal=True)
    assert max_err(out, want) < 1e-5
    out.square().sum().backward()
    assert qkv.grad.shape == qkv.shape and torch.isfinite(qkv.grad).all()


@pytest.mark.parametrize("nq,nk,b", [(0, 5, 2), (5, 0, 2), (5, 5, 0)])
def test_empty_sizes(nq, nk, b):
    q, k, v = _qkv(b, nq, nk, 2, 2, 8)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = fops.attention(*leaves, return_lse=True)
    assert out.shape == q.shape and lse.shape == (b, 2, nq)
    assert (out == 0).all() and (lse == float("-inf")).all()
    out.sum().backward()
    assert all(t.grad is not None and (t.grad == 0).all() for t in leaves)


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(2, 5, 6, 4, 2, 8)
    with pytest.raises(RuntimeError, match=r"q must be \[batch, seqlen, heads, head_dim\]"):
        fops.attention(q[0], k, v)
    with pytest.raises(RuntimeError, match="floating-point"):
        fops.attention(q.int(), k.int(), v.int())
    with pytest.raises(RuntimeError, match="same dtype"):
        fops.attention(q, k.double(), v)
    with pytest.raises(RuntimeError, match="same head_dim"):
        fops.attention(q, k[..., :4], v[..., :4])
    with pytest.raises(RuntimeError, match="same batch, length and heads"):
        fops.attention(q, k, v[:, :3])
    with pytest.raises(RuntimeError, match="multiple of the heads"):
        fops.attention(q[:, :, :3], k, v)
    with pytest.raises(RuntimeError, match="broadcastable"):
        fops.attention(q, k, v, attn_bias=torch.randn(5, 5))
    with pytest.raises(RuntimeError, match="attn_bias must be bool or floating"):
        fops.attention(q, k, v, attn_bias=torch.ones(5, 6, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="dropout_p"):
        fops.attention(q, k, v, dropout_p=1.5)
    with pytest.raises(RuntimeError, match="window"):
        fops.attention(q, k, v, window=(-2, 0))
    qp, kp = torch.randn(10, 4, 8), torch.randn(12, 2, 8)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be int32"):
        fops.attention_varlen(qp, kp, kp, torch.tensor([0, 10]), torch.tensor([0, 12], dtype=torch.int32), 10, 12)
    with pytest.raises(RuntimeError, match="batch \\+ 1"):
        fops.attention_varlen(qp, kp, kp, _cu([10]), _cu([6, 6]), 10, 6)
    with pytest.raises(TypeError, match="causal"):
        fops.attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match="dropout_p"):
        fops.attention(q, k, v, dropout_p="0.1")
    with pytest.raises(TypeError):
        fops.attention([1.0], k, v)
    with pytest.raises(TypeError, match="window_left"):
        fops.attention(q, k, v, window=(1.5, 0))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_native])])
def test_opcheck(device):
    if not _native.has_op("attention"):
        pytest.skip("needs the custom ops")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = _qkv(2, 9, 13, 4, 2, 32 if device == "cpu" else 64, dtype=dtype, device=device)
    bias = torch.randn(2, 4, 9, 13, device=device, dtype=dtype)
    for t in (q, k, v, bias):
        t.requires_grad_()
    ops = torch.ops.fusedkernels
    for args in ((q, k, v, None, 0.0, True, -1, -1, None, True, False), (q, k, v, bias, 0.0, False, 3, 2, 0.2, False,
                                                                         True)):
        torch.library.opcheck(ops.attention, args)
    qh, kh, vh = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    mask = torch.rand(9, 13, device=device) > 0.3
    for args in ((qh, kh, vh, None, 0.0, True, None, True), (qh, kh, vh, mask, 0.0, False, 0.3, True)):
        torch.library.opcheck(ops.scaled_dot_product_attention, args)
    torch.library.opcheck(ops.attention_fwd, (q, k, v, bias, None, None, 9, 13, 0.0, 0.125, True, -1, -1))
    lq, lk = [3, 6], [5, 8]
    qp, kp, vp = (torch.randn(sum(n), h, q.shape[-1], device=device, dtype=dtype, requires_grad=True)
                  for n, h in ((lq, 4), (lk, 2), (lk, 2)))
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    torch.library.opcheck(ops.attention_varlen, (qp, kp, vp, cu_q, cu_k, 6, 8, 0.0, True, -1, -1, None, True, False))
    torch.library.opcheck(ops.attention_fwd, (qp, kp, vp, None, cu_q, cu_k, 6, 8, 0.0, 0.125, False, 2, -1))
    out, lse, rng = ops.attention_fwd(q.detach(), k.detach(), v.detach(), bias.detach(), None, None, 9, 13, 0.0,
                                      0.125, True, -1, -1)
    dout = torch.randn_like(out)
    torch.library.opcheck(ops.attention_bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, bias.detach(), None,
                                              None, 9, 13, 0.0, 0.125, True, -1, -1, rng, False,
                                              [True, True, True, True]))


def test_gradcheck_and_gradgradcheck_float64():
    """The op's own backward (fp64 reference on the CPU) and, through create_graph, second derivatives."""
    q, k, v = _qkv(1, 3, 4, 2, 1, 4, dtype=torch.float64)
    bias = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v, bias)]
    fn = lambda q, k, v, b: fops.attention(q, k, v, attn_bias=b, causal=True, window=(2, -1))  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)
    qp, kp, vp = (torch.randn(n, h, 4, dtype=torch.float64, requires_grad=True) for n, h in ((5, 2), (6, 1), (6, 1)))
    cu_q, cu_k = _cu([2, 3]), _cu([4, 2])
    fv = lambda q, k, v: fops.attention_varlen(q, k, v, cu_q, cu_k, 3, 4, causal=True)  # noqa: E731
    assert torch.autograd.gradcheck(fv, (qp, kp, vp))
    assert torch.autograd.gradgradcheck(fv, (qp, kp, vp))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_native])])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_mask_is_seeded_and_the_backward_uses_it(device, causal):
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    b, nq, nk, hq, hkv, p = 2, 40, 64, 4, 2, 0.3
    d = nk
    q, k, v = _qkv(b, nq, nk, hq, hkv, d, dtype=dtype, device=device)
    eye = torch.eye(nk, device=device, dtype=dtype)[None, :, None, :].expand(b, nk, hkv, nk).contiguous()

    def run(values, seed):
        torch.manual_seed(seed)
        return fops.attention(q, k, values, dropout_p=p, causal=causal)

    a, a2, c = run(v, 1), run(v, 1), run(v, 2)
    assert torch.equal(a, a2), "same seed, same output"
    assert not torch.equal(a, c), "another seed, another mask"
    # The mask, read through v = identity (D == Nk): out = dropout(P) / (1 - p), zero exactly where dropped
    # (or where P is 0, which the mask does not change). The mask depends on the seed alone, not on v.
    keep = run(eye, 1).transpose(1, 2) != 0  # [B, Hq, Nq, Nk]
    visible = attention_mask_ref(nq, nk, causal, -1, -1, device)
    kept = keep[:, :, visible].float().mean().item()
    assert abs(kept - (1 - p)) < 0.03, f"kept fraction {kept}"
    # the forward and every grad equal the reference with that mask
    keep = keep | ~visible
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(1)
    out = fops.attention(*leaves, dropout_p=p, causal=causal)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*ref_leaves, dropout_p=p, causal=causal, dropout_mask=keep)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    low = [t.clone().requires_grad_() for t in (q, k, v)]
    lowp = attention_ref(*low, dropout_p=p, causal=causal, dropout_mask=keep, upcast=False)
    lowp_grads = torch.autograd.grad(lowp, low, dout)
    for name, o, r, t in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *ref_grads], [lowp, *lowp_grads]):
        assert_close_to_ref(o.float(), r.float(), t.float(), name, floor=1e-4 if name == "out" else 1e-3)


def test_forward_mode_ad_and_jvp_of_grad_match_torch():
    q, k, v = _qkv(1, 5, 6, 2, 2, 4, dtype=torch.float64)
    tq = torch.randn_like(q)
    f_ours = lambda q: fops.attention(q, k, v, causal=True)  # noqa: E731
    f_torch = lambda q: attention_ref(q, k, v, causal=True)  # noqa: E731 (torch's CPU SDPA has no forward AD)
    assert max_err(torch.func.jvp(f_ours, (q,), (tq,))[1], torch.func.jvp(f_torch, (q,), (tq,))[1]) < 1e-10
    g_ours = torch.func.jvp(torch.func.grad(lambda q: f_ours(q).pow(2).sum()), (q,), (tq,))[1]
    g_torch = torch.func.jvp(torch.func.grad(lambda q: f_torch(q).pow(2).sum()), (q,), (tq,))[1]
    assert max_err(g_ours, g_torch) < 1e-10


def test_differentiating_the_raw_backward_op_raises():
    if not _native.has_op("attention"):
        pytest.skip("needs the custom ops")
    q, k, v = _qkv(1, 3, 4, 2, 2, 8)
    ops = torch.ops.fusedkernels
    out, lse, rng = ops.attention_fwd(q, k, v, None, None, None, 3, 4, 0.0, 0.3, False, -1, -1)
    qg = q.clone().requires_grad_()
    dq = ops.attention_bwd(torch.ones_like(out), qg, k, v, out, lse, None, None, None, 3, 4, 0.0, 0.3, False, -1, -1,
                           rng, False, [True, True, True, False])[0]
    with pytest.raises(RuntimeError, match="not implemented|does not require grad|derivative"):
        dq.sum().backward()


# fullgraph: the reference reads cu_seqlens on the host (a graph break); the native op keeps it in the graph
@needs_native
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda])])
def test_torch_compile_fullgraph_matches_eager(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = _qkv(2, 33, 47, 4, 2, 64, dtype=dtype, device=device)
    bias = torch.randn(1, 4, 33, 47, device=device, dtype=dtype)

    def f(q, k, v, bias):  # (deterministic: dq without atomics, so compiled and eager agree bitwise)
        out, lse = fops.attention(q, k, v, attn_bias=bias, causal=True, window=(20, -1), return_lse=True,
                                  deterministic=True)
        return out.float().square().sum() + lse.sum()

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        loss = fn(*leaves)
        return [loss.detach()] + list(torch.autograd.grad(loss, leaves))

    eager = grads(f)
    compiled = grads(torch.compile(f, fullgraph=True))
    for a, b in zip(compiled, eager):
        assert max_err(a, b) <= 1e-5 * max(b.abs().max().item(), 1.0)
    # varlen with dynamic shapes
    fv = lambda q, k, v, cq, ck: fops.attention_varlen(q, k, v, cq, ck, 9, 9, causal=True)  # noqa: E731
    cfv = torch.compile(fv, fullgraph=True, dynamic=True)
    for lengths in ([3, 9], [1, 4, 7]):
        qp = torch.randn(sum(lengths), 4, 64, device=device, dtype=dtype)
        kp, vp = (torch.randn(sum(lengths), 2, 64, device=device, dtype=dtype) for _ in range(2))
        cu = _cu(lengths, device)
        assert max_err(cfv(qp, kp, vp, cu, cu), fv(qp, kp, vp, cu, cu)) <= 1e-5


@needs_native  # fx traces the native op as one call; the reference's Python control flow does not trace
def test_fx_symbolic_trace():
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return fops.attention(q, k, v, causal=True)

    traced = torch.fx.symbolic_trace(M())
    q, k, v = _qkv(2, 5, 5, 2, 2, 8)
    assert max_err(traced(q, k, v), M()(q, k, v)) == 0.0


def test_nested_tensors_run_torch_sdpa():
    # nested (jagged) [B, j, H, D]: torch's SDPA runs them
    nested = torch.nested.nested_tensor([torch.randn(3, 2, 8), torch.randn(5, 2, 8)], layout=torch.jagged)
    out = fops.attention(nested, nested, nested)
    for a, x in zip(out.unbind(), nested.unbind()):
        assert max_err(a, _sdpa(x[None], x[None], x[None])[0]) < 1e-6
    with pytest.raises(RuntimeError, match="nested tensors take no attn_bias"):
        fops.attention(nested, nested, nested, window=(1, 1))


def test_without_native_module_ops_run_the_reference(monkeypatch):
    import importlib

    module = importlib.import_module("fusedkernels.ops.attention")

    monkeypatch.setattr(_native, "has_op", lambda name: False)
    fallback = _native.public_op("attention", module._attention_without_native, "the PyTorch reference")
    q, k, v = _qkv(2, 5, 7, 4, 2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU tensors: no warning
        out, lse = fallback(q, k, v, None, 0.0, True, -1, -1, None, True, False)
    want, want_lse = attention_ref(q, k, v, causal=True, return_lse=True)
    assert max_err(out, want) < 1e-6 and max_err(lse, want_lse) < 1e-6


# ------------------------------------------------------------------------------------------------
# The fused kernels (CUDA): against the fp32 reference, tolerance from PyTorch's own low-precision error
# ------------------------------------------------------------------------------------------------

# B, Nq, Nk, Hq, Hkv, D, causal, window, bias: every head dim, lengths 1 .. 4097, Nq != Nk both ways, GQA / MQA,
# causal x window x bias kinds; each case in fp16 and bf16.
KERNEL_CASES = [
    (2, 128, 128, 4, 4, 64, False, None, None),
    (2, 128, 128, 4, 4, 64, True, None, None),
    (1, 1, 1, 2, 2, 32, False, None, None),
    (1, 1, 17, 2, 1, 128, True, None, None),  # top-left causal: the query sees key 0 only
    (3, 17, 17, 6, 2, 96, True, None, "float"),
    (2, 17, 128, 4, 1, 256, False, None, "bool"),
    (2, 128, 17, 4, 2, 64, True, None, "float_broadcast"),
    (2, 200, 70, 4, 4, 32, False, (0, 0), None),  # rows 70.. see no key
    (1, 300, 300, 2, 2, 64, False, None, "bool_rows"),  # some rows masked entirely
    (1, 1000, 1000, 2, 2, 128, True, (64, 0), None),
    (1, 1000, 777, 4, 2, 64, False, (100, 50), "float"),
    (1, 777, 1000, 4, 2, 96, True, None, "float_neg_inf"),
    (1, 4097, 4097, 2, 1, 64, True, None, None),
    (1, 4097, 1000, 2, 2, 128, False, None, None),
    (1, 333, 4097, 2, 2, 256, True, (-1, 8), None),
    (2, 61, 61, 8, 1, 32, True, (5, 5), "bool"),
    # Hopper forward (head dims 64 / 128, no bias): a second warpgroup with one row, several key tiles with a
    # partial last one, Nq != Nk both ways, GQA, windows
    (3, 65, 257, 4, 2, 128, False, None, None),
    (2, 700, 333, 4, 2, 64, False, (100, 50), None),
    (1, 333, 700, 6, 3, 128, True, None, None),
    (2, 513, 513, 2, 1, 128, False, (-1, 0), None),
    (2, 200, 300, 4, 2, 128, True, None, "float"),  # bias in the Hopper forward: a partial second query tile
    (1, 150, 203, 2, 2, 128, False, (60, 20), "float_broadcast"),  # odd bias row stride: element loads
]


def _bias(kind, b, hq, nq, nk, dtype, device):
    if kind is None:
        return None
    if kind == "float":
        return torch.randn(b, hq, nq, nk, device=device).to(dtype)
    if kind == "float_broadcast":
        return torch.randn(1, hq, 1, nk, device=device).to(dtype)
    if kind == "float_neg_inf":  # an additive mask with -inf entries, differentiable
        return torch.randn(b, 1, nq, nk, device=device).masked_fill(torch.rand(b, 1, nq, nk, device=device) < 0.2,
                                                                     float("-inf")).to(dtype)
    mask = torch.rand(b, 1, nq, nk, device=device) > 0.3
    if kind == "bool_rows":
        mask[:, :, ::7] = False
    return mask


def _run_all(fn, q, k, v, bias, dout, dlse=None):
    """out, lse and the grads of q, k, v (and of a float bias) through fn(q, k, v, bias) -> (out, lse), from dout
    (and dlse, lse's gradient, when given)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b = None
    if bias is not None:
        b = bias.detach().clone().requires_grad_(bias.is_floating_point())
        if b.requires_grad:
            leaves.append(b)
    out, lse = fn(*leaves[:3], b)
    outputs, grad_outputs = ((out,), (dout,)) if dlse is None else ((out, lse), (dout, dlse))
    grads = torch.autograd.grad(outputs, leaves, grad_outputs)
    return [out.detach(), lse.detach(), *grads]


def _compare_to_reference(q, k, v, bias, *, causal=False, window=None, scale=None, floor=1e-3):
    """out, lse and the gradients (from dout and from lse's own gradient) against the fp32 reference."""
    dout = torch.randn_like(q)
    dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1], device=q.device)
    kw = dict(causal=causal, window=window, scale=scale, return_lse=True)

    def ref_fn(upcast):
        return lambda q, k, v, b: attention_ref(q, k, v, attn_bias=b, upcast=upcast, **kw)

    cast = lambda t: None if t is None else (t.float() if t.is_floating_point() else t)  # noqa: E731
    ref = _run_all(ref_fn(True), q.float(), k.float(), v.float(), cast(bias), dout.float(), dlse)
    lowp = _run_all(ref_fn(False), q, k, v, bias, dout, dlse)
    poison_allocator(q, q, k, v, lowp[1])
    ours = _run_all(lambda q, k, v, b: fops.attention(q, k, v, attn_bias=b, **kw), q, k, v, bias, dout, dlse)
    names = ["out", "lse", "dq", "dk", "dv", "dbias"]
    for name, o, r, t in zip(names, ours, ref, lowp):
        if name == "lse":
            _check_lse(o, r, t)
            continue
        assert o.dtype == t.dtype and o.shape == t.shape, name
        assert_close_to_ref(o.float(), r.float(), t.float(), name, floor=1e-4 if name == "out" else floor)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
@pytest.mark.parametrize("kernels", ["default", "portable", "sm90"])
def test_kernel_forward_and_grads_match_reference(case, dtype, kernels, monkeypatch):
    # portable: the mma.sync kernels where a Hopper kernel would run by default; sm90: the Hopper forward without
    # warp specialisation where the warp-specialised one would
    if kernels != "default":
        if kernels == "sm90" and torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("the Hopper kernels run on sm_90")
        monkeypatch.setenv("FUSEDKERNELS_ATTENTION_KERNEL", kernels)
    b, nq, nk, hq, hkv, d, causal, window, bias_kind = case
    q, k, v = _qkv(b, nq, nk, hq, hkv, d, dtype=dtype, device="cuda")
    bias = _bias(bias_kind, b, hq, nq, nk, dtype, "cuda")
    _compare_to_reference(q, k, v, bias, causal=causal, window=window)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("case", [(2, 333, 333, 4, 2, 64, None, None), (1, 700, 513, 4, 4, 128, None, "float"),
                                  (2, 300, 300, 8, 2, 128, (64, 0), None)], ids=str)
def test_causal_forward_tiles_in_several_launches(case, monkeypatch):
    """The Hopper forward under a causal mask dispatches tiles slowest, heaviest first, in several launches past a
    grid's z limit (65535): FUSEDKERNELS_ATTENTION_TILES_PER_LAUNCH=2 takes that path on small shapes; it must
    compute what one launch does, bitwise (and the backward from its output and LSE too)."""
    b, nq, nk, hq, hkv, d, window, bias_kind = case
    q, k, v = _qkv(b, nq, nk, hq, hkv, d, dtype=torch.bfloat16, device="cuda")
    bias = _bias(bias_kind, b, hq, nq, nk, torch.bfloat16, "cuda")
    dout = torch.randn_like(q)
    fn = lambda q, k, v, bb: fops.attention(q, k, v, attn_bias=bb, causal=True, window=window,  # noqa: E731
                                            return_lse=True, deterministic=True)
    one = _run_all(fn, q, k, v, bias, dout)
    monkeypatch.setenv("FUSEDKERNELS_ATTENTION_TILES_PER_LAUNCH", "2")
    poison_allocator(q, q, k, v)
    several = _run_all(fn, q, k, v, bias, dout)
    for name, o, w in zip(["out", "lse", "dq", "dk", "dv", "dbias"], several, one):
        assert torch.equal(o, w), name
    _compare_to_reference(q, k, v, bias, causal=True, window=window)  # (and right, under the split launches)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("split", ["1", "2", "8"])
@pytest.mark.parametrize("case", [(2, 333, 333, 8, 2, 64, True, None), (1, 300, 257, 4, 1, 128, False, "float"),
                                  (2, 200, 200, 6, 2, 128, True, None)], ids=str)
def test_gqa_backward_with_the_q_heads_split_or_not(case, split, monkeypatch):
    """With grouped-query attention the Hopper dK dV kernel may split a kv head's q heads over CTAs and add their
    dK, dV in an fp32 accumulator (automatic at small batch, as most GQA tests here run it; a divisor of the group
    up to FUSEDKERNELS_ATTENTION_KV_SPLIT when set): one CTA per kv head and two must be right too, and so must a
    packed (varlen) batch."""
    monkeypatch.setenv("FUSEDKERNELS_ATTENTION_KV_SPLIT", split)
    b, nq, nk, hq, hkv, d, causal, bias_kind = case
    q, k, v = _qkv(b, nq, nk, hq, hkv, d, dtype=torch.bfloat16, device="cuda")
    _compare_to_reference(q, k, v, _bias(bias_kind, b, hq, nq, nk, torch.bfloat16, "cuda"), causal=causal)
    lengths, lk = [70, 0, 333], [75, 9, 330]
    qp = torch.randn(sum(lengths), hq, d, device="cuda").to(torch.bfloat16)
    kp, vp = (torch.randn(sum(lk), hkv, d, device="cuda").to(torch.bfloat16) for _ in range(2))
    cu_q, cu_k = _cu(lengths, "cuda"), _cu(lk, "cuda")
    dout = torch.randn_like(qp)

    def fn(upcast=None):
        if upcast is None:
            return lambda q, k, v, _: fops.attention_varlen(q, k, v, cu_q, cu_k, max(lengths), max(lk), causal=causal,
                                                            return_lse=True)
        return lambda q, k, v, _: attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=upcast, causal=causal,
                                                       return_lse=True)

    ref = _run_all(fn(True), qp.float(), kp.float(), vp.float(), None, dout.float())
    lowp = _run_all(fn(False), qp, kp, vp, None, dout)
    poison_allocator(qp, qp, kp, vp, lowp[1])
    ours = _run_all(fn(), qp, kp, vp, None, dout)
    for name, o, r, t in zip(["out", "lse", "dq", "dk", "dv"], ours, ref, lowp):
        if name != "lse":
            assert_close_to_ref(o.float(), r.float(), t.float(), f"varlen {name}", floor=1e-4 if name == "out" else 1e-3)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("case", [(2, 333, 336, 4, 4, 128, True, None), (1, 17, 1000, 4, 2, 64, False, None),
                                  (2, 300, 257, 8, 2, 128, False, (64, 16)), (1, 1, 5, 2, 1, 64, True, None),
                                  (3, 129, 129, 2, 2, 64, True, None), (1, 513, 704, 2, 1, 128, False, None),
                                  (1, 300, 104, 2, 1, 128, False, (0, 0)), (2, 33, 40, 4, 2, 128, True, None),
                                  (1, 200, 64, 4, 1, 64, True, None)], ids=str)
@pytest.mark.parametrize("bias_kind", [None, "float"], ids=["", "bias"])
def test_warp_specialised_kernels(case, bias_kind, dtype, monkeypatch):
    """FUSEDKERNELS_ATTENTION_KERNEL=sm90ws runs the warp-specialised Hopper forward (TMA producer, ping-pong
    consumers) and backward (TMA producer, dQ by TMA reduce-add) wherever they can take the call (the forward by
    default not at head dim 64 over 512 keys or fewer): odd and unequal lengths, GQA, causal, windows (query tiles that see no key),
    a tile whose second consumer has only rows past the end, key tiles shorter than one 64-key bias box, more
    queries than keys under a causal mask, both head dims, with and without a bias (odd key counts: rows not
    16-byte aligned take the plain kernel); against the reference, and in several launches of the causal order
    too."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernels run on sm_90")
    monkeypatch.setenv("FUSEDKERNELS_ATTENTION_KERNEL", "sm90ws")
    b, nq, nk, hq, hkv, d, causal, window = case
    q, k, v = _qkv(b, nq, nk, hq, hkv, d, dtype=dtype, device="cuda")
    bias = _bias(bias_kind, b, hq, nq, nk, dtype, "cuda")
    _compare_to_reference(q, k, v, bias, causal=causal, window=window)
    if causal:
        monkeypatch.setenv("FUSEDKERNELS_ATTENTION_TILES_PER_LAUNCH", "2")
        _compare_to_reference(q, k, v, bias, causal=causal, window=window)


@pytest.mark.cuda
@needs_native
def test_warp_specialised_forward_is_what_runs_and_hands_on_what_it_does_not_take():
    if not hopper_kernels_run():
        pytest.skip("the Hopper kernels run on sm_90 from a build with sm_90a code")
    q, k, v = _qkv(2, 300, 300, 4, 2, 128, dtype=torch.bfloat16, device="cuda")
    names = _cuda_kernels_run(lambda: fops.attention(q, k, v, causal=True))
    assert any("attention_fwd_sm90_ws_kernel" in n for n in names), names
    # SDPA's [B, H, N, D] views: the maps take the strides as they are
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    names = _cuda_kernels_run(lambda: fops.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True))
    assert any("attention_fwd_sm90_ws_kernel" in n for n in names), names
    # biases (296 keys: 16-byte rows, which TMA needs): full, broadcast over the batch or the heads (by TMA too),
    # and (B, H, 1, Nk), broadcast over the query rows (the plain Hopper kernel); all right
    qb, kb, vb = _qkv(2, 300, 296, 4, 2, 128, dtype=torch.bfloat16, device="cuda")
    for shape, ws in [((2, 4, 300, 296), True), ((1, 4, 300, 296), True), ((2, 1, 300, 296), True),
                      ((2, 4, 1, 296), False)]:
        bias = torch.randn(shape, device="cuda").to(torch.bfloat16)
        names = _cuda_kernels_run(lambda: fops.attention(qb, kb, vb, attn_bias=bias, causal=True))
        assert any("attention_fwd_sm90_ws_kernel" in n for n in names) == ws, (shape, names)
        assert any("attention_fwd_sm90" in n for n in names), (shape, names)
        _compare_to_reference(qb, kb, vb, bias, causal=True)
    # a packed batch runs the plain Hopper kernel, and is right
    lengths = [70, 1, 229]
    qp, kp, vp = (t.reshape(600, *t.shape[2:])[:300] for t in (q, k, v))
    cu = _cu(lengths, "cuda")
    out = fops.attention_varlen(qp, kp, vp, cu, cu, max(lengths), max(lengths), causal=True)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        want = attention_ref(qp[s:e][None].float(), kp[s:e][None].float(), vp[s:e][None].float(), causal=True)
        lowp = attention_ref(qp[s:e][None], kp[s:e][None], vp[s:e][None], causal=True, upcast=False)
        assert_close_to_ref(out[s:e][None].float(), want, lowp.float(), f"varlen sequence {i}", floor=1e-4)


def _cuda_kernels_run(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.cuda
@needs_native
def test_hopper_kernels_are_what_runs_on_sm90(monkeypatch):
    if not hopper_kernels_run():
        pytest.skip("the Hopper kernels run on sm_90 from a build with sm_90a code")
    q, k, v = _qkv(1, 300, 300, 2, 2, 128, dtype=torch.bfloat16, device="cuda")
    names = _cuda_kernels_run(lambda: fops.attention(q, k, v, causal=True))
    assert any("attention_fwd_sm90_ws_kernel" in n for n in names), names
    # head dim 64: the plain Hopper forward over at most 512 keys, the warp-specialised one past that
    for nk, ws in [(512, False), (513, True)]:
        q64, k64, v64 = _qkv(1, 200, nk, 2, 2, 64, dtype=torch.bfloat16, device="cuda")
        names = _cuda_kernels_run(lambda: fops.attention(q64, k64, v64))
        assert any("attention_fwd_sm90" in n for n in names), names
        assert any("attention_fwd_sm90_ws_kernel" in n for n in names) == ws, (nk, names)
    with monkeypatch.context() as env:  # the Hopper forward without warp specialisation, when asked for
        env.setenv("FUSEDKERNELS_ATTENTION_KERNEL", "sm90")
        names = _cuda_kernels_run(lambda: fops.attention(q, k, v, causal=True))
        assert any("attention_fwd_sm90_kernel" in n for n in names) and not any("_ws_" in n for n in names), names
    grad_inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fops.attention(*grad_inputs, causal=True)
    names = _cuda_kernels_run(lambda: out.backward(torch.randn_like(out)))
    assert any("attention_bwd_dkdv_sm90_ws_kernel" in n for n in names), names
    with monkeypatch.context() as env:  # the Hopper backward without warp specialisation, when asked for
        env.setenv("FUSEDKERNELS_ATTENTION_KERNEL", "sm90")
        out = fops.attention(*grad_inputs, causal=True)
        names = _cuda_kernels_run(lambda: out.backward(torch.randn_like(out)))
        assert any("attention_bwd_dkdv_sm90_kernel" in n for n in names) and not any("_ws_" in n for n in names)
    bias = torch.randn(1, 2, 300, 300, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = fops.attention(*grad_inputs, attn_bias=bias)
    names = _cuda_kernels_run(lambda: out.backward(torch.randn_like(out)))
    # 300 keys: bias rows of 600 bytes, which TMA cannot read (16-byte multiples): the plain backward
    assert any("attention_bwd_dkdv_sm90_kernel" in n for n in names), names
    qkv296 = _qkv(1, 300, 296, 2, 2, 128, dtype=torch.bfloat16, device="cuda")
    qb, kb, vb = (t.detach().requires_grad_() for t in qkv296)
    bias296 = torch.randn(1, 2, 300, 296, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = fops.attention(qb, kb, vb, attn_bias=bias296)
    names = _cuda_kernels_run(lambda: out.backward(torch.randn_like(out)))
    assert any("attention_bwd_dkdv_sm90_ws_kernel" in n for n in names), names
    names = _cuda_kernels_run(lambda: fops.attention(q, k, v, attn_bias=bias.detach()))
    assert any("attention_fwd_sm90" in n for n in names), names
    names = _cuda_kernels_run(lambda: fops.attention(q, k, v, dropout_p=0.1))  # dropout keeps the portable one
    assert not any("sm90" in n for n in names) and any("attention_fwd_kernel" in n for n in names), names
    monkeypatch.setenv("FUSEDKERNELS_ATTENTION_KERNEL", "portable")
    names = _cuda_kernels_run(lambda: fops.attention(q, k, v, causal=True))
    assert not any("sm90" in n for n in names) and any("attention_fwd_kernel" in n for n in names), names


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_large_logits_do_not_overflow(dtype, d):
    q, k, v = _qkv(2, 257, 300, 4, 2, d, dtype=dtype, device="cuda", scale=30.0)
    _compare_to_reference(q, k, v, None, causal=True)
    _compare_to_reference(q, k, v, None, scale=1.0)  # scores in the hundreds


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", [None, (32, 0)], ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=str)
@pytest.mark.parametrize("lengths", [[1, 17, 128, 0, 1000], [4097], [5, 300, 64, 33]], ids=str)
def test_kernel_varlen_matches_per_sequence_reference(dtype, causal, window, heads, lengths):
    d = {1: 128, 5: 64, 4097: 32}[lengths[0]]
    hq, hkv = heads
    lk = [max(n - 3, 0) if i % 2 else n + 5 for i, n in enumerate(lengths)]  # Nk != Nq per sequence
    q = torch.randn(sum(lengths), hq, d, device="cuda").to(dtype)
    k = torch.randn(sum(lk), hkv, d, device="cuda").to(dtype)
    v = torch.randn(sum(lk), hkv, d, device="cuda").to(dtype)
    cu_q, cu_k = _cu(lengths, "cuda"), _cu(lk, "cuda")
    dout = torch.randn_like(q)
    kw = dict(causal=causal, window=window, return_lse=True)

    def ref_fn(upcast):
        return lambda q, k, v, _: attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=upcast, **kw)

    ref = _run_all(ref_fn(True), q.float(), k.float(), v.float(), None, dout.float())
    lowp = _run_all(ref_fn(False), q, k, v, None, dout)
    poison_allocator(q, q, k, v, lowp[1])
    ours = _run_all(lambda q, k, v, _: fops.attention_varlen(q, k, v, cu_q, cu_k, max(lengths), max(lk), **kw),
                    q, k, v, None, dout)
    for name, o, r, t in zip(["out", "lse", "dq", "dk", "dv"], ours, ref, lowp):
        if name == "lse":
            _check_lse(o, r, t)
        else:
            assert_close_to_ref(o.float(), r.float(), t.float(), name, floor=1e-4 if name == "out" else 1e-3)


@pytest.mark.cuda
@needs_native
def test_kernel_strided_inputs_and_sdpa_wrapper():
    """Slices of a packed qkv and SDPA's [B, H, N, D] views run without copies and match the reference."""
    qkv = torch.randn(2, 150, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    _compare_to_reference(q, k, v, None, causal=True)
    qh, kh, vh = (torch.randn(2, 4, 150, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.rand(150, 150, device="cuda") > 0.1
    ours = fops.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    ref = F.scaled_dot_product_attention(qh.float(), kh.float(), vh.float(), attn_mask=mask)
    lowp = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    assert ours.shape == qh.shape
    assert_close_to_ref(ours.float(), ref, lowp.float(), "sdpa out", floor=1e-4)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("kernels", ["default", "portable"])
@pytest.mark.parametrize("packed", [False, True], ids=["contiguous", "packed"])
def test_kernel_sdpa_heads_first_forward_grads_and_layouts(kernels, packed, monkeypatch):
    """SDPA's [B, H, N, D] tensors on the kernels as they are (heads_first), GQA and a mask: out and grads match
    torch's SDPA in fp32, out over [B, N, H, D] memory, grads laid out as empty_like of each input."""
    if kernels == "portable":
        monkeypatch.setenv("FUSEDKERNELS_ATTENTION_KERNEL", "portable")
    b, n, hq, hkv, d = 2, 150, 4, 2, 64
    if packed:  # [B, N, Hq + 2 Hkv, D] of a fused projection, split and viewed heads first: not dense
        qkv = torch.randn(b, n, hq + 2 * hkv, d, device="cuda", dtype=torch.bfloat16)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([hq, hkv, hkv], dim=2))
    else:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    mask = torch.rand(n, n, device="cuda") > 0.1
    dout = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16)

    def run(fn, dtype):
        leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, attn_mask=mask, enable_gqa=True)
        return [out, *torch.autograd.grad(out, leaves, dout.to(dtype))]

    ours = run(fops.scaled_dot_product_attention, torch.bfloat16)
    ref = run(F.scaled_dot_product_attention, torch.float32)
    lowp = run(F.scaled_dot_product_attention, torch.bfloat16)
    for name, o, r, t in zip(["out", "dq", "dk", "dv"], ours, ref, lowp):
        assert o.shape == t.shape and o.dtype == t.dtype, name
        assert_close_to_ref(o.float(), r, t.float(), name, floor=1e-4 if name == "out" else 1e-3)
    assert ours[0].stride() == _heads_first_out_strides(ours[0].shape)
    for g, t in zip(ours[1:], (q, k, v)):
        assert g.stride() == torch.empty_like(t).stride()


@pytest.mark.cuda
@needs_native
def test_kernel_empty_and_no_key_sizes():
    for b, nq, nk in ((2, 0, 5), (2, 5, 0), (0, 5, 5)):
        q, k, v = _qkv(b, nq, nk, 2, 2, 64, dtype=torch.bfloat16, device="cuda")
        leaves = [t.requires_grad_() for t in (q, k, v)]
        out, lse = fops.attention(*leaves, return_lse=True)
        assert (out == 0).all() and (lse == float("-inf")).all()
        out.float().sum().backward()
        assert all((t.grad == 0).all() for t in leaves)


@pytest.mark.cuda
@needs_native
def test_kernel_deterministic_backward_is_bitwise_reproducible():
    q, k, v = _qkv(2, 1000, 1000, 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn_like(q)
    bias = torch.randn(1, 8, 1000, 1000, device="cuda", dtype=torch.bfloat16)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = fops.attention(*leaves[:3], attn_bias=leaves[3], causal=True, deterministic=True)
        return torch.autograd.grad(out, leaves, dout)

    first = grads()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))


@pytest.mark.cuda
@needs_native
def test_kernel_double_backward():
    """create_graph=True: the backward is computed with differentiable ops (dropout 0), else a clear error."""
    q, k, v = _qkv(1, 40, 50, 4, 2, 64, dtype=torch.bfloat16, device="cuda")

    def second(fn, dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
        first = torch.autograd.grad(fn(*leaves).float().square().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((g.float() ** 2).sum() for g in first), leaves)

    ours = second(lambda q, k, v: fops.attention(q, k, v, causal=True), torch.bfloat16)
    ref = second(lambda q, k, v: attention_ref(q, k, v, causal=True), torch.float32)
    lowp = second(lambda q, k, v: attention_ref(q, k, v, causal=True, upcast=False), torch.bfloat16)
    for name, o, r, t in zip(["d2q", "d2k", "d2v"], ours, ref, lowp):
        assert_close_to_ref(o.float(), r, t.float(), name, floor=1e-3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fops.attention(*leaves, dropout_p=0.1)
    with pytest.raises(RuntimeError, match="dropout_p > 0 cannot be differentiated"):
        torch.autograd.grad(out.float().sum(), leaves, create_graph=True)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_kernel_cuda_graph_capture_and_replay(dropout_p):
    """Forward and backward captured in a graph; each replay equals an eager run from the generator state the
    replay started at (dropout included: the captured call reads the seed and offset at replay time)."""
    shape = (2, 130, 130, 4, 2, 64)
    static = [t.requires_grad_() for t in _qkv(*shape, dtype=torch.bfloat16, device="cuda")]
    dout = torch.randn_like(static[0])

    def step(q, k, v):
        out = fops.attention(q, k, v, causal=True, dropout_p=dropout_p, deterministic=True)
        return [out, *torch.autograd.grad(out, (q, k, v), dout)]

    check_graph_replays(step, static, lambda: _qkv(*shape, dtype=torch.bfloat16, device="cuda"),
                        ["out", "dq", "dk", "dv"], ulps=0)


@pytest.mark.cuda
@needs_native
def test_kernel_dropout_replays_draw_new_masks():
    q, k, v = (t.requires_grad_(False) for t in _qkv(1, 64, 64, 2, 2, 64, dtype=torch.bfloat16, device="cuda"))
    fops.attention(q, k, v, dropout_p=0.5)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fops.attention(q, k, v, dropout_p=0.5)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)


@pytest.mark.cuda
@needs_native
def test_inputs_without_a_kernel_run_the_reference_with_one_warning():
    cases = [
        _qkv(1, 9, 11, 2, 2, 64, dtype=torch.float32, device="cuda"),  # float32
        _qkv(1, 9, 11, 2, 2, 80, dtype=torch.bfloat16, device="cuda"),  # head_dim without a kernel
        _qkv(1, 9, 11, 2, 2, 32, dtype=torch.float64, device="cuda"),
    ]
    for q, k, v in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = fops.attention(q, k, v, causal=True)
            b = fops.attention(q, k, v, causal=True)
        assert len([w for w in caught if "instead" in str(w.message)]) <= 1
        assert a.dtype == q.dtype and torch.equal(a, b)
        assert max_err(a, attention_ref(q, k, v, causal=True)) <= (2e-2 if q.dtype == torch.bfloat16 else 1e-5)


@pytest.mark.cuda
@needs_native
def test_autocast_casts_like_torch_sdpa():
    q, k, v = _qkv(2, 33, 40, 4, 4, 64, device="cuda")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = fops.attention(*leaves, causal=True)
        want = _sdpa(*leaves, is_causal=True)
    assert ours.dtype == want.dtype == torch.bfloat16
    ours.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in leaves)
    assert max_err(ours, want) < 2e-2


@pytest.mark.cuda
@needs_native
def test_every_visible_gpu():
    for index in range(torch.cuda.device_count()):
        device = f"cuda:{index}"
        q, k, v = _qkv(1, 100, 100, 2, 2, 64, dtype=torch.bfloat16, device=device)
        out = fops.attention(q, k, v, causal=True)
        assert out.device == q.device
        assert max_err(out, attention_ref(q, k, v, causal=True)) < 2e-2


# ------------------------------------------------------------------------------------------------
# Faults a user-style review found (each kind, on the CPU path: the op layer is the same on CUDA)
# ------------------------------------------------------------------------------------------------


def test_cpu_autocast_casts_like_torch_sdpa():
    q, k, v = (torch.randn(2, 3, 5, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.scaled_dot_product_attention(q, k, v)
        ours = fops.scaled_dot_product_attention(q, k, v)
        mixed = fops.attention(q.transpose(1, 2).bfloat16(), k.transpose(1, 2), v.transpose(1, 2))
    assert ours.dtype == want.dtype == torch.bfloat16 and mixed.dtype == torch.bfloat16
    assert max_err(ours, want) < 2e-2


def test_dropout_p_one_gives_zeros_and_zero_grads():
    q, k, v = (torch.randn(2, 5, 2, 8, requires_grad=True) for _ in range(3))
    out = fops.attention(q, k, v, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    torch_out = F.scaled_dot_product_attention(*(t.detach().transpose(1, 2) for t in (q, k, v)), dropout_p=1.0)
    assert torch.equal(fops.scaled_dot_product_attention(*(t.detach().transpose(1, 2) for t in (q, k, v)),
                                                         dropout_p=1.0), torch_out)
    with pytest.raises(RuntimeError, match="dropout_p"):
        fops.attention(q, k, v, dropout_p=1.5)


def test_zero_heads_give_empty_results_as_torch():
    q = torch.randn(2, 0, 5, 8)
    # torch's own answer, (2, 0, 5, 8), written out: torch 2.11's CPU SDPA dies of SIGFPE on zero heads
    assert fops.scaled_dot_product_attention(q, q, q).shape == (2, 0, 5, 8)
    out, lse = fops.attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), return_lse=True)
    assert out.shape == (2, 5, 0, 8) and lse.shape == (2, 0, 5)
    # every input gets an (empty) gradient, as torch's: none is left out of the graph
    leaves = [torch.randn(2, 0, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    grads = torch.autograd.grad(fops.scaled_dot_product_attention(*leaves).sum(), leaves, allow_unused=True)
    assert all(g is not None and g.shape == t.shape for g, t in zip(grads, leaves))


@pytest.mark.parametrize(
    "cu_q, max_q, match",
    [([2, 6], 6, "start at 0"), ([0, 5, 3, 6], 6, "non-decreasing"), ([0, 10], 10, "rows"), ([0, 6], 4, "max_seqlen")],
)
def test_varlen_cu_seqlens_checked_on_cpu(cu_q, max_q, match):
    q, k, v = (torch.randn(6, 2, 8) for _ in range(3))
    cu = torch.tensor(cu_q, dtype=torch.int32)
    cu_k = torch.tensor([0] * (len(cu_q) - 1) + [6], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        fops.attention_varlen(q, k, v, cu, cu_k, max_q, 6)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_sdpa_mask_of_fewer_than_two_dims_as_torch(mask_dtype):
    """A 0-D or 1-D attn_mask goes to torch's op, which decides (torch 2.14 raises IndexError on the CPU)."""
    q = k = v = torch.randn(1, 2, 3, 4)
    for mask in (torch.ones(3, dtype=mask_dtype), torch.ones((), dtype=mask_dtype)):
        try:
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        except Exception as e:  # noqa: BLE001 - whatever torch raises, ours raises
            with pytest.raises(type(e)):
                fops.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            assert max_err(fops.scaled_dot_product_attention(q, k, v, attn_mask=mask), want) < 1e-6
