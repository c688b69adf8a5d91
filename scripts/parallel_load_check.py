"""Load a converted torch_dist checkpoint into Megatron-core models split across processes (tensor or expert
parallel) and compare their logits with the reference model's. Run under torchrun, on CPU (gloo) or GPUs (NCCL):

    torchrun --nproc-per-node 2 scripts/parallel_load_check.py CKPT_DIR --tp 2
    torchrun --nproc-per-node 2 scripts/parallel_load_check.py CKPT_DIR --ep 2

CKPT_DIR: a `.nemo` directory's model_weights/ (prefix model.) or a Megatron iter_XXXXXXX/ (--prefix '').
Exit status 0 when the logits match within the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="the .nemo directory (or Megatron iteration directory)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed")
    args = p.parse_args()

    import torch.distributed as dist

    from nemo_upcycle.checkpoint import open_checkpoint
    from nemo_upcycle.compat import init_megatron
    from nemo_upcycle.models.keys import unstack_experts
    from nemo_upcycle.models.megatron import build_megatron_gpt, load_dist_checkpoint, megatron_forward
    from nemo_upcycle.models.reference import GPTModel

    init_megatron(tensor_parallel=args.tp, expert_parallel=args.ep)
    with open_checkpoint(args.checkpoint) as reader:
        cfg, state = reader.config, unstack_experts(reader.state_dict())
        weights_dir = getattr(reader, "path")
        weights_dir = weights_dir / "model_weights" if (weights_dir / "model_weights").is_dir() else weights_dir
        prefix = "model." if (weights_dir.parent / "model_config.yaml").is_file() and \
            weights_dir.name == "model_weights" else ""
    model = build_megatron_gpt(cfg, use_te=False, tensor_model_parallel_size=args.tp,
                               expert_model_parallel_size=args.ep, sequence_parallel=False).eval()
    load_dist_checkpoint(model, weights_dir, prefix)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = megatron_forward(model, tokens)
    if args.tp > 1:  # the output layer is vocabulary-parallel: gather the vocab shards
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(logits) for _ in range(args.tp)]
        dist.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    reference = GPTModel(cfg).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        diff = (logits - reference(tokens).logits).abs().max().item()
    rank = dist.get_rank()
    # One write per line: both ranks share the launcher's stdout, and print() writes the newline separately.
    sys.stdout.write(f"rank {rank}: TP={args.tp} EP={args.ep} max abs logit diff vs reference {diff:.3e}\n")
    sys.stdout.flush()
    ok = torch.tensor([diff <= args.tolerance], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    dist.destroy_process_group()
    return 0 if ok.item() else 1


if __name__ == "__main__":
    sys.exit(main())
