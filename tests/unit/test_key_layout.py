"""The key-layout maths on its own, against hand-written expectations, so a wrong key or row order fails here
and not only far away as a logit mismatch: torch_dist keys (stacked and per layer, TE's fused norms), the merge
of tensor-parallel shards of a gated fc1, and the Hugging Face key tables per family (q/k/v row order)."""

from __future__ import annotations

import pytest
import torch

from nemo_upcycle.checkpoint.hf_keys import layer_table, merge_qkv, split_qkv
from nemo_upcycle.checkpoint.layout import DistKey, canonical_names, dist_key, dist_fetch_order
from nemo_upcycle.checkpoint.nemo import _merge_tp
from tests.conftest import small_config

MOE = small_config(num_layers=2, activation="swiglu", normalization="rmsnorm", num_moe_experts=4,
                   moe_ffn_hidden_size=32, moe_router_topk=2)


@pytest.mark.parametrize("name, fqn", [
    ("decoder.layers.1.input_layernorm.weight", "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight"),
    ("decoder.layers.1.self_attention.linear_qkv.weight", "model.decoder.layers.self_attention.linear_qkv.weight"),
    ("decoder.layers.1.pre_mlp_layernorm.weight", "model.decoder.layers.pre_mlp_layernorm.weight"),  # MoE: unfused
    ("decoder.layers.1.mlp.router.weight", "model.decoder.layers.mlp.router.weight"),
    ("decoder.layers.1.mlp.experts.linear_fc1.weight", "model.decoder.layers.mlp.experts.experts.linear_fc1.weight"),
])
def test_homogeneous_layers_are_stacked_under_one_key_at_their_layer_index(name, fqn):
    assert dist_key(name, MOE, "model.") == DistKey(fqn, (1,))
    assert (name, (1,)) in canonical_names(fqn, (2,), "model.")  # and back


def test_mixed_layers_are_keyed_per_layer_with_the_dense_norm_fused_into_fc1():
    mixed = MOE.replace(moe_layer_freq=2)  # layer 0 MoE, layer 1 dense
    assert dist_key("decoder.layers.1.pre_mlp_layernorm.weight", mixed, "") == \
        DistKey("decoder.layers.1.mlp.linear_fc1.layer_norm_weight", ())
    assert dist_key("decoder.layers.0.pre_mlp_layernorm.weight", mixed, "") == \
        DistKey("decoder.layers.0.pre_mlp_layernorm.weight", ())
    assert dist_key("decoder.final_layernorm.weight", mixed, "model.") == DistKey("model.decoder.final_layernorm.weight", ())
    assert canonical_names("decoder.layers.1.mlp.linear_fc1.layer_norm_weight", (32,), "") == \
        [("decoder.layers.1.pre_mlp_layernorm.weight", ())]


def test_dist_fetch_order_is_globals_first_then_each_layer_whole():
    names = ["embedding.word_embeddings.weight", "decoder.layers.0.a", "decoder.layers.0.b", "decoder.layers.1.a",
             "decoder.final_layernorm.weight", "output_layer.weight"]
    assert dist_fetch_order(dict.fromkeys(names)) == [names[0], names[4], names[5], *names[1:4]]


def test_tp_merge_of_a_gated_fc1_regroups_gates_then_ups():
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    shards = [torch.cat([gate[:2], up[:2]]), torch.cat([gate[2:], up[2:]])]  # each rank holds [gate_t; up_t]
    assert torch.equal(_merge_tp("decoder.layers.0.mlp.linear_fc1.weight", shards, gated=True), torch.cat([gate, up]))
    assert torch.equal(_merge_tp("decoder.layers.0.mlp.linear_fc1.weight", shards, gated=False), torch.cat(shards))
    row = [torch.ones(2, 3), torch.zeros(2, 3)]
    assert _merge_tp("decoder.layers.0.mlp.linear_fc2.weight", row, gated=True).shape == (2, 6)
    assert torch.equal(_merge_tp("decoder.layers.0.input_layernorm.weight", row, gated=True), row[0])  # replicated


def test_qkv_rows_are_grouped_per_query_group():
    cfg = small_config(num_attention_heads=4, num_query_groups=2, hidden_size=8, rotary_percentage=1.0)  # d = 2
    q, k, v = torch.arange(8.0)[:, None], 10 + torch.arange(4.0)[:, None], 20 + torch.arange(4.0)[:, None]
    qkv = merge_qkv(q, k, v, cfg)
    # per query group: its 2 query heads, then its k head, then its v head
    assert qkv.flatten().tolist() == [0, 1, 2, 3, 10, 11, 20, 21, 4, 5, 6, 7, 12, 13, 22, 23]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(qkv, cfg), (q, k, v)))


@pytest.mark.parametrize("family, fc1, fc2", [
    ("nemotron", ("mlp.up_proj.weight",), ("mlp.down_proj.weight",)),
    ("llama", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), ("mlp.down_proj.weight",)),
    ("qwen3", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), ("mlp.down_proj.weight",)),
])
def test_dense_tables_put_gate_before_up(family, fc1, fc2):
    table = layer_table(family, small_config(), 0)
    assert table["mlp.linear_fc1.weight"] == fc1 and table["mlp.linear_fc2.weight"] == fc2
    assert table["self_attention.linear_qkv.weight"] == ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                          "self_attn.v_proj.weight")
    assert table["input_layernorm.weight"] == ("input_layernorm.weight",)
    assert table["pre_mlp_layernorm.weight"] == ("post_attention_layernorm.weight",)


@pytest.mark.parametrize("family, fc1, router", [
    ("mixtral", ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight"),
     "block_sparse_moe.gate.weight"),
    ("qwen2_moe", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), "mlp.gate.weight"),
    ("qwen3_moe", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), "mlp.gate.weight"),
])
def test_moe_tables_write_one_tensor_per_expert(family, fc1, router):
    table = layer_table(family, MOE, 0)  # no `has`: the layout written
    assert table["mlp.experts.linear_fc1.weight"] == fc1 and table["mlp.router.weight"] == (router,)
    assert not any(k.startswith("mlp.shared_experts.") for k in table)  # the model has none
    shared = layer_table(family, MOE.replace(moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True), 0)
    if family == "qwen2_moe":  # the one family with a (gated) shared expert
        assert shared["mlp.shared_experts.linear_fc1.weight"] == ("mlp.shared_expert.gate_proj.weight",
                                                                  "mlp.shared_expert.up_proj.weight")
        assert shared["mlp.shared_experts.gate_weight"] == ("mlp.shared_expert_gate.weight",)
    else:
        assert not any(k.startswith("mlp.shared_experts.") for k in shared)
