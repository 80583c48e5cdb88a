"""fusedkernels.ops.apply_rotary, linear_cross_entropy and nn.FusedLinearCrossEntropyLoss.

`impl` "op" calls the public op (the native op where built, else the reference); "python" calls the reference that
runs without the native module, with its checks, so CI covers both whatever it built."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedkernels.nn as fnn
import fusedkernels.ops as fops
from fusedkernels import _native
from fusedkernels.ops import llm

from .helpers import DEVICES, DTYPES, assert_close_to_ref, capture_graph, check_graph_replays, max_err, poison_allocator

needs_native = pytest.mark.skipif(not _native.has_op("apply_rotary"),
                                  reason=f"the llm family is not in this build ({_native.error})")
IMPLS = ["op", "python"]


# ------------------------------------------------------------------------------------------------
# Rotary
# ------------------------------------------------------------------------------------------------


def _rotary(impl, q, k, cos, sin, **kw):
    if impl == "op":
        return fops.apply_rotary(q, k, cos, sin, **kw)
    return llm._rotary_without_native(q, k, cos, sin, kw.get("position_ids"), kw.get("interleaved", False),
                                      kw.get("layout", "bhnd"))


def _hf_rotate_half(x):  # Hugging Face's, verbatim
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _hf_rotary(q, k, cos, sin, layout="bhnd", interleaved=False):
    """HF's apply_rotary_pos_emb (unsqueeze_dim 1 for bhnd, 2 for bnhd) with partial rotary as Phi / NeoX write it,
    in the inputs' dtype: the formula the op replaces, and torch's own rounding for the tolerance."""
    cos, sin = (cos[None], sin[None]) if cos.dim() == 2 else (cos, sin)  # HF's [batch, seq, rotary_dim]
    cos, sin = cos.unsqueeze(1 if layout == "bhnd" else 2), sin.unsqueeze(1 if layout == "bhnd" else 2)
    r = cos.shape[-1]
    rot = llm.rotate_half if interleaved else (lambda x, _=None: _hf_rotate_half(x))
    out = []
    for x in (q, k):
        xr, xp = x[..., :r], x[..., r:]
        out.append(torch.cat(((xr * cos) + (rot(xr, interleaved) * sin), xp), -1))
    return out


def _tables(batch, seq, rotary_dim, device, dtype, per_batch=False, interleaved=False):
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim))
    pos = torch.arange(seq, device=device).float()
    pos = pos + torch.arange(batch, device=device)[:, None] * 3 if per_batch else pos[None]
    freqs = pos[..., None] * inv  # [1 or batch, seq, rotary_dim / 2]
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    return (cos, sin) if per_batch else (cos[0], sin[0])


ROTARY_CASES = [
    # batch, heads_q, heads_k, seq, head_dim, rotary_dim, layout, interleaved, per_batch tables
    (2, 4, 2, 7, 64, 64, "bhnd", False, False),
    (1, 8, 1, 33, 128, 128, "bnhd", False, True),
    (2, 3, 3, 5, 96, 32, "bhnd", True, False),   # partial rotary, interleaved
    (3, 2, 1, 9, 10, 6, "bnhd", False, False),   # odd sizes: the element path on CUDA
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROTARY_CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_rotary_matches_hf_formula(device, dtype, case, impl):
    b, hq, hk, n, d, r, layout, interleaved, per_batch = case
    shape = (lambda h: (b, h, n, d)) if layout == "bhnd" else (lambda h: (b, n, h, d))
    q = torch.randn(shape(hq), device=device, dtype=dtype)
    k = torch.randn(shape(hk), device=device, dtype=dtype)
    cos, sin = _tables(b, n, r, device, dtype, per_batch, interleaved)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def run(fn, q, k, cos, sin, dq, dk):
        ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
        qo, ko = fn(ql, kl, cos, sin)
        torch.autograd.backward([qo, ko], [dq, dk])
        return [qo.detach(), ko.detach(), ql.grad, kl.grad]

    ref = run(lambda *a: _hf_rotary(*a, layout=layout, interleaved=interleaved), q.double(), k.double(),
              cos.double(), sin.double(), dq.double(), dk.double())
    lowp = run(lambda *a: _hf_rotary(*a, layout=layout, interleaved=interleaved), q, k, cos, sin, dq, dk)
    poison_allocator(q, k)
    ours = run(lambda *a: _rotary(impl, *a, layout=layout, interleaved=interleaved), q, k, cos, sin, dq, dk)
    for name, o, rf, t in zip(["q_out", "k_out", "dq", "dk"], ours, ref, lowp):
        assert o.dtype == dtype, name
        assert_close_to_ref(o, rf, t, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_rotary_fp32_tables_and_strided_inputs(device, impl):
    """bf16 q / k with float32 tables (read in fp32), q as HF makes it (a transposed view of the projection)."""
    b, n, hq, hk, d = 2, 11, 4, 2, 64
    q = torch.randn(b, n, hq * d, device=device, dtype=torch.bfloat16).view(b, n, hq, d).transpose(1, 2)
    k = torch.randn(b, n, hk * d, device=device, dtype=torch.bfloat16).view(b, n, hk, d).transpose(1, 2)
    cos, sin = _tables(b, n, d, device, torch.float32, per_batch=True)
    qo, ko = _rotary(impl, q, k, cos, sin)
    rq, rk = _hf_rotary(q.double(), k.double(), cos.double(), sin.double())
    lq, lk = _hf_rotary(q.float(), k.float(), cos, sin)  # torch: promoted to fp32
    assert qo.dtype == torch.bfloat16 and qo.shape == q.shape
    assert_close_to_ref(qo.double(), rq, lq.to(torch.bfloat16), "q_out")
    assert_close_to_ref(ko.double(), rk, lk.to(torch.bfloat16), "k_out")
    # the outputs keep the projection's memory layout (attention then gets q, k and v alike, and copies none), and
    # the native op's gradients too, from grads in that layout
    assert qo.stride() == q.stride() and ko.stride() == k.stride(), (qo.stride(), q.stride())
    if impl != "op" or not _native.has_op("apply_rotary"):
        return
    qr, kr = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, ko = _rotary(impl, qr, kr, cos, sin)
    dq, dk = torch.autograd.grad([qo, ko], [qr, kr], [torch.randn_like(q), torch.randn_like(k)])
    assert dq.stride() == q.stride() and dk.stride() == k.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("path", ["kernel", "learned_tables", "forward_ad"])
def test_rotary_outputs_keep_the_layout_on_every_path(device, impl, path):
    """Partial rotary (the pass-through part joined by a concatenation) on the heads-first view of a projection:
    the outputs keep its memory layout whichever path computes them (the kernel, the differentiable reference for
    learned tables or for tangents), and their values are HF's."""
    import torch.autograd.forward_ad as fwAD

    b, n, h, d, r = 2, 5, 4, 8, 6
    q = torch.randn(b, n, h * d, device=device).view(b, n, h, d).transpose(1, 2)
    k = torch.randn(b, n, h * d, device=device).view(b, n, h, d).transpose(1, 2)
    angles = torch.rand(n, r // 2, device=device)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    if path == "learned_tables":
        cos, sin = cos.requires_grad_(), sin.requires_grad_()
    with warnings.catch_warnings(), fwAD.dual_level():
        warnings.simplefilter("ignore")  # (the reference's warning on CUDA)
        q_in = fwAD.make_dual(q, torch.randn_like(q)) if path == "forward_ad" else q
        qo, ko = _rotary(impl, q_in, k, cos, sin)
        qo = fwAD.unpack_dual(qo).primal
    assert qo.stride() == q.stride() and ko.stride() == k.stride(), (qo.stride(), q.stride())
    rq, rk = _hf_rotary(q.double(), k.double(), cos.detach().double(), sin.detach().double())
    assert max_err(qo, rq) < 1e-5 and max_err(ko, rk) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_rotary_position_ids_for_packed_sequences(device, impl):
    """Packed sequences (batch 1): positions restart at each sequence; the table rows are gathered per token."""
    lengths, d, table_rows = [5, 1, 9], 32, 16
    n = sum(lengths)
    position_ids = torch.cat([torch.arange(L) for L in lengths]).to(device)
    cos, sin = _tables(1, table_rows, d, device, torch.float32)
    q = torch.randn(1, 3, n, d, device=device)
    k = torch.randn(1, 1, n, d, device=device)
    for ids in (position_ids, position_ids[None].int()):
        qo, ko = _rotary(impl, q, k, cos, sin, position_ids=ids)
        rq, rk = _hf_rotary(q.double(), k.double(), cos[position_ids][None].double(), sin[position_ids][None].double())
        assert max_err(qo, rq) < 1e-5 and max_err(ko, rk) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_rotary_inplace(device, impl):
    q = torch.randn(2, 4, 6, 32, device=device, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 6, 32, device=device, dtype=torch.bfloat16)
    cos, sin = _tables(2, 6, 32, device, torch.bfloat16)
    want_q, want_k = _rotary("op", q, k, cos, sin)
    qi, ki = q.clone(), k.clone()
    ptr = qi.data_ptr()
    if impl == "op":
        out = fops.apply_rotary(qi, ki, cos, sin, inplace=True)
        assert out[0] is qi and out[1] is ki and qi.data_ptr() == ptr
    else:
        llm._rotary_inplace_without_native(qi, ki, cos, sin)
    assert torch.equal(qi, want_q) and torch.equal(ki, want_k)
    # under autograd: a non-leaf is written through a recorded copy; the gradient is the rotation's
    x = torch.randn(2, 4, 6, 32, device=device, requires_grad=True)
    y = torch.randn(2, 2, 6, 32, device=device, requires_grad=True)
    qa, ka = x * 1, y * 1
    fops.apply_rotary(qa, ka, cos.float(), sin.float(), inplace=True)
    (qa.square().sum() + ka.sum()).backward()
    xr, yr = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    rq, rk = _hf_rotary(xr, yr, cos.double(), sin.double())
    (rq.square().sum() + rk.sum()).backward()
    assert max_err(x.grad, xr.grad) < 1e-4 and max_err(y.grad, yr.grad) < 1e-5
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fops.apply_rotary(x, y, cos.float(), sin.float(), inplace=True)
    # without grad, the kernel's write moves q's and k's version counters: a backward through a value saved before
    # it raises instead of reading the rotated one (as after any in-place op)
    w = torch.randn_like(qi, requires_grad=True)
    product = (w * qi).sum()
    versions = qi._version, ki._version
    fops.apply_rotary(qi, ki, cos, sin, inplace=True)
    assert qi._version > versions[0] and ki._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_rotary_inplace_with_a_learned_table(device, impl):
    """In place with cos / sin that require grad (the table's gradient reads q and k, which the write replaces):
    the gradients of q, k, cos and sin are those of the out-of-place call."""
    x = torch.randn(1, 2, 5, 8, device=device, requires_grad=True)
    y = torch.randn(1, 1, 5, 8, device=device, requires_grad=True)
    c = torch.randn(5, 8, device=device, requires_grad=True)
    s_ = torch.randn(5, 8, device=device, requires_grad=True)
    leaves = [x, y, c, s_]
    qo, ko = fops.apply_rotary(x * 1, y * 1, c, s_)
    want = torch.autograd.grad(qo.square().sum() + ko.sum(), leaves)
    qa, ka = x * 1, y * 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (CUDA: the reference, with its one warning)
        if impl == "op":
            fops.apply_rotary(qa, ka, c, s_, inplace=True)
        else:
            llm._rotary_inplace_without_native(qa, ka, c, s_)
    got = torch.autograd.grad(qa.square().sum() + ka.sum(), leaves)
    for g, w in zip(got, want):
        assert max_err(g, w) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_output_needs_grad_only_where_its_input_does(device):
    """A frozen k (LoRA on q only, a cached key) gives a k_out outside the graph, as HF's products do; in place, k
    stays a plain tensor. Both ways round, and the gradient that flows is the rotation's."""
    cos, sin = _tables(1, 6, 16, device, torch.float32)
    for q_grad, k_grad in ((True, False), (False, True)):
        q = torch.randn(1, 4, 6, 16, device=device, requires_grad=q_grad)
        k = torch.randn(1, 2, 6, 16, device=device, requires_grad=k_grad)
        qo, ko = fops.apply_rotary(q, k, cos, sin)
        assert (qo.requires_grad, ko.requires_grad) == (q_grad, k_grad)
        leaf, out = (q, qo) if q_grad else (k, ko)
        (grad,) = torch.autograd.grad(out.square().sum(), leaf)
        ref = leaf.detach().double().requires_grad_()
        rq, rk = _hf_rotary(ref if q_grad else q.double(), ref if k_grad else k.double(), cos.double(), sin.double())
        (want,) = torch.autograd.grad((rq if q_grad else rk).square().sum(), ref)
        assert max_err(grad, want) < 1e-4
    q, k = torch.randn(1, 4, 6, 16, device=device, requires_grad=True), torch.randn(1, 2, 6, 16, device=device)
    qa = q * 1
    fops.apply_rotary(qa, k, cos, sin, inplace=True)
    assert qa.grad_fn is not None and k.grad_fn is None and not k.requires_grad


def test_rotary_gradcheck_and_double_backward():
    """float64 CPU inputs go through the op's autograd: exact first and second derivatives (the backward is the
    conjugate rotation, itself recorded)."""
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(1, 3, 6, "cpu", torch.float64)
    fn = lambda q, k: fops.apply_rotary(q, k, cos, sin)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k))
    assert torch.autograd.gradgradcheck(fn, (q, k))
    # a learned table (cos / sin requiring grad): the differentiable reference, grads for the tables too
    c, s = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda c, s: fops.apply_rotary(q, k, c, s), (c, s))


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_opcheck_and_compile(device):
    if not _native.has_op("apply_rotary"):
        pytest.skip("needs the custom op")
    q = torch.randn(2, 4, 5, 16, device=device, requires_grad=True)
    k = torch.randn(2, 2, 5, 16, device=device, requires_grad=True)
    cos, sin = _tables(2, 5, 16, device, torch.float32)
    ops = torch.ops.fusedkernels
    ids = torch.tensor([[0, 1, 2, 0, 1]], device=device)
    torch.library.opcheck(ops.apply_rotary, (q, k, cos, sin, None, False, "bhnd"))
    torch.library.opcheck(ops.apply_rotary, (q, k, cos, sin, ids, True, "bhnd"))
    torch.library.opcheck(ops.rotary_fwd, (q, k, cos[None], sin[None], None, False, False, False))
    torch.library.opcheck(ops.rotary_fwd, (q.detach(), k.detach(), cos[None], sin[None], ids, True, False, True))
    torch.library.opcheck(ops.rotary_, (q.detach().clone(), k.detach().clone(), cos[None], sin[None], None, False,
                                        False, False))

    def f(q, k):
        qo, ko = fops.apply_rotary(q, k, cos, sin, position_ids=ids)
        return qo.square().sum() + ko.sum()

    eager = torch.autograd.grad(f(q, k), [q, k])
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k), [q, k])
    for a, b in zip(eager, compiled):
        assert max_err(a, b) <= 1e-5 * max(b.abs().max().item(), 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_rotary_bad_inputs_raise_clear_errors(device, impl):
    q = torch.randn(1, 2, 4, 8, device=device)
    k = torch.randn(1, 1, 4, 8, device=device)
    cos, sin = _tables(1, 4, 8, device, torch.float32)
    cases = [
        (ValueError, "layout must be one of", dict(layout="nhd")),
        (RuntimeError, "q must be", dict(q=q[0])),
        (RuntimeError, "k must have q's dtype", dict(k=k.double())),
        (RuntimeError, "share batch, seq and head_dim", dict(k=torch.randn(1, 1, 5, 8, device=device))),
        (RuntimeError, "must be even and in", dict(cos=cos[:, :7], sin=sin[:, :7])),
        (RuntimeError, "must be even and in", dict(cos=torch.ones(4, 10, device=device), sin=torch.ones(4, 10, device=device))),
        (RuntimeError, r"\[seq, rotary_dim\] or \[batch or 1", dict(cos=cos[:3], sin=sin[:3])),
        (RuntimeError, "cos and sin must have one shape", dict(sin=sin[:3])),
        (RuntimeError, "position_ids must be int64 or int32", dict(position_ids=torch.zeros(4, device=device))),
        (RuntimeError, r"position_ids must be \[seq\]", dict(position_ids=torch.zeros(3, dtype=torch.long, device=device))),
        (TypeError, "q.* must be (a )?Tensor", dict(q=[1.0])),
    ]
    _assert_each_raises(lambda q, k, cos, sin, **kw: _rotary(impl, q, k, cos, sin, **kw),
                        dict(q=q, k=k, cos=cos, sin=sin), cases)
    if device == "cpu":
        with pytest.raises(IndexError, match=r"position_ids must be in \[0, 4\)"):
            _rotary(impl, q, k, cos, sin, position_ids=torch.tensor([0, 1, 2, 4]))
    if impl == "op":  # the differentiable reference (learned tables) checks them too, on any device
        with pytest.raises(IndexError, match=r"position_ids must be in \[0, 4\)"):
            _rotary(impl, q, k, cos.clone().requires_grad_(), sin, position_ids=torch.tensor([0, 1, 2, 4], device=device))


@pytest.mark.cuda
@needs_native
def test_rotary_cuda_position_outside_the_table_gives_nan():
    q = torch.randn(1, 2, 3, 16, device="cuda", dtype=torch.bfloat16)
    cos, sin = _tables(1, 4, 16, "cuda", torch.bfloat16)
    qo, ko = fops.apply_rotary(q, q[:, :1], cos, sin, position_ids=torch.tensor([0, 9, 1], device="cuda"))
    assert qo[:, :, 1].isnan().all() and not qo[:, :, [0, 2]].isnan().any()


@pytest.mark.cuda
@needs_native
def test_rotary_cuda_graph_replays():
    cos, sin = _tables(2, 64, 128, "cuda", torch.bfloat16)

    def make():
        return [torch.randn(2, 32, 64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True),
                torch.randn(2, 8, 64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)]

    def step(q, k):
        qo, ko = fops.apply_rotary(q, k, cos, sin)
        dq, dk = torch.autograd.grad([qo, ko], [q, k], [torch.ones_like(qo), torch.ones_like(ko)])
        return qo, ko, dq, dk

    check_graph_replays(step, make(), make, ["q_out", "k_out", "dq", "dk"], ulps=0)


# ------------------------------------------------------------------------------------------------
# Rotary table
# ------------------------------------------------------------------------------------------------


def _cos_sin(impl, position_ids, inv_freq, attention_scaling=1.0, dtype=None):
    if impl == "op":
        return fops.rotary_cos_sin(position_ids, inv_freq, attention_scaling=attention_scaling, dtype=dtype)
    return llm._rotary_cos_sin_without_native(position_ids, inv_freq, attention_scaling, dtype)


def _hf_cos_sin(position_ids, inv_freq, attention_scaling, dtype):
    """Hugging Face's LlamaRotaryEmbedding.forward (transformers 4.5x: a K = 1 batched product), on its own."""
    inv = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    freqs = (inv.float() @ position_ids[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def _inv_freq(rotary_dim, device, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=device) / rotary_dim))


COS_SIN_CASES = [
    # position_ids (a function of the device's generator), rotary_dim, attention_scaling
    (lambda d, g: torch.arange(4097, device=d)[None], 128, 1.0),                        # HF's training call
    (lambda d, g: torch.randint(0, 2**20, (3, 17), device=d, generator=g), 64, 0.7),     # packed / far positions
    (lambda d, g: torch.randint(0, 999, (5,), device=d, generator=g).int(), 6, 1.3),     # 1-D int32, rotary_dim 6
    (lambda d, g: torch.randint(0, 99, (7, 4), device=d, generator=g).t(), 2, 1.0),      # strided ids, one pair
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("case", range(len(COS_SIN_CASES)))
@pytest.mark.parametrize("impl", IMPLS)
def test_rotary_cos_sin_equals_hf_bit_for_bit(device, dtype, case, impl):
    make_ids, rotary_dim, scaling = COS_SIN_CASES[case]
    ids = make_ids(device, torch.Generator(device).manual_seed(case))
    inv_freq = _inv_freq(rotary_dim, device)
    want = llm.rotary_cos_sin_ref(ids, inv_freq, scaling, dtype)
    if ids.dim() == 2:
        hf = _hf_cos_sin(ids, inv_freq, scaling, dtype)
        assert all(torch.equal(a, b) for a, b in zip(hf, want))  # the reference is HF's formula
    poison_allocator(*want)
    got = _cos_sin(impl, ids, inv_freq, scaling, dtype)
    for name, g, w in zip(("cos", "sin"), got, want):
        assert g.dtype == dtype and g.shape == (*ids.shape, rotary_dim) and g.is_contiguous(), name
        assert torch.equal(g, w), f"{name}: max difference {max_err(g, w):.3g}"
    angles = ids[..., None].double() * inv_freq.double()
    angles = torch.cat((angles, angles), -1)
    for name, g, exact in zip(("cos", "sin"), got, (angles.cos() * scaling, angles.sin() * scaling)):
        # fp32 angles: the error grows with the position (2^20 * 2^-24 = 1/16 rad at the farthest)
        assert max_err(g, exact) <= 0.07 * scaling, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_rotary_cos_sin_defaults_and_edge_sizes(device, impl):
    ids = torch.tensor([[0, 3, 2]], device=device)
    cos, sin = _cos_sin(impl, ids, _inv_freq(8, device).half())  # half inv_freq: read in float32, as HF
    assert cos.dtype == torch.float32 and cos.shape == (1, 3, 8)
    assert torch.equal(cos, llm.rotary_cos_sin_ref(ids, _inv_freq(8, device).half())[0])
    empty = _cos_sin(impl, ids[:, :0], _inv_freq(8, device), dtype=torch.bfloat16)
    assert all(t.shape == (1, 0, 8) for t in empty)
    none = _cos_sin(impl, ids, _inv_freq(8, device)[:0])
    assert all(t.shape == (1, 3, 0) for t in none)
    scalar = _cos_sin(impl, torch.tensor(5, device=device), _inv_freq(4, device))
    assert scalar[0].shape == (4,) and torch.equal(scalar[0], llm.rotary_cos_sin_ref(torch.tensor(5, device=device),
                                                                                      _inv_freq(4, device))[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_rotary_cos_sin_bad_inputs_raise_clear_errors(device, impl):
    ids, inv = torch.arange(4, device=device)[None], _inv_freq(8, device)
    cases = [
        (RuntimeError, "position_ids must be an integer tensor, got float32", dict(position_ids=ids.float())),
        (RuntimeError, "position_ids must be an integer tensor, got bool", dict(position_ids=ids > 0)),
        (RuntimeError, r"inv_freq must be a 1-D floating-point tensor \[rotary_dim / 2\], got float32 \[1, 4\]",
         dict(inv_freq=inv[None])),
        (RuntimeError, "inv_freq must be a 1-D floating-point tensor", dict(inv_freq=inv.long())),
        (RuntimeError, "dtype must be a floating-point dtype, got int32", dict(dtype=torch.int32)),
        (TypeError, "inv_freq.* must be (a )?Tensor", dict(inv_freq=[1.0])),
        (TypeError, "attention_scaling", dict(attention_scaling="2")),
    ]
    if device == "cuda":
        cases.append((RuntimeError, "inv_freq is on cpu but position_ids is on cuda", dict(inv_freq=inv.cpu())))
    _assert_each_raises(lambda **kw: _cos_sin(impl, **kw), dict(position_ids=ids, inv_freq=inv), cases)
    # the public function, whatever the path (eager, vmap): a tensor scale's gradient must not vanish silently
    for scaling in (True, torch.tensor(1.5, requires_grad=True)):
        with pytest.raises(TypeError, match="attention_scaling must be a float"):
            fops.rotary_cos_sin(ids, inv, attention_scaling=scaling)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype or None, got str"):
        fops.rotary_cos_sin(ids, inv, dtype="float16")
    np = pytest.importorskip("numpy")
    want = fops.rotary_cos_sin(ids, inv, attention_scaling=2.0)
    for scaling in (np.float64(2.0), 2):  # converted once: the same on every path (compile's schema takes a float)
        got = fops.rotary_cos_sin(ids, inv, attention_scaling=scaling)
        assert torch.equal(got[0], want[0])
        compiled = torch.compile(lambda p: fops.rotary_cos_sin(p, inv, attention_scaling=scaling), backend="eager")
        assert torch.equal(compiled(ids)[0], want[0])


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_cos_sin_learned_frequencies_are_differentiable(device):
    """A learned inv_freq takes the differentiable reference (one warning on CUDA); its gradient is the formula's."""
    ids = torch.randint(0, 50, (2, 5), device=device)
    inv = _inv_freq(8, device).double().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cos, sin = fops.rotary_cos_sin(ids, inv, attention_scaling=0.5, dtype=torch.float64)
    assert cos.requires_grad and sin.requires_grad
    assert (device == "cuda") == any("gradient for inv_freq" in str(w.message) for w in caught)
    plain = fops.rotary_cos_sin(ids, inv.detach(), dtype=torch.float64)
    assert not plain[0].requires_grad
    # d/df of sum(w_c * cos(p f) + w_s * sin(p f)) over both halves: sum p (w_s cos(p f) - w_c sin(p f))
    w_c, w_s = torch.randn_like(cos), torch.randn_like(sin)
    (grad,) = torch.autograd.grad((cos * w_c + sin * w_s).sum(), inv)
    p = ids[..., None].double()
    angles = p * inv.detach().float().double()
    half = lambda t: t[..., :4] + t[..., 4:]  # noqa: E731 - both halves of a row share an angle
    want = (0.5 * p * (half(w_s) * angles.cos() - half(w_c) * angles.sin())).sum((0, 1))
    assert max_err(grad, want) <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_cos_sin_opcheck_and_compile(device):
    if not _native.has_op("rotary_cos_sin"):
        pytest.skip("needs the custom op")
    ids = torch.randint(0, 100, (2, 7), device=device)
    inv = _inv_freq(16, device)
    ops = torch.ops.fusedkernels
    torch.library.opcheck(ops.rotary_cos_sin, (ids, inv, 1.0, torch.bfloat16))
    torch.library.opcheck(ops.rotary_cos_sin, (ids.int(), inv, 0.5, None))
    torch.library.opcheck(ops.rotary_table, (ids, inv, 1.0, torch.float16))

    def f(ids):
        cos, sin = fops.rotary_cos_sin(ids, inv, dtype=torch.bfloat16)
        return cos * 2 + sin

    assert torch.equal(torch.compile(f, fullgraph=True)(ids), f(ids))


@pytest.mark.cuda
@needs_native
def test_rotary_cos_sin_cuda_graph_replays():
    inv = _inv_freq(128, "cuda")
    ids = torch.randint(0, 8192, (2, 300), device="cuda")
    graph, (cos, sin) = capture_graph(lambda ids: fops.rotary_cos_sin(ids, inv, dtype=torch.bfloat16), [ids])
    for _ in range(2):
        ids.copy_(torch.randint(0, 8192, (2, 300), device="cuda"))
        graph.replay()
        want = llm.rotary_cos_sin_ref(ids, inv, dtype=torch.bfloat16)
        assert torch.equal(cos, want[0]) and torch.equal(sin, want[1])


# ------------------------------------------------------------------------------------------------
# Linear + cross entropy
# ------------------------------------------------------------------------------------------------


def _lce(impl, *args, **kw):
    if impl == "op":
        return fops.linear_cross_entropy(*args, **kw)
    return llm._lce_without_native(*args, **kw)


def _torch_lowp(*args, **kw):
    """What an eager model computes in the inputs' dtype: F.linear, softcap, F.cross_entropy (+ the z-loss)."""
    return llm.linear_cross_entropy_ref(*args, **kw, upcast=False)


def _assert_each_raises(call, defaults: dict, cases) -> None:
    """call(**arguments) raises exc matching message for each (exc, message, changes) case; changes replace the
    defaults' entries of the same name, the rest are keyword arguments."""
    for exc, message, changes in cases:
        args = dict(defaults)
        args.update(changes)
        with pytest.raises(exc, match=message):
            call(**args)


def _lce_inputs(tokens, hidden, vocab, dtype, device, bias=True, ignored=0.2):
    h = (torch.randn(tokens, hidden, device=device) * 0.5).to(dtype)
    w = (torch.randn(vocab, hidden, device=device) / hidden**0.5 * 3).to(dtype)
    b = (torch.randn(vocab, device=device) * 0.1).to(dtype) if bias else None
    t = torch.randint(0, vocab, (tokens,), device=device)
    t[torch.rand(tokens, device=device) < ignored] = -100
    return h, w, b, t


def _loss_and_grads(fn, h, w, b, t, grad, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b) if x is not None]
    loss = fn(leaves[0], leaves[1], t, leaves[2] if b is not None else None, **kw)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves, grad.to(loss.dtype)))


OPTIONS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3, softcap=4.0),
    dict(label_smoothing=0.05, z_loss=1e-4, softcap=30.0, ignore_index=3),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", range(len(OPTIONS)))
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_matches_reference(device, dtype, reduction, options, impl):
    """Loss and the three gradients against float64 F.cross_entropy(F.linear(...)); odd token and vocab counts,
    several chunks (chunk_size 13); 16-bit: within twice torch's own error on the same inputs, bfloat16's dweight
    within one more for each chunk after the first (its sum is kept in bfloat16, rounded per chunk)."""
    kw = dict(OPTIONS[options], reduction=reduction)
    h, w, b, t = _lce_inputs(61, 48, 97, dtype, device, bias=options % 2 == 0)
    if kw.get("ignore_index") == 3:
        t[t == -100] = 3
    grad = torch.rand(61, device=device) + 0.5 if reduction == "none" else torch.tensor(1.5, device=device)
    ref = _loss_and_grads(llm.linear_cross_entropy_ref, h.double(), w.double(), b.double() if b is not None else None,
                          t, grad.double(), **kw)
    lowp = _loss_and_grads(_torch_lowp, h, w, b, t, grad, **kw)
    ours = _loss_and_grads(lambda *a, **k: _lce(impl, *a, chunk_size=13, **k), h, w, b, t, grad, **kw)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ref[0].shape
    chunks = -(-61 // 13)
    for name, o, r, lp in zip(["loss", "dhidden", "dweight", "dbias"], ours, ref, lowp):
        assert o.dtype == (torch.float32 if name == "loss" else dtype), name
        assert_close_to_ref(o.double(), r, lp.double(), name, floor=1e-5,
                            extra_roundings=chunks - 1 if name == "dweight" and dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_float16_under_a_loss_scale(device, impl):
    """float16 with GradScaler's recipe (the loss times a large power of two, then backward): the mean's 1/T gradients would fall
    below float16's range if the forward rounded them before the scale is known, so its sums are float32 and
    scaled after the chunks; dhidden and dweight within twice torch's own float16 error."""
    h, w, _, t = _lce_inputs(8192, 32, 4000, torch.float16, device, bias=False)
    grad = torch.tensor(2.0**15, device=device)  # (2**16 overflows torch's own float16 loss)
    ref = _loss_and_grads(llm.linear_cross_entropy_ref, h.double(), w.double(), None, t, grad.double())
    lowp = _loss_and_grads(_torch_lowp, h, w, None, t, grad)
    ours = _loss_and_grads(lambda *a, **k: _lce(impl, *a, chunk_size=2048, **k), h, w, None, t, grad)
    for name, o, r, lp in zip(["loss", "dhidden", "dweight"], ours, ref, lowp):
        assert_close_to_ref(o.double(), r, lp.double(), name, floor=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_batched_loss_grads_and_saved_tensor_hooks(device, reduction):
    """The backward of mean / sum scales the saved gradients by the loss's grad: a batch of loss grads
    (is_grads_batched, as jacobian's vectorize) gives each one's gradients, and tensors a saved_tensors_hooks pack
    hook received are not overwritten (the in-place scaling is only for buffers nothing else sees)."""
    h, w, b, t = _lce_inputs(37, 16, 29, torch.bfloat16, device)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = fops.linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], reduction=reduction)
    grads = torch.tensor([1.0, 0.5, -3.0], device=device)
    batched = torch.autograd.grad(loss, leaves, grads, retain_graph=True, is_grads_batched=True)
    for i, g in enumerate(grads):
        one = torch.autograd.grad(loss, leaves, g, retain_graph=True)
        for name, x, y in zip(["dhidden", "dweight", "dbias"], batched, one):
            assert torch.equal(x[i], y), (name, i)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: packed.append(x) or x, lambda x: x):
        loss = fops.linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], reduction=reduction)
    kept = [x.clone() for x in packed]
    torch.autograd.grad(loss * 0.5, leaves)
    assert packed and all(torch.equal(x, y) for x, y in zip(packed, kept))


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_cross_entropy_scale_matches_mul(device, dtype):
    """The backward's in-place scaling by the loss's grad (the internal op the mean / sum backward calls): torch's
    mul_ bit for bit, for vector-sized, odd and 16-byte-misaligned tensors; a grad of 1 leaves the data as it was."""
    scale_ = torch.ops.fusedkernels.linear_cross_entropy_scale_
    for n in (1, 7, 8, 1001, 40000):
        for offset in (0, 1):
            for s in (1.0, 0.5, -3.0, 1e-30, float("nan")):
                x = torch.randn(n + offset, device=device).to(dtype)[offset:]
                x[0] = float("inf")
                scale = torch.tensor(s, device=device)
                want = x.clone().mul_(scale)
                scale_(x, scale)
                assert torch.equal(x.isnan(), want.isnan()), (n, offset, s)
                assert torch.equal(x.nan_to_num(0.0), want.nan_to_num(0.0)), (n, offset, s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_ignored_rows_and_edges(device, impl):
    h, w, b, t = _lce_inputs(9, 8, 5, torch.float32, device)
    t[:] = -100
    hl = h.clone().requires_grad_()
    mean = _lce(impl, hl, w, t)
    assert mean.isnan()  # 0 / 0, as torch
    assert torch.equal(_lce(impl, h, w, t, reduction="none"), torch.zeros(9, device=device))
    s = _lce(impl, hl, w, t, reduction="sum")
    s.backward()
    assert s.item() == 0 and torch.equal(hl.grad, torch.zeros_like(h))
    # [batch, seq, H] hidden with [batch, seq] target; reduction none keeps target's shape; no tokens at all
    h3, t2 = torch.randn(2, 3, 8, device=device), torch.randint(0, 5, (2, 3), device=device)
    out = _lce(impl, h3, w, t2, reduction="none")
    assert out.shape == (2, 3) and max_err(out, llm.linear_cross_entropy_ref(h3, w, t2, reduction="none")) < 1e-5
    empty = torch.randn(0, 8, device=device, requires_grad=True)
    assert _lce(impl, empty, w, torch.zeros(0, dtype=torch.long, device=device), reduction="sum").item() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_gradients_with_no_token_counted(device, impl):
    """Every token ignored, or no tokens: mean is NaN (0 / 0, as torch) and sum 0, both with zero gradients (none
    NaN), in several chunks."""
    h, w, b, t = _lce_inputs(9, 8, 5, torch.float32, device)
    t[:] = -100
    for tokens in (9, 0):
        for reduction in ("mean", "sum"):
            loss, dh, dw, db = _loss_and_grads(lambda *a, **k: _lce(impl, *a, **k), h[:tokens], w, b, t[:tokens],
                                               torch.tensor(1.0, device=device), reduction=reduction, chunk_size=4)
            assert loss.isnan() if reduction == "mean" else loss.item() == 0, (tokens, reduction)
            assert dh.shape == (tokens, 8)
            for g in (dh, dw, db):
                assert torch.equal(g, torch.zeros_like(g)), (tokens, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_float64_per_token_gradients(device, impl):
    """reduction none in float64: the per-token loss grads reach the backward in float64 (not rounded to float32)."""
    h, w, b, t = _lce_inputs(21, 8, 7, torch.float64, device)
    grad = torch.rand(21, dtype=torch.float64, device=device) / 3 + 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CUDA float64: the reference's warning
        ours = _loss_and_grads(lambda *a, **k: _lce(impl, *a, **k), h, w, b, t, grad, reduction="none", chunk_size=5)
    ref = _loss_and_grads(llm.linear_cross_entropy_ref, h, w, b, t, grad, reduction="none")
    for name, o, r in zip(["loss", "dhidden", "dweight", "dbias"], ours, ref):
        assert o.dtype == torch.float64 and max_err(o, r) < 1e-12, name


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_backward_is_one_op_per_gradient(device):
    """mean / sum: the backward scales each saved gradient by the loss's grad in one op: in place when the graph is
    released (the saved gradients become the returned ones: one copy at the step's peak; our op, which skips the
    pass on the device when the grad is 1), into new tensors when it
    is retained (a second backward then sees the saved gradients unscaled); hidden already [T, H] is not reshaped
    (no view node in the graph)."""
    if not _native.has_op("linear_cross_entropy"):
        pytest.skip("needs the custom op")
    h, w, b, t = _lce_inputs(16, 8, 5, torch.bfloat16, device, bias=False)
    hl, wl = h.requires_grad_(), w.requires_grad_()
    loss = fops.linear_cross_entropy(hl, wl, t)
    assert {type(f).__name__ for f, _ in loss.grad_fn.next_functions if f is not None} == {"AccumulateGrad"}
    node = "fusedkernels::LinearCrossEntropyBackward"
    runs = []
    for retain in (True, True, False):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            runs.append(torch.autograd.grad(loss, [hl, wl], torch.tensor(1.5, device=device), retain_graph=retain))
        ops = [e.name for e in prof.events() if e.cpu_parent is not None and e.cpu_parent.name == node]
        assert sorted(ops) == (["aten::empty", "aten::empty", "aten::mul", "aten::mul"] if retain
                               else ["fusedkernels::linear_cross_entropy_scale_"] * 2), (retain, ops)
    for dh, dw in runs:
        assert dh.dtype == dw.dtype == torch.bfloat16
        assert torch.equal(dh, runs[0][0]) and torch.equal(dw, runs[0][1])
    ref = torch.autograd.grad(llm.linear_cross_entropy_ref(hl, wl, t) * 1.5, [hl, wl])
    for ours, r in zip(runs[-1], ref):
        assert max_err(ours.float(), r.float()) <= 0.02 * r.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_bad_inputs_raise_clear_errors(device, impl):
    h, w, b, t = _lce_inputs(6, 8, 5, torch.float32, device)
    cases = [
        (ValueError, "reduction must be one of", dict(reduction="avg")),
        (RuntimeError, "cannot be multiplied", dict(w=w[:, :7])),
        (RuntimeError, "weight must be", dict(w=w[0])),
        (RuntimeError, "weight must have hidden's dtype", dict(w=w.double())),
        (RuntimeError, r"bias must be \[V\]", dict(b=b[:4])),
        (RuntimeError, "target must be int64", dict(t=t.int())),
        (RuntimeError, "target must have hidden's leading shape", dict(t=t[:5])),
        (RuntimeError, "label_smoothing must be between", dict(label_smoothing=1.5)),
        (ValueError, "z_loss must be finite", dict(z_loss=-1.0)),
        (ValueError, "softcap must be None or", dict(softcap=0.0)),
        (ValueError, "chunk_size must be >= 0", dict(chunk_size=-2)),
        (TypeError, "target.* must be (a )?Tensor", dict(t=[1, 2])),
    ]
    _assert_each_raises(lambda h, w, t, b, **kw: _lce(impl, h, w, t, b, **kw), dict(h=h, w=w, t=t, b=b), cases)
    if device == "cpu":
        bad = t.clone()
        bad[2] = 5
        with pytest.raises(IndexError, match="target 5 at position 2 is out of bounds for 5 classes"):
            _lce(impl, h, w, bad)
        with pytest.raises(IndexError, match="at position 2 "):  # the first row of the second chunk
            _lce(impl, h, w, bad, chunk_size=2)


def test_linear_cross_entropy_double_backward_is_refused():
    if not _native.has_op("linear_cross_entropy"):
        pytest.skip("needs the custom op (the reference is plain autograd)")
    h, w, b, t = _lce_inputs(6, 8, 5, torch.float32, "cpu")
    hl = h.requires_grad_()
    (g,) = torch.autograd.grad(fops.linear_cross_entropy(hl, w, t), [hl], create_graph=False)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(fops.linear_cross_entropy(hl, w, t), [hl], create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_opcheck_and_compile(device):
    if not _native.has_op("linear_cross_entropy"):
        pytest.skip("needs the custom op")
    h, w, b, t = _lce_inputs(20, 16, 11, torch.float32, device)
    leaves = [x.requires_grad_() for x in (h, w, b)]
    ops = torch.ops.fusedkernels
    for red in ("mean", "none"):
        torch.library.opcheck(ops.linear_cross_entropy, (h, w, t, b, -100, red, 0.1, 1e-3, 5.0, 7))
    torch.library.opcheck(ops.linear_cross_entropy_fwd, (h, w, t, b, -100, 1, 0.0, 0.0, 0.0, 6, [True, True, True]))
    torch.library.opcheck(ops.linear_cross_entropy_fwd, (h, w, t, None, -100, 0, 0.0, 0.0, 0.0, 0, [False] * 3))
    _, lse, *_ = ops.linear_cross_entropy_fwd(h.detach(), w.detach(), t, None, -100, 0, 0.0, 0.0, 0.0, 0, [False] * 3)
    torch.library.opcheck(ops.linear_cross_entropy_bwd, (torch.rand(20, device=device), h.detach(), w.detach(), t,
                                                         b.detach(), lse, -100, 0.0, 0.0, 0.0, 6, [True, True, True]))

    def f(h, w, b):
        return fops.linear_cross_entropy(h, w, t, b, label_smoothing=0.1, softcap=5.0, chunk_size=8)

    eager = torch.autograd.grad(f(*leaves), leaves)
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(*leaves), leaves)
    for a, c in zip(eager, compiled):
        assert max_err(a, c) <= 1e-5 * max(c.abs().max().item(), 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_under_autocast(device, impl):
    """As F.linear under autocast: hidden, weight, bias cast to the autocast dtype; the loss in float32."""
    h, w, b, t = _lce_inputs(17, 16, 9, torch.float32, device)
    wl = w.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = _lce(impl, h, wl, t, b)
    loss.backward()
    want = llm.linear_cross_entropy_ref(h.bfloat16().double(), w.bfloat16().double(), t, b.bfloat16().double())
    assert loss.dtype == torch.float32 and wl.grad.dtype == torch.float32
    assert abs(loss.item() - want.item()) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "python"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_under_torch_func(device, impl, reduction):
    """torch.func.grad / vjp give autograd's gradients (the transforms run the differentiable reference)."""
    h, w, b, t = _lce_inputs(13, 8, 11, torch.float32, device)
    t[2] = -100
    fn = fops.linear_cross_entropy if impl == "op" else llm._lce_without_native

    def loss(h, w, b):
        out = fn(h, w, t, b, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, reduction=reduction)
        return out.sum() if reduction == "none" else out

    got = torch.func.grad(loss, argnums=(0, 1, 2))(h, w, b)
    leaves = [x.detach().requires_grad_() for x in (h, w, b)]
    want = torch.autograd.grad(loss(*leaves), leaves)
    for name, a, e in zip(("dhidden", "dweight", "dbias"), got, want):
        assert max_err(a, e) < 1e-5, name


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_runs_the_reference_without_a_per_sample_loop(device):
    """vmap over linear_cross_entropy and apply_rotary: the reference, batched (no PyTorch fallback warning)."""
    h, w = torch.randn(3, 5, 16, device=device), torch.randn(30, 16, device=device)
    t = torch.randint(0, 30, (3, 5), device=device)
    q, k = torch.randn(4, 2, 3, 6, 8, device=device), torch.randn(4, 2, 1, 6, 8, device=device)
    cos, sin = torch.randn(6, 8, device=device), torch.randn(6, 8, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = torch.func.vmap(lambda h, t: fops.linear_cross_entropy(h, w, t))(h, t)
        q_out, k_out = torch.func.vmap(lambda q, k: fops.apply_rotary(q, k, cos, sin))(q, k)
    assert max_err(loss, torch.stack([F.cross_entropy(F.linear(a, w), b) for a, b in zip(h, t)])) < 1e-5
    want = [llm.apply_rotary_ref(a, b, cos, sin) for a, b in zip(q, k)]
    assert max_err(q_out, torch.stack([x for x, _ in want])) == 0 and max_err(k_out, torch.stack([y for _, y in want])) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_every_token_ignored_gives_a_nan_mean_and_zero_gradients_as_torch(device, impl, dtype):
    h, w, b, t = _lce_inputs(8, 16, 32, dtype, device, ignored=1.1)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = _lce(impl, leaves[0], leaves[1], t, leaves[2])
    assert loss.isnan()
    loss.backward()
    for name, x in zip(("dhidden", "dweight", "dbias"), leaves):
        assert torch.equal(x.grad, torch.zeros_like(x)), name


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_float64_options_within_their_float32_rounding(reduction):
    """float64 inputs read label_smoothing, z_loss and softcap as float32 values (the kernels' parameters): the
    result is torch's float64 one within that rounding (docs/llm.md)."""
    h, w, b, t = _lce_inputs(37, 16, 50, torch.float64, "cpu", ignored=0.0)
    for smoothing in (0.1, 0.3):
        ours = fops.linear_cross_entropy(h, w, t, b, reduction=reduction, label_smoothing=smoothing)
        want = F.cross_entropy(F.linear(h, w, b), t, reduction=reduction, label_smoothing=smoothing)
        assert max_err(ours, want) <= 1e-7 * max(want.abs().max().item(), 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_reduction_none_gradients_with_poisoned_memory(device):
    """bf16, reduction none, a vocabulary that is not a multiple of 8, two chunks, the memory of the logits buffer
    poisoned with NaN: every gradient row finite and right (PyTorch's CPU bf16 matmul reads the gap between a view's
    rows, so the buffer must have none there)."""
    h = torch.randn(2048, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(50, 16, device=device) * 0.3).to(torch.bfloat16)
    t = torch.randint(0, 50, (2048,), device=device)
    poison_allocator(torch.empty(1024, 56, device=device, dtype=torch.bfloat16))
    loss = fops.linear_cross_entropy(h, w, t, reduction="none", chunk_size=1024)
    dloss = torch.rand(2048, device=device)
    (dh,) = torch.autograd.grad(loss, h, dloss)
    assert torch.isfinite(dh).all()
    href = h.detach().double().requires_grad_()
    ref = F.cross_entropy(F.linear(href, w.double()), t, reduction="none")
    (dref,) = torch.autograd.grad(ref, href, dloss.double())
    assert max_err(dh, dref) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_module_is_a_linear_head_plus_cross_entropy(device):
    head = torch.nn.Linear(16, 23, device=device)
    x = torch.randn(3, 5, 16, device=device)
    labels = torch.randint(0, 23, (3, 5), device=device)
    labels[0, :2] = -100
    ours = fnn.FusedLinearCrossEntropyLoss(label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la = ours(xa, head, labels)
    la.backward()
    ga = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    lb = theirs(head(xb).reshape(-1, 23), labels.reshape(-1))
    lb.backward()
    assert max_err(la, lb) < 1e-5 and max_err(xa.grad, xb.grad) < 1e-5
    for g, p in zip(ga, head.parameters()):
        assert max_err(g, p.grad) < 1e-5
    # the weight (and bias) passed directly, reduction none
    per_token = fnn.FusedLinearCrossEntropyLoss(reduction="none")(x, head.weight, labels, head.bias)
    assert per_token.shape == labels.shape
    assert "label_smoothing=0.1" in repr(ours) and "chunk_size=0" in repr(ours)
    # a head whose forward is not x W^T + b (an nn.Linear subclass), or a second bias, is refused, not misread
    with pytest.raises(TypeError, match="must be an nn.Linear or a weight tensor, got FusedLinear"):
        ours(x, fnn.FusedLinear(16, 23, activation="relu", device=device), labels)
    with pytest.raises(TypeError, match="bias is given by the nn.Linear head"):
        ours(x, head, labels, head.bias)
    hooked = torch.nn.Linear(16, 23, device=device)
    hooked.register_forward_hook(lambda module, args, out: out * 0)  # would change the logits the loss sees
    with pytest.raises(ValueError, match="forward hooks"):
        ours(x, hooked, labels)
    with torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: out * 0):
        with pytest.raises(ValueError, match="forward hooks"):
            ours(x, torch.nn.Linear(16, 23, device=device), labels)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("vocab", [32003, 128256])
def test_linear_cross_entropy_large_vocabularies(vocab):
    h, w, b, t = _lce_inputs(300, 256, vocab, torch.bfloat16, "cuda", bias=False)
    grad = torch.tensor(1.0, device="cuda")
    ours = _loss_and_grads(fops.linear_cross_entropy, h, w, None, t, grad)
    ref = _loss_and_grads(llm.linear_cross_entropy_ref, h.double(), w.double(), None, t, grad.double())
    lowp = _loss_and_grads(_torch_lowp, h, w, None, t, grad)
    for name, o, r, lp in zip(["loss", "dhidden", "dweight"], ours, ref, lowp):
        assert_close_to_ref(o.double(), r, lp.double(), name, floor=1e-5)


@pytest.mark.cuda
@needs_native
def test_linear_cross_entropy_cuda_is_deterministic_and_graph_safe():
    h, w, b, t = _lce_inputs(2500, 128, 5000, torch.bfloat16, "cuda")
    first = _loss_and_grads(fops.linear_cross_entropy, h, w, b, t, torch.tensor(1.0, device="cuda"), chunk_size=512)
    again = _loss_and_grads(fops.linear_cross_entropy, h, w, b, t, torch.tensor(1.0, device="cuda"), chunk_size=512)
    assert all(torch.equal(a, c) for a, c in zip(first, again))
    # a bad target: NaN for its token, no error, no effect on the others' rows
    bad = t.clone()
    bad[7] = 5000
    loss = fops.linear_cross_entropy(h, w, bad, b, reduction="none")
    assert loss[7].isnan() and not loss[:7].isnan().any()

    def make():
        h, w, b, _ = _lce_inputs(700, 64, 1001, torch.bfloat16, "cuda")
        return [h.requires_grad_(), w.requires_grad_(), b.requires_grad_()]

    target = torch.randint(0, 1001, (700,), device="cuda")

    def step(h, w, b):
        loss = fops.linear_cross_entropy(h, w, target, b, chunk_size=256)
        return (loss, *torch.autograd.grad(loss, [h, w, b]))

    check_graph_replays(step, make(), make, ["loss", "dhidden", "dweight", "dbias"], ulps=0)


@pytest.mark.cuda
@needs_native
def test_linear_cross_entropy_cuda_host_work_is_gemms_and_kernels():
    """On small inputs the host's ops are the cost: the forward runs allocations, the GEMMs, one cross-entropy
    launch per chunk and the single-block reductions (the loss; before the chunks, the mean's gradient scale), no
    ATen reductions, casts or views."""
    h, w, _, t = _lce_inputs(64, 256, 1024, torch.bfloat16, "cuda", bias=False)
    allowed = {"aten::empty", "aten::empty_strided", "aten::t", "aten::mm", "aten::addmm"}
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for leaves, reductions in (((h, w), 1), ((h.clone().requires_grad_(), w.clone().requires_grad_()), 2)):
        fops.linear_cross_entropy(*leaves, t)
        with torch.profiler.profile(activities=activities) as prof:
            fops.linear_cross_entropy(*leaves, t)
            torch.cuda.synchronize()
        fwd = "fusedkernels::linear_cross_entropy_fwd"
        ops = [e.name for e in prof.events()  # ops, not CUDA runtime calls (cudaLaunchKernel)
               if e.cpu_parent is not None and e.cpu_parent.name == fwd and "::" in e.name]
        assert ops and set(ops) <= allowed, ops
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert sum("cross_entropy_kernel" in n for n in kernels) == 1, kernels
        assert sum("loss_reduce_kernel" in n for n in kernels) == reductions, kernels


@pytest.mark.cuda
@needs_native
def test_linear_cross_entropy_cuda_reductions_over_many_tokens():
    """More tokens than the reduction block has threads, several chunks: loss and gradients of mean and sum."""
    h, w, b, t = _lce_inputs(5000, 32, 67, torch.float32, "cuda", ignored=0.3)
    for reduction in ("mean", "sum"):
        grad = torch.tensor(0.7, device="cuda")
        ours = _loss_and_grads(fops.linear_cross_entropy, h, w, b, t, grad, reduction=reduction, chunk_size=1500)
        ref = _loss_and_grads(llm.linear_cross_entropy_ref, h.double(), w.double(), b.double(), t, grad.double(),
                              reduction=reduction)
        for name, o, r in zip(["loss", "dhidden", "dweight", "dbias"], ours, ref):
            assert max_err(o, r) <= 1e-5 * max(r.abs().max().item(), 1.0), (reduction, name)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_cuda_graph_recounts_tokens_on_replay(reduction):
    """Captured once, replayed with targets that ignore other tokens (none, half, all): the mean's count, its
    gradient scale and the loss come from the device on every replay, equal to an eager call's."""
    h, w, b, target = _lce_inputs(700, 64, 1001, torch.bfloat16, "cuda")
    leaves = [x.requires_grad_() for x in (h, w, b)]

    def step(t):
        loss = fops.linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], reduction=reduction, chunk_size=256)
        return (loss, *torch.autograd.grad(loss, leaves, torch.ones_like(loss)))

    graph, results = capture_graph(step, [target])
    for ignored in (0.0, 0.5, 1.0):
        fresh = _lce_inputs(700, 64, 1001, torch.bfloat16, "cuda", ignored=ignored)[3]
        target.copy_(fresh)
        graph.replay()
        for name, a, e in zip(["loss", "dhidden", "dweight", "dbias"], results, step(fresh)):
            torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=f"{name}, {ignored} ignored")


@pytest.mark.cuda
@needs_native
def test_linear_cross_entropy_cuda_float64_runs_the_reference_with_a_warning():
    h, w, b, t = _lce_inputs(30, 16, 9, torch.float64, "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning is checked below, in a process where it is the first
        loss = fops.linear_cross_entropy(h, w, t, b)
    assert max_err(loss, llm.linear_cross_entropy_ref(h, w, t, b)) < 1e-12
    # The native layer warns once per process and reason: an earlier float64 call in this one took the warning.
    code = (
        "import warnings, torch, fusedkernels.ops as fops\n"
        "h = torch.randn(4, 8, dtype=torch.float64, device='cuda'); w = torch.randn(5, 8, dtype=torch.float64, "
        "device='cuda')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    fops.linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 4], device='cuda'))\n"
        "print([str(c.message) for c in caught])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr
    assert "float64 has no fused kernel" in run.stdout, run.stdout
