"""fusedkernels.ops.batch_norm_relu (BatchNorm + residual + ReLU) and FusedConvBNReLU's training mode built on it.

CPU tests hold the op (the internal op's CPU kernel and the C++ autograd, or the reference) to F.batch_norm in
float64: outputs, running statistics, gradients to second order, errors in F.batch_norm's words, opcheck, compile,
and the module against nn.Conv2d + nn.BatchNorm2d + nn.ReLU. `cuda` tests hold the kernels to a float64 reference
with the tolerance relative to PyTorch's own error on the same low-precision inputs: odd channel counts (scalar
accesses), a large batch (many row blocks), a mean far from zero against the spread (x = 100 + randn: a naive
E[x²] - E[x]² in float32 loses every digit), eval and training, residual and affine variants.
"""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedkernels.nn as fnn
import fusedkernels.ops as fops
from fusedkernels import _native
from fusedkernels.ops.conv import _batch_norm_relu_without_native, batch_norm_relu_ref

from .helpers import assert_close_to_ref, check_graph_replays, max_err, poison_allocator

needs_native = pytest.mark.skipif(not _native.has_op("batch_norm_relu"), reason="needs the native conv ops")
CL = torch.channels_last


def _case(n, c, h, w, dtype=torch.float64, device="cpu", offset=0.0, affine=True, residual=False, layout=CL):
    """(x, running_mean, running_var, weight, bias, residual): fresh random values, running statistics not (0, 1)."""
    x = (offset + torch.randn(n, c, h, w, device=device) * 2).to(dtype).contiguous(memory_format=layout)
    rm = torch.randn(c, device=device) * 0.1
    rv = torch.rand(c, device=device) + 0.5
    wt = torch.randn(c, device=device) if affine else None
    b = torch.randn(c, device=device) if affine else None
    r = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(memory_format=layout) if residual else None
    f64 = dtype == torch.float64
    cast = (lambda t: t.double()) if f64 else (lambda t: t)
    return x, cast(rm), cast(rv), None if wt is None else cast(wt), None if b is None else cast(b), r


