"""fusedkernels.fuse(model): each pattern, the probe's rejections, what a swap keeps, the report, and whole models
(stand-ins here; transformers' own classes where it is installed)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedkernels
import fusedkernels.nn as fnn
from fusedkernels import _native

from .helpers import DEVICES, assert_close_to_ref, assert_grad_close_to_ref, max_err

# float16 on the CPU: torch's CPU matmul and norms take it too, but bf16 is what models run in.
FUSE_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


# ------------------------------------------------------------------------------------------------
# Stand-ins with the structure of Hugging Face's classes (transformers is not needed for these)
# ------------------------------------------------------------------------------------------------


class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm (Mistral's, Qwen2's): fp32 statistics, cast to the input's dtype, then * weight."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class T5LayerNorm(nn.Module):
    """transformers' T5LayerNorm: RMSNorm, variance in fp32, cast to the weight's dtype when half, then * weight."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class GemmaRMSNorm(nn.Module):
    """transformers' GemmaRMSNorm: fp32 throughout, (1 + weight) scaling, cast back at the end."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class LlamaMLP(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """An attention stand-in: q, k, v, o projections and causal SDPA over heads."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, h))


class Block(nn.Module):
    def __init__(self, hidden, heads, intermediate):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(hidden)
        self.self_attn = Attention(hidden, heads)
        self.post_attention_layernorm = LlamaRMSNorm(hidden)
        self.mlp = LlamaMLP(hidden, intermediate)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    def __init__(self, vocab=64, hidden=32, heads=4, intermediate=48, layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden, heads, intermediate) for _ in range(layers))
        self.norm = LlamaRMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def _randomize(model):
    """Random weights everywhere (norm weights near 1, not the ones / zeros they start from)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
            p.copy_(1 + 0.2 * noise if p.dim() == 1 else 0.2 * noise)
    return model


def _params(model):
    return {name: p for name, p in model.named_parameters()}


def _outputs_and_grads(model, x, dy, with_params=True):
    """Output, input grad and parameter grads (by name) of model(x) for upstream gradient dy."""
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    params = _params(model) if with_params else {}
    y = model(x)
    leaves = ([x] if x.requires_grad else []) + list(params.values())
    grads = torch.autograd.grad(y, leaves, dy)
    names = (["input"] if x.requires_grad else []) + list(params)
    return y.detach(), dict(zip(names, grads))


def _assert_same_computation(before, after, ref, x, dy, with_params=True):
    """after(x) and its grads within twice before's error against ref (a float64 copy of before), as the probe;
    with_params=False: the input's grad only (parameters of another layout)."""
    y_before, g_before = _outputs_and_grads(before, x, dy, with_params)
    y_after, g_after = _outputs_and_grads(after, x, dy, with_params)
    y_ref, g_ref = _outputs_and_grads(ref, x if not x.is_floating_point() else x.double(), dy.double(), with_params)
    assert y_after.dtype == y_before.dtype
    assert_close_to_ref(y_after, y_ref, y_before, "output", floor=1e-5)
    assert set(g_after) == set(g_before)
    for name in g_before:
        assert g_after[name].dtype == g_before[name].dtype, name
        assert_grad_close_to_ref(g_after[name], g_ref[name], g_before[name], name, floor=1e-5)


def _statuses(report):
    return {e.path: (e.status, e.fused) for e in report.entries}


