"""fusedkernels.ops.linear_gated / nn.FusedMLP and their op layer.

As tests/test_gemm.py: CPU tests hold the op (its CPU kernel is the reference) to plain PyTorch and check the op
layer (errors, autograd, opcheck, compile, autocast) and the module (state_dict layouts, from_module). `cuda` tests
hold the fused kernel to an fp32 reference on fresh random inputs, with a tolerance relative to PyTorch's own
low-precision error, outputs poisoned first; the kernel tests with the Hopper kernel and the portable one.
"""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedkernels.nn as fnn
import fusedkernels.ops as fops
from fusedkernels import _native
from fusedkernels.ops.gemm import ACTIVATIONS, GATED_ACTIVATIONS, gated_mlp_ref, linear_gated_ref

from .helpers import assert_close_to_ref, check_graph_replays, grad_in_layout, max_err, poison_allocator
from .test_gemm import PLAIN, _grads, raises_as_the_native_op

needs_native = pytest.mark.skipif(not _native.has_op("linear_gated"), reason="needs the native gemm ops")
LOWP = [torch.float16, torch.bfloat16]
# The gate's activation of each gated unit (Shazeer 2020), written out independently of the package's table.
GATE = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}
TORCH_ACT = {"none": torch.nn.Identity, "relu": torch.nn.ReLU, "gelu": torch.nn.GELU,
             "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"), "silu": torch.nn.SiLU}