def _run(fn, x, rm, rv, w, b, r, training, dy, momentum=0.1, eps=1e-5):
    """(out, running_mean, running_var, grads of x, w, b, r that exist) of fn on copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    xl, wl, bl, rl = leaves
    rm, rv = (t.clone() if t is not None else None for t in (rm, rv))
    out = fn(xl, rm, rv, wl, bl, training, momentum, eps, rl)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dy)
    return [out.detach(), *(t for t in (rm, rv) if t is not None), *grads]


def _names(rm, w, r):
    return ["out"] + ["running_mean", "running_var"] * (rm is not None) + ["dx"] + ["dweight", "dbias"] * (
        w is not None) + ["dresidual"] * (r is not None)


# ------------------------------------------------------------------------------------------------
# CPU: semantics
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 17, 3, 3), (1, 64, 4, 5)])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_matches_f_batch_norm_in_float64(training, residual, affine, shape, layout):
    x, rm, rv, w, b, r = _case(*shape, offset=3.0, affine=affine, residual=residual, layout=layout)
    dy = torch.randn(shape, dtype=torch.float64)
    ours = _run(fops.batch_norm_relu, x, rm, rv, w, b, r, training, dy)
    want = _run(batch_norm_relu_ref, x, rm, rv, w, b, r, training, dy)
    assert ours[0].is_contiguous(memory_format=layout if layout == CL else torch.contiguous_format)
    assert len(ours) == len(want) == len(_names(rm, w, r))
    for name, o, p in zip(_names(rm, w, r), ours, want):
        assert o.dtype == p.dtype and o.shape == p.shape, name
        assert max_err(o, p) < 1e-10 * max(p.abs().max().item(), 1.0), name


def test_training_without_running_statistics_and_momentum_zero():
    x, rm, rv, w, b, r = _case(2, 5, 4, 3, residual=True)
    dy = torch.randn(x.shape, dtype=torch.float64)
    for args in ((None, None), (rm, rv)):
        ours = _run(fops.batch_norm_relu, x, *args, w, b, r, True, dy, momentum=0.0)
        want = _run(batch_norm_relu_ref, x, *args, w, b, r, True, dy, momentum=0.0)
        assert all(max_err(o, p) < 1e-10 for o, p in zip(ours, want))


@pytest.mark.parametrize("dims", [2, 3, 5])
def test_other_ranks_run_the_reference(dims):
    shape = {2: (6, 4), 3: (3, 4, 5), 5: (2, 4, 3, 2, 3)}[dims]
    x = torch.randn(shape, dtype=torch.float64) + 1
    r = torch.randn(shape, dtype=torch.float64)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    ours = fops.batch_norm_relu(x, rm, rv, w, b, True, 0.3, 1e-4, r)
    want = batch_norm_relu_ref(x, rm2, rv2, w, b, True, 0.3, 1e-4, r)
    assert max_err(ours, want) < 1e-12 and max_err(rm, rm2) < 1e-12 and max_err(rv, rv2) < 1e-12


def test_residual_of_another_dtype_promotes_as_unfused():
    x, rm, rv, w, b, _ = _case(2, 4, 3, 3, dtype=torch.float32)
    r = torch.randn(x.shape, dtype=torch.float64)
    out = fops.batch_norm_relu(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, r)
    want = batch_norm_relu_ref(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, r)
    assert out.dtype == torch.float64 and max_err(out, want) < 1e-6


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck(training):
    x, rm, rv, w, b, r = _case(2, 3, 3, 2, offset=0.5, residual=True)
    leaves = [t.requires_grad_() for t in (x, w, b, r)]

    def f(x, w, b, r):  # fresh running statistics each call: the function stays the same
        return fops.batch_norm_relu(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, r)

    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


@pytest.mark.parametrize("native", ["native", "without"])
def test_running_statistics_and_their_versions_as_f_batch_norm(native):
    """Updated in place with the unbiased variance; their version counters left alone, as F.batch_norm leaves them
    (a graph that saved them still backpropagates; statistics made under inference_mode update outside it)."""
    op = fops.batch_norm_relu if native == "native" else _batch_norm_relu_without_native
    x, rm, rv, w, b, _ = _case(4, 6, 5, 5, offset=10.0)
    rm_start, rv_start, version = rm.clone(), rv.clone(), rv._version
    scale = torch.ones(6, dtype=torch.float64, requires_grad=True)
    saved = (scale * rv).sum()  # saves rv for its backward
    op(x, rm, rv, w, b, True, 0.25, 1e-5)
    assert rv._version == version
    saved.backward()
    xs = x.transpose(0, 1).reshape(6, -1)
    assert max_err(rm, 0.75 * rm_start + 0.25 * xs.mean(1)) < 1e-12
    assert max_err(rv, 0.75 * rv_start + 0.25 * xs.var(1, unbiased=True)) < 1e-12  # the unbiased variance
    with torch.inference_mode():
        rm_i, rv_i = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    op(x, rm_i, rv_i, w, b, True)
    assert max_err(rm_i, 0.1 * xs.mean(1)) < 1e-12


@pytest.mark.parametrize("native", ["native", "without"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eps_and_running_statistics_that_require_grad_raise_as_f_batch_norm(native, training):
    op = fops.batch_norm_relu if native == "native" else _batch_norm_relu_without_native
    x, rm, rv, w, b, _ = _case(2, 3, 4, 4, dtype=torch.float32)
    for eps in (-1e-3, 0.0, 1e-12):  # what the installed torch's F.batch_norm refuses (its rule changed in 2.12)
        try:
            F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, eps)
        except ValueError as theirs:
            with pytest.raises(ValueError, match=f"^{re.escape(str(theirs))}$"):
                op(x, rm.clone(), rv.clone(), w, b, training, 0.1, eps)
        else:
            op(x, rm.clone(), rv.clone(), w, b, training, 0.1, eps)
    for name in ("running_mean", "running_var"):
        stats = dict(running_mean=rm.clone(), running_var=rv.clone())
        stats[name].requires_grad_()
        with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument '{name}'"):
            op(x, **stats, weight=w, bias=b, training=training)
        assert torch.equal(stats["running_mean"].detach(), rm) and torch.equal(stats["running_var"].detach(), rv)


def test_torch_func_transforms_run_what_f_batch_norm_runs():
    """vmap (training without statistics, eval with them), per-sample gradients and the hessian: the transforms
    take the reference, whose F.batch_norm they know."""
    from torch.func import grad, hessian, vmap

    xb = torch.randn(5, 2, 3, 4, 4, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64) * 0.1, torch.rand(3, dtype=torch.float64) + 0.5
    for training, stats in ((True, (None, None)), (False, (rm, rv))):
        ours = vmap(lambda x: fops.batch_norm_relu(x, *stats, training=training))(xb)
        want = vmap(lambda x: batch_norm_relu_ref(x, *stats, training=training))(xb)
        assert max_err(ours, want) < 1e-12
    per_sample = vmap(grad(lambda x: fops.batch_norm_relu(x, None, None, training=True).pow(2).sum()))(xb)
    want = vmap(grad(lambda x: batch_norm_relu_ref(x, None, None, training=True).pow(2).sum()))(xb)
    assert max_err(per_sample, want) < 1e-12
    h = hessian(lambda x: fops.batch_norm_relu(x, None, None, training=True).pow(2).sum())(xb[0, :, :, :2, :2])
    want = hessian(lambda x: batch_norm_relu_ref(x, None, None, training=True).pow(2).sum())(xb[0, :, :, :2, :2])
    assert max_err(h, want) < 1e-10


def test_errors_in_f_batch_norm_words():
    x, rm, rv, w, b, r = _case(1, 3, 1, 1, dtype=torch.float32, residual=True)
    with pytest.raises(ValueError) as theirs:
        F.batch_norm(x, rm, rv, w, b, True)
    with pytest.raises(ValueError) as ours:
        fops.batch_norm_relu(x, rm, rv, w, b, True)
    assert str(ours.value) == str(theirs.value)
    assert "Expected more than 1 value per channel when training" in str(ours.value)
    fops.batch_norm_relu(x, rm, rv, w, b, False)  # one value per channel is fine in eval
    x, rm, rv, w, b, r = _case(2, 3, 4, 4, dtype=torch.float32, residual=True)
    for bad in ("running_mean", "running_var", "weight", "bias"):
        args = dict(running_mean=rm, running_var=rv, weight=w, bias=b)
        args[bad] = torch.ones(4)
        with pytest.raises(RuntimeError) as theirs:
            F.batch_norm(x, **args, training=True)
        with pytest.raises(RuntimeError) as ours:
            fops.batch_norm_relu(x, **args, training=True)
        assert str(theirs.value) in str(ours.value) and "should contain 3 elements not 4" in str(ours.value)
    with pytest.raises(RuntimeError, match=r"residual must have input's shape \[2, 3, 4, 4\] \(no broadcasting\)"):
        fops.batch_norm_relu(x, rm, rv, w, b, True, residual=torch.randn(3, 1, 1))
    with pytest.raises(RuntimeError) as theirs:
        F.batch_norm(x, None, None, w, b, False)
    with pytest.raises(RuntimeError) as ours:
        fops.batch_norm_relu(x, None, None, w, b, False)
    assert str(ours.value) == str(theirs.value)


def test_without_native_matches_the_op():
    x, rm, rv, w, b, r = _case(2, 5, 3, 4, residual=True)
    rm2, rv2 = rm.clone(), rv.clone()
    a = _batch_norm_relu_without_native(x, rm, rv, w, b, True, 0.1, 1e-5, r)
    o = fops.batch_norm_relu(x, rm2, rv2, w, b, True, 0.1, 1e-5, r)
    assert a.is_contiguous(memory_format=CL) and o.is_contiguous(memory_format=CL)
    assert max_err(a, o) < 1e-12 and max_err(rm, rm2) < 1e-12 and max_err(rv, rv2) < 1e-12
    with pytest.raises(RuntimeError, match="residual must have input's shape"):
        _batch_norm_relu_without_native(x, rm, rv, w, b, True, 0.1, 1e-5, r[:1])


@needs_native
def test_opcheck_cpu():
    ops = torch.ops.fusedkernels
    x, rm, rv, w, b, r = _case(2, 5, 3, 4, dtype=torch.float32, offset=1.0, residual=True)
    for training in (True, False):
        for args in ((x, rm, rv, w, b, training, 0.1, 1e-5, r), (x, rm, rv, None, None, training, 0.2, 1e-3, None)):
            grads = [t.requires_grad_() if isinstance(t, torch.Tensor) and t.dim() == 4 else t
                     for t in args]
            torch.library.opcheck(ops.batch_norm_relu, tuple(grads))
        torch.library.opcheck(ops.batch_norm_relu_fwd, (x.detach(), rm, rv, w, b, training, 0.1, 1e-5, r.detach()))
    torch.library.opcheck(ops.batch_norm_relu, (x.detach(), None, None, w, b, True, 0.1, 1e-5, None))


def test_torch_compile_fullgraph_matches_eager():
    x, rm, rv, w, b, r = _case(2, 6, 5, 4, dtype=torch.float32, offset=2.0, residual=True)

    def f(x, w, b, r, rm, rv):
        return fops.batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5, r).square().sum()

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
        stats = [rm.clone(), rv.clone()]
        loss = fn(*leaves, *stats)
        return [loss.detach(), *torch.autograd.grad(loss, leaves), *stats]

    eager, compiled = run(f), run(torch.compile(f, fullgraph=True))
    for a, c in zip(compiled, eager):
        assert max_err(a, c) <= 1e-5 * max(c.abs().max().item(), 1.0)


# ------------------------------------------------------------------------------------------------
# CPU: FusedConvBNReLU's training mode
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bn_args", [dict(), dict(momentum=None), dict(affine=False),
                                     dict(track_running_stats=False), dict(momentum=None, affine=False)],
                         ids=["default", "cumulative", "noaffine", "nostats", "cumulative-noaffine"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_conv_bn_relu_training_steps_match_torch_modules(bn_args, residual):
    torch.manual_seed(3)
    conv, bn = nn.Conv2d(3, 7, 3, padding=1, bias=False).double(), nn.BatchNorm2d(7, **bn_args).double()
    block = fnn.FusedConvBNReLU(3, 7, 3, padding=1, dtype=torch.float64, **bn_args)
    block.load_state_dict({**{"conv." + k: v for k, v in conv.state_dict().items()},
                           **{"bn." + k: v for k, v in bn.state_dict().items()}})
    for step in range(3):
        x = (torch.randn(3, 3, 6, 5, dtype=torch.float64) + step).to(memory_format=CL)
        h = torch.randn(3, 7, 6, 5, dtype=torch.float64) if residual else None
        dy = torch.randn(3, 7, 6, 5, dtype=torch.float64)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = block(xo, h)
        z = bn(conv(xt))
        want = F.relu(z if h is None else z + h)
        assert ours.is_contiguous(memory_format=CL)
        assert max_err(ours, want) < 1e-10
        ours.backward(dy), want.backward(dy)
        assert max_err(xo.grad, xt.grad) < 1e-10
        for (name, p), q in zip(block.named_parameters(), [*conv.parameters(), *bn.parameters()]):
            assert max_err(p.grad, q.grad) < 1e-10, name
        for name, buf in block.bn.named_buffers():
            assert max_err(buf, getattr(bn, name)) < 1e-12, name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_relu_calls_the_modules_where_a_subclass_or_hooks_watch_them(training):
    """A BatchNorm2d subclass's own forward runs in both modes; hooks on conv or bn (or on every module) fire as in
    nn.Sequential, and spectral_norm's pre-hook gives eval the current weight."""

    class BatchStatsBN(nn.BatchNorm2d):  # batch statistics in eval too (test-time adaptation)
        def forward(self, x):
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=False).double(), BatchStatsBN(4).double()
    block, seq = fnn.FusedConvBNReLU.from_modules(conv, bn), nn.Sequential(conv, bn, nn.ReLU())
    block.train(training), seq.train(training)
    assert max_err(block(x), seq(x)) < 1e-12

    block = fnn.FusedConvBNReLU(3, 4, 3, padding=1, dtype=torch.float64).train(training)
    seq = nn.Sequential(block.conv, block.bn, nn.ReLU())
    calls = []
    handles = [block.conv.register_forward_pre_hook(lambda m, i: calls.append("conv_pre")),
               block.conv.register_forward_hook(lambda m, i, o: calls.append("conv")),
               block.bn.register_forward_hook(lambda m, i, o: calls.append("bn"))]
    seq(x)
    want, calls[:] = list(calls), []
    block(x)
    assert calls == want == ["conv_pre", "conv", "bn"]
    for h in handles:
        h.remove()
    with nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__)):
        calls.clear()
        block(x)
    assert calls[:2] == ["Conv2d", "BatchNorm2d"]

    if training:
        return  # spectral_norm's power iteration advances on every training call: two calls differ by design
    torch.manual_seed(0)
    conv = nn.utils.spectral_norm(nn.Conv2d(3, 4, 3, padding=1, bias=False).double())
    bn = nn.BatchNorm2d(4).double()
    block, seq = fnn.FusedConvBNReLU.from_modules(conv, bn), nn.Sequential(conv, bn, nn.ReLU())
    block(x).sum().backward()
    torch.optim.SGD(block.parameters(), lr=0.1).step()  # weight_orig moves; spectral_norm's pre-hook recomputes
    block.eval(), seq.eval()
    assert max_err(block(x), seq(x)) < 1e-12


