"""fusedkernels.ops.linear_act / nn.FusedLinear and their op layer.

CPU tests hold the reference (the CPU kernel of the internal op) to plain PyTorch and check the op layer (errors,
autograd, opcheck, compile, export, autocast, the module). `cuda` tests hold the fused kernel to an fp32 reference
on fresh random inputs, with a tolerance relative to PyTorch's own low-precision error (the same reference run in
the inputs' dtype), outputs poisoned first; where no kernel takes a call they check the reference it runs. The
kernel tests run four times: with the default kernel, with FUSEDKERNELS_GEMM_KERNEL=portable (the mma.sync kernel,
which the Hopper kernel replaces on sm_90), with FUSEDKERNELS_GEMM_KERNEL=sm90-wide (the Hopper kernel's ping-pong
256-wide tiles, which small m takes 64 wide by default) and with sm90-cooperative (its 128 x 256 tiles shared by both
consumers, which by default only large m, N <= 4096 and long K take).
"""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedkernels.nn as fnn
import fusedkernels.ops as fops
from fusedkernels import _build, _native
from fusedkernels.ops.gemm import ACTIVATIONS, GATE_ACTIVATION, GATED_ACTIVATIONS, linear_act_ref, linear_gated_ref

from .helpers import (DEVICES, assert_close_to_ref, check_graph_replays, grad_in_layout, hopper_kernels_run, max_err,
                      poison_allocator)

needs_native = pytest.mark.skipif(not _native.has_op("linear_act"), reason="needs the native gemm ops")
LOWP = [torch.float16, torch.bfloat16]

# Written out independently of linear_act_ref: what each activation means in plain PyTorch.
PLAIN = {
    "none": lambda z: z,
    "relu": torch.relu,
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / 2**0.5)),
    "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3))),
    "silu": lambda z: z * torch.sigmoid(z),
    "squared_relu": lambda z: torch.relu(z) ** 2,
}


def _inputs(lead, k, n, dtype=torch.float64, device="cpu", bias=True, residual=False):
    x = torch.randn(*lead, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    r = torch.randn(*lead, n, device=device).to(dtype) if residual else None
    return x, w, b, r


def _grads(fn, tensors, dy):
    """fn(*leaves) and the grads of the leaves that are not None."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dy)
    return [out.detach(), *grads]


# ------------------------------------------------------------------------------------------------
# Semantics of the reference (CPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_matches_plain_torch_with_grads(activation, bias, residual):
    x, w, b, r = _inputs((3, 5), 16, 24, bias=bias, residual=residual)
    dy = torch.randn(3, 5, 24, dtype=torch.float64)
    tensors = [x, w, b, r]

    def plain(x, w, b, r):
        z = x @ w.t() + (b if b is not None else 0)
        return PLAIN[activation](z) + (r if r is not None else 0)

    ours = _grads(lambda x, w, b, r: fops.linear_act(x, w, b, activation, r), tensors, dy)
    want = _grads(plain, tensors, dy)
    ref = _grads(lambda x, w, b, r: linear_act_ref(x, w, b, activation, r), tensors, dy)
    names = ["out", "dx", "dw"] + ["db"] * bias + ["dr"] * residual
    assert len(ours) == len(names)
    for name, o, p, q in zip(names, ours, want, ref):
        assert o.dtype == torch.float64 and o.shape == p.shape, name
        assert max_err(o, p) < 1e-10 and max_err(o, q) < 1e-12, name


@pytest.mark.parametrize("lead", [(), (1,), (7,), (2, 3, 4), (0,), (2, 0)], ids=str)
def test_leading_dims_and_grads(lead):
    x, w, b, r = _inputs(lead, 8, 16, residual=True)
    dy = torch.randn(*lead, 16, dtype=torch.float64)
    ours = _grads(lambda *t: fops.linear_act(*t[:3], "silu", t[3]), (x, w, b, r), dy)
    want = _grads(lambda *t: linear_act_ref(*t[:3], "silu", t[3]), (x, w, b, r), dy)
    assert ours[0].shape == (*lead, 16)
    for o, p in zip(ours, want):
        assert o.shape == p.shape and max_err(o, p) < 1e-12


def test_non_contiguous_x_and_residual():
    base = torch.randn(6, 5, 24, dtype=torch.float64)
    w, b = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    for x in (base[..., :8], base[..., ::3], base.transpose(0, 1)[..., 8:16], base[:, :1, :8].expand(6, 4, 8)):
        res = torch.randn(*x.shape[:-1], 32, dtype=torch.float64)[..., ::2]
        assert max_err(fops.linear_act(x, w, b, "gelu", res), linear_act_ref(x, w, b, "gelu", res)) < 1e-12
    out = fops.linear_act(base.transpose(0, 1)[..., :8], w, b)
    assert out.is_contiguous()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_and_gradgradcheck_float64(activation):
    """The op's backward and, through create_graph, its second derivatives (gelu and silu have curvature)."""
    x, w, b, r = (t.requires_grad_() for t in _inputs((2, 3), 4, 5, residual=True))
    fn = lambda x, w, b, r: fops.linear_act(x, w, b, activation, r)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, r))
    assert torch.autograd.gradgradcheck(fn, (x, w, b, r))


def test_no_grad_and_a_gradient_for_the_residual_only():
    x, w, b, _ = (t.requires_grad_() if t is not None else None for t in _inputs((4,), 8, 8))
    with torch.no_grad():  # no gradient wanted: no node, nothing kept
        assert fops.linear_act(x, w, b, "gelu").grad_fn is None
    # only the residual needs a gradient: it is dy
    r = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 8, dtype=torch.float64)
    (dr,) = torch.autograd.grad(fops.linear_act(x.detach(), w.detach(), None, "relu", r), r, dy)
    assert torch.equal(dr, dy)


@needs_native  # the native op's autograd node and internal op; without them PyTorch's ops differentiate
def test_backward_node_and_what_it_keeps():
    x, w, b, _ = (t.requires_grad_() if t is not None else None for t in _inputs((4,), 8, 8))
    out = fops.linear_act(x, w, b, "gelu")
    assert out.grad_fn.name() == "fusedkernels::LinearActBackward"
    dy = torch.randn(4, 8, dtype=torch.float64)
    # the internal op's z is F.linear's, and a call without it still differentiates (z recomputed)
    ops = torch.ops.fusedkernels
    out, z = ops.linear_act_fwd(x.detach(), w.detach(), b.detach(), ACTIVATIONS.index("silu"), None, True)
    assert max_err(z, F.linear(x, w, b)) < 1e-12 and max_err(out, F.silu(z)) < 1e-12
    out, z = ops.linear_act_fwd(x, w, b, ACTIVATIONS.index("silu"), None, False)
    assert z.numel() == 0
    grads = torch.autograd.grad(out, (x, w, b), dy)
    want = torch.autograd.grad(linear_act_ref(x, w, b, "silu"), (x, w, b), dy)
    assert all(max_err(g, h) < 1e-12 for g, h in zip(grads, want))


