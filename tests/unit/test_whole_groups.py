"""whole_group_fraction: how many routings still hold every dense shard (train/compare.py)."""

from __future__ import annotations

import torch

from nemo_upcycle.models import GPTModel
from nemo_upcycle.recipe import UpcycleConfig, upcycle_state_dict
from nemo_upcycle.train.compare import whole_group_fraction
from tests.conftest import random_model, small_config


def _moe(untie: float) -> tuple[GPTModel, list[torch.Tensor]]:
    cfg = small_config(num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, num_query_groups=1)
    recipe = UpcycleConfig.from_shorthand("E4G2T2", router_init="virtual_group", router_init_std=0.3)
    moe_cfg, sd = upcycle_state_dict(random_model(cfg, scale=0.3).state_dict(), cfg, recipe)
    g = torch.Generator().manual_seed(1)
    sd = {k: v + untie * torch.randn(v.shape, generator=g) if ".router." in k else v for k, v in sd.items()}
    moe = GPTModel(moe_cfg)
    moe.load_state_dict(sd)
    tokens = torch.randint(0, cfg.vocab_size, (3, 2, 17), generator=g)
    return moe, list(tokens)


def test_virtual_groups_route_every_token_to_whole_groups():
    moe, batches = _moe(untie=0.0)
    assert whole_group_fraction(moe, batches, granularity=2) == 1.0
    assert whole_group_fraction(moe, batches, granularity=1) is None  # full-size experts: nothing to keep whole


def test_untied_group_rows_are_counted_token_by_token():
    moe, batches = _moe(untie=1.0)
    got = whole_group_fraction(moe, batches, granularity=2)
    whole = total = 0
    for b in batches:  # the same count, one token at a time
        moe(b[:, :-1])
        for layer in moe.decoder.layers:
            for experts in layer.mlp.last_routing.experts.tolist():
                whole += {e % 2 for e in experts} == {0, 1}
                total += 1
    assert 0.0 < got < 1.0
    assert got == whole / total


def test_with_two_groups_per_token_each_shard_must_be_taken_twice():
    """E4G2T4: a token that takes shards 0, 1, 0, 0 (experts 0, 1, 2, 4) holds every shard but no second copy of
    shard 1, so it does not compute the dense function and is not whole; experts 0-3 (two whole groups) are."""
    cfg = small_config(num_layers=1, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, num_query_groups=1,
                       bias=True)
    recipe = UpcycleConfig.from_shorthand("E4G2T4", router_init="virtual_group")
    moe_cfg, sd = upcycle_state_dict(random_model(cfg, scale=0.3).state_dict(), cfg, recipe)
    tokens = list(torch.randint(0, cfg.vocab_size, (1, 2, 9), generator=torch.Generator().manual_seed(1)))
    for bias, whole in (([5, 4, 3, 0, 2, 0, 0, 0], 0.0), ([5, 4, 3, 2, 0, 0, 0, 0], 1.0)):
        sd["decoder.layers.0.mlp.router.weight"].zero_()
        sd["decoder.layers.0.mlp.router.bias"].copy_(torch.tensor(bias, dtype=torch.float32))
        moe = GPTModel(moe_cfg)
        moe.load_state_dict(sd)
        assert whole_group_fraction(moe, tokens, granularity=2) == whole
