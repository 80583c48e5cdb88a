"""The add + norm ops (add_layer_norm, add_rms_norm, bias_dropout_add_layer_norm, bias_dropout_add_rms_norm) and
their modules. CPU tests run the op layer (checks, autograd, the CPU kernels); `cuda` tests hold the fused kernels
to the fp64 reference with a tolerance relative to PyTorch's own low-precision error on the same inputs."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedkernels
import fusedkernels.nn as fnn
import fusedkernels.ops as fops
from fusedkernels import _native
from fusedkernels.ops.norm import add_norm_ref

from .helpers import DEVICES, DTYPES, assert_close_to_ref, check_graph_replays, max_err, poison_allocator

needs_native = pytest.mark.skipif(not _native.loaded, reason=f"native module not loaded: {_native.error}")

# (rows, hidden): size 1, odd sizes (general path), 16-byte multiples (register path), past the add path's
# register limit (20000 bf16: general path), the widest row.
# Hidden sizes reach each threads-per-row variant of the forward's register path (bf16 / fp32 threads per row): 64:
# 8 / 16, 200: 16 / 32, 480: 32 / 64, 1000: 64 / 128, 2048: 128 / 512, 4096: 256 / 512, 12288: 512 / general;
# three vectors a thread (16-bit): 768 (32 threads, every slot used), 1528 (64 threads, one slot idle), 12288;
# full-row instances (16-bit, every slot used, no bias or dropout): 128, 192, 768, 1024, 1536, 2048, 4096.
SHAPES = [(1, 1), (5, 7), (3, 1000), (37, 768), (64, 1024), (9, 4097), (300, 64), (11, 200), (6, 480), (4, 2048),
          (5, 1528), (29, 128), (13, 192), (7, 1536)]
CUDA_SHAPES = SHAPES + [(17, 4096), (3, 12288), (3, 20000), (2, 65536)]
KINDS = ["add_layer_norm", "add_rms_norm", "bias_dropout_add_layer_norm", "bias_dropout_add_rms_norm"]
EPS = 1e-5


def _rms(kind):
    return "rms" in kind


def _inputs(rows, hidden, dtype, device, residual_dtype=None, param_dtype=None):
    """x, residual (in residual_dtype, else x's), weight, norm bias, bias: fresh, not centred, never zeros."""
    x = (torch.randn(rows, hidden, device=device) + 0.3).to(dtype)
    residual = (torch.randn(rows, hidden, device=device) * 2 + 0.5).to(residual_dtype or dtype)
    pd = param_dtype or dtype
    w = (torch.rand(hidden, device=device) + 0.5).to(pd)
    nb = (torch.randn(hidden, device=device) * 0.1).to(pd)
    b = (torch.randn(hidden, device=device) * 0.1).to(dtype)
    return x, residual, w, nb, b


def _call(kind, x, residual, w, nb, b, p=0.0, training=True, residual_dtype=None):
    if kind == "add_layer_norm":
        return fops.add_layer_norm(x, residual, w, nb, EPS, residual_dtype)
    if kind == "add_rms_norm":
        return fops.add_rms_norm(x, residual, w, EPS, residual_dtype)
    if kind == "bias_dropout_add_layer_norm":
        return fops.bias_dropout_add_layer_norm(x, b, residual, w, nb, p, EPS, training, residual_dtype)
    return fops.bias_dropout_add_rms_norm(x, b, residual, w, p, EPS, training, residual_dtype)


def _leaves(kind, x, residual, w, nb, b):
    """The differentiable inputs of `kind` (weight / biases only where it takes them)."""
    names = ["x", "residual", "weight"] + ([] if _rms(kind) else ["norm_bias"]) + (["bias"] if "bias_" in kind else [])
    values = {"x": x, "residual": residual, "weight": w, "norm_bias": nb, "bias": b}
    return names, [values[n].detach().clone().requires_grad_() for n in names]


def _run(kind, fn, x, residual, w, nb, b, dy, dres):
    """(out, h) and the grads of the leaves, through fn(kind, x, residual, w, nb, b)."""
    names, leaves = _leaves(kind, x, residual, w, nb, b)
    given = dict(zip(names, leaves))
    out, h = fn(kind, given["x"], given["residual"], given["weight"], given.get("norm_bias"), given.get("bias"))
    grads = torch.autograd.grad([out, h], leaves, [dy, dres])
    return [out.detach(), h.detach()] + list(grads), ["out", "h"] + ["d" + n for n in names]


def _torch_chain(residual_dtype, keep=None, p=0.0):
    """The unfused chain in the inputs' own dtypes, as a model writes it: PyTorch's error on it is the yardstick."""

    def fn(kind, x, residual, w, nb, b):
        t = x + b if b is not None and "bias_" in kind else x
        if keep is not None:
            t = t * keep.to(t.dtype) / (1 - p) if p < 1 else t * 0
        h = residual + t if residual_dtype is None else residual.to(residual_dtype) + t.to(residual_dtype)
        hn = h.to(x.dtype) if h.dtype != x.dtype and x.dtype != torch.float64 else h
        wn = w.to(hn.dtype)
        out = F.rms_norm(hn, (x.shape[-1],), wn, EPS) if _rms(kind) else F.layer_norm(
            hn, (x.shape[-1],), wn, nb.to(hn.dtype), EPS)
        return out.to(x.dtype), h

    return fn


def _fp64_reference(residual_dtype, keep=None, p=0.0):
    """fp64 arithmetic; h rounded to residual_dtype as the op rounds it, so out is the norm of what h holds."""

    def fn(kind, x, residual, w, nb, b):
        bias = b if "bias_" in kind else None
        t = x.double() + (bias.double() if bias is not None else 0)
        if keep is not None:
            t = t * keep.double() / (1 - p) if p < 1 else t * 0
        h64 = residual.double() + t
        h = h64 + (h64.to(residual_dtype).double() - h64).detach()  # rounded value, fp64 gradient
        out = F.rms_norm(h, (x.shape[-1],), w.double(), EPS) if _rms(kind) else F.layer_norm(
            h, (x.shape[-1],), w.double(), nb.double(), EPS)
        return out, h

    return fn


def _check_against_reference(kind, x, residual, w, nb, b, rdt, keep=None, p=0.0, training=True, seed=None):
    """seed: set right before the op runs (the one the mask `keep` was read with)."""
    dy, dres = torch.randn_like(x), torch.randn_like(residual.to(rdt))
    # fp64 leaves: the reference's grads stay fp64. (With the inputs' own leaves autograd rounds each grad to its
    # leaf's dtype: then a kernel that rounds a near-tie the other way is one ulp of the 16-bit type off, while
    # torch's chain, rounding alike, has error 0 and the bound shrinks to the floor.)
    ref, names = _run(kind, _fp64_reference(rdt, keep, p), *(t.double() for t in (x, residual, w, nb, b, dy, dres)))
    lowp, _ = _run(kind, _torch_chain(None if rdt == x.dtype else rdt, keep, p), x, residual, w, nb, b, dy, dres)
    poison_allocator(x, x, residual, residual)

    def ours(kind, x, residual, w, nb, b):
        return _call(kind, x, residual, w, nb, b, p, training, None if rdt == x.dtype else rdt)

    if seed is not None:
        torch.manual_seed(seed)
    got, _ = _run(kind, ours, x, residual, w, nb, b, dy, dres)
    assert got[0].dtype == x.dtype and got[1].dtype == rdt
    for name, o, r, t in zip(names, got, ref, lowp):
        # parameter grads sum over rows: allow for the fp32 accumulation order over many rows too; a row of one
        # element has rstd = 1 / sqrt(eps), which magnifies fp32 rounding (torch's error there is 0 by structure)
        floor = 1e-5 if name in ("dweight", "dnorm_bias", "dbias") or x.shape[-1] == 1 else 1e-6
        floor *= 3 if x.shape[-1] == 1 else 1
        assert_close_to_ref(o.double(), r.to(o.dtype).double() if name == "h" else r, t.double(), name, floor=floor)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("kind", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("fp32_residual", [False, True], ids=["residual_like_x", "fp32_residual"])
def test_add_norm_matches_reference(device, dtype, rows, hidden, kind, fp32_residual):
    if fp32_residual and dtype == torch.float32:
        pytest.skip("the same as residual_like_x")
    rdt = torch.float32 if fp32_residual else dtype
    _check_against_reference(kind, *_inputs(rows, hidden, dtype, device, rdt), rdt)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", CUDA_SHAPES[len(SHAPES):])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fp32_residual", [False, True], ids=["residual_like_x", "fp32_residual"])
def test_kernel_wide_rows_match_reference(dtype, rows, hidden, kind, fp32_residual):
    rdt = torch.float32 if fp32_residual else dtype
    _check_against_reference(kind, *_inputs(rows, hidden, dtype, "cuda", rdt), rdt, p=0.0)


def _mask_of(kind, x, residual, w, nb, b, p, rdt):
    """The keep mask the op draws: with a zero residual and no bias, h = dropout(x) is zero exactly where an
    element was dropped (x has no zeros). Called right after seeding, as the op under test is."""
    out, h = _call(kind, x, torch.zeros_like(residual), w, nb, None, p, True, rdt)
    assert (x != 0).all()
    return h != 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(5, 7), (37, 768), (4, 1031)])