def test_forward_mode_ad_and_jvp_of_grad_match_torch():
    x, w, b, r = _inputs((3,), 8, 8, residual=True)
    tx = torch.randn_like(x)
    ours = lambda x: fops.linear_act(x, w, b, "gelu", r)  # noqa: E731
    ref = lambda x: linear_act_ref(x, w, b, "gelu", r)  # noqa: E731
    assert max_err(torch.func.jvp(ours, (x,), (tx,))[1], torch.func.jvp(ref, (x,), (tx,))[1]) < 1e-12
    g_ours = torch.func.jvp(torch.func.grad(lambda x: ours(x).pow(2).sum()), (x,), (tx,))[1]
    g_ref = torch.func.jvp(torch.func.grad(lambda x: ref(x).pow(2).sum()), (x,), (tx,))[1]
    assert max_err(g_ours, g_ref) < 1e-10


def test_bad_inputs_raise_clear_errors():
    x, w, b, r = _inputs((3,), 8, 16, dtype=torch.float32, residual=True)
    with pytest.raises(ValueError, match="activation must be one of none, relu, gelu, gelu_tanh, silu, squared_relu"):
        fops.linear_act(x, w, b, "tanh")
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        fops.linear_act(x[:, :7], w, b)
    with pytest.raises(RuntimeError, match=r"weight must be \[out_features, in_features\]"):
        fops.linear_act(x, w[0], None)
    with pytest.raises(RuntimeError, match="at least 1-D"):
        fops.linear_act(x[0, 0], w, b)
    with pytest.raises(RuntimeError, match="floating-point"):
        fops.linear_act(x.int(), w.int(), None)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        fops.linear_act(x, w.double(), None)
    with pytest.raises(RuntimeError, match="bias must have x's dtype"):
        fops.linear_act(x, w, b.double())
    with pytest.raises(RuntimeError, match=r"bias must be \[out_features\] = \[16\], got \[8\]"):
        fops.linear_act(x, w, b[:8])
    with pytest.raises(RuntimeError, match=r"residual must have the output's shape \[3, 16\]"):
        fops.linear_act(x, w, b, "gelu", r[:1])  # broadcastable, yet refused
    with pytest.raises(TypeError, match="activation"):
        fops.linear_act(x, w, b, 1)
    with pytest.raises(TypeError):
        fops.linear_act([1.0], w, b)
    with pytest.raises(ValueError, match="activation must be one of"):
        fnn.FusedLinear(8, 16, activation="gelu_erf")
    # what F.linear refuses, F.linear refuses with the same type
    with pytest.raises(RuntimeError):
        F.linear(x[:, :7], w, b)


def test_cpu_calls_do_not_warn():
    x, w, b, r = _inputs((5,), 12, 20, dtype=torch.float32, residual=True)  # sizes without a CUDA kernel
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fops.linear_act(x, w.t().contiguous().t(), b, "relu", r)
        fops.linear_act(x.bfloat16(), w.bfloat16(), b.bfloat16(), "gelu")


def test_without_native_module_ops_run_the_reference(monkeypatch):
    monkeypatch.setattr(_native, "has_op", lambda name: False)
    fallback = _native.public_op("linear_act", linear_act_ref, "the PyTorch reference")
    x, w, b, r = _inputs((2, 3), 8, 16, residual=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU tensors: no warning
        out = fallback(x, w, b, "squared_relu", r)
    assert max_err(out, linear_act_ref(x, w, b, "squared_relu", r)) == 0.0


def test_opcheck_cpu():
    if not _native.has_op("linear_act"):
        pytest.skip("needs the custom ops")
    _opcheck("cpu", torch.float32)


def _opcheck(device, dtype):
    ops = torch.ops.fusedkernels
    x, w, b, r = (t.requires_grad_() for t in _inputs((2, 9), 24, 40, dtype=dtype, device=device, residual=True))
    for args in ((x, w, b, "gelu", r), (x, w, None, "relu", None), (x.detach(), w.detach(), b, "none", r)):
        torch.library.opcheck(ops.linear_act, args)
    strided = x.detach().transpose(0, 1)  # outputs contiguous whatever x's layout, as the meta kernel says
    for save in (True, False):
        torch.library.opcheck(ops.linear_act_fwd, (x, w, b, 3, r, save))
        torch.library.opcheck(ops.linear_act_fwd, (strided, w.detach(), None, 5, None, save))
    z, dy = (torch.randn(2, 9, 40, device=device).to(dtype) for _ in range(2))
    for activation in range(len(ACTIVATIONS)):  # (none too: new outputs, not dy)
        torch.library.opcheck(ops.act_backward, (dy, z, activation))


def test_act_backward_edges_cpu():
    """act_backward's reference: no out_features (the public op's backward reaches it on CPU), outputs in
    pre_activation's dtype whatever dy's, as its Meta kernel says."""
    if not _native.has_op("act_backward"):
        pytest.skip("needs the custom ops")
    x, w, b = torch.randn(4, 8, requires_grad=True), torch.randn(0, 8, requires_grad=True), torch.randn(0, requires_grad=True)
    out = fops.linear_act(x, w, b, "relu")
    dx, dw, db = torch.autograd.grad(out, (x, w, b), torch.randn_like(out))
    assert dx.shape == x.shape and not dx.any() and dw.shape == w.shape and db.shape == b.shape
    dz, dbias = torch.ops.fusedkernels.act_backward(torch.randn(3, 8), torch.randn(3, 8).bfloat16(), 2)
    assert dz.dtype == dbias.dtype == torch.bfloat16


def _act_dz(dy, z, activation):
    """d act(z) / dz times dy by autograd through the plain formula, in z's dtype."""
    z = z.detach().requires_grad_()
    return torch.autograd.grad(PLAIN[activation](z), z, dy)[0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_bias_gradient_comes_from_the_activation_backward_pass(device):
    """With a bias and an activation, the first-order backward takes dz and dbias from one op, act_backward (one
    kernel on CUDA), not the activation's backward and a separate sum; the gradients are the reference's."""
    if not _native.has_op("act_backward"):
        pytest.skip("needs the native gemm ops")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w, b, _ = _inputs((3, 7), 32, 48, dtype=dtype, device=device)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    out = fops.linear_act(x, w, b, "gelu")
    dy = torch.randn_like(out)
    with torch.profiler.profile() as prof:
        ours = torch.autograd.grad(out, (x, w, b), dy)
    names = {e.name for e in prof.events()}
    assert "fusedkernels::act_backward" in names, sorted(n for n in names if "fusedkernels" in n)
    f32 = [t.detach().float().requires_grad_() for t in (x, w, b)]
    ref = torch.autograd.grad(linear_act_ref(*f32, "gelu"), f32, dy.float())
    lowp = torch.autograd.grad(linear_act_ref(x, w, b, "gelu"), (x, w, b), dy)
    for name, o, r, t in zip(["dx", "dw", "db"], ours, ref, lowp):
        assert o.dtype == t.dtype
        assert_close_to_ref(o.float(), r, t.float(), name, floor=torch.finfo(dtype).eps)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_kernel_relu_backward_selects_as_torch(dtype):
    """relu's backward is a select (threshold_backward): an inf gradient where z <= 0 (an fp16 overflow under a
    loss scale) gives 0, not NaN; z == 0 passes nothing; in the gated pass too."""
    z = torch.tensor([[-1.0, 0.0, 2.0, 3.0] * 4] * 3, device="cuda").to(dtype)
    dy = torch.tensor([[float("inf"), float("inf"), 1.0, -2.0] * 4] * 3, device="cuda").to(dtype)
    dz, dbias = torch.ops.fusedkernels.act_backward(dy, z, ACTIVATIONS.index("relu"))
    want = torch.ops.aten.threshold_backward(dy, z, 0)
    assert torch.equal(dz, want) and torch.equal(dbias, want.float().sum(0).to(dtype))
    zz = torch.cat([z, torch.ones_like(z)], -1)
    dg = torch.ops.fusedkernels.gated_backward(dy, zz, ACTIVATIONS.index("relu"))
    assert torch.equal(dg[..., :16], want)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "none"])