def _inputs(lead, k, n, dtype=torch.float64, device="cpu", bias=True, residual=False):
    """x [*lead, k], the stacked weight [2n, k] and bias [2n], residual [*lead, n]."""
    x = torch.randn(*lead, k, device=device).to(dtype)
    w = (torch.randn(2 * n, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(2 * n, device=device).to(dtype) if bias else None
    r = torch.randn(*lead, n, device=device).to(dtype) if residual else None
    return x, w, b, r


def _plain(activation):
    def fn(x, w, b, r):
        z = x @ w.t() + (b if b is not None else 0)
        n = w.shape[0] // 2
        return PLAIN[GATE[activation]](z[..., :n]) * z[..., n:] + (r if r is not None else 0)

    return fn


def _stacked_ref(x, w, b, r, activation):
    """The op's own reference, step for step: one F.linear over the stacked weight, then act(gate) * up."""
    gate, up = F.linear(x, w, b).chunk(2, -1)
    out = {"swiglu": F.silu, "geglu": F.gelu, "geglu_tanh": lambda z: F.gelu(z, approximate="tanh"),
           "reglu": F.relu}[activation](gate) * up
    return out if r is None else out + r


class LlamaMLP(torch.nn.Module):
    """transformers' LlamaMLP, as it is built: down_proj(act_fn(gate_proj(x)) * up_proj(x))."""

    def __init__(self, hidden_size, intermediate_size, act_fn=None, bias=False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)
        self.act_fn = torch.nn.SiLU() if act_fn is None else act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class NewGELUActivation(torch.nn.Module):
    """transformers' tanh GELU, written out (as its activations module does)."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * torch.pow(x, 3.0))))


# ------------------------------------------------------------------------------------------------
# linear_gated: semantics of the reference (CPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", GATED_ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_matches_plain_torch_with_grads(activation, bias, residual):
    x, w, b, r = _inputs((3, 5), 16, 24, bias=bias, residual=residual)
    dy = torch.randn(3, 5, 24, dtype=torch.float64)
    tensors = [x, w, b, r]
    ours = _grads(lambda x, w, b, r: fops.linear_gated(x, w, b, activation, r), tensors, dy)
    want = _grads(_plain(activation), tensors, dy)
    ref = _grads(lambda x, w, b, r: linear_gated_ref(x, w, b, activation, r), tensors, dy)
    names = ["out", "dx", "dw"] + ["db"] * bias + ["dr"] * residual
    assert len(ours) == len(names)
    for name, o, p, q in zip(names, ours, want, ref):
        assert o.dtype == torch.float64 and o.shape == p.shape, name
        assert max_err(o, p) < 1e-10 and max_err(o, q) < 1e-12, name


@pytest.mark.parametrize("lead", [(), (1,), (7,), (2, 3, 4), (0,), (2, 0)], ids=str)
def test_leading_dims_and_grads(lead):
    x, w, b, r = _inputs(lead, 8, 16, residual=True)
    dy = torch.randn(*lead, 16, dtype=torch.float64)
    ours = _grads(lambda *t: fops.linear_gated(*t[:3], "geglu", t[3]), (x, w, b, r), dy)
    want = _grads(lambda *t: linear_gated_ref(*t[:3], "geglu", t[3]), (x, w, b, r), dy)
    assert ours[0].shape == (*lead, 16)
    for o, p in zip(ours, want):
        assert o.shape == p.shape and max_err(o, p) < 1e-12


def test_non_contiguous_inputs():
    base = torch.randn(6, 5, 24, dtype=torch.float64)
    w, b = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    for x in (base[..., :8], base[..., ::3], base.transpose(0, 1)[..., 8:16], base[:, :1, :8].expand(6, 4, 8)):
        res = torch.randn(*x.shape[:-1], 32, dtype=torch.float64)[..., ::2]
        assert max_err(fops.linear_gated(x, w, b, "swiglu", res), linear_gated_ref(x, w, b, "swiglu", res)) < 1e-12
    wt = torch.randn(8, 32, dtype=torch.float64).t()  # a transposed weight
    assert max_err(fops.linear_gated(base[..., :8], wt, None, "reglu"), linear_gated_ref(base[..., :8], wt, None,
                                                                                        "reglu")) < 1e-12
    assert fops.linear_gated(base.transpose(0, 1)[..., :8], w, b).is_contiguous()


@pytest.mark.parametrize("activation", GATED_ACTIVATIONS)
def test_gradcheck_and_gradgradcheck_float64(activation):
    """The op's backward and, through create_graph, its second derivatives (the product has curvature for every
    gate)."""
    x, w, b, r = (t.requires_grad_() for t in _inputs((2, 3), 4, 5, residual=True))
    fn = lambda x, w, b, r: fops.linear_gated(x, w, b, activation, r)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, r))
    assert torch.autograd.gradgradcheck(fn, (x, w, b, r))


def test_no_grad_and_a_gradient_for_the_residual_only():
    x, w, b, _ = (t.requires_grad_() if t is not None else None for t in _inputs((4,), 8, 8))
    with torch.no_grad():
        assert fops.linear_gated(x, w, b).grad_fn is None
    r = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 8, dtype=torch.float64)
    (dr,) = torch.autograd.grad(fops.linear_gated(x.detach(), w.detach(), None, "reglu", r), r, dy)
    assert torch.equal(dr, dy)


@needs_native  # the native op's autograd node and internal op; without them PyTorch's ops differentiate
def test_backward_node_and_what_it_keeps():
    x, w, b, _ = (t.requires_grad_() if t is not None else None for t in _inputs((4,), 8, 8))
    out = fops.linear_gated(x, w, b, "swiglu")
    assert out.grad_fn.name() == "fusedkernels::LinearActBackward"
    dy = torch.randn(4, 8, dtype=torch.float64)
    # the internal op's z is [gate | up] = F.linear over the stacked weight; without it the backward recomputes it
    ops = torch.ops.fusedkernels
    silu = ACTIVATIONS.index("silu")
    out, z = ops.linear_act_fwd(x.detach(), w.detach(), b.detach(), silu, None, True, True)
    assert z.shape == (4, 16) and max_err(z, F.linear(x, w, b)) < 1e-12
    assert max_err(out, F.silu(z[:, :8]) * z[:, 8:]) < 1e-12
    out, z = ops.linear_act_fwd(x, w, b, silu, None, False, True)
    assert z.numel() == 0
    grads = torch.autograd.grad(out, (x, w, b), dy)
    want = torch.autograd.grad(linear_gated_ref(x, w, b, "swiglu"), (x, w, b), dy)
    assert all(max_err(g, h) < 1e-12 for g, h in zip(grads, want))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_backward_writes_dz_over_the_saved_pre_activation_only_when_released(device):
    """The backward writes the gated form's dz over its saved pre-activation (one [rows, 2N] buffer at the step's
    peak instead of two) when the graph is released; with retain_graph it allocates dz, so a second backward sees
    the pre-activation intact: the same gradients every time, equal to the functional pass's."""
    if not _native.has_op("linear_gated") or (device == "cuda" and not torch.cuda.is_available()):
        pytest.skip("needs the native gemm ops (and a GPU for cuda)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w, b, _ = _inputs((3, 7), 16, 24, dtype=dtype, device=device)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    out = fops.linear_gated(*leaves, "swiglu")
    dy = torch.randn_like(out)
    node = "fusedkernels::LinearActBackward"
    runs = []
    for retain in (True, True, False):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            runs.append(torch.autograd.grad(out, leaves, dy, retain_graph=retain))
        ops = {e.name for e in prof.events() if e.cpu_parent is not None and e.cpu_parent.name == node}
        assert ("fusedkernels::gated_backward_" in ops) != retain, (retain, ops)
    for grads in runs[1:]:
        assert all(torch.equal(g, h) for g, h in zip(grads, runs[0]))
    # a pre-activation someone else holds is not overwritten
    silu = ACTIVATIONS.index("silu")
    out, z = torch.ops.fusedkernels.linear_act_fwd(*leaves, silu, None, True, True)
    kept = z.detach().clone()
    torch.autograd.grad(out, leaves, dy)
    assert torch.equal(z.detach(), kept)


@pytest.mark.parametrize("gated", [True, False, "mlp"], ids=["linear_gated", "linear_act", "gated_mlp"])
def test_batched_output_gradients(gated):
    """is_grads_batched (autograd.functional.jacobian's vectorize): each output gradient's result, as one at a time."""
    x, w, b = (t.requires_grad_() for t in _inputs((2, 5), 8, 8)[:3])
    if gated == "mlp":  # (the down projection's weight a constant here)
        out = fops.gated_mlp(x, w, b, torch.randn(6, 8, dtype=torch.float64))
    else:
        out = fops.linear_gated(x, w, b, "swiglu") if gated else fops.linear_act(x, w[:8], b[:8], "gelu")
    dys = torch.randn(3, *out.shape, dtype=torch.float64)
    batched = torch.autograd.grad(out, (x, w, b), dys, retain_graph=True, is_grads_batched=True)
    for i in range(3):
        one = torch.autograd.grad(out, (x, w, b), dys[i], retain_graph=True)
        assert all(max_err(p[i], q) < 1e-12 for p, q in zip(batched, one))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_gated_backward_in_place_matches_the_functional_pass(device):
    if not _native.has_op("linear_gated") or (device == "cuda" and not torch.cuda.is_available()):
        pytest.skip("needs the native gemm ops (and a GPU for cuda)")
    ops = torch.ops.fusedkernels
    for dtype in (torch.float32, torch.bfloat16):
        for gate in GATE.values():
            z = (torch.randn(2, 333, 2 * 136, device=device) * 2).to(dtype)
            dy = torch.randn(2, 333, 136, device=device).to(dtype)
            want = ops.gated_backward(dy, z, ACTIVATIONS.index(gate))
            version = z._version
            ops.gated_backward_(dy, z, ACTIVATIONS.index(gate))
            assert torch.equal(z, want), (dtype, gate)
            assert z._version > version


def test_forward_mode_ad_and_jvp_of_grad_match_torch():
    x, w, b, r = _inputs((3,), 8, 8, residual=True)
    tx = torch.randn_like(x)
    ours = lambda x: fops.linear_gated(x, w, b, "geglu_tanh", r)  # noqa: E731
    ref = lambda x: linear_gated_ref(x, w, b, "geglu_tanh", r)  # noqa: E731
    assert max_err(torch.func.jvp(ours, (x,), (tx,))[1], torch.func.jvp(ref, (x,), (tx,))[1]) < 1e-12
    g_ours = torch.func.jvp(torch.func.grad(lambda x: ours(x).pow(2).sum()), (x,), (tx,))[1]
    g_ref = torch.func.jvp(torch.func.grad(lambda x: ref(x).pow(2).sum()), (x,), (tx,))[1]
    assert max_err(g_ours, g_ref) < 1e-10


def test_bad_inputs_raise_clear_errors():
    x, w, b, r = _inputs((3,), 8, 16, dtype=torch.float32, residual=True)
    with pytest.raises(ValueError, match="activation must be one of swiglu, geglu, geglu_tanh, reglu, got 'silu'"):
        fops.linear_gated(x, w, b, "silu")  # linear_act's names are not gated units
    with pytest.raises(RuntimeError, match=r"must stack the gate's rows and the up projection's.*\[31, 8\], an odd"):
        fops.linear_gated(x, w[:31], None)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        fops.linear_gated(x[:, :7], w, b)
    with pytest.raises(RuntimeError, match=r"weight must be \[2 \* out_features, in_features\]"):
        fops.linear_gated(x, w[0], None)
    with pytest.raises(RuntimeError, match="floating-point"):
        fops.linear_gated(x.int(), w.int(), None)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        fops.linear_gated(x, w.double(), None)
    with pytest.raises(RuntimeError, match=r"bias must be \[2 \* out_features\] = \[32\], got \[16\]"):
        fops.linear_gated(x, w, b[:16])  # one half's bias
    with pytest.raises(RuntimeError, match=r"residual must have the output's shape \[3, 16\]"):
        fops.linear_gated(x, w, b, "swiglu", torch.randn(3, 32))  # the stacked width is not the output's
    with pytest.raises(TypeError, match="activation"):
        fops.linear_gated(x, w, b, 1)
    with pytest.raises(TypeError):
        fops.linear_gated([1.0], w, b)
    # the reference (the fallback without the native module) refuses the same weights and names
    with pytest.raises(RuntimeError, match="must stack the gate's rows"):
        linear_gated_ref(x, w[:31])
    with pytest.raises(ValueError, match="activation must be one of swiglu"):
        linear_gated_ref(x, w, b, "gelu")
    with pytest.raises(NotImplementedError, match="strided"):
        fops.linear_gated(x.to_sparse(), w, None)


def test_cpu_calls_do_not_warn():
    x, w, b, r = _inputs((5,), 12, 20, dtype=torch.float32, residual=True)  # sizes without a CUDA kernel
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fops.linear_gated(x, w.t().contiguous().t(), b, "reglu", r)
        fops.linear_gated(x.bfloat16(), w.bfloat16(), b.bfloat16(), "geglu")


def test_without_native_module_ops_run_the_reference(monkeypatch):
    monkeypatch.setattr(_native, "has_op", lambda name: False)
    fallback = _native.public_op("linear_gated", linear_gated_ref, "the PyTorch reference")
    x, w, b, r = _inputs((2, 3), 8, 16, residual=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fallback(x, w, b, "geglu", r)
    assert max_err(out, linear_gated_ref(x, w, b, "geglu", r)) == 0.0


def _opcheck(device, dtype):
    ops = torch.ops.fusedkernels
    x, w, b, r = (t.requires_grad_() for t in _inputs((2, 9), 24, 40, dtype=dtype, device=device, residual=True))
    for args in ((x, w, b, "swiglu", r), (x, w, None, "reglu", None), (x.detach(), w.detach(), b, "geglu", r)):
        torch.library.opcheck(ops.linear_gated, args)
    strided = x.detach().transpose(0, 1)
    for save in (True, False):
        torch.library.opcheck(ops.linear_act_fwd, (x, w, b, ACTIVATIONS.index("gelu_tanh"), r, save, True))
        torch.library.opcheck(ops.linear_act_fwd, (strided, w.detach(), None, ACTIVATIONS.index("silu"), None, save,
                                                   True))
    z = torch.randn(2, 9, 48, device=device, dtype=dtype)
    for gate in GATE.values():  # the backward's pass, and its in-place form
        dy = torch.randn(2, 9, 24, device=device, dtype=dtype)
        torch.library.opcheck(ops.gated_backward, (dy, z, ACTIVATIONS.index(gate)))
        torch.library.opcheck(ops.gated_backward_, (dy, z.clone(), ACTIVATIONS.index(gate)))
    wd = (torch.randn(16, 40, device=device) / 6).to(dtype).requires_grad_()  # [out, N]: N = 40 as w's halves
    bd = torch.randn(16, device=device).to(dtype).requires_grad_()
    r16 = torch.randn(2, 9, 16, device=device).to(dtype)
    for args in ((x, w, b, wd, bd, "swiglu", r16), (x.detach(), w.detach(), None, wd, None, "geglu_tanh", None)):
        torch.library.opcheck(ops.gated_mlp, args)
    torch.library.opcheck(ops.gated_mlp_fwd, (x, w, b, wd, bd, ACTIVATIONS.index("silu"), r16))
    z = torch.randn(2, 9, 80, device=device, dtype=dtype)
    for gate in GATE.values():  # the fused MLP backward's GEMM, and its in-place form
        dy = torch.randn(2, 9, 16, device=device, dtype=dtype)
        torch.library.opcheck(ops.gated_dgrad, (dy, wd.detach(), z, ACTIVATIONS.index(gate)))
        torch.library.opcheck(ops.gated_dgrad_, (dy, wd.detach(), z.clone(), ACTIVATIONS.index(gate)))


def test_opcheck_cpu():
    if not _native.has_op("linear_gated"):
        pytest.skip("needs the custom ops")
    _opcheck("cpu", torch.float32)


def test_torch_compile_fullgraph_matches_eager():
    x, w, b, r = _inputs((4, 9), 16, 24, dtype=torch.float32, residual=True)

    def f(x, w, b, r):
        return fops.linear_gated(x, w, b, "swiglu", r).square().sum()

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
        loss = fn(*leaves)
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    eager = grads(f)
    compiled = grads(torch.compile(f, fullgraph=True))
    for a, c in zip(compiled, eager):
        assert max_err(a, c) <= 1e-5 * max(c.abs().max().item(), 1.0)
    dynamic = torch.compile(lambda x: fops.linear_gated(x, w, b, "geglu"), fullgraph=True, dynamic=True)
    for m in (3, 5, 11):
        xm = torch.randn(m, 16)
        assert max_err(dynamic(xm), linear_gated_ref(xm, w, b, "geglu")) < 1e-5


def test_cpu_autocast_casts_like_torch_linear():
    x, w, b, r = _inputs((4,), 16, 24, dtype=torch.float32, residual=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fops.linear_gated(x, w, b, "swiglu", r.bfloat16())
        wide = fops.linear_gated(x, w, b, "swiglu", r)  # a float32 residual stream: added after, promoted
        torch_linear = F.linear(x, w, b)
    assert ours.dtype == torch_linear.dtype == torch.bfloat16 and wide.dtype == torch.float32
    bf16 = [t.bfloat16() for t in (x, w, b, r)]
    assert max_err(ours, _stacked_ref(*bf16, "swiglu")) == 0.0
    assert max_err(wide, _stacked_ref(*bf16[:3], None, "swiglu").float() + r) == 0.0


# ------------------------------------------------------------------------------------------------
# FusedMLP (CPU)
# ------------------------------------------------------------------------------------------------


def _sequential(activation, in_f=16, hidden=48, out_f=24, bias=True, dtype=None):
    return torch.nn.Sequential(torch.nn.Linear(in_f, hidden, bias, dtype=dtype), TORCH_ACT[activation](),
                               torch.nn.Linear(hidden, out_f, bias, dtype=dtype))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu", "none"])
def test_plain_mlp_is_sequential_linear_act_linear(activation):
    torch.manual_seed(5)
    seq = _sequential(activation)
    torch.manual_seed(5)
    mlp = fnn.FusedMLP(16, 48, 24, activation=activation)
    # nn.Linear's initialisation, in nn.Sequential's order
    assert list(mlp.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert all(torch.equal(a, c) for a, c in zip(seq.state_dict().values(), mlp.state_dict().values()))
    x, res, dy = torch.randn(2, 3, 16), torch.randn(2, 3, 24), torch.randn(2, 3, 24)
    ours = _grads(lambda x, r: mlp(x, r), [x, res], dy)
    want = _grads(lambda x, r: seq(x) + r, [x, res], dy)
    assert all(max_err(o, t) < 1e-5 for o, t in zip(ours, want))
    loss = (mlp(x) * dy).sum()
    loss.backward()
    (seq(x) * dy).sum().backward()
    for p, q in zip(seq.parameters(), mlp.parameters()):
        assert max_err(p.grad, q.grad) < 1e-5


@pytest.mark.parametrize("activation", GATED_ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gated_mlp_is_llama_mlp(activation, bias):
    llama = LlamaMLP(16, 40, TORCH_ACT[GATE[activation]](), bias=bias, dtype=torch.float64)
    mlp = fnn.FusedMLP(16, 40, activation=activation, bias=bias, dtype=torch.float64)
    assert list(mlp.state_dict()) == ["gate_up_proj.weight"] + ["gate_up_proj.bias"] * bias + \
        ["down_proj.weight"] + ["down_proj.bias"] * bias
    mlp.load_state_dict(llama.state_dict())
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([llama.gate_proj.weight, llama.up_proj.weight]))
    x, res, dy = (torch.randn(3, 5, 16, dtype=torch.float64) for _ in range(3))
    ours = _grads(lambda x, r: mlp(x, r), [x, res], dy)
    want = _grads(lambda x, r: llama(x) + r, [x, res], dy)
    assert all(max_err(o, t) < 1e-12 for o, t in zip(ours, want))
    (mlp(x) * dy).sum().backward()
    (llama(x) * dy).sum().backward()
    grad_gate, grad_up = mlp.gate_up_proj.weight.grad.chunk(2)
    assert max_err(grad_gate, llama.gate_proj.weight.grad) < 1e-12
    assert max_err(grad_up, llama.up_proj.weight.grad) < 1e-12
    assert max_err(mlp.down_proj.weight.grad, llama.down_proj.weight.grad) < 1e-12


def _mlp_inputs(lead, k, n, out, dtype=torch.float64, device="cpu", bias=True, residual=False):
    """x [*lead, k], the stacked gate | up weight [2n, k] and bias [2n], the down weight [out, n] and bias [out],
    residual [*lead, out]."""
    x, w, b, _ = _inputs(lead, k, n, dtype, device, bias)
    wd = (torch.randn(out, n, device=device) / n**0.5).to(dtype)
    bd = torch.randn(out, device=device).to(dtype) if bias else None
    r = torch.randn(*lead, out, device=device).to(dtype) if residual else None
    return x, w, b, wd, bd, r


def _mlp(activation):
    return lambda x, w, b, wd, bd, r: torch.ops.fusedkernels.gated_mlp(x, w, b, wd, bd, activation, r)


@needs_native
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_gated_mlp_is_one_node_with_the_fused_dgrad(device):
    """gated_mlp with a gradient to compute: one node, whose released backward forms dz over the saved
    pre-activation (gated_dgrad_) and whose retained one allocates it (gated_dgrad): the same gradients each time,
    the composition's (linear_gated, then linear_act) within rounding."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float64
    tensors = _mlp_inputs((3, 7), 16, 24, 32, dtype, device, bias=True, residual=True)
    leaves = [t.requires_grad_() for t in tensors]
    out = _mlp("swiglu")(*leaves)
    assert out.grad_fn.name() == "fusedkernels::GatedMlpBackward"
    dy = torch.randn_like(out)
    runs = []
    for retain in (True, True, False):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            runs.append(torch.autograd.grad(out, leaves, dy, retain_graph=retain))
        ops = {e.name for e in prof.events() if e.cpu_parent is not None
               and e.cpu_parent.name == "fusedkernels::GatedMlpBackward"}
        assert ("fusedkernels::gated_dgrad_" if not retain else "fusedkernels::gated_dgrad") in ops, (retain, ops)
        assert "fusedkernels::gated_backward" not in ops and "fusedkernels::gated_backward_" not in ops
    for grads in runs[1:]:
        assert all(torch.equal(g, h) for g, h in zip(grads, runs[0]))
    composed = [t.detach().clone().requires_grad_() for t in tensors]
    h = fops.linear_gated(composed[0], composed[1], composed[2], "swiglu")
    want = torch.autograd.grad(fops.linear_act(h, composed[3], composed[4], "none", composed[5]), composed, dy)
    tol = 1e-12 if dtype == torch.float64 else 0.02
    for name, g, w in zip(["dx", "dw", "db", "dwd", "dbd", "dr"], runs[0], want):
        assert max_err(g, w) <= tol * max(w.abs().max().item(), 1.0), name
    # without a gradient, no node: the two ops' kernels, nothing kept
    with torch.no_grad():
        assert _mlp("swiglu")(*tensors).grad_fn is None


@needs_native
@pytest.mark.parametrize("activation", GATED_ACTIVATIONS)
def test_gated_mlp_gradcheck_and_gradgradcheck_float64(activation):
    """Every input differentiable, to second order (create_graph recomputes z and h from the inputs)."""
    tensors = [t.requires_grad_() for t in _mlp_inputs((2, 3), 8, 8, 16, residual=True)]
    if activation == "reglu":  # keep the gate away from relu's kink, where finite differences fail
        with torch.no_grad():
            tensors[0].add_(torch.sign(tensors[0]) * 0.1)
    torch.autograd.gradcheck(_mlp(activation), tensors)
    torch.autograd.gradgradcheck(_mlp(activation), tensors)


def test_gated_mlp_routes_as_its_two_ops_and_names_its_arguments(monkeypatch):
    """No gradient or a residual of another dtype: the two ops' results (the residual promoted); bad arguments raise
    naming gated_mlp's own arguments, with the same exception types with and without the native op."""
    x, w, b, wd, bd, r = _mlp_inputs((5,), 8, 8, 16, residual=True)
    assert max_err(fops.gated_mlp(x, w, b, wd, bd, "geglu", r.float()), gated_mlp_ref(x, w, b, wd, bd, "geglu", r)) < 1e-6
    messages = [
        (lambda: fops.gated_mlp(x, w, b, wd[:, :4], bd), RuntimeError,
         r"gated_mlp: down_weight must be \[out_features, N\], N the hidden width \(gate_up_weight is \[2 \* N, "
         r"in_features\] = \[16, 8\]\), got \[16, 4\]"),
        (lambda: fops.gated_mlp(x, w, b[:3], wd, bd), RuntimeError, r"gated_mlp: gate_up_bias must be \[2 \* N\] = \[16\]"),
        (lambda: fops.gated_mlp(x, w[:, :4], b, wd, bd), RuntimeError,
         r"gated_mlp: x and gate_up_weight shapes cannot be multiplied"),
        (lambda: fops.gated_mlp(x, w, b, wd, bd[:3]), RuntimeError, r"gated_mlp: down_bias must be \[out_features\] = \[16\]"),
        (lambda: fops.gated_mlp(x, w, b, wd.float(), bd), RuntimeError, r"gated_mlp: down_weight must have x's dtype"),
        (lambda: fops.gated_mlp(x, w, b, wd, bd, "swiglu", r[:, :4]), RuntimeError,
         r"gated_mlp: residual must have the output's shape \[5, 16\]"),
        (lambda: fops.gated_mlp(x, w, b, wd, bd, "gelu"), ValueError, r"gated_mlp: activation must be one of swiglu"),
        (lambda: fops.gated_mlp(x, w, b, 3.0, bd), TypeError, r"down_weight"),
    ]
    raises_with_and_without_native(monkeypatch, "gated_mlp", messages, w)


def raises_with_and_without_native(monkeypatch, op, messages, weight):
    """Each (call, exception type, pattern) of `messages` raises through fops.<op>: with the native op (where this
    build has it), then with the checked reference in its place; the RuntimeErrors also with `weight` requiring a
    gradient (the MLP ops' one-node path checks before it routes)."""
    runs = ["native", "without"] if _native.has_op(op) else ["without"]
    for run in runs:
        if run == "without":
            monkeypatch.setattr(_native, "has_op", lambda name: False)
            monkeypatch.setattr(fops.gemm, f"_{op}", _native.public_op(op, getattr(fops.gemm, f"_{op}_without_native"),
                                                                      "the PyTorch reference"))
        for call, kind, pattern in messages:
            with pytest.raises(kind, match=pattern):
                call()
            if kind is RuntimeError:
                with pytest.raises(kind, match=pattern):
                    with torch.enable_grad():
                        weight.requires_grad_(True)
                        try:
                            call()
                        finally:
                            weight.requires_grad_(False)


def test_fused_mlp_under_torch_func_transforms_runs_the_reference():
    """vmap (per-sample gradients) over FusedMLP, gated and plain: the references, no warning, the values of a loop."""
    for activation in ("swiglu", "gelu"):
        mlp = fnn.FusedMLP(8, 16, activation=activation, dtype=torch.float64)
        x = torch.randn(5, 3, 8, dtype=torch.float64)
        params = dict(mlp.named_parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            batched = torch.func.vmap(mlp)(x)
            grads = torch.func.vmap(torch.func.grad(lambda p, xi: torch.func.functional_call(mlp, p, xi).sum()),
                                    in_dims=(None, 0))(params, x)
        assert max_err(batched, torch.stack([mlp(xi) for xi in x])) < 1e-12
        for i in range(5):
            one = torch.autograd.grad(mlp(x[i]).sum(), list(params.values()))
            assert all(max_err(grads[name][i], g) < 1e-12 for name, g in zip(params, one))


@needs_native  # the scripted forward calls torch.ops.fusedkernels.linear_gated / linear_act
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_torchscript_of_the_mlp(activation):
    """torch.jit.script compiles the projections FusedMLP has (plain or gated): the eager outputs, with a residual
    too."""
    mlp = fnn.FusedMLP(16, 40, activation=activation)
    scripted = torch.jit.script(mlp)
    x, res = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    assert max_err(scripted(x), mlp(x)) == 0.0 and max_err(scripted(x, res), mlp(x, res)) == 0.0


def test_gated_mlp_initialises_as_nn_linear():
    """Without biases, the stacked weight draws exactly what gate_proj and up_proj draw in turn."""
    torch.manual_seed(2)
    llama = LlamaMLP(32, 64)
    torch.manual_seed(2)
    mlp = fnn.FusedMLP(32, 64, bias=False, activation="swiglu")
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([llama.gate_proj.weight, llama.up_proj.weight]))
    assert torch.equal(mlp.down_proj.weight, llama.down_proj.weight)
    biased = fnn.FusedMLP(32, 64, activation="geglu")
    assert biased.gate_up_proj.bias.abs().max() <= 32**-0.5 and biased.down_proj.bias.abs().max() <= 64**-0.5


def test_state_dicts_round_trip_both_layouts():
    seq = _sequential("gelu")
    plain = fnn.FusedMLP(16, 48, 24, activation="gelu", state_dict_layout="sequential")
    plain.load_state_dict(seq.state_dict())
    assert list(plain.state_dict()) == list(seq.state_dict())
    back = _sequential("gelu")
    back.load_state_dict(plain.state_dict())  # strict: the same keys
    assert all(torch.equal(a, c) for a, c in zip(seq.state_dict().values(), back.state_dict().values()))

    llama = LlamaMLP(16, 40, bias=True)
    gated = fnn.FusedMLP(16, 40, activation="swiglu", state_dict_layout="llama")
    gated.load_state_dict(llama.state_dict())
    assert list(gated.state_dict()) == list(llama.state_dict())
    # through a file, as a checkpoint goes
    buffer = io.BytesIO()
    torch.save(gated.state_dict(), buffer)
    buffer.seek(0)
    back = LlamaMLP(16, 40, bias=True)
    back.load_state_dict(torch.load(buffer))
    assert all(torch.equal(a, c) for a, c in zip(llama.state_dict().values(), back.state_dict().values()))

    # every layout loads whatever state_dict_layout says; the native one round-trips too
    native = fnn.FusedMLP(16, 40, activation="swiglu")
    native.load_state_dict(gated.state_dict())
    other = fnn.FusedMLP(16, 40, activation="swiglu", state_dict_layout="llama")
    other.load_state_dict(native.state_dict())
    assert torch.equal(other.gate_up_proj.weight, native.gate_up_proj.weight)
    native_plain = fnn.FusedMLP(16, 48, 24, activation="gelu")
    native_plain.load_state_dict(seq.state_dict())
    assert torch.equal(native_plain.fc2.weight, seq[2].weight)


def test_layouts_inside_a_model_and_wrong_layouts():
    """The keys carry the parent's prefix; a layout that does not fit the module is a strict-load error."""
    parent = torch.nn.ModuleDict({"mlp": LlamaMLP(16, 40), "head": torch.nn.Linear(16, 4)})
    fused = torch.nn.ModuleDict({"mlp": fnn.FusedMLP.from_module(parent["mlp"]), "head": torch.nn.Linear(16, 4)})
    fused.load_state_dict(parent.state_dict())
    assert list(fused.state_dict()) == list(parent.state_dict())
    x = torch.randn(7, 16)
    assert max_err(fused["mlp"](x), parent["mlp"](x)) < 1e-5
    gated = fnn.FusedMLP(16, 48, 24, activation="swiglu")
    with pytest.raises(RuntimeError, match="Missing key.*gate_up_proj.weight"):
        gated.load_state_dict(_sequential("silu").state_dict())
    plain = fnn.FusedMLP(16, 40, activation="silu")
    with pytest.raises(RuntimeError, match="Unexpected key.*gate_proj.weight"):
        plain.load_state_dict(LlamaMLP(16, 40).state_dict())
    with pytest.raises(RuntimeError, match="size mismatch for gate_proj.weight"):  # the dict's keys, as LlamaMLP's
        fnn.FusedMLP(16, 32, activation="swiglu").load_state_dict(LlamaMLP(16, 40).state_dict(), strict=False)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_load_state_dict_reports_keys_in_the_modules_layout(bias):
    """What is missing or the wrong size is reported as the module the FusedMLP replaces reports it."""
    seq = fnn.FusedMLP(4, 6, activation="gelu", state_dict_layout="sequential")
    keys = seq.load_state_dict({"0.weight": torch.zeros(6, 4)}, strict=False)
    assert keys.missing_keys == ["0.bias", "2.weight", "2.bias"] and not keys.unexpected_keys
    assert torch.equal(seq.state_dict()["0.weight"], torch.zeros(6, 4))
    llama = fnn.FusedMLP(4, 6, activation="swiglu", bias=bias, state_dict_layout="llama")
    before = llama.state_dict()
    keys = llama.load_state_dict({"up_proj.weight": torch.ones(6, 4), "down_proj.weight": torch.ones(4, 6)},
                                 strict=False)
    want = ["gate_proj.weight"] + ["gate_proj.bias", "up_proj.bias", "down_proj.bias"] * bias  # LlamaMLP's order
    assert keys.missing_keys == want and not keys.unexpected_keys
    after = llama.state_dict()
    assert torch.equal(after["gate_proj.weight"], before["gate_proj.weight"])
    assert torch.equal(after["up_proj.weight"], torch.ones(6, 4))
    with pytest.raises(RuntimeError, match=r"size mismatch for up_proj.weight: copying a param with shape "
                                           r"torch.Size\(\[5, 4\]\)"):
        llama.load_state_dict({**before, "up_proj.weight": torch.zeros(5, 4)})


def test_module_copies_keep_their_layout():
    mlp = fnn.FusedMLP(16, 40, activation="reglu", state_dict_layout="llama")
    keys = list(mlp.state_dict())
    buffer = io.BytesIO()
    torch.save(mlp, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(mlp), torch.load(buffer, weights_only=False)):
        assert list(copied.state_dict()) == keys
        llama = LlamaMLP(16, 40, bias=True)
        copied.load_state_dict(llama.state_dict())
        assert torch.equal(copied.down_proj.weight, llama.down_proj.weight)
        assert not torch.equal(mlp.down_proj.weight, llama.down_proj.weight)  # the copy's, not the original's


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu", "none"])
def test_from_sequential(activation):
    seq = _sequential(activation, dtype=torch.float64)
    mlp = fnn.FusedMLP.from_module(seq)
    assert (mlp.activation, mlp.gated, mlp.state_dict_layout) == (activation, False, "sequential")
    assert mlp.fc1.weight.dtype == torch.float64
    assert list(mlp.state_dict()) == list(seq.state_dict())
    x = torch.randn(4, 16, dtype=torch.float64)
    assert max_err(mlp(x), seq(x)) < 1e-12
    assert mlp.fc1.weight is not seq[0].weight and torch.equal(mlp.fc1.weight, seq[0].weight)  # a copy


@pytest.mark.parametrize("act_fn, activation", [(torch.nn.SiLU(), "swiglu"), (torch.nn.GELU(), "geglu"),
                                                (NewGELUActivation(), "geglu_tanh"), (torch.nn.ReLU(), "reglu")],
                         ids=["silu", "gelu", "new_gelu", "relu"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_from_llama_mlp(act_fn, activation, bias):
    llama = LlamaMLP(16, 40, act_fn, bias=bias, dtype=torch.float64)
    mlp = fnn.FusedMLP.from_module(llama)
    assert (mlp.activation, mlp.gated, mlp.hidden_features, mlp.out_features) == (activation, True, 40, 16)
    assert mlp.gate_up_proj.weight.dtype == torch.float64 and (mlp.down_proj.bias is not None) == bias
    assert list(mlp.state_dict()) == list(llama.state_dict())
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    assert max_err(mlp(x), llama(x)) < 1e-12
    assert "state_dict_layout='llama'" in repr(mlp)


def test_from_module_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match=r"\(nn.Linear, activation, nn.Linear\)"):
        fnn.FusedMLP.from_module(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Dropout(),
                                                     torch.nn.Linear(16, 8)))
    with pytest.raises(ValueError, match="biases on every projection or none"):
        fnn.FusedMLP.from_module(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                                     torch.nn.Linear(16, 8, bias=False)))
    with pytest.raises(ValueError, match="do not chain"):
        fnn.FusedMLP.from_module(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(12, 8)))
    quick_gelu = LlamaMLP(8, 16, act_fn=lambda x: x * torch.sigmoid(1.702 * x))
    with pytest.raises(ValueError, match="matches none of the activations swiglu, geglu, geglu_tanh, reglu"):
        fnn.FusedMLP.from_module(quick_gelu)
    approximated = fnn.FusedMLP.from_module(quick_gelu, activation="geglu")  # the caller's choice
    assert approximated.activation == "geglu"
    with pytest.raises(ValueError, match="takes one of swiglu"):
        fnn.FusedMLP.from_module(LlamaMLP(8, 16), activation="silu")
    with pytest.raises(ValueError, match="expected nn.Sequential"):
        fnn.FusedMLP.from_module(torch.nn.Linear(8, 8))
    mixed = torch.nn.Sequential(torch.nn.Linear(8, 16).double(), torch.nn.GELU(), torch.nn.Linear(16, 8))
    with pytest.raises(ValueError, match="share one dtype and device.*torch.float32 on cpu, torch.float64 on cpu"):
        fnn.FusedMLP.from_module(mixed)  # (the original raises on any input: it is not silently made to run)


def test_constructor_arguments():
    mlp = fnn.FusedMLP(16, 64)
    assert (mlp.out_features, mlp.activation, mlp.gated, mlp.fc1.bias is not None) == (16, "gelu", False, True)
    assert fnn.FusedMLP(16, 64, 8, False, "swiglu", device="cpu", dtype=torch.float64).down_proj.weight.shape == (8, 64)
    with pytest.raises(TypeError, match="bias must be a bool"):
        fnn.FusedMLP(16, 64, 16, "relu")
    with pytest.raises(ValueError, match="activation must be one of none, relu.* or gated swiglu"):
        fnn.FusedMLP(16, 64, activation="glu")
    with pytest.raises(TypeError, match="FusedMLP: activation must be a str, got NoneType"):
        fnn.FusedMLP(16, 64, activation=None)
    with pytest.raises(ValueError, match="'llama' does not fit activation 'gelu'"):
        fnn.FusedMLP(16, 64, activation="gelu", state_dict_layout="llama")
    with pytest.raises(ValueError, match="'sequential' does not fit"):
        fnn.FusedMLP(16, 64, activation="swiglu", state_dict_layout="sequential")
    with pytest.raises(ValueError, match="state_dict_layout must be one of native, sequential, llama"):
        fnn.FusedMLP(16, 64, state_dict_layout="hf")


def test_mlp_compiles_and_autocasts():
    mlp = fnn.FusedMLP(16, 32, activation="swiglu")
    x, res = torch.randn(5, 16), torch.randn(5, 16)
    compiled = torch.compile(mlp, fullgraph=True)
    assert max_err(compiled(x, res), mlp(x, res)) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(x)
    assert out.dtype == torch.bfloat16 and max_err(out, mlp(x)) < 5e-2


def test_export_of_the_module():
    from torch.export import Dim, export

    model = torch.nn.Sequential(fnn.FusedMLP(16, 40, activation="swiglu"),
                                fnn.FusedMLP(16, 32, 8, activation="squared_relu"))
    x = torch.randn(5, 16)
    program = export(model, (x,), dynamic_shapes=({0: Dim("rows")},))
    x7 = torch.randn(7, 16)
    assert max_err(program.module()(x7), model(x7)) < 1e-6


@needs_native  # fx traces the native op as one call; the reference's checks are Python control flow
def test_fx_trace_of_the_module():
    model = torch.nn.Sequential(fnn.FusedMLP(16, 40, activation="swiglu"),
                                fnn.FusedMLP(16, 32, 8, activation="squared_relu"))
    x = torch.randn(5, 16)
    traced = torch.fx.symbolic_trace(model)
    assert max_err(traced(x), model(x)) == 0.0


# ------------------------------------------------------------------------------------------------
# The fused kernel (CUDA): against the fp32 reference, tolerance from PyTorch's own low-precision error
# ------------------------------------------------------------------------------------------------

# (leading dims, K, N), N the output's (the weight has 2N rows): M odd, batched leading dims, N not a multiple of
# the tile's 128 output columns (8, 136, 4104), K not of 64
SMALL_SHAPES = [((1,), 8, 8), ((17,), 24, 136), ((2, 500), 136, 24)]
# the Hopper kernel (gated tiles are always its 256-wide ping-pong ones) and the portable one, forced
KERNELS = pytest.mark.parametrize("kernels", ["default", "portable"], indirect=True)
LARGE_SHAPES = [((4097,), 4104, 136), ((1000,), 136, 4104), ((3, 17), 4104, 24), ((4097,), 24, 8)]


def _check_forward(x, w, b, r, activation, name="out"):
    """ours against the fp32 reference, within twice PyTorch's own error in x's dtype plus one ulp of the largest
    output."""
    f32 = [t.float() if t is not None else None for t in (x, w, b, r)]
    ref = linear_gated_ref(*f32[:3], activation, f32[3])
    lowp = linear_gated_ref(x, w, b, activation, r)
    poison_allocator(lowp, lowp)
    ours = fops.linear_gated(x, w, b, activation, r)
    assert ours.dtype == x.dtype and ours.shape == ref.shape and ours.is_contiguous()
    assert_close_to_ref(ours.float(), ref, lowp.float(), name, floor=torch.finfo(x.dtype).eps)
    return ours


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("activation", GATED_ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
@KERNELS
def test_kernel_forward_every_activation(shape, residual, bias, activation, dtype, kernels):
    lead, k, n = shape
    _check_forward(*_inputs(lead, k, n, dtype, "cuda", bias, residual), activation)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("save", [False, True], ids=["one_pass", "saved_z"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@KERNELS
def test_kernel_internal_gated_op_takes_every_activation(activation, save, residual, kernels):
    """linear_act_fwd with gated=True takes any activation index (the public ops pass the four gates' only): out =
    act(z_gate) * z_up (+ residual), z rounded to the dtype first, by the one-pass epilogue (no saved z) and the
    two-pass one; a hidden width that ends mid-tile."""
    x, w, b, r = _inputs((333,), 136, 200, torch.bfloat16, "cuda", True, residual)

    def ref(x, w, b, r):
        gate, up = F.linear(x, w, b).to(x.dtype).chunk(2, -1)
        out = PLAIN[activation](gate) * up
        return out if r is None else out + r

    f32 = [t.float() if t is not None else None for t in (x, w, b, r)]
    poison_allocator(*(torch.empty(333, cols, device="cuda", dtype=x.dtype) for cols in (200, 400)))
    out, z = torch.ops.fusedkernels.linear_act_fwd(x, w, b, ACTIVATIONS.index(activation), r, save, True)
    assert_close_to_ref(out.float(), ref(*f32), ref(x, w, b, r).float(), activation, floor=torch.finfo(x.dtype).eps)
    assert z.numel() == (333 * 400 if save else 0)


@pytest.mark.cuda
@needs_native
@KERNELS
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_kernel_one_pass_and_two_passes_give_the_same_bits(dtype, kernels):
    """No grad (the one pass, nothing saved) and with grad (z saved, then the second pass): out = act(z_gate) * z_up
    + residual alike, bit for bit."""
    x, w, b, r = _inputs((333,), 520, 1032, dtype, "cuda", True, True)
    for activation in GATED_ACTIVATIONS:
        with torch.no_grad():
            one_pass = fops.linear_gated(x, w, b, activation, r)
        two_passes = fops.linear_gated(x.detach().requires_grad_(), w, b, activation, r)
        assert torch.equal(one_pass, two_passes.detach()), activation


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
@KERNELS
def test_kernel_forward_large_and_odd_sizes(shape, activation, dtype, kernels):
    lead, k, n = shape
    _check_forward(*_inputs(lead, k, n, dtype, "cuda", True, activation == "geglu"), activation)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@KERNELS
def test_kernel_strided_x_and_residual(dtype, kernels):
    k, n = 136, 24
    base = torch.randn(1000, k + 8, device="cuda").to(dtype)
    w, b = (torch.randn(2 * n, k, device="cuda") / k**0.5).to(dtype), torch.randn(2 * n, device="cuda").to(dtype)
    res = torch.randn(1000, n + 16, device="cuda").to(dtype)[:, 8 : 8 + n]
    _check_forward(base[:, :k], w, b, res, "swiglu", "row stride k + 8")
    _check_forward(base[:, 8:], w, b, None, "geglu", "offset 8")
    odd = torch.randn(17, k + 4, device="cuda").to(dtype)[:, :k]  # rows 8-byte aligned only: copied
    _check_forward(odd, w, b, None, "reglu", "row stride k + 4")
    batched = torch.randn(5, 3, k, device="cuda").to(dtype).transpose(0, 1)
    _check_forward(batched, w, b, None, "geglu_tanh", "transposed leading dims")
    stacked = torch.randn(4 * n, k, device="cuda").to(dtype)[: 2 * n] / k**0.5  # a view of a larger weight
    _check_forward(base[:, :k], stacked, None, None, "swiglu", "weight view")


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("activation", GATED_ACTIVATIONS)
@pytest.mark.parametrize("shape", [((17,), 24, 136), ((2, 500), 136, 40)], ids=str)
def test_kernel_pre_activation_and_grads(shape, activation, dtype):
    """The kernel's [gate | up] pre-activation is F.linear's over the stacked weight (up to rounding), and the
    gradients computed from it match the fp32 reference as closely as PyTorch's own in the same dtype."""
    lead, k, n = shape
    x, w, b, r = _inputs(lead, k, n, dtype, "cuda", True, True)
    gate = ACTIVATIONS.index(GATE[activation])
    poison_allocator(r, torch.empty(*lead, 2 * n, device="cuda", dtype=dtype))
    out, z = torch.ops.fusedkernels.linear_act_fwd(x, w, b, gate, r, True, True)
    assert z.shape == (*lead, 2 * n)
    assert_close_to_ref(z.float(), F.linear(x.float(), w.float(), b.float()), F.linear(x, w, b).float(),
                        "pre_activation", floor=torch.finfo(dtype).eps)
    dy = torch.randn(*lead, n, device="cuda").to(dtype)
    tensors = (x, w, b, r)
    ref = _grads(lambda *t: linear_gated_ref(*t[:3], activation, t[3]), [t.float() for t in tensors], dy.float())
    lowp = _grads(lambda *t: linear_gated_ref(*t[:3], activation, t[3]), tensors, dy)
    poison_allocator(x, w, b, r, r)
    ours = _grads(lambda *t: fops.linear_gated(*t[:3], activation, t[3]), tensors, dy)
    for name, o, f, t in zip(["out", "dx", "dw", "db", "dr"], ours, ref, lowp):
        assert o.dtype == dtype and o.shape == f.shape, name
        assert_close_to_ref(o.float(), f, t.float(), name, floor=torch.finfo(dtype).eps)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("activation", GATED_ACTIVATIONS)
@pytest.mark.parametrize("shape", [((17,), 24, 136, 40), ((2, 500), 136, 264, 24), ((1000,), 64, 1032, 4104)],
                         ids=str)
def test_kernel_gated_mlp_grads(shape, activation, dtype):
    """gated_mlp's output and six gradients (dz formed in the dgrad GEMM's epilogue) against the fp32 reference,
    within PyTorch's own error in the dtype; odd rows, hidden widths that are not whole 256-column tiles."""
    lead, k, n, out = shape
    tensors = _mlp_inputs(lead, k, n, out, dtype, "cuda", bias=True, residual=True)
    dy = torch.randn(*lead, out, device="cuda").to(dtype)
    ref = _grads(lambda *t: gated_mlp_ref(*t[:5], activation, t[5]), [t.float() for t in tensors], dy.float())
    lowp = _grads(lambda *t: gated_mlp_ref(*t[:5], activation, t[5]), tensors, dy)
    poison_allocator(*tensors, torch.empty(*lead, 2 * n, device="cuda", dtype=dtype))
    ours = _grads(_mlp(activation), tensors, dy)
    for name, o, f, t in zip(["out", "dx", "dw", "db", "dwd", "dbd", "dr"], ours, ref, lowp):
        assert o.dtype == dtype and o.shape == f.shape, name
        assert_close_to_ref(o.float(), f, t.float(), name, floor=torch.finfo(dtype).eps)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_kernel_gated_dgrad_matches_the_unfused_pass(dtype):
    """gated_dgrad (the GEMM with the gated backward in its epilogue) against dh = dy @ W by PyTorch then
    gated_backward's pass, both against float64; in place it writes the same bits. Weights contiguous, row views
    (the tiled transpose reads rows 16 bytes apart) and rows 8 bytes apart (PyTorch's copy transposes them)."""
    ops = torch.ops.fusedkernels
    for gate, pad in zip(GATE.values(), (0, 8, 4, 0)):
        for rows, n, k in ((333, 136, 24), (64, 264, 4104), (1, 8, 8)):
            z = (torch.randn(rows, 2 * n, device="cuda") * 2).to(dtype)
            dy = torch.randn(rows, k, device="cuda").to(dtype)
            w = (torch.randn(k, n + pad, device="cuda") / k**0.5).to(dtype)[:, :n]
            act = ACTIVATIONS.index(gate)
            want64 = _gated_backward64(dy.double() @ w.double(), z.double(), gate)
            unfused = ops.gated_backward(dy @ w, z, act)
            poison_allocator(z, z)
            ours = ops.gated_dgrad(dy, w, z, act)
            assert_close_to_ref(ours.double(), want64, unfused.double(), f"{gate} {rows}x{n}x{k}",
                                floor=torch.finfo(dtype).eps)
            ops.gated_dgrad_(dy, w, z, act)
            assert torch.equal(z, ours), (gate, rows, n, k)


def _gated_backward64(dh, z, gate):
    g, u = z.chunk(2, -1)
    g = g.detach().requires_grad_()
    with torch.enable_grad():
        a = PLAIN[gate](g)
        (slope,) = torch.autograd.grad(a, g, torch.ones_like(a))
    return torch.cat([dh * u * slope, dh * a.detach()], -1)


@pytest.mark.cuda
@needs_native
def test_opcheck_cuda():
    _opcheck("cuda", torch.bfloat16)


@pytest.mark.cuda
@needs_native
def test_kernel_under_torch_compile_matches_eager():
    """Compiled, the op and the module run the same kernel and backward as in eager mode."""
    x, w, b, r = _inputs((3, 41), 64, 136, torch.bfloat16, "cuda", True, True)
    dy = torch.randn(3, 41, 136, device="cuda", dtype=torch.bfloat16)

    def f(x, w, b, r):
        return fops.linear_gated(x, w, b, "swiglu", r)

    eager = _grads(f, (x, w, b, r), dy)
    compiled = _grads(torch.compile(f, fullgraph=True), (x, w, b, r), dy)
    for name, a, c in zip(["out", "dx", "dw", "db", "dr"], compiled, eager):
        assert max_err(a, c) <= 2 * torch.finfo(a.dtype).eps * max(c.abs().max().item(), 1.0), name
    mlp = fnn.FusedMLP(64, 136, activation="geglu", device="cuda", dtype=torch.bfloat16)
    assert max_err(torch.compile(mlp, fullgraph=True)(x), mlp(x)) <= 2 * torch.finfo(torch.bfloat16).eps * \
        max(mlp(x).abs().max().item(), 1.0)


@pytest.mark.cuda
@needs_native
def test_kernel_cuda_graph_capture_and_replay():
    static = [t.requires_grad_() for t in _inputs((130,), 136, 264, torch.bfloat16, "cuda", True, True)]
    dy = torch.randn(130, 264, device="cuda", dtype=torch.bfloat16)

    def step(x, w, b, r):
        out = fops.linear_gated(x, w, b, "swiglu", r)
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
        "out_features (N) not a multiple of 8": _inputs((9,), 16, 20, bf16, "cuda"),  # 40 rows, N = 20
    }
    x, w, b, _ = _inputs((9,), 16, 24, bf16, "cuda")
    cases["weight whose rows are not contiguous"] = (x, w.t().contiguous().t(), b, None)
    for reason, (x, w, b, r) in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = fops.linear_gated(x, w, b, "swiglu")
            c = fops.linear_gated(x, w, b, "swiglu")
        said = [str(m.message) for m in caught if "fusedkernels.linear_gated" in str(m.message)]
        assert len(said) <= 1 and all(reason in s for s in said), (reason, said)
        assert a.dtype == x.dtype and torch.equal(a, c)
        assert torch.equal(a, _stacked_ref(x, w, b, None, "swiglu")), reason  # the reference, exactly


@pytest.mark.cuda
@needs_native
def test_errors_on_cuda():
    x, w, b, _ = _inputs((3,), 8, 16, torch.bfloat16, "cuda")
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        fops.linear_gated(x, w.cpu(), b.cpu())
    with pytest.raises(ValueError, match=r"a gated weight must be \[2N, K\]"):
        torch.ops.fusedkernels.linear_act_fwd(x, w[:31], None, 4, None, False, True)
    with pytest.raises(RuntimeError, match="an odd number of rows"):
        fops.linear_gated(x, w[:31], None)


@pytest.mark.cuda
@needs_native
def test_autocast_casts_like_torch_linear():
    x, w, b, r = (t.requires_grad_() for t in _inputs((33,), 64, 48, torch.float32, "cuda", True, True))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = fops.linear_gated(x, w, b, "swiglu", r)
        fused = fops.linear_gated(x, w, b, "swiglu", r.detach().bfloat16())
        torch_linear = F.linear(x, w, b)
    assert fused.dtype == torch_linear.dtype == torch.bfloat16 and ours.dtype == torch.float32
    ours.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in (x, w, b, r))
    with torch.no_grad():
        # autocast rounds x, W and b to bf16; the reference computes from those in fp32, torch's own bf16 error
        # is the eager gated form in bf16
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        want = linear_gated_ref(xb.float(), wb.float(), bb.float(), "swiglu", r.float())
        torch_lowp = linear_gated_ref(xb, wb, bb, "swiglu", r.bfloat16())
    assert_close_to_ref(fused, want, torch_lowp, "bf16 residual")
    assert_close_to_ref(ours, want, torch_lowp, "fp32 residual")


@pytest.mark.cuda
@needs_native
def test_hopper_kernel_is_what_runs_on_sm90():
    if torch.cuda.get_device_capability() != (9, 0) or not any(
        a.startswith("90a") for a in _native.build_info().get("archs", [])
    ):
        pytest.skip("the Hopper kernel runs on sm_90 from a build with sm_90a code")
    x, w, b, r = _inputs((300,), 136, 264, torch.bfloat16, "cuda", True, True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fops.linear_gated(x, w, b, "swiglu", r)
            torch.cuda.synchronize()
    assert not [str(c.message) for c in caught if "fusedkernels" in str(c.message)]
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("linear_act_sm90_kernel" in n for n in names), names


def _native_grads(module):
    """The parameter gradients of an MLP in FusedMLP's native layout (gate_proj's and up_proj's stacked)."""
    if isinstance(module, LlamaMLP):
        gate, up, down = module.gate_proj, module.up_proj, module.down_proj
        stacked = [torch.cat([g.grad, u.grad]) for g, u in zip(gate.parameters(), up.parameters())]
        return stacked + [p.grad for p in down.parameters()]
    return [p.grad for p in module.parameters()]


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_mlp_on_the_kernel_matches_torch_modules(activation):
    """A bf16 FusedMLP against the module it replaces run in fp32 (the reference) and in bf16 (PyTorch's own
    error): output, input gradient and parameter gradients."""
    if activation == "swiglu":
        torch_mlp = LlamaMLP(256, 344, torch.nn.SiLU(), bias=True, device="cuda")
    else:
        torch_mlp = _sequential(activation, 256, 1024, 256).cuda()
    lowp = copy.deepcopy(torch_mlp).bfloat16()
    fused = fnn.FusedMLP.from_module(lowp)
    x, dy = (torch.randn(3, 333, 256, device="cuda") for _ in range(2))
    results = []
    for module, dtype in ((torch_mlp, torch.float32), (lowp, torch.bfloat16), (fused, torch.bfloat16)):
        xi = x.to(dtype, copy=True).requires_grad_()
        out = module(xi)
        out.backward(dy.to(dtype))
        results.append([out, xi.grad, *_native_grads(module)])
    names = ["out", "dx", *(name for name, _ in fused.named_parameters())]
    for name, ref, torch_lowp, ours in zip(names, *results):
        assert ours.dtype == torch.bfloat16 and ours.shape == ref.shape, name
        assert_close_to_ref(ours.float(), ref, torch_lowp.float(), name, floor=torch.finfo(torch.bfloat16).eps)


class Phi3MLP(torch.nn.Module):
    """transformers' Phi3MLP: one stacked gate_up_proj, the gate's rows first."""

    def __init__(self, hidden_size, intermediate_size, dtype=None):
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(hidden_size, 2 * intermediate_size, bias=False, dtype=dtype)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)
        self.activation_fn = torch.nn.SiLU()

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))


class TimmMlp(torch.nn.Module):
    """timm's Mlp: fc1, act, drop1, norm, fc2, drop2."""

    def __init__(self, in_features, hidden_features, norm=None, drop=0.0, dtype=None):
        super().__init__()
        self.fc1 = torch.nn.Linear(in_features, hidden_features, dtype=dtype)
        self.act = torch.nn.GELU()
        self.drop1 = torch.nn.Dropout(drop)
        self.norm = torch.nn.Identity() if norm is None else norm
        self.fc2 = torch.nn.Linear(hidden_features, in_features, dtype=dtype)
        self.drop2 = torch.nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class CLIPMLP(torch.nn.Module):
    """transformers' CLIPMLP: activation_fn, fc1, fc2 (quick_gelu in CLIP itself; tanh gelu here)."""

    def __init__(self, hidden_size, intermediate_size, dtype=None):
        super().__init__()
        self.activation_fn = NewGELUActivation()
        self.fc1 = torch.nn.Linear(hidden_size, intermediate_size, dtype=dtype)
        self.fc2 = torch.nn.Linear(intermediate_size, hidden_size, dtype=dtype)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


def test_from_module_in_place_and_clipped_activations():
    x = torch.randn(4, 16, dtype=torch.float64)
    seq = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(inplace=True), torch.nn.Linear(32, 16)).double()
    assert fnn.FusedMLP.from_module(seq).activation == "relu"
    llama = LlamaMLP(16, 32, torch.nn.SiLU(inplace=True), dtype=torch.float64)
    mlp = fnn.FusedMLP.from_module(llama)
    assert mlp.activation == "swiglu" and max_err(mlp(x), llama(x)) < 1e-12
    clipped = [torch.nn.ReLU6(), torch.nn.Hardtanh(0.0, 8.0), lambda z: F.gelu(z).clamp(-10, 10)]  # gelu_10
    for act in clipped:
        with pytest.raises(ValueError, match="matches none of the activations"):
            fnn.FusedMLP.from_module(torch.nn.Sequential(torch.nn.Linear(16, 32), act, torch.nn.Linear(32, 16))
                                     if isinstance(act, torch.nn.Module) else LlamaMLP(16, 32, act))


