"""Megatron-core's training engine (nemo_upcycle.train.parallel.MegatronEngine: Megatron DDP, its optimizer,
finalize_model_grads, its pipeline schedules) on several parallel layouts in one launch, each compared with a
one-process run of the same steps. On CPU (gloo) or GPUs (NCCL):

    python scripts/parallel_train_check.py WORKDIR --reference              # one process: start + reference
    torchrun --nproc-per-node 2 scripts/parallel_train_check.py WORKDIR tp2 pp2 ep2 dp2+do pp2>tp2
    torchrun --nproc-per-node 4 scripts/parallel_train_check.py WORKDIR tp2pp2 tp2pp2+do

A layout is tpN ppN vppN epN etpN dpN (the data-parallel size is what the process count leaves; dpN only
names it) with +do (distributed optimizer), +og (overlapped, bucketed grad reduce), +opg (overlapped param
all-gather). `A>B`: one step at layout A, a sharded model + optimizer checkpoint, then the rest at layout B
(same optimizer kind: distributed or not). vppN: N virtual pipeline stages
per process (Megatron's interleaved 1F1B schedule).
`ep2+flat` reduces expert gradients over the data-parallel group (the old hand-written reduction's mistake), a
negative control that must NOT match. Every rank prints `layout NAME: max abs diff D moved M` on rank 0.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

CFG = dict(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
           vocab_size=128, seq_length=16, rotary_percentage=0.5, activation="squared-relu",
           normalization="layernorm1p", num_moe_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2,
           moe_aux_loss_coeff=0.01)
OPTIM = dict(name="adamw", lr=0.01, eps=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
GLOBAL_BATCH, MICRO_BATCH, CLIP = 8, 1, 1.0


def parse_layout(name: str) -> dict:
    sizes = dict(re.findall(r"(vpp|etp|tp|pp|ep|dp)(\d+)", name.split("+")[0]))
    flags = set(name.split("+")[1:])
    return dict(tensor_model_parallel_size=int(sizes.get("tp", 1)), pipeline_model_parallel_size=int(sizes.get("pp", 1)),
                virtual_pipeline_model_parallel_size=int(sizes["vpp"]) if "vpp" in sizes else None,
                expert_model_parallel_size=int(sizes.get("ep", 1)),
                expert_tensor_parallel_size=int(sizes["etp"]) if "etp" in sizes else None,
                use_distributed_optimizer="do" in flags, overlap_grad_reduce="og" in flags,
                overlap_param_gather="opg" in flags), "flat" in flags


def set_layout(layout) -> None:
    from megatron.core import parallel_state

    from nemo_upcycle.compat import init_megatron

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_megatron(layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
                  layout.expert_model_parallel_size, layout.expert_tensor_parallel_size,
                  layout.virtual_pipeline_model_parallel_size)


def batches(steps: int, vocab: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's share of each global batch, in Megatron's sample order."""
    from nemo_upcycle.train.parallel import data_parallel_rank, data_parallel_size

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        data = torch.randint(0, vocab, (GLOBAL_BATCH, seq + 1), generator=g)[data_parallel_rank()::data_parallel_size()]
        out.append({"tokens": data[:, :-1].contiguous(), "labels": data[:, 1:].contiguous()})
    return out


def build_engine(workdir: Path, layout, flat: bool):
    from megatron.core import parallel_state

    from nemo_upcycle.models.backends import MegatronBackend
    from nemo_upcycle.models.config import GPTConfig
    from nemo_upcycle.train.parallel import MegatronEngine

    backend = MegatronBackend(GPTConfig(**CFG), use_te=False)
    backend.load_sharded(workdir / "start", "model.")
    if flat:  # Megatron DDP then reduces expert gradients over every data-parallel rank, as the old code did
        real = parallel_state.get_expert_data_parallel_group
        parallel_state.get_expert_data_parallel_group = lambda *a, **k: parallel_state.get_data_parallel_group()
    try:
        engine = MegatronEngine(backend, layout, clip_grad=CLIP)
    finally:
        if flat:
            parallel_state.get_expert_data_parallel_group = real
    engine.build_optimizer(dict(OPTIM))
    return engine


def train(engine, steps: list[dict[str, torch.Tensor]]) -> None:
    for batch in steps:
        engine.run(batch, MICRO_BATCH, forward_only=False)
        engine.optimizer.step()
    engine.sync_params()