@pytest.mark.parametrize("shape", [((17,), 24), ((2, 333), 136), ((3, 5, 7), 8), ((4099,), 264), ((1,), 4096)],
                         ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "broadcast"])
def test_kernel_act_backward(shape, activation, dtype, layout):
    """dz = dy * act'(z) and dbias = its column sums in one kernel, against autograd of the formula in fp32, as close
    as PyTorch's own in the inputs' dtype; a strided or a broadcast dy reads right, dz is contiguous, every element
    of dz and dbias written; odd row counts, more rows than the chunks, one row."""
    lead, n = shape
    z = (torch.randn(*lead, n, device="cuda") * 2).to(dtype)
    dy = grad_in_layout(lead, n, dtype, layout)
    poison_allocator(z)
    dz, dbias = torch.ops.fusedkernels.act_backward(dy, z, ACTIVATIONS.index(activation))
    assert dz.dtype == dbias.dtype == dtype and dz.shape == z.shape and dz.is_contiguous() and dbias.shape == (n,)
    ref = _act_dz(dy.float(), z.float(), activation)
    lowp = _act_dz(dy, z, activation)
    assert_close_to_ref(dz.float(), ref, lowp.float(), "dz", floor=torch.finfo(dtype).eps)
    # dbias: the sum of dz as stored (as torch sums its rounded dz), in float32, rounded once
    assert_close_to_ref(dbias.float(), dz.float().reshape(-1, n).sum(0), lowp.reshape(-1, n).sum(0).float(), "dbias",
                        floor=torch.finfo(dtype).eps)


def test_torch_compile_fullgraph_matches_eager():
    x, w, b, r = _inputs((4, 9), 16, 24, dtype=torch.float32, residual=True)

    def f(x, w, b, r):
        return fops.linear_act(x, w, b, "gelu_tanh", r).square().sum()

    def grads(fn, x):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, r[: x.shape[0]])]
        loss = fn(*leaves)
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    eager = grads(f, x)
    compiled = grads(torch.compile(f, fullgraph=True), x)
    for a, c in zip(compiled, eager):
        assert max_err(a, c) <= 1e-5 * max(c.abs().max().item(), 1.0)
    dynamic = torch.compile(lambda x: fops.linear_act(x, w, b, "silu"), fullgraph=True, dynamic=True)
    for m in (3, 5, 11):
        xm = torch.randn(m, 16)
        assert max_err(dynamic(xm), linear_act_ref(xm, w, b, "silu")) < 1e-5


@pytest.mark.parametrize("op", ["linear_act", "linear_gated", "mlp", "gated_mlp"])
def test_torch_compile_training_with_dynamic_shapes_compiles_once(op):
    """With a gradient, the backward traced by AOTAutograd keeps the row count symbolic: new batch sizes and
    sequence lengths reuse the graph (no recompile per shape, as for F.linear + the activation)."""
    import torch._functorch.config
    from torch._dynamo.utils import counters

    w, wd = torch.randn(48, 16, requires_grad=True), torch.randn(16, 24, requires_grad=True)
    calls = {
        "linear_act": lambda x: fops.linear_act(x, w, None, "gelu"),
        "linear_gated": lambda x: fops.linear_gated(x, w, None, "swiglu"),
        "mlp": lambda x: fops.mlp(x, w[:24], None, wd, None, "gelu"),
        "gated_mlp": lambda x: fops.gated_mlp(x, w, None, wd, None, "swiglu"),
    }
    torch._dynamo.reset()
    counters.clear()
    with torch._functorch.config.patch(enable_autograd_cache=False):  # no graph from an earlier process's cache
        compiled = torch.compile(calls[op], backend="aot_eager", dynamic=True)
        for shape in ((2, 16), (5, 16), (3, 7, 16), (3, 9, 16)):
            x = torch.randn(shape, requires_grad=True)
            (dx,) = torch.autograd.grad(compiled(x).sum(), x)
            (want,) = torch.autograd.grad(calls[op](x).sum(), x)
            assert max_err(dx, want) < 1e-5, shape
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # one per rank


def test_export_of_the_module():
    from torch.export import Dim, export

    model = torch.nn.Sequential(fnn.FusedLinear(16, 32, activation="squared_relu"), fnn.FusedLinear(32, 8))
    x = torch.randn(5, 16)
    program = export(model, (x,), dynamic_shapes=({0: Dim("rows")},))
    x7 = torch.randn(7, 16)
    assert max_err(program.module()(x7), model(x7)) < 1e-6


@needs_native  # fx traces the native op as one call; the reference's checks are Python control flow
def test_fx_trace_of_the_module():
    model = torch.nn.Sequential(fnn.FusedLinear(16, 32, activation="squared_relu"), fnn.FusedLinear(32, 8))
    x = torch.randn(5, 16)
    traced = torch.fx.symbolic_trace(model)
    assert max_err(traced(x), model(x)) == 0.0


def test_fused_linear_is_nn_linear_plus_activation():
    torch.manual_seed(3)
    ref = torch.nn.Linear(16, 24)
    torch.manual_seed(3)
    fused = fnn.FusedLinear(16, 24, activation="silu")
    assert isinstance(fused, torch.nn.Linear) and "activation='silu'" in repr(fused)
    assert all(torch.equal(a, c) for a, c in zip(ref.state_dict().values(), fused.state_dict().values()))
    assert list(ref.state_dict()) == list(fused.state_dict())  # nn.Linear's init and keys
    other = fnn.FusedLinear(16, 24, activation="silu")
    other.load_state_dict(ref.state_dict())
    back = torch.nn.Linear(16, 24)
    back.load_state_dict(other.state_dict())
    x, res = torch.randn(2, 3, 16), torch.randn(2, 3, 24)
    assert max_err(other(x), F.silu(ref(x))) < 1e-6 and max_err(back(x), ref(x)) == 0.0
    assert max_err(other(x, res), F.silu(ref(x)) + res) < 1e-6
    no_bias = fnn.FusedLinear(16, 24, bias=False, activation="none", dtype=torch.float64)
    assert no_bias.bias is None and no_bias.weight.dtype == torch.float64
    assert max_err(no_bias(x.double()), x.double() @ no_bias.weight.t()) < 1e-12