@pytest.mark.parametrize("eps", [-1e-3, 0.0])
def test_conv_bn_relu_refuses_the_eps_f_batch_norm_refuses_in_eval(eps):
    block = fnn.FusedConvBNReLU(3, 4, 3, padding=1, eps=eps).eval()
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, eps=eps), nn.ReLU()).eval()
    x = torch.randn(2, 3, 5, 5)
    try:
        seq(x)
    except ValueError as theirs:
        with pytest.raises(ValueError, match=f"^{re.escape(str(theirs))}$"):
            block(x)
    else:
        assert torch.isfinite(block(x)).all()


def test_conv_bn_relu_training_compiles_fullgraph():
    block = fnn.FusedConvBNReLU(4, 8, 3, padding=1)
    twin = fnn.FusedConvBNReLU(4, 8, 3, padding=1)
    twin.load_state_dict(block.state_dict())
    step = torch.compile(lambda x, h: block(x, h), fullgraph=True)
    for _ in range(2):
        x, h = torch.randn(2, 4, 6, 6), torch.randn(2, 8, 6, 6)
        assert max_err(step(x, h), twin(x, h)) < 1e-5
        for name, buf in block.bn.named_buffers():
            assert max_err(buf, getattr(twin.bn, name)) < 1e-6, name


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------