# ------------------------------------------------------------------------------------------------
# Patterns
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FUSE_DTYPES, ids=str)
def test_torch_norms_switch_class_in_place(device, dtype):
    model = _randomize(nn.Sequential(nn.LayerNorm(24), nn.RMSNorm(24, eps=1e-5), nn.LayerNorm((3, 8), bias=False)))
    model.to(device, dtype)
    before, params, keys = copy.deepcopy(model), _params(model), list(model.state_dict())
    modules = list(model)
    report = fusedkernels.fuse(model)
    assert [type(m) for m in model] == [fnn.FusedLayerNorm, fnn.FusedRMSNorm, fnn.FusedLayerNorm]
    assert all(a is b for a, b in zip(model, modules)), "a class switch keeps the module objects"
    assert _params(model) == params and all(model.get_parameter(n) is p for n, p in params.items())
    assert list(model.state_dict()) == keys
    assert _statuses(report) == {"0": ("swapped", "FusedLayerNorm"), "1": ("swapped", "FusedRMSNorm"),
                                 "2": ("swapped", "FusedLayerNorm")}
    x = torch.randn(4, 5, 3, 8, device=device, dtype=dtype).reshape(4, 5, 24)
    model[2].normalized_shape = (24,)  # the test's own reshaping: run all three over the last 24
    before[2].normalized_shape = (24,)
    model[2].weight, before[2].weight = (nn.Parameter(m[2].weight.reshape(24)) for m in (model, before))
    ref = copy.deepcopy(before).double()
    _assert_same_computation(before, model, ref, x, torch.randn_like(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FUSE_DTYPES, ids=str)
@pytest.mark.parametrize("norm_cls,cast", [(LlamaRMSNorm, "input"), (T5LayerNorm, "weight"), (GemmaRMSNorm, "offset")],
                         ids=["llama", "t5", "gemma"])
def test_hugging_face_rms_norms_by_structure(device, dtype, norm_cls, cast):
    model = _randomize(nn.Sequential(nn.Identity(), norm_cls(40, eps=1e-5))).to(device, dtype)
    before, weight = copy.deepcopy(model), model[1].weight
    report = fusedkernels.fuse(model)
    assert _statuses(report) == {"1": ("swapped", f"FusedCastRMSNorm(cast={cast!r})")}
    assert type(model[1]) is fnn.FusedCastRMSNorm and model[1].cast == cast and model[1].eps == 1e-5
    assert model[1].weight is weight and list(model.state_dict()) == ["1.weight"]
    x = torch.randn(3, 7, 40, device=device, dtype=dtype)
    _assert_same_computation(before, model, copy.deepcopy(before).double(), x, torch.randn_like(x))


@pytest.mark.parametrize("norm_cls", [LlamaRMSNorm, T5LayerNorm, GemmaRMSNorm], ids=["llama", "t5", "gemma"])
@pytest.mark.parametrize("weight_dtype,input_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                      (torch.bfloat16, torch.float16)], ids=str)
def test_hugging_face_norms_keep_their_dtype_rules(norm_cls, weight_dtype, input_dtype):
    """Where input and weight dtypes differ (autocast, a kept-fp32 norm), the cast order sets the output's dtype."""
    model = _randomize(nn.Sequential(norm_cls(64))).to(weight_dtype)
    before = copy.deepcopy(model)
    fusedkernels.fuse(model)
    x = torch.randn(5, 64, dtype=input_dtype)
    y, y_before = model(x), before(x)
    assert y.dtype == y_before.dtype
    y_ref = copy.deepcopy(before).double()(x.double())
    assert_close_to_ref(y, y_ref, y_before, floor=1e-5)


def test_fused_cast_rms_norm_module():
    norm = fnn.FusedCastRMSNorm(16, eps=1e-5, cast="weight")
    assert list(norm.state_dict()) == ["weight"] and torch.equal(norm.weight, torch.ones(16))
    gemma = fnn.FusedCastRMSNorm(16, eps=1e-6, cast="offset")  # Gemma's weight starts at zero: a scale of 1
    assert torch.equal(gemma.weight, torch.zeros(16))
    x = torch.randn(3, 16)
    torch.testing.assert_close(gemma(x), GemmaRMSNorm(16)(x))
    assert "cast='weight'" in repr(norm)
    with pytest.raises(ValueError, match="cast must be one of"):
        fnn.FusedCastRMSNorm(16, cast="output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemma_norm_takes_the_offset_cast(dtype):
    """Gemma's RMSNorm, rms_norm(x) * (1 + weight) in float32 cast back to x's dtype: FusedCastRMSNorm(cast="offset"),
    the same weight object; outputs and gradients within the original's own error of float64."""
    model = _randomize(nn.Sequential(GemmaRMSNorm(32))).to(dtype)
    before, weight = copy.deepcopy(model), model[0].weight
    (entry,) = fusedkernels.fuse(model).entries
    assert entry.status == "swapped" and entry.fused == "FusedCastRMSNorm(cast='offset')", str(entry)
    assert type(model[0]) is fnn.FusedCastRMSNorm and model[0].weight is weight
    x = torch.randn(3, 5, 32).to(dtype)
    dy = torch.randn(3, 5, 32).to(dtype)
    results = []
    for m, xx, dd in ((model, x, dy), (before, x, dy), (copy.deepcopy(before).double(), x.double(), dy.double())):
        xx = xx.clone().requires_grad_()
        y = m(xx)
        results.append([y.detach(), *torch.autograd.grad(y, [xx, m[0].weight], dd)])
    for name, ours, orig, ref in zip(["out", "dx", "dweight"], *results):
        assert ours.dtype == orig.dtype
        assert_close_to_ref(ours.double(), ref, orig.double(), name)


class ScaledLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return 2 * super().forward(x)


class NotAnRMSNorm(nn.Module):
    """weight + eps, as the norms have, but a different computation."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n)), 1e-6

    def forward(self, x):
        return x * self.weight + self.eps


def test_probe_rejects_what_computes_something_else():
    model = nn.Sequential(NotAnRMSNorm(16), nn.LayerNorm(16))
    report = fusedkernels.fuse(model)
    entries = {e.path: e for e in report.entries}
    assert entries["0"].status == "left" and "FusedCastRMSNorm(cast='input')" in entries["0"].reason
    assert "probe" in entries["0"].reason and "output" in entries["0"].reason
    assert entries["1"].status == "swapped"
    assert type(model[0]) is NotAnRMSNorm


def _normalized(x, eps):
    """x / rms(x) in float32, as HF's RMSNorms compute it."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class LogScaleRMSNorm(nn.Module):
    """An RMSNorm of HF's structure whose gain is exp(weight), zero at initialisation: equal to Gemma's (1 + weight)
    there, value and gradient, and nowhere else."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(d)), eps

    def forward(self, x):
        return (_normalized(x, self.eps) * self.weight.float().exp()).to(x.dtype)


class AbsRMSNorm(nn.Module):
    """|weight| as the gain, one at initialisation: equal to HF's RMSNorm there."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.weight.abs() * _normalized(x, self.variance_epsilon).to(x.dtype)


def test_structural_norms_are_probed_away_from_their_initial_weights():
    model = nn.Sequential(LogScaleRMSNorm(16), AbsRMSNorm(16))
    before = [p.detach().clone() for p in model.parameters()]
    report = fusedkernels.fuse(model)
    assert [e.status for e in report.entries] == ["left", "left"], str(report)
    assert all("with random weights" in e.reason for e in report.entries), str(report)
    assert [type(m) for m in model] == [LogScaleRMSNorm, AbsRMSNorm]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the probe's weights are put back


def _rms_with_scale(norm, x):
    return norm.weight * _normalized(x, norm.eps).to(x.dtype) * norm.scale


class HelperNorm(nn.Module):
    """Reads self.scale through a module-level helper."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps, self.scale = nn.Parameter(torch.ones(d)), eps, 1.0

    def forward(self, x):
        return _rms_with_scale(self, x)


class GetattrNorm(nn.Module):
    """Reads a scale that may be set later through getattr."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.weight * _normalized(x, self.eps).to(x.dtype) * getattr(self, "scale", 1.0)


def test_norms_that_pass_themselves_on_are_left():
    model = nn.Sequential(HelperNorm(8), GetattrNorm(8))
    report = fusedkernels.fuse(model)
    assert [e.status for e in report.entries] == ["left", "left"], str(report)
    assert all("passes the module itself" in e.reason for e in report.entries), str(report)


class SameLayerNorm(nn.LayerNorm):
    """A subclass whose forward computes what nn.LayerNorm's does, with a method of its own."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_method(self):
        return "kept"


class FourDLayerNorm(nn.LayerNorm):
    """Differs from nn.LayerNorm only on 4-D inputs, which the probe ([2, 5, n]) never gives."""

    def forward(self, x):
        return 2 * super().forward(x) if x.dim() == 4 else super().forward(x)


class ClampedRMSNorm(nn.RMSNorm):
    """Differs from nn.RMSNorm only past |x| = 100."""

    def forward(self, x):
        return super().forward(x.clamp(-100, 100))


def test_norm_subclasses_are_left():
    model = nn.Sequential(SameLayerNorm(16), ScaledLayerNorm(16), FourDLayerNorm(16), ClampedRMSNorm(16))
    report = fusedkernels.fuse(model)
    assert [e.status for e in report.entries] == ["left"] * 4
    assert all("subclass of nn." in e.reason for e in report.entries), str(report)
    assert [type(m) for m in model] == [SameLayerNorm, ScaledLayerNorm, FourDLayerNorm, ClampedRMSNorm]
    assert model[0].extra_method() == "kept"


def test_a_top_level_mlp_sequential_still_fuses_its_linear_and_activation():
    """merge=True on a model that is itself an MLP nn.Sequential: nothing holds it to take a FusedMLP (left, with the
    reason), so the Linear + activation pattern, which swaps in place, takes it."""
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    x = torch.randn(3, 8)
    before = model(x)
    report = fusedkernels.fuse(model, merge=True)
    statuses = {(e.path, e.status) for e in report.entries}
    assert ("", "left") in statuses and ("0", "swapped") in statuses, str(report)
    assert type(model[0]) is fnn.FusedLinear and model[0].activation == "gelu"
    torch.testing.assert_close(model(x), before)


def test_a_norm_with_nan_weights_is_left_with_the_reason():
    model = nn.Sequential(nn.LayerNorm(8))
    model[0].weight.data.fill_(float("nan"))
    (entry,) = fusedkernels.fuse(model).entries
    assert entry.status == "left" and "the original gives non-finite values on the probe" in entry.reason, str(entry)
    assert type(model[0]) is nn.LayerNorm


def test_hf_structured_subclass_is_probed_out_to_large_values():
    """An nn.RMSNorm subclass with a float eps has HFRMSNorm's structure: replaced by what the probe confirms, and
    the probe's rows reach ~1e3, where the clamp shows."""
    model = nn.Sequential(ClampedRMSNorm(16, eps=1e-5), nn.RMSNorm(16, eps=1e-5))
    report = fusedkernels.fuse(model)
    entries = {e.path: e for e in report.entries}
    assert entries["0"].status == "left" and "probe found a difference" in entries["0"].reason
    assert type(model[0]) is ClampedRMSNorm
    assert entries["1"].status == "swapped" and type(model[1]) is fnn.FusedRMSNorm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FUSE_DTYPES, ids=str)
@pytest.mark.parametrize("act,name", [(nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                                      (nn.ReLU(), "relu"), (nn.SiLU(), "silu")], ids=lambda v: str(v))
def test_linear_followed_by_activation(device, dtype, act, name):
    model = _randomize(nn.Sequential(nn.Linear(16, 32), act, nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 8, bias=False),
                                     nn.ReLU())).to(device, dtype)
    before, params, keys = copy.deepcopy(model), _params(model), list(model.state_dict())
    report = fusedkernels.fuse(model, merge=True)
    assert _statuses(report) == {"0": ("swapped", f"FusedLinear(activation={name!r})"),
                                 "4": ("swapped", "FusedLinear(activation='relu')")}
    assert report.entries[0].original == f"Linear + {type(act).__name__}"
    assert [type(m) for m in model] == [fnn.FusedLinear, nn.Identity, nn.Linear, nn.Tanh, fnn.FusedLinear, nn.Identity]
    assert model[0].activation == name and model[4].activation == "relu"
    assert all(model.get_parameter(n) is p for n, p in params.items()) and list(model.state_dict()) == keys
    x = torch.randn(2, 3, 16, device=device, dtype=dtype)
    _assert_same_computation(before, model, copy.deepcopy(before).double(), x, torch.randn(2, 3, 8, device=device,
                                                                                             dtype=dtype))


def test_shared_linear_is_left():
    linear = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": nn.Sequential(linear, nn.ReLU()), "b": nn.Sequential(linear)})
    (entry,) = fusedkernels.fuse(model, merge=True).entries
    assert entry.path == "a.0" and entry.status == "left" and "elsewhere" in entry.reason
    assert type(linear) is nn.Linear
    # followed by an activation at both uses (different ones): left, and the reason says why
    twice = nn.Sequential(linear, nn.GELU(), linear, nn.ReLU())
    entries = fusedkernels.fuse(nn.ModuleDict({"s": twice}), merge=True).entries
    assert [e.path for e in entries] == ["s.0", "s.2"] and all(e.status == "left" for e in entries)
    assert all("would change what the other uses compute" in e.reason for e in entries), entries


def test_a_hook_on_a_child_is_reported_as_the_childs():
    model = nn.ModuleDict({"mlp": _randomize(LlamaMLP(16, 24))})
    model.mlp.down_proj.register_forward_hook(lambda *args: None)
    (entry,) = fusedkernels.fuse(model, merge=True).entries
    assert entry.path == "mlp" and entry.status == "left"
    assert entry.reason.startswith("its Linear has forward or backward hooks"), entry.reason


@pytest.mark.parametrize("dtype", FUSE_DTYPES, ids=str)
def test_mlp_blocks_need_merge_true(dtype):
    model = _randomize(nn.ModuleDict({"mlp": LlamaMLP(16, 24),
                                      "seq": nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))})).to(dtype)
    before, keys = copy.deepcopy(model), list(model.state_dict())
    report = fusedkernels.fuse(model)
    entries = {e.path: e for e in report.entries}
    assert entries["mlp"].status == "left" and "merge=True" in entries["mlp"].reason
    assert entries["seq.0"].status == "left" and "merge=True" in entries["seq.0"].reason
    assert type(model["seq"][0]) is nn.Linear and type(model["seq"][1]) is nn.GELU

    model = copy.deepcopy(before)
    report = fusedkernels.fuse(model, merge=True)
    assert _statuses(report) == {"mlp": ("swapped", "FusedMLP(activation='swiglu')"),
                                 "seq": ("swapped", "FusedMLP(activation='gelu')")}
    assert "optimizers" in report.entries[0].reason
    assert type(model["mlp"]) is fnn.FusedMLP and type(model["seq"]) is fnn.FusedMLP
    assert list(model.state_dict()) == keys
    for key, value in before.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(3, 16, dtype=dtype)
    for name in ("mlp", "seq"):
        _assert_same_computation(before[name], model[name], copy.deepcopy(before[name]).double(), x, torch.randn_like(x),
                                 with_params=False)


def test_mlp_blocks_keep_the_parameters_they_do_not_stack():
    """merge=True: the projections FusedMLP copies from one nn.Linear take that Linear's parameter objects, so an
    optimizer built before fuse() goes on training them and accumulated .grad stays; the stacked gate and up are new
    parameters carrying the halves' .grad stacked."""
    model = _randomize(nn.ModuleDict({"mlp": LlamaMLP(16, 24),
                                      "seq": nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))}))
    x = torch.randn(3, 16)
    (model["mlp"](x).sum() + model["seq"](x).sum()).backward()
    seq_params, down = list(model["seq"].parameters()), model["mlp"].down_proj.weight
    gate_up_grad = torch.cat([model["mlp"].gate_proj.weight.grad, model["mlp"].up_proj.weight.grad])
    optimizer = torch.optim.SGD([*seq_params, down], lr=0.1)
    fusedkernels.fuse(model, merge=True)
    fused = model["seq"]
    assert [fused.fc1.weight, fused.fc1.bias, fused.fc2.weight, fused.fc2.bias] == seq_params
    assert model["mlp"].down_proj.weight is down and down.grad is not None
    assert torch.equal(model["mlp"].gate_up_proj.weight.grad, gate_up_grad)
    before = fused.fc1.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(fused.fc1.weight, before)  # the model's own parameter moved