def test_cpu_autocast_casts_like_torch_linear():
    x, w, b, r = _inputs((4,), 16, 24, dtype=torch.float32, residual=True)
    r = r.bfloat16()  # a residual already in the autocast dtype joins the fused op (a wider one: see below)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fops.linear_act(x, w, b, "gelu", r)
        torch_linear = F.linear(x, w, b)
    assert ours.dtype == torch_linear.dtype == torch.bfloat16
    want = linear_act_ref(x.bfloat16(), w.bfloat16(), b.bfloat16(), "gelu", r)
    assert max_err(ours, want) == 0.0


# ------------------------------------------------------------------------------------------------
# The fused kernel (CUDA): against the fp32 reference, tolerance from PyTorch's own low-precision error
# ------------------------------------------------------------------------------------------------

# (leading dims, K, N): M odd (1, 17, 1000, 4097), batched leading dims, K and N multiples of 8 but not all of
# 64 / 128 (8, 24, 136, 4104)
SMALL_SHAPES = [((1,), 8, 8), ((17,), 24, 136), ((2, 500), 136, 24)]
LARGE_SHAPES = [((4097,), 4104, 136), ((1000,), 136, 4104), ((3, 17), 4104, 24), ((4097,), 24, 8)]


def _check_forward(x, w, b, r, activation, name="out"):
    """ours against the fp32 reference, within twice PyTorch's own error in x's dtype plus one ulp of the largest
    output (the kernel rounds once, PyTorch after each step)."""
    f32 = [t.float() if t is not None else None for t in (x, w, b, r)]
    ref = linear_act_ref(*f32[:3], activation, f32[3])
    lowp = linear_act_ref(x, w, b, activation, r)
    poison_allocator(lowp, lowp)
    ours = fops.linear_act(x, w, b, activation, r)
    assert ours.dtype == x.dtype and ours.shape == ref.shape and ours.is_contiguous()
    assert_close_to_ref(ours.float(), ref, lowp.float(), name, floor=torch.finfo(x.dtype).eps)
    return ours


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_kernel_forward_every_activation(shape, residual, bias, activation, dtype, kernels):
    lead, k, n = shape
    _check_forward(*_inputs(lead, k, n, dtype, "cuda", bias, residual), activation)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "none"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_kernel_keeps_nan_as_torch(activation, grad, kernels):
    """A NaN in x reaches its output row through every activation, as in PyTorch (relu too: fmaxf(NaN, 0) is 0, which
    would hide a diverging model's NaNs), in the one-pass epilogue (no grad) and the two-pass one."""
    x, w, b, _ = _inputs((64,), 128, 256, torch.bfloat16, "cuda")
    x[3, 5] = float("nan")
    x.requires_grad_(grad)
    ours = fops.linear_act(x, w, b, activation)
    want = PLAIN[activation](F.linear(x.float(), w.float(), b.float()))
    assert ours[3].isnan().all() and torch.equal(ours.isnan(), want.isnan())


@pytest.mark.cuda
@needs_native
def test_kernel_gelu_keeps_its_negative_tail(kernels):
    """The epilogue's gelu forms the tail Φ(-|z|) = erfc(|z| / √2) / 2 itself: (1 + erf) / 2 in fp32 (torch's own
    formula) has lost 4% of gelu(-5) to cancellation. Through an identity weight z = x exactly; gelu of bf16 x in
    [-5, 5] lands within bf16 rounding (plus the approximation's 2e-3) of the float64 value, negative tail included."""
    x = torch.linspace(-5, 5, 64 * 128, device="cuda").reshape(64, 128).bfloat16()
    w = torch.eye(128, device="cuda", dtype=torch.bfloat16)
    poison_allocator(x)
    ours = fops.linear_act(x, w, None, "gelu").double()
    want = F.gelu(x.double())
    relative = ((ours - want).abs() / want.abs().clamp_min(1e-30)).max().item()
    assert relative <= 2**-8 + 2e-3, relative


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "squared_relu", "none"])
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
def test_kernel_forward_large_and_odd_sizes(shape, activation, dtype, kernels):
    lead, k, n = shape
    _check_forward(*_inputs(lead, k, n, dtype, "cuda", True, activation == "none"), activation)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_kernel_output_is_the_activation_of_the_saved_pre_activation(dtype, kernels):
    """out = round(act(z) + residual) from the rounded z the kernel saves, bit for bit where PyTorch's fp32 arithmetic
    is the kernel's (squared relu: a product, then the addition); and the one pass (no grad, nothing saved) gives the
    same bits as the two passes. m = 40, K = 2056: split K."""
    for m, k, n in ((333, 520, 1032), (40, 2056, 136)):
        x, w, b, r = _inputs((m,), k, n, dtype, "cuda", True, True)
        out, z = torch.ops.fusedkernels.linear_act_fwd(x, w, b, ACTIVATIONS.index("squared_relu"), r, True, False)
        assert torch.equal(out, (torch.relu(z.float()) ** 2 + r.float()).to(dtype)), (m, k, n)
        for activation in ("gelu", "silu", "squared_relu"):
            with torch.no_grad():
                one_pass = fops.linear_act(x, w, b, activation, r)
            two_passes = fops.linear_act(x.detach().requires_grad_(), w, b, activation, r)
            assert torch.equal(one_pass, two_passes.detach()), (m, k, n, activation)