def test_from_module_refuses_linear_subclasses_and_chains_probe_errors():
    class LoRALinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    for first in (fnn.FusedLinear(16, 32, activation="relu"), LoRALinear(16, 32)):
        with pytest.raises(ValueError, match=f"exactly nn.Linear.*got a {type(first).__name__}"):
            fnn.FusedMLP.from_module(torch.nn.Sequential(first, torch.nn.GELU(), torch.nn.Linear(32, 16)))
    llama = LlamaMLP(16, 32)
    llama.up_proj = LoRALinear(16, 32, bias=False)
    with pytest.raises(ValueError, match="LoRALinear"):
        fnn.FusedMLP.from_module(llama)

    def half_only(z):
        if z.dtype == torch.float64:
            raise RuntimeError("no float64 kernel")
        return F.silu(z)

    with pytest.raises(ValueError, match="probing the activation .* failed") as info:
        fnn.FusedMLP.from_module(LlamaMLP(16, 32, half_only))
    assert isinstance(info.value.__cause__, RuntimeError) and "no float64 kernel" in str(info.value.__cause__)
    assert fnn.FusedMLP.from_module(LlamaMLP(16, 32, half_only), activation="swiglu").activation == "swiglu"


def test_from_module_keeps_requires_grad_and_training_flag():
    seq = _sequential("gelu").eval()
    seq[0].weight.requires_grad_(False)
    mlp = fnn.FusedMLP.from_module(seq)
    assert not mlp.training and not mlp.fc1.weight.requires_grad
    assert mlp.fc1.bias.requires_grad and mlp.fc2.weight.requires_grad
    llama = LlamaMLP(16, 32)
    for lin in (llama.gate_proj, llama.up_proj):
        lin.weight.requires_grad_(False)
    mlp = fnn.FusedMLP.from_module(llama)
    assert mlp.training and not mlp.gate_up_proj.weight.requires_grad and mlp.down_proj.weight.requires_grad
    llama.up_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="freeze both or neither"):
        fnn.FusedMLP.from_module(llama)


