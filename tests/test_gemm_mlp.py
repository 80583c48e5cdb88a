"""fusedkernels.ops.mlp (nn.FusedMLP's plain form, fc2(act(fc1(x))) + residual) and its backward's GEMM with act' and
the bias gradient in the epilogue (act_dgrad).

As tests/test_gemm.py: CPU tests hold the op (its CPU kernels are the reference) to plain PyTorch and check the op
layer (errors, autograd, opcheck); `cuda` tests hold the fused kernels to an fp32 reference on fresh random inputs,
with a tolerance relative to PyTorch's own low-precision error, outputs poisoned first.
"""

import pytest
import torch

import fusedkernels.nn as fnn
import fusedkernels.ops as fops
from fusedkernels import _native
from fusedkernels.ops.gemm import ACTIVATIONS, mlp_ref

from .helpers import assert_close_to_ref, max_err, poison_allocator
from .test_gemm import PLAIN, _grads
from .test_gemm_gated import raises_with_and_without_native

needs_native = pytest.mark.skipif(not _native.has_op("mlp"), reason="needs the native gemm ops")
LOWP = [torch.float16, torch.bfloat16]
ACTS = [a for a in ACTIVATIONS if a != "none"]  # none leaves no act' to fuse (two F.linear calls)


def _inputs(lead, k, n, out, dtype=torch.float64, device="cpu", bias=True, residual=False):
    """x [*lead, k], fc1's weight [n, k] and bias [n], fc2's weight [out, n] and bias [out], residual [*lead, out]."""
    x = torch.randn(*lead, k, device=device).to(dtype)
    w1 = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    b1 = torch.randn(n, device=device).to(dtype) if bias else None
    w2 = (torch.randn(out, n, device=device) / n**0.5).to(dtype)
    b2 = torch.randn(out, device=device).to(dtype) if bias else None
    r = torch.randn(*lead, out, device=device).to(dtype) if residual else None
    return x, w1, b1, w2, b2, r


def _mlp(activation):
    return lambda x, w1, b1, w2, b2, r: torch.ops.fusedkernels.mlp(x, w1, b1, w2, b2, activation, r)


def _backward_ops(out, leaves, dy, node):
    """The grads, and the names of the ops the backward node called."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        grads = torch.autograd.grad(out, leaves, dy)
    return grads, {e.name for e in prof.events() if e.cpu_parent is not None and e.cpu_parent.name == node}


@needs_native
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_mlp_is_one_node_with_the_fused_dgrad(device):
    """mlp with a gradient to compute: one node whose backward takes dz and fc1's bias gradient from act_dgrad (no
    act_backward pass); the composition's gradients (linear_act, then linear_act "none") within rounding."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float64
    tensors = _inputs((3, 7), 16, 24, 32, dtype, device, bias=True, residual=True)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = _mlp("gelu")(*leaves)
    assert out.grad_fn.name() == "fusedkernels::MlpBackward"
    dy = torch.randn_like(out)
    grads, called = _backward_ops(out, leaves, dy, "fusedkernels::MlpBackward")
    assert "fusedkernels::act_dgrad" in called and "fusedkernels::act_backward" not in called, called
    composed = [t.detach().clone().requires_grad_() for t in tensors]
    h = fops.linear_act(composed[0], composed[1], composed[2], "gelu")
    want = torch.autograd.grad(fops.linear_act(h, composed[3], composed[4], "none", composed[5]), composed, dy)
    tol = 1e-12 if dtype == torch.float64 else 0.02
    for name, g, w in zip(["dx", "dw1", "db1", "dw2", "db2", "dr"], grads, want):
        assert max_err(g, w) <= tol * max(w.abs().max().item(), 1.0), name
    with torch.no_grad():  # without a gradient, no node: the two ops' kernels, nothing kept
        assert _mlp("gelu")(*tensors).grad_fn is None
    # no bias on fc1: the same node, fc1's bias gradient not asked for
    leaves[2] = None
    out = _mlp("relu")(*leaves)
    live = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, live, dy)
    want = torch.autograd.grad(mlp_ref(*leaves[:5], "relu", leaves[5]), live, dy)
    assert all(max_err(g, w) <= tol * max(w.abs().max().item(), 1.0) for g, w in zip(grads, want))


