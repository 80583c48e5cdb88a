"""The fused modules and optimizers under torch.distributed, against single-process runs of the same model on the
whole batch: DDP (bucketed all-reduce, static graph, no_sync), FSDP2 (fully_shard: DTensor params, grads and
optimizer states), clip_grad_norm_ and FusedLAMB with global norms, torch.distributed.checkpoint round trips
and state dicts shared with torch.optim.AdamW.

Two processes: gloo on CPU (always), NCCL on two GPUs (`cuda`, skipped with fewer). One launch runs every
scenario (starting processes costs seconds); each test reports one scenario from both ranks. The same
scenarios run under torchrun (scripts/gpu_check_distributed.sh):

    torchrun --nproc-per-node 2 tests/test_distributed.py [--device cuda]
    python tests/test_distributed.py --per-device      # one process, two GPUs: cuda:1 first, then both
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

WORLD = 2
TIMEOUT_S = 240  # the whole launch; the first collective of a hung rank fails after COLLECTIVE_TIMEOUT
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


class Skip(Exception):
    """A scenario this torch or machine cannot run, with the reason."""


# ---------------------------------------------------------------------------------------------------------
# The model, data and optimizers
# ---------------------------------------------------------------------------------------------------------


def _model(device, dtype=torch.float32) -> nn.Module:
    """Fused modules, uneven shard sizes (7 rows on 2 ranks) and a one-element bias (an empty shard on
    rank 1 under FSDP2). The same seed on every rank: the same initial weights."""
    from fusedkernels.nn import FusedLayerNorm, FusedLinear, FusedRMSNorm

    torch.manual_seed(1)
    kw = dict(device=device, dtype=dtype)
    return nn.Sequential(FusedLinear(16, 32, activation="gelu", **kw), FusedLayerNorm(32, **kw),
                         FusedLinear(32, 7, activation="none", **kw), FusedRMSNorm(7, **kw), nn.Linear(7, 1, **kw))


def _batch(device, dtype=torch.float32, micro: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + micro)
    return torch.randn(4 * WORLD, 16, generator=g).to(device=device, dtype=dtype)


def _loss(model, x) -> torch.Tensor:
    return model(x).float().square().mean()


def _optimizers():
    from fusedkernels.optim import FusedAdam, FusedAdamW, FusedLAMB, FusedSGD

    return {
        "adamw": lambda ps: FusedAdamW(ps, lr=1e-2, weight_decay=0.1),
        "adam": lambda ps: FusedAdam(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
        "sgd": lambda ps: FusedSGD(ps, lr=1e-1, momentum=0.9, nesterov=True, weight_decay=0.1),
        # a small max_grad_norm: the global clip is active
        "lamb": lambda ps: FusedLAMB(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=0.05),
    }


OPTIMIZERS = ("adamw", "adam", "sgd", "lamb")
STEPS = 3


def _reference(ctx, optimizer: str, steps: int = STEPS, dtype=torch.float32, **opt_kw):
    """The single-process run: the whole batch, one process, plain tensors."""
    model = _model(ctx.device, dtype)
    opt = _make(optimizer, model.parameters(), **opt_kw)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, _batch(ctx.device, dtype)).backward()
        opt.step()
    return model, opt


def _make(optimizer: str, params, **kw):
    if kw:
        from fusedkernels import optim

        return getattr(optim, optimizer)(params, lr=1e-2, **kw)
    return _optimizers()[optimizer](params)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _assert_params_close(model, ref, atol=1e-5, rtol=1e-4) -> None:
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(_full(p.detach()).float(), _full(q.detach()).float(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------
# Scenarios: each runs on every rank
# ---------------------------------------------------------------------------------------------------------


class Context:
    def __init__(self, rank: int, device: torch.device, out_dir: str):
        self.rank, self.device, self.out_dir = rank, device, out_dir
        self.mesh = None  # FSDP2's, made once

    def local(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // WORLD
        return x[self.rank * n:(self.rank + 1) * n]


def _ddp(ctx, model, **kw):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # tiny buckets: every step runs several bucketed all-reduces
    return DDP(model, device_ids=ids, bucket_cap_mb=1e-4, **kw)


def ddp(ctx, optimizer: str) -> None:
    model = _model(ctx.device)
    wrapped = _ddp(ctx, model, static_graph=optimizer == "adamw")
    opt = _make(optimizer, wrapped.parameters())
    for _ in range(STEPS):
        opt.zero_grad()
        _loss(wrapped, ctx.local(_batch(ctx.device))).backward()
        opt.step()
    _assert_params_close(model, _reference(ctx, optimizer)[0])


def ddp_no_sync(ctx) -> None:
    """Two micro-batches, the first under no_sync: the grads all-reduced once equal the single process's
    accumulated ones."""
    model = _model(ctx.device)
    wrapped = _ddp(ctx, model)
    opt = _make("adamw", wrapped.parameters())
    ref = _model(ctx.device)
    ref_opt = _make("adamw", ref.parameters())
    for _ in range(STEPS):
        opt.zero_grad()
        ref_opt.zero_grad()
        with wrapped.no_sync():
            _loss(wrapped, ctx.local(_batch(ctx.device, micro=1))).backward()
        _loss(wrapped, ctx.local(_batch(ctx.device, micro=2))).backward()
        for micro in (1, 2):
            _loss(ref, _batch(ctx.device, micro=micro)).backward()
        opt.step()
        ref_opt.step()
    _assert_params_close(model, ref)


def _fsdp_model(ctx, dtype=torch.float32):
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        raise Skip(f"this torch has no FSDP2 fully_shard ({e})")
    if ctx.mesh is None:
        ctx.mesh = init_device_mesh(ctx.device.type, (WORLD,))
    model = _model(ctx.device, dtype)
    for layer in model:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    return model


def _check_state_layout(opt) -> None:
    """Every state tensor but the step count is a DTensor laid out as its param, as torch's optimizers keep
    them (what DCP saves and reshards)."""
    from torch.distributed.tensor import DTensor

    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state[p].items():
                if key == "step":
                    assert not isinstance(value, DTensor), "the step count is a plain tensor, as torch's"
                    continue
                assert isinstance(value, DTensor), f"state {key} is a {type(value).__name__}, not a DTensor"
                assert value.placements == p.placements and value.shape == p.shape, key


def fsdp(ctx, optimizer: str) -> None:
    model = _fsdp_model(ctx)
    opt = _make(optimizer, model.parameters())
    for _ in range(STEPS):
        opt.zero_grad()
        _loss(model, ctx.local(_batch(ctx.device))).backward()
        opt.step()
    _check_state_layout(opt)
    _assert_params_close(model, _reference(ctx, optimizer)[0])


def fsdp_bf16_masters(ctx) -> None:
    """bf16 params with fp32 masters and bf16 moments: all sharded as the params."""
    kw = dict(master_weights=True, state_dtype=torch.bfloat16, weight_decay=0.1)
    model = _fsdp_model(ctx, torch.bfloat16)
    opt = _make("FusedAdamW", model.parameters(), **kw)
    for _ in range(STEPS):
        opt.zero_grad()
        _loss(model, ctx.local(_batch(ctx.device, torch.bfloat16))).backward()
        opt.step()
    _check_state_layout(opt)
    for p in model.parameters():
        st = opt.state[p]
        assert st["master_param"].dtype == torch.float32 and st["exp_avg"].dtype == torch.bfloat16
        torch.testing.assert_close(st["master_param"].full_tensor().to(torch.bfloat16), p.detach().full_tensor())
    # bf16 grads reduced across ranks round differently from the single process's: a bf16 tolerance
    ref, _ = _reference(ctx, "FusedAdamW", dtype=torch.bfloat16, **kw)
    _assert_params_close(model, ref, atol=2e-2, rtol=2e-2)


def fsdp_masters_see_loaded_weights(ctx) -> None:
    """Weights written through the DTensor params between steps (load_state_dict) reach the fp32 masters: the
    write moves the DTensor's version counter, not its local shard's, and the step must not write the stale
    master back over them."""
    model = _fsdp_model(ctx, torch.bfloat16)
    opt = _make("FusedAdamW", model.parameters(), master_weights=True)
    for _ in range(2):
        opt.zero_grad()
        _loss(model, ctx.local(_batch(ctx.device, torch.bfloat16))).backward()
        opt.step()
    model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    opt.zero_grad()
    _loss(model, ctx.local(_batch(ctx.device, torch.bfloat16))).backward()
    opt.step()
    for p in model.parameters():  # one Adam step of lr 1e-2 from the loaded zeros (a stale master: the old weights)
        assert p.detach().full_tensor().float().abs().max().item() < 2e-2


def fsdp_clip_deferred_stale(ctx) -> None:
    """A deferred clip followed by another backward (FSDP2 accumulates into the grads' local shards): the step
    refuses the stale coefficient, as it does for plain tensors."""
    from fusedkernels.optim import clip_grad_norm_

    model = _fsdp_model(ctx)
    opt = _make("adamw", model.parameters())
    _loss(model, ctx.local(_batch(ctx.device))).backward()
    clip_grad_norm_(model.parameters(), 0.05, defer_to=opt)
    _loss(model, ctx.local(_batch(ctx.device))).backward()
    try:
        opt.step()
    except RuntimeError as e:
        assert "the grads changed after clip_grad_norm_" in str(e), e
    else:
        raise AssertionError("the step applied a clip computed before the last backward")


def fsdp_clip(ctx) -> None:
    """clip_grad_norm_ on sharded grads: the global norm (a replicated DTensor, as torch's), the same clipped
    grads as the single process's, and as torch's clip on the same sharded grads."""
    from torch.distributed.tensor import DTensor

    from fusedkernels.optim import clip_grad_norm_

    for norm_type in (2.0, math.inf):
        model, ref, theirs = _fsdp_model(ctx), _model(ctx.device), _fsdp_model(ctx)  # theirs: torch's clip
        for m in (model, theirs):
            _loss(m, ctx.local(_batch(ctx.device))).backward()
        _loss(ref, _batch(ctx.device)).backward()
        norm = clip_grad_norm_(model.parameters(), 0.05, norm_type)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05, norm_type)
        assert isinstance(norm, DTensor), f"the norm of DTensor grads is a {type(norm).__name__}, torch's a DTensor"
        torch.testing.assert_close(norm.full_tensor(), ref_norm.float(), rtol=1e-5, atol=1e-7)
        if norm_type == 2.0:  # (torch's inf-norm refuses the empty shard of rank 1)
            their_norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05, norm_type)
            torch.testing.assert_close(norm.full_tensor(), their_norm.full_tensor().float(), rtol=1e-5, atol=1e-7)
        assert ref_norm > 0.05, "the clip must be active"
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-4, atol=1e-7)


def fsdp_clip_nan(ctx) -> None:
    """A NaN in one rank's shard (either rank): the total norm is NaN on every rank and every grad NaN, as a
    single process's clip of the whole grads gives; for the inf-norm too (a max all-reduce drops NaN)."""
    from fusedkernels.optim import clip_grad_norm_

    for norm_type in (2.0, math.inf):
        for nan_rank in range(WORLD):
            model = _fsdp_model(ctx)
            _loss(model, ctx.local(_batch(ctx.device))).backward()
            if ctx.rank == nan_rank:
                next(model.parameters()).grad._local_tensor[0, 0] = float("nan")
            norm = clip_grad_norm_(model.parameters(), 0.05, norm_type).full_tensor()
            assert norm.isnan(), f"norm_type {norm_type}, a NaN on rank {nan_rank}: norm {norm.item()}"
            for p in model.parameters():
                assert p.grad.full_tensor().isnan().all(), "the grads must be scaled by a NaN coefficient"


def fsdp_clip_deferred(ctx) -> None:
    """clip_grad_norm_(defer_to=optimizer) on sharded grads: the step scales the local shards by the global
    coefficient."""
    from fusedkernels.optim import clip_grad_norm_

    model, ref = _fsdp_model(ctx), _model(ctx.device)
    opt, ref_opt = _make("adamw", model.parameters()), _make("adamw", ref.parameters())
    for _ in range(STEPS):
        opt.zero_grad()
        ref_opt.zero_grad()
        _loss(model, ctx.local(_batch(ctx.device))).backward()
        _loss(ref, _batch(ctx.device)).backward()
        clip_grad_norm_(model.parameters(), 0.05, defer_to=opt)
        clip_grad_norm_(ref.parameters(), 0.05)
        opt.step()
        ref_opt.step()
    _assert_params_close(model, ref)


def fsdp_dcp(ctx) -> None:
    """DCP: our sharded optimizer state saved and loaded back (the next step equals the uninterrupted run's);
    the same checkpoint loaded into torch.optim.AdamW (and torch's state back into ours) steps alike."""
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    except ImportError as e:
        raise Skip(f"this torch has no torch.distributed.checkpoint state_dict API ({e})")
    from fusedkernels.optim import FusedAdamW

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            _loss(model, ctx.local(_batch(ctx.device))).backward()
            opt.step()

    def restored(make_opt, path):
        model = _fsdp_model(ctx)
        model.load_state_dict(trained.state_dict())
        opt = make_opt(model.parameters())
        state = get_optimizer_state_dict(model, opt)
        dcp.load(state, checkpoint_id=path)
        set_optimizer_state_dict(model, opt, state)
        return model, opt

    trained = _fsdp_model(ctx)
    opt = FusedAdamW(trained.parameters(), lr=1e-2, weight_decay=0.1)
    train(trained, opt, 2)
    path = os.path.join(ctx.out_dir, "ckpt")
    dcp.save(get_optimizer_state_dict(trained, opt), checkpoint_id=path)

    ours, ours_opt = restored(lambda ps: FusedAdamW(ps, lr=1e-2, weight_decay=0.1), path)
    torchs, torch_opt = restored(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), path)
    _check_state_layout(ours_opt)
    for model, o in ((trained, opt), (ours, ours_opt), (torchs, torch_opt)):
        train(model, o, 1)
    _assert_params_close(ours, trained, atol=0, rtol=0)
    _assert_params_close(torchs, trained, atol=1e-6, rtol=1e-5)

    # torch's state into ours
    path = os.path.join(ctx.out_dir, "ckpt_torch")
    dcp.save(get_optimizer_state_dict(torchs, torch_opt), checkpoint_id=path)
    back, back_opt = restored(lambda ps: FusedAdamW(ps, lr=1e-2, weight_decay=0.1), path)
    back.load_state_dict(torchs.state_dict())
    for model, o in ((torchs, torch_opt), (back, back_opt)):
        train(model, o, 1)
    _assert_params_close(back, torchs, atol=1e-6, rtol=1e-5)


def fsdp_dcp_cross_loads(ctx) -> None:
    """DCP checkpoints between torch's optimizers and ours where the state keys differ: torch's SGD (no step
    count) into FusedSGD with DCP's default planner, and back; torch's AdamW (no master) into
    FusedAdamW(master_weights=True) with allow_partial_load, the model loaded after the optimizer (the masters
    must follow the loaded params, not keep the ones the optimizer had), and back. Each run then steps as the
    source optimizer's continuing."""
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    except ImportError as e:
        raise Skip(f"this torch has no torch.distributed.checkpoint state_dict API ({e})")
    from fusedkernels.optim import FusedAdamW, FusedSGD

    sgd = dict(lr=0.1, momentum=0.9, dampening=0.3)  # dampening: a loaded buffer must not restart from the grad
    torch_sgd, fused_sgd = (lambda ps: torch.optim.SGD(ps, **sgd)), (lambda ps: FusedSGD(ps, **sgd))
    torch_adamw = lambda ps: torch.optim.AdamW(ps, lr=0.1)  # noqa: E731 (steps far from the initial weights)
    fused_adamw = lambda ps: FusedAdamW(ps, lr=0.1, master_weights=True)  # noqa: E731
    partial = DefaultLoadPlanner(allow_partial_load=True)
    cases = [(torch.float32, torch_sgd, fused_sgd, None), (torch.float32, fused_sgd, torch_sgd, None),
             (torch.bfloat16, torch_adamw, fused_adamw, partial), (torch.bfloat16, fused_adamw, torch_adamw, None)]

    def train(model, opt, steps, dtype):
        for _ in range(steps):
            opt.zero_grad()
            _loss(model, ctx.local(_batch(ctx.device, dtype))).backward()
            opt.step()

    for i, (dtype, source, target, planner) in enumerate(cases):
        model = _fsdp_model(ctx, dtype)
        opt = source(model.parameters())
        train(model, opt, 2, dtype)
        path = os.path.join(ctx.out_dir, f"ckpt_cross_{i}")
        dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=path)
        loaded = _fsdp_model(ctx, dtype)
        loaded_opt = target(loaded.parameters())
        state = get_optimizer_state_dict(loaded, loaded_opt)
        dcp.load(state, checkpoint_id=path, planner=planner)
        set_optimizer_state_dict(loaded, loaded_opt, state)
        loaded.load_state_dict(model.state_dict())
        train(model, opt, 1, dtype)
        train(loaded, loaded_opt, 1, dtype)
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # (torch's bf16 AdamW has no masters)
        _assert_params_close(loaded, model, atol=tol, rtol=tol)


