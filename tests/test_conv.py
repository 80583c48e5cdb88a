"""fusedkernels.ops.conv2d_bias_relu / fold_batch_norm, nn.FusedConv2dReLU / FusedConvBNReLU and their op layer.

CPU tests hold the reference (the CPU kernel of the internal op) to plain PyTorch in float64 and check the op layer
(geometry, errors, autograd to second order, opcheck, compile, autocast) and the modules (state dicts, the BatchNorm
fold, training statistics). `cuda` tests hold what runs on the GPU to an fp32 reference with a tolerance relative to
PyTorch's own bf16 / fp16 error, and check the routing warnings, the channels_last conversion and CUDA graphs.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedkernels.nn as fnn
import fusedkernels.ops as fops
from fusedkernels import _native
from fusedkernels.ops import conv as conv_module
from fusedkernels.ops.conv import _without_native, conv2d_bias_relu_ref

from .helpers import assert_close_to_ref, check_graph_replays, hopper_kernels_run, max_err, poison_allocator

needs_native = pytest.mark.skipif(not _native.has_op("conv2d_bias_relu"), reason="needs the native conv ops")
LOWP = [torch.float16, torch.bfloat16]
CL = torch.channels_last


def _inputs(n, c_in, hw, c_out, k, dtype=torch.float64, device="cpu", bias=True, residual=False, stride=1,
            padding=0, dilation=1):
    h, w = hw
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c_in, h, w, device=device).to(dtype)
    wt = (torch.randn(c_out, c_in, kh, kw, device=device) / (c_in * kh * kw) ** 0.5).to(dtype)
    b = torch.randn(c_out, device=device).to(dtype) if bias else None
    r = None
    if residual:
        out = F.conv2d(x.float(), wt.float(), None, stride, padding, dilation)
        r = torch.randn(out.shape, device=device).to(dtype)
    return x, wt, b, r


def plain(x, w, b, stride=1, padding=0, dilation=1, r=None):
    """Written out independently of the op: conv2d, + bias, + residual, relu."""
    z = F.conv2d(x, w, None, stride, padding, dilation)
    if b is not None:
        z = z + b[:, None, None]
    return torch.relu(z + r if r is not None else z)


def _grads(fn, tensors, dy):
    """fn(*leaves) and the grads of the leaves that are not None."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dy)
    return [out.detach(), *grads]


# ------------------------------------------------------------------------------------------------
# Semantics of the reference (CPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_matches_plain_torch_with_grads(bias, residual):
    x, w, b, r = _inputs(2, 5, (9, 7), 6, 3, bias=bias, residual=residual, padding=1)
    dy = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    tensors = [x, w, b, r]
    ours = _grads(lambda x, w, b, r: fops.conv2d_bias_relu(x, w, b, 1, 1, 1, r), tensors, dy)
    want = _grads(lambda x, w, b, r: plain(x, w, b, 1, 1, 1, r), tensors, dy)
    names = ["out", "dx", "dw"] + ["db"] * bias + ["dr"] * residual
    assert len(ours) == len(names)
    assert ours[0].is_contiguous()  # x's layout: contiguous NCHW here
    for name, o, p in zip(names, ours, want):
        assert o.dtype == torch.float64 and o.shape == p.shape, name
        assert max_err(o, p) < 1e-12, name


