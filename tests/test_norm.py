"""fusedkernels.ops.layer_norm / rms_norm and the FusedLayerNorm / FusedRMSNorm modules."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedkernels.nn as fnn
import fusedkernels.ops as fops
from fusedkernels import _native
from fusedkernels.ops import norm as norm_ops

from .helpers import DEVICES, DTYPES, assert_close_to_ref, max_err, poison_allocator

needs_native = pytest.mark.skipif(not _native.loaded, reason=f"native module not loaded: {_native.error}")

# (rows, hidden): size 1, odd sizes (general path), 16-byte multiples (register path), the widest row.
SHAPES = [(1, 1), (5, 7), (3, 1000), (37, 768), (64, 1024), (17, 4096), (9, 4097), (2, 65536), (300, 64)]


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


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_saved_for_backward(device):
    if not _native.loaded:
        pytest.skip("needs the custom op")
    x, w, b = _inputs(41, 520, torch.bfloat16, device, True)
    y, mean, rstd = torch.ops.fusedkernels.layer_norm_fwd(x, w, b, 1e-5)
    xd = x.double()
    assert max_err(mean, xd.mean(-1)) < 1e-5
    assert max_err(rstd, torch.rsqrt(xd.var(-1, unbiased=False) + 1e-5)) < 1e-4 * rstd.abs().max().item()
    _, rstd_rms = torch.ops.fusedkernels.rms_norm_fwd(x, w, 1e-5)
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
    for args in [(x, w, b, 1e-5), (x, None, None, 1e-5), (x, None, b, 1e-6)]:
        torch.library.opcheck(torch.ops.fusedkernels.layer_norm_fwd, args)
    torch.library.opcheck(torch.ops.fusedkernels.rms_norm_fwd, (x, w, 1e-5))
    torch.library.opcheck(torch.ops.fusedkernels.rms_norm_fwd, (x, None, 1e-5))
    xd, dy = x.detach(), torch.randn_like(x)
    _, mean, rstd = torch.ops.fusedkernels.layer_norm_fwd(xd, w.detach(), b.detach(), 1e-5)
    torch.library.opcheck(torch.ops.fusedkernels.layer_norm_bwd, (dy, xd, w.detach(), b.detach(), mean, rstd))
    torch.library.opcheck(torch.ops.fusedkernels.rms_norm_bwd, (dy, xd, None, rstd))


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
    x = torch.randn(4, 16, device=device)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        fops.layer_norm(x.to(torch.int32), (16,))
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        fops.rms_norm(x.double(), (16,))
    with pytest.raises(ValueError, match="trailing dimensions"):
        fops.layer_norm(x, (8,))
    with pytest.raises(ValueError, match="weight must have shape"):
        fops.layer_norm(x, (16,), torch.ones(8, device=device))
    with pytest.raises(TypeError, match="bias must be torch.float32"):
        fops.layer_norm(x, (16,), None, torch.ones(16, device=device, dtype=torch.float16))
    with pytest.raises(TypeError, match="same dtype"):
        fops.layer_norm(x.half(), (16,), torch.ones(16, device=device), torch.ones(16, device=device).half())
    with pytest.raises(ValueError, match="no elements"):
        fops.layer_norm(torch.randn(4, 0, device=device), (0,))
    with pytest.raises(TypeError, match="must be a Tensor"):
        fops.layer_norm([1.0, 2.0], (2,))


@pytest.mark.cuda
@needs_native
def test_mixed_devices_and_raw_op_checks():
    x = torch.randn(4, 16, device="cuda")
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        fops.layer_norm(x, (16,), torch.ones(16))
    with pytest.raises(ValueError, match="x must be contiguous"):
        torch.ops.fusedkernels.layer_norm_fwd(x.t(), None, None, 1e-5)
    with pytest.raises(ValueError, match="must be in"):
        torch.ops.fusedkernels.rms_norm_fwd(torch.randn(2, 70000, device="cuda"), None, 1e-5)
    with pytest.raises(ValueError, match="rstd must be float32 with one value per row"):
        torch.ops.fusedkernels.rms_norm_bwd(x, x, None, torch.ones(3, device="cuda"))


@pytest.mark.cuda
def test_past_native_limit_falls_back_with_one_warning():
    x = torch.randn(3, 70001, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = fops.layer_norm(x, (70001,))
        y2 = fops.layer_norm(x, (70001,))
    assert len([w for w in caught if "reference" in str(w.message)]) <= 1
    ref = F.layer_norm(x.double(), (70001,))
    assert max_err(y1, ref) < 1e-5 and torch.equal(y1, y2)


def test_without_native_module_ops_run_the_reference(monkeypatch):
    monkeypatch.setattr(_native, "loaded", False)
    monkeypatch.setattr(_native, "error", "test: pretend it failed")
    x = torch.randn(7, 33, requires_grad=True)
    y = fops.layer_norm(x, (33,))
    y.sum().backward()
    assert max_err(y, F.layer_norm(x.double(), (33,))) < 1e-5
    assert x.grad is not None
    assert norm_ops._use_native("rms_norm", x, 33) is False


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