@needs_native
@pytest.mark.parametrize("activation", ACTS)
def test_mlp_gradcheck_and_gradgradcheck_float64(activation):
    """Every input differentiable, to second order (create_graph recomputes z and h from the inputs)."""
    torch.manual_seed(3)
    tensors = [t.requires_grad_() for t in _inputs((2, 3), 8, 8, 16, residual=True)]
    torch.autograd.gradcheck(_mlp(activation), tensors)
    torch.autograd.gradgradcheck(_mlp(activation), tensors)


def test_mlp_routes_as_its_two_ops_and_names_its_arguments(monkeypatch):
    """No gradient, activation none or a residual of another dtype: the two ops' results (the residual promoted); bad
    arguments raise naming mlp's own arguments, with the same exception types with and without the native op."""
    x, w1, b1, w2, b2, r = _inputs((5,), 8, 12, 16, residual=True)
    assert max_err(fops.mlp(x, w1, b1, w2, b2, "gelu", r.float()), mlp_ref(x, w1, b1, w2, b2, "gelu", r)) < 1e-6
    assert max_err(fops.mlp(x, w1, b1, w2, b2, "none", r), mlp_ref(x, w1, b1, w2, b2, "none", r)) < 1e-12
    messages = [
        (lambda: fops.mlp(x, w1, b1, w2[:, :4], b2), RuntimeError,
         r"mlp: fc2_weight must be \[out_features, N\], N the hidden width \(fc1_weight is \[N, in_features\] = "
         r"\[12, 8\]\), got \[16, 4\]"),
        (lambda: fops.mlp(x, w1, b1[:3], w2, b2), RuntimeError, r"mlp: fc1_bias must be \[N\] = \[12\]"),
        (lambda: fops.mlp(x, w1[:, :4], b1, w2, b2), RuntimeError,
         r"mlp: x and fc1_weight shapes cannot be multiplied"),
        (lambda: fops.mlp(x, w1, b1, w2, b2[:3]), RuntimeError, r"mlp: fc2_bias must be \[out_features\] = \[16\]"),
        (lambda: fops.mlp(x, w1, b1, w2.float(), b2), RuntimeError, r"mlp: fc2_weight must have x's dtype"),
        (lambda: fops.mlp(x, w1, b1, w2, b2, "gelu", r[:, :4]), RuntimeError,
         r"mlp: residual must have the output's shape \[5, 16\]"),
        (lambda: fops.mlp(x, w1, b1, w2, b2, "swiglu"), ValueError, r"mlp: activation must be one of none, relu"),
        (lambda: fops.mlp(x, w1, b1, 3.0, b2), TypeError, r"fc2_weight"),
    ]
    raises_with_and_without_native(monkeypatch, "mlp", messages, w1)


@pytest.mark.parametrize("activation", ["gelu", "squared_relu"])
def test_fused_mlp_plain_form_runs_the_mlp_op(activation):
    """FusedMLP's plain form is one mlp call (one node where the op is native), with nn.Sequential's values and
    gradients."""
    torch.manual_seed(4)
    act = {"gelu": torch.nn.GELU(), "squared_relu": None}[activation]
    mlp = fnn.FusedMLP(16, 48, 24, activation=activation, dtype=torch.float64)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    out = mlp(x)
    if _native.has_op("mlp"):
        assert out.grad_fn.name() == "fusedkernels::MlpBackward"
    h = mlp.fc1(x)
    want = mlp.fc2(act(h) if act is not None else torch.relu(h) ** 2)
    assert max_err(out, want) < 1e-12
    dy = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, *mlp.parameters()], dy)
    theirs = torch.autograd.grad(want, [x, *mlp.parameters()], dy)
    assert all(max_err(o, t) < 1e-12 for o, t in zip(ours, theirs))


def _opcheck(device, dtype):
    ops = torch.ops.fusedkernels
    x, w1, b1, w2, b2, r = (t.requires_grad_() if t is not None else None
                            for t in _inputs((2, 9), 24, 40, 16, dtype, device, residual=True))
    for args in ((x, w1, b1, w2, b2, "gelu", r), (x.detach(), w1.detach(), None, w2, None, "silu", None)):
        torch.library.opcheck(ops.mlp, args)
    torch.library.opcheck(ops.mlp_fwd, (x, w1, b1, w2, b2, ACTIVATIONS.index("gelu_tanh"), r))
    z = torch.randn(2, 9, 40, device=device, dtype=dtype)
    for act in ACTS:
        dy = torch.randn(2, 9, 16, device=device, dtype=dtype)
        torch.library.opcheck(ops.act_dgrad, (dy, w2.detach(), z, ACTIVATIONS.index(act)))