def test_from_timm_clip_phi3_modules_and_a_fused_mlp():
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    for module, activation in ((TimmMlp(16, 48, dtype=torch.float64), "gelu"),
                               (CLIPMLP(16, 48, dtype=torch.float64), "gelu_tanh"),
                               (Phi3MLP(16, 40, dtype=torch.float64), "swiglu")):
        mlp = fnn.FusedMLP.from_module(module)
        assert (mlp.activation, mlp.state_dict_layout) == (activation, "native")
        assert list(mlp.state_dict()) == list(module.state_dict())
        assert max_err(mlp(x), module(x)) < 1e-12
        copied = fnn.FusedMLP.from_module(mlp)
        assert (copied.activation, copied.state_dict_layout) == (activation, "native")
        assert max_err(copied(x), mlp(x)) == 0.0 and copied.state_dict_layout == mlp.state_dict_layout
    llama_layout = fnn.FusedMLP.from_module(LlamaMLP(16, 40))
    assert fnn.FusedMLP.from_module(llama_layout).state_dict_layout == "llama"
    with pytest.raises(ValueError, match=r"norm \(LayerNorm\) besides its projections"):
        fnn.FusedMLP.from_module(TimmMlp(16, 48, norm=torch.nn.LayerNorm(48)))
    with pytest.raises(ValueError, match=r"drop1 \(Dropout\)"):
        fnn.FusedMLP.from_module(TimmMlp(16, 48, drop=0.1))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_llama_state_dict_in_shards(bias):
    llama = LlamaMLP(16, 40, bias=bias)
    full = llama.state_dict()
    mlp = fnn.FusedMLP(16, 40, bias=bias, activation="swiglu", state_dict_layout="llama")
    names = ("weight", "bias") if bias else ("weight",)
    first = {k: v for k, v in full.items() if not k.startswith("up_proj.")}
    second = {k: v for k, v in full.items() if k.startswith("up_proj.")}
    result = mlp.load_state_dict(first, strict=False)
    assert sorted(result.missing_keys) == sorted(f"up_proj.{n}" for n in names) and not result.unexpected_keys
    assert torch.equal(mlp.gate_up_proj.weight[:40], llama.gate_proj.weight)
    result = mlp.load_state_dict(second, strict=False)
    assert sorted(result.missing_keys) == sorted([f"gate_proj.{n}" for n in names] + [f"down_proj.{n}" for n in names])
    for key, value in mlp.state_dict().items():
        assert torch.equal(value, full[key]), key
    parent = torch.nn.ModuleDict({"mlp": fnn.FusedMLP(16, 40, bias=bias, activation="swiglu")})
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"mlp.up_proj.weight\"") as info:
        parent.load_state_dict({"mlp." + k: v for k, v in first.items()})
    assert "Unexpected" not in str(info.value) and "gate_up_proj" not in str(info.value)
    # a native-layout module given one llama key reports what the dict lacks in llama keys only
    result = fnn.FusedMLP(16, 40, bias=bias, activation="swiglu").load_state_dict(
        {"gate_proj.weight": full["gate_proj.weight"]}, strict=False)
    assert sorted(result.missing_keys) == sorted([f"gate_proj.{n}" for n in names if n != "weight"] +
                                                 [f"up_proj.{n}" for n in names] + [f"down_proj.{n}" for n in names])