def _shapes_across_the_tile_choices(count=12, seed=2024):
    """(m, k, n) drawn across the Hopper kernel's choices: m from 1 to 600 (64- or 256-wide tiles, split K or not, the
    cooperative tiles when forced), k and n multiples of 8 from 8 to 2120 (partial tiles and k-slices)."""
    g = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (), generator=g))

    return [(draw(1, 600), 8 * draw(1, 265), 8 * draw(1, 265)) for _ in range(count)]


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("shape", _shapes_across_the_tile_choices(), ids=str)
def test_kernel_random_shapes_across_the_tile_choices(shape, kernels):
    """Each shape with a residual (the one pass) and with the pre-activation saved (the two passes), bf16."""
    m, k, n = shape
    x, w, b, r = _inputs((m,), k, n, torch.bfloat16, "cuda", True, True)
    _check_forward(x, w, b, r, "gelu")
    x.requires_grad_()
    out = _check_forward(x, w, b, None, "silu", "out with grad")
    assert out.grad_fn is not None


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_kernel_strided_x_and_residual(dtype, kernels):
    """Rows a multiple of 8 elements apart are read in place; other layouts are copied first."""
    k, n = 136, 24
    base = torch.randn(1000, k + 8, device="cuda").to(dtype)
    w, b = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype), torch.randn(n, device="cuda").to(dtype)
    res = torch.randn(1000, n + 16, device="cuda").to(dtype)[:, 8 : 8 + n]  # row stride 40, offset 8
    _check_forward(base[:, :k], w, b, res, "gelu", "row stride k + 8")
    _check_forward(base[:, 8:], w, b, None, "silu", "offset 8")
    odd = torch.randn(17, k + 4, device="cuda").to(dtype)[:, :k]  # rows 8-byte aligned only: copied
    _check_forward(odd, w, b, None, "relu", "row stride k + 4")
    batched = torch.randn(5, 3, k, device="cuda").to(dtype).transpose(0, 1)  # leading dims that do not fold
    _check_forward(batched, w, b, None, "gelu_tanh", "transposed leading dims")


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [((17,), 24, 136), ((2, 500), 136, 40)], ids=str)
def test_kernel_pre_activation_and_grads(shape, activation, dtype, kernels):
    """The pre-activation the kernel writes is F.linear's (up to rounding), and the gradients computed from it
    match the fp32 reference as closely as PyTorch's own in the same dtype."""
    lead, k, n = shape
    x, w, b, r = _inputs(lead, k, n, dtype, "cuda", True, True)
    index = ACTIVATIONS.index(activation)
    poison_allocator(r, r)
    out, z = torch.ops.fusedkernels.linear_act_fwd(x, w, b, index, r, True)
    assert_close_to_ref(z.float(), F.linear(x.float(), w.float(), b.float()), F.linear(x, w, b).float(),
                        "pre_activation", floor=torch.finfo(dtype).eps)
    dy = torch.randn(*lead, n, device="cuda").to(dtype)
    tensors = (x, w, b, r)
    ref = _grads(lambda *t: linear_act_ref(*t[:3], activation, t[3]), [t.float() for t in tensors], dy.float())
    lowp = _grads(lambda *t: linear_act_ref(*t[:3], activation, t[3]), tensors, dy)
    poison_allocator(x, w, b, r, r)
    ours = _grads(lambda *t: fops.linear_act(*t[:3], activation, t[3]), tensors, dy)
    for name, o, f, t in zip(["out", "dx", "dw", "db", "dr"], ours, ref, lowp):
        assert o.dtype == dtype and o.shape == f.shape, name
        assert_close_to_ref(o.float(), f, t.float(), name, floor=torch.finfo(dtype).eps)


@pytest.mark.cuda
@needs_native
def test_opcheck_cuda():
    _opcheck("cuda", torch.bfloat16)


@pytest.mark.cuda
@needs_native
def test_kernel_cuda_graph_capture_and_replay(kernels):
    """Forward and backward captured in a graph; each replay matches an eager run on the same inputs (to an ulp:
    cuBLAS may pick another algorithm for the gradient GEMMs inside a capture)."""
    static = [t.requires_grad_() for t in _inputs((130,), 136, 264, torch.bfloat16, "cuda", True, True)]
    dy = torch.randn(130, 264, device="cuda", dtype=torch.bfloat16)

    def step(x, w, b, r):
        out = fops.linear_act(x, w, b, "gelu", r)
        return [out, *torch.autograd.grad(out, (x, w, b, r), dy)]

    check_graph_replays(step, static, lambda: _inputs((130,), 136, 264, torch.bfloat16, "cuda", True, True),
                        ["out", "dx", "dw", "db", "dr"])


@pytest.mark.cuda
@needs_native
def test_inputs_without_a_kernel_run_the_reference_with_one_warning():
    bf16 = torch.bfloat16
    cases = {
        "float32": _inputs((9,), 16, 24, torch.float32, "cuda"),
        "in_features (K) not a multiple of 8": _inputs((9,), 12, 24, bf16, "cuda"),
        "out_features (N) not a multiple of 8": _inputs((9,), 16, 20, bf16, "cuda"),
    }
    x, w, b, _ = _inputs((9,), 16, 24, bf16, "cuda")
    cases["weight whose rows are not contiguous"] = (x, w.t().contiguous().t(), b, None)
    for reason, (x, w, b, r) in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = fops.linear_act(x, w, b, "gelu")
            c = fops.linear_act(x, w, b, "gelu")
        said = [str(m.message) for m in caught if "fusedkernels.linear_act" in str(m.message)]
        assert len(said) <= 1 and all(reason in s for s in said), (reason, said)
        assert a.dtype == x.dtype and torch.equal(a, c)
        assert torch.equal(a, linear_act_ref(x, w, b, "gelu")), reason  # the reference, exactly


@pytest.mark.cuda
@needs_native
def test_errors_on_cuda():
    x, w, b, _ = _inputs((3,), 8, 16, torch.bfloat16, "cuda")
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        fops.linear_act(x, w.cpu(), b.cpu())
    with pytest.raises((TypeError, ValueError), match="must be float16 or bfloat16"):
        torch.ops.fusedkernels.linear_act_fwd(x.float(), w.float(), None, 0, None, False)
    with pytest.raises(ValueError, match="activation must be"):
        torch.ops.fusedkernels.linear_act_fwd(x, w, None, 6, None, False)


@pytest.mark.cuda
@needs_native
def test_autocast_casts_like_torch_linear():
    x, w, b, r = (t.requires_grad_() for t in _inputs((33,), 64, 48, torch.float32, "cuda", True, True))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = fops.linear_act(x, w, b, "silu", r)
        fused = fops.linear_act(x, w, b, "silu", r.detach().bfloat16())
        torch_linear = F.linear(x, w, b)
    # bfloat16 as F.linear's; with the float32 residual the add promotes, as F.silu(F.linear(...)) + r would
    assert fused.dtype == torch_linear.dtype == torch.bfloat16 and ours.dtype == torch.float32
    assert max_err(fused, ours) < 5e-2
    ours.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in (x, w, b, r))
    want = linear_act_ref(x.float(), w.float(), b.float(), "silu", r.float())
    assert max_err(ours, want) < 5e-2


