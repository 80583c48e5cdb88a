"""What the fused optimizers share: the per-step plan (params bucketed for one fused call each), cached
between steps; AMP; deferred clipping; torch.optim's argument checks."""

from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _dtensor


def _not_compiled(reason: str):
    """A decorator: torch.compile does not trace the function but calls it (a graph break; under fullgraph=True an
    error, which gives `reason` from torch 2.8 on)."""
    try:
        return torch.compiler.disable(reason=reason)
    except TypeError:  # torch < 2.8: no reason
        return torch.compiler.disable


# The masters' refresh branches on version counters, which a compiled graph cannot
_READS_VERSIONS = ("master weights: the step reads the params' version counters (to see writes from outside the "
                   "optimizer); compile the step without fullgraph=True")


class Bucket:
    """The params of one group that step in one fused call: one device, dtype, moment dtype, masters or not.

    Which params belong to which bucket is planned once and reused; each step reads the grads and the
    state tensors anew (from the params' state dicts, so a state entry set by hand is the one used).
    Complex params step through their real views, as in torch.optim. DTensor params (FSDP2) are bucketed
    by (mesh, placements), `layout`, and step through their local shards (their states are DTensors laid
    out as the param, as torch's optimizers keep them).
    """

    __slots__ = ("device", "layout", "index", "params", "states", "keys", "has_master", "counts_steps",
                 "is_complex")

    def __init__(self, device: torch.device, layout: Optional[tuple], keys: list[str], has_master: bool,
                 counts_steps: bool, is_complex: bool):
        self.device = device
        self.layout = layout
        self.index: list[int] = []  # positions in the group's params
        self.params: list[Tensor] = []
        self.states: list[dict] = []  # each param's state dict
        self.keys = keys
        self.has_master = has_master
        self.counts_steps = counts_steps
        self.is_complex = is_complex

    def lists(self, grads: list):
        """params, grads, {moment: tensors}, masters, steps: as the kernels take them. KeyError when a
        state entry was removed by hand (the plan is then rebuilt)."""
        params, bucket_grads = self.params, [grads[i] for i in self.index]
        moments = {k: [st[k] for st in self.states] for k in self.keys}
        masters = [st["master_param"] for st in self.states] if self.has_master else []
        steps = [st["step"] for st in self.states] if self.counts_steps else []
        if self.layout is not None:
            local = _dtensor.local
            bucket_grads = list(map(_dtensor.local_grad, bucket_grads, params))
            params = [local(p) for p in params]
            moments = {k: [local(t) for t in ts] for k, ts in moments.items()}
            masters = [local(m) for m in masters]
        if not self.is_complex:
            return params, bucket_grads, moments, masters, steps
        real = torch.view_as_real
        return ([real(p) for p in params], [real(g) for g in bucket_grads],
                {k: [real(t) for t in ts] for k, ts in moments.items()}, masters, steps)


class _Plan:
    __slots__ = ("params", "has_grad", "key", "state", "state_dicts", "buckets")


class FusedOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer whose step is one fused kernel per bucket (device, dtype, moment dtype, masters)
    of each group.

    The bucketing is planned once and reused while the params that have grads, the groups and the state
    stay the same, so a step costs little host time. Works with torch.amp.GradScaler without host syncs:
    the scaler hands over `grad_scale` and `found_inf`, and the kernel unscales the grads and skips the step
    on inf/NaN, on the device (a skipped step creates or advances no state).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, master_weights: bool, state_dtype: Optional[torch.dtype] = None):
        if defaults.get("differentiable"):
            raise ValueError(f"{type(self).__name__} does not support differentiable=True")
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        self.master_weights = bool(master_weights)
        self.state_dtype = state_dtype
        self._deferred_clip = None
        self._reset_plans()
        self._loaded_masters: set[int] = set()  # id(param): masters that came with a state (see _refresh_masters)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype == torch.complex32:
                    raise TypeError(f"{type(self).__name__}: complex32 params are not supported")

    # ---- argument checks, as torch.optim's (with its messages) ----

    @staticmethod
    def _check_lr(lr) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")

    @staticmethod
    def _check_adam_args(lr, betas, eps: float, weight_decay: float) -> tuple[float, float]:
        """torch.optim.Adam's checks; returns the betas as floats (one-element tensors are accepted)."""
        FusedOptimizer._check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        betas = tuple(betas)
        if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, Tensor) for b in betas)):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, b in enumerate(betas):
            if isinstance(b, Tensor) and b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        return float(betas[0]), float(betas[1])

    # ---- the step ----

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """One step of every param group; `closure` re-evaluates the loss, as in torch.optim.

        Under torch.compile, a step whose params are DTensors (FSDP2, tensor parallel) or whose grads are views
        into a shared buffer (FSDP2's reduce-scatter output, DDP's gradient_as_bucket_view) runs eagerly, a
        graph break (an error with fullgraph=True): compiled, the in-place fused ops on such views came out wrong
        (FSDP2) or failed to compile (DDP). Eagerly it is one multi-tensor launch per bucket all the same.
        """
        if torch.compiler.is_compiling() and self._has_shared_views():
            return self._step_eagerly(closure)
        return self._step(closure)

    def _step(self, closure: Optional[Callable]):
        """The step itself (under torch.no_grad()): per subclass."""
        raise NotImplementedError

    @_not_compiled("a step of DTensor params or of grads that are views runs eagerly: compile it without "
                   "fullgraph=True")
    def _step_eagerly(self, closure: Optional[Callable]):
        return self._step(closure)

    def _has_shared_views(self) -> bool:
        """Whether a param is a DTensor (its local shard and its grad's are views into FSDP2's buffers) or a
        grad is a view of another tensor. (Read under torch.compile: guarded, so a change recompiles.)"""
        return any(_dtensor.is_dtensor(p) or (p.grad is not None and p.grad._base is not None)
                   for group in self.param_groups for p in group["params"])

    # ---- state dicts, copies ----

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that state tensors keep their saved dtype: torch casts every floating state
        tensor to its param's dtype, which would round fp32 masters and fp32 states of 16-bit params.
        (torch's load_state_dict ends in __setstate__, which drops the step plans.) An entry that is an empty
        dict is an entry the checkpoint did not hold: torch.distributed.checkpoint's flattened optimizer state dicts
        (flatten_optimizer_state_dict=True) fill in every key of this optimizer's live state that way; it is
        dropped, so the entry counts as missing (FusedSGD's step count, a master weight made from the param)."""
        placeholder = lambda value: isinstance(value, dict) and not value  # noqa: E731
        state_dict = {**state_dict, "state": {param_id: {key: value for key, value in entries.items()
                                                         if not placeholder(value)}
                                              for param_id, entries in state_dict["state"].items()}}
        super().load_state_dict(state_dict)
        saved_state = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for param_id, p in zip(saved_group["params"], group["params"]):
                for key, value in saved_state.get(param_id, {}).items():
                    if (key != "step" and isinstance(value, Tensor) and value.is_floating_point()
                            and value.dtype != p.dtype):
                        self.state[p][key] = value.to(device=p.device, copy=True)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._reset_plans()

    # Options kept as attributes rather than in param groups, and a pending deferred clip: carried through
    # pickling and deepcopy (a clip whose grads did not come along is refused at the next step).
    _option_attributes: tuple[str, ...] = ("master_weights", "state_dtype", "_deferred_clip")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._option_attributes})
        return state

    def __setstate__(self, state: dict) -> None:
        """Also what load_state_dict ends with: groups saved by older releases (torch's, apex's) may lack
        options added since; they take the defaults, as torch's optimizers do."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._reset_plans()
        self._loaded_masters = {id(p) for group in self.param_groups for p in group["params"]
                                if "master_param" in self.state.get(p, ())}

    def _reset_plans(self) -> None:
        self._plans: dict[int, _Plan] = {}
        self._param_versions: dict[int, tuple] = {}  # id(param) -> (versions, data_ptr) after its last step

    # ---- per-subclass: what state a param has ----

    def _moment_keys(self, group: dict) -> list[str]:
        """The state tensors of each param of the group, zeros at the first step."""
        raise NotImplementedError

    def _counts_steps(self, group: dict) -> bool:
        """Whether the group's params keep a "step" count (on the device)."""
        return True

    def _moment_dtype(self, p: Tensor, has_master: bool) -> torch.dtype:
        """The moments' dtype: state_dtype when given; else the param's dtype for fp32 and bf16 params
        without master weights (as torch), float32 otherwise. Complex params keep complex moments."""
        if p.is_complex():
            return p.dtype
        if self.state_dtype is not None:
            return self.state_dtype
        if p.dtype == torch.float16 or has_master:
            return torch.float32
        return p.dtype

    # ---- the plan ----

    def _buckets(self, index: int) -> list[tuple]:
        """(bucket, params, grads, {moment: tensors}, masters, steps) per bucket of param group `index`, from
        the plan of the last step while it still holds, else from a new one. Call `_stepped(buckets)` after the
        step. Plans are keyed by the group's index, not its id(): torch.compile traces no id() of a dict."""
        group = self.param_groups[index]
        params = group["params"]
        grads = [p.grad for p in params]
        has_grad = [g is not None for g in grads]
        plan = self._plans.get(index)
        if (plan is None or len(plan.params) != len(params) or not all(map(operator.is_, plan.params, params))
                or plan.has_grad != has_grad or plan.key != self._plan_key(group) or plan.state is not self.state
                or not all(map(operator.is_, map(self.state.get, plan.state_dicts[0]), plan.state_dicts[1]))):
            plan = self._plan(group, has_grad)
        try:
            lists = [(b, *b.lists(grads)) for b in plan.buckets]
        except KeyError:  # a state entry removed by hand (state[p].clear()): plan again, creating it
            plan = self._plan(group, has_grad)
            lists = [(b, *b.lists(grads)) for b in plan.buckets]
        self._plans[index] = plan
        for b, params, _, _, masters, _ in lists:
            if b.has_master:
                self._refresh_masters(b.params, params, masters)
        return lists

    @_not_compiled(_READS_VERSIONS)
    def _refresh_masters(self, params: list[Tensor], tensors: list[Tensor], masters: list[Tensor]) -> None:
        """A param written outside the optimizer since its last step gives its master the new value;
        otherwise the step would write the stale master back over it. Seen: in-place ops on the param
        (model.load_state_dict, torch.no_grad() edits: its version counter moves) and `p.data = t` (its
        storage changes). Not seen: in-place writes through `p.data` (`p.data.copy_`), which bypass the
        version counter; call `refresh_masters()` after those. `tensors`: what the step writes, the params
        or their local shards.

        A master that came with a state (load_state_dict, a copy) is checked against its param at its first
        step, element by element: where it does not round to the param, the param's value replaces it. A
        checkpoint's master matching its params is kept whole; a master the state did not bring (a
        torch.optim checkpoint loaded by DCP with allow_partial_load keeps the master the optimizer had) or
        one loaded with other params yields to the params, whether they were loaded before or after it."""
        seen, loaded = self._param_versions, self._loaded_masters
        for p, t, master in zip(params, tensors, masters):
            now = (_dtensor.versions(p), t._version, t.data_ptr())
            if id(p) in loaded:
                loaded.discard(id(p))
                t = t.detach()
                master.copy_(torch.where(master.to(t.dtype) == t, master, t.to(master.dtype)))
            elif seen.get(id(p), now) != now:
                master.copy_(t.detach())

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """Copy every param into its fp32 master (master_weights=True): after writing params in a way the
        optimizer cannot see (in place through `p.data`)."""
        for group in self.param_groups:
            for p in group["params"]:
                master = self.state.get(p, {}).get("master_param")
                if master is not None:
                    master.copy_(p.detach())

    def _stepped(self, buckets: list[tuple]) -> None:
        """After a step: remember the versions of the params with masters (the step itself bumps them)."""
        for b, params, *_ in buckets:
            if b.has_master:
                self._remember_versions(b.params, params)

    @_not_compiled(_READS_VERSIONS)
    def _remember_versions(self, params: list[Tensor], tensors: list[Tensor]) -> None:
        self._param_versions.update((id(p), (_dtensor.versions(p), t._version, t.data_ptr()))
                                    for p, t in zip(params, tensors))

    def _plan_key(self, group: dict) -> tuple:
        return tuple(self._moment_keys(group)), self._counts_steps(group)

    def _plan(self, group: dict, has_grad: list[bool]) -> _Plan:
        keys, counts_steps = self._plan_key(group)
        keys = list(keys)
        buckets: dict[tuple, Bucket] = {}
        stepped, state_dicts = [], []
        for i, p in enumerate(group["params"]):
            if not has_grad[i]:
                continue
            self._check_grad(p)
            state = self.state[p]
            master = self._master(p, state)
            moment_dtype = self._moment_dtype(p, master is not None)
            self._check_partial_state(p, state, keys, counts_steps)
            if counts_steps:
                self._init_step(p, state, bool(keys) and all(state.get(k) is not None for k in keys), group)
            for key in keys:
                t = state.get(key)
                if t is None:  # laid out as the param (channels_last stays channels_last), as torch's
                    state[key] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
                elif t.dtype != moment_dtype or t.device != p.device:
                    state[key] = t.to(device=p.device, dtype=moment_dtype)
            bucket_dtype = torch.empty((), dtype=p.dtype).real.dtype if p.is_complex() else p.dtype
            layout = _dtensor.sharding(p)
            key = (p.device, layout, bucket_dtype, moment_dtype, master is not None, p.is_complex())
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(p.device, layout, keys, master is not None, counts_steps, p.is_complex())
            b.index.append(i)
            b.params.append(p)
            b.states.append(state)
            stepped.append(p)
            state_dicts.append(state)
        plan = _Plan()
        plan.params, plan.has_grad, plan.key = tuple(group["params"]), has_grad, (tuple(keys), counts_steps)
        plan.state, plan.state_dicts, plan.buckets = self.state, (stepped, state_dicts), list(buckets.values())
        return plan

    def _check_partial_state(self, p: Tensor, state: dict, keys: list[str], counts_steps: bool) -> None:
        """A state with a step count but not every moment, or moments without a count, is corrupt: torch's
        Adam raises KeyError on it, and so does this. (A torch SGD state has a buffer and no count: it is
        loaded as started; a state cleared whole starts afresh, as torch.)"""
        if not self._strict_state or not state:
            return
        have = [k for k in keys if k in state]
        needs_step = counts_steps and self._step_in_state
        missing = [k for k in keys if k not in state] + (["step"] if needs_step and "step" not in state else [])
        if missing and (have or "step" in state):
            raise KeyError(f"{type(self).__name__}: the state of a param lacks {missing} (it has "
                           f"{sorted(state)}): a partial state, which torch.optim refuses too")

    _strict_state = True  # FusedSGD: False (torch's SGD state has no step count)
    _step_in_state = True  # FusedLAMB: False (apex keeps the count in the param group)

    def _check_grad(self, p: Tensor) -> None:
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if p.grad.dtype != p.dtype:
            raise TypeError(f"{type(self).__name__}: a grad must have its param's dtype, got {p.grad.dtype} "
                            f"for a {p.dtype} param")
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"{type(self).__name__}: params must be floating-point or complex, got {p.dtype}")

    def _init_step(self, p: Tensor, state: dict, started: bool, group: dict) -> None:
        """A float32 "step" on the param's device: 0 for new state; a step loaded from torch (a CPU tensor or
        a number) is moved; state loaded without a step (torch's SGD keeps none) counts as started."""
        step = state.get("step")
        if step is None:
            state["step"] = torch.full((), 1.0 if started else 0.0, dtype=torch.float32, device=p.device)
        elif not (isinstance(step, Tensor) and step.dtype == torch.float32 and step.device == p.device
                  and step.dim() == 0):
            state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device).reshape(())

    def _master(self, p: Tensor, state: dict) -> Optional[Tensor]:
        """The fp32 master copy of a 16-bit param (created from the param when missing, e.g. after loading
        a torch.optim state dict), or None."""
        if not self.master_weights or p.dtype not in (torch.float16, torch.bfloat16):
            return None
        master = state.get("master_param")
        if master is None or master.device != p.device or master.dtype != torch.float32:
            master = (master if master is not None else p.detach()).to(device=p.device, dtype=torch.float32).clone()
            state["master_param"] = master
        return master

    # ---- AMP, deferred clipping, lr ----

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's; also drops a clip deferred to this optimizer (it was for the grads being cleared)."""
        self._deferred_clip = None
        super().zero_grad(set_to_none)

    def _grads_with_params(self) -> tuple[list[Tensor], list[Tensor]]:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    def defer_grad_clip(self, coef: Tensor, params: list[Tensor]) -> None:
        """Multiply the grads of `params` by `coef` (a one-element tensor) inside the next step instead of in
        a separate pass: what `fusedkernels.optim.clip_grad_norm_(params, ..., defer_to=optimizer)` does.

        `params` must be exactly this optimizer's params that have grads. The clip stays pending until the
        next step, which applies it, or zero_grad, which drops it; a new clip before then composes with it
        (as two clips in a row would). A step that finds the grads changed since the clip raises.
        """
        mine, grads = self._grads_with_params()
        if {id(p) for p in params} != {id(p) for p in mine}:
            raise ValueError(f"clip_grad_norm_(defer_to=...): the clipped parameters must be exactly the "
                             f"{type(self).__name__}'s parameters that have grads ({len(params)} given with grads, "
                             f"{len(mine)} in the optimizer); clip the others separately without defer_to")
        self._deferred_clip = (coef, grads, [_dtensor.versions(g) for g in grads])

    def deferred_clip_coef(self) -> Optional[Tensor]:
        """The clip coefficient pending for the next step, or None (none, or the grads have changed)."""
        if self._deferred_clip is None:
            return None
        coef, grads, versions = self._deferred_clip
        _, current = self._grads_with_params()
        if len(current) != len(grads) or not all(map(operator.is_, current, grads)):
            return None
        if not torch.compiler.is_compiling() and [_dtensor.versions(g) for g in grads] != versions:
            return None  # (a compiled step cannot read version counters: it trusts the clip)
        return coef

    def _amp_and_clip(self):
        amp = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if self._deferred_clip is None:  # (no attribute writes: torch.compile of a step traces this)
            return (*amp, None)
        clip = self.deferred_clip_coef()
        self._deferred_clip = None
        if clip is None:
            raise RuntimeError(f"{type(self).__name__}.step(): the grads changed after clip_grad_norm_(..., defer_to="
                               f"optimizer) measured them (another backward, or grads set or modified in place); "
                               f"clip again after the last change, or clip without defer_to")
        return (*amp, clip)

    @staticmethod
    def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
        return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())

    @staticmethod
    def _value_for(t: Optional[Tensor], params: list[Tensor]) -> Optional[Tensor]:
        """A computed scalar (a deferred clip coefficient, LAMB's global grad norm) for a bucket: float32 for
        the kernels, float64 for float64 params, which run in float64."""
        if t is None:
            return None
        dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        return t.to(device=params[0].device, dtype=dtype, non_blocking=True).reshape(())

    def _lr_args(self, group: dict, device: torch.device):
        lr = group["lr"]
        if isinstance(lr, Tensor):
            return 0.0, self._on(lr, device)
        return float(lr), None

    @staticmethod
    def _evaluate(closure: Optional[Callable]):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()