def test_a_half_without_grad_stacks_as_zeros():
    """merge=True with gate_proj's .grad accumulated and up_proj's None (frozen until now, or not yet reached): the
    stacked parameter's .grad holds gate's and zeros, not nothing."""
    model = nn.ModuleDict({"mlp": _randomize(LlamaMLP(16, 24))})
    model["mlp"].gate_proj.weight.grad = torch.randn_like(model["mlp"].gate_proj.weight)
    want = torch.cat([model["mlp"].gate_proj.weight.grad, torch.zeros_like(model["mlp"].up_proj.weight)])
    fusedkernels.fuse(model, merge=True)
    assert torch.equal(model["mlp"].gate_up_proj.weight.grad, want)


def test_named_sequentials_keep_their_names():
    """An nn.Sequential built from an OrderedDict: its MLP (merge=True) becomes a FusedMLP writing the Sequential's own
    keys, and a Linear + activation pair inside one is reported under the Linear's name, not its index."""
    from collections import OrderedDict

    mlp = nn.Sequential(OrderedDict(fc=nn.Linear(16, 32), act=nn.GELU(), out=nn.Linear(32, 16)))
    model = nn.ModuleDict({"mlp": mlp, "head": nn.Sequential(OrderedDict(proj=nn.Linear(16, 8), act=nn.ReLU()))})
    keys, before = list(model.state_dict()), copy.deepcopy(model)
    report = fusedkernels.fuse(model, merge=True)
    assert _statuses(report) == {"mlp": ("swapped", "FusedMLP(activation='gelu')"),
                                 "head.proj": ("swapped", "FusedLinear(activation='relu')")}
    assert list(model.state_dict()) == keys
    before.load_state_dict(model.state_dict())
    model.load_state_dict(before.state_dict())
    x = torch.randn(3, 16)
    assert max_err(model["mlp"](x), before["mlp"](x)) < 1e-6
    # from_module itself, and a copy of its result, keep the names
    fused = fnn.FusedMLP.from_module(mlp)
    assert list(fused.state_dict()) == ["fc.weight", "fc.bias", "out.weight", "out.bias"]
    assert list(fnn.FusedMLP.from_module(fused).state_dict()) == list(copy.deepcopy(fused).state_dict())
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    assert list(fnn.FusedMLP.from_module(plain).state_dict()) == list(plain.state_dict())


class _ScaledGELU(nn.Module):
    def __init__(self, state):
        super().__init__()
        if state == "buffer":
            self.register_buffer("scale", torch.tensor(2.0))
        else:
            self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return F.gelu(x) * self.scale


def test_mlp_blocks_from_module_cannot_copy_faithfully_are_left():
    """Sequential MLPs whose copy would change the model: child names colliding with FusedMLP's fc1 / fc2 (the keys
    would mix up), projections sharing a parameter (the copy would untie them), an activation with a buffer or a
    parameter (FusedMLP would drop it), dropout between the projections. from_module raises naming the cause; fuse()
    swaps no MLP (the Linear + GELU pair in the first alone) and every state_dict key stays."""
    from collections import OrderedDict

    def named(a, b):
        return nn.Sequential(OrderedDict([(a, nn.Linear(16, 32)), ("act", nn.GELU()), (b, nn.Linear(32, 16))]))

    tied = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
    tied[2].weight = tied[0].weight
    blocks = {"collide": (named("fc0", "fc1"), "fc1 / fc2 keys would collide"),
              "swapped_names": (named("fc2", "fc1"), "fc1 / fc2 keys would collide"),
              "tied": (tied, "share a parameter"),
              "buffer": (nn.Sequential(nn.Linear(16, 32), _ScaledGELU("buffer"), nn.Linear(32, 16)),
                         "parameters or buffers"),
              "parameter": (nn.Sequential(nn.Linear(16, 32), _ScaledGELU("parameter"), nn.Linear(32, 16)),
                            "parameters or buffers"),
              "dropout": (nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 16)).eval(), "dropout")}
    for name, (block, message) in blocks.items():
        with pytest.raises(ValueError, match=message):
            fnn.FusedMLP.from_module(block)
    model = nn.ModuleDict({name: block for name, (block, _) in blocks.items()})
    keys = list(model.state_dict())
    report = fusedkernels.fuse(model, merge=True)
    assert not any(e.fused.startswith("FusedMLP") for e in report.swapped), str(report)
    assert list(model.state_dict()) == keys
    assert model["tied"][2].weight is model["tied"][0].weight


# ------------------------------------------------------------------------------------------------
# What fuse keeps, the report
# ------------------------------------------------------------------------------------------------


def test_idempotent_and_report():
    model = _randomize(nn.Sequential(nn.LayerNorm(8), LlamaRMSNorm(8), nn.Linear(8, 8), nn.SiLU(), GemmaRMSNorm(8),
                                     ScaledLayerNorm(8)))
    first = fusedkernels.fuse(model)
    assert [(e.path, e.status) for e in first.entries] == [("0", "swapped"), ("1", "swapped"), ("2", "left"),
                                                           ("4", "swapped"), ("5", "left")]
    text = str(first)
    assert text.startswith("fuse(Sequential): 3 swapped, 2 left, 0 already fused")
    assert "swapped  1: LlamaRMSNorm -> FusedCastRMSNorm(cast='input')" in text
    assert "swapped  4: GemmaRMSNorm -> FusedCastRMSNorm(cast='offset')" in text and "left     5: ScaledLayerNorm" in text
    assert "left     2: Linear + SiLU: merging the pair" in text
    second = fusedkernels.fuse(model, merge=True)
    assert _statuses(second)["2"] == ("swapped", "FusedLinear(activation='silu')")
    state, structure = copy.deepcopy(model.state_dict()), repr(model)
    third = fusedkernels.fuse(model, merge=True)
    assert not third.swapped and len(third.already_fused) == 4 and len(third.left) == 1
    assert repr(model) == structure and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert "already  2: FusedLinear" in str(third)


def test_nothing_to_fuse():
    report = fusedkernels.fuse(nn.Sequential(nn.Embedding(4, 8), nn.Linear(8, 8), nn.Tanh()))
    assert report.entries == [] and str(report) == "fuse(Sequential): nothing to fuse (no module matched a pattern)"


def test_what_is_left_and_why():
    meta = nn.LayerNorm(8, device="meta")
    plain = nn.LayerNorm(8, elementwise_affine=False)
    hooked = LlamaRMSNorm(8)
    hooked.register_forward_hook(lambda *args: None)
    wrapped = LlamaRMSNorm(8)
    wrapped.forward = lambda x: x  # as accelerate's hooks do
    report = fusedkernels.fuse(nn.Sequential(meta, plain, hooked, wrapped))
    reasons = {e.path: e.reason for e in report.entries}
    assert [e.status for e in report.entries] == ["left"] * 4
    assert "meta" in reasons["0"] and "no floating-point parameters" in reasons["1"]
    assert "hooks" in reasons["2"] and "instance" in reasons["3"]
    assert type(hooked) is LlamaRMSNorm and type(meta) is nn.LayerNorm
    root = fusedkernels.fuse(LlamaRMSNorm(8))
    assert root.entries[0].status == "left" and "model itself" in root.entries[0].reason


def test_class_switch_keeps_hooks_and_training_flag():
    seen = []
    norm = nn.LayerNorm(8)
    norm.register_forward_hook(lambda module, args, out: seen.append(type(module)))
    model = nn.Sequential(norm, LlamaRMSNorm(8), nn.Linear(8, 8), nn.ReLU()).eval()
    fusedkernels.fuse(model, merge=True)
    assert not seen, "the probe does not run the model's hooks"
    model(torch.randn(2, 8))
    assert seen == [fnn.FusedLayerNorm]
    assert not any(m.training for m in model.modules()) and type(model[3]) is nn.Identity


def test_identity_takes_the_activations_training_flag():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU()).train()
    model[1].eval()
    fusedkernels.fuse(model, merge=True)
    assert type(model[1]) is nn.Identity and not model[1].training and model[0].training


def test_probe_leaves_rng_and_grads_alone():
    model = _randomize(TinyLlama())
    state = torch.get_rng_state()
    fusedkernels.fuse(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())


def test_inference_probes_without_gradients():
    model = _randomize(nn.Sequential(nn.LayerNorm(8), LlamaRMSNorm(8)))
    with torch.inference_mode():
        report = fusedkernels.fuse(model, inference=True)
    assert len(report.swapped) == 2 and not report.note


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_fuse_where_grad_is_off(mode):
    """Inside inference_mode no gradient can be taken: outputs only, said in the report; under no_grad the probe
    enables grad itself and checks gradients as usual."""
    model = _randomize(nn.Sequential(nn.LayerNorm(8), LlamaRMSNorm(8)))
    with getattr(torch, mode)():
        report = fusedkernels.fuse(model)
    assert len(report.swapped) == 2, str(report)
    if mode == "inference_mode":
        assert "outputs only" in report.note and "outputs only" in str(report).splitlines()[0]
    else:
        assert not report.note


class CLIPLayerNorm(nn.LayerNorm):
    """CLIP's LayerNorm: computes in float32 whatever the input's dtype."""

    def forward(self, x):
        t = x.dtype
        return super().forward(x.type(torch.float32)).type(t)