@pytest.mark.cuda
@needs_native
def test_hopper_kernel_is_what_runs_on_sm90():
    if not hopper_kernels_run():
        pytest.skip("the Hopper kernel runs on sm_90 from a build with sm_90a code")
    x, w, b, r = _inputs((300,), 136, 264, torch.bfloat16, "cuda", True, True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fops.linear_act(x, w, b, "gelu", r)
            torch.cuda.synchronize()
    assert not [str(c.message) for c in caught if "fusedkernels" in str(c.message)]  # no fallback
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("linear_act_sm90_kernel" in n for n in names), names


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "silu", "none", "swiglu", "geglu"])
def test_small_m_split_k_output_and_pre_activation(activation, dtype, kernels):
    """Few output tiles and a long K: the Hopper kernel splits K (fp32 partial sums, then a second kernel adds
    them and applies the epilogue), K's last run partly past the end. Same answers as one pass."""
    m, k, n = 40, 2056, 136
    gated = activation in GATED_ACTIVATIONS
    x, w, b, r = _inputs((m,), k, 2 * n if gated else n, dtype, "cuda", True, True)
    r = r[:, :n].contiguous()
    ref = (lambda *t: linear_gated_ref(*t[:3], activation, t[3])) if gated else (
        lambda *t: linear_act_ref(*t[:3], activation, t[3]))
    index = ACTIVATIONS.index(GATE_ACTIVATION[activation] if gated else activation)
    poison_allocator(r, r, r)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out, z = torch.ops.fusedkernels.linear_act_fwd(x, w, b, index, r, True, gated)
        torch.cuda.synchronize()
    f32 = [t.float() for t in (x, w, b, r)]
    eps = torch.finfo(dtype).eps
    assert_close_to_ref(out.float(), ref(*f32), ref(x, w, b, r).float(), "out", floor=eps)
    assert_close_to_ref(z.float(), F.linear(*f32[:3]), F.linear(x, w, b).float(), "pre_activation", floor=eps)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if kernels == "default" and any("linear_act_sm90_kernel" in name for name in names):
        assert any("split_k_epilogue_kernel" in name for name in names), names


@pytest.mark.cuda
@needs_native
def test_an_unknown_kernel_setting_warns_and_is_ignored(monkeypatch):
    x, w, b, _ = _inputs((70,), 136, 264, torch.bfloat16, "cuda")
    want = fops.linear_act(x, w, b, "gelu")
    monkeypatch.setenv("FUSEDKERNELS_GEMM_KERNEL", "cooperative")
    with pytest.warns(UserWarning, match="FUSEDKERNELS_GEMM_KERNEL=cooperative names no GEMM kernel"):
        out = fops.linear_act(x, w, b, "gelu")
    assert torch.equal(out, want)


