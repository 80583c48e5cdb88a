"""Suite `distributed`: a GPT-2-medium-shaped model (24 layers, hidden 1024, 16 heads, seq 1024, batch 2 per GPU)
trained with FSDP2 (fully_shard per block, bf16 compute, fp32 params and grad reduction) on two GPUs, NCCL. Per
optimizer, in the same run: the median time of a whole training step (forward, backward with its
reduce-scatters, optimizer step) and of the optimizer step alone, over the local shards: ours
(fusedkernels.optim.FusedAdamW, impl `fusedkernels`) against torch.optim.AdamW(fused=True) (impl `torch-fused`), both on
the same DTensor params.

Eager timings with CUDA events (FSDP2's collectives cannot be captured in a graph), the max over the ranks.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
Without two GPUs the suite prints this plan and measures nothing.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile

import torch

from .common import Row

WORLD = 2
LAYERS, HIDDEN, HEADS, SEQ, BATCH, VOCAB = 24, 1024, 16, 1024, 2, 50304
WARMUP, STEPS = 3, 10
CASE = f"gpt2-medium fsdp2 x{WORLD} seq{SEQ} b{BATCH}/gpu"
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class GPT2(torch.nn.Module):
    """Pre-norm transformer blocks (torch's, their LayerNorms switched to FusedLayerNorm), causal."""

    def __init__(self):
        super().__init__()
        from fusedkernels.nn import FusedLayerNorm

        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.pos = torch.nn.Parameter(torch.zeros(SEQ, HIDDEN))
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, 4 * HIDDEN, dropout=0.0, activation="gelu",
                                             batch_first=True, norm_first=True) for _ in range(LAYERS))
        self.norm = FusedLayerNorm(HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        for m in self.modules():
            if type(m) is torch.nn.LayerNorm:
                m.__class__ = FusedLayerNorm
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x, src_mask=self.mask, is_causal=True)
        return self.head(self.norm(x))


def _sharded_model(mesh):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = GPT2().cuda()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _time(model, opt, tokens) -> tuple[float, float]:
    """Median ms of a training step and of its optimizer step."""
    step_ms, opt_ms = [], []
    for i in range(WARMUP + STEPS):
        start, before_opt, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()).backward()
        before_opt.record()
        opt.step()
        opt.zero_grad()
        end.record()
        torch.cuda.synchronize()
        if i >= WARMUP:
            step_ms.append(start.elapsed_time(end))
            opt_ms.append(before_opt.elapsed_time(end))
    return statistics.median(step_ms), statistics.median(opt_ms)


def _worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from fusedkernels.optim import FusedAdamW

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=WORLD)
    mesh = init_device_mesh("cuda", (WORLD,))
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda", generator=torch.Generator("cuda").manual_seed(rank))
    optimizers = {
        "fusedkernels": lambda ps: FusedAdamW(ps, lr=1e-4, weight_decay=0.1),
        "torch-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, fused=True),
    }
    results = {}
    for impl, make in optimizers.items():
        model = _sharded_model(mesh)
        times = torch.tensor(_time(model, make(model.parameters()), tokens), device="cuda")
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        results[impl] = times.tolist()
        del model
        torch.cuda.empty_cache()
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def run() -> list[Row]:
    if torch.cuda.device_count() < WORLD:
        print(f"  skipped: needs {WORLD} GPUs, {torch.cuda.device_count()} visible. Plan: {CASE}, FSDP2 with NCCL; "
              "step and optimizer-step times, FusedAdamW against torch.optim.AdamW(fused=True)", flush=True)
        return []
    import torch.multiprocessing as mp

    for name, value in MULTICAST_OFF.items():
        os.environ.setdefault(name, value)
    out_dir = tempfile.mkdtemp(prefix="fk_bench_dist_")
    mp.start_processes(_worker, args=(out_dir,), nprocs=WORLD, start_method="spawn")
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    rows = []
    for impl, (step_ms, opt_ms) in results.items():
        rows.append(Row("distributed", f"{CASE} train step", impl, round(step_ms, 3)))
        rows.append(Row("distributed", f"{CASE} optimizer step", impl, round(opt_ms, 3)))
        print(f"  {impl:<26} step {step_ms:8.2f} ms   optimizer step {opt_ms:7.3f} ms", flush=True)
    return rows
