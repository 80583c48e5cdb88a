"""fusedkernels.fuse(model): swaps fused modules in where they compute what the model's modules compute, each swap
confirmed on a probe input first, and reports what it swapped, what it left and why. Patterns, probe and tolerance:
docs/fuse.md.

A pattern recognises modules by structure and proposes rewrites (`Rewrite`): the computation as the model runs it,
candidate replacements sharing its parameters, and how to install one. fuse() probes the candidates in order and
installs the first whose outputs and gradients match the original's within the original's own rounding error.
Families add their patterns to `PATTERNS`.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import copy
import inspect
import re
import textwrap
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .nn import (FusedAddLayerNorm, FusedAddRMSNorm, FusedBiasDropoutAddLayerNorm, FusedBiasDropoutAddRMSNorm,
                 FusedCastRMSNorm, FusedConv2dReLU, FusedConvBNReLU, FusedLayerNorm, FusedLinear, FusedMLP,
                 FusedRMSNorm)
from .integrations import transformers as hf
from .nn.mlp import _STRUCTURES, _parts, _to_layout_keys
from .ops import fold_batch_norm

SWAPPED, LEFT, ALREADY_FUSED = "swapped", "left", "already fused"

# Every module fuse() installs; met again, it is reported as already fused and not looked into.
FUSED_TYPES = (FusedLayerNorm, FusedRMSNorm, FusedCastRMSNorm, FusedAddLayerNorm, FusedAddRMSNorm,
               FusedBiasDropoutAddLayerNorm, FusedBiasDropoutAddRMSNorm, FusedLinear, FusedMLP, FusedConv2dReLU,
               FusedConvBNReLU)

# The probe's slack past twice the original's own error, relative to the output's scale: a few float32 ulps, as
# every op here computes in float32 at least (a float64 original that computes in float32 inside is its own yardstick).
PROBE_FLOOR = 32 * torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class FuseEntry:
    """One line of the report. path: the module's name in the model ("" for the model itself); original: its class;
    status: "swapped", "left" or "already fused"; fused: what was swapped in; reason: why it was left, or for a swap
    what the caller should know (new parameter objects, warnings the probe raised)."""

    path: str
    original: str
    status: str
    fused: str = ""
    reason: str = ""

    def __str__(self) -> str:
        where = self.path or "<model>"
        if self.status == SWAPPED:
            return f"swapped  {where}: {self.original} -> {self.fused}" + (f" ({self.reason})" if self.reason else "")
        if self.status == ALREADY_FUSED:
            return f"already  {where}: {self.original}"
        return f"left     {where}: {self.original}: {self.reason}"


@dataclass
class FuseReport:
    """What fuse() did, one entry per module (or Linear + activation pair) a pattern recognised, in model order;
    note: how the probe ran where it is not the default (outputs only, in inference mode)."""

    model: str
    entries: List[FuseEntry] = field(default_factory=list)
    note: str = ""

    @property
    def swapped(self) -> List[FuseEntry]:
        return [e for e in self.entries if e.status == SWAPPED]

    @property
    def left(self) -> List[FuseEntry]:
        return [e for e in self.entries if e.status == LEFT]

    @property
    def already_fused(self) -> List[FuseEntry]:
        return [e for e in self.entries if e.status == ALREADY_FUSED]

    def __str__(self) -> str:
        if not self.entries:
            return f"fuse({self.model}): nothing to fuse (no module matched a pattern)"
        head = (f"fuse({self.model}): {len(self.swapped)} swapped, {len(self.left)} left, "
                f"{len(self.already_fused)} already fused") + (f" ({self.note})" if self.note else "")
        return "\n".join([head, *(f"  {e}" for e in self.entries)])


@dataclass
class Candidate:
    """A replacement to probe. module computes it (sharing the original's parameters, unless grads_as_original maps
    its parameter gradients, keyed by its own names, to the original's names); install puts it in the model, or is
    None for a computation recognised but not supported, which leaves the module with `note` as the reason."""

    module: nn.Module
    fused: str
    install: Optional[Callable[[], None]]
    note: str = ""
    grads_as_original: Optional[Callable[[Dict[str, Tensor]], Dict[str, Tensor]]] = None


@dataclass
class Rewrite:
    """A proposed swap at `path`. original runs the model's computation in the probe (the module, or the pair it
    fuses); touched: the modules the swap removes or changes; keeps_hooks: the swap keeps the module object (a class
    switch), so its hooks stay and see what they saw; replaces: the swap puts another object at `path`;
    make_input(dtype, device, generator) gives a probe input; dtypes(param_dtype) the dtypes to probe; name: the
    report's name for the original, where not its class's (original is a probe wrapper); extra_roundings: roundings
    of a low-precision result the fused computation makes beyond the original's, each allowed one more of the
    original's own error; follows_training_flag: the fused computation does what the original does in either training
    mode by construction (it keeps the original's own code for what the flag changes), else the original's output
    must not depend on the flag; rows: the module works on the last dimension alone, and is probed on the input
    flattened to 2-D as well (a forward may branch on the input's rank); random_weights: a module recognised by its
    structure, probed again with its parameters set to random values, since at their initial ones a different
    formula can agree (exp(w) and 1 + w at w = 0, |w| and w at w = 1)."""

    path: str
    original: nn.Module
    candidates: Sequence[Candidate]
    touched: Sequence[nn.Module]
    make_input: Callable[[torch.dtype, torch.device, torch.Generator], Tensor]
    keeps_hooks: bool = False
    replaces: bool = False
    dtypes: Callable[[torch.dtype], Sequence[torch.dtype]] = lambda dtype: (dtype,)
    name: str = ""
    extra_roundings: int = 0
    follows_training_flag: bool = False
    rows: bool = False
    random_weights: bool = False


class Pattern:
    """One kind of rewrite. match() returns None where the module is not of its structure (the next pattern is
    tried), else the rewrites to probe and the entries for what it recognised but leaves."""

    def match(self, path: str, module: nn.Module, model: "_Model", merge: bool):
        raise NotImplementedError


def fuse(model: nn.Module, *, inference: bool = False, merge: bool = False, lm_head_loss: bool = True) -> FuseReport:
    """Swaps fused modules into `model`, in place, where they compute what its modules compute, and returns a
    FuseReport of what was swapped, what was left and why.

    Patterns (docs/fuse.md), by default in-place swaps of single modules: exactly nn.LayerNorm and nn.RMSNorm (class
    switch to FusedLayerNorm / FusedRMSNorm; subclasses are left); RMSNorms of Hugging Face's form, recognised by
    structure (a 1-D `weight` and `variance_epsilon` or `eps`) and by the probe (FusedCastRMSNorm in the cast order
    the probe confirms, Gemma's (1 + weight) included). With merge=True also the rewrites that
    merge modules, which assume each container is called as a whole: MLP blocks (FusedMLP.from_module) and nn.Linear
    followed by nn.GELU / nn.ReLU / nn.SiLU in an nn.Sequential (FusedLinear, the activation's slot becomes
    nn.Identity, so a slice such as seq[:1] then includes the activation), and nn.Conv2d followed by nn.ReLU in an
    nn.Sequential (FusedConv2dReLU, the ReLU's slot nn.Identity; also with inference=True). Each swap is confirmed
    first on a random probe input in the module's dtype and device: outputs, and unless `inference`, the gradients of
    the input and the parameters for one upstream gradient, within twice the original's own error against a float64
    run of it (three times for the fused loss's gradients, which it rounds once more); row-wise modules on a 2-D
    input too. Modules whose output is random (dropout in training) or differs between training and eval mode are
    left, and so are Hugging Face-structured norms whose forward reads more than weight and eps or takes more than the
    input. The caller's RNG state is restored.

    Without merge or inference, no parameter, buffer or state_dict key changes: swapped modules hold the same
    Parameter objects, so optimizers built before keep working. merge=True replaces each MLP block's parameters by
    new ones (a copy; gated: gate and up stacked into one): state_dict keys and values stay, but named_parameters()
    names change (gate_up_proj) and optimizers must be created anew; a block with a parameter tied to a module
    outside it is left.
    Training flags are kept; modules with hooks are left where a swap would change what the hooks see. A second call
    swaps nothing and reports the fused modules as already fused. An exception while probing leaves that module with
    the exception in its reason; fuse() goes on with the rest.

    inference: for models that will only run forward: probe outputs only (no gradients), and fold each eval-mode
    nn.BatchNorm2d into the nn.Conv2d feeding it (in an nn.Sequential, or a block's convN / bnN, as torchvision's
    ResNets), probed on the module holding both: the conv gets new weight and bias Parameters, the BatchNorm's slot
    becomes nn.Identity and its state_dict keys disappear; a fold whose values leave the conv's dtype (float16 past
    65504) is left. A BatchNorm2d or ReLU filling several slots is taken in each slot on its own. Outputs-only
    probing (not folding) is implied inside torch.inference_mode(), where no gradient can be taken (the report's
    note says so); what fuse() makes for the model (folded weights, new parameters) is made outside it, ordinary
    tensors that train afterwards.

    Hugging Face Llama-family models (Llama, Mistral, Qwen2, Qwen3, ...), recognised by structure: attention modules
    calling their modeling file's apply_rotary_pos_emb get a subclass of their class whose forward runs
    ops.apply_rotary there; rotary embeddings (an `inv_freq` buffer, `attention_scaling`, a rope type whose
    frequencies stay fixed) get one whose forward computes (cos, sin) with ops.rotary_cos_sin; a *ForCausalLM
    (lm_head an nn.Linear, a `model` child, transformers' ForCausalLMLoss) gets one whose forward, in training mode
    when labels are given (and lm_head is still a plain nn.Linear), computes the loss with ops.linear_cross_entropy on
    the final hidden states, never building the logits, and returns logits=None. lm_head_loss=False leaves the latter (logits are then returned with the loss, as before).

    Raises TypeError when model is not an nn.Module, and ValueError when it is (or holds) a module wrapped by
    DistributedDataParallel or FSDP2's fully_shard: call fuse() before wrapping (a swap may bring parameters the
    wrapper does not know).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: model must be a torch.nn.Module, got {type(model).__name__}")
    wrapped = _distributed_wrapper(model)
    if wrapped:
        raise ValueError(f"fuse: {wrapped}; call fuse(model) before wrapping it (the wrapper would not know the "
                         "parameters a swap may bring, and would stop synchronising them)")
    walk = _Model(model, inference or torch.is_inference_mode_enabled(), forward_only=inference,
                  lm_head_loss=lm_head_loss)
    if walk.inference and not inference:
        walk.report.note = "probed outputs only: inference mode allows no gradients"
    cuda = sorted({t.device.index for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):  # the caller's RNG state, whatever a swap's construction draws
        return walk.run(merge)


def _distributed_wrapper(model: nn.Module) -> Optional[str]:
    """Where model is, or holds, a module wrapped by DistributedDataParallel or fully_shard (FSDP2), which; else None."""
    wrappers = [torch.nn.parallel.DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FSDPModule

        wrappers.append(FSDPModule)
    except ImportError:  # torch built without distributed
        pass
    for path, module in model.named_modules():
        if isinstance(module, tuple(wrappers)):
            kind = "DistributedDataParallel" if isinstance(module, wrappers[0]) else "fully_shard (FSDP2)"
            return f"{path or 'the model'} is wrapped by {kind}"
    return None


class _Model:
    """One fuse() walk: the model's parent links (a swap replaces a module wherever it is a child), its modules'
    paths and the report.
    inference: the probe checks outputs only; forward_only: the caller passed inference=True, which also allows
    rewrites that re-express parameters (BatchNorm folding); inference_mode alone does not; lm_head_loss: the
    causal-LM loss rewrite runs."""

    def __init__(self, root: nn.Module, inference: bool, forward_only: bool = False, lm_head_loss: bool = True) -> None:
        self.root, self.inference, self.forward_only = root, inference, forward_only
        self.lm_head_loss = lm_head_loss
        self.parents: Dict[int, list] = defaultdict(list)
        self.holders: Dict[int, set] = defaultdict(set)  # id(parameter) -> ids of the modules holding it
        for module in root.modules():
            for name, child in module._modules.items():
                if child is not None:
                    self.parents[id(child)].append((module, name))
            for p in module._parameters.values():
                if p is not None:
                    self.holders[id(p)].add(id(module))
        self.order = {path: i for i, (path, _) in enumerate(root.named_modules())}
        self.paths = {id(module): path for path, module in root.named_modules()}  # a shared module: its first path
        self.seen: set = set()
        self.report = FuseReport(type(root).__name__)

    def run(self, merge: bool) -> FuseReport:
        self._visit("", self.root, merge)
        # A container's pattern reports before its children are visited: list the entries in model order.
        self.report.entries.sort(key=lambda e: self.order.get(e.path, len(self.order)))
        return self.report

    def child_path(self, parent: nn.Module, name: str) -> str:
        return f"{self.paths[id(parent)]}.{name}" if self.paths[id(parent)] else name

    def replace(self, old: nn.Module, new: nn.Module) -> None:
        for parent, name in self.parents[id(old)]:
            setattr(parent, name, new)
        self.seen.add(id(new))

    def _visit(self, path: str, module: nn.Module, merge: bool) -> None:
        if id(module) in self.seen:
            return
        self.seen.add(id(module))
        if isinstance(module, FUSED_TYPES):
            self.report.entries.append(FuseEntry(path, type(module).__name__, ALREADY_FUSED))
            return
        for pattern in PATTERNS:
            try:
                # what a pattern makes for the model (folded weights, new modules) must be ordinary tensors, also
                # when fuse() runs inside torch.inference_mode(): inference tensors cannot be saved for backward
                with torch.inference_mode(False):
                    found = pattern.match(path, module, self, merge)
            except Exception as e:  # noqa: BLE001 - a module a pattern cannot take apart is left, the walk goes on
                found = [FuseEntry(path, type(module).__name__, LEFT,
                                   reason=f"{type(pattern).__name__} raised ({type(e).__name__}: {e})")]
            if found is None:
                continue
            if not path and all(isinstance(item, Rewrite) and item.replaces for item in found):
                # the model itself has no parent to take a replacement: reported left, and the other patterns try
                self.report.entries.extend(self._apply(item) for item in found)
                continue
            replaced = False
            for item in found:
                entry = item if isinstance(item, FuseEntry) else self._apply(item)
                replaced |= entry.status == SWAPPED and isinstance(item, Rewrite) and item.replaces
                self.report.entries.append(entry)
            if replaced:
                return
            break
        for name, child in module.named_children():
            self._visit(f"{path}.{name}" if path else name, child, merge)

    def _apply(self, rewrite: Rewrite) -> FuseEntry:
        """Checks, probes and installs one rewrite; the report's entry for it."""
        name = rewrite.name or (type(rewrite.original).__name__ if len(rewrite.touched) == 1 or rewrite.replaces
                                else " + ".join(type(m).__name__ for m in rewrite.touched))

        def left(reason: str) -> FuseEntry:
            return FuseEntry(rewrite.path, name, LEFT, reason=reason)

        if rewrite.replaces and not rewrite.path:
            return left("the model itself: a replacement needs a parent module to go into")
        for module in rewrite.touched:
            if "forward" in module.__dict__:
                return left("its forward is replaced on the instance (an accelerate-style hook), which a swap would "
                            "bypass or drop")
            if not rewrite.keeps_hooks and (module._forward_hooks or module._forward_pre_hooks
                                            or module._backward_hooks or module._backward_pre_hooks):
                which = "it has" if module is rewrite.original else f"its {type(module).__name__} has"
                return left(f"{which} forward or backward hooks, which would not see what they saw after the swap")
        params = [p for m in rewrite.touched for p in m.parameters(recurse=False)]
        floating = [p for p in params if p.is_floating_point()]
        if not floating or len(floating) != len(params):
            return left("no floating-point parameters (or some not floating): the probe takes its dtype and device "
                        "from them")
        if any(p.is_meta for p in floating):
            return left("parameters on the meta device: nothing to probe")
        if len({p.device for p in floating}) != 1:
            return left("parameters on several devices")
        dtype, device = floating[0].dtype, floating[0].device
        failures = []
        with _rng_kept(device):
            # one output to match: none where the output is random, or follows the training flag the fused
            # module would not
            for check in (_random_output, None if rewrite.follows_training_flag else _training_flag_matters):
                try:
                    why = check(rewrite, dtype, device) if check is not None else None
                except Exception:  # noqa: BLE001 - the probe below reports the original's own error
                    why = None
                if why is not None:
                    return left(why)
            for candidate in rewrite.candidates:
                failure, notes = self._probe_safely(rewrite, candidate, dtype, device)
                if failure is None and rewrite.random_weights:
                    with _random_parameters(floating):
                        failure, more = self._probe_safely(rewrite, candidate, dtype, device)
                    notes += [n for n in more if n not in notes]
                    failure = failure and f"with random weights, {failure}"
                if failure is not None:
                    failures.append(f"{candidate.fused}: {failure}")
                    continue
                if candidate.install is None:
                    return left(candidate.note)
                with torch.inference_mode(False):  # (as in match: whatever it makes is an ordinary tensor)
                    candidate.install()
                return FuseEntry(rewrite.path, name, SWAPPED, candidate.fused,
                                 "; ".join(filter(None, [candidate.note, *notes])))
        return left("the probe found a difference: " + "; ".join(failures))

    def _probe_safely(self, rewrite: Rewrite, candidate: Candidate, dtype: torch.dtype, device: torch.device):
        try:
            return _probe(rewrite, candidate, rewrite.dtypes(dtype), device, self.inference)
        except Exception as e:  # noqa: BLE001 - whatever fails in the probe leaves the module, not the walk
            return f"the probe raised ({type(e).__name__}: {e})", []


# ------------------------------------------------------------------------------------------------
# The probe
# ------------------------------------------------------------------------------------------------


def _rng_kept(device: torch.device):
    """Restores the caller's CPU RNG state, and the module's CUDA device's, on exit: the probe seeds and draws."""
    if device.type != "cuda":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index if device.index is not None else torch.cuda.current_device()])


@contextlib.contextmanager
def _random_parameters(params: Sequence[Tensor]):
    """The parameters (the same objects, so a candidate sharing them sees the same) hold standard-normal values
    inside, their own again on exit."""
    saved = [p.data for p in params]
    generator = torch.Generator().manual_seed(1)
    try:
        with torch.inference_mode(False):
            for p in params:
                p.data = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
        yield
    finally:
        for p, data in zip(params, saved):
            p.data = data


def _seed(device: torch.device, seed: int) -> None:
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _random_output(rewrite: Rewrite, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why the original has no one output to match (it draws random numbers: dropout in training), or None: its
    forward on one input under seeds 0, 0 and 1 must give one output."""
    x = rewrite.make_input(dtype, device, torch.Generator().manual_seed(0))
    outputs = []
    for seed in (0, 0, 1):
        _seed(device, seed)
        with torch.no_grad():
            outputs.append(_call(rewrite.original, x.clone()))
    if not all(isinstance(y, Tensor) and y.shape == outputs[0].shape for y in outputs):
        return None  # the probe reports what the forward returns
    same = [torch.allclose(outputs[0], y, rtol=0, atol=0, equal_nan=True) for y in outputs[1:]]
    if not same[0]:
        return "its output differs between two runs under one seed (nondeterministic), so no probe can confirm a swap"
    if not same[1]:
        return "its output is random (dropout?): it changes with the seed, so no probe can confirm a swap"
    return None


def _training_flag_matters(rewrite: Rewrite, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why the original's output depends on the training flag (dropout or a branch on self.training in its forward,
    which the fused module, computing the same in either mode, would not follow after a later train() / eval()), or
    None: its forward on one input under one seed, in training mode and in eval mode, must give one output. The
    flags and buffers are restored."""
    x = rewrite.make_input(dtype, device, torch.Generator().manual_seed(0))
    modules = list(rewrite.original.modules())
    flags = [m.training for m in modules]
    buffers = [(b, b.detach().clone()) for b in rewrite.original.buffers()]  # a BatchNorm in training updates its own
    outputs = []
    try:
        for mode in (True, False):
            rewrite.original.train(mode)
            _seed(device, 0)
            with torch.no_grad():
                outputs.append(_call(rewrite.original, x.clone()))
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    if not all(isinstance(y, Tensor) and y.shape == outputs[0].shape for y in outputs):
        return None  # the probe reports what the forward returns
    if torch.equal(outputs[0], outputs[1]) or torch.allclose(outputs[0], outputs[1], rtol=0, atol=0, equal_nan=True):
        return None
    return ("its output differs between training and eval mode (dropout, or a branch on self.training in its "
            "forward), which the fused module would not follow")


def _forward_reads(cls: type) -> Optional[set]:
    """The attributes of the module (`self.<name>`, whatever its first parameter is called) that cls.forward reads,
    and the methods of cls it calls read in turn, from their source; None where a source is not available or the
    module itself is passed on (to a helper, getattr), whose reads are out of sight."""
    reads: set = set()
    todo, done = ["forward"], set()
    while todo:
        name = todo.pop()
        done.add(name)
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(cls, name))))
        except (OSError, TypeError, SyntaxError):
            return None
        fn = tree.body[0] if tree.body else None
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or not fn.args.args:
            return None
        me = fn.args.args[0].arg
        read_through = {id(node.value) for node in ast.walk(fn) if isinstance(node, ast.Attribute)}
        if any(isinstance(node, ast.Name) and node.id == me and id(node) not in read_through for node in ast.walk(fn)):
            return None  # the module itself passed on (a helper, getattr, vars): what that reads is not in sight
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == me:
                # a method the class itself defines (not nn.Module's) is followed; anything else is a read
                own = inspect.isfunction(getattr(cls, node.attr, None)) and not hasattr(nn.Module, node.attr)
                if not own:
                    reads.add(node.attr)
                elif node.attr not in done:
                    todo.append(node.attr)
    return reads


def _takes_one_input(module: nn.Module) -> bool:
    """Whether module's forward takes exactly one argument (the input), with nothing optional beside it."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _call(module: nn.Module, x: Tensor):
    """The module's own forward, without its hooks (a probe must not run the user's hooks)."""
    return type(module).forward(module, x)


def _max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _compare(what: str, ours, orig, ref, extra_roundings: int = 0) -> Optional[str]:
    if ours is None or orig is None:
        return None if ours is None and orig is None else f"{what}: a gradient on one side only"
    if ours.dtype != orig.dtype or ours.shape != orig.shape:
        return f"{what}: {ours.dtype} {tuple(ours.shape)} where the original gives {orig.dtype} {tuple(orig.shape)}"
    if not torch.isfinite(ref).all():  # the float64 reference itself: NaN / inf weights or probe outputs
        return f"{what}: the original gives non-finite values on the probe (its float64 copy too), so nothing to compare"
    err, own = _max_err(ours, ref), _max_err(orig, ref)
    bound = (2 + extra_roundings) * own + PROBE_FLOOR * max(ref.abs().max().item() if ref.numel() else 0.0, 1.0)
    if not err <= bound:  # NaN fails too
        return f"{what}: max error {err:.2e} > {bound:.2e} (the original's own error {own:.2e})"
    return None


def _run(module: nn.Module, params: Dict[str, Tensor], x: Tensor, dy, grad: bool):
    """({"output": y, "input grad": dx, name: dparam, ...}, dy); dy: the upstream gradient, or a function drawing it
    for the output."""
    x = x.detach().clone().requires_grad_(grad)
    with torch.enable_grad() if grad else torch.no_grad():
        y = _call(module, x)
    if not isinstance(y, Tensor):
        raise TypeError(f"the forward returned a {type(y).__name__}, not a Tensor")
    out = {"output": y.detach()}
    if not grad:
        return out, None
    dy = dy(y) if callable(dy) else dy
    grads = torch.autograd.grad(y, [x, *params.values()], dy, allow_unused=True)
    out["input grad"] = grads[0]
    out.update(zip(params, grads[1:]))
    return out, dy


def _probe(rewrite: Rewrite, candidate: Candidate, dtypes, device, inference: bool):
    """(failure or None, notes): runs the original, its float64 copy and the candidate on the same random inputs (and
    upstream gradients), in each of dtypes, with autocast off. A dtype the original itself raises on is skipped,
    except the first."""
    original = rewrite.original
    try:
        reference = copy.deepcopy(original).to(torch.float64)
    except Exception as e:  # noqa: BLE001 - an uncopyable module is left with the reason
        return f"the module could not be copied for the float64 reference ({type(e).__name__}: {e})", []
    grad = not inference
    orig_params = {n: p for n, p in original.named_parameters() if p.requires_grad} if grad else {}
    ref_params = {n: p for n, p in reference.named_parameters() if p.requires_grad} if grad else {}
    if candidate.grads_as_original is None:
        by_id = {id(p): n for n, p in orig_params.items()}
        cand_params = {by_id[id(p)]: p for p in candidate.module.parameters() if id(p) in by_id}
    else:
        cand_params = {n: p for n, p in candidate.module.named_parameters() if p.requires_grad} if grad else {}
    notes = []
    generator = torch.Generator().manual_seed(0)
    # rows: the first dtype's input and upstream gradient again, flattened to 2-D
    inputs = [(dtype, False) for dtype in dtypes] + ([(dtypes[0], True)] if rewrite.rows else [])
    first = None
    with torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext():
        for i, (dtype, flat) in enumerate(inputs):
            if flat:
                if first is None:
                    continue
                x, dy = (None if t is None else t.flatten(0, -2) for t in first)
            else:
                x = rewrite.make_input(dtype, device, generator)
                dy = lambda y: torch.randn(y.shape, generator=generator).to(device, y.dtype)  # noqa: E731
            try:
                orig, dy = _run(original, orig_params, x, dy, grad)
            except Exception as e:  # noqa: BLE001 - the module's own error decides: left, or a dtype it does not take
                if i == 0:
                    return f"the original raised on a {dtype} probe ({type(e).__name__}: {e})", notes
                continue
            try:
                ref, _ = _run(reference, ref_params, x.double(), None if dy is None else dy.double(), grad)
            except Exception as e:  # noqa: BLE001 - e.g. a forward casting to float32 mixes dtypes in the copy
                return f"its float64 reference copy raised on a {dtype} probe ({type(e).__name__}: {e})", notes
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    ours, _ = _run(candidate.module, cand_params, x, dy, grad)
                except Exception as e:  # noqa: BLE001 - a candidate that cannot run this input is not the same
                    return f"raised on a {dtype} probe ({type(e).__name__}: {e})", notes
            notes += [f"probe: {w.message}"[:200] for w in caught if f"probe: {w.message}"[:200] not in notes]
            if i == 0:
                first = (x, dy)
            if candidate.grads_as_original is not None and grad:
                grads = candidate.grads_as_original({n: ours.pop(n) for n in cand_params})
                ours.update(grads)
            for what in orig:
                failure = _compare(f"{what} ({dtype}{', 2-D input' if flat else ''})", ours.get(what), orig[what], ref[what],
                                   rewrite.extra_roundings if dtype.itemsize < 4 else 0)
                if failure is not None:
                    return failure, notes
    return None, notes


def _rows(shape: Sequence[int], top: float = 1.0):
    """make_input for inputs [2, 5, *shape]: rows of standard deviations 1e-3 .. 10**top, so eps matters in some."""

    def make(dtype, device, generator):
        scale = torch.logspace(-3, top, 10).reshape(2, 5, *([1] * len(shape)))
        return (torch.randn(2, 5, *shape, generator=generator) * scale).to(device, dtype)

    return make


def _switched(module: nn.Module, cls: type, **attributes) -> nn.Module:
    """A shallow copy of module (the same parameter objects) of class cls: what a class switch gives, for the probe."""
    clone = copy.copy(module)
    clone.__class__ = cls
    for key, value in attributes.items():
        setattr(clone, key, value)
    return clone


def _switch(module: nn.Module, cls: type, **attributes) -> Callable[[], None]:
    def install():
        module.__class__ = cls
        for key, value in attributes.items():
            setattr(module, key, value)

    return install


# ------------------------------------------------------------------------------------------------
# Patterns
# ------------------------------------------------------------------------------------------------


class TorchNorm(Pattern):
    """Exactly nn.LayerNorm / nn.RMSNorm -> FusedLayerNorm / FusedRMSNorm by class switch: the module object, its
    parameters and hooks stay. A subclass is left (a switch would drop its methods and whatever its forward does
    outside the probe), unless it has HFRMSNorm's structure, which replaces it by what the probe confirms."""

    def __init__(self, torch_cls: type, fused_cls: type) -> None:
        self.torch_cls, self.fused_cls = torch_cls, fused_cls

    def match(self, path, module, model, merge):
        if not isinstance(module, self.torch_cls):
            return None
        if type(module) is not self.torch_cls:
            return None if _hf_rms_eps(module) is not None else [FuseEntry(
                path, type(module).__name__, LEFT, reason=f"a subclass of nn.{self.torch_cls.__name__}: a class "
                f"switch would drop its own methods and isinstance, and whatever its forward does outside the probe")]
        candidate = Candidate(_switched(module, self.fused_cls), self.fused_cls.__name__,
                              _switch(module, self.fused_cls))
        return [Rewrite(path, module, [candidate], [module], _rows(module.normalized_shape, top=3),
                        keeps_hooks=True, rows=len(module.normalized_shape) == 1)]


def _hf_rms_eps(module: nn.Module) -> Optional[float]:
    """eps where module has HFRMSNorm's structure (only a 1-D `weight` and a float `variance_epsilon` or `eps`)."""
    weight = module._parameters.get("weight")
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (weight is None or weight.dim() != 1 or len(module._parameters) != 1 or module._buffers or module._modules
            or isinstance(eps, bool) or not isinstance(eps, (int, float))):
        return None
    return float(eps)


class HFRMSNorm(Pattern):
    """A module holding only a 1-D `weight` and a float `variance_epsilon` or `eps` (Hugging Face's RMSNorms: Llama,
    Mistral, Qwen2, T5's LayerNorm, Gemma's) -> FusedCastRMSNorm, cast="input", "weight" or "offset" (Gemma's
    (1 + weight)), whichever the probe confirms, in the input's and in one other dtype (fp32 for a half-precision
    weight, else bf16) as the cast order sets the output's dtype there, on rows out to ~1e3 (a clamp in the forward
    shows)."""

    # what a Hugging Face RMSNorm's forward reads of itself; anything else (a scale, an offset set later) it would
    # not follow
    READS = {"weight", "variance_epsilon", "eps", "training"}

    def match(self, path, module, model, merge):
        eps = _hf_rms_eps(module)
        if eps is None:
            return None
        name = type(module).__name__
        if not _takes_one_input(module):
            return [FuseEntry(path, name, LEFT, reason="its forward takes more than the input (a gate?), which the "
                                                       "fused norm does not")]
        reads = _forward_reads(type(module))
        if reads is None:
            return [FuseEntry(path, name, LEFT, reason="what its forward reads cannot be checked (no source, or it "
                                                       "passes the module itself to a helper or getattr)")]
        if reads - self.READS:
            return [FuseEntry(path, name, LEFT, reason=f"its forward reads self.{sorted(reads - self.READS)[0]}, "
                                                       f"which the fused norm would not follow")]
        weight = module.weight
        candidates = []
        for cast in ("input", "weight", "offset"):
            fused = FusedCastRMSNorm(weight.shape[0], eps, cast, device="meta")
            fused.weight = weight
            fused.train(module.training)
            candidates.append(Candidate(fused, f"FusedCastRMSNorm(cast={cast!r})",
                                        lambda fused=fused: model.replace(module, fused)))
        other = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
        return [Rewrite(path, module, candidates, [module], _rows((weight.shape[0],), top=3), replaces=True,
                        dtypes=lambda d: (d, other.get(d, torch.bfloat16)), rows=True, random_weights=True)]


# The activation modules a Linear fuses with, by what FusedLinear calls them.
def _activation(module: nn.Module) -> Optional[str]:
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    return None


class MLPBlock(Pattern):
    """A block FusedMLP.from_module takes (a Llama-style gated MLP, Phi-3's, timm's / CLIP's fc1 / fc2, and with
    merge=True nn.Sequential(Linear, act, Linear)) -> FusedMLP, replaced in its parent. FusedMLP holds new parameters
    (gated: gate and up stacked), so this runs with merge=True only; without it, the named blocks are left with the
    reason and nn.Sequential ones go to LinearActivation (which leaves them too). A block with a parameter tied to a
    module outside it is left: the copy would untie it."""

    def match(self, path, module, model, merge):
        if type(module) is nn.Sequential:
            if not (merge and len(module) == 3 and type(module[0]) is nn.Linear and type(module[2]) is nn.Linear):
                return None
        elif not any(all(getattr(module, a, None) is not None for linears in attributes.values() for a in linears)
                     and any(getattr(module, a, None) is not None for a in act_names)
                     for attributes, act_names, _ in _STRUCTURES):
            return None
        name = type(module).__name__
        if not merge:
            return [FuseEntry(path, name, LEFT, reason="an MLP block: FusedMLP holds new parameter objects (gate and "
                                                       "up stacked), so it is swapped with fuse(model, merge=True)")]
        if not _takes_one_input(module):
            return [FuseEntry(path, name, LEFT, reason="its forward takes more than the input, which FusedMLP does "
                                                       "not")]
        try:
            fused = FusedMLP.from_module(module)
        except ValueError as e:
            return None if type(module) is nn.Sequential else [FuseEntry(path, name, LEFT, reason=str(e))]
        inside = {id(m) for m in module.modules()}
        if any(model.holders[id(p)] - inside for p in module.parameters()):
            return [FuseEntry(path, name, LEFT, reason="a parameter is tied to a module outside the block: FusedMLP's "
                                                       "copy would untie it")]

        def as_layout(grads):
            _to_layout_keys(fused, grads, "", None)
            return grads

        projections = _parts(module)[0]

        def install():
            _keep_parameters(projections, fused)
            model.replace(module, fused)

        stacked = len(projections.get("gate_up_proj", ())) == 2
        candidate = Candidate(fused, f"FusedMLP(activation={fused.activation!r})", install,
                              "gate and up stacked in new parameters (their .grad too), the other projections' kept "
                              "(state_dict keys and values kept): create optimizers after fuse()" if stacked else
                              "the same parameter objects", as_layout)
        return [Rewrite(path, module, [candidate], list(module.modules()), _rows((fused.in_features,)),
                        replaces=True, rows=True)]


def _keep_parameters(projections: Dict[str, list], fused: FusedMLP) -> None:
    """fused's projections copied from one nn.Linear (projections: FusedMLP's name -> the block's Linears it copies)
    take that Linear's parameter objects (an optimizer built before fuse() goes on training them, their .grad stays);
    the stacked gate and up are new, and get the halves' accumulated .grad stacked (a half without one: zeros, as
    the gradient it has not accumulated)."""
    for native, linears in projections.items():
        owner = getattr(fused, native)
        for name in ("weight", "bias"):
            sources, target = [getattr(lin, name) for lin in linears], getattr(owner, name)
            if target is None:
                continue
            if len(sources) == 1 and sources[0].dtype == target.dtype:
                setattr(owner, name, sources[0])
            elif any(p.grad is not None for p in sources):
                target.grad = torch.cat([p.grad if p.grad is not None else torch.zeros_like(p) for p in sources])


class LinearActivation(Pattern):
    """nn.Sequential(..., nn.Linear, activation, ...) -> the Linear switched to FusedLinear with that activation
    (nn.GELU, approximate "none" or "tanh"; nn.ReLU; nn.SiLU), the activation's slot nn.Identity: indices, keys and
    parameter objects stay. It merges two modules (a slice ending at the Linear would then include the activation,
    which no probe sees), so it runs with merge=True only; without it, the pairs are left with the reason."""

    def match(self, path, module, model, merge):
        if type(module) is not nn.Sequential:
            return None
        found, i, names = [], 0, list(module._modules)
        while i < len(module) - 1:
            linear, act = module[i], module[i + 1]
            activation = _activation(act)
            if type(linear) is not nn.Linear or activation is None:
                i += 1
                continue
            where = f"{path}.{names[i]}" if path else names[i]  # the child's own name (a named nn.Sequential's too)
            if not merge:
                found.append(FuseEntry(where, f"Linear + {type(act).__name__}", LEFT, reason=(
                    "merging the pair changes what a slice of the nn.Sequential computes (the activation moves into "
                    "the Linear), so it is done with fuse(model, merge=True)")))
            elif len(model.parents[id(linear)]) != 1:
                found.append(FuseEntry(where, "Linear", LEFT, reason="the Linear is used elsewhere in the model too: "
                                                                     "fusing the activation into it would change "
                                                                     "what the other uses compute"))
            else:
                found.append(Rewrite(where, nn.Sequential(linear, act), [Candidate(
                    _switched(linear, FusedLinear, activation=activation),
                    f"FusedLinear(activation={activation!r})",
                    lambda seq=module, i=i, linear=linear, activation=activation: _fuse_pair(model, seq, i, linear,
                                                                                             activation))],
                    [linear, act], _rows((linear.in_features,)), rows=True))
            i += 2
        return found or None


def _fuse_pair(model: _Model, seq: nn.Sequential, i: int, linear: nn.Linear, activation: str) -> None:
    _switch(linear, FusedLinear, activation=activation)()
    identity = nn.Identity().train(seq[i + 1].training)
    seq[i + 1] = identity
    model.seen.update((id(linear), id(identity)))


def _images(channels: int, conv: nn.Conv2d, size: int = 0):
    """make_input for images [2, channels, S, S]: S at least `size` and past conv's dilated kernel; the two samples
    scaled 0.1 and 10."""
    extent = max(d * (k - 1) + 1 for d, k in zip(conv.dilation, conv.kernel_size))
    side = max(size, extent + 7)

    def make(dtype, device, generator):
        scale = torch.tensor([0.1, 10.0]).reshape(2, 1, 1, 1)
        return (torch.randn(2, channels, side, side, generator=generator) * scale).to(device, dtype)

    return make


def _runs_in_order(module: nn.Module) -> bool:
    """An nn.Sequential, or a subclass keeping its forward (torchvision's Conv2dNormActivation): children in order."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _paired_conv(parent: nn.Module, name: str) -> Optional[nn.Module]:
    """The module that feeds parent's child `name`: the one before it in an nn.Sequential, else `convN` for `bnN`
    (torchvision's BasicBlock / Bottleneck naming); None where neither applies."""
    if _runs_in_order(parent):
        names = list(parent._modules)
        i = names.index(name)
        return parent._modules[names[i - 1]] if i > 0 else None
    number = re.fullmatch(r"bn(\d*)", name)
    return parent._modules.get(f"conv{number.group(1)}") if number else None


class ConvBatchNorm(Pattern):
    """An eval-mode nn.BatchNorm2d fed by an nn.Conv2d (adjacent in an nn.Sequential or a subclass keeping its forward,
    or a block's `convN` / `bnN`; exact conv and BatchNorm types) -> with fuse(model, inference=True), the conv holds
    the folded weight and bias (ops.fold_batch_norm, new Parameters) and the BatchNorm's slot becomes nn.Identity.
    The pair's order lives in the parent's forward, so the probe runs the parent (outputs only). Recognised on the
    BatchNorm, in each slot it fills (one module in several slots: each slot's pair on its own, as the swap changes
    that slot only); without inference=True, in training mode, or where the folded values leave the dtype's range,
    it is left with the reason."""

    def match(self, path, module, model, merge):
        if type(module) is not nn.BatchNorm2d:
            return None
        found = [entry for parent, name in model.parents[id(module)]
                 for entry in self._pair(parent, name, module, model)]
        return found or None

    def _pair(self, parent: nn.Module, name: str, bn: nn.BatchNorm2d, model: "_Model") -> list:
        conv = _paired_conv(parent, name)
        if type(conv) is not nn.Conv2d or conv.out_channels != bn.num_features:
            return []
        conv_name = next(n for n, m in parent._modules.items() if m is conv)
        conv_path = model.child_path(parent, conv_name)

        def left(reason: str):
            return [FuseEntry(conv_path, "Conv2d + BatchNorm2d", LEFT, reason=reason)]

        if bn.training or bn.running_mean is None:
            return left("the BatchNorm2d normalises with batch statistics (training mode or no running statistics): "
                        "only an eval-mode BatchNorm folds into the conv (model.eval(), then fuse(model, "
                        "inference=True))")
        if not model.forward_only:
            return left("folding changes the conv's weight and bias and removes the BatchNorm2d's state_dict keys, "
                        "so it is done with fuse(model, inference=True), for models that only run forward")
        if len(model.parents[id(conv)]) != 1:
            return left("the conv is used elsewhere in the model too, where no BatchNorm follows it")
        if any(model.holders[id(p)] != {id(conv)} for p in conv.parameters()):
            return left("a conv parameter is tied to another module, which the folded values would not reach")
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in parent.modules()):
            return left(f"the probe runs the {type(parent).__name__}'s forward, which would update the running "
                        f"statistics of a BatchNorm in training mode inside it: call model.eval() first")
        first_conv = next(m for m in parent.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            weight, bias = fold_batch_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                           bn.weight, bn.bias)
            finite = bool(torch.isfinite(weight).all() and torch.isfinite(bias).all())
        if not finite:  # (the probe would fail on it too, with a less telling reason)
            return left(f"the folded weight or bias overflows {str(conv.weight.dtype).removeprefix('torch.')} "
                        f"(weight * bn.weight / sqrt(running_var + eps) past its range, 65504 for float16): the "
                        f"folded conv would compute inf where Conv2d then BatchNorm2d need not")
        folded = copy.copy(conv)
        folded._parameters = {"weight": nn.Parameter(weight, conv.weight.requires_grad),
                              "bias": nn.Parameter(bias, conv.weight.requires_grad)}
        identity = nn.Identity().train(bn.training)
        probed = copy.copy(parent)  # the parent's forward over the folded conv and the Identity
        # over the parent's children as they are when probed: a shared BatchNorm's other slots may be folded by then
        probed._modules = collections.ChainMap({conv_name: folded, name: identity}, parent._modules)

        def install():
            conv.weight, conv.bias = folded.weight, folded.bias
            setattr(parent, name, identity)
            model.seen.add(id(identity))

        candidate = Candidate(probed, "Conv2d (BatchNorm2d folded)", install,
                              "conv weight and bias values change (new Parameters), the BatchNorm2d's state_dict "
                              "keys are gone: load checkpoints before fuse()")
        # (inference=True: the model runs forward in eval mode only, which the fold computes)
        return [Rewrite(conv_path, parent, [candidate], [conv, bn],
                        _images(first_conv.in_channels, first_conv, size=32), follows_training_flag=True)]


class ConvReLU(Pattern):
    """nn.Sequential(..., nn.Conv2d, nn.Identity..., nn.ReLU, ...) (or a subclass keeping its forward; the Identity
    slots: BatchNorms folded just before)
    -> the Conv2d switched to FusedConv2dReLU, the ReLU's slot nn.Identity: indices, keys and parameter objects stay.
    A merge like LinearActivation's, so with merge=True or inference=True; recognised on the ReLU, in each slot it
    fills (one nn.ReLU in several slots: each slot's pair on its own, as the swap changes that slot only). Grouped
    convs are left: FusedConv2dReLU runs them through the reference, so the swap gains nothing."""

    def match(self, path, module, model, merge):
        if type(module) is not nn.ReLU:
            return None
        found = [entry for seq, name in model.parents[id(module)]
                 for entry in self._pair(seq, name, module, model, merge)]
        return found or None

    def _pair(self, seq: nn.Module, name: str, relu: nn.ReLU, model: "_Model", merge: bool) -> list:
        if not _runs_in_order(seq):
            return []
        names = list(seq._modules)
        i = names.index(name) - 1
        while i >= 0 and type(seq[i]) is nn.Identity:
            i -= 1
        conv = seq[i] if i >= 0 else None
        if type(conv) is not nn.Conv2d:
            return []
        where = model.child_path(seq, names[i])

        def left(reason: str):
            return [FuseEntry(where, "Conv2d + ReLU", LEFT, reason=reason)]

        if not (merge or model.forward_only):
            return left("merging the pair changes what a slice of the nn.Sequential computes (the ReLU moves into "
                        "the conv), so it is done with fuse(model, merge=True) or fuse(model, inference=True)")
        if len(model.parents[id(conv)]) != 1:
            return left("the conv is used elsewhere in the model too, where no ReLU follows it")
        if conv.groups != 1:
            return left("a grouped conv (groups != 1): FusedConv2dReLU runs it through the PyTorch reference, so the "
                        "swap would gain nothing")

        def install():
            _switch(conv, FusedConv2dReLU)()
            identity = nn.Identity().train(relu.training)
            setattr(seq, name, identity)
            model.seen.update((id(conv), id(identity)))

        return [Rewrite(where, nn.Sequential(conv, relu), [Candidate(
            _switched(conv, FusedConv2dReLU), "FusedConv2dReLU", install)], [conv, relu],
            _images(conv.in_channels, conv))]


class _AttentionProbe(nn.Module):
    """The probe's view of a Hugging Face attention module: hidden states [batch, seq, hidden] in, the attention
    output out, with a rotary table as the model's rotary embedding hands it (cos / sin [batch, seq, rotary_dim] of
    angles pos * 10000^(-2i / rotary_dim), in the input's dtype; rotary_dim < head_dim for partial rotary) and no
    mask."""

    def __init__(self, attn: nn.Module, rotary_dim: int) -> None:
        super().__init__()
        self.attn, self.rotary_dim = attn, rotary_dim

    def forward(self, x: Tensor) -> Tensor:
        d, opts = self.rotary_dim, dict(device=x.device, dtype=torch.float64)
        freqs = (torch.arange(x.shape[1], **opts) * 7 + 1)[:, None] * 1e4 ** (-torch.arange(0, d, 2, **opts) / d)
        emb = torch.cat((freqs, freqs), -1).expand(x.shape[0], -1, -1)
        return type(self.attn).forward(self.attn, x, position_embeddings=(emb.cos().to(x.dtype), emb.sin().to(x.dtype)),
                                       attention_mask=None)[0]


class RotaryAttention(Pattern):
    """A Hugging Face attention module (a `q_proj` nn.Linear, an int `head_dim`) whose forward calls its modeling
    file's apply_rotary_pos_emb(q, k, cos, sin, ...) (Llama, Mistral, Qwen2, Qwen3, ...) -> its class switched to a
    subclass of the same name whose forward is the class's own, calling ops.apply_rotary there
    (integrations.transformers.rotary_attention_class; the modeling module is not patched). Parameters, children and
    hooks stay. The module's apply_rotary_pos_emb is first checked on its own against ops.apply_rotary (a differently
    written one, interleaved pairs or another formula, is left), then the probe runs the whole attention forward."""

    def match(self, path, module, model, merge):
        if isinstance(module, hf.FusedRotaryAttention):  # children are still visited (a Qwen3 q_norm, ...)
            return [FuseEntry(path, type(module).__name__, ALREADY_FUSED)]
        q_proj, head_dim = getattr(module, "q_proj", None), getattr(module, "head_dim", None)
        rotary = hf.hf_rotary_function(module)
        if type(q_proj) is not nn.Linear or type(head_dim) is not int or rotary is None:
            return None
        name = type(module).__name__
        rotary_dim = getattr(module, "rotary_ndims", head_dim)  # partial rotary (Phi, StableLM): the rotated width
        if type(rotary_dim) is not int or not 0 < rotary_dim <= head_dim or rotary_dim % 2:
            return [FuseEntry(path, name, LEFT, reason=f"a rotary width of {rotary_dim!r} (rotary_ndims) for head_dim "
                                                       f"{head_dim}")]
        if not hf.rotary_matches(rotary, rotary_dim):
            return [FuseEntry(path, name, LEFT, reason="its apply_rotary_pos_emb computes another rotation than HF "
                                                       "Llama's (interleaved pairs, another formula)")]
        cls = hf.rotary_attention_class(type(module), hf.rotary_keeps_dtype(rotary))
        candidate = Candidate(_AttentionProbe(_switched(module, cls), rotary_dim), f"{name} + ops.apply_rotary",
                              _switch(module, cls))
        return [Rewrite(path, _AttentionProbe(module, rotary_dim), [candidate], list(module.modules()),
                        _rows((q_proj.in_features,), top=-1), keeps_hooks=True, name=name, follows_training_flag=True)]


class RotaryEmbedding(Pattern):
    """A Hugging Face rotary embedding -> its class switched to a subclass of the same name whose forward is one
    ops.rotary_cos_sin launch (integrations.transformers.rotary_embedding_class): HF's runs about eight small ops,
    and a training step's GPU waits for their host time before its first layer. Two forms: Llama's (Mistral's,
    Qwen2's ...: a 1-D `inv_freq` buffer, a number `attention_scaling`, a string `rope_type`, forward(x,
    position_ids) reading only inv_freq and attention_scaling of itself) and the per-layer-type one (Gemma 3's,
    ModernBERT's ...: `rope_type` a dict of layer types, for each a `<type>_inv_freq` buffer and a number
    `<type>_attention_scaling`, forward(x, position_ids, layer_type) reading only those, through getattr). Every rope
    type must keep its frequencies fixed (not dynamic or longrope, which a decorator recomputes as sequences grow).
    The module has no parameters, so it is probed here rather than by the common probe: cos and sin for positions
    0..4095 and for random ones up to 2^17 (three rows), in bfloat16, float16 and float32, for each layer type, each
    equal to the original's, bit for bit (the op computes HF's fp32 products and cos / sin: a module that computes
    its table another way, even one rounding apart, is left). Hooks stay."""

    READS = {"inv_freq", "attention_scaling"}
    VARYING_ROPE = ("dynamic", "longrope")  # rope types whose inv_freq the forward's decorator recomputes

    def match(self, path, module, model, merge):
        if isinstance(module, hf.FusedRotaryEmbedding):
            return [FuseEntry(path, type(module).__name__, ALREADY_FUSED)]
        rope_type = getattr(module, "rope_type", None)
        if isinstance(rope_type, dict):  # per layer type: {type: rope type}
            tables = {t: (module._buffers.get(f"{t}_inv_freq"), getattr(module, f"{t}_attention_scaling", None),
                          r) for t, r in rope_type.items()}
        else:
            tables = {None: (module._buffers.get("inv_freq"), getattr(module, "attention_scaling", None), rope_type)}
        if not tables or rope_type is None or not all(isinstance(f, Tensor) and a is not None
                                                      for f, a, _ in tables.values()):
            if isinstance(rope_type, dict) and "inv_freq" in module._buffers:
                return [FuseEntry(path, type(module).__name__, LEFT, reason=f"rope_type {rope_type!r} is a dict "
                                  "without a table per layer type (no <type>_inv_freq buffers)")]
            return None
        name = type(module).__name__

        def left(reason):
            return [FuseEntry(path, name, LEFT, reason=reason)]

        for t, (inv_freq, scaling, kind) in tables.items():
            which = "" if t is None else f" ({t})"
            if inv_freq.dim() != 1 or not inv_freq.is_floating_point() or inv_freq.is_meta:
                return left(f"inv_freq{which} is {inv_freq.dtype} {list(inv_freq.shape)} on {inv_freq.device}, not a "
                            "1-D floating-point tensor with values")
            if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
                return left(f"attention_scaling{which} is a {type(scaling).__name__}, not a number")
            if not isinstance(kind, str):
                return left(f"rope_type {kind!r}{which} is not a string")
            if any(varying in kind for varying in self.VARYING_ROPE):
                return left(f"rope_type {kind!r}{which}: its frequencies change with the sequence length")
        per_type = None not in tables
        want = ["x", "position_ids", "layer_type"] if per_type else ["x", "position_ids"]
        try:
            params = list(inspect.signature(type(module).forward).parameters)[1:len(want) + 1]
        except (TypeError, ValueError):
            params = []
        if params != want:
            return left(f"its forward does not take ({', '.join(want)})")
        if per_type:
            if not _reads_only_layer_type_tables(type(module)):
                return left("its forward reads more of the module than <layer_type>_inv_freq and "
                            "<layer_type>_attention_scaling")
        else:
            reads = _forward_reads(type(module))
            if reads is None or reads - self.READS:
                return left("its forward reads more of the module than inv_freq and attention_scaling"
                            + ("" if reads is None else f" (self.{sorted(reads - self.READS)[0]})"))
        if "forward" in module.__dict__:
            return left("its forward is replaced on the instance (an accelerate-style hook), which a swap would "
                        "bypass or drop")
        cls = hf.rotary_embedding_class(type(module), per_type)
        device = next(iter(tables.values()))[0].device
        try:
            failure = _probe_rotary_embedding(module, _switched(module, cls), device, list(tables))
        except Exception as e:  # noqa: BLE001 - whatever fails in the probe leaves the module
            failure = f"the probe raised ({type(e).__name__}: {e})"
        if failure is not None:
            return left(f"the probe found a difference: {failure}")
        _switch(module, cls)()
        return [FuseEntry(path, name, SWAPPED, f"{name} + ops.rotary_cos_sin")]


def _reads_only_layer_type_tables(cls: type) -> bool:
    """Whether cls.forward (a per-layer-type rotary embedding's) uses the module only as
    getattr(self, f"{layer_type}_inv_freq") and getattr(self, f"{layer_type}_attention_scaling"), from its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(fn.args.args) < 4:
        return False
    me, layer_type = fn.args.args[0].arg, fn.args.args[3].arg
    allowed = set()
    for node in ast.walk(fn):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) == 2 and not node.keywords and isinstance(node.args[0], ast.Name)
                and node.args[0].id == me and isinstance(node.args[1], ast.JoinedStr)):
            parts = node.args[1].values
            if (len(parts) == 2 and isinstance(parts[0], ast.FormattedValue) and isinstance(parts[0].value, ast.Name)
                    and parts[0].value.id == layer_type and isinstance(parts[1], ast.Constant)
                    and parts[1].value in ("_inv_freq", "_attention_scaling")):
                allowed.add(id(node.args[0]))
    uses = [node for node in ast.walk(fn) if isinstance(node, ast.Name) and node.id == me]
    return bool(uses) and all(id(node) in allowed for node in uses)


def _probe_rotary_embedding(original: nn.Module, fused: nn.Module, device: torch.device,
                            layer_types: list) -> Optional[str]:
    """The first difference between the two modules' (cos, sin), for each layer type (None: a forward without one);
    None where they are equal, bit for bit. (A float64 yardstick would not do here: a module computing another table
    has no error against its own.)"""
    generator = torch.Generator().manual_seed(0)
    positions = [torch.arange(4096)[None], torch.randint(0, 2**17, (3, 257), generator=generator)]
    with torch.no_grad():
        for layer_type in layer_types:
            extra = () if layer_type is None else (layer_type,)
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                x = torch.zeros(1, dtype=dtype, device=device)
                for ids in positions:
                    ids = ids.to(device)
                    want = type(original).forward(original, x, ids, *extra)
                    got = type(fused).forward(fused, x, ids, *extra)
                    for what, ours, orig in zip(("cos", "sin"), got, want):
                        what = (f"{what} ({dtype}, positions up to {int(ids.max())}"
                                f"{'' if layer_type is None else f', {layer_type}'})")
                        if not isinstance(orig, Tensor) or ours.dtype != orig.dtype or ours.shape != orig.shape:
                            return (f"{what}: {ours.dtype} {tuple(ours.shape)} where the original gives "
                                    f"{getattr(orig, 'dtype', type(orig).__name__)} "
                                    f"{tuple(getattr(orig, 'shape', ()))}")
                        if not torch.equal(ours, orig):
                            differ = int((ours != orig).sum())
                            return (f"{what}: {differ} of {orig.numel()} values differ (max difference "
                                    f"{_max_err(ours, orig):.2e}); the fused table equals HF's formula bit for bit")
    return None


class _HiddenOnly(nn.Module):
    """Stands in for a causal LM's decoder in the probe: the probe input is the final hidden states."""

    def forward(self, inputs_embeds: Tensor, **kwargs) -> "_HiddenOnly.Outputs":
        return _HiddenOnly.Outputs(inputs_embeds)

    class Outputs:
        def __init__(self, hidden: Tensor) -> None:
            self.last_hidden_state = hidden

        def __getattr__(self, name: str):
            return None  # cache, hidden_states, attentions: none in the probe


class _LossProbe(nn.Module):
    """The probe's view of a *ForCausalLM: final hidden states [2, seq, hidden] in, its forward's loss out, for fixed
    labels (two ignored)."""

    def __init__(self, lm: nn.Module, vocab: int) -> None:
        super().__init__()
        self.lm, self.vocab = lm, vocab
        # a MoE model's router loss reads router logits the stand-in decoder does not have: the head and loss alone
        moe = getattr(getattr(lm, "config", None), "output_router_logits", None) is not None
        self.extra = {"output_router_logits": False} if moe else {}

    def forward(self, x: Tensor) -> Tensor:
        labels = torch.randint(0, self.vocab, x.shape[:2], generator=torch.Generator().manual_seed(1))
        labels[0, 1] = labels[1, -2] = -100
        training = self.lm.training  # the fused loss runs in training mode (its decoder is the probe's stand-in)
        self.lm.training = True
        try:
            return type(self.lm).forward(self.lm, inputs_embeds=x, labels=labels.to(x.device), **self.extra).loss
        finally:
            self.lm.training = training


class CausalLMLoss(Pattern):
    """A Hugging Face *ForCausalLM (an nn.Linear `lm_head` and a `model` child used by its forward, the loss
    transformers' ForCausalLMLoss) -> its class switched to a subclass of the same name whose forward, in training
    mode given labels, runs the model's own forward with lm_head passing the final hidden states to
    ops.linear_cross_entropy (HF's label shift, ignore_index and num_items_in_batch), returning logits=None; otherwise
    (no labels, eval mode, an lm_head wrapped or hooked since) it is the class's own forward
    (integrations.transformers.causal_lm_loss_class). Probed on the head and the loss alone (the decoder replaced by
    the probe input), so whatever the forward does to the logits before the loss (a soft cap) fails the probe.
    fuse(model, lm_head_loss=False) leaves it."""

    def match(self, path, module, model, merge):
        fused_class = isinstance(module, hf.FusedLinearCrossEntropyCausalLM)
        if fused_class and "_fusedkernels_logit_settings" in module.__dict__:  # its children are still visited
            return [FuseEntry(path, type(module).__name__, ALREADY_FUSED)]
        # A new instance of a fused class (type(model)(config), from_pretrained on it) runs its class's own forward
        # until fuse() probes it and gives it the settings: the original class's pattern, as for any model.
        original = hf.unfused_class(type(module)) if fused_class else type(module)
        lm_head, decoder = module._modules.get("lm_head"), module._modules.get("model")
        code = getattr(hf._unwrapped(original.forward), "__code__", None)
        if (type(lm_head) is not nn.Linear or decoder is None or code is None
                or not {"lm_head", "loss_function"} <= set(code.co_names)
                or not hf.is_hf_causal_lm_loss(getattr(module, "loss_function", None))):
            return None
        name = type(module).__name__
        if not model.lm_head_loss:
            return [FuseEntry(path, name, LEFT, reason="lm_head_loss=False: the loss is computed from the logits, "
                                                       "which are returned")]
        probed = copy.copy(module)
        probed._modules = {**module._modules, "model": _HiddenOnly()}
        cls = hf.causal_lm_loss_class(original)
        settings = {"_fusedkernels_logit_settings": hf.logit_settings(module)}  # what the probe sees
        candidate = Candidate(_LossProbe(_switched(probed, cls, **settings), lm_head.out_features),
                              f"{name} + ops.linear_cross_entropy", _switch(module, cls, **settings),
                              "in training with labels, logits=None (never built); fuse(model, lm_head_loss=False) keeps them")
        # the op keeps its 16-bit gradients rounded and scales them by the loss's grad: one more rounding (the
        # probe's tokens are one chunk; docs/llm.md)
        return [Rewrite(path, _LossProbe(probed, lm_head.out_features), [candidate], [module, lm_head],
                        _rows((lm_head.in_features,)), name=name, extra_roundings=1, follows_training_flag=True)]


# Tried in order on every module, outermost first; the first that matches decides.
PATTERNS: List[Pattern] = [
    CausalLMLoss(),
    RotaryAttention(),
    RotaryEmbedding(),
    TorchNorm(nn.LayerNorm, FusedLayerNorm),
    TorchNorm(nn.RMSNorm, FusedRMSNorm),
    HFRMSNorm(),
    MLPBlock(),
    LinearActivation(),
    ConvBatchNorm(),
    ConvReLU(),
]