def test_llama_shard_into_a_meta_module_names_both_halves():
    """On the meta device the half a shard lacks has no data to keep: a clear error, where both halves load."""
    full = LlamaMLP(16, 40).state_dict()
    mlp = fnn.FusedMLP(16, 40, bias=False, activation="swiglu", state_dict_layout="llama", device="meta")
    with pytest.raises(RuntimeError, match="gate_proj.weight and up_proj.weight: this module is on the meta device"):
        mlp.load_state_dict({"gate_proj.weight": full["gate_proj.weight"]}, strict=False, assign=True)
    mlp.load_state_dict(full, assign=True)
    for key, value in mlp.state_dict().items():
        assert torch.equal(value, full[key]), key


def test_fused_mlp_bias_argument_and_reset_parameters():
    for bias, has_bias in ((1, True), (0, False), (None, False)):
        assert (fnn.FusedMLP(16, 32, 16, bias).fc1.bias is not None) == has_bias
    with pytest.raises(TypeError, match="bias must be a bool"):
        fnn.FusedMLP(16, 64, 16, "swiglu")
    for activation in ("gelu", "swiglu"):
        mlp = fnn.FusedMLP(16, 32, activation=activation)
        with torch.no_grad():
            for p in mlp.parameters():
                p.fill_(100.0)
        mlp.reset_parameters()
        for projection in mlp.children():  # nn.Linear's bounds: 1 / sqrt(in_features)
            for p in projection.parameters():
                assert 0 < p.abs().max() <= projection.in_features**-0.5