# (C_in, (H, W), C_out, kernel, stride, padding, dilation): 1x1, 3x3, the 7x7 stride-2 stem with 3 channels,
# rectangular kernels, strides and paddings, dilation; odd sizes; channels not multiples of 8
GEOMETRIES = [
    (16, (8, 8), 24, 1, 1, 0, 1),
    (8, (9, 11), 8, 3, 1, 1, 1),
    (3, (23, 17), 8, 7, 2, 3, 1),
    (5, (10, 13), 7, 3, 2, 1, 1),
    (6, (12, 12), 4, 3, 1, 2, 2),
    (4, (7, 9), 6, (1, 3), (2, 1), (0, 1), 1),
    (4, (11, 8), 5, (5, 3), 3, (2, 0), (1, 2)),
    (2, (5, 5), 3, 5, 1, 0, 1),  # the kernel covers the whole input: 1x1 output
    (3, (6, 6), 4, 2, 2, 0, 1),  # even kernel
    (4, (1, 9), 4, (1, 3), 1, 0, 3),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_geometry_grid_forward_and_grads(geometry):
    c_in, hw, c_out, k, stride, padding, dilation = geometry
    x, w, b, r = _inputs(2, c_in, hw, c_out, k, residual=True, stride=stride, padding=padding, dilation=dilation)
    dy = torch.randn_like(r)
    ours = _grads(lambda *t: fops.conv2d_bias_relu(t[0], t[1], t[2], stride, padding, dilation, t[3]), (x, w, b, r), dy)
    want = _grads(lambda *t: plain(t[0], t[1], t[2], stride, padding, dilation, t[3]), (x, w, b, r), dy)
    for name, o, p in zip(["out", "dx", "dw", "db", "dr"], ours, want):
        assert o.shape == p.shape and max_err(o, p) < 1e-12, name
    assert (ours[0] > 0).any() and (ours[0] == 0).any()  # both sides of the ReLU are exercised


def test_pairs_and_ints_and_unbatched_input():
    x, w, b, r = _inputs(1, 4, (9, 8), 6, 3, residual=True, stride=2, padding=1)
    want = plain(x, w, b, 2, 1, 1, r)
    for args in ((2, 1, 1), ((2, 2), (1, 1), (1, 1)), ([2, 2], [1], 1), (torch.Size([2, 2]), 1, (1,))):
        assert max_err(fops.conv2d_bias_relu(x, w, b, *args, r), want) < 1e-12
    unbatched = fops.conv2d_bias_relu(x[0], w, b, 2, 1, 1, r[0])
    assert unbatched.shape == want.shape[1:] and max_err(unbatched, want[0]) < 1e-12
    assert max_err(fops.conv2d_bias_relu(x, w), F.relu(F.conv2d(x, w))) < 1e-12  # defaults: no bias, 1, 0, 1


def test_any_input_layout_on_cpu_without_warnings():
    x, w, b, r = _inputs(2, 8, (6, 5), 8, 3, residual=True, padding=1)
    want = plain(x, w, b, 1, 1, 1, r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU calls convert nothing and warn about nothing
        for xx, ww, rr in ((x, w, r), (x.to(memory_format=CL), w.to(memory_format=CL), r.to(memory_format=CL)),
                           (x.transpose(2, 3).contiguous().transpose(2, 3), w, r[:, :, :, :])):
            assert max_err(fops.conv2d_bias_relu(xx, ww, b, 1, 1, 1, rr), want) < 1e-12


def test_empty_batch_and_channels():
    x, w, b, _ = _inputs(0, 4, (5, 5), 6, 3)
    assert fops.conv2d_bias_relu(x, w, b).shape == (0, 6, 3, 3)
    x, w, b, _ = _inputs(2, 4, (5, 5), 0, 3)
    with pytest.raises(RuntimeError, match="expected weight to be at least 1 at dimension 0"):  # as F.conv2d
        fops.conv2d_bias_relu(x, w, b)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_and_gradgradcheck_float64(bias):
    """The op's backward and, through create_graph, its second derivatives (the convolution's are not zero)."""
    x, w, b, r = _inputs(2, 3, (5, 4), 4, 3, bias=bias, residual=True, stride=(1, 2), padding=1, dilation=(2, 1))
    leaves = [t.requires_grad_() for t in (x, w, b, r) if t is not None]

    def fn(*t):
        x, w, *rest = t
        b, r = (rest if bias else [None, *rest])
        return fops.conv2d_bias_relu(x, w, b, (1, 2), 1, (2, 1), r)

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


def test_no_grad_and_a_gradient_for_the_residual_only():
    x, w, b, _ = (t.requires_grad_() if t is not None else None for t in _inputs(1, 4, (6, 6), 4, 3))
    with torch.no_grad():
        assert fops.conv2d_bias_relu(x, w, b).grad_fn is None
    # only the residual needs a gradient: dy where the output is positive, else 0
    r = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    out = fops.conv2d_bias_relu(x.detach(), w.detach(), None, 1, 0, 1, r)
    (dr,) = torch.autograd.grad(out, r, dy)
    assert torch.equal(dr, torch.where(out > 0, dy, 0))


@needs_native  # the native op's autograd node and internal op; without them PyTorch's ops differentiate
def test_backward_node_and_what_it_computes():
    x, w, b, _ = (t.requires_grad_() if t is not None else None for t in _inputs(1, 4, (6, 6), 4, 3))
    out = fops.conv2d_bias_relu(x.to(memory_format=CL), w, b)  # NHWC in: the op's output itself, no copy back
    assert out.grad_fn.name() == "fusedkernels::Conv2dBiasReluBackward"
    dy = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    # the internal op directly, on an NCHW x: channels_last output (the public op converts it to x's), same gradients
    x2 = x.detach().requires_grad_()
    out = torch.ops.fusedkernels.conv2d_bias_relu_fwd(x2, w, b, [1, 1], [0, 0], [1, 1], None)
    assert out.is_contiguous(memory_format=CL)
    grads = torch.autograd.grad(out, (x2, w, b), dy)
    want = torch.autograd.grad(plain(x2, w, b), (x2, w, b), dy)
    assert all(max_err(g, h) < 1e-12 for g, h in zip(grads, want))


@needs_native
@pytest.mark.skipif(not _native.has_op("act_backward"), reason="needs the gemm family's act_backward")
@pytest.mark.parametrize("dy_layout", ["channels_last", "contiguous"])
def test_backward_forms_dz_and_dbias_in_one_pass_for_channels_last_gradients(dy_layout):
    """With a bias, dz = dy * (out > 0) and dbias come from one act_backward call where dy is channels_last, as the
    output is; any other dy, and a backward that builds a graph, take threshold_backward and convolution_backward."""
    x, w, b, r = _inputs(2, 5, (7, 9), 6, 3, residual=True, padding=1)
    x, r = x.to(memory_format=CL), r.to(memory_format=CL)
    dy = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    dy = dy.to(memory_format=CL) if dy_layout == "channels_last" else dy.contiguous()
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
    out = fops.conv2d_bias_relu(leaves[0], leaves[1], leaves[2], 1, 1, 1, leaves[3])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        grads = torch.autograd.grad(out, leaves, dy)
    ran = {e.name for e in prof.events()}
    assert ("fusedkernels::act_backward" in ran) == (dy_layout == "channels_last"), sorted(ran)
    want = torch.autograd.grad(plain(*leaves[:3], 1, 1, 1, leaves[3]), leaves, dy)
    for name, g, h in zip(["dx", "dw", "db", "dr"], grads, want):
        assert g.shape == h.shape and max_err(g, h) < 1e-12, name
    # building a graph: the ATen ops, differentiable again
    out = fops.conv2d_bias_relu(leaves[0], leaves[1], leaves[2], 1, 1, 1, leaves[3])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        grads = torch.autograd.grad(out, leaves, dy, create_graph=True)
    assert "fusedkernels::act_backward" not in {e.name for e in prof.events()}
    assert all(max_err(g.detach(), h) < 1e-12 for g, h in zip(grads, want))


def test_torch_func_transforms_run_what_f_conv2d_runs():
    """vmap, per-sample gradients and the hessian: the transforms take the reference, whose F.conv2d they know."""
    from torch.func import grad, hessian, vmap

    x, w, b, _ = _inputs(3, 2, (5, 5), 4, 3)
    xb = torch.randn(4, *x.shape, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-sample loop (PyTorch's batching fallback warns)
        ours = vmap(lambda x: fops.conv2d_bias_relu(x, w, b, 1, 1))(xb)
    assert max_err(ours, vmap(lambda x: plain(x, w, b, 1, 1))(xb)) < 1e-12
    per_sample = vmap(grad(lambda x: fops.conv2d_bias_relu(x, w, b, 1, 1).pow(2).sum()))(xb)
    assert max_err(per_sample, vmap(grad(lambda x: plain(x, w, b, 1, 1).pow(2).sum()))(xb)) < 1e-12
    small = x[:1, :, :3, :3]
    want = hessian(lambda x: plain(x, w, b, 1, 1).pow(2).sum())(small)
    h = hessian(lambda x: fops.conv2d_bias_relu(x, w, b, 1, 1).pow(2).sum())(small)
    assert max_err(h, want) < 1e-10
    h = hessian(lambda x: _without_native(x, w, b, 1, 1).pow(2).sum())(small.contiguous(memory_format=CL))
    assert max_err(h, want) < 1e-10  # the build without the native op, channels_last x
    if _native.has_op("conv2d_bias_relu"):  # the C++ op called directly takes the same path
        op = torch.ops.fusedkernels.conv2d_bias_relu
        h = hessian(lambda x: op(x, w, b, [1, 1], [1, 1], [1, 1], None).pow(2).sum())(small)
        assert max_err(h, want) < 1e-10


def test_forward_mode_ad_and_jvp_of_grad_match_torch():
    x, w, b, r = _inputs(1, 3, (6, 5), 4, 3, residual=True, padding=1)
    tx = torch.randn_like(x)
    ours = lambda x: fops.conv2d_bias_relu(x, w, b, 1, 1, 1, r)  # noqa: E731
    ref = lambda x: conv2d_bias_relu_ref(x, w, b, 1, 1, 1, r)  # noqa: E731
    assert max_err(torch.func.jvp(ours, (x,), (tx,))[1], torch.func.jvp(ref, (x,), (tx,))[1]) < 1e-12
    g_ours = torch.func.jvp(torch.func.grad(lambda x: ours(x).pow(2).sum()), (x,), (tx,))[1]
    g_ref = torch.func.jvp(torch.func.grad(lambda x: ref(x).pow(2).sum()), (x,), (tx,))[1]
    assert max_err(g_ours, g_ref) < 1e-10


def test_bad_inputs_raise_as_f_conv2d():
    x, w, b, r = _inputs(2, 4, (8, 8), 6, 3, dtype=torch.float32, residual=True)
    cases = [
        (lambda: fops.conv2d_bias_relu(x[0, 0], w, b), RuntimeError, r"Expected 3D \(unbatched\) or 4D \(batched\)"),
        (lambda: fops.conv2d_bias_relu(x, w[0], b), RuntimeError, "Expected 4-dimensional weight"),
        (lambda: fops.conv2d_bias_relu(x[:, :3], w, b), RuntimeError,
         r"Given groups=1, weight of size \[6, 4, 3, 3\], expected input\[2, 3, 8, 8\] to have 4 channels, but got 3"),
        (lambda: fops.conv2d_bias_relu(x, w, b[:5]), RuntimeError,
         "expected bias to be 1-dimensional with 6 elements, but got bias of size"),
        (lambda: fops.conv2d_bias_relu(x, w, b, 0), RuntimeError, "non-positive stride is not supported"),
        (lambda: fops.conv2d_bias_relu(x, w, b, 1, -1), RuntimeError, "negative padding is not supported"),
        (lambda: fops.conv2d_bias_relu(x, w, b, 1, 0, 0), RuntimeError, "dilation should be greater than zero"),
        (lambda: fops.conv2d_bias_relu(x[..., :2, :2], w, b), RuntimeError,
         "Kernel size can't be greater than actual input size"),
        (lambda: fops.conv2d_bias_relu(x, w, b, (1, 1, 1)), RuntimeError,
         "expected stride to be a single integer value or a list of 2 values"),
        (lambda: fops.conv2d_bias_relu(x.int(), w.int(), None), RuntimeError, "floating-point"),
        (lambda: fops.conv2d_bias_relu(x, w.double(), None), RuntimeError, r"weight must have x's dtype \(float32\)"),
        (lambda: fops.conv2d_bias_relu(x, w, b.double()), RuntimeError, "bias must have x's dtype"),
        (lambda: fops.conv2d_bias_relu(x, w, b, 1, 0, 1, r[:1]), RuntimeError,
         r"residual must have the output's shape \[2, 6, 6, 6\] \(no broadcasting\)"),
        (lambda: fops.conv2d_bias_relu([1.0], w, b), TypeError, None),
        (lambda: fops.conv2d_bias_relu(x, w, b, 1, 0.5), TypeError, None),
        (lambda: fops.conv2d_bias_relu(x.to_sparse(), w, b), NotImplementedError, "strided"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()
    # what F.conv2d refuses, F.conv2d refuses with the same type
    for call in (lambda: F.conv2d(x[:, :3], w, b), lambda: F.conv2d(x, w, b[:5]), lambda: F.conv2d(x, w, b, 0),
                 lambda: F.conv2d(x[..., :2, :2], w, b)):
        with pytest.raises(RuntimeError):
            call()


@pytest.mark.parametrize("native", ["native", "without"])
def test_residual_of_another_dtype_promotes_as_the_unfused_add(native):
    if native == "native" and not _native.has_op("conv2d_bias_relu"):
        pytest.skip("needs the native conv ops")
    op = fops.conv2d_bias_relu if native == "native" else _without_native
    x, w, b, r = _inputs(2, 4, (6, 6), 4, 3, dtype=torch.float32, residual=True)
    out = op(x, w, b, 1, 0, 1, r.double())
    assert out.dtype == torch.float64
    assert max_err(out, F.relu(F.conv2d(x, w, b) + r.double())) < 1e-6


def test_without_native_module_ops_run_the_reference(monkeypatch):
    monkeypatch.setattr(_native, "has_op", lambda name: False)
    fallback = _native.public_op("conv2d_bias_relu", _without_native, "the PyTorch reference")
    x, w, b, r = _inputs(2, 3, (7, 6), 4, 3, residual=True, stride=2, padding=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU tensors: no warning
        out = fallback(x, w, b, 2, 1, 1, r)
    assert max_err(out, plain(x, w, b, 2, 1, 1, r)) == 0.0
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        fallback(x, w, b, 2, 1, 1, r[:, :1])


@pytest.fixture(params=["native", "without"])
def public_op(request, monkeypatch):
    """ops.conv2d_bias_relu through the native op, or through the reference that runs without it."""
    if request.param == "native" and not _native.has_op("conv2d_bias_relu"):
        pytest.skip("needs the native conv ops")
    if request.param == "without":
        monkeypatch.setattr(conv_module, "_conv2d_bias_relu", _without_native)
    return fops.conv2d_bias_relu


@pytest.mark.parametrize("kernel, dilation", [(3, 1), (4, 1), ((3, 4), 1), (4, 2), ((2, 5), (3, 1)), (1, 1)], ids=str)
def test_padding_same_and_valid_as_f_conv2d(public_op, kernel, dilation):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, kh, kw, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for padding in ("same", "valid"):
        want = F.relu(F.conv2d(x, w, b, 1, padding, dilation))
        r = torch.randn(want.shape, dtype=torch.float64, requires_grad=True)
        ours = _grads(lambda *t: public_op(t[0], t[1], t[2], 1, padding, dilation, t[3]), (x, w, b, r), want)
        plain_ = _grads(lambda *t: F.relu(F.conv2d(t[0], t[1], t[2], 1, padding, dilation) + t[3]), (x, w, b, r), want)
        assert all(o.shape == p.shape and max_err(o, p) < 1e-12 for o, p in zip(ours, plain_)), padding
        unbatched = public_op(x[0], w, b, (1, 1), padding, dilation)
        assert max_err(unbatched, F.relu(F.conv2d(x[0], w, b, 1, padding, dilation))) < 1e-12
    assert public_op(x, w, b, padding="same", dilation=dilation).shape[2:] == x.shape[2:]


def test_padding_strings_refused_as_f_conv2d(public_op):
    x, w, b, _ = _inputs(2, 3, (8, 8), 4, 3)
    for stride in (2, (1, 2)):
        with pytest.raises(RuntimeError):
            F.conv2d(x, w, b, stride, "same")
        with pytest.raises(RuntimeError, match="padding='same' is not supported for strided convolutions"):
            public_op(x, w, b, stride, "same")
    assert max_err(public_op(x, w, b, 2, "valid"), F.relu(F.conv2d(x, w, b, 2, "valid"))) < 1e-12
    with pytest.raises(RuntimeError):
        F.conv2d(x, w, b, 1, "full")
    with pytest.raises(RuntimeError, match="Invalid padding string: 'full'"):
        public_op(x, w, b, 1, "full")


# Calls the native op refuses; the reference without it refuses them with the same type and message.
def _bad_calls():
    x, w, b, r = _inputs(2, 4, (8, 8), 6, 3, dtype=torch.float32, residual=True)
    return {
        "x 2-D": (x[0, 0], w, b, 1, 0, 1, None),
        "x 5-D": (x[None], w, b, 1, 0, 1, None),
        "weight 3-D": (x, w[0], b, 1, 0, 1, None),
        "no output channels": (x, w[:0], None, 1, 0, 1, None),
        "channels": (x[:, :3], w, b, 1, 0, 1, None),
        "unbatched channels": (x[0, :3], w, b, 1, 0, 1, None),
        "int64 x": (x.long(), w.long(), None, 1, 0, 1, None),
        "int64 x, float weight": (x.long(), w, None, 1, 0, 1, None),
        "weight dtype": (x, w.double(), None, 1, 0, 1, None),
        "bias dtype": (x, w, b.double(), 1, 0, 1, None),
        "bias shape": (x, w, b[:5], 1, 0, 1, None),
        "stride 0": (x, w, b, (1, 0), 0, 1, None),
        "negative padding": (x, w, b, 1, (0, -1), 1, None),
        "dilation 0": (x, w, b, 1, 0, 0, None),
        "stride of 3": (x, w, b, (1, 1, 1), 0, 1, None),
        "kernel too large": (x[..., :2, :2], w, b, 1, 0, 1, None),
        "residual shape": (x, w, b, 1, 0, 1, r[:1]),
        "residual broadcast": (x, w, b, 1, 0, 1, r[0, :, :1, :1]),
        "unbatched residual": (x[0], w, b, 1, 0, 1, r[0, :, :5]),
        "sparse x": (x.to_sparse(), w, b, 1, 0, 1, None),
        "sparse weight": (x, w.to_sparse(), b, 1, 0, 1, None),
        "csr residual": (x, w, b, 1, 0, 1, r[0, 0].to_sparse_csr()),
        "x not a tensor": ([1.0], w, b, 1, 0, 1, None),
        "padding a string": (x, w, b, 1, "same", 1, None),
        "stride a float": (x, w, b, 1.5, 0, 1, None),
    }


@pytest.mark.parametrize("case", list(_bad_calls()), ids=str)
def test_without_native_raises_what_the_native_op_raises(case):
    args = _bad_calls()[case]
    with pytest.raises(Exception) as without:
        _without_native(*args)
    assert without.type in (RuntimeError, TypeError, NotImplementedError), repr(without.value)
    if not _native.has_op("conv2d_bias_relu"):
        pytest.skip("needs the native conv ops to compare with")
    with pytest.raises(Exception) as native:
        conv_module._conv2d_bias_relu(*args)
    assert without.type is native.type, (repr(without.value), repr(native.value))
    if native.type is not TypeError:  # the schema's TypeErrors have words of their own
        assert str(without.value) == str(native.value)


def test_output_layout_is_f_conv2d_s_on_cpu(public_op):
    x, w, b, r = (t.requires_grad_() for t in _inputs(2, 8, (6, 5), 8, 3, residual=True, padding=1))
    want = plain(x, w, b, 1, 1, 1, r)
    cl = [t.detach().to(memory_format=CL).requires_grad_() for t in (x, w, r)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU calls warn about nothing
        for xx, ww, rr, fmt in ((x, w, r, torch.contiguous_format), (cl[0], cl[1], cl[2], CL),
                                (x, cl[1], r, CL), (cl[0], w, r, CL),  # F.conv2d's: x's or weight's
                                (x.detach()[:, :, ::2], w, None, torch.contiguous_format),
                                (x.detach()[:, :, ::2], cl[1].detach(), None, CL)):
            out = public_op(xx, ww, b, 1, 1, 1, rr)
            assert out.is_contiguous(memory_format=fmt), fmt
            assert out.stride() == F.conv2d(xx, ww, b, 1, 1).stride()
            if rr is not None:
                assert max_err(out, want) < 1e-12
                grads = torch.autograd.grad(out, (xx, ww, b, rr), torch.ones_like(out))
                wants = torch.autograd.grad(want, (x, w, b, r), torch.ones_like(want), retain_graph=True)
                assert all(max_err(g, h) < 1e-12 for g, h in zip(grads, wants))
        # residual of another dtype and unbatched input: the same rule
        assert public_op(x, w, b, 1, 1, 1, r.float()).is_contiguous()
        assert public_op(cl[0], w, b, 1, 1, 1, r.float()).is_contiguous(memory_format=CL)
        assert public_op(x[0], w, b, 1, 1).is_contiguous()


def _opcheck(device, dtype):
    ops = torch.ops.fusedkernels
    x, w, b, r = (t.requires_grad_() for t in _inputs(2, 8, (9, 7), 16, 3, dtype, device, residual=True, padding=1))
    for args in ((x, w, b, [1, 1], [1, 1], [1, 1], r), (x, w, None, [2, 1], [1, 0], [1, 2], None),
                 (x.detach().to(memory_format=CL), w.detach(), b, [1, 1], [1, 1], [1, 1], r.detach())):
        torch.library.opcheck(ops.conv2d_bias_relu, args)
    xc, wc = x.detach().to(memory_format=CL).requires_grad_(), w.detach().to(memory_format=CL).requires_grad_()
    rc = r.detach().to(memory_format=CL).requires_grad_()
    torch.library.opcheck(ops.conv2d_bias_relu_fwd, (xc, wc, b, [1, 1], [1, 1], [1, 1], rc))
    torch.library.opcheck(ops.conv2d_bias_relu_fwd, (xc, wc, None, [2, 2], [0, 1], [1, 1], None))


def test_opcheck_cpu():
    if not _native.has_op("conv2d_bias_relu"):
        pytest.skip("needs the custom ops")
    _opcheck("cpu", torch.float32)


def test_torch_compile_fullgraph_matches_eager():
    x, w, b, r = _inputs(2, 4, (9, 8), 8, 3, dtype=torch.float32, residual=True, padding=1)

    def f(x, w, b, r):
        return fops.conv2d_bias_relu(x, w, b, 1, 1, 1, r).square().sum()

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
        loss = fn(*leaves)
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    eager, compiled = grads(f), grads(torch.compile(f, fullgraph=True))
    for a, c in zip(compiled, eager):
        assert max_err(a, c) <= 1e-5 * max(c.abs().max().item(), 1.0)
    dynamic = torch.compile(lambda x: fops.conv2d_bias_relu(x, w, b, 2, 1), fullgraph=True, dynamic=True)
    for n, hw in ((1, 9), (3, 11), (2, 14)):
        xn = torch.randn(n, 4, hw, hw)
        assert max_err(dynamic(xn), plain(xn, w, b, 2, 1)) < 1e-5


def test_cpu_autocast_casts_like_torch_conv2d():
    x, w, b, r = _inputs(2, 4, (8, 8), 8, 3, dtype=torch.float32, residual=True)
    r = r.bfloat16()  # a residual in the autocast dtype joins the op
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fops.conv2d_bias_relu(x, w, b, 1, 0, 1, r)
        torch_conv = F.conv2d(x, w, b)
        promoted = fops.conv2d_bias_relu(x, w, b, 1, 0, 1, r.float())
    assert ours.dtype == torch_conv.dtype == torch.bfloat16 and promoted.dtype == torch.float32
    want = conv2d_bias_relu_ref(x.bfloat16(), w.bfloat16(), b.bfloat16(), 1, 0, 1, r)
    assert max_err(ours, want) == 0.0


def test_fold_batch_norm_is_exact_in_float64():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True, dtype=torch.float64)
    bn = nn.BatchNorm2d(6, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    for conv_bias in (conv.bias, None):
        w, b = fops.fold_batch_norm(conv.weight, conv_bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                    bn.bias)
        want = bn(F.conv2d(x, conv.weight, conv_bias, padding=1))
        assert max_err(F.conv2d(x, w, b, padding=1), want) < 1e-12
        tw, tb = torch.nn.utils.fusion.fuse_conv_bn_weights(conv.weight, conv_bias, bn.running_mean, bn.running_var,
                                                            bn.eps, bn.weight, bn.bias)
        assert max_err(w, tw) < 1e-14 and max_err(b, tb) < 1e-14
    # affine=False: scale 1, shift 0; and the fold is differentiable (eval-mode fine-tuning of the conv)
    plain_bn = nn.BatchNorm2d(6, affine=False, dtype=torch.float64).eval()
    plain_bn.running_var.fill_(3.0)
    w, b = fops.fold_batch_norm(conv.weight, None, plain_bn.running_mean, plain_bn.running_var, plain_bn.eps)
    assert max_err(F.conv2d(x, w, b, padding=1), plain_bn(F.conv2d(x, conv.weight, None, padding=1))) < 1e-12
    assert w.requires_grad and b.dtype == torch.float64
    # 16-bit weights: folded in float32, returned in the weight's dtype
    w16, b16 = fops.fold_batch_norm(conv.weight.bfloat16(), None, bn.running_mean.float(), bn.running_var.float(),
                                    bn.eps, bn.weight.float(), bn.bias.float())
    assert w16.dtype == b16.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Modules (CPU)
# ------------------------------------------------------------------------------------------------


def test_fused_conv2d_relu_is_nn_conv2d_plus_relu():
    torch.manual_seed(3)
    ref = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    torch.manual_seed(3)
    fused = fnn.FusedConv2dReLU(4, 8, 3, stride=2, padding=1)
    assert isinstance(fused, nn.Conv2d)
    assert list(ref.state_dict()) == list(fused.state_dict())
    assert all(torch.equal(a, c) for a, c in zip(ref.state_dict().values(), fused.state_dict().values()))
    other = fnn.FusedConv2dReLU(4, 8, 3, stride=2, padding=1)
    other.load_state_dict(ref.state_dict())
    back = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    back.load_state_dict(other.state_dict())
    x = torch.randn(2, 4, 9, 10)
    res = torch.randn(2, 8, 5, 5)
    assert max_err(other(x), F.relu(ref(x))) < 1e-6 and max_err(back(x), ref(x)) == 0.0
    assert max_err(other(x, res), F.relu(ref(x) + res)) < 1e-6
    no_bias = fnn.FusedConv2dReLU(4, 8, 1, bias=False, dtype=torch.float64)
    assert no_bias.bias is None and no_bias.weight.dtype == torch.float64
    assert max_err(no_bias(x.double()), F.relu(F.conv2d(x.double(), no_bias.weight))) < 1e-12


@pytest.mark.parametrize("config", [
    dict(padding="same"), dict(padding="same", dilation=2), dict(kernel_size=4, padding="same"),
    dict(padding="valid"), dict(padding=1, padding_mode="reflect"), dict(padding=(1, 2), padding_mode="circular"),
    dict(padding=1, padding_mode="replicate"), dict(padding=1, groups=2), dict(padding=1, groups=4),
], ids=str)
def test_fused_conv2d_relu_every_nn_conv2d_configuration(config):
    args = dict(kernel_size=3, dtype=torch.float64) | config
    torch.manual_seed(1)
    ref = nn.Conv2d(4, 8, **args)
    torch.manual_seed(1)
    fused = fnn.FusedConv2dReLU(4, 8, **args)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    res = torch.randn_like(ref(x))
    dy = torch.randn_like(res)
    ours = _grads(lambda x, r: fused(x, r), (x, res), dy)
    want = _grads(lambda x, r: F.relu(ref(x) + r), (x, res), dy)
    for o, p in zip(ours, want):
        assert o.shape == p.shape and max_err(o, p) < 1e-12
    grads = torch.autograd.grad(fused(x).sum(), list(fused.parameters()))
    assert max_err(grads[0], torch.autograd.grad(F.relu(ref(x)).sum(), ref.weight)[0]) < 1e-12


def _bn_randomised(bn):
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if bn.affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn


def test_conv_bn_relu_loads_sequential_state_and_folds_in_eval():
    seq = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), _bn_randomised(nn.BatchNorm2d(8)), nn.ReLU())
    seq = seq.double().eval()
    block = fnn.FusedConvBNReLU(4, 8, 3, padding=1, dtype=torch.float64)
    block.load_state_dict(seq.state_dict())  # 0.* / 1.* keys
    assert sorted(block.state_dict()) == ["bn.bias", "bn.num_batches_tracked", "bn.running_mean", "bn.running_var",
                                          "bn.weight", "conv.weight"]
    block.eval()
    x, res = torch.randn(2, 4, 7, 9, dtype=torch.float64), torch.randn(2, 8, 7, 9, dtype=torch.float64)
    dy = torch.randn_like(res)
    ours = _grads(lambda x, r: block(x, r), (x, res), dy)
    want = _grads(lambda x, r: F.relu(seq[1](seq[0](x)) + r), (x, res), dy)
    for o, p in zip(ours, want):
        assert max_err(o, p) < 1e-12
    assert max_err(block(x), seq(x)) < 1e-12
    # parameter gradients through the fold, as through the unfused eval-mode block
    g_ours = torch.autograd.grad(block(x).sum(), [block.conv.weight, block.bn.weight, block.bn.bias])
    g_want = torch.autograd.grad(seq(x).sum(), [seq[0].weight, seq[1].weight, seq[1].bias])
    assert all(max_err(a, c) < 1e-10 for a, c in zip(g_ours, g_want))
    # and back into nn.Sequential after renaming, and into another block with its own keys
    back = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()).double().eval()
    back.load_state_dict({k.replace("conv.", "0.").replace("bn.", "1."): v for k, v in block.state_dict().items()})
    assert max_err(back(x), seq(x)) == 0.0
    again = fnn.FusedConvBNReLU(4, 8, 3, padding=1, dtype=torch.float64).eval()
    again.load_state_dict(block.state_dict())
    assert max_err(again(x), block(x)) == 0.0
    # a parameter or buffer changed in place is seen by the next call (the fold is never stale)
    with torch.no_grad():
        block.bn.running_mean.add_(0.5)
        seq[1].running_mean.add_(0.5)
    assert max_err(block(x), seq(x)) < 1e-12


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_conv_bn_relu_training_statistics_match_nn_batchnorm2d(momentum):
    torch.manual_seed(5)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True), nn.BatchNorm2d(8, momentum=momentum),
                        nn.ReLU()).double()
    block = fnn.FusedConvBNReLU(3, 8, 3, stride=2, padding=1, bias=True, momentum=momentum, dtype=torch.float64)
    block.load_state_dict(seq.state_dict())
    for step in range(4):
        x = torch.randn(4, 3, 11, 10, dtype=torch.float64) * (step + 1)
        dy = torch.randn(4, 8, 6, 5, dtype=torch.float64)
        seq.train(), block.train()
        ours = _grads(block, (x,), dy)
        want = _grads(seq, (x,), dy)
        assert all(max_err(o, p) < 1e-10 for o, p in zip(ours, want))
        for name, buf in block.bn.named_buffers():
            assert max_err(buf, getattr(seq[1], name)) < 1e-12, name
        seq.eval(), block.eval()  # eval between steps: the fold of the statistics so far
        assert max_err(block(x), seq(x)) < 1e-10
    assert int(block.bn.num_batches_tracked) == 4


def test_conv_bn_relu_without_running_statistics_uses_batch_statistics_in_eval():
    seq = nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6, track_running_stats=False), nn.ReLU()).double().eval()
    block = fnn.FusedConvBNReLU(4, 6, 1, bias=True, track_running_stats=False, dtype=torch.float64).eval()
    block.load_state_dict(seq.state_dict())
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    assert max_err(block(x), seq(x)) < 1e-12


def test_fused_conv2d_relu_output_of_contiguous_input_views():
    out = fnn.FusedConv2dReLU(3, 4, 3)(torch.randn(2, 3, 5, 5)).view(2, -1)
    assert out.shape == (2, 36)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_conv_bn_relu_checks_the_same_in_train_and_eval(mode):
    block = fnn.FusedConvBNReLU(3, 5, 3, padding=1).train(mode == "train")
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(RuntimeError, match=r"residual must have the output's shape \[2, 5, 6, 6\] \(no broadcasting\)"):
        block(x, torch.randn(5, 1, 1))
    bn = nn.BatchNorm2d(5).train(mode == "train")
    with pytest.raises(ValueError) as theirs:
        bn(torch.randn(5, 6, 6))
    with pytest.raises(ValueError) as ours:
        block(x[0])
    assert str(ours.value) == str(theirs.value) == "expected 4D input (got 3D input)"
    assert block(x, torch.randn(2, 5, 6, 6)).shape == (2, 5, 6, 6)


def test_conv_bn_relu_output_layout_is_the_same_in_train_and_eval():
    block = fnn.FusedConvBNReLU(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    for module_cl, x_cl in ((False, False), (True, True), (True, False), (False, True)):
        m = block.to(memory_format=CL if module_cl else torch.contiguous_format)
        xx = x.to(memory_format=CL) if x_cl else x
        fmt = CL if x_cl or module_cl else torch.contiguous_format  # F.conv2d's: x's or weight's
        for mode in (True, False):
            out = m.train(mode)(xx)
            assert out.is_contiguous(memory_format=fmt), (module_cl, x_cl, mode)
    assert block.train()(x).view(2, -1).shape == block.eval()(x).view(2, -1).shape == (2, 180)


def test_conv_bn_relu_from_modules_follows_their_mode():
    conv, bn = nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8)
    assert not fnn.FusedConvBNReLU.from_modules(conv.eval(), bn.eval()).training
    assert fnn.FusedConvBNReLU.from_modules(conv.train(), bn.train()).training
    block = fnn.FusedConvBNReLU.from_modules(conv.eval(), bn.train())  # bn's mode is the one that computes
    assert block.training and not conv.training


def test_conv_bn_relu_from_modules_shares_them():
    conv, bn = nn.Conv2d(4, 8, 3, bias=False), _bn_randomised(nn.BatchNorm2d(8))
    block = fnn.FusedConvBNReLU.from_modules(conv, bn)
    assert block.conv is conv and block.bn is bn and list(block.parameters()) == [conv.weight, bn.weight, bn.bias]
    block.eval()
    x = torch.randn(2, 4, 8, 8)
    assert max_err(block(x), F.relu(bn(conv(x)))) < 1e-5
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        fnn.FusedConvBNReLU.from_modules(fnn.FusedConv2dReLU(4, 8, 3), bn)
    with pytest.raises(TypeError, match="bn must be an nn.BatchNorm2d"):
        fnn.FusedConvBNReLU.from_modules(conv, nn.BatchNorm1d(8))
    with pytest.raises(ValueError, match="bn has 6 features but conv 8 output channels"):
        fnn.FusedConvBNReLU.from_modules(conv, nn.BatchNorm2d(6))


def test_modules_compile_fullgraph():
    block = fnn.FusedConvBNReLU(4, 8, 3, padding=1).eval()
    _bn_randomised(block.bn)
    conv = fnn.FusedConv2dReLU(8, 8, 1)
    x = torch.randn(2, 4, 6, 6)
    f = lambda x: conv(block(x), block(x))  # noqa: E731
    assert max_err(torch.compile(f, fullgraph=True)(x), f(x)) < 1e-5


@needs_native  # the scripted forward calls torch.ops.fusedkernels.conv2d_bias_relu
@pytest.mark.parametrize("config", [
    dict(padding=1), dict(kernel_size=4, padding="same"), dict(padding="same", dilation=2),
    dict(padding="valid", stride=2), dict(padding=(1, 2), padding_mode="reflect"), dict(padding=1, groups=2),
    dict(padding=1, bias=False),
], ids=str)
def test_torchscript_of_fused_conv2d_relu_gives_the_eager_output(config):
    """torch.jit.script compiles forward's TorchScript branch: the eager module's output, layout and gradients, with
    and without a residual, unbatched input too, in every padding and grouping nn.Conv2d has."""
    conv = fnn.FusedConv2dReLU(4, 8, **(dict(kernel_size=3) | config))
    scripted = torch.jit.script(conv)
    for x in (torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8).to(memory_format=CL), torch.randn(4, 9, 8)):
        out = conv(x)
        assert torch.equal(scripted(x), out) and scripted(x).stride() == out.stride()
        res, dy = torch.randn_like(out), torch.randn_like(out)
        ours = _grads(lambda x, r: scripted(x, r), (x, res), dy)
        want = _grads(lambda x, r: conv(x, r), (x, res), dy)
        assert all(torch.equal(o, w) for o, w in zip(ours, want))
        assert torch.equal(torch.autograd.grad(scripted(x).sum(), conv.weight)[0],
                           torch.autograd.grad(conv(x).sum(), conv.weight)[0])