@pytest.mark.parametrize("kind", ["bias_dropout_add_layer_norm", "bias_dropout_add_rms_norm"])
def test_bias_dropout_add_matches_reference_with_its_mask(device, dtype, rows, hidden, kind):
    """Forward and every grad against the reference given the mask the op drew (the same seed, so the same mask:
    its counters are the element's row and column)."""
    p = 0.1
    rdt = torch.float32 if dtype != torch.float32 and hidden == 768 else dtype
    x, residual, w, nb, b = _inputs(rows, hidden, dtype, device, rdt)
    torch.manual_seed(7)
    keep = _mask_of(kind, x, residual, w, nb, b, p, None if rdt == dtype else rdt)
    if x.numel() > 1000:
        assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    _check_against_reference(kind, x, residual, w, nb, b, rdt, keep, p, seed=7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fp32_residual", [False, True], ids=["residual_like_x", "fp32_residual"])
def test_x_and_residual_grads_without_dropout(device, kind, fp32_residual):
    """Without dropout x's grad is the new residual's (one tensor for both where their dtypes agree, as autograd's
    add); with a float32 stream x's is that grad rounded to x's dtype; passing one tensor as both doubles it."""
    rdt = torch.float32 if fp32_residual else torch.bfloat16
    x, residual, w, nb, b = _inputs(9, 1024, torch.bfloat16, device, rdt)
    x, residual = x.requires_grad_(), residual.requires_grad_()
    out, h = _call(kind, x, residual, w, nb, b, 0.0, True, rdt if fp32_residual else None)
    dy, dh = torch.randn_like(out), torch.randn_like(h)
    dx, dres = torch.autograd.grad([out, h], [x, residual], [dy, dh])
    assert dx.dtype == x.dtype and dres.dtype == rdt
    assert torch.equal(dx, dres.to(x.dtype))
    if not fp32_residual:  # one tensor as both x and residual: its grad is the sum of the two
        xx = x.detach().clone().requires_grad_()
        (dxx,) = torch.autograd.grad(_call(kind, xx, xx, w, nb, b, 0.0, True), [xx], [dy, dh])
        a, r = (x.detach().clone().requires_grad_() for _ in range(2))
        da, dr = torch.autograd.grad(_call(kind, a, r, w, nb, b, 0.0, True), [a, r], [dy, dh])
        assert torch.equal(dxx, da + dr)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hidden", [7, 1024])
def test_p_1_drops_everything(device, hidden):
    """p = 1: h is the residual, out its norm, and nothing reaches x or the bias (no 0 * inf)."""
    x, residual, w, nb, b = (t.requires_grad_() for t in _inputs(6, hidden, torch.bfloat16, device))
    out, h = fops.bias_dropout_add_layer_norm(x, b, residual, w, nb, 1.0)
    assert torch.equal(h, residual)
    assert max_err(out, F.layer_norm(residual.double(), (hidden,), w.double(), nb.double())) < 2e-2
    dx, db, dres = torch.autograd.grad([out, h], [x, b, residual], [torch.randn_like(out), torch.randn_like(h)])
    assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(db, torch.zeros_like(b))
    assert torch.isfinite(dres).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["bias_dropout_add_layer_norm", "bias_dropout_add_rms_norm"])
