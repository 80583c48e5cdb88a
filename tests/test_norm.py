"""fusedkernels.ops.layer_norm / rms_norm and the FusedLayerNorm / FusedRMSNorm modules."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedkernels.nn as fnn
import fusedkernels.ops as fops
from fusedkernels import _native

from .helpers import DEVICES, DTYPES, assert_close_to_ref, max_err, poison_allocator

needs_native = pytest.mark.skipif(not _native.loaded, reason=f"native module not loaded: {_native.error}")

# (rows, hidden): size 1, odd sizes (general path), 16-byte multiples (register path), rows that fill every thread's
# vectors (full-row instances: 256, 384, 768, 1024, 1536, 4096; a partial last block at 29 and 13 rows), the widest row.
SHAPES = [(1, 1), (5, 7), (3, 1000), (37, 768), (64, 1024), (17, 4096), (9, 4097), (2, 65536), (300, 64), (29, 256),
          (13, 384), (7, 1536)]


def _inputs(rows, hidden, dtype, device, affine, bias=True, param_dtype=None):
    x = (torch.randn(rows, hidden, device=device) * 2 + 0.5).to(dtype)
    pd = param_dtype or dtype
    w = (torch.rand(hidden, device=device) + 0.5).to(pd) if affine else None
    b = (torch.randn(hidden, device=device) * 0.1).to(pd) if affine and bias else None
    return x, w, b


def _torch_norm(kind, x, shape, w, b, eps):
    if kind == "layer_norm":
        return F.layer_norm(x, shape, w, b, eps)
    return F.rms_norm(x, shape, w, eps)


def _ours(kind, x, shape, w, b, eps):
    if kind == "layer_norm":
        return fops.layer_norm(x, shape, w, b, eps)
    return fops.rms_norm(x, shape, w, eps)


def _grads(kind, fn, x, w, b, dy, eps):
    """Output and grads of x, weight, bias (those given) through fn (ours or torch's)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    xl, rest = leaves[0], leaves[1:]
    wl = rest.pop(0) if w is not None else None
    bl = rest.pop(0) if (b is not None and kind == "layer_norm") else None
    y = fn(kind, xl, (x.shape[-1],), wl, bl, eps)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in (xl, wl, bl) if t is not None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_forward_and_grads_match_reference(device, dtype, rows, hidden, kind, affine):
    x, w, b = _inputs(rows, hidden, dtype, device, affine)
    if kind == "rms_norm":
        b = None
    dy = torch.randn_like(x)
    eps = 1e-5
    ref = _grads(kind, _torch_norm, x.double(), *(t.double() if t is not None else None for t in (w, b)), dy.double(), eps)
    lowp = _grads(kind, _torch_norm, x, w, b, dy, eps)
    poison_allocator(x, x, x)
    ours = _grads(kind, _ours, x, w, b, dy, eps)
    for name, o, r, t in zip(["y", "dx", "dweight", "dbias"], ours, ref, lowp):
        assert o.dtype == t.dtype, f"{name}: dtype {o.dtype}, torch gives {t.dtype}"
        # Parameter grads sum over rows: allow for the fp32 accumulation order over many rows too.
        assert_close_to_ref(o, r, t, name, floor=1e-5 if name.startswith("dw") or name == "dbias" else 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [256, 1000, 333])
def test_float32_params_with_low_precision_input(device, dtype, hidden):
    x, w, b = _inputs(29, hidden, dtype, device, True, param_dtype=torch.float32)
    dy = torch.randn_like(x)
    ours = _grads("layer_norm", _ours, x, w, b, dy, 1e-5)
    ref = _grads("layer_norm", _torch_norm, x.double(), w.double(), b.double(), dy.double(), 1e-5)
    # torch's own kernels want one dtype: its error on an all-`dtype` copy is the yardstick.
    lowp = _grads("layer_norm", _torch_norm, x, w.to(dtype), b.to(dtype), dy, 1e-5)
    assert ours[0].dtype == dtype and ours[2].dtype == torch.float32
    for name, o, r, t in zip(["y", "dx", "dweight", "dbias"], ours, ref, lowp):
        assert_close_to_ref(o.float(), r.float(), t.float(), name, floor=1e-5)


@pytest.mark.cuda
@needs_native
def test_statistics_saved_for_backward():
    """The kernel's saved statistics are float32-accurate (on the CPU, PyTorch's kernel keeps bf16 ones)."""
    x, w, b = _inputs(41, 520, torch.bfloat16, "cuda", True)
    y, mean, rstd = torch.ops.fusedkernels.layer_norm_fwd(x, [520], w, b, 1e-5)
    xd = x.double()
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (41,)
    assert max_err(mean, xd.mean(-1)) < 1e-5
    assert max_err(rstd, torch.rsqrt(xd.var(-1, unbiased=False) + 1e-5)) < 1e-4 * rstd.abs().max().item()
    _, rstd_rms = torch.ops.fusedkernels.rms_norm_fwd(x, [520], w, 1e-5)
    assert max_err(rstd_rms, torch.rsqrt((xd * xd).mean(-1) + 1e-5)) < 1e-4 * rstd_rms.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_multi_dim_normalized_shape(device):
    x = torch.randn(6, 40, 3, 8, device=device).transpose(0, 1)  # strided input
    w = torch.rand(3, 8, device=device) + 0.5
    b = torch.randn(3, 8, device=device)
    ours = fops.layer_norm(x, (3, 8), w, b)
    ref = F.layer_norm(x.double(), (3, 8), w.double(), b.double())
    assert ours.shape == x.shape
    assert max_err(ours, ref) < 1e-5
    ours_rms = fops.rms_norm(x, [8], w[0])
    assert max_err(ours_rms, F.rms_norm(x.double(), [8], w[0].double())) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_empty_rows(device, kind):
    x = torch.randn(0, 4, 64, device=device, requires_grad=True)
    w = torch.rand(64, device=device, requires_grad=True)
    y = _ours(kind, x, (64,), w, None, 1e-5)
    assert y.shape == (0, 4, 64)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("hidden", [1024, 4097, 12288])
def test_parameter_grads_are_deterministic(hidden):
    x, w, b = _inputs(3000, hidden, torch.bfloat16, "cuda", True)
    dy = torch.randn_like(x)
    first = _grads("layer_norm", _ours, x, w, b, dy, 1e-5)
    for _ in range(3):
        again = _grads("layer_norm", _ours, x, w, b, dy, 1e-5)
        for a, c in zip(first, again):
            assert torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(device, dtype):
    if not _native.loaded:
        pytest.skip("needs the custom op")
    x, w, b = _inputs(13, 96, dtype, device, True)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    ops = torch.ops.fusedkernels
    for args in [(x, [96], w, b, 1e-5), (x, [96], None, None, 1e-5), (x, [96], None, b, 1e-6)]:
        torch.library.opcheck(ops.layer_norm_fwd, args)
        torch.library.opcheck(ops.layer_norm, args)
    for args in [(x, [96], w, 1e-5), (x, [96], None, 1e-5)]:
        torch.library.opcheck(ops.rms_norm_fwd, args)
    torch.library.opcheck(ops.rms_norm, (x, [96], w, None))
    xd, dy = x.detach(), torch.randn_like(x)
    _, mean, rstd = ops.layer_norm_fwd(xd, [96], w.detach(), b.detach(), 1e-5)
    torch.library.opcheck(ops.layer_norm_bwd, (dy, xd, [96], w.detach(), b.detach(), mean, rstd, [True, True, True]))
    torch.library.opcheck(ops.layer_norm_bwd, (dy, xd, [96], w.detach(), b.detach(), mean, rstd, [True, False, True]))
    torch.library.opcheck(ops.rms_norm_bwd, (dy, xd, [96], None, rstd, [True, False]))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), fnn.FusedLayerNorm(128), torch.nn.GELU(), fnn.FusedRMSNorm(128))
    model = model.to(device)
    x = torch.randn(4, 33, 64, device=device, requires_grad=True)
    eager = model(x)
    eager.sum().backward()
    eager_grad = x.grad.clone()
    x.grad = None
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    # Compiled Linear / GELU may fuse and round differently from eager: compare at fp32 relative precision.
    assert max_err(out, eager) <= 1e-5 * eager.abs().max().item()
    assert max_err(x.grad, eager_grad) <= 1e-5 * eager_grad.abs().max().item()