@needs_native
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_torchscript_of_conv_bn_relu_gives_the_eager_output(momentum):
    """Eval: the fold and the op, as eager; training: conv, bn and relu as modules, with bn's state updated as the
    eager block updates it; the same checks in both modes."""
    block = fnn.FusedConvBNReLU(4, 8, 3, stride=2, padding=1, momentum=momentum)
    _bn_randomised(block.bn)
    scripted = torch.jit.script(copy.deepcopy(block))
    for training in (False, True, True, False):
        block.train(training), scripted.train(training)
        x = torch.randn(3, 4, 9, 10).to(memory_format=CL)
        res = torch.randn(3, 8, 5, 5)
        out, ours = block(x, res), scripted(x, res)
        assert max_err(ours, out) <= (1e-6 if training else 0.0) and ours.stride() == out.stride()
        for name, buf in block.bn.named_buffers():
            assert torch.equal(getattr(scripted.bn, name), buf), name
        with pytest.raises(torch.jit.Error, match="ValueError: expected 4D input"):
            scripted(x[0])
        # (the op raises its RuntimeError; what TorchScript code raises arrives as torch.jit.Error)
        with pytest.raises((RuntimeError, torch.jit.Error), match="residual must have the output's shape"):
            scripted(x, res[0])


# ------------------------------------------------------------------------------------------------
# CUDA: against the fp32 reference, tolerance from PyTorch's own low-precision error
# ------------------------------------------------------------------------------------------------