def save_state(engine, path: Path) -> None:
    """Model + optimizer, Megatron's sharded checkpoint (what MegatronParallelStrategy writes)."""
    from megatron.core import dist_checkpointing

    from nemo_upcycle.compat import megatron_engine_on_cpu

    fresh_dir(path)
    with megatron_engine_on_cpu():
        dist_checkpointing.save(engine.sharded_state_dict(), str(path))


def load_state(engine, path: Path) -> None:
    from megatron.core import dist_checkpointing

    from nemo_upcycle.compat import megatron_engine_on_cpu
    from nemo_upcycle.models.megatron import load_chunk_states

    engine.check_resumes_from(path)
    with megatron_engine_on_cpu():
        loaded = dist_checkpointing.load(engine.sharded_state_dict(loading=True), str(path))
        load_chunk_states([c.module for c in engine.chunks], loaded["model"], "model.", path)
    engine.load_optimizer_state(loaded["optimizer"])


def fresh_dir(path: Path) -> None:
    import shutil

    import torch.distributed as dist

    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()


def full_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint, whole (plain torch.distributed.checkpoint, this process only)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
           if isinstance(m, TensorStorageMetadata)}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def run_layout(workdir: Path, name: str, steps: int) -> None:
    import torch.distributed as dist

    from nemo_upcycle.train.parallel import ParallelLayout

    stages = name.split(">")
    layout, flat = parse_layout(stages[0])
    layout = ParallelLayout(**layout)
    set_layout(layout)
    engine = build_engine(workdir, layout, flat)
    data = batches(steps, CFG["vocab_size"], CFG["seq_length"])
    if len(stages) == 2:  # one step, a sharded checkpoint, the rest at another layout
        train(engine, data[:1])
        save_state(engine, workdir / "resume")
        layout = ParallelLayout(**parse_layout(stages[1])[0])
        set_layout(layout)
        engine = build_engine(workdir, layout, False)
        load_state(engine, workdir / "resume")
        train(engine, batches(steps, CFG["vocab_size"], CFG["seq_length"])[1:])
    else:
        train(engine, data)
    out = workdir / re.sub(r"[^a-z0-9]+", "_", name)
    fresh_dir(out)
    engine.backend.save_sharded(out, "model.")
    dist.barrier()
    if dist.get_rank() == 0:
        ref, got, start = full_tensors(workdir / "reference"), full_tensors(out), full_tensors(workdir / "start")
        assert ref.keys() == got.keys(), sorted(set(ref) ^ set(got))[:4]
        diff = max((ref[k] - got[k]).abs().max().item() for k in ref)
        moved = max((ref[k] - start[k]).abs().max().item() for k in ref)
        sys.stdout.write(f"layout {name}: max abs diff {diff:.3e} moved {moved:.3e}\n")
        sys.stdout.flush()


def write_reference(workdir: Path, steps: int) -> None:
    """One process: the starting weights (a seeded reference model, as torch_dist) and the trained result."""
    import torch.distributed as dist

    from nemo_upcycle.checkpoint.megatron import write_megatron_dist
    from nemo_upcycle.checkpoint.memory import InMemoryCheckpoint
    from nemo_upcycle.models.config import GPTConfig
    from nemo_upcycle.models.keys import stack_experts
    from nemo_upcycle.models.reference import GPTModel
    from nemo_upcycle.train.parallel import ParallelLayout

    cfg = GPTConfig(**CFG)
    torch.manual_seed(0)
    start = InMemoryCheckpoint(cfg, stack_experts(GPTModel(cfg).state_dict()))
    fresh_dir(workdir / "start")
    write_megatron_dist(workdir / "start", cfg, start.tensors(), lambda n: start.read([n])[n], "model.")
    layout = ParallelLayout()
    set_layout(layout)
    engine = build_engine(workdir, layout, False)
    train(engine, batches(steps, cfg.vocab_size, cfg.seq_length))
    fresh_dir(workdir / "reference")
    engine.backend.save_sharded(workdir / "reference", "model.")
    dist.barrier()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=Path, help="folder for the starting weights, the reference and each result")
    p.add_argument("layouts", nargs="*", help="layouts to train and compare, e.g. tp2 pp2 ep2+do dp2>tp2")
    p.add_argument("--reference", action="store_true", help="one process: write the start and the reference")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    args = p.parse_args()
    import torch.distributed as dist

    from nemo_upcycle.compat import init_megatron

    init_megatron()
    if args.reference:
        write_reference(args.workdir, args.steps)
    for name in args.layouts:
        run_layout(args.workdir, name, args.steps)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