class Float32RMSNorm(nn.Module):
    """HFRMSNorm's structure, but its forward casts the input to float32: the float64 copy mixes dtypes and raises."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n)), 1e-6

    def forward(self, x):
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight, None, self.eps).to(x.dtype)


class Float32MLP(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(n, 2 * n), nn.GELU(), nn.Linear(2 * n, n)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.float()))).to(x.dtype)


def test_probe_exceptions_leave_the_module_and_fuse_goes_on():
    model = _randomize(nn.Sequential(nn.LayerNorm(16), CLIPLayerNorm(16), Float32RMSNorm(16), Float32MLP(16),
                                     LlamaRMSNorm(16)))
    report = fusedkernels.fuse(model, merge=True)
    entries = {e.path: e for e in report.entries}
    assert entries["0"].status == "swapped" and entries["4"].status == "swapped"
    assert entries["1"].status == "left" and "subclass" in entries["1"].reason
    for path in ("2", "3"):
        assert entries[path].status == "left", str(report)
        assert "float64 reference copy raised" in entries[path].reason and "RuntimeError" in entries[path].reason
    assert [type(m) for m in model] == [fnn.FusedLayerNorm, CLIPLayerNorm, Float32RMSNorm, Float32MLP,
                                        fnn.FusedCastRMSNorm]


class DropoutRMSNorm(nn.Module):
    """An RMSNorm of Hugging Face's structure with dropout on its input in training."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(n)), 1e-6

    def forward(self, x):
        x = F.dropout(x, 0.1, self.training)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_random_modules_are_left_and_rng_is_restored():
    model = nn.Sequential(DropoutRMSNorm(16), nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.ReLU())).train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    report = fusedkernels.fuse(model)
    assert torch.equal(torch.get_rng_state(), state)
    (entry,) = report.entries
    assert entry.status == "left" and "random (dropout?)" in entry.reason
    assert type(model[0]) is DropoutRMSNorm
    # in eval mode one output, but a later train() would drop out again, which the fused norm would not: left
    report = fusedkernels.fuse(model.eval())
    assert report.entries[0].status == "left" and "training and eval mode" in report.entries[0].reason, str(report)
    assert type(model[0]) is DropoutRMSNorm and not model[0].training  # its flags as they were
    assert torch.equal(torch.get_rng_state(), state)


def test_linear_activation_pairs_need_merge_true():
    """Merging Linear + activation changes what a slice of the Sequential computes, which no probe sees."""
    features = _randomize(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    x = torch.randn(3, 8)
    sliced = features[:1](x)
    report = fusedkernels.fuse(features)
    assert [e.status for e in report.entries] == ["left"] and "merge=True" in report.entries[0].reason
    assert torch.equal(features[:1](x), sliced) and type(features[1]) is nn.ReLU


class TimmMlp(nn.Module):
    def __init__(self, n, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(n, hidden), nn.GELU(), nn.Linear(hidden, n)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_mlp_blocks_with_tied_weights_are_left():
    model = nn.ModuleDict({"emb": nn.Embedding(24, 16), "mlp": TimmMlp(16, 24), "llama": LlamaMLP(16, 24)})
    model["emb"].weight = model["mlp"].fc1.weight
    report = fusedkernels.fuse(model, merge=True)
    entries = {e.path: e for e in report.entries}
    assert entries["mlp"].status == "left" and "tied" in entries["mlp"].reason
    assert type(model["mlp"]) is TimmMlp and model["emb"].weight is model["mlp"].fc1.weight
    # Untied blocks are swapped: state_dict keys stay, named_parameters() names do not (gate and up stacked).
    assert entries["llama"].status == "swapped"
    assert "llama.gate_proj.weight" in model.state_dict()
    assert "llama.gate_up_proj.weight" in dict(model.named_parameters())


def test_fuse_checks_its_argument():
    with pytest.raises(TypeError, match="nn.Module"):
        fusedkernels.fuse(torch.randn(3))


# ------------------------------------------------------------------------------------------------
# A Llama-like model end to end
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("merge", [False, True], ids=["norms", "norms+merge"])
def test_llama_like_model_end_to_end(device, dtype, merge):
    model = _randomize(TinyLlama()).to(device, dtype)
    before, params, keys = copy.deepcopy(model), _params(model), list(model.state_dict())
    report = fusedkernels.fuse(model, merge=merge)
    norms = {"norm", *(f"layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm"))}
    mlps = {f"layers.{i}.mlp" for i in range(2)}
    assert {e.path for e in report.swapped} == (norms | mlps if merge else norms)
    assert {e.path for e in report.left} == (set() if merge else mlps)
    assert list(model.state_dict()) == keys
    if not merge:
        assert all(model.get_parameter(n) is p for n, p in params.items())
    ids = torch.randint(0, 64, (2, 9), device=device)
    dy = torch.randn(2, 9, 64, device=device, dtype=dtype)
    y_before, g_before = _outputs_and_grads(before, ids, dy)
    y_after, g_after = _outputs_and_grads(model, ids, dy)
    y_ref, g_ref = _outputs_and_grads(copy.deepcopy(before).double(), ids, dy.double())
    assert_close_to_ref(y_after, y_ref, y_before, "logits", floor=1e-5)
    halves = (".mlp.gate_proj.", ".mlp.up_proj.")
    for name in g_before:
        half = next((i for i, h in enumerate(halves) if h in name), None)
        ours = g_after[name] if not merge or half is None else g_after[
            name.replace(halves[half], ".mlp.gate_up_proj.")].chunk(2)[half]  # FusedMLP's stacked parameter
        assert_grad_close_to_ref(ours, g_ref[name], g_before[name], name, floor=1e-5)


# ------------------------------------------------------------------------------------------------
# transformers' own classes (installed on the GPU machine)
# ------------------------------------------------------------------------------------------------


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed here (it is on the GPU machine)")


def _tiny(config_name, **extra):
    transformers = _transformers()
    config_cls = getattr(transformers, config_name)
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    if config_name == "T5Config":
        sizes = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    if config_name in ("LlamaConfig", "MistralConfig", "Qwen2Config", "GemmaConfig"):
        sizes["num_key_value_heads"] = 2
    if config_name == "GemmaConfig":
        sizes["head_dim"] = 8
    return config_cls(**sizes, **extra)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config_name,norms_fused", [("LlamaConfig", "FusedCastRMSNorm(cast='input')"),
                                                     ("MistralConfig", "FusedCastRMSNorm(cast='input')"),
                                                     ("Qwen2Config", "FusedCastRMSNorm(cast='input')"),
                                                     ("GemmaConfig", "FusedCastRMSNorm(cast='offset')"),
                                                     ("BertConfig", "FusedLayerNorm"),
                                                     ("T5Config", "FusedCastRMSNorm(cast='weight')")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("merge", [False, True], ids=["norms", "norms+merge"])
def test_transformers_models(device, config_name, norms_fused, dtype, merge):
    transformers = _transformers()
    torch.manual_seed(0)
    config = _tiny(config_name)
    model_cls = transformers.T5EncoderModel if config_name == "T5Config" else transformers.AutoModel
    model = (model_cls(config) if config_name == "T5Config" else model_cls.from_config(config)).to(device, dtype)
    _randomize(model).eval()  # eval: no dropout between the runs compared
    before, keys = copy.deepcopy(model), list(model.state_dict())
    report = fusedkernels.fuse(model, merge=merge)
    assert list(model.state_dict()) == keys
    norms = [e for e in report.entries if "Norm" in e.original]
    assert norms, str(report)
    assert all(e.status == "swapped" and e.fused == norms_fused for e in norms), str(report)
    if merge and config_name in ("LlamaConfig", "MistralConfig", "Qwen2Config", "GemmaConfig"):
        assert sum(e.fused.startswith("FusedMLP") for e in report.swapped) == 2, str(report)
    ids = torch.randint(0, 64, (2, 9), device=device)
    embeds = before.get_input_embeddings()(ids).detach()
    dy = torch.randn(embeds.shape, device=device, dtype=dtype)
    results = []
    for m, x in ((before, embeds), (model, embeds), (copy.deepcopy(before).double(), embeds.double())):
        x = x.clone().requires_grad_()
        y = m(inputs_embeds=x).last_hidden_state
        results.append((y.detach(), torch.autograd.grad(y, x, dy.to(y.dtype))[0]))
    (y_before, dx_before), (y_after, dx_after), (y_ref, dx_ref) = results
    assert_close_to_ref(y_after, y_ref, y_before, "last_hidden_state", floor=1e-5)
    assert_close_to_ref(dx_after, dx_ref, dx_before, "inputs_embeds grad", floor=1e-5)


def _counting(monkeypatch, name):
    """Counts the calls of fusedkernels.ops.<name> (what the fused forwards call)."""
    calls, op = [], getattr(fusedkernels.ops, name)
    monkeypatch.setattr(fusedkernels.ops, name, lambda *a, **k: calls.append(1) or op(*a, **k))
    return calls


def _loss_and_grads(model, ids, labels, **kwargs):
    out = model(input_ids=ids, labels=labels, **kwargs)
    params = dict(model.named_parameters())
    return out, dict(zip(params, torch.autograd.grad(out.loss, list(params.values()))))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config_name", ["LlamaConfig", "MistralConfig", "Qwen2Config"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transformers_causal_lm_rotary_and_loss(monkeypatch, device, config_name, dtype):
    transformers = _transformers()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_tiny(config_name)).to(device, dtype)
    _randomize(model).train()  # no dropout in these configs: train mode is deterministic
    before, keys, params = copy.deepcopy(model), list(model.state_dict()), dict(model.named_parameters())
    report = fusedkernels.fuse(model)
    assert list(model.state_dict()) == keys and dict(model.named_parameters()) == params
    statuses = _statuses(report)
    assert statuses[""] == ("swapped", f"{config_name[:-6]}ForCausalLM + ops.linear_cross_entropy"), str(report)
    for i in range(2):
        assert statuses[f"model.layers.{i}.self_attn"] == (
            "swapped", f"{config_name[:-6]}Attention + ops.apply_rotary"), str(report)
    assert statuses["model.rotary_emb"] == (
        "swapped", f"{config_name[:-6]}RotaryEmbedding + ops.rotary_cos_sin"), str(report)
    assert isinstance(model, type(before)) and type(model).__name__ == type(before).__name__

    rotary, lce = _counting(monkeypatch, "apply_rotary"), _counting(monkeypatch, "linear_cross_entropy")
    tables = _counting(monkeypatch, "rotary_cos_sin")
    ids = torch.randint(0, 64, (2, 9), device=device)
    labels = ids.clone()
    labels[0, :3] = labels[1, 5] = -100
    ref_model = copy.deepcopy(before).double()
    # bf16: every fused op rounds differently from eager, and two layers carry that into the one loss value, where
    # eager's own error can be luckily small: a bf16 ulp of slack past twice it
    floor = 1e-5 if dtype == torch.float32 else 2.0 ** -8
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(5, device=device)}):
        out_before, g_before = _loss_and_grads(before, ids, labels, **kwargs)
        out_after, g_after = _loss_and_grads(model, ids, labels, **kwargs)
        out_ref, g_ref = _loss_and_grads(ref_model, ids, labels, **kwargs)
        assert out_after.logits is None and out_after.loss.dtype == out_before.loss.dtype
        assert_close_to_ref(out_after.loss, out_ref.loss, out_before.loss, "loss", floor=floor)
        for name in g_before:
            assert_grad_close_to_ref(g_after[name], g_ref[name], g_before[name], name, floor=floor)
    assert len(rotary) == 2 * 2 and len(lce) == 2  # 2 layers x 2 calls; the loss fused (logits None above)
    assert len(tables) == 2  # one table a forward

    with torch.no_grad():
        for kwargs in ({}, {"logits_to_keep": 3}):
            logits = model(input_ids=ids, **kwargs).logits
            assert_close_to_ref(logits, ref_model(input_ids=ids, **kwargs).logits, before(input_ids=ids, **kwargs).logits,
                                "logits", floor=floor)
        loss, *rest = model(input_ids=ids, labels=labels, return_dict=False)  # logits left out, as a None field
        assert len(rest) == len(before(input_ids=ids, labels=labels, return_dict=False)) - 2

    again = fusedkernels.fuse(model)
    assert not again.swapped and {"", "model.layers.0.self_attn", "model.rotary_emb"} <= {
        e.path for e in again.already_fused}, str(again)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}],
                         ids=["default", "linear", "yarn", "llama3"])