# (N, C_in, (H, W), C_out, kernel, stride, padding): ResNet-50's layer kinds at a small batch, odd sizes, channels
# not multiples of 8 (the reference), asymmetric kernels and paddings (Inception's 1x7 / 7x1), a strided 1x1
# (ResNet's downsample), a tile's worth of rows and channels not a multiple of 64; output channels for each tile
# width of the Hopper kernel (64: 8 / 16 / 48 / 64, 128: 72 / 128, 256: 136 / 512)
CUDA_CASES = [
    (2, 64, (56, 56), 64, 3, 1, 1),
    (2, 256, (14, 14), 64, 1, 1, 0),
    (2, 3, (224, 224), 64, 7, 2, 3),
    (3, 128, (15, 13), 128, 3, 2, 1),
    (1, 12, (9, 7), 20, 3, 1, 1),
    (2, 64, (17, 17), 72, (1, 7), 1, (0, 3)),
    (2, 40, (17, 19), 48, (7, 1), 1, (3, 0)),
    (2, 256, (28, 27), 512, 1, 2, 0),
    (1, 24, (11, 13), 16, (3, 5), (2, 1), (0, 2)),
    (5, 8, (33, 31), 8, 5, 3, 2),
    (2, 32, (10, 9), 136, 3, 1, 1),
    (2, 64, (13, 11), 256, 1, 1, 0),  # the expansion class our kernel takes by default
    (3, 16, (9, 7), 72, 1, 1, 0),
]