CUDA_SHAPES = [(2, 3, 5, 7), (3, 17, 9, 11), (4, 64, 7, 7), (2, 136, 5, 9), (64, 64, 56, 56)]


def _cuda_check(shape, dtype, training, residual, affine, offset=100.0, params_dtype=torch.float32):
    x, rm, rv, w, b, r = _case(*shape, dtype=dtype, device="cuda", offset=offset, affine=affine, residual=residual)
    rm, rv, w, b = (t.to(params_dtype) if t is not None else None for t in (rm, rv, w, b))
    dy = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=CL)
    up = lambda t: t.double() if t is not None else None  # noqa: E731
    ref = _run(batch_norm_relu_ref, *(up(t) for t in (x, rm, rv, w, b, r)), training, dy.double())
    theirs = _run(batch_norm_relu_ref, x, rm, rv, w, b, r, training, dy)
    poison_allocator(x, x, x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernel runs: no fallback warning
        ours = _run(fops.batch_norm_relu, x, rm, rv, w, b, r, training, dy)
    assert ours[0].is_contiguous(memory_format=CL) and ours[0].dtype == dtype
    for name, o, p, t in zip(_names(rm, w, r), ours, ref, theirs):
        assert o.dtype == t.dtype, name
        # the reductions in float32 over up to 200k rows: their rounding, not torch's, is the floor
        assert_close_to_ref(o, p, t, name, floor=1e-5)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_kernels_against_float64(dtype, shape, training):
    _cuda_check(shape, dtype, training, residual=True, affine=True)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("offset", [0.0, 100.0], ids=["centred", "offset"])
def test_cuda_variants(residual, affine, offset):
    for shape in ((5, 24, 3, 3), (3, 17, 9, 11)):
        _cuda_check(shape, torch.bfloat16, True, residual, affine, offset)


@pytest.mark.cuda
@needs_native
def test_cuda_parameters_in_input_dtype_and_no_running_statistics():
    _cuda_check((4, 32, 6, 6), torch.bfloat16, True, True, True, params_dtype=torch.bfloat16)
    x, _, _, w, b, r = _case(4, 32, 6, 6, dtype=torch.float16, device="cuda", offset=5.0, residual=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fops.batch_norm_relu(x, None, None, w, b, True, 0.1, 1e-5, r)
    want = batch_norm_relu_ref(x.double(), None, None, w.double(), b.double(), True, 0.1, 1e-5, r.double())
    assert_close_to_ref(out, want, batch_norm_relu_ref(x, None, None, w, b, True, 0.1, 1e-5, r), floor=1e-5)


@pytest.mark.cuda
@needs_native
def test_cuda_gradient_of_a_sum_and_only_some_gradients():
    x, rm, rv, w, b, r = _case(2, 24, 5, 5, dtype=torch.bfloat16, device="cuda", residual=True)
    xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
    fops.batch_norm_relu(xl, rm, rv, w, b, True, 0.1, 1e-5, rl).sum().backward()  # an expanded upstream gradient
    xr, rr = x.double().requires_grad_(), r.double().requires_grad_()
    batch_norm_relu_ref(xr, rm.double().clone(), rv.double().clone(), w.double(), b.double(), True, 0.1, 1e-5,
                        rr).sum().backward()
    assert max_err(xl.grad, xr.grad) < 5e-2 * max(xr.grad.abs().max().item(), 1e-3)
    assert max_err(rl.grad, rr.grad) == 0  # the mask times one
    rl2 = r.clone().requires_grad_()  # only the residual's gradient: no statistics pass
    (g,) = torch.autograd.grad(fops.batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5, rl2).sum(), rl2)
    assert torch.equal(g, rl.grad)


@pytest.mark.cuda
@needs_native
def test_cuda_routing_warns_once_per_reason_and_runs_the_reference(monkeypatch):
    monkeypatch.setattr(_native, "_warned", set())
    x, rm, rv, w, b, r = _case(2, 8, 4, 4, dtype=torch.bfloat16, device="cuda", residual=True,
                               layout=torch.contiguous_format)
    for args, reason in (((x, rm, rv, w, b, True, 0.1, 1e-5, r), "not channels_last"),
                         ((x.double(), rm.double(), rv.double(), w.double(), b.double(), True, 0.1, 1e-5, None),
                          "float64"),
                         ((x[:, :, 0].contiguous(), rm, rv, w, b, True, 0.1, 1e-5, None), "not 4-D")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fops.batch_norm_relu(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
            fops.batch_norm_relu(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
        assert len([c for c in caught if reason in str(c.message)]) == 1, reason
        want = batch_norm_relu_ref(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
        assert max_err(out, want) < 1e-2 * max(want.abs().max().item(), 1.0)


@pytest.mark.cuda
@needs_native
def test_cuda_graph_capture_and_replay():
    def inputs():
        x, _, _, w, b, r = _case(4, 24, 6, 5, dtype=torch.bfloat16, device="cuda", offset=3.0, residual=True)
        return [x, w, b, r]

    static = [t.requires_grad_() for t in inputs()]
    rm, rv = torch.zeros(24, device="cuda"), torch.ones(24, device="cuda")
    dy = torch.randn(4, 24, 6, 5, device="cuda").bfloat16().contiguous(memory_format=CL)

    def step(x, w, b, r):  # training: the output does not depend on the running statistics it updates
        out = fops.batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5, r)
        return [out, *torch.autograd.grad(out, (x, w, b, r), dy)]

    check_graph_replays(step, static, inputs, ["out", "dx", "dweight", "dbias", "dresidual"])


@pytest.mark.cuda
@needs_native
def test_opcheck_cuda():
    ops = torch.ops.fusedkernels
    x, rm, rv, w, b, r = _case(2, 16, 5, 3, dtype=torch.bfloat16, device="cuda", offset=1.0, residual=True)
    for training in (True, False):
        torch.library.opcheck(ops.batch_norm_relu, (x.clone().requires_grad_(), rm, rv, w.requires_grad_(), b,
                                                    training, 0.1, 1e-5, r.clone().requires_grad_()))
        torch.library.opcheck(ops.batch_norm_relu_fwd, (x, rm, rv, w.detach(), b, training, 0.1, 1e-5, r))


@pytest.mark.cuda
@needs_native
def test_cuda_conv_bn_relu_training_step_matches_torch_modules():
    torch.manual_seed(4)
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False).cuda().to(memory_format=CL)
    bn = nn.BatchNorm2d(32).cuda()
    block = fnn.FusedConvBNReLU.from_modules(conv, bn)
    conv_ref, bn_ref = nn.Conv2d(16, 32, 3, padding=1, bias=False).cuda(), nn.BatchNorm2d(32).cuda()
    conv_ref.load_state_dict(conv.state_dict()), bn_ref.load_state_dict(bn.state_dict())
    for _ in range(3):
        x = torch.randn(8, 16, 12, 12, device="cuda").to(memory_format=CL)
        h = torch.randn(8, 32, 12, 12, device="cuda").to(memory_format=CL)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = block(x, h)
            z = bn_ref(conv_ref(x))
            want = F.relu(z + h)
        assert out.dtype == want.dtype
        assert max_err(out, want) < 5e-2 * max(want.abs().max().item(), 1.0)
        for name, buf in bn.named_buffers():
            assert max_err(buf, getattr(bn_ref, name)) < 1e-3 * max(buf.abs().max().item(), 1.0), name



@pytest.mark.parametrize("native", ["native", "without"])
def test_running_statistics_that_require_grad_are_fine_without_grad_mode(native):
    """As F.batch_norm: the refusal is about building a graph, so no_grad and inference_mode run."""
    op = fops.batch_norm_relu if native == "native" else _batch_norm_relu_without_native
    x, rm, rv, w, b, _ = _case(2, 3, 4, 4, dtype=torch.float32)
    for training in (True, False):
        rm_t, rv_t = nn.Parameter(rm.clone()), nn.Parameter(rv.clone())
        rm_w, rv_w = rm.clone(), rv.clone()
        with torch.no_grad():
            out = op(x, rm_t, rv_t, w, b, training, 0.1, 1e-5)
            want = F.relu(F.batch_norm(x, rm_w, rv_w, w, b, training, 0.1, 1e-5))
        assert max_err(out, want) < 1e-5
        assert max_err(rm_t.detach(), rm_w) < 1e-6 and max_err(rv_t.detach(), rv_w) < 1e-6


@pytest.mark.parametrize("native", ["native", "without"])
def test_eps_nan_and_the_order_of_checks_follow_f_batch_norm(native):
    """F.batch_norm checks the batch size before eps, and lets a NaN eps through (NaN out)."""
    op = fops.batch_norm_relu if native == "native" else _batch_norm_relu_without_native
    x, rm, rv, w, b, _ = _case(2, 3, 4, 4, dtype=torch.float32)
    for training in (True, False):
        out = op(x, rm.clone(), rv.clone(), w, b, training, 0.1, float("nan"))
        want = F.relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, float("nan")))
        assert out.isnan().all() == want.isnan().all()
    one = x[:1, :, :1, :1]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        F.batch_norm(one, rm.clone(), rv.clone(), w, b, True, 0.1, 0.0)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        op(one, rm.clone(), rv.clone(), w, b, True, 0.1, 0.0)