@pytest.mark.cuda
@needs_native
def test_hopper_tiles_are_the_shapes_or_the_settings_choice(monkeypatch):
    """Cooperative 128 x 256 tiles for the ungated one-pass epilogue where they fill the SMs, N <= 4096 and K >= 2048
    (1024 but for silu and gelu_tanh; 4096 with a residual); ping-pong tiles otherwise, 64 wide for some small m;
    FUSEDKERNELS_GEMM_KERNEL forces either where the cooperative tiles can run (not with a saved pre-activation or a
    gate)."""
    if not hopper_kernels_run():
        pytest.skip("the Hopper kernel's choice of tiles")

    def tiles(m, k, n, activation, setting, residual=False, grad=False, gated=False):
        """(tile width, cooperative) of the Hopper kernel the call runs."""
        if setting is None:
            monkeypatch.delenv("FUSEDKERNELS_GEMM_KERNEL", raising=False)
        else:
            monkeypatch.setenv("FUSEDKERNELS_GEMM_KERNEL", setting)
        x, w, b, r = _inputs((m,), k, 2 * n if gated else n, torch.bfloat16, "cuda", residual=residual and not gated)
        x.requires_grad_(grad)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            if gated:
                fops.linear_gated(x, w, b, activation)
            else:
                fops.linear_act(x, w, b, activation, r)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if "linear_act_sm90_kernel" in e.name]
        assert len(names) == 1, names
        config = re.search(r"LinearActSm90Config<[^<>]*, (\d+), (true|false)>", names[0])
        return int(config[1]), config[2] == "true"

    def cooperative(*args, **kwargs):
        return tiles(*args, **kwargs)[1]

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    m = 128 * -(-sms // 4)  # a 128 x 256 tile per SM at n = 1024
    assert cooperative(m, 1024, 1024, "relu", None)
    assert cooperative(m, 1024, 1024, "gelu", None)
    assert not cooperative(m, 768, 1024, "relu", None)
    assert not cooperative(m, 1024, 1024, "silu", None)
    assert cooperative(m, 2048, 1024, "silu", None)
    assert not cooperative(m - 128, 1024, 1024, "relu", None)  # a tile short of every SM
    assert not cooperative(m // 4, 1024, 4104, "relu", None)  # wider than 4096
    assert not cooperative(m, 2048, 1024, "none", None, residual=True)
    assert cooperative(m, 4096, 1024, "none", None, residual=True)
    assert not cooperative(m, 1024, 1024, "relu", None, grad=True)  # the pre-activation saved: two passes
    assert not cooperative(m, 1024, 1024, "relu", "sm90-pingpong")
    assert cooperative(300, 136, 264, "gelu", "sm90-cooperative")
    assert cooperative(300, 136, 264, "gelu", "sm90-cooperative", residual=True)
    assert not cooperative(300, 136, 264, "gelu", "sm90-cooperative", grad=True)
    assert not cooperative(m, 2048, 1024, "swiglu", None, gated=True)
    assert not cooperative(m, 2048, 1024, "swiglu", "sm90-cooperative", gated=True)
    # small m: 64-wide tiles where they run in one wave on at least as many SMs as 256-wide ones with their split K
    assert tiles(128, 1024, 64 * (sms // 2), "gelu", None) == (64, False)
    assert tiles(128, 4096, 256 * (sms // 4), "gelu", None) == (256, False)  # 64-wide: two waves
    assert tiles(128, 1024, 64 * (sms // 2), "gelu", "sm90-wide") == (256, False)


@pytest.mark.cuda
@needs_native
def test_portable_kernel_is_what_runs_off_hopper_or_when_forced(kernels):
    major, minor = torch.cuda.get_device_capability()
    archs = _native.build_info().get("archs", [])
    if major < 8 or not _build.runs_on(archs, major, minor):
        pytest.skip("the portable kernel runs on sm_80 and newer, from a build with code for the GPU")
    if kernels != "portable" and hopper_kernels_run():
        pytest.skip("the Hopper kernel runs on sm_90 unless the portable one is forced")
    x, w, b, r = _inputs((300,), 136, 264, torch.bfloat16, "cuda", True, True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fops.linear_act(x, w, b, "gelu", r)
            torch.cuda.synchronize()
    assert not [str(c.message) for c in caught if "fusedkernels" in str(c.message)]  # no fallback
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("linear_act_sm80_kernel" in n for n in names) and not any("sm90" in n for n in names), names


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_plain_gemm_is_cublas_and_an_epilogue_is_ours(bias, kernels):
    """Activation "none" without a residual is F.linear: PyTorch's GEMM (cuBLAS) runs it, in any dtype, with no
    warning; a residual or an activation brings the fused kernel back."""
    x, w, b, r = _inputs((300,), 136, 264, torch.bfloat16, "cuda", bias, True)
    for activation, residual, ours in (("none", None, False), ("none", r, True), ("relu", None, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                out = fops.linear_act(x, w, b, activation, residual)
                torch.cuda.synchronize()
        assert not [str(c.message) for c in caught if "fusedkernels" in str(c.message)]
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert any("linear_act_sm" in n for n in names) == ours, (activation, residual is not None, names)
        _check_forward(x, w, b, residual, activation)
        assert out.is_contiguous()
    x32, w32 = x.float(), w.float()
    b32 = b.float() if b is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fops.linear_act(x32, w32, b32, "none")  # float32: F.linear too, with no fallback warning
    assert not [str(c.message) for c in caught if "fusedkernels" in str(c.message)]
    assert torch.equal(out, F.linear(x32, w32, b32))


@pytest.mark.parametrize("device", DEVICES)
def test_activation_none_without_a_residual_is_f_linear(device):
    """Nothing to fuse: ops.linear_act, the op through torch.ops and FusedLinear return F.linear's result bit for
    bit, its gradients, and its errors."""
    x = torch.randn(3, 5, 16, device=device, dtype=torch.bfloat16).transpose(0, 1)  # (non-contiguous)
    lin = torch.nn.Linear(16, 24, device=device, dtype=torch.bfloat16)
    fused = fnn.FusedLinear(16, 24, activation="none", device=device, dtype=torch.bfloat16)
    fused.load_state_dict(lin.state_dict())
    calls = [lambda x: fops.linear_act(x, lin.weight, lin.bias, "none"), fused]
    if _native.has_op("linear_act"):
        calls.append(lambda x: torch.ops.fusedkernels.linear_act(x, lin.weight, lin.bias, "none", None))
    dy = torch.randn(5, 3, 24, device=device, dtype=torch.bfloat16)
    leaf = x.detach().requires_grad_()
    expected = lin(leaf)
    expected_grads = torch.autograd.grad(expected, [leaf, lin.weight, lin.bias], dy)
    for call in calls:
        out = call(leaf)
        assert torch.equal(out, expected)
        params = [fused.weight, fused.bias] if call is fused else [lin.weight, lin.bias]
        for got, want in zip(torch.autograd.grad(out, [leaf, *params], dy), expected_grads):
            assert torch.equal(got, want)
        with pytest.raises(RuntimeError) as ours:
            call(leaf[..., :8])
        with pytest.raises(RuntimeError) as torchs:
            lin(leaf[..., :8])
        assert str(ours.value) == str(torchs.value)


def test_fused_linear_takes_nn_linear_positional_arguments_and_activation_by_keyword():
    lin, fused = torch.nn.Linear(16, 24, True, "cpu", torch.float64), fnn.FusedLinear(16, 24, True, "cpu", torch.float64)
    assert fused.weight.dtype == lin.weight.dtype == torch.float64 and fused.activation == "gelu"
    with pytest.raises(TypeError, match="keyword-only"):
        fnn.FusedLinear(16, 24, "relu")  # would be a gelu layer with a bias if taken as nn.Linear's bias
    # an activation that is not a str: TypeError, as ops.linear_act raises for it
    with pytest.raises(TypeError, match="FusedLinear: activation must be a str, got NoneType"):
        fnn.FusedLinear(16, 24, activation=None)
    with pytest.raises(TypeError):
        fops.linear_act(torch.randn(2, 16), lin.weight.float(), None, None)


def test_autocast_keeps_a_wider_residual_stream_as_torch():
    """Under autocast, F.gelu(F.linear(x, w, b)) comes out in bfloat16 and + h promotes to h's float32."""
    x, w, b = torch.randn(6, 16), torch.randn(24, 16), torch.randn(24)
    h = torch.randn(6, 24) * 100
    with torch.autocast("cpu", torch.bfloat16):
        want = F.gelu(F.linear(x, w, b)) + h
        ours = fops.linear_act(x, w, b, "gelu", h)
        same_dtype = fops.linear_act(x, w, b, "gelu", h.bfloat16())
    assert ours.dtype == want.dtype == torch.float32 and torch.equal(ours, want)
    assert same_dtype.dtype == torch.bfloat16


@pytest.mark.parametrize("native", ["native", "without"])
@pytest.mark.parametrize("op", ["linear_act", "linear_gated"])
def test_residual_of_another_dtype_promotes_as_the_unfused_add(op, native, monkeypatch):
    """`act(F.linear(x, w, b)) + residual` promotes: a wider residual widens the output (with its gradient), an
    integer or bool one keeps x's dtype; under autocast too (a residual is not cast); with the native op and
    without it."""
    if native == "without":
        monkeypatch.setattr(_native, "has_op", lambda name: False)
        checked = getattr(fops.gemm, f"_{op}_without_native")
        monkeypatch.setattr(fops.gemm, f"_{op}", _native.public_op(op, checked, "the PyTorch reference"))
    x, w, b = torch.randn(6, 16, requires_grad=True), torch.randn(48, 16), torch.randn(48)
    n = 24 if op == "linear_gated" else 48
    act = "swiglu" if op == "linear_gated" else "gelu"
    fused, ref = (fops.linear_gated, linear_gated_ref) if op == "linear_gated" else (fops.linear_act, linear_act_ref)
    wide = torch.randn(6, n, dtype=torch.float64, requires_grad=True)
    ours = fused(x, w, b, act, wide)
    close = lambda a, b: max_err(a, b) <= 1e-5 * max(b.abs().max().item(), 1.0)  # noqa: E731 (GEMM blocking)
    assert ours.dtype == torch.float64 and close(ours, ref(x, w, b, act) + wide)
    ours.sum().backward()
    assert torch.equal(wide.grad, torch.ones_like(wide)) and x.grad is not None
    for integer in (torch.arange(6 * n).reshape(6, n), torch.ones(6, n, dtype=torch.bool)):
        got = fused(x, w, b, act, integer)
        assert got.dtype == torch.float32 and close(got, ref(x, w, b, act) + integer)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fused(x, w, b, act, integer)
            want = ref(x.bfloat16(), w.bfloat16(), b.bfloat16(), act) + integer
        assert got.dtype == torch.bfloat16 and max_err(got, want) <= 2 ** -7 * max(want.abs().max().item(), 1.0)
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        fused(x, w, b, act, torch.ones(n, dtype=torch.float64))


def test_bias_updated_in_place_after_the_forward_is_no_error_as_for_f_linear():
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((5, 8), (16, 8), (16,)))
    out = fops.linear_act(x, w, b, "gelu")
    want = F.gelu(F.linear(x, w, b))
    with torch.no_grad():
        b.add_(1.0)  # an optimizer step on the bias before the backward
    dy = torch.randn_like(out)
    assert all(torch.allclose(o, t) for o, t in zip(torch.autograd.grad(out, (x, w, b), dy),
                                                       torch.autograd.grad(want, (x, w, b), dy)))


def test_nested_and_sparse_inputs_raise_a_clear_error():
    w = torch.randn(16, 8)
    with pytest.raises(NotImplementedError, match="strided"):
        fops.linear_act(torch.randn(5, 8).to_sparse(), w, None, "relu")
    njt = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)], layout=torch.jagged)
    with pytest.raises(NotImplementedError, match="strided"):
        fops.linear_act(njt, w, None, "relu")


def test_nn_linear_switched_to_fused_linear_in_place_computes_what_it_did():
    lin = torch.nn.Linear(16, 24)
    x = torch.randn(3, 16)
    want = lin(x)
    lin.__class__ = fnn.FusedLinear
    assert lin.activation == "none" and "activation='none'" in repr(lin)
    assert max_err(lin(x), want) < 1e-6
    assert fnn.FusedLinear(16, 24).activation == "gelu"  # the constructor's default stays the instance's


@needs_native  # the scripted forward calls torch.ops.fusedkernels.linear_act
def test_torchscript_of_the_module():
    """torch.jit.script of FusedLinear, and of an nn.Linear switched in place (activation: the class's "none"),
    gives the eager outputs, with a residual too."""
    switched = torch.nn.Linear(16, 8)
    switched.__class__ = fnn.FusedLinear
    model = torch.nn.Sequential(fnn.FusedLinear(16, 32, activation="silu"), fnn.FusedLinear(32, 16), switched)
    scripted = torch.jit.script(model)
    x = torch.randn(5, 16)
    assert max_err(scripted(x), model(x)) == 0.0
    res = torch.randn(5, 32)
    assert max_err(torch.jit.script(model[0])(x, res), model[0](x, res)) == 0.0


def test_fused_linear_takes_bias_as_nn_linear_does():
    import numpy as np

    for bias in (1, 0, None, np.bool_(True), np.bool_(False)):
        assert (fnn.FusedLinear(8, 16, bias).bias is not None) == (torch.nn.Linear(8, 16, bias).bias is not None)
    with pytest.raises(TypeError, match="keyword-only"):
        fnn.FusedLinear(8, 16, "none")


# Bad inputs, with the exception type the native op raises (and, without it, the reference after its checks).
BAD = [
    ("1-D weight", RuntimeError, lambda x, w, b, r: (x, w[0], None, "gelu", None)),
    ("bias [N/2]", RuntimeError, lambda x, w, b, r: (x, w, b[:8], "gelu", None)),
    ("2-D bias", RuntimeError, lambda x, w, b, r: (x, w, b[None], "gelu", None)),
    ("broadcast residual", RuntimeError, lambda x, w, b, r: (x, w, b, "gelu", r[:1])),
    ("1-D residual", RuntimeError, lambda x, w, b, r: (x, w, b, "gelu", r[0])),
    ("integer x", RuntimeError, lambda x, w, b, r: (x.int(), w.int(), None, "gelu", None)),
    ("float64 weight", RuntimeError, lambda x, w, b, r: (x, w.double(), None, "gelu", None)),
    ("0-D x", RuntimeError, lambda x, w, b, r: (x[0, 0], w, b, "gelu", None)),
    ("cannot multiply", RuntimeError, lambda x, w, b, r: (x[:, :7], w, b, "gelu", None)),
    ("activation None", TypeError, lambda x, w, b, r: (x, w, b, None, None)),
    ("activation int", TypeError, lambda x, w, b, r: (x, w, b, 1, None)),
    ("unknown activation", ValueError, lambda x, w, b, r: (x, w, b, "tanh", None)),
    ("x a list", TypeError, lambda x, w, b, r: ([1.0], w, b, "gelu", None)),
    ("bias a list", TypeError, lambda x, w, b, r: (x, w, [0.0] * 16, "gelu", None)),
    ("sparse x", NotImplementedError, lambda x, w, b, r: (x.to_sparse(), w, None, "gelu", None)),
]


def raises_as_the_native_op(monkeypatch, op, bad, inputs):
    """Each bad input raises its exception type through fops.<op>: with the native op (where this build has it),
    then without it (the checked reference fops.<op> runs then)."""
    fn = getattr(fops, op)
    runs = ["native", "without"] if _native.has_op(op) else ["without"]
    for run in runs:
        if run == "without":
            monkeypatch.setattr(_native, "has_op", lambda name: False)
            checked = getattr(fops.gemm, f"_{op}_without_native")
            monkeypatch.setattr(fops.gemm, f"_{op}", _native.public_op(op, checked, "the PyTorch reference"))
        for case, kind, make in bad:
            try:
                fn(*make(*inputs))
            except Exception as e:  # noqa: BLE001 (the type is what is compared)
                assert type(e) is kind, f"{run}, {case}: {type(e).__name__}: {e}"
            else:
                pytest.fail(f"{run}, {case}: no exception")


def test_without_native_module_bad_inputs_raise_as_the_native_op(monkeypatch):
    x, w, b, r = _inputs((3,), 8, 16, dtype=torch.float32, residual=True)
    raises_as_the_native_op(monkeypatch, "linear_act", BAD, (x, w, b, r))
    with pytest.raises(RuntimeError, match=r"linear_act: bias must be \[out_features\] = \[16\], got \[8\]"):
        fops.linear_act(x, w, b[:8])  # the reference's own message now
    fused = fnn.FusedLinear(8, 16, activation="silu")  # the module on the checked reference
    assert max_err(fused(x, r), F.silu(F.linear(x, fused.weight, fused.bias)) + r) < 1e-6
    with torch.autocast("cpu", torch.bfloat16):  # autocast's casts come first, as in the native op
        out = fops.linear_act(x.bfloat16(), w, b, "gelu", r)
        want = F.gelu(F.linear(x.bfloat16(), w, b)) + r
    assert out.dtype == want.dtype == torch.float32 and torch.equal(out, want)


def test_vmap_and_grad_run_the_reference_without_a_per_sample_loop():
    x, w, b = torch.randn(3, 4, 5), torch.randn(6, 5), torch.randn(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch's batching fallback warns
        out = torch.vmap(lambda x: fops.linear_act(x, w, b, "gelu"))(x)
        grads = torch.vmap(torch.func.grad(lambda x: fops.linear_act(x, w, b, "gelu").sum()))(x)
        gated = torch.vmap(lambda x: fops.linear_gated(x, torch.cat([w, w]), None, "swiglu"))(x)
        module = fnn.FusedLinear(5, 6, activation="gelu")
        per_sample = torch.vmap(module)(x)  # the module as the op: the reference, batched
    assert max_err(per_sample, F.gelu(F.linear(x, module.weight, module.bias))) < 1e-6
    assert max_err(out, F.gelu(F.linear(x, w, b))) < 1e-6
    xs = x.clone().requires_grad_()
    F.gelu(F.linear(xs, w, b)).sum().backward()
    assert max_err(grads, xs.grad) < 1e-6
    assert max_err(gated, F.silu(F.linear(x, w)) * F.linear(x, w)) < 1e-6