def _ops_ran_eagerly(run) -> bool:
    """Whether run() called the fused ops and every call ran eagerly, not traced by torch.compile."""
    from fusedkernels import _native

    route, compiling = _native.route, []

    def spy(*args):
        compiling.append(torch.compiler.is_compiling())  # (traced: the append is replayed with True)
        return route(*args)

    _native.route = spy
    try:
        run()
    finally:
        _native.route = route
    return bool(compiling) and not any(compiling)


def compiled_step(ctx, wrapper: str, optimizer: str) -> None:
    """torch.compile(opt.step) with grads that are views into one buffer: FSDP2's (DTensors over its
    reduce-scatter output) and DDP's with gradient_as_bucket_view=True. The step runs eagerly (compiled, the
    fused ops on those views came out wrong under FSDP2 and failed to compile under DDP): the same params as
    the eager step's."""
    trained = []
    for compiled in (False, True):
        if wrapper == "fsdp":
            model = wrapped = _fsdp_model(ctx)
        else:
            model = _model(ctx.device)
            wrapped = _ddp(ctx, model, gradient_as_bucket_view=True)
        opt = _make(optimizer, wrapped.parameters())
        step = torch.compile(opt.step) if compiled else opt.step

        def train():
            for _ in range(STEPS):
                opt.zero_grad()
                _loss(wrapped, ctx.local(_batch(ctx.device))).backward()
                for p in model.parameters():
                    assert (p.grad._local_tensor if wrapper == "fsdp" else p.grad)._base is not None, "not a view"
                step()

        if compiled:
            assert _ops_ran_eagerly(train), "the compiled step traced the fused ops"
        else:
            train()
        trained.append(model)
    _assert_params_close(trained[1], trained[0], atol=0, rtol=0)