@needs_native
def test_opcheck_cpu():
    _opcheck("cpu", torch.float32)


@pytest.mark.cuda
@needs_native
def test_opcheck_cuda():
    _opcheck("cuda", torch.bfloat16)


@needs_native
def test_act_dgrad_rejects_what_it_cannot_take():
    ops = torch.ops.fusedkernels
    dy, w, z = torch.randn(4, 8), torch.randn(8, 16), torch.randn(4, 16)
    with pytest.raises(ValueError, match="act_dgrad: activation none has no derivative"):
        ops.act_dgrad(dy, w, z, ACTIVATIONS.index("none"))
    with pytest.raises(ValueError, match="act_dgrad: activation must be a gemm::Activation value"):
        ops.act_dgrad(dy, w, z, 9)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("shape", [((17,), 24, 136, 40), ((2, 500), 136, 264, 24), ((1000,), 64, 1032, 4104)],
                         ids=str)
def test_kernel_mlp_grads(shape, activation, dtype):
    """mlp's output and six gradients (dz and fc1's bias gradient formed in the dgrad GEMM's epilogue) against the
    fp32 reference, within PyTorch's own error in the dtype; odd rows, hidden widths not whole 256-column tiles."""
    lead, k, n, out = shape
    tensors = _inputs(lead, k, n, out, dtype, "cuda", bias=True, residual=True)
    dy = torch.randn(*lead, out, device="cuda").to(dtype)
    ref = _grads(lambda *t: mlp_ref(*t[:5], activation, t[5]), [t.float() for t in tensors], dy.float())
    lowp = _grads(lambda *t: mlp_ref(*t[:5], activation, t[5]), tensors, dy)
    poison_allocator(*tensors, torch.empty(*lead, n, device="cuda", dtype=dtype))
    ours = _grads(_mlp(activation), tensors, dy)
    for name, o, f, t in zip(["out", "dx", "dw1", "db1", "dw2", "db2", "dr"], ours, ref, lowp):
        assert o.dtype == dtype and o.shape == f.shape, name
        assert_close_to_ref(o.float(), f, t.float(), name, floor=torch.finfo(dtype).eps)


def _act_backward64(dh, z, activation):
    z = z.detach().requires_grad_()
    with torch.enable_grad():
        a = PLAIN[activation](z)
        (slope,) = torch.autograd.grad(a, z, torch.ones_like(a))
    dz = dh * slope
    return dz, dz.sum(0)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_kernel_act_dgrad_matches_the_unfused_pass(dtype):
    """act_dgrad (the GEMM with act' and the column sums in its epilogue) against dh = dy @ W by PyTorch then
    act_backward's pass, both against float64. Weights contiguous, row views (rows 16 bytes apart: the kernel's) and
    rows 8 bytes apart (PyTorch's GEMM then); rows that end mid-tile, one row."""
    ops = torch.ops.fusedkernels
    for activation, pad in zip(ACTS, (0, 8, 4, 0, 8)):
        for rows, n, k in ((333, 136, 24), (64, 264, 4104), (1, 8, 8), (200, 520, 64)):
            z = (torch.randn(rows, n, device="cuda") * 2).to(dtype)
            dy = torch.randn(rows, k, device="cuda").to(dtype)
            w = (torch.randn(k, n + pad, device="cuda") / k**0.5).to(dtype)[:, :n]
            act = ACTIVATIONS.index(activation)
            want_dz, want_db = _act_backward64(dy.double() @ w.double(), z.double(), activation)
            unfused_dz, unfused_db = ops.act_backward(dy @ w, z, act)
            poison_allocator(z, z)
            dz, db = ops.act_dgrad(dy, w, z, act)
            where = f"{activation} {rows}x{n}x{k}"
            assert dz.dtype == dtype and db.dtype == dtype and db.shape == (n,), where
            assert_close_to_ref(dz.double(), want_dz, unfused_dz.double(), f"dz {where}", floor=torch.finfo(dtype).eps)
            assert_close_to_ref(db.double(), want_db, unfused_db.double(), f"db {where}", floor=torch.finfo(dtype).eps)