def test_transformers_rotary_embedding_tables_equal_hf(device, rope):
    """The fused rotary embedding's (cos, sin) equal the module's own, bit for bit, for the rope types whose
    frequencies are fixed (YaRN's attention_scaling != 1 included), in every dtype, on HF's own call."""
    transformers = _transformers()
    extra = {} if rope is None else {"rope_scaling": rope}  # (transformers 5 takes it into rope_parameters)
    model = transformers.AutoModelForCausalLM.from_config(_tiny("LlamaConfig", **extra)).to(device)
    rotary = model.model.rotary_emb
    before = copy.deepcopy(rotary)
    statuses = _statuses(fusedkernels.fuse(model))
    assert statuses["model.rotary_emb"] == ("swapped", "LlamaRotaryEmbedding + ops.rotary_cos_sin"), statuses
    assert type(rotary).__name__ == "LlamaRotaryEmbedding" and isinstance(rotary, type(before))
    ids = torch.arange(300, device=device)[None] + torch.tensor([[0], [7000]], device=device)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(2, 300, 32, device=device, dtype=dtype)
        for got, want in zip(rotary(x, ids), before(x, ids)):
            assert got.dtype == want.dtype and torch.equal(got, want)


def test_transformers_rotary_embedding_left_where_it_differs(monkeypatch):
    """Dynamic rope types (frequencies recomputed with the length) are left; so is a rotary embedding whose forward
    computes another table (the probe), or reads more of the module."""
    transformers = _transformers()
    dynamic = transformers.AutoModelForCausalLM.from_config(_tiny(
        "LlamaConfig", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    entry = next(e for e in fusedkernels.fuse(dynamic).entries if e.path == "model.rotary_emb")
    assert entry.status == "left" and "rope_type 'dynamic'" in entry.reason, entry

    from transformers.models.llama import modeling_llama

    class Shifted(modeling_llama.LlamaRotaryEmbedding):
        def forward(self, x, position_ids):
            cos, sin = super().forward(x, position_ids + 1)
            return cos, sin

    class Offset(modeling_llama.LlamaRotaryEmbedding):
        def forward(self, x, position_ids):
            freqs = (position_ids[..., None].float() + self.offset) * self.inv_freq
            emb = torch.cat((freqs, freqs), -1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    class Float64Table(modeling_llama.LlamaRotaryEmbedding):  # one rounding away from HF's table at most
        def forward(self, x, position_ids):
            freqs = position_ids[..., None].float() * self.inv_freq.float()
            emb = torch.cat((freqs, freqs), -1).double()
            return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    for cls, reason in ((Shifted, "the probe found a difference"), (Offset, "self.offset"),
                        (Float64Table, "values differ")):
        model = transformers.AutoModelForCausalLM.from_config(_tiny("LlamaConfig"))
        model.model.rotary_emb.__class__ = cls
        model.model.rotary_emb.offset = 0.0
        entry = next(e for e in fusedkernels.fuse(model).entries if e.path == "model.rotary_emb")
        assert entry.status == "left" and reason in entry.reason, entry
        assert type(model.model.rotary_emb) is cls

    per_type = transformers.AutoModelForCausalLM.from_config(_tiny("LlamaConfig"))
    per_type.model.rotary_emb.rope_type = {}  # (ESM's: a dict, but one inv_freq and no table per layer type)
    entry = next(e for e in fusedkernels.fuse(per_type).entries if e.path == "model.rotary_emb")
    assert entry.status == "left" and "without a table per layer type" in entry.reason, entry


def _tiny_gemma3():
    transformers = _transformers()
    if not hasattr(transformers, "Gemma3TextConfig"):
        pytest.skip("this transformers has no Gemma 3")
    config = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4)
    return transformers.Gemma3ForCausalLM(config)


def test_transformers_per_layer_type_rotary_embedding():
    """Gemma 3's rotary embedding (one table per layer type, forward(x, position_ids, layer_type); older
    transformers: one module per type): swapped, every table equal to HF's bit for bit, the loss unchanged."""
    torch.manual_seed(0)
    model = _tiny_gemma3()
    before = copy.deepcopy(model)
    report = fusedkernels.fuse(model)
    rotary = [e for e in report.entries if "rotary_emb" in e.path]
    assert rotary and all(e.status == "swapped" and e.fused.endswith("+ ops.rotary_cos_sin") for e in rotary), str(report)
    ids = torch.arange(300)[None] + torch.tensor([[0], [5000]])
    x = torch.randn(2, 300, 32, dtype=torch.bfloat16)
    for e in rotary:
        fused, plain = model.get_submodule(e.path), before.get_submodule(e.path)
        types = list(plain.rope_type) if isinstance(plain.rope_type, dict) else [None]
        for layer_type in types:
            extra = () if layer_type is None else (layer_type,)
            assert all(torch.equal(a, b) for a, b in zip(fused(x, ids, *extra), plain(x, ids, *extra))), layer_type
    ids = torch.randint(0, 64, (2, 9))
    out, want = model(input_ids=ids, labels=ids), before(input_ids=ids, labels=ids)
    assert abs(out.loss.item() - want.loss.item()) < 1e-5  # (the fused loss rounds in its own order)
    assert not fusedkernels.fuse(model).swapped


def test_transformers_per_layer_type_rotary_embedding_left_where_it_reads_more():
    model = _tiny_gemma3()
    rotary = model.model.rotary_emb
    if not isinstance(rotary.rope_type, dict):
        pytest.skip("this transformers has one rotary module per layer type")
    base = type(rotary)

    class Scaled(base):
        def forward(self, x, position_ids, layer_type):
            cos, sin = super().forward(x, position_ids, layer_type)
            return cos * self.extra, sin

    rotary.__class__, rotary.extra = Scaled, 1.0
    entry = next(e for e in fusedkernels.fuse(model).entries if e.path == "model.rotary_emb")
    assert entry.status == "left" and "reads more of the module" in entry.reason, entry


def test_transformers_fused_rotary_embedding_defers_what_the_op_does_not_take():
    """Position ids that are not integers, an x that is not floating point or on another device than the ids: the
    fused module runs HF's own forward (whatever it returns or raises)."""
    transformers = _transformers()
    model = transformers.AutoModelForCausalLM.from_config(_tiny("LlamaConfig"))
    before = copy.deepcopy(model.model.rotary_emb)
    fusedkernels.fuse(model)
    rotary = model.model.rotary_emb
    ids = torch.arange(7)[None]
    calls = [(torch.randn(1, 7, 32), ids > 2), (torch.randn(1, 7, 32), ids.double() * 0.5),
             (torch.randint(0, 5, (1, 7, 32)), ids), (torch.randn(1, 7, 32, device="meta"), ids)]
    for x, position_ids in calls:
        try:
            want = before(x, position_ids)
        except Exception as e:  # noqa: BLE001 - the fused module must raise the same
            with pytest.raises(type(e)):
                rotary(x, position_ids)
            continue
        got = rotary(x, position_ids)
        assert all(g.dtype == w.dtype and g.device == w.device and (w.is_meta or torch.equal(g, w))
                   for g, w in zip(got, want))


def test_transformers_fused_causal_lm_keeps_hf_signature_and_compiles():
    """transformers reads the forward's signature (generate: the attention mask from pad ids and logits_to_keep;
    Trainer: label names, the columns its collator keeps): the switched class keeps the original's. Under
    torch.compile the class's own forward runs (the loss as the unfused model's)."""
    transformers = _transformers()
    import inspect

    torch.manual_seed(0)
    model = _randomize(transformers.AutoModelForCausalLM.from_config(_tiny("LlamaConfig", pad_token_id=0))).train()
    before = copy.deepcopy(model)
    fusedkernels.fuse(model)
    assert inspect.signature(type(model).forward) == inspect.signature(type(before).forward)
    assert inspect.signature(model.forward) == inspect.signature(before.forward)
    from transformers.utils import find_labels
    assert find_labels(type(model)) == find_labels(type(before)) == ["labels"]
    ids = torch.randint(1, 64, (2, 12))
    compiled = torch.compile(model, backend="eager")(input_ids=ids, labels=ids)
    assert compiled.logits is not None  # (the class's own forward)
    assert abs(compiled.loss.item() - before(input_ids=ids, labels=ids).loss.item()) < 1e-5
    model.eval()
    before.eval()
    prompt = torch.tensor([[5, 9, 11, 0]])  # ends in the pad id: generate masks it, for both
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), before.generate(prompt, **kwargs))