# Bad inputs, with the exception type the native op raises (and, without it, the reference after its checks).
BAD_GATED = [
    ("odd rows", RuntimeError, lambda x, w, b, r: (x, w[:31], None, "swiglu", None)),
    ("1-D weight", RuntimeError, lambda x, w, b, r: (x, w[0], None, "swiglu", None)),
    ("bias one half", RuntimeError, lambda x, w, b, r: (x, w, b[:16], "swiglu", None)),
    ("2-D bias", RuntimeError, lambda x, w, b, r: (x, w, b[None], "swiglu", None)),
    ("broadcast residual", RuntimeError, lambda x, w, b, r: (x, w, b, "swiglu", r[:1])),
    ("integer x", RuntimeError, lambda x, w, b, r: (x.int(), w.int(), None, "swiglu", None)),
    ("float64 bias", RuntimeError, lambda x, w, b, r: (x, w, b.double(), "swiglu", None)),
    ("cannot multiply", RuntimeError, lambda x, w, b, r: (x[:, :7], w, b, "swiglu", None)),
    ("activation None", TypeError, lambda x, w, b, r: (x, w, b, None, None)),
    ("activation int", TypeError, lambda x, w, b, r: (x, w, b, 1, None)),
    ("unknown activation", ValueError, lambda x, w, b, r: (x, w, b, "silu", None)),
    ("x a list", TypeError, lambda x, w, b, r: ([1.0], w, b, "swiglu", None)),
    ("sparse x", NotImplementedError, lambda x, w, b, r: (x.to_sparse(), w, None, "swiglu", None)),
]