def test_no_dropout_when_p_is_0_or_not_training(device, kind):
    x, residual, w, nb, b = _inputs(13, 96, torch.bfloat16, device)
    for p, training in ((0.0, True), (0.3, False)):
        _check_against_reference(kind, x, residual, w, nb, b, torch.bfloat16, None, p, training)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# 12288 (16-bit): the forward's register path, the backward's general one: both must draw the same mask
@pytest.mark.parametrize("hidden", [7, 1024, 4097, pytest.param(12288, marks=pytest.mark.cuda)])
def test_backward_regenerates_the_forward_mask(device, dtype, hidden):
    """The gradient reaching x through the new residual alone is mask * g / (1 - p), with the mask the forward
    drew (read off h = dropout(x) with a zero residual): regenerated from the seed and offset, not stored."""
    p = 0.25

    def away_from_zero(*shape):
        """Values in +-[0.5, 1.5): no zero (nor one that underflows scaled or rounded) can pass for a drop."""
        t = torch.rand(*shape, device=device) + 0.5
        return torch.where(torch.rand(*shape, device=device) < 0.5, -t, t).to(dtype)

    # The mask is read off zeros, so x and g must have none: randn (+ 0.3) in 16-bit does not promise that
    # across torch versions (its CPU sampling and rounding of 16-bit types is the library's to change).
    x = away_from_zero(33, hidden).requires_grad_()
    out, h = fops.bias_dropout_add_layer_norm(x, None, torch.zeros_like(x), None, None, p)
    keep = h != 0
    g = away_from_zero(33, hidden)
    assert (x != 0).all() and (g != 0).all()
    (dx,) = torch.autograd.grad(h, x, g)
    want = torch.where(keep, g.double() / (1 - p), 0.0)
    bad = ((dx != 0) != keep).nonzero()
    assert bad.numel() == 0, (
        f"{bad.shape[0]} of {keep.numel()} elements disagree, first (row, col) {bad[:5].tolist()}: "
        f"x {[x[r, c].item() for r, c in bad[:5].tolist()]}, h {[h[r, c].item() for r, c in bad[:5].tolist()]}, "
        f"dx {[dx[r, c].item() for r, c in bad[:5].tolist()]}, g {[g[r, c].item() for r, c in bad[:5].tolist()]}")
    assert max_err(dx, want) <= torch.finfo(dtype).eps * want.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_is_reproducible_for_a_seed(device):
    x, residual, w, nb, b = _inputs(64, 256, torch.bfloat16, device)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(fops.bias_dropout_add_rms_norm(x, b, residual, w, 0.5)[1])
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    again = fops.bias_dropout_add_rms_norm(x, b, residual, w, 0.5)[1]  # the generator moved on: a new mask
    assert not torch.equal(again, runs[2])


