"""The main job: a small dense Nemotron upcycled to E8G1T2 and E8G8T8, with step-0 equivalence checked on
real text (CPython's standard library source, byte-level tokens)."""

from __future__ import annotations

import argparse
import time

import torch

from nemo_upcycle.data.corpus import stdlib_text
from nemo_upcycle.data.tokenizers import ByteTokenizer
from nemo_upcycle.models import GPTConfig, GPTModel, lm_loss
from nemo_upcycle.recipe import UpcycleConfig, upcycle_state_dict
from nemo_upcycle.report import human_count, markdown_table

DEMO_RECIPES = ("E8G1T2", "E8G8T8")


def demo_dense_config(vocab_size: int) -> GPTConfig:
    """Nemotron-4's shape in miniature: squared ReLU, layernorm1p, RoPE on half the head, GQA, no biases."""
    return GPTConfig(num_layers=4, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8,
                     num_query_groups=2, vocab_size=vocab_size, seq_length=256, rotary_percentage=0.5)


def text_batch(tokenizer: ByteTokenizer, batch: int, seq: int, offset: int = 0) -> torch.Tensor:
    ids = tokenizer.encode(stdlib_text(batch * (seq + 1) * 2, offset))[: batch * (seq + 1)]
    return torch.tensor(ids).view(batch, seq + 1)


def step0_rows(dense: GPTModel, recipes: list[UpcycleConfig], tokens: torch.Tensor) -> list[list]:
    """One table row per recipe: sizes, step-0 loss of dense and MoE, and the largest logit difference."""
    cfg = dense.config
    with torch.no_grad():
        dense_logits = dense(tokens[:, :-1]).logits
        dense_loss = lm_loss(dense_logits, tokens[:, 1:]).item()
    rows = [["dense", 1, human_count(cfg.num_parameters()), human_count(cfg.num_parameters(active=True)),
             dense_loss, dense_loss, 0.0]]
    for recipe in recipes:
        moe_cfg, sd = upcycle_state_dict(dense.state_dict(), cfg, recipe)
        moe = GPTModel(moe_cfg).eval()
        moe.load_state_dict(sd)
        with torch.no_grad():
            logits = moe(tokens[:, :-1]).logits
        rows.append([
            f"{recipe.name} {recipe.router}", recipe.num_experts, human_count(moe_cfg.num_parameters()),
            human_count(moe_cfg.num_parameters(active=True)), dense_loss,
            lm_loss(logits, tokens[:, 1:]).item(), (logits - dense_logits).abs().max().item(),
        ])
    return rows


STEP0_HEADERS = ["model", "experts", "params", "active params", "step-0 loss dense", "step-0 loss MoE",
                 "max |logit diff|"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed for the dense model's initialisation")
    parser.add_argument("--routers", nargs="+", default=["softmax_then_topk", "topk_then_softmax"],
                        choices=["softmax_then_topk", "topk_then_softmax", "sigmoid"],
                        help="router types to upcycle with (default: the paper's softmax_then_topk, which is "
                             "approximate at step 0 for a random router, and topk_then_softmax, which is exact)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    tok = ByteTokenizer()
    dense = GPTModel(demo_dense_config(tok.vocab_size)).eval()
    tokens = text_batch(tok, batch=8, seq=dense.config.seq_length)
    recipes = [UpcycleConfig.from_shorthand(r, router=router) for router in args.routers for r in DEMO_RECIPES]
    print(f"Dense Nemotron-style GPT, {human_count(dense.config.num_parameters())} parameters (untrained), "
          f"{tokens.numel()} tokens of CPython stdlib source\n")
    print(markdown_table(STEP0_HEADERS, step0_rows(dense, recipes, tokens)))
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0