@pytest.mark.cuda
@needs_native
def test_cuda_graph_capture_and_replay():
    ln = fnn.FusedLayerNorm(1024, device="cuda", dtype=torch.bfloat16)
    rms = fnn.FusedRMSNorm(1024, device="cuda", dtype=torch.bfloat16)
    static_x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture, as torch.cuda.graphs recommends
        for _ in range(2):
            rms(ln(static_x)).float().square().sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    static_x.grad = None
    ln.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = rms(ln(static_x))
        static_y.float().square().sum().backward()
    for _ in range(2):
        new_x = torch.randn_like(static_x)
        static_x.data.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        xe = new_x.detach().clone().requires_grad_()
        ye = rms(ln(xe))
        ye.float().square().sum().backward()
        assert torch.equal(static_y, ye)
        assert torch.equal(static_x.grad, xe.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    """What F.layer_norm refuses with a RuntimeError raises one here too (handlers written for torch keep
    working), with a message naming the argument; arguments of the wrong type raise TypeError."""
    x = torch.randn(4, 16, device=device)
    with pytest.raises(RuntimeError, match="input must be a floating-point tensor"):
        fops.layer_norm(x.to(torch.int32), (16,))
    with pytest.raises(RuntimeError, match="input must be a floating-point tensor"):
        fops.rms_norm(x.to(torch.int64), (16,))
    with pytest.raises(RuntimeError, match="trailing dimensions"):
        fops.layer_norm(x, (8,))
    for fn in (fops.layer_norm, fops.rms_norm, F.layer_norm, F.rms_norm):  # torch raises for () too
        with pytest.raises(RuntimeError, match="normalized_shape"):
            fn(x, ())
    assert fops.layer_norm(x[:, :0], (0,)).shape == (4, 0)  # a normalized size of 0: an empty result, as torch
    with pytest.raises(RuntimeError, match="weight must have shape"):
        fops.layer_norm(x, (16,), torch.ones(8, device=device))
    for call in (lambda: F.layer_norm(x, (8,)), lambda: F.layer_norm(x.to(torch.int32), (16,))):
        with pytest.raises(RuntimeError):  # torch's type, for the same inputs
            call()
    with pytest.raises(TypeError, match="must be a Tensor"):
        fops.layer_norm([1.0, 2.0], (2,))
    for bad in ("1e-5", [1e-5]):  # wrong argument types: TypeError, as torch's bindings
        with pytest.raises(TypeError, match="eps"):
            fops.layer_norm(x, (16,), None, None, bad)
    with pytest.raises(TypeError, match="normalized_shape"):
        fops.layer_norm(x, (16.0,))
    # what torch's bindings take: numpy / tensor ints and floats, bools as numbers
    import numpy as np
    want = F.layer_norm(x, (16,), None, None, 1e-3)
    for shape, eps in (((np.int64(16),), np.float32(1e-3)), ((torch.tensor(16),), torch.tensor(1e-3)), ((16,), 1e-3)):
        assert max_err(fops.layer_norm(x, shape, None, None, eps), want) < 1e-6
    assert max_err(fops.rms_norm(x, [16], None, True), F.rms_norm(x, [16], None, True)) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_what_torch_accepts_runs_and_what_it_refuses_raises(device, kind):
    """Parameter dtypes the kernels do not take (fp32 input with a bf16 weight, weight and bias of different
    dtypes), and an empty normalized_shape: PyTorch's op runs them, so the result, or the error, is its."""
    x = torch.randn(4, 16, device=device)
    cases = [
        (x, (16,), torch.rand(16, device=device, dtype=torch.bfloat16), None),
        (x, (16,), None, torch.ones(16, device=device, dtype=torch.float16)),
        (x.half(), (16,), torch.rand(16, device=device), torch.ones(16, device=device).half()),
        (torch.randn(4, 0, device=device), (0,), None, None),
    ]
    for inp, shape, w, b in cases:
        if kind == "rms_norm" and b is not None:
            continue
        try:
            want = _torch_norm(kind, inp, shape, w, b, 1e-5)
        except RuntimeError as e:
            with warnings.catch_warnings(), pytest.raises(type(e)):
                warnings.simplefilter("ignore")
                _ours(kind, inp, shape, w, b, 1e-5)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _ours(kind, inp, shape, w, b, 1e-5)
        assert got.dtype == want.dtype and got.shape == want.shape and max_err(got, want) == 0.0


@pytest.mark.cuda
@needs_native
def test_mixed_devices_and_raw_op_checks():
    x = torch.randn(4, 16, device="cuda")
    with pytest.raises(RuntimeError, match="weight is on cpu but input is on cuda"):
        fops.layer_norm(x, (16,), torch.ones(16))
    with pytest.raises(ValueError, match="x must be contiguous"):
        torch.ops.fusedkernels.layer_norm_fwd(x.t(), [4], None, None, 1e-5)
    with pytest.raises(ValueError, match="must be in"):
        torch.ops.fusedkernels.rms_norm_fwd(torch.randn(2, 70000, device="cuda"), [70000], None, 1e-5)
    with pytest.raises(ValueError, match="rstd must be float32 with one value per row"):
        torch.ops.fusedkernels.rms_norm_bwd(x, x, [16], None, torch.ones(3, device="cuda"), [True, False])


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_inputs_without_a_kernel_run_torch_with_one_warning(kind):
    """Rows past the kernel's limit, and float64 (no kernel), run PyTorch's op: same result, one warning."""
    for x in (torch.randn(3, 70001, device="cuda"), torch.randn(5, 33, device="cuda", dtype=torch.float64)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y1 = _ours(kind, x, (x.shape[-1],), None, None, 1e-5)
            y2 = _ours(kind, x, (x.shape[-1],), None, None, 1e-5)
        assert len([w for w in caught if "instead" in str(w.message)]) <= 1
        assert y1.dtype == x.dtype
        assert max_err(y1, _torch_norm(kind, x.double(), (x.shape[-1],), None, None, 1e-5)) < 1e-5
        assert torch.equal(y1, y2)


def test_without_native_module_ops_run_torch(monkeypatch):
    monkeypatch.setattr(_native, "has_op", lambda name: False)
    monkeypatch.setattr(_native, "_warned", set())
    layer_norm = _native.public_op("layer_norm", F.layer_norm, "torch.nn.functional.layer_norm")
    x = torch.randn(7, 33, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU tensors take PyTorch's CPU op without a warning
        y = layer_norm(x, (33,), None, None, 1e-5)
    y.sum().backward()
    assert max_err(y, F.layer_norm(x.double(), (33,))) < 1e-5
    assert x.grad is not None


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------

MODULE_CASES = [
    (torch.nn.LayerNorm, fnn.FusedLayerNorm, dict(normalized_shape=96)),
    (torch.nn.LayerNorm, fnn.FusedLayerNorm, dict(normalized_shape=(4, 24), bias=False)),
    (torch.nn.LayerNorm, fnn.FusedLayerNorm, dict(normalized_shape=96, elementwise_affine=False, eps=1e-3)),
    (torch.nn.RMSNorm, fnn.FusedRMSNorm, dict(normalized_shape=96)),
    (torch.nn.RMSNorm, fnn.FusedRMSNorm, dict(normalized_shape=[4, 24], eps=1e-4)),
    (torch.nn.RMSNorm, fnn.FusedRMSNorm, dict(normalized_shape=96, elementwise_affine=False)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("torch_cls,ours_cls,kwargs", MODULE_CASES)
def test_module_is_drop_in(device, torch_cls, ours_cls, kwargs):
    theirs = torch_cls(**kwargs, device=device)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    ours = ours_cls(**kwargs, device=device)
    ours.load_state_dict(theirs.state_dict())  # theirs -> ours
    theirs_again = torch_cls(**kwargs, device=device)
    theirs_again.load_state_dict(ours.state_dict())  # ours -> theirs
    for a, b in zip(theirs.state_dict().values(), theirs_again.state_dict().values()):
        assert torch.equal(a, b)
    assert isinstance(ours, torch_cls)

    x = torch.randn(5, 7, 96, device=device).reshape(5, 7, *ours.normalized_shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = theirs(xa), ours(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert max_err(ya, yb) < 1e-5
    assert max_err(xa.grad, xb.grad) < 1e-4
    for pa, pb in zip(theirs.parameters(), ours.parameters()):
        assert max_err(pa.grad, pb.grad) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_existing_modules_switch_class_in_place(device):
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.RMSNorm(64)).to(device)
    x = torch.randn(3, 32, device=device)
    expected = model(x)
    for m in model.modules():  # the recipe in the README
        if type(m) is torch.nn.LayerNorm:
            m.__class__ = fnn.FusedLayerNorm
        elif type(m) is torch.nn.RMSNorm:
            m.__class__ = fnn.FusedRMSNorm
    assert isinstance(model[1], fnn.FusedLayerNorm) and isinstance(model[2], fnn.FusedRMSNorm)
    assert max_err(model(x), expected) < 1e-5


# ------------------------------------------------------------------------------------------------
# Drop-in fidelity: PyTorch's own behaviour on the same inputs is the right value
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_default_eps_is_float32_epsilon(device, dtype):
    """eps=None: the machine epsilon of float32 (the arithmetic's type) for every input dtype, as torch. Small
    inputs make the difference show: with bf16's epsilon the output was ~1.8 off on values of ~3.4."""
    x = (0.05 * torch.randn(8, 256, device=device)).to(dtype)
    w = (torch.rand(256, device=device) + 0.5).to(dtype)
    dy = torch.randn_like(x)
    results = []
    for cls in (fnn.FusedRMSNorm, torch.nn.RMSNorm):
        m = cls(256, device=device, dtype=dtype)  # eps=None
        with torch.no_grad():
            m.weight.copy_(w)
        xl = x.clone().requires_grad_()
        y = m(xl)
        y.backward(dy)
        results.append([y.detach(), xl.grad, m.weight.grad])
    eps = torch.finfo(torch.float32).eps
    ref = _grads("rms_norm", _torch_norm, x.double(), w.double(), None, dy.double(), eps)
    for name, o, r, t in zip(["y", "dx", "dweight"], results[0], ref, results[1]):
        assert o.dtype == t.dtype, name
        assert_close_to_ref(o, r, t, name, floor=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1024, 999])  # register path, general path
def test_rows_whose_mean_dwarfs_their_spread(device, dtype, hidden):
    """Statistics of rows with |mean| >> std: x - mean keeps the low bits a plain sum / H drops, which
    rstd (here ~1e2..1e4) would magnify; torch is exact on these, so must we be."""
    offset, spread = {torch.float32: (1000.0, 0.01), torch.float16: (100.0, 0.5), torch.bfloat16: (64.0, 2.0)}[dtype]
    x = (offset + spread * torch.randn(37, hidden, device=device)).to(dtype)
    w, b = _inputs(1, hidden, dtype, device, True)[1:]
    dy = torch.randn_like(x)
    ours = _grads("layer_norm", _ours, x, w, b, dy, 1e-5)
    lowp = _grads("layer_norm", _torch_norm, x, w, b, dy, 1e-5)
    ref = _grads("layer_norm", _torch_norm, x.double(), w.double(), b.double(), dy.double(), 1e-5)
    for name, o, r, t in zip(["y", "dx", "dweight", "dbias"], ours, ref, lowp):
        assert_close_to_ref(o, r, t, name, floor=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_second_derivatives_match_torch(device, kind):
    """create_graph=True through the fused op (gradient penalties, Hessian-vector products): the backward is
    then computed with differentiable ops, so second derivatives are exact, not silently missing."""
    x, w, b = _inputs(6, 40, torch.float32, device, True)
    if kind == "rms_norm":
        b = None

    def second(fn, x, w, b):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
        y = fn(kind, leaves[0], (40,), leaves[1], leaves[2] if b is not None else None, 1e-5)
        first = torch.autograd.grad(y.square().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in first), leaves)

    got = second(_ours, x, w, b)
    want = second(_torch_norm, x.double(), w.double(), b.double() if b is not None else None)
    lowp = second(_torch_norm, x, w, b)
    for name, o, r, t in zip(["d2x", "d2w", "d2b"], got, want, lowp):
        assert_close_to_ref(o, r, t, name, floor=1e-5)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_gradcheck_and_gradgradcheck_float64(kind):
    """float64 CPU inputs go through the fused op's autograd (PyTorch's CPU kernels underneath)."""
    x, w, b = _inputs(3, 10, torch.float64, "cpu", True)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    fn = (lambda x, w, b: fops.layer_norm(x, (10,), w, b)) if kind == "layer_norm" else (
        lambda x, w, b: fops.rms_norm(x, (10,), w, 1e-5) + b)
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_differentiating_the_raw_backward_op_raises(device):
    if not _native.loaded:
        pytest.skip("needs the custom op")
    x = torch.randn(4, 8, device=device, requires_grad=True)
    _, mean, rstd = torch.ops.fusedkernels.layer_norm_fwd(x.detach(), [8], None, None, 1e-5)
    dx = torch.ops.fusedkernels.layer_norm_bwd(torch.ones_like(x), x, [8], None, None, mean, rstd,
                                               [True, False, False])[0]
    with pytest.raises(RuntimeError, match="not implemented|does not require grad|derivative"):
        dx.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_forward_mode_ad_matches_torch(device, kind):
    import torch.autograd.forward_ad as fwAD

    x, w, b = _inputs(5, 24, torch.float32, device, True)
    if kind == "rms_norm":
        b = None
    tangent = torch.randn_like(x)
    outs = []
    for fn in (_ours, _torch_norm):
        with fwAD.dual_level():
            y = fn(kind, fwAD.make_dual(x, tangent), (24,), w, b, 1e-5)
            outs.append(fwAD.unpack_dual(y).tangent)
    assert outs[0] is not None and max_err(outs[0], outs[1]) < 1e-5


AUTOCAST_CASES = [(torch.nn.LayerNorm, fnn.FusedLayerNorm), (torch.nn.RMSNorm, fnn.FusedRMSNorm)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("torch_cls,ours_cls", AUTOCAST_CASES)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_modules_under_autocast_behave_as_torch(device, torch_cls, ours_cls, input_dtype):
    """CUDA autocast runs layer_norm / rms_norm in float32 (they are on its float32 list) and returns float32;
    CPU autocast leaves them alone. Outputs, their dtype and the grads' dtypes and values as torch's."""
    theirs = torch_cls(64, device=device)
    ours = ours_cls(64, device=device)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 64, device=device).to(input_dtype)
    results = []
    for m in (theirs, ours):
        xl = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            y = m(xl)
        y.float().square().sum().backward()
        results.append((y, xl.grad, m.weight.grad))
    (ya, dxa, dwa), (yb, dxb, dwb) = results
    assert yb.dtype == ya.dtype and dxb.dtype == dxa.dtype and dwb.dtype == dwa.dtype
    tol = 1e-5 if ya.dtype == torch.float32 else 2e-2
    assert max_err(yb, ya) <= tol * ya.abs().max().item()
    assert max_err(dxb, dxa) <= tol * max(dxa.abs().max().item(), 1.0)
    assert max_err(dwb, dwa) <= max(tol, 1e-4) * max(dwa.abs().max().item(), 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("torch_cls,ours_cls", AUTOCAST_CASES)
def test_modules_converted_to_float64(device, torch_cls, ours_cls):
    """model.double() works as with torch's modules (float64 has no fused kernel: PyTorch's op runs it)."""
    theirs = torch_cls(16, device=device).double()
    ours = ours_cls(16, device=device).double()
    x = torch.randn(3, 16, device=device, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert max_err(ours(x), theirs(x)) < 1e-12
        assert torch.autograd.gradcheck(ours, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_weight_and_inference_mode(device):
    x, w, b = _inputs(9, 128, torch.bfloat16, device, True)
    xl = x.clone().requires_grad_()
    y = fops.layer_norm(xl, (128,), w, b)  # weight and bias frozen: no dweight / dbias work
    y.float().sum().backward()
    want = x.clone().requires_grad_()
    F.layer_norm(want.double(), (128,), w.double(), b.double()).sum().backward()
    assert max_err(xl.grad, want.grad) <= 2e-2 * want.grad.abs().max().item()
    with torch.inference_mode():
        assert max_err(fops.layer_norm(x, (128,), w, b), y.detach()) == 0.0


def test_cpu_path_is_torchs_cpu_kernel():
    """On the CPU the op runs PyTorch's own CPU LayerNorm: the same bits, at PyTorch's speed."""
    x, w, b = _inputs(64, 1000, torch.float32, "cpu", True)
    assert torch.equal(fops.layer_norm(x, (1000,), w, b), F.layer_norm(x, (1000,), w, b))


@pytest.mark.cuda
@needs_native
def test_every_visible_gpu():
    """Launch facts (SM count, occupancy, the shared-memory opt-in of the fp32 backward) are per device."""
    for index in range(torch.cuda.device_count()):
        device = f"cuda:{index}"
        x, w, b = _inputs(300, 4096, torch.float32, device, True)  # the fp32 backward needs > 48 KiB of smem
        dy = torch.randn_like(x)
        ours = _grads("layer_norm", _ours, x, w, b, dy, 1e-5)
        ref = _grads("layer_norm", _torch_norm, x.double(), w.double(), b.double(), dy.double(), 1e-5)
        for o, r in zip(ours, ref):
            assert o.device == x.device and max_err(o, r) <= 1e-4 * max(r.abs().max().item(), 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_torch_func_hessian_and_jvp_of_grad(device, kind):
    """Forward-mode AD nested in torch.func transforms (hessian = jacfwd(jacrev), jvp of grad): the tangent
    reaches the op where the public op cannot see it, and must not be dropped."""
    x = torch.randn(3, 8, device=device, dtype=torch.float64)
    v = torch.randn_like(x)

    def f(fn):
        return lambda t: fn(kind, t, (8,), None, None, 1e-5).pow(3).sum()

    for fn in (_ours, _torch_norm):
        h = torch.func.hessian(f(fn))(x)
        hv = torch.func.jvp(torch.func.grad(f(fn)), (x,), (v,))[1]
        if fn is _ours:
            got_h, got_hv = h, hv
    assert max_err(got_h, h) < 1e-9 and max_err(got_hv, hv) < 1e-9


def test_torchscript_of_the_modules():
    """torch.jit.script of a model with the fused modules works, as with torch's."""
    model = torch.nn.Sequential(fnn.FusedLayerNorm(8), fnn.FusedRMSNorm(8))
    scripted = torch.jit.script(model)
    x = torch.randn(2, 8)
    assert max_err(scripted(x), model(x)) == 0.0
    for cast in ("input", "weight", "offset"):  # what fuse() swaps in for Hugging Face's norms
        norm = fnn.FusedCastRMSNorm(8, cast=cast)
        torch.nn.init.normal_(norm.weight)
        scripted = torch.jit.script(norm)
        for x in (torch.randn(2, 8), torch.randn(2, 8, dtype=torch.bfloat16)):  # the weight's dtype and another
            assert scripted(x).dtype == norm(x).dtype and max_err(scripted(x), norm(x)) == 0.0, cast


def test_fx_symbolic_trace_and_nested_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), fnn.FusedLayerNorm(8), fnn.FusedRMSNorm(8))
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 8)
    assert max_err(traced(x), model(x)) == 0.0
    nested = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(5, 8)], layout=torch.jagged)
    got = fops.layer_norm(nested, (8,))
    assert all(max_err(a, F.layer_norm(b, (8,))) < 1e-6 for a, b in zip(got.unbind(), nested.unbind()))


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_dynamic_normalized_size_under_compile_and_export(kind):
    """normalized_shape is SymInt[] (as aten's): a dynamic hidden size compiles once and exports."""
    from torch.export import Dim, export

    fn = (lambda x: fops.layer_norm(x, (x.shape[-1],))) if kind == "layer_norm" else (
        lambda x: fops.rms_norm(x, (x.shape[-1],), None, 1e-5))
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    for h in (8, 16, 24):
        x = torch.randn(3, h)
        assert max_err(compiled(x), fn(x)) < 1e-6

    class M(torch.nn.Module):
        def forward(self, x):
            return fn(x)

    program = export(M(), (torch.randn(3, 8),), dynamic_shapes={"x": {0: Dim("b"), 1: Dim("h")}})
    x = torch.randn(5, 12)
    assert max_err(program.module()(x), fn(x)) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_internal_ops_fake_strides(device):
    """The meta kernels give the layout the CPU / CUDA kernels give: contiguous outputs."""
    if not _native.loaded:
        pytest.skip("needs the custom op")
    x = torch.randn(5, 3, 8, device=device).transpose(0, 1)
    torch.library.opcheck(torch.ops.fusedkernels.layer_norm_fwd, (x.contiguous(), [8], None, None, 1e-5))
    if device == "cpu":
        torch.library.opcheck(torch.ops.fusedkernels.layer_norm_fwd, (x, [8], None, None, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_16bit_layer_norm_is_float32_inside(dtype):
    """On the CPU a 16-bit LayerNorm runs ATen's kernels on float32 copies: dweight / dbias summed in float32 (ATen's
    16-bit path sums dbias in 16 bits: a relative error near 1 over 262144 rows), dx and y rounded once."""
    rows, hidden = 262144, 16
    x = torch.randn(rows, hidden).to(dtype).requires_grad_()
    w = (torch.rand(hidden) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(hidden).to(dtype).requires_grad_()
    dy = ((torch.rand(rows, hidden) + 0.5) / 8).to(dtype)  # dbias ~ 32768: within float16's range
    y = fops.layer_norm(x, (hidden,), w, b)
    got = torch.autograd.grad(y, [x, w, b], dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = F.layer_norm(leaves[0], (hidden,), leaves[1], leaves[2])
    want = torch.autograd.grad(y64, leaves, dy.double())
    eps = torch.finfo(dtype).eps
    assert max_err(y, y64) <= eps * y64.abs().max()  # one rounding: half an ulp of the largest, within one
    assert max_err(got[0], want[0]) <= 2 * eps * want[0].abs().max()
    for g, ref in zip(got[1:], want[1:]):
        assert max_err(g, ref) <= 2 * eps * ref.abs().max()