@pytest.mark.parametrize("device", DEVICES)
def test_only_one_result_has_a_grad(device):
    """The backward takes the grads of both results, either of which may be absent."""
    x, residual, w, nb, b = _inputs(6, 40, torch.float32, device)
    leaves = [t.clone().requires_grad_() for t in (x, residual, w, nb)]
    out, h = fops.add_layer_norm(*leaves)
    dx, dres, dw, dnb = torch.autograd.grad(h, leaves, torch.ones_like(h), allow_unused=True)
    assert torch.equal(dx, torch.ones_like(x)) and torch.equal(dres, torch.ones_like(x))
    assert dw is None and dnb is None
    out, h = fops.add_layer_norm(*leaves)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dy)
    want = torch.autograd.grad(F.layer_norm(leaves[0] + leaves[1], (40,), leaves[2], leaves[3]), leaves, dy)
    for a, c in zip(got, want):
        assert max_err(a, c) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_residual_of_x_dtype_into_a_float32_stream(device):
    """residual_dtype=float32 with a residual of x's dtype (the first layer's): converted, its grad in its dtype."""
    x, residual, w, nb, b = _inputs(7, 64, torch.bfloat16, device)
    r = residual.clone().requires_grad_()
    out, h = fops.add_rms_norm(x, r, w, None, torch.float32)
    assert h.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert max_err(h, x.double() + residual.double()) <= 1e-6 * h.abs().max().item()
    h.sum().backward()
    assert r.grad.dtype == torch.bfloat16 and torch.equal(r.grad, torch.ones_like(r))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_empty_rows(device, kind):
    x, residual, w, nb, b = (t.requires_grad_() for t in _inputs(0, 64, torch.float32, device))
    out, h = _call(kind, x, residual, w, nb, b, 0.1)
    assert out.shape == h.shape == (0, 64)
    (out.sum() + h.sum()).backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    if not _native.loaded:
        pytest.skip("needs the custom op")
    x, residual, w, nb, b = (t.requires_grad_() for t in _inputs(13, 96, torch.bfloat16, device, torch.float32,
                                                                  torch.float32))
    ops = torch.ops.fusedkernels
    torch.library.opcheck(ops.add_layer_norm, (x, residual, w, nb, 1e-5, torch.float32))
    torch.library.opcheck(ops.add_rms_norm, (x, residual.detach().bfloat16(), None, None, None))
    torch.library.opcheck(ops.bias_dropout_add_layer_norm, (x, b.bfloat16(), residual, w, nb, 0.2, 1e-5, False,
                                                             torch.float32))
    xd, rd, wd = x.detach(), residual.detach(), w.detach()
    for p, rms in ((0.0, False), (0.0, True)):
        torch.library.opcheck(ops.add_norm_fwd, (x, residual, b.bfloat16(), w, None if rms else nb, 1e-5, p,
                                                 torch.float32, rms))
        out, h, mean, rstd, rng = ops.add_norm_fwd(xd, rd, None, wd, None, 1e-5, p, torch.float32, rms)
        for mask in ([True, True, False, True, False], [True, False, True, False, False]):
            torch.library.opcheck(ops.add_norm_bwd, (torch.randn_like(out), torch.randn_like(h), h, wd, None, mean,
                                                     rstd, rng, 1e-5, p, torch.bfloat16, rms, mask))
        torch.library.opcheck(ops.add_norm_bwd, (None, torch.randn_like(h), h, wd, None, mean, rstd, rng, 1e-5, p,
                                                 torch.bfloat16, rms, [True, True, False, True, False]))
    # dropout: the results are random, so the schema and the fake tensors only
    torch.library.opcheck(ops.add_norm_fwd, (x, residual, None, w, nb, 1e-5, 0.3, torch.float32, False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    add_ln = fnn.FusedAddLayerNorm(64, device=device)
    bda_rms = fnn.FusedBiasDropoutAddRMSNorm(64, p=0.1, device=device, residual_dtype=torch.float32).eval()
    lin = torch.nn.Linear(64, 64, device=device)

    def block(x, residual):
        y, residual = add_ln(lin(x), residual)
        y, residual = bda_rms(y, lin.bias, residual)
        return y * residual

    x = torch.randn(3, 11, 64, device=device, requires_grad=True)
    residual = torch.randn(3, 11, 64, device=device)
    eager = block(x, residual)
    (eager_grad,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, residual)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert max_err(out, eager) <= 1e-5 * eager.abs().max().item()
    assert max_err(grad, eager_grad) <= 1e-5 * eager_grad.abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_and_gradgradcheck_float64(kind):
    """float64 CPU inputs through the op's autograd and CPU kernels; second derivatives through the
    differentiable backward (dropout off: gradcheck needs one function)."""
    x, residual, w, nb, b = _inputs(3, 10, torch.float64, "cpu")
    names, leaves = _leaves(kind, x, residual, w, nb, b)

    def fn(*args):
        given = dict(zip(names, args))
        out, h = _call(kind, given["x"], given["residual"], given["weight"], given.get("norm_bias"),
                       given.get("bias"), 0.3, False)
        return out, h * h

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_second_derivatives_with_dropout_use_the_forward_mask(device):
    """create_graph=True with dropout: the differentiable backward rebuilds the forward's mask."""
    x, residual, w, nb, b = _inputs(4, 24, torch.float32, device)
    torch.manual_seed(5)
    keep = _mask_of("bias_dropout_add_layer_norm", x, residual, w, nb, b, 0.5, None)

    def second(fn):
        leaves = [t.clone().requires_grad_() for t in (x, residual, w)]
        out, h = fn(*leaves)
        first = torch.autograd.grad(out.square().sum() + h.square().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in first), leaves)

    torch.manual_seed(5)
    got = second(lambda x, r, w: fops.bias_dropout_add_layer_norm(x, b, r, w, nb, 0.5))
    want = second(lambda x, r, w: add_norm_ref(x.double(), r.double(), w.double(), nb.double(), EPS, bias=b.double(),
                                               p=0.5, keep=keep))
    for o, r in zip(got, want):
        assert max_err(o, r) <= 1e-4 * max(r.abs().max().item(), 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    x, residual, w, nb, b = _inputs(4, 16, torch.float32, device)
    cases = [
        (lambda: fops.add_layer_norm(x.int(), residual), RuntimeError, "x must be a floating-point tensor"),
        (lambda: fops.add_layer_norm(x, residual[:, :8]), RuntimeError, "residual must have x's shape"),
        (lambda: fops.add_rms_norm(x, residual, w[:8]), RuntimeError, "weight must have shape \\[16\\]"),
        (lambda: fops.add_rms_norm(x.half(), residual, None, None, torch.bfloat16), RuntimeError,
         "residual stream's dtype .* must be x's dtype"),
        (lambda: fops.add_rms_norm(x.half(), residual, None, None, torch.float16), RuntimeError,
         "a float32 residual would be rounded to residual_dtype \\(float16\\): pass residual_dtype=torch.float32"),
        (lambda: fops.add_layer_norm(x.bfloat16(), residual.double()), RuntimeError, "residual stream's dtype"),
        (lambda: fops.add_layer_norm(x, residual, w.long()), RuntimeError, "weight must have x's dtype"),
        (lambda: fops.add_layer_norm(x, residual, w, nb.double()), RuntimeError, "norm_bias must have x's dtype"),
        (lambda: fops.bias_dropout_add_layer_norm(x, b, residual, w, nb, 1.5), ValueError, "p must be in"),
        (lambda: fops.bias_dropout_add_rms_norm(x, b.half(), residual, w, 0.1), RuntimeError,
         "bias must have x's dtype"),
        (lambda: fops.add_layer_norm([1.0], residual), TypeError, "must be a Tensor"),
        (lambda: fops.bias_dropout_add_rms_norm(x, b, residual, w, "0.1"), TypeError, "p"),
        (lambda: fops.add_rms_norm(x, residual, w, None, "float32"), TypeError, "residual_dtype"),
        (lambda: fnn.FusedAddLayerNorm((4, 4)), ValueError, "normalized_shape must be one size"),
        (lambda: fnn.FusedBiasDropoutAddLayerNorm(16, p=2.0), ValueError, "p must be in"),
        (lambda: fnn.FusedAddLayerNorm(16, 1e-5, True, True, None, None, torch.float32), TypeError, "positional"),
    ]
    # the modules check their input's size as nn.LayerNorm / nn.RMSNorm do, with or without affine parameters
    x9, r9 = x.new_ones(4, 9), x.new_ones(4, 9)
    for affine in (False, True):
        for module, args in ((fnn.FusedAddLayerNorm, (x9, r9)), (fnn.FusedAddRMSNorm, (x9, r9)),
                             (fnn.FusedBiasDropoutAddLayerNorm, (x9, None, r9)),
                             (fnn.FusedBiasDropoutAddRMSNorm, (x9, None, r9))):
            with pytest.raises(RuntimeError, match=re.escape("expected input with shape [*, 8], but got input of "
                                                             "size[4, 9]")):
                module(8, elementwise_affine=affine, device=device)(*args)
    with pytest.raises(RuntimeError, match=re.escape("expected input with shape [*, 8]")):
        torch.nn.LayerNorm(8, elementwise_affine=False, device=device)(x9)
    if device == "cuda":
        cases.append((lambda: fops.add_layer_norm(x, residual.cpu()), RuntimeError, "residual is on cpu but x is on"))
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_residual_stream_dtype_follows_torch_promotion(device):
    """residual_dtype=None: h takes the dtype of x + residual as torch promotes it (a float32 stream beside a 16-bit
    x under autocast), out stays in x's dtype."""
    x, residual, w, nb, _ = _inputs(5, 32, torch.bfloat16, device, torch.float32)
    out, h = fops.add_layer_norm(x, residual, w, nb)
    assert out.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert torch.equal(h, residual + x.float())
    out2, h2 = fnn.FusedAddRMSNorm(32, device=device, dtype=torch.bfloat16)(x, residual)
    assert out2.dtype == torch.bfloat16 and h2.dtype == torch.float32
    _, h3 = fops.add_rms_norm(x.float(), residual.bfloat16())  # a 16-bit residual into a float32 x's stream
    assert h3.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["bias_dropout_add_layer_norm", "bias_dropout_add_rms_norm"])
def test_torch_func_transforms_with_dropout(device, kind):
    """With dropout: torch.func.grad takes F.dropout's mask (the same for a seed); vmap draws a mask per sample
    (as randomness="different"); a backward vmapped over its grads (is_grads_batched) regenerates the forward's
    mask."""
    x, residual, w, nb, _ = _inputs(4, 16, torch.float32, device)

    def ours(w):
        args = (x, None, residual, w, nb, 0.5) if kind.endswith("layer_norm") else (x, None, residual, w, 0.5)
        return getattr(fops, kind)(*args)[0].square().sum()

    def plain(w):
        h = residual + F.dropout(x, 0.5)
        out = F.layer_norm(h, (16,), w, nb, EPS) if kind.endswith("layer_norm") else F.rms_norm(h, (16,), w)
        return out.square().sum()

    torch.manual_seed(3)
    got = torch.func.grad(ours)(w)
    torch.manual_seed(3)
    assert max_err(got, torch.func.grad(plain)(w)) < 1e-4

    def h_of(t):
        args = (t, None, torch.zeros_like(t), None, None, 0.5) if kind.endswith("layer_norm") else (
            t, None, torch.zeros_like(t), None, 0.5)
        return getattr(fops, kind)(*args)[1]

    ones = torch.ones(4, 8, 16, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # functorch's note that the op has no batching rule of its own
        per_sample = torch.func.vmap(h_of, randomness="different")(ones)
    kept = per_sample != 0
    assert all(torch.equal(per_sample[i][kept[i]], 2 * ones[i][kept[i]]) for i in range(4))
    assert not all(torch.equal(kept[0], kept[i]) for i in range(1, 4))  # a mask per sample

    xg = x.clone().requires_grad_()
    args = (xg, None, residual, w, nb, 0.5) if kind.endswith("layer_norm") else (xg, None, residual, w, 0.5)
    out, h = getattr(fops, kind)(*args)
    grads = torch.randn(3, *out.shape, device=device)
    (batched,) = torch.autograd.grad(out, xg, grads, retain_graph=True, is_grads_batched=True)
    for i in range(3):
        (one,) = torch.autograd.grad(out, xg, grads[i], retain_graph=True)
        assert max_err(batched[i], one) < 1e-5


def test_modules_arguments_repr_script_and_fuse():
    """Constructor arguments in the norm's order (p keyword-only), residual_dtype in the repr, TorchScript, and
    fuse() reporting the modules as already fused."""
    m = fnn.FusedBiasDropoutAddLayerNorm(16, 1e-6)
    assert m.eps == 1e-6 and m.p == 0.5
    with pytest.raises(TypeError):
        fnn.FusedBiasDropoutAddRMSNorm(16, 1e-6, True, None, None, 0.1)
    assert "residual_dtype=torch.float32" in repr(fnn.FusedAddLayerNorm(16, residual_dtype=torch.float32))
    assert "residual_dtype" not in repr(fnn.FusedAddRMSNorm(16)) and "p=0.2" in repr(
        fnn.FusedBiasDropoutAddRMSNorm(16, p=0.2))
    for cls in (fnn.FusedAddLayerNorm, fnn.FusedAddRMSNorm, fnn.FusedBiasDropoutAddLayerNorm,
                fnn.FusedBiasDropoutAddRMSNorm):  # refused when built, not at the first call
        for bad in (torch.float16, torch.int32):
            with pytest.raises(ValueError, match="residual_dtype must be None .* or torch.float32"):
                cls(16, residual_dtype=bad)
    modules = [fnn.FusedAddLayerNorm(16), fnn.FusedAddRMSNorm(16, eps=1e-6), fnn.FusedBiasDropoutAddLayerNorm(16),
               fnn.FusedBiasDropoutAddRMSNorm(16)]
    report = fusedkernels.fuse(torch.nn.ModuleList(modules))
    assert [e.status for e in report.entries if e.path] == ["already fused"] * 4, str(report)
    if not _native.has_op("add_layer_norm"):
        return  # TorchScript calls the native ops
    x, residual = torch.randn(3, 16), torch.randn(3, 16)
    for m in modules:
        m.eval()
        args = (x, residual) if "Dropout" not in type(m).__name__ else (x, None, residual)
        scripted = torch.jit.script(m)
        for a, e in zip(scripted(*args), m(*args)):
            assert torch.equal(a, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["add_layer_norm", "bias_dropout_add_rms_norm"])
def test_modules_load_torch_state_and_match_the_ops(device, kind):
    torch_cls, ours_cls = {"add_layer_norm": (torch.nn.LayerNorm, fnn.FusedAddLayerNorm),
                           "bias_dropout_add_rms_norm": (torch.nn.RMSNorm, fnn.FusedBiasDropoutAddRMSNorm)}[kind]
    theirs = torch_cls(48, device=device)
    with torch.no_grad():
        for prm in theirs.parameters():
            prm.copy_(torch.randn_like(prm))
    ours = ours_cls(48, device=device)
    ours.load_state_dict(theirs.state_dict())
    back = torch_cls(48, device=device)
    back.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch_cls)
    x, residual, _, _, b = _inputs(5, 48, torch.float32, device)
    ours.eval()
    args = (x, residual) if kind == "add_layer_norm" else (x, b, residual)
    out, h = ours(*args)
    want_h = x + residual if kind == "add_layer_norm" else x + b + residual
    assert max_err(h, want_h) < 1e-6
    assert max_err(out, theirs(want_h)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_module_dropout_follows_training_mode(device):
    m = fnn.FusedBiasDropoutAddLayerNorm(256, p=0.5, device=device)
    x, residual, _, _, b = _inputs(16, 256, torch.float32, device)
    h_train = m(x, b, residual)[1]
    h_eval = m.eval()(x, b, residual)[1]
    assert max_err(h_eval, x + b + residual) < 1e-6
    dropped = (h_train - residual).abs() < 1e-6
    assert 0.4 < dropped.float().mean().item() < 0.6


def test_without_native_module_the_reference_runs_with_the_same_checks(monkeypatch):
    """What a CPU-only install runs: the reference, after the native op's checks."""
    from fusedkernels.ops import norm as norm_ops

    monkeypatch.setattr(_native, "has_op", lambda name: False)
    op = _native.public_op("bias_dropout_add_layer_norm", norm_ops._bdal_ref, "the PyTorch reference")
    x, residual, w, nb, b = (t.requires_grad_() for t in _inputs(8, 32, torch.float32, "cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU tensors: no warning
        out, h = op(x, b, residual, w, nb, 0.0, EPS, True, None)
    want_out, want_h = add_norm_ref(x, residual, w, nb, EPS, bias=b)
    assert max_err(out, want_out) == 0.0 and max_err(h, want_h) == 0.0
    (out.sum() + h.sum()).backward()
    assert x.grad is not None and b.grad is not None
    with pytest.raises(ValueError, match="p must be in"):
        op(x, b, residual, w, nb, -0.5, EPS, True, None)
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        op(x, b, residual[:4], w, nb, 0.0, EPS, True, None)


@pytest.mark.cuda
@needs_native
def test_kernel_cuda_graph_capture_with_dropout():
    """Forward and backward captured in a graph; each replay equals an eager run from the generator state the
    replay started at (the captured call reads the seed and offset at replay time), and draws a new mask."""
    shape = (64, 1024)
    static = [t.requires_grad_() for t in _inputs(*shape, torch.bfloat16, "cuda", torch.float32)[:3]]
    bias = (torch.randn(shape[1], device="cuda") * 0.1).bfloat16()
    dy = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def step(x, residual, w):
        out, h = fops.bias_dropout_add_layer_norm(x, bias, residual, w, None, 0.1, EPS, True, torch.float32)
        return [out, h, *torch.autograd.grad([out, h], (x, residual, w), [dy, torch.ones_like(h)])]

    check_graph_replays(step, static, lambda: _inputs(*shape, torch.bfloat16, "cuda", torch.float32)[:3],
                        ["out", "h", "dx", "dresidual", "dweight"], ulps=0)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("hidden", [1024, 4097])
def test_kernel_parameter_grads_are_deterministic(hidden):
    x, residual, w, nb, b = _inputs(3000, hidden, torch.bfloat16, "cuda", torch.float32)
    dy, dres = torch.randn_like(x), torch.randn_like(residual)

    def grads():
        torch.manual_seed(1)
        return _run("bias_dropout_add_layer_norm",
                    lambda k, *a: _call(k, *a, p=0.1, residual_dtype=torch.float32), x, residual, w, nb, b, dy,
                    dres)[0]

    first = grads()
    for _ in range(2):
        for a, c in zip(first, grads()):
            assert torch.equal(a, c)


@pytest.mark.cuda
@needs_native
def test_kernel_inputs_without_a_kernel_run_the_reference_with_one_warning():
    for x in (torch.randn(3, 70001, device="cuda"), torch.randn(5, 33, device="cuda", dtype=torch.float64)):
        residual = torch.randn_like(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, h = fops.add_rms_norm(x, residual, None, EPS)
            fops.add_rms_norm(x, residual, None, EPS)
        assert len([w for w in caught if "instead" in str(w.message)]) <= 1
        assert max_err(out, F.rms_norm((x + residual).double(), (x.shape[-1],), None, EPS)) < 1e-5


@pytest.mark.cuda
@needs_native
def test_kernel_statistics_and_raw_op_checks():
    x, residual, w, nb, b = _inputs(41, 520, torch.bfloat16, "cuda", torch.float32)
    out, h, mean, rstd, rng = torch.ops.fusedkernels.add_norm_fwd(x, residual, None, w, nb, 1e-5, 0.0, torch.float32,
                                                                  False)
    hd = h.double()
    assert mean.dtype == rstd.dtype == torch.float32 and rng.numel() == 0
    assert max_err(mean, hd.mean(-1)) < 1e-5
    assert max_err(rstd, torch.rsqrt(hd.var(-1, unbiased=False) + 1e-5)) < 1e-4 * rstd.abs().max().item()
    with pytest.raises(TypeError, match="residual must be float32"):
        torch.ops.fusedkernels.add_norm_fwd(x, residual.bfloat16(), None, w, nb, 1e-5, 0.0, torch.float32, False)
    with pytest.raises(ValueError, match="rng_state must be the forward's"):
        torch.ops.fusedkernels.add_norm_bwd(None, h, h, w, nb, mean, rstd, rng, 1e-5, 0.1, torch.bfloat16, False,
                                            [True, True, False, False, False])


def test_cpu_16bit_weight_grads_are_summed_in_float32():
    """The CPU path's dweight / dnorm_bias of a bf16 h are summed in float32, as the CUDA kernels do: ATen's own
    LayerNorm backward sums them in ways that lose bits (3-4e-2 of the largest entry here, against ~3e-3)."""
    x = torch.randn(2048, 128, dtype=torch.bfloat16, requires_grad=True)
    residual = torch.randn_like(x)
    w = (torch.rand(128) + 0.5).to(torch.bfloat16).requires_grad_()
    nb = torch.randn(128, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    out, _ = fops.add_layer_norm(x, residual, w, nb)
    got = torch.autograd.grad(out, [w, nb], dy)
    w64, nb64 = w.detach().double().requires_grad_(), nb.detach().double().requires_grad_()
    want = torch.autograd.grad(F.layer_norm(x.double() + residual.double(), (128,), w64, nb64), [w64, nb64],
                               dy.double())
    for g, ref in zip(got, want):
        assert (g.double() - ref).abs().max() <= 8e-3 * ref.abs().max()


@pytest.mark.parametrize("native", [True, False], ids=["native", "without"])
def test_residual_dtype_errors_say_what_would_work(native):
    from fusedkernels.ops import norm as norm_ops

    if native:
        add_ln = lambda x, r, rdt=None: fops.add_layer_norm(x, r, residual_dtype=rdt)  # noqa: E731
        add_rms = lambda x, r, rdt=None: fops.add_rms_norm(x, r, residual_dtype=rdt)  # noqa: E731
    else:  # the build without the native op
        add_ln = lambda x, r, rdt=None: norm_ops._add_ln_ref(x, None, r, None, None, 0.0, 1e-5, False, rdt)  # noqa: E731
        add_rms = lambda x, r, rdt=None: norm_ops._add_rms_ref(x, None, r, None, None, 0.0, None, False, rdt)  # noqa: E731
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"float64 residual would be rounded to residual_dtype \(float32\): pass "
                                           r"residual_dtype=torch.float64, or a float32 residual"):
        add_ln(x, x.clone(), torch.float32)
    with pytest.raises(RuntimeError, match=r"must be x's dtype \(float32\), got float64"):
        add_rms(x.float(), x)
    bf = torch.randn(2, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"must be x's dtype \(bfloat16\) or float32, got float64"):
        add_rms(bf, x)
    with pytest.raises(RuntimeError, match=r"pass residual_dtype=torch.float32, or a bfloat16 residual"):
        add_rms(bf, bf.float(), torch.bfloat16)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_p_one_drops_everything_and_draws_nothing_as_f_dropout(rms):
    x, r, b = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8), torch.randn(8, requires_grad=True)
    op = fops.bias_dropout_add_rms_norm if rms else fops.bias_dropout_add_layer_norm
    torch.manual_seed(0)
    state = torch.get_rng_state()
    out, h = op(x, b, r, None, p=1.0) if rms else op(x, b, r, None, None, 1.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(h, r)
    (out.sum() + h.sum()).backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(b.grad, torch.zeros_like(b))