def test_transformers_fused_rotary_embedding_defers_split_devices():
    """inv_freq on another device than x and the ids: HF's forward (which moves inv_freq) runs."""
    transformers = _transformers()
    model = transformers.AutoModel.from_config(_tiny("LlamaConfig"))
    before = copy.deepcopy(model.rotary_emb)
    fusedkernels.fuse(model)
    x, ids = torch.zeros(1, device="meta"), torch.arange(4, device="meta")[None]
    got, want = model.rotary_emb(x, ids), before(x, ids)
    assert all(g.is_meta and g.shape == w.shape and g.dtype == w.dtype for g, w in zip(got, want))


def test_transformers_fused_causal_lm_pickles(tmp_path):
    """torch.save / torch.load of a whole fused model (the class-switched rotary embedding, attention and causal-LM
    classes pickle through their factories): the loaded model is fused the same way and computes the same."""
    transformers = _transformers()
    torch.manual_seed(0)
    model = _randomize(transformers.AutoModelForCausalLM.from_config(_tiny("LlamaConfig"))).train()
    report = fusedkernels.fuse(model)
    assert {"", "model.rotary_emb", "model.layers.0.self_attn"} <= {e.path for e in report.swapped}, str(report)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for path in ("", "model.rotary_emb", "model.layers.0.self_attn"):
        assert type(loaded.get_submodule(path)) is type(model.get_submodule(path)), path
    ids = torch.randint(0, 64, (2, 9))
    out, want = loaded(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    assert out.logits is None and torch.equal(out.loss, want.loss)
    again = fusedkernels.fuse(loaded)
    assert not again.swapped, str(again)


def _fused_llama():
    """(a tiny Llama in training mode after fuse(), an unfused copy, input ids)."""
    transformers = _transformers()
    torch.manual_seed(0)
    model = _randomize(transformers.AutoModelForCausalLM.from_config(_tiny("LlamaConfig"))).train()
    before = copy.deepcopy(model)
    fusedkernels.fuse(model)
    return model, before, torch.randint(0, 64, (2, 9))


def test_transformers_new_instances_of_a_fused_class_are_fused_by_fuse():
    """A model built from a fused model's class (type(model)(config), from_pretrained on it) has its class's own
    forward until fuse() probes it: fuse() swaps it (not "already fused") and its loss then skips the logits."""
    model, _, ids = _fused_llama()
    fresh = type(model)(model.config).train()
    assert fresh(input_ids=ids, labels=ids).logits is not None  # not fused yet: the class's own forward
    report = fusedkernels.fuse(fresh)
    assert [e.status for e in report.entries if e.path == ""] == ["swapped"], str(report)
    assert fresh(input_ids=ids, labels=ids).logits is None
    assert [e.status for e in fusedkernels.fuse(fresh).entries if e.path == ""] == ["already fused"]


def test_transformers_fused_loss_only_where_it_computes_the_same():
    """The fused LM-head loss runs in training mode with labels and a plain nn.Linear head: evaluation keeps its
    logits (metrics read them, as Liger-Kernel's rule); a head wrapped (a LoRA-style adapter) or hooked after fuse()
    takes the original forward, so the adapter trains and the hook runs; return_dict=False tuples drop exactly the
    logits (a MoE model's aux_loss stays)."""
    transformers = _transformers()
    model, before, ids = _fused_llama()
    assert model(input_ids=ids, labels=ids).logits is None
    with torch.no_grad():
        out, want = model.eval()(input_ids=ids, labels=ids), before.eval()(input_ids=ids, labels=ids)
    assert out.logits is not None and torch.equal(out.logits, want.logits) and torch.equal(out.loss, want.loss)
    model.train(), before.train()

    class LoRA(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.a = base, torch.nn.Parameter(torch.randn(4, base.in_features) * 0.5)
            self.b = torch.nn.Parameter(torch.randn(base.out_features, 4) * 0.5)

        def forward(self, x):
            return self.base(x) + x @ self.a.t() @ self.b.t()

    for m in (model, before):
        torch.manual_seed(1)
        m.lm_head = LoRA(m.lm_head)
    out, want = model(input_ids=ids, labels=ids), before(input_ids=ids, labels=ids)
    assert torch.equal(out.loss, want.loss) and out.logits is not None
    out.loss.backward()
    assert model.lm_head.a.grad is not None

    model.lm_head, calls = model.lm_head.base, []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    assert model(input_ids=ids, labels=ids).logits is not None and calls
    handle.remove()

    # a MoE model whose config asks for the router loss: probed on the head and loss alone, fused
    moe = _randomize(transformers.AutoModelForCausalLM.from_config(
        _tiny("MixtralConfig", num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
              output_router_logits=True))).train()
    plain = copy.deepcopy(moe)
    assert _statuses(fusedkernels.fuse(moe))[""][0] == "swapped"
    got = moe(input_ids=ids, labels=ids, return_dict=False)
    want = plain(input_ids=ids, labels=ids, return_dict=False)
    assert len(got) == len(want) - 1  # (loss, aux_loss, [logits dropped], ...)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1])


def test_transformers_fused_loss_leaves_lm_head_to_other_readers_and_follows_logit_settings():
    """Only the forward's own `self.lm_head` gets the pass-through: a layer hook reading model.lm_head during the
    labelled forward gets the nn.Linear and logits. A config value that changes the logits, set after fuse(), sends
    the forward back to the class's own (the probe saw the old value)."""
    transformers = _transformers()
    model, _, ids = _fused_llama()
    seen = []
    model.model.layers[0].register_forward_hook(
        lambda module, args, out: seen.append((type(model.lm_head), model.lm_head(out[0] if isinstance(out, tuple) else out).shape)))
    assert model(input_ids=ids, labels=ids).logits is None  # the fused loss ran
    assert seen == [(torch.nn.Linear, torch.Size([2, 9, 64]))]
    assert type(model.get_output_embeddings()) is torch.nn.Linear

    gemma = _randomize(transformers.AutoModelForCausalLM.from_config(_tiny(
        "Gemma2Config", num_key_value_heads=2, head_dim=8, final_logit_softcapping=None, attn_logit_softcapping=None))).train()
    plain = copy.deepcopy(gemma)
    assert _statuses(fusedkernels.fuse(gemma))[""][0] == "swapped"
    for m in (gemma, plain):
        m.config.final_logit_softcapping = 0.5
    out, want = gemma(input_ids=ids, labels=ids), plain(input_ids=ids, labels=ids)
    assert out.logits is not None and torch.allclose(out.loss, want.loss, atol=1e-6)


@pytest.mark.parametrize("config_name", ["PhiConfig", "StableLmConfig"])
def test_transformers_partial_rotary(config_name):
    """Partial rotary (rotary_ndims < head_dim: Phi, StableLM): the rotated width is probed and fused; loss and
    gradients as the unfused model's."""
    transformers = _transformers()
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = _randomize(transformers.AutoModelForCausalLM.from_config(config)).train()
    assert model.model.layers[0].self_attn.rotary_ndims < model.model.layers[0].self_attn.head_dim
    before = copy.deepcopy(model)
    statuses = _statuses(fusedkernels.fuse(model))
    assert statuses["model.layers.0.self_attn"][0] == "swapped", statuses
    ids = torch.randint(0, 64, (2, 9))
    out_after, g_after = _loss_and_grads(model, ids, ids)
    out_before, g_before = _loss_and_grads(before, ids, ids)
    assert abs(out_after.loss.item() - out_before.loss.item()) < 1e-5
    for name in g_before:
        assert max_err(g_after[name], g_before[name]) < 1e-5, name


def test_transformers_rotary_of_interleaved_pairs_is_left():
    """Cohere's apply_rotary_pos_emb (interleaved pairs) is left even with freshly initialised weights, where the
    attention probe alone cannot see the rotation (scores ~1e-4)."""
    transformers = _transformers()
    config = transformers.CohereConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2)
    model = transformers.CohereForCausalLM(config)
    report = fusedkernels.fuse(model, lm_head_loss=False)
    entry = next(e for e in report.entries if e.path == "model.layers.0.self_attn")
    assert entry.status == "left" and "another rotation" in entry.reason, str(report)


def test_transformers_lm_head_loss_opt_out_keeps_logits():
    transformers = _transformers()
    model = _randomize(transformers.AutoModelForCausalLM.from_config(_tiny("LlamaConfig")))
    report = fusedkernels.fuse(model, lm_head_loss=False)
    assert report.entries[0].path == "" and report.entries[0].status == "left", str(report)
    assert "lm_head_loss=False" in report.entries[0].reason
    assert _statuses(report)["model.layers.1.self_attn"][0] == "swapped", str(report)
    ids = torch.randint(0, 64, (2, 9))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is not None and out.logits.shape == (2, 9, 64)


def test_transformers_rotary_leaves_a_different_formula(monkeypatch):
    """An apply_rotary_pos_emb of another pairing (GPT-J's interleaved) fails the rotation check: the attention is
    left."""
    transformers = _transformers()
    from transformers.models.llama import modeling_llama

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):
        rot = fusedkernels.ops.llm.rotate_half
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q, True) * sin, k * cos + rot(k, True) * sin

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", interleaved)
    model = _randomize(transformers.AutoModelForCausalLM.from_config(_tiny("LlamaConfig")))
    statuses = {e.path: e for e in fusedkernels.fuse(model).entries}
    assert statuses["model.layers.0.self_attn"].status == "left"
    assert "another rotation" in statuses["model.layers.0.self_attn"].reason