# FUSEDKERNELS_CONV_KERNEL: the default (by layer class), our implicit-GEMM kernel, cuDNN's fused convolution
KERNELS = [pytest.param(("FUSEDKERNELS_CONV_KERNEL", ""), id="default"),
           pytest.param(("FUSEDKERNELS_CONV_KERNEL", "sm90"), id="sm90"),
           pytest.param(("FUSEDKERNELS_CONV_KERNEL", "cudnn"), id="cudnn")]


def _cuda_inputs(case, dtype):
    n, c_in, hw, c_out, k, stride, padding = case
    x, w, b, r = _inputs(n, c_in, hw, c_out, k, dtype, "cuda", residual=True, stride=stride, padding=padding)
    return x.to(memory_format=CL), w.to(memory_format=CL), b, r.to(memory_format=CL), stride, padding


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_forward_and_grads_against_fp32_reference(case, residual, dtype, kernel, monkeypatch):
    monkeypatch.setenv(*kernel)
    x, w, b, r, stride, padding = _cuda_inputs(case, dtype)
    r = r if residual else None
    f32 = [t.float() if t is not None else None for t in (x, w, b, r)]
    dy = torch.randn(F.conv2d(x, w, None, stride, padding).shape, device="cuda", dtype=dtype)
    ref = conv2d_bias_relu_ref(*f32[:3], stride, padding, 1, f32[3])
    lowp = conv2d_bias_relu_ref(x, w, b, stride, padding, 1, r)
    poison_allocator(lowp, lowp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's one warning where no kernel takes the case: see below
        ours = _grads(lambda *t: fops.conv2d_bias_relu(t[0], t[1], t[2], stride, padding, 1, t[3]), (x, w, b, r), dy)
    assert ours[0].dtype == dtype and ours[0].is_contiguous(memory_format=CL)
    eps = torch.finfo(dtype).eps
    assert_close_to_ref(ours[0].float(), ref, lowp.float(), "out", floor=eps)
    # The gradients through our forward's ReLU mask: an output within rounding of zero falls on either side by each
    # implementation's own roundings, and one such flip moves dx by dy * w, far beyond the bound's rounding error.
    mask = ours[0] > 0

    def masked(x, w, b, r):
        z = F.conv2d(x, w, b, stride, padding)
        return (z + r if r is not None else z) * mask.to(z.dtype)

    ref_grads, lowp_grads = _grads(masked, f32, dy.float())[1:], _grads(masked, (x, w, b, r), dy)[1:]
    for name, o, p, q in zip(["dx", "dw", "db", "dr"], ours[1:], ref_grads, lowp_grads):
        assert_close_to_ref(o.float(), p, q.float(), name, floor=eps)


def _engine_that_ran(x, w, b, r, monkeypatch, choice="", cudnn=True):
    """Which path one conv2d_bias_relu call took with FUSEDKERNELS_CONV_KERNEL=choice and cuDNN enabled or not, by
    the CUDA kernels it ran: "ours" (the implicit GEMM), "reference" (PyTorch's elementwise add / relu after the
    convolution) or "cudnn" (neither: the fused call); and its output."""
    monkeypatch.setenv("FUSEDKERNELS_CONV_KERNEL", choice)
    with torch.backends.cudnn.flags(enabled=cudnn), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's one warning per reason
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = fops.conv2d_bias_relu(x, w, b, 1, 0, 1, r)
            torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not names:
        pytest.skip("the profiler records no CUDA kernels here")
    if any("linear_act_sm90_kernel" in n for n in names):
        return "ours", out
    return ("reference" if any("elementwise_kernel" in n for n in names) else "cudnn"), out


def _cudnn_fuses(x, w, b, r) -> bool:
    """Whether this cuDNN has an engine for the fused call (it needs runtime fusion)."""
    try:
        if r is None:
            torch.ops.aten.cudnn_convolution_relu(x, w, b, (1, 1), (0, 0), (1, 1), 1)
        else:
            torch.ops.aten.cudnn_convolution_add_relu(x, w, r, 1, b, (1, 1), (0, 0), (1, 1), 1)
    except RuntimeError:
        return False
    return torch.backends.cudnn.enabled


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_route_by_layer_class(residual, monkeypatch):
    """By default a 1x1 stride-1 expansion from at most 64 channels runs our implicit GEMM (where it measured faster
    than cuDNN's fused call) and other layers cuDNN's, each falling back on the other; FUSEDKERNELS_CONV_KERNEL=sm90
    or =cudnn runs that one alone, else the reference. Our kernel runs on sm_90 from a build with its code."""
    expansion = _cuda_inputs((2, 64, (13, 11), 256, 1, 1, 0), torch.bfloat16)[:4]
    reduction = _cuda_inputs((2, 256, (13, 11), 64, 1, 1, 0), torch.bfloat16)[:4]
    if not residual:
        expansion, reduction = expansion[:3] + (None,), reduction[:3] + (None,)
    ours = "ours" if hopper_kernels_run() else None
    cudnn = {"expansion": "cudnn" if _cudnn_fuses(*expansion) else None,
             "reduction": "cudnn" if _cudnn_fuses(*reduction) else None}
    cases = [  # (inputs, FUSEDKERNELS_CONV_KERNEL, cuDNN enabled, the paths in order of preference)
        (expansion, "", True, [ours, cudnn["expansion"]]),
        (expansion, "cudnn", True, [cudnn["expansion"]]),
        (reduction, "", True, [cudnn["reduction"], ours]),
        (reduction, "sm90", True, [ours]),
        (reduction, "", False, [ours]),
        (reduction, "cudnn", False, []),
    ]
    for inputs, choice, enabled, preference in cases:
        want = next((path for path in preference if path is not None), "reference")
        path, out = _engine_that_ran(*inputs, monkeypatch, choice, enabled)
        x, w, b, r = inputs
        assert path == want, (tuple(w.shape), choice, enabled, path, want)
        f32 = conv2d_bias_relu_ref(x.float(), w.float(), b.float(), 1, 0, 1, r.float() if r is not None else None)
        lowp = conv2d_bias_relu_ref(x, w, b, 1, 0, 1, r).float()
        assert_close_to_ref(out.float(), f32, lowp, "out", floor=torch.finfo(torch.bfloat16).eps)


@pytest.mark.cuda
@needs_native
def test_opcheck_cuda():
    _opcheck("cuda", torch.bfloat16)


@pytest.mark.cuda
@needs_native
def test_cuda_routing_warns_once_per_reason_and_runs_the_reference(monkeypatch):
    monkeypatch.setenv("FUSEDKERNELS_CONV_KERNEL", "sm90")  # (by default cuDNN takes the odd channels)
    x, w, b, r, _, _ = _cuda_inputs((2, 16, (9, 9), 24, 3, 1, 1), torch.bfloat16)
    odd = _cuda_inputs((2, 12, (9, 9), 20, 3, 1, 1), torch.bfloat16)[:4]
    cases = {
        "float32 inputs have no fused kernel": (x.float(), w.float(), b.float(), r.float()),
        "conv::conv2d_supported": odd,  # channels not multiples of 8: the kernel's 16-byte pixels
    }
    for reason, (x, w, b, r) in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = fops.conv2d_bias_relu(x, w, b, 1, 1, 1, r)
            c = fops.conv2d_bias_relu(x, w, b, 1, 1, 1, r)
        said = [str(m.message) for m in caught if "fusedkernels.conv2d_bias_relu" in str(m.message)]
        assert len(said) <= 1 and all(reason in s for s in said), (reason, said)
        assert a.dtype == x.dtype and torch.equal(a, c)
        assert torch.equal(a, conv2d_bias_relu_ref(x, w, b, 1, 1, 1, r)), reason  # the reference, exactly


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("dilation", [1, 2, (1, 3)], ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_kernel_takes_channels_last_calls_without_warning(dtype, dilation, kernel, monkeypatch):
    if kernel[1] == "sm90" and not hopper_kernels_run():
        pytest.skip("our kernel runs on sm_90 from a build with its code (else the reference, with a warning)")
    monkeypatch.setenv(*kernel)
    x, w, b, r = _inputs(2, 16, (13, 11), 24, 3, dtype, "cuda", residual=True, padding=2, dilation=dilation)
    x, w, r = (t.to(memory_format=CL) for t in (x, w, r))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fops.conv2d_bias_relu(x, w, b, 1, 2, dilation, r)
        again = fops.conv2d_bias_relu(x, w, b, 1, 2, dilation, r)
    assert torch.equal(out, again)  # deterministic
    want = conv2d_bias_relu_ref(*(t.float() for t in (x, w, b)), 1, 2, dilation, r.float())
    lowp = conv2d_bias_relu_ref(x, w, b, 1, 2, dilation, r)
    assert_close_to_ref(out.float(), want, lowp.float(), "out", floor=torch.finfo(dtype).eps)


@pytest.mark.cuda
@needs_native
def test_cuda_nchw_inputs_are_converted_with_one_warning_naming_the_cost():
    x, w, b, r, _, _ = _cuda_inputs((2, 16, (9, 9), 24, 3, 1, 1), torch.bfloat16)
    nchw = [t.contiguous() for t in (x, w, r)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fops.conv2d_bias_relu(nchw[0], nchw[1], b, 1, 1, 1, nchw[2])
        fops.conv2d_bias_relu(nchw[0], nchw[1], b, 1, 1, 1, nchw[2])
    said = [str(m.message) for m in caught if "not channels_last" in str(m.message)]
    assert len(said) <= 3 and all("a copy of" in s and "memory_format=torch.channels_last" in s for s in said)
    assert all("the output's back to NCHW" in s for s in said if ": x is not" in s)
    assert out.is_contiguous()  # NCHW in, NCHW out, as F.conv2d
    assert torch.equal(out, fops.conv2d_bias_relu(x, w, b, 1, 1, 1, r))


@pytest.mark.cuda
@needs_native
def test_cuda_output_layout_is_f_conv2d_s_and_padding_same():
    x, w, b, r, _, _ = _cuda_inputs((2, 16, (9, 8), 24, 4, 1, 1), torch.bfloat16)
    f32 = [t.float() for t in (x, w, b)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for xx in (x, x.contiguous()):
            for ww in (w, w.contiguous()):  # the layout F.conv2d picks: channels_last if x's or weight's is
                out = fops.conv2d_bias_relu(xx, ww, b, 1, "same")
                assert out.shape == x.shape[:1] + (24,) + x.shape[2:]
                assert out.stride() == F.conv2d(xx, ww, b, 1, "same").stride()
                want = F.relu(F.conv2d(*f32, 1, "same"))
                assert max_err(out, want) < 5e-2 * max(want.abs().max().item(), 1.0)
        block = fnn.FusedConvBNReLU(16, 24, 3, padding=1, device="cuda", dtype=torch.bfloat16)
        for xx, fmt in ((x, CL), (x.contiguous(), torch.contiguous_format)):
            assert block.train()(xx).is_contiguous(memory_format=fmt) and block.eval()(xx).is_contiguous(memory_format=fmt)


@pytest.mark.cuda
@needs_native
def test_cuda_graph_capture_and_replay():
    static = [t.requires_grad_() for t in _cuda_inputs((4, 32, (14, 14), 64, 3, 1, 1), torch.bfloat16)[:4]]
    dy = torch.randn(4, 64, 14, 14, device="cuda", dtype=torch.bfloat16).to(memory_format=CL)

    def step(x, w, b, r):
        out = fops.conv2d_bias_relu(x, w, b, 1, 1, 1, r)
        return [out, *torch.autograd.grad(out, (x, w, b, r), dy)]

    check_graph_replays(step, static, lambda: _cuda_inputs((4, 32, (14, 14), 64, 3, 1, 1), torch.bfloat16)[:4],
                        ["out", "dx", "dw", "db", "dr"])


@pytest.mark.cuda
@needs_native
def test_cuda_autocast_casts_like_torch_conv2d():
    x, w, b, r = _inputs(2, 16, (10, 10), 32, 3, torch.float32, "cuda", residual=True, padding=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = fops.conv2d_bias_relu(x.to(memory_format=CL), w, b, 1, 1, 1, r.bfloat16())
        torch_conv = F.conv2d(x, w, b, 1, 1)
    assert ours.dtype == torch_conv.dtype == torch.bfloat16
    assert max_err(ours, conv2d_bias_relu_ref(x, w, b, 1, 1, 1, r)) < 5e-2


@pytest.mark.cuda
@needs_native
def test_cuda_modules_bf16_channels_last():
    block = fnn.FusedConvBNReLU(64, 64, 3, padding=1, device="cuda", dtype=torch.bfloat16)
    _bn_randomised(block.bn)
    seq = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
    seq = seq.to("cuda", torch.bfloat16)
    seq.load_state_dict({k.replace("conv.", "0.").replace("bn.", "1."): v for k, v in block.state_dict().items()})
    block, seq = block.to(memory_format=CL).eval(), seq.to(memory_format=CL).eval()
    x = torch.randn(4, 64, 28, 28, device="cuda", dtype=torch.bfloat16).to(memory_format=CL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = block(x)
    want = seq.float()(x.float())
    assert max_err(ours, want) < 0.1 * max(want.abs().max().item(), 1.0)


@pytest.mark.parametrize("native", ["native", "without"])
def test_unbatched_input_takes_a_residual_of_the_unbatched_output_shape_only(native):
    op = fops.conv2d_bias_relu if native == "native" else _without_native
    x, w = torch.randn(3, 7, 7, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    r = torch.randn(4, 5, 5, dtype=torch.float64)
    assert max_err(op(x, w, residual=r), F.relu(F.conv2d(x, w) + r)) < 1e-12
    for bad in (r.unsqueeze(0), r[:, :1], r[0]):  # would broadcast: a batch dimension, a row, one channel
        with pytest.raises(RuntimeError, match=r"residual must have the output's shape \[4, 5, 5\] \(no broadcasting\)"):
            op(x, w, residual=bad)


@pytest.mark.parametrize("x_layout", [torch.contiguous_format, CL], ids=["x_nchw", "x_nhwc"])
@pytest.mark.parametrize("w_layout", [torch.contiguous_format, CL], ids=["w_nchw", "w_nhwc"])
@pytest.mark.parametrize("k", [3, 1])
def test_output_layout_follows_x_and_weight_as_f_conv2d(x_layout, w_layout, k):
    """F.conv2d returns channels_last when x or weight has channels_last strides: so does the op, FusedConv2dReLU
    and FusedConvBNReLU (train and eval) in a model converted to channels_last."""
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=x_layout)
    conv = nn.Conv2d(3, 4, k).to(memory_format=w_layout)
    want = F.relu(conv(x))
    fused = fnn.FusedConv2dReLU(3, 4, k).to(memory_format=w_layout)
    fused.load_state_dict(conv.state_dict())
    for out in (fops.conv2d_bias_relu(x, conv.weight, conv.bias), _without_native(x, conv.weight, conv.bias), fused(x)):
        assert out.stride() == want.stride(), (out.stride(), want.stride())
        assert max_err(out, want) < 1e-5
    block = fnn.FusedConvBNReLU(3, 4, k).to(memory_format=w_layout)
    seq = nn.Sequential(nn.Conv2d(3, 4, k, bias=False), nn.BatchNorm2d(4), nn.ReLU()).to(memory_format=w_layout)
    block.load_state_dict(seq.state_dict())
    for mode in (True, False):
        block.train(mode), seq.train(mode)
        out, want = block(x), seq(x)
        assert out.stride() == want.stride(), (mode, out.stride(), want.stride())
        assert max_err(out, want) < 1e-4
