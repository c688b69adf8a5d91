"""Comparing models fairly: the same held-out batches for every loss, the same tokens and schedule for every
training run. Used by the demo and benchmarks/replicate_paper.py."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

# Documents 0-98% train, 98-100% validation, as the demo's dense checkpoint was pretrained (examples/pretrain_dense.py):
# held-out losses are on documents no model has seen.
SPLIT = "98,2,0"


def training_overrides(run: Path, name: str, restore: Path, data_prefix: Path, steps: int, batch: int, lr: float,
                       backend: str = "torch", seed: int | None = None) -> list[str]:
    """Hydra overrides for one continued-training run: same data, order and schedule for every model compared.
    `seed` sets the data order and random inits (None: conf/train.yaml's 1234, the pretraining order)."""
    seeds = [] if seed is None else [f"seed={seed}", f"data.seed={seed}"]
    return [f"restore_from={restore}", f"name={name}", *seeds, f"data.data_prefix=[{data_prefix}]",
            f"data.splits_string='{SPLIT}'", f"exp_manager.exp_dir={run}", "exp_manager.resume_if_exists=false",
            f"micro_batch_size={batch}", f"global_batch_size={batch}", f"backend={backend}",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={max(steps, 1)}",
            "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false", f"optim.lr={lr}",
            f"optim.sched.min_lr={lr / 10}", f"optim.sched.warmup_steps={max(1, steps // 10)}"]


def held_out_batches(dense: Path, data_prefix: Path, batches: int, batch: int) -> list[torch.Tensor]:
    """The first validation batches of the corpus (the split training does not see), as token tensors."""
    from nemo_upcycle.checkpoint import load_tokenizer_of, open_checkpoint
    from nemo_upcycle.data.datasets import build_gpt_datasets

    with open_checkpoint(dense) as reader:
        tokenizer, seq = load_tokenizer_of(reader), reader.config.seq_length
    valid = build_gpt_datasets([str(data_prefix)], tokenizer, seq, split=SPLIT,
                               num_samples=(1, batches * batch, 0), seed=4321).valid
    loader = torch.utils.data.DataLoader(valid, batch_size=batch, shuffle=False)
    out = []
    for i, item in enumerate(loader):
        if i == batches:
            break
        out.append(torch.cat([item["tokens"], item["labels"][:, -1:]], dim=1))
    return out


@torch.no_grad()
def mean_loss(model, batches: list[torch.Tensor]) -> float:
    from nemo_upcycle.models.reference import lm_loss

    model = model.float().eval()
    return sum(lm_loss(model(b[:, :-1]).logits, b[:, 1:]).item() for b in batches) / len(batches)


@torch.no_grad()
def whole_group_fraction(model, batches: list[torch.Tensor], granularity: int) -> float | None:
    """Fraction of (token, MoE layer) routings whose T chosen experts hold each of the G shards of the dense MLP
    T/G times (expert k holds shard k mod G; for T not a multiple of G: at least once and T//G times). A
    fine-grained upcycle computes the dense function only while this is 1.0, as virtual groups make it at step 0;
    when training unties a group's router rows, tokens take some shards twice and others not at all
    (benchmarks/replicate_paper.py measures how fast). None for G = 1 (dense models and full-size experts): there
    are no shards to keep together."""
    if granularity == 1:
        return None
    model = model.float().eval()
    whole = total = 0
    for b in batches:
        model(b[:, :-1])
        for layer in model.decoder.layers:
            routing = getattr(layer.mlp, "last_routing", None)
            if routing is None:
                continue
            shards = routing.experts % granularity  # (tokens, T)
            counts = F.one_hot(shards, granularity).sum(dim=1)  # (tokens, G): how often each shard was taken
            whole += int((counts.min(dim=1).values >= max(1, shards.shape[1] // granularity)).sum())
            total += shards.shape[0]
    return whole / total if total else 1.0
