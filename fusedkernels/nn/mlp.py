"""FusedMLP: the transformer MLP block on the fused GEMM ops, Linear -> activation -> Linear or its gated form
down(act(gate(x)) * up(x)) (SwiGLU, GeGLU, ReGLU), with the activation (and the gate's product) in the first GEMM's
epilogue and an optional residual add in the second's.

Its state_dict loads from the modules it replaces, nn.Sequential(nn.Linear, act, nn.Linear) and Llama-style gated
MLPs (gate_proj / up_proj / down_proj), and can be written in their layout (`state_dict_layout`), so a model with
a FusedMLP swapped in keeps its checkpoint keys. Details: docs/gemm.md.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import gemm as ops

LAYOUTS = ("native", "sequential", "llama")


class FusedMLP(nn.Module):
    """`Linear -> activation -> Linear` (a plain activation) or `down(act(gate(x)) * up(x))` (a gated one) computed by
    fusedkernels.ops.linear_act / linear_gated: the first GEMM applies the activation (gated: one GEMM over the
    stacked gate and up weights), the second adds the residual. Both forms run as one op (`fusedkernels.ops.mlp`,
    `fusedkernels.ops.gated_mlp`), whose backward applies the activation's derivative in the epilogue of the GEMM
    that produces the hidden layer's gradient (docs/gemm.md). Under torch.func transforms the references run, as
    the ops'.

    Args:
        in_features: x's last dimension.
        hidden_features: the hidden width H (gated: the intermediate size, the gate's and the up projection's
            width each).
        out_features: the output's last dimension; default in_features.
        bias: biases on both projections.
        activation: plain "none", "relu", "gelu" (erf), "gelu_tanh", "silu", "squared_relu", or gated "swiglu"
            (silu gate), "geglu" (erf gelu), "geglu_tanh" (tanh gelu), "reglu" (relu) (Shazeer 2020, "GLU Variants
            Improve Transformer").
        state_dict_layout: the keys state_dict() writes: "native", "sequential" (nn.Sequential's; plain
            activations) or "llama" (gated ones). Whatever this says, load_state_dict takes both layouts of the
            module's kind: native and sequential keys for a plain activation, native and llama keys for a gated one.
        device, dtype: of the parameters.

    Parameters, native keys (each projection an nn.Linear, initialised as nn.Linear initialises itself):
        plain: fc1.weight [H, in_features], fc1.bias [H], fc2.weight [out_features, H], fc2.bias [out_features]
        gated: gate_up_proj.weight [2H, in_features] (the gate's H rows, then the up projection's),
            gate_up_proj.bias [2H] (likewise), down_proj.weight [out_features, H], down_proj.bias [out_features]
    Other layouts, loaded (and written with state_dict_layout):
        "sequential": 0.weight, 0.bias, 2.weight, 2.bias (nn.Sequential(nn.Linear, act, nn.Linear))
        "llama": gate_proj.weight [H, in_features], up_proj.weight, down_proj.weight, and the three biases where
            bias=True (transformers' LlamaMLP); written as views of gate_up_proj's halves (plain tensors, not
            Parameters, under state_dict(keep_vars=True)). A dict with one of gate_proj / up_proj only (a checkpoint
            shard) loads that half, keeps the other and reports its key missing (on the meta device, where the other
            has no data: an error naming both keys).
        The sequential and llama keys are renamings done by state_dict() and load_state_dict(), not attributes:
        tools that look the keys up as attributes (torch.distributed.checkpoint's get_model_state_dict /
        set_model_state_dict, torch.func.functional_call) need the native layout.

    forward(x [..., in_features], residual=None [..., out_features]) -> [..., out_features], x's dtype (the autocast
    dtype under autocast). torch.jit.script compiles a forward on torch.ops.fusedkernels' mlp / gated_mlp
    (a build without the gemm family cannot script it). Raises ValueError for an unknown activation or layout (or
    one that does not fit the activation), TypeError for a str bias (an activation in bias's position) or an
    activation that is not a str; any other bias is taken as nn.Linear takes it (truthy or not).
    """

    # The sequential layout's keys by native projection: nn.Sequential(Linear, act, Linear)'s, or (set by from_module)
    # those of the named nn.Sequential it was made from.
    _sequential_keys = {"fc1.": "0.", "fc2.": "2."}

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None, bias: bool = True,
                 activation: str = "gelu", *, state_dict_layout: str = "native", device=None, dtype=None) -> None:
        if isinstance(bias, str):  # FusedMLP(16, 64, 16, "relu") would otherwise be a gelu MLP with biases
            raise TypeError(f"FusedMLP: bias must be a bool, got {bias!r} (activation comes after it: "
                            f"FusedMLP(in_features, hidden_features, out_features, bias, activation))")
        if not isinstance(activation, str):  # as ops.mlp / gated_mlp raise
            raise TypeError(f"FusedMLP: activation must be a str, got {type(activation).__name__}")
        gated = activation in ops.GATED_ACTIVATIONS
        if not gated and activation not in ops.ACTIVATIONS:
            raise ValueError(f"FusedMLP: activation must be one of {', '.join(ops.ACTIVATIONS)} or gated "
                             f"{', '.join(ops.GATED_ACTIVATIONS)}, got {activation!r}")
        if state_dict_layout not in LAYOUTS:
            raise ValueError(f"FusedMLP: state_dict_layout must be one of {', '.join(LAYOUTS)}, got "
                             f"{state_dict_layout!r}")
        if state_dict_layout == ("sequential" if gated else "llama"):
            raise ValueError(f"FusedMLP: state_dict_layout {state_dict_layout!r} does not fit activation "
                             f"{activation!r} ('sequential' is for plain activations, 'llama' for gated ones)")
        super().__init__()
        out_features = in_features if out_features is None else out_features
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.activation, self.gated, self.state_dict_layout = activation, gated, state_dict_layout
        factory = {"device": device, "dtype": dtype}
        if gated:
            self.gate_up_proj = nn.Linear(in_features, 2 * hidden_features, bias, **factory)
            self.down_proj = nn.Linear(hidden_features, out_features, bias, **factory)
        else:
            self.fc1 = nn.Linear(in_features, hidden_features, bias, **factory)
            self.fc2 = nn.Linear(hidden_features, out_features, bias, **factory)
        self._register_load_state_dict_pre_hook(_to_native_keys, with_module=True)
        self._register_state_dict_hook(_to_layout_keys)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """x [..., in_features], residual None or [..., out_features] -> [..., out_features] (the class docstring)."""
        if torch.jit.is_scripting():  # TorchScript compiles this branch only; hasattr is decided when it compiles
            if hasattr(self, "gate_up_proj"):
                return torch.ops.fusedkernels.gated_mlp(x, self.gate_up_proj.weight, self.gate_up_proj.bias,
                                                        self.down_proj.weight, self.down_proj.bias, self.activation,
                                                        residual)
            return torch.ops.fusedkernels.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                              self.activation, residual)
        transformed = torch._C._are_functorch_transforms_active()  # vmap, grad ...: the references, as the ops run
        if self.gated:
            first, second = self.gate_up_proj, self.down_proj
            mlp = ops._gated_mlp_without_native if transformed else ops._gated_mlp
        else:
            first, second = self.fc1, self.fc2
            mlp = ops._mlp_without_native if transformed else ops._mlp
        return mlp(x, first.weight, first.bias, second.weight, second.bias, self.activation, residual)

    def reset_parameters(self) -> None:
        """Re-initialises every projection as nn.Linear.reset_parameters does (gated: the stacked gate_up_proj as
        one nn.Linear, the distribution two nn.Linear halves would draw from)."""
        for projection in self.children():
            projection.reset_parameters()

    @classmethod
    def from_module(cls, module: nn.Module, activation: Optional[str] = None) -> "FusedMLP":
        """A FusedMLP computing what `module` computes, with a copy of its weights (same device and dtype, each
        parameter's requires_grad, the module's training flag), whose state_dict() writes `module`'s layout.

        module, one of these, with projections that are exactly nn.Linear (a subclass's own forward would be
        dropped), every one with a bias or none:
            nn.Sequential(nn.Linear, act, nn.Linear) (named children keep their names in the sequential layout);
            a Llama-style gated MLP: gate_proj, up_proj, down_proj and act_fn, computing
                down_proj(act_fn(gate_proj(x)) * up_proj(x)) (transformers' LlamaMLP and the MLPs built like it);
            a Phi-3-style gated MLP: gate_up_proj (the gate's rows, then the up projection's), down_proj and
                activation_fn (transformers' Phi3MLP);
            a timm / CLIP-style MLP: fc1, fc2 and act or activation_fn, computing fc2(act(fc1(x))) (timm's Mlp,
                transformers' CLIPMLP); other submodules only nn.Identity or nn.Dropout(p=0);
            a FusedMLP (a copy, with its activation).
        activation: the FusedMLP's; by default identified by evaluating the module's activation on a float64 probe
        (a dense grid around 0 and values out to +-1e3) and comparing with each of FusedMLP's (nn.GELU(),
        nn.SiLU(), nn.ReLU(), transformers' activation classes, ...; in-place ones too).

        The structure is read, not module's forward: a module with these children whose forward combines them
        otherwise is converted as if it computed the forms above (fusedkernels.fuse(model, merge=True) probes both
        before swapping and leaves such a module).

        Raises ValueError for another structure, a projection that is not exactly an nn.Linear, projections sharing a
        parameter (the copy would untie them), an nn.Sequential whose child names collide with fc1 / fc2 elsewhere,
        an activation module holding parameters or buffers, or a dropout with p > 0, parameters of more than one dtype
        or device, biases on some projections only, gate and up halves of which one is frozen and the other not (they
        share one parameter), an activation that matches none of FusedMLP's (clipped ones such as nn.ReLU6
        included), or one that raises on the probe (chained to its exception).
        """
        projections, act, layout = _parts(module)
        gated = "gate_up_proj" in projections
        names = ops.GATED_ACTIVATIONS if gated else ops.ACTIVATIONS
        first, (second,) = projections["gate_up_proj" if gated else "fc1"], projections["down_proj" if gated else "fc2"]
        width = sum(lin.out_features for lin in first)
        if gated and (width % 2 or len({(lin.in_features, lin.out_features) for lin in first}) != 1):
            raise ValueError(f"FusedMLP.from_module: the gate and up projections must have one shape, got "
                             f"{', '.join(map(str, first))}")
        hidden = width // 2 if gated else width
        if second.in_features != hidden:
            raise ValueError(f"FusedMLP.from_module: the projections do not chain: {hidden} hidden features, the "
                             f"last one takes {second.in_features}")
        kinds = {(t.dtype, t.device) for lin in (*first, second) for t in (lin.weight, lin.bias) if t is not None}
        if len(kinds) != 1:
            raise ValueError(f"FusedMLP.from_module: its parameters must share one dtype and device (FusedMLP stacks and "
                             f"casts none of them), got {', '.join(sorted(f'{d} on {v}' for d, v in kinds))}")
        biased = {lin.bias is not None for lin in (*first, second)}
        if len(biased) != 1:
            raise ValueError("FusedMLP.from_module: FusedMLP has biases on every projection or none; this module "
                             "has them on some only")
        if activation is None:
            activation = act if isinstance(act, str) else _identify(act, names)
            if activation is None:
                raise ValueError(f"FusedMLP.from_module: {act} matches none of the activations "
                                 f"{', '.join(names)}; pass activation= to choose one")
        elif activation not in names:
            raise ValueError(f"FusedMLP.from_module: this module takes one of {', '.join(names)}, got {activation!r}")
        w = first[0].weight
        # Built on the meta device, then every parameter copied in: no initialisation drawing the caller's random
        # numbers; outside inference mode, so the copy is a trainable Parameter wherever this runs.
        with torch.inference_mode(False), torch.no_grad():
            mlp = cls(first[0].in_features, hidden, second.out_features, biased.pop(), activation,
                      state_dict_layout=layout, device="meta", dtype=w.dtype).to_empty(device=w.device)
            copied = set()
            for native, linears in projections.items():
                for name in ("weight", "bias"):
                    sources = [getattr(lin, name) for lin in linears]
                    if sources[0] is None:
                        continue
                    if len({p.requires_grad for p in sources}) != 1:
                        raise ValueError(f"FusedMLP.from_module: the gate and up {name}s are stacked in one parameter; "
                                         f"freeze both or neither")
                    target = getattr(getattr(mlp, native), name)
                    target.copy_(torch.cat(sources)).requires_grad_(sources[0].requires_grad)
                    copied.add(f"{native}.{name}")
        if copied != {n for n, _ in mlp.named_parameters()}:  # (to_empty left the rest uninitialised)
            raise RuntimeError(f"FusedMLP.from_module: copied {sorted(copied)}, not every parameter of the FusedMLP")
        if layout == "sequential":  # the Sequential's own child names (an OrderedDict's too), as its keys had them
            if isinstance(module, nn.Sequential):
                names = list(module._modules)
                keys = {"fc1.": names[0] + ".", "fc2.": names[2] + "."}
            else:
                keys = module._sequential_keys
            if keys != FusedMLP._sequential_keys:
                mlp._sequential_keys = dict(keys)
        return mlp.train(module.training)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
             f"out_features={self.out_features}, activation={self.activation!r}")
        return s if self.state_dict_layout == "native" else s + f", state_dict_layout={self.state_dict_layout!r}"


# The structures from_module takes by attribute names: the attributes of each native projection's nn.Linear layers,
# the names the activation goes by, the layout the module's keys use.
_STRUCTURES = (
    ({"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}, ("act_fn",), "llama"),  # LlamaMLP
    ({"gate_up_proj": ("gate_up_proj",), "down_proj": ("down_proj",)}, ("activation_fn",), "native"),  # Phi3MLP
    ({"fc1": ("fc1",), "fc2": ("fc2",)}, ("act", "activation_fn"), "native"),  # timm's Mlp, CLIPMLP
)


def _parts(module: nn.Module):
    """(projections, activation, layout) of a module from_module takes: the nn.Linear layers each native projection
    copies (gate_proj and up_proj stacked into gate_up_proj), the activation (a FusedMLP's by name), and the layout
    of the module's keys."""
    if isinstance(module, FusedMLP):
        native = ("gate_up_proj", "down_proj") if module.gated else ("fc1", "fc2")
        return {name: (getattr(module, name),) for name in native}, module.activation, module.state_dict_layout
    if isinstance(module, nn.Sequential):
        if len(module) != 3:
            raise ValueError(f"FusedMLP.from_module: an nn.Sequential must be (nn.Linear, activation, nn.Linear), "
                             f"got {module}")
        projections, act, layout = {"fc1": (module[0],), "fc2": (module[2],)}, module[1], "sequential"
        first, _, second = module._modules
        if {first, second} & {"fc1", "fc2"} and (first, second) != ("fc1", "fc2"):
            raise ValueError(f"FusedMLP.from_module: this nn.Sequential names its projections {first!r} and "
                             f"{second!r}, which FusedMLP's own fc1 / fc2 keys would collide with; rename them")
    else:
        for attributes, act_names, layout in _STRUCTURES:
            act_name = next((a for a in act_names if getattr(module, a, None) is not None), None)
            if act_name is not None and all(getattr(module, a, None) is not None
                                            for linears in attributes.values() for a in linears):
                break
        else:
            raise ValueError(f"FusedMLP.from_module: expected nn.Sequential(nn.Linear, activation, nn.Linear), a "
                             f"FusedMLP or a module with gate_proj, up_proj, down_proj and act_fn (Llama), "
                             f"gate_up_proj, down_proj and activation_fn (Phi-3) or fc1, fc2 and act or "
                             f"activation_fn (timm, CLIP); got {type(module).__name__}")
        projections = {native: tuple(getattr(module, a) for a in linears) for native, linears in attributes.items()}
        act, used = getattr(module, act_name), {act_name, *(a for linears in attributes.values() for a in linears)}
        for name, child in module.named_children():  # what from_module cannot see the forward do with them
            if name not in used and type(child) is not nn.Identity and not (type(child) is nn.Dropout and child.p == 0):
                raise ValueError(f"FusedMLP.from_module: {type(module).__name__} has {name} ({type(child).__name__}) "
                                 f"besides its projections and activation (only nn.Identity and nn.Dropout(p=0) "
                                 f"can be left out)")
    linears = [lin for group in projections.values() for lin in group]
    for linear in linears:
        if type(linear) is not nn.Linear:
            raise ValueError(f"FusedMLP.from_module: the projections must be exactly nn.Linear (a subclass's "
                             f"forward would be lost), got a {type(linear).__name__}")
    params = [p for lin in linears for p in lin.parameters()]
    if len({id(p) for p in params}) != len(params):
        raise ValueError("FusedMLP.from_module: two of its projections share a parameter (tied); FusedMLP's copy would "
                         "untie them")
    if isinstance(act, nn.Module):
        if any(True for _ in act.parameters()) or any(True for _ in act.buffers()):
            raise ValueError(f"FusedMLP.from_module: the activation {act} holds parameters or buffers, which FusedMLP "
                             f"would drop")
        if isinstance(act, nn.modules.dropout._DropoutNd) and act.p > 0:
            raise ValueError(f"FusedMLP.from_module: {act} between the projections is dropout, not an activation")
    return projections, act, layout


def _identify(act, names) -> Optional[str]:
    """The first of `names` (plain or gated activations) whose activation `act` computes on a float64 probe, or
    None. The probe spans a dense grid around 0 and values out to +-1e3, where clipped forms (nn.ReLU6, a GELU
    clipped at 10) part from the unclipped ones. Raises ValueError, chained, when `act` raises on it."""
    far = torch.logspace(1, 3, 41, dtype=torch.float64)
    z = torch.cat((-far.flip(0), torch.linspace(-8.0, 8.0, 321, dtype=torch.float64), far))
    try:
        with torch.no_grad():
            y = act(z.clone())  # an in-place activation would otherwise rewrite the probe it is compared with
    except Exception as e:
        raise ValueError(f"FusedMLP.from_module: probing the activation {act} failed (evaluating it on a float64 "
                         f"tensor raised); pass activation= to choose one") from e
    for name in names:
        want = ops._ACTIVATION_FNS[ops.GATE_ACTIVATION.get(name, name)](z)
        if isinstance(y, Tensor) and y.shape == z.shape and torch.allclose(y.double(), want, rtol=1e-6, atol=1e-6):
            return name
    return None


# The llama layout's keys (the sequential layout's: FusedMLP._sequential_keys).
_LLAMA_HALVES = ("gate_proj.", "up_proj.")
_NATIVE_GATED = ("gate_up_proj.weight", "gate_up_proj.bias", "down_proj.weight", "down_proj.bias")


def _to_native_keys(module: FusedMLP, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                    error_msgs) -> None:
    """load_state_dict's pre-hook: renames the keys of a sequential or llama layout to the native ones (stacking
    gate_proj and up_proj into gate_up_proj) in the dict load_state_dict works on (its own copy), whatever the
    module's own layout. A llama dict with one half only (a checkpoint shard) stacks it with the module's current
    other half. In a sequential or llama module, what is missing or the wrong size is reported under the layout's
    keys, in the order the module it replaces lists them (the parameter keeps its value)."""
    layout = module.state_dict_layout
    if module.gated:
        # a dict with any llama key is read as llama for every parameter (what it lacks is reported as llama keys)
        llama = layout == "llama" or any(prefix + half + name in state_dict
                                         for half in _LLAMA_HALVES for name in ("weight", "bias"))
        absent = set().union(*(_stack_halves(module, state_dict, prefix, name, llama, error_msgs)
                               for name in ("weight", "bias")))
        missing_keys += [prefix + half + name for half in _LLAMA_HALVES for name in ("weight", "bias")
                         if prefix + half + name in absent]
        return
    for native_name, other in module._sequential_keys.items():
        for name in ("weight", "bias"):
            native, key = prefix + native_name + name, prefix + other + name
            param = getattr(getattr(module, native_name[:-1]), name)
            if param is None or native in state_dict:
                continue
            if key in state_dict:
                state_dict[native] = state_dict.pop(key)
            elif layout == "sequential":  # reported under the layout's key; the parameter keeps its value
                state_dict[native] = param.detach()
                missing_keys.append(key)


def _stack_halves(module: FusedMLP, state_dict, prefix, name, llama: bool, error_msgs) -> set:
    """gate_proj.<name> and up_proj.<name> of state_dict stacked into gate_up_proj.<name>, where either is there (or
    the module's layout is llama): a half absent, or of another size than the module's (LlamaMLP's size-mismatch
    message), keeps the module's half. Returns the keys of the absent halves."""
    current = getattr(module.gate_up_proj, name)
    native = prefix + "gate_up_proj." + name
    keys = [prefix + half + name for half in _LLAMA_HALVES]
    if current is None or native in state_dict or not (llama or any(key in state_dict for key in keys)):
        return set()
    halves, absent = list(current.detach().chunk(2)), set()
    for i, key in enumerate(keys):
        if key not in state_dict:
            absent.add(key)
        elif state_dict[key].shape != halves[i].shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {state_dict.pop(key).shape} from "
                              f"checkpoint, the shape in current model is {halves[i].shape}.")
        else:
            halves[i] = state_dict.pop(key)
    if current.is_meta and len(absent) == 1:  # the half to keep has no data (meta-device init, then a shard)
        error_msgs.append(f"{keys[0]} and {keys[1]}: this module is on the meta device, so the half not in this dict "
                          f"has no data to keep: load both halves in one load_state_dict call")
        return absent
    state_dict[native] = torch.cat([h.to(halves[0].device, halves[0].dtype) for h in halves])
    return absent


def _to_layout_keys(module: FusedMLP, state_dict, prefix, local_metadata) -> None:
    """state_dict's hook: rewrites the module's native keys in its state_dict_layout, in the order the module it
    replaces lists them."""
    if module.state_dict_layout == "sequential":
        for native_name, other in module._sequential_keys.items():
            for name in ("weight", "bias"):
                if prefix + native_name + name in state_dict:
                    state_dict[prefix + other + name] = state_dict.pop(prefix + native_name + name)
    elif module.state_dict_layout == "llama":
        own = {key: state_dict.pop(prefix + key) for key in _NATIVE_GATED if prefix + key in state_dict}
        for half, other in enumerate(_LLAMA_HALVES):
            for name in ("weight", "bias"):
                if "gate_up_proj." + name in own:
                    state_dict[prefix + other + name] = own["gate_up_proj." + name].chunk(2)[half]
        for name in ("weight", "bias"):
            if "down_proj." + name in own:
                state_dict[prefix + "down_proj." + name] = own["down_proj." + name]