# ------------------------------------------------------------------------------------------------
# Conv -> BatchNorm -> ReLU: torchvision's ResNet structure (written out here; torchvision's own where installed)
# ------------------------------------------------------------------------------------------------


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock: attribute names and forward as there."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (expansion 4)."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


def _tiny_resnet():
    """A ResNet-like Sequential: stem (Conv, BN, ReLU, MaxPool), a BasicBlock, a Bottleneck."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, stride=2, padding=1), BasicBlock(8, 8), BasicBlock(8, 16, stride=2),
                         Bottleneck(16, 4), Bottleneck(16, 8, stride=2))


def _trained_bn(model):
    """Random weights and BatchNorm statistics away from their initial 0 / 1, then eval."""
    _randomize(model)
    gen = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model.eval()


def _conv_pairs(model):
    """(conv path, bn path) of every Conv2d -> BatchNorm2d in _tiny_resnet."""
    pairs = [("0", "1")]
    for i, block in enumerate(model[4:], start=4):
        for n in ("1", "2", "3"):
            if hasattr(block, f"conv{n}"):
                pairs.append((f"{i}.conv{n}", f"{i}.bn{n}"))
        if block.downsample is not None:
            pairs.append((f"{i}.downsample.0", f"{i}.downsample.1"))
    return pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_resnet_blocks_fold_and_fuse_with_inference(dtype):
    model = _trained_bn(_tiny_resnet()).to(dtype)
    before = copy.deepcopy(model)
    report = fusedkernels.fuse(model, inference=True)
    pairs = _conv_pairs(before)
    folds = [e for e in report.entries if e.original == "Conv2d + BatchNorm2d"]
    assert [(e.path, e.status, e.fused) for e in folds] == [(c, "swapped", "Conv2d (BatchNorm2d folded)")
                                                            for c, _ in pairs], str(report)
    assert "state_dict keys" in folds[0].reason and "values change" in folds[0].reason
    assert _statuses(report)["0"] == ("swapped", "FusedConv2dReLU")  # the stem, after its fold
    assert len(report.swapped) == len(pairs) + 1 and not report.left, str(report)
    assert type(model[0]) is fnn.FusedConv2dReLU and type(model[1]) is nn.Identity and type(model[2]) is nn.Identity
    assert all(type(model.get_submodule(bn)) is nn.Identity for _, bn in pairs)
    keys = set(model.state_dict())
    assert not any(k.startswith(tuple(f"{bn}." for _, bn in pairs)) for k in keys)
    assert all(f"{conv}.bias" in keys for conv, _ in pairs)  # the fold gives each conv a bias
    ref = copy.deepcopy(before).double()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32, dtype=dtype)
        assert_close_to_ref(model(x), ref(x.double()), before(x), "output", floor=1e-5)
    state, structure = copy.deepcopy(model.state_dict()), repr(model)
    again = fusedkernels.fuse(model, inference=True)
    assert not again.swapped and not again.left and [e.path for e in again.already_fused] == ["0"]
    assert repr(model) == structure and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_conv_pairs_without_inference_are_left_with_reasons():
    model = _trained_bn(_tiny_resnet())
    before, params = copy.deepcopy(model), _params(model)
    report = fusedkernels.fuse(model)
    assert not report.swapped and all("inference=True" in e.reason for e in report.left), str(report)
    assert [e.path for e in report.left] == [c for c, _ in _conv_pairs(model)]
    report = fusedkernels.fuse(model, merge=True)  # merge alone folds nothing: the stem's ReLU follows a BatchNorm
    assert not report.swapped and all(torch.equal(p, before.get_parameter(n)) for n, p in params.items())
    assert all(model.get_parameter(n) is p for n, p in params.items())

    model.train()  # training-mode BatchNorm: batch statistics, nothing to fold, with or without inference=True
    for inference in (False, True):
        report = fusedkernels.fuse(model, inference=inference)
        assert not report.swapped and all("batch statistics" in e.reason for e in report.left), str(report)
    assert type(model[1]) is nn.BatchNorm2d and type(model[4].bn1) is nn.BatchNorm2d


def test_bn_folding_needs_the_whole_parent_in_eval():
    """The probe runs the parent's forward: a training-mode BatchNorm elsewhere in it would have its running
    statistics updated, so the pair is left."""
    block = _trained_bn(BasicBlock(8, 8))
    block.bn2.train()
    model = nn.Sequential(block)
    mean = block.bn2.running_mean.clone()
    report = fusedkernels.fuse(model, inference=True)
    assert _statuses(report) == {"0.conv1": ("left", ""), "0.conv2": ("left", "")}, str(report)
    assert "model.eval()" in report.entries[0].reason and "batch statistics" in report.entries[1].reason
    assert torch.equal(block.bn2.running_mean, mean) and type(block.bn1) is nn.BatchNorm2d


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FUSE_DTYPES, ids=str)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_relu_with_merge(device, dtype, padding_mode):
    """merge=True: Conv2d + ReLU -> FusedConv2dReLU in training mode too, parameters and keys kept, gradients
    checked; a grouped conv is left (FusedConv2dReLU would run it through the reference)."""
    model = _randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode), nn.ReLU(),
                                     nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
                                     nn.Conv2d(8, 4, 1), nn.Tanh())).to(device, dtype)
    before, params, keys = copy.deepcopy(model), _params(model), list(model.state_dict())
    report = fusedkernels.fuse(model, merge=True)
    assert _statuses(report) == {"0": ("swapped", "FusedConv2dReLU"), "2": ("left", "")}, str(report)
    assert report.entries[0].original == "Conv2d + ReLU" and "grouped" in report.entries[1].reason
    assert [type(m) for m in model] == [fnn.FusedConv2dReLU, nn.Identity, nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Tanh]
    assert all(model.get_parameter(n) is p for n, p in params.items()) and list(model.state_dict()) == keys
    x = torch.randn(2, 3, 10, 10, device=device, dtype=dtype)
    _assert_same_computation(before, model, copy.deepcopy(before).double(), x,
                             torch.randn(2, 4, 10, 10, device=device, dtype=dtype))


def test_conv_relu_without_merge_and_shared_convs_are_left():
    conv = nn.Conv2d(3, 4, 3)
    model = nn.ModuleDict({"a": nn.Sequential(conv, nn.ReLU()), "b": nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())})
    report = fusedkernels.fuse(model)
    assert [(e.path, e.status) for e in report.entries] == [("a.0", "left"), ("b.0", "left")]
    assert "merge=True" in report.entries[0].reason
    model["c"] = nn.Sequential(conv)
    report = fusedkernels.fuse(model, merge=True)
    assert _statuses(report) == {"a.0": ("left", ""), "b.0": ("swapped", "FusedConv2dReLU")}
    assert "elsewhere" in report.entries[0].reason and type(conv) is nn.Conv2d


def test_shared_or_tied_convs_are_not_folded():
    model = _trained_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    model.append(nn.Sequential(model[0]))
    model.extra = nn.Conv2d(4, 4, 1)
    model.extra.weight = model[2].weight
    report = fusedkernels.fuse(model, inference=True)
    assert _statuses(report) == {"0": ("left", ""), "2": ("left", "")}, str(report)
    assert "elsewhere" in report.entries[0].reason and "tied" in report.entries[1].reason


def test_torchvision_resnet18():
    models = pytest.importorskip("torchvision.models", reason="torchvision is not installed here (it is on the GPU "
                                                              "machine)")
    torch.manual_seed(0)
    model = _trained_bn(models.resnet18())
    before = copy.deepcopy(model)
    report = fusedkernels.fuse(model, inference=True)
    assert len([e for e in report.swapped if e.original == "Conv2d + BatchNorm2d"]) == 20, str(report)
    assert not report.left, str(report)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        assert_close_to_ref(model(x), copy.deepcopy(before).double()(x.double()), before(x), "logits", floor=1e-5)


def test_a_relu_or_batch_norm_in_several_slots_is_taken_in_each():
    """One nn.ReLU (or BatchNorm2d) module filling several slots: each slot's pair is its own swap, as the swap
    replaces the slot only (the module's other uses keep it), and each is reported, left or swapped."""
    relu = nn.ReLU()
    model = _randomize(nn.Sequential(nn.Conv2d(3, 3, 1), relu, nn.Conv2d(3, 3, 3, padding=1), relu))
    report = fusedkernels.fuse(model)
    assert [(e.path, e.status) for e in report.entries] == [("0", "left"), ("2", "left")], str(report)
    assert all("merge=True" in e.reason for e in report.entries)
    before = copy.deepcopy(model)
    report = fusedkernels.fuse(model, merge=True)
    assert _statuses(report) == {"0": ("swapped", "FusedConv2dReLU"), "2": ("swapped", "FusedConv2dReLU")}
    assert [type(m) for m in model] == [fnn.FusedConv2dReLU, nn.Identity, fnn.FusedConv2dReLU, nn.Identity]
    _assert_same_computation(before, model, copy.deepcopy(before).double(), torch.randn(2, 3, 6, 6),
                             torch.randn(2, 3, 6, 6))

    elsewhere = nn.ModuleDict({"seq": nn.Sequential(nn.Conv2d(3, 4, 1), relu), "act": relu})
    assert _statuses(fusedkernels.fuse(elsewhere, merge=True)) == {"seq.0": ("swapped", "FusedConv2dReLU")}
    assert elsewhere["act"] is relu and type(elsewhere["seq"][1]) is nn.Identity

    bn = nn.BatchNorm2d(4)
    model = _trained_bn(nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), bn))
    before = copy.deepcopy(model)
    report = fusedkernels.fuse(model, inference=True)
    assert _statuses(report) == {"0": ("swapped", "Conv2d (BatchNorm2d folded)"),
                                 "3": ("swapped", "Conv2d (BatchNorm2d folded)")}, str(report)
    assert type(model[1]) is nn.Identity and type(model[4]) is nn.Identity
    with torch.no_grad():
        x = torch.randn(2, 4, 8, 8)
        assert_close_to_ref(model(x), copy.deepcopy(before).double()(x.double()), before(x), "output", floor=1e-5)