SCENARIOS = {
    **{f"ddp_{o}": (lambda o: lambda ctx: ddp(ctx, o))(o) for o in OPTIMIZERS},
    "ddp_no_sync": ddp_no_sync,
    **{f"fsdp_{o}": (lambda o: lambda ctx: fsdp(ctx, o))(o) for o in OPTIMIZERS},
    "fsdp_bf16_masters": fsdp_bf16_masters,
    "fsdp_clip": fsdp_clip,
    "fsdp_clip_nan": fsdp_clip_nan,
    "fsdp_clip_deferred": fsdp_clip_deferred,
    "fsdp_clip_deferred_stale": fsdp_clip_deferred_stale,
    "fsdp_masters_see_loaded_weights": fsdp_masters_see_loaded_weights,
    "fsdp_dcp": fsdp_dcp,
    "fsdp_dcp_cross_loads": fsdp_dcp_cross_loads,
    "fsdp_compiled_step_adamw": lambda ctx: compiled_step(ctx, "fsdp", "adamw"),
    "fsdp_compiled_step_lamb": lambda ctx: compiled_step(ctx, "fsdp", "lamb"),
    "ddp_bucket_view_compiled_step": lambda ctx: compiled_step(ctx, "ddp", "adamw"),
}


try:  # a failed DCP load raises a BaseException
    from torch.distributed.checkpoint.api import CheckpointException

    _FAILURES = (Exception, CheckpointException)