def test_without_native_module_bad_inputs_raise_as_the_native_op(monkeypatch):
    x, w, b, r = _inputs((3,), 8, 16, dtype=torch.float32, residual=True)
    raises_as_the_native_op(monkeypatch, "linear_gated", BAD_GATED, (x, w, b, r))
    with pytest.raises(RuntimeError, match=r"linear_gated: residual must have the output's shape \[3, 16\] \(no"):
        fops.linear_gated(x, w, b, "swiglu", r[:1])  # the reference's own message now
    mlp = fnn.FusedMLP(8, 16, activation="swiglu")  # the module on the checked reference
    assert max_err(mlp(x, x), _stacked_ref(x, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, None, "swiglu")
                   @ mlp.down_proj.weight.t() + mlp.down_proj.bias + x) < 1e-5


def _gated_dz(dy, z, gate):
    """d(act(gate) * up)/dz for z = gate | up, by autograd through the plain formula, in z's dtype."""
    z = z.detach().requires_grad_()
    g, u = z.chunk(2, -1)
    return torch.autograd.grad(PLAIN[gate](g) * u, z, dy)[0]


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("gated", GATED_ACTIVATIONS)
@pytest.mark.parametrize("shape", [((17,), 24), ((2, 333), 136), ((3, 5, 7), 8)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "broadcast"])
def test_kernel_gated_backward(shape, gated, dtype, layout):
    """The gated form's backward pass (one kernel) against the formula by autograd in fp32, as close as PyTorch's
    own in the inputs' dtype; a strided or a broadcast dy (the gradient of a sum) reads right, the output is
    contiguous and every element written."""
    lead, n = shape
    gate = GATE[gated]
    z = (torch.randn(*lead, 2 * n, device="cuda") * 2).to(dtype)
    dy = grad_in_layout(lead, n, dtype, layout)
    poison_allocator(z)
    dz = torch.ops.fusedkernels.gated_backward(dy, z, ACTIVATIONS.index(gate))
    assert dz.dtype == dtype and dz.shape == z.shape and dz.is_contiguous()
    assert_close_to_ref(dz.float(), _gated_dz(dy.float(), z.float(), gate), _gated_dz(dy, z, gate).float(),
                        "dz", floor=torch.finfo(dtype).eps)