def test_folds_that_overflow_float16_are_left():
    """A float16 fold past 65504 (a big weight over a tiny running_var) would make the conv compute inf where
    Conv2d -> BatchNorm2d stays finite: left, with the reason; the same block in float32 folds."""
    model = _trained_bn(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU()))
    with torch.no_grad():
        model[0].weight[0] = 250 + torch.rand(3, 1, 1)  # 250 / sqrt(1e-5) = 79000 > 65504
        model[1].weight.fill_(1.0)
        model[1].running_var[0] = 0.0
    half = copy.deepcopy(model).half()
    x = (1e-3 * torch.randn(2, 3, 8, 8)).half()
    assert torch.isfinite(half(x)).all()
    report = fusedkernels.fuse(half, inference=True)
    assert [(e.path, e.status) for e in report.entries] == [("0", "left")], str(report)
    assert "overflows float16" in report.entries[0].reason
    assert type(half[1]) is nn.BatchNorm2d and torch.equal(half[0].weight, model[0].weight.half())
    report = fusedkernels.fuse(model, inference=True)
    assert [e.fused for e in report.swapped] == ["Conv2d (BatchNorm2d folded)", "FusedConv2dReLU"], str(report)


def _scriptable(kind):
    """(model, input, how to fuse, swaps): a model torch.jit.script takes, of conv blocks or Linear layers."""
    if kind == "linear":
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Sequential(nn.Linear(32, 64), nn.SiLU(),
                                                                         nn.Linear(64, 16)))
        return _randomize(model), torch.randn(3, 16), {"merge": True}, 2
    model = _trained_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding="same", padding_mode="reflect"), nn.ReLU(),
                                      nn.Conv2d(8, 4, 1), nn.ReLU()))
    # merge=True: the Conv2d + ReLU pairs; inference=True: the fold too
    return model, torch.randn(2, 3, 10, 10), {kind.removeprefix("conv-"): True}, 2 if kind == "conv-merge" else 4


@pytest.mark.parametrize("kind", ["conv-merge", "conv-inference", pytest.param("linear", marks=pytest.mark.skipif(
    not _native.has_op("linear_act"), reason="needs the native gemm ops (FusedLinear, FusedMLP script on them)"))])
def test_fused_models_script_as_before(kind):
    """A model torch.jit.script took before fuse() takes it after, and the scripted model computes what the eager
    fused one does."""
    model, x, how, swaps = _scriptable(kind)
    torch.jit.script(model)
    report = fusedkernels.fuse(model, **how)
    assert len(report.swapped) == swaps, str(report)
    assert max_err(torch.jit.script(model)(x), model(x)) == 0.0


def test_refuses_models_wrapped_for_distributed_training(tmp_path):
    """DDP / fully_shard before fuse(): a swap would bring parameters the wrapper does not synchronise."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8))
        ddp = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(ValueError, match="the model is wrapped by DistributedDataParallel; call fuse"):
            fusedkernels.fuse(ddp, merge=True)
        outer = nn.Sequential(ddp)
        with pytest.raises(ValueError, match="0 is wrapped by DistributedDataParallel"):
            fusedkernels.fuse(outer)
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            return
        sharded = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        fully_shard(sharded[0], mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ValueError, match="0 is wrapped by fully_shard"):
            fusedkernels.fuse(sharded)
        assert "swapped" in str(fusedkernels.fuse(model))  # unwrapped, it fuses as before
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# What the probe alone cannot see: the training flag, the input's rank, what a forward reads, its signature
# ------------------------------------------------------------------------------------------------


class FunctionalDropoutMLP(nn.Module):
    """A Llama-style gated MLP with F.dropout inside its forward (DETR's MLPs drop out this way)."""

    def __init__(self, n, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(n, hidden, bias=False), nn.Linear(n, hidden, bias=False)
        self.down_proj, self.act_fn = nn.Linear(hidden, n, bias=False), nn.SiLU()

    def forward(self, x):
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(F.dropout(h, 0.3, self.training))


class HFStyleNorm(nn.Module):
    """Hugging Face's RMSNorm structure (a weight and variance_epsilon), forwards given per test."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(1 + 0.2 * torch.randn(n)), 1e-6

    def _rms(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)

    def forward(self, x):
        return self.weight * self._rms(x)


class EvalHalvedNorm(HFStyleNorm):
    def forward(self, x):
        return self.weight * self._rms(x) * (1.0 if self.training else 0.5)


class RankClampedNorm(HFStyleNorm):
    def forward(self, x):
        y = self.weight * self._rms(x)
        return y.clamp(-1, 1) if x.dim() == 2 else y


class ScheduledNorm(HFStyleNorm):
    scale = 1.0

    def forward(me, x):  # (any name for the module)
        return me.weight * me._rms(x) * me.scale


class GatedNorm(HFStyleNorm):
    def forward(self, x, gate=None):
        y = self.weight * self._rms(x)
        return y if gate is None else y * F.silu(gate)


def test_modules_whose_output_follows_the_training_flag_are_left_in_either_mode():
    for mode in (True, False):
        model = nn.Sequential(FunctionalDropoutMLP(16, 32), EvalHalvedNorm(16)).train(mode)
        report = fusedkernels.fuse(model, merge=True)
        assert [e.status for e in report.entries] == ["left", "left"], str(report)
        assert all("training" in e.reason or "random" in e.reason for e in report.entries), str(report)
        assert [m.training for m in model.modules()] == [mode] * len(list(model.modules()))
    model = nn.Sequential(HFStyleNorm(16)).eval()  # the plain one is still swapped
    assert fusedkernels.fuse(model).entries[0].status == "swapped"


def test_norms_are_probed_on_2d_inputs_too_and_left_for_what_their_forward_reads_or_takes():
    cases = {RankClampedNorm: "2-D input", ScheduledNorm: "reads self.scale", GatedNorm: "more than the input"}
    for cls, reason in cases.items():
        model = nn.Sequential(cls(64))
        (entry,) = fusedkernels.fuse(model).entries
        assert entry.status == "left" and reason in entry.reason, (cls.__name__, str(entry))
        assert type(model[0]) is cls


def test_a_swapped_hf_norm_keeps_variance_epsilon():
    model = nn.Sequential(HFStyleNorm(16))
    assert fusedkernels.fuse(model).entries[0].status == "swapped"
    assert model[0].variance_epsilon == model[0].eps == 1e-6
    model[0].variance_epsilon = 1e-3
    assert model[0].eps == 1e-3


def test_merge_leaves_the_rng_alone_and_makes_trainable_parameters_in_inference_mode():
    model = _randomize(nn.Sequential(nn.LayerNorm(16), nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with torch.inference_mode():
        report = fusedkernels.fuse(model, merge=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert [e.status for e in report.entries] == ["swapped", "swapped"], str(report)
    assert not any(p.is_inference() for p in model.parameters())
    x = torch.randn(3, 16)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.load_state_dict(model.state_dict())


@pytest.mark.parametrize("how", ["inference", "merge"])
def test_what_fuse_makes_is_ordinary_inside_inference_mode(how):
    """Fused inside torch.inference_mode(), each family fuse() rewrites (norms, Linear + activation, MLP blocks,
    BatchNorm folds, Conv2d + ReLU) leaves no inference tensor in the model: outside it, the model computes what it
    did and trains."""
    model = _trained_bn(nn.ModuleDict({
        "vec": nn.Sequential(nn.LayerNorm(16), LlamaRMSNorm(16), nn.Linear(16, 16), nn.GELU(),
                             nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 16))),
        "img": nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                             nn.ReLU())}))
    before = copy.deepcopy(model)
    with torch.inference_mode():
        report = fusedkernels.fuse(model, **{how: True})
    fused = {"FusedLayerNorm", "FusedCastRMSNorm(cast='input')", "FusedConv2dReLU"} | (
        {"Conv2d (BatchNorm2d folded)"} if how == "inference" else
        {"FusedLinear(activation='gelu')", "FusedMLP(activation='silu')"})
    assert {e.fused for e in report.swapped} == fused, str(report)
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    for name, x in (("vec", torch.randn(3, 16)), ("img", torch.randn(2, 3, 8, 8))):
        y = model[name](x)
        assert_close_to_ref(y.detach(), copy.deepcopy(before[name]).double()(x.double()), before[name](x), name,
                            floor=1e-5)
        y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rotary_that_returns_q_and_k_in_their_dtype_keeps_it():
    """OLMo's apply_rotary_pos_emb computes with a float32 table and casts q, k back to their dtype; Llama's promotes
    them. The swapped attention must do what its own does."""
    transformers = _transformers()
    if not hasattr(transformers, "OlmoConfig"):
        pytest.skip("this transformers has no OLMo")
    torch.manual_seed(0)
    config = transformers.OlmoConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = _randomize(transformers.OlmoForCausalLM(config)).to(torch.bfloat16).eval()
    before = copy.deepcopy(model)
    report = fusedkernels.fuse(model)
    assert any(e.status == "swapped" and "apply_rotary" in e.fused for e in report.entries), str(report)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want, got = before(ids).logits, model(ids).logits
    assert got.dtype == want.dtype == torch.bfloat16
    ref = copy.deepcopy(before).double()(ids).logits
    assert max_err(got, ref) <= 2 * max_err(want, ref) + 1e-3