except ImportError:
    _FAILURES = (Exception,)


def run_scenarios(rank: int, device_type: str, out_dir: str) -> dict:
    """Every scenario on this rank (the process group is initialised): {name: "ok" | "skip: ..." | "fail: ..."}."""
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = Context(rank, device, out_dir)
    results = {}
    for name, scenario in SCENARIOS.items():
        try:
            scenario(ctx)
            results[name] = "ok"
        except Skip as e:
            results[name] = f"skip: {e}"
        except _FAILURES:
            results[name] = "fail: " + traceback.format_exc()
        print(f"[rank {rank}] {name}: {results[name]}", flush=True)
        dist.barrier()
    return results


def _spawned(rank: int, device_type: str, out_dir: str) -> None:
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    try:
        results = run_scenarios(rank, device_type, out_dir)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()
    # Gloo's worker threads can still hold tensors at interpreter finalisation and abort the process there
    # (pytorch/pytorch#179291); the results are written, so end without finalising.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _launch(device_type: str) -> dict:
    """Both ranks' results per scenario, from processes started here (a file rendezvous: no port to pick)."""
    import torch.multiprocessing as mp

    out_dir = tempfile.mkdtemp(prefix="fk_dist_")
    procs = mp.start_processes(_spawned, args=(device_type, out_dir), nprocs=WORLD, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    result_files = [os.path.join(out_dir, f"rank{rank}.json") for rank in range(WORLD)]
    try:
        while not procs.join(timeout=max(1.0, deadline - time.monotonic()), grace_period=30):
            if time.monotonic() > deadline:
                return {"*": f"fail: timed out after {TIMEOUT_S} s"}
    except mp.ProcessRaisedException as e:
        return {"*": f"fail: a rank raised\n{e}"}
    except mp.ProcessExitedException as e:
        if not all(os.path.exists(f) for f in result_files):
            return {"*": f"fail: a rank died before its scenarios finished\n{e}"}
        # Every scenario ran and reported; the process group's teardown is torch's.
        warnings.warn(f"a rank died in the process group's teardown, after its scenarios: {e}")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    merged: dict = {}
    for path in result_files:
        with open(path) as f:
            for name, result in json.load(f).items():
                merged.setdefault(name, []).append(result)
    return merged


_results: dict = {}


def _result(device_type: str, name: str) -> None:
    if device_type not in _results:
        _results[device_type] = _launch(device_type)
    results = _results[device_type]
    if "*" in results:
        pytest.fail(results["*"])
    per_rank = results[name]
    failures = [f"rank {r}: {res}" for r, res in enumerate(per_rank) if res.startswith("fail")]
    if failures:
        pytest.fail("\n".join(failures))
    if all(res.startswith("skip") for res in per_rank):
        pytest.skip(per_rank[0][len("skip: "):])


def _gloo_available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _gloo_available(), reason="this torch has no gloo backend")
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_cpu_gloo(name):
    _result("cpu", name)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < WORLD or not dist.is_available() or not dist.is_nccl_available(),
                    reason=f"needs {WORLD} GPUs and NCCL")
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_cuda_nccl(name):
    _result("cuda", name)


# ---------------------------------------------------------------------------------------------------------
# One process, two GPUs: every op on cuda:1 first (the launch facts of a device are looked up on its first
# use, while the current device is still cuda:0), then on cuda:0, then on cuda:1 again
# ---------------------------------------------------------------------------------------------------------


def per_device_ops() -> None:
    import torch.nn.functional as F

    from fusedkernels import ops
    from fusedkernels.optim import FusedAdamW, FusedLAMB, clip_grad_norm_

    def check(device):
        torch.manual_seed(0)
        x = torch.randn(64, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(256, device=device, dtype=torch.bfloat16, requires_grad=True)
        y = ops.layer_norm(x, (256,), w, None)
        torch.testing.assert_close(y, F.layer_norm(x, (256,), w), atol=2e-2, rtol=2e-2)
        y.sum().backward()
        torch.testing.assert_close(ops.rms_norm(x, (256,), w), F.rms_norm(x, (256,), w), atol=2e-2, rtol=2e-2)
        weight = torch.randn(128, 256, device=device, dtype=torch.bfloat16) / 16
        torch.testing.assert_close(ops.linear_act(x.detach(), weight, None, "relu"), F.relu(x.detach() @ weight.T),
                                   atol=5e-2, rtol=2e-2)
        q, k, v = (torch.randn(2, 4, 128, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
        torch.testing.assert_close(ops.scaled_dot_product_attention(q, k, v, is_causal=True),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-2, rtol=2e-2)
        for make in (lambda ps: FusedAdamW(ps, lr=1e-2), lambda ps: FusedLAMB(ps, lr=1e-2)):
            params = [torch.randn(n, device=device, requires_grad=True) for n in (1000, 17, 70000)]
            expected = [p.detach().cpu().clone().requires_grad_() for p in params]
            for ps in (params, expected):
                for p in ps:
                    p.grad = torch.ones_like(p) * 0.01
                clip_grad_norm_(ps, 0.5)
                make(ps).step()
            for p, e in zip(params, expected):
                torch.testing.assert_close(p.detach().cpu(), e.detach(), atol=1e-5, rtol=1e-5)
        assert torch.cuda.current_device() == 0, "an op left another device current"

    for index in (1, 0, 1):
        check(torch.device("cuda", index))
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ops_on_second_gpu_first():
    """In a fresh process, so that cuda:1 really is the first device the ops see."""
    run = subprocess.run([sys.executable, os.path.abspath(__file__), "--per-device"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


def _main(argv: list[str]) -> int:
    if "--per-device" in argv:
        per_device_ops()
        print("per-device ops: ok")
        return 0
    device_type = "cuda" if "--device" in argv and argv[argv.index("--device") + 1] == "cuda" else "cpu"
    if device_type == "cuda":  # before the first collective: NCCL refuses two ranks on one GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    rank = dist.get_rank()
    out_dir = [tempfile.mkdtemp(prefix="fk_dist_") if rank == 0 else None]
    dist.broadcast_object_list(out_dir)
    results = run_scenarios(rank, device_type, out_dir[0])
    dist.destroy_process_group()
    return 1 if any(r.startswith("fail") for r in results.values()) else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
    sys.exit(_main(sys.argv[1:]))
