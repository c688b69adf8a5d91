"""The reference GPT against two independent implementations: Hugging Face NemotronForCausalLM (dense) and
Megatron-core's GPTModel with the local spec (dense and MoE, every router type), plus the MoE layer's
mechanics (permutation, losses, counts) against straightforward re-implementations."""

from __future__ import annotations

import pytest
import torch

from nemo_upcycle.models import GPTModel
from nemo_upcycle.checkpoint.hf_keys import gpt_config_from_nemotron_hf, nemotron_hf_config, state_dict_from_hf, state_dict_to_hf
from nemo_upcycle.models.keys import local_to_te, stack_experts, te_to_local, unstack_experts
from nemo_upcycle.models.reference import MoELayer, Router, lm_loss
from nemo_upcycle.recipe import UpcycleConfig, upcycle_state_dict
from tests.conftest import assert_megatron_matches, random_model, small_config

TOKENS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(num_query_groups=4, rotary_percentage=1.0),
    dict(num_query_groups=1, bias=True, rotary_base=500.0),
])
def test_dense_equals_hugging_face_nemotron(overrides):
    from transformers import NemotronConfig, NemotronForCausalLM

    cfg = small_config(**overrides)
    ours = random_model(cfg)
    hf_cfg = {k: v for k, v in nemotron_hf_config(cfg).items() if k not in ("architectures", "model_type")}
    theirs = NemotronForCausalLM(NemotronConfig(**hf_cfg)).eval()
    theirs.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg), strict=True)
    with torch.no_grad():
        diff = (theirs(TOKENS).logits - ours(TOKENS).logits).abs().max().item()
    assert diff < 1e-4
    back = state_dict_from_hf(theirs.state_dict(), cfg)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    parsed = gpt_config_from_nemotron_hf(theirs.config.to_dict())
    assert parsed.replace(kv_channels=None) == cfg


def test_nemotron_rope_scaling_is_read_as_transformers_applies_it():
    from transformers import NemotronConfig, NemotronForCausalLM

    cfg = small_config(seq_length=64)
    hf_cfg = {k: v for k, v in nemotron_hf_config(cfg).items() if k not in ("architectures", "model_type")}
    theirs = NemotronForCausalLM(NemotronConfig(**hf_cfg, rope_scaling={"rope_type": "linear", "factor": 4.0})).eval()
    parsed = gpt_config_from_nemotron_hf(theirs.config.to_dict())
    assert (parsed.rope_scaling_type, parsed.rope_scaling_factor, parsed.rotary_percentage) == ("linear", 4.0, 0.5)
    ours = random_model(parsed)
    theirs.load_state_dict(state_dict_to_hf(ours.state_dict(), parsed), strict=True)
    with torch.no_grad():
        scaled, plain = theirs(TOKENS).logits, random_model(cfg)(TOKENS).logits
        assert (scaled - ours(TOKENS).logits).abs().max().item() < 1e-4
        assert (scaled - plain).abs().max().item() > 1e-3  # the scaling is not a no-op on these positions


@pytest.mark.parametrize("overrides", [
    dict(),  # Nemotron: layernorm1p, squared ReLU, RoPE 0.5, GQA
    dict(normalization="rmsnorm", activation="swiglu", rotary_percentage=1.0),
    dict(normalization="layernorm", activation="gelu", bias=True),
    dict(normalization="rmsnorm", activation="silu", qkv_bias=True, qk_layernorm=True),
])
def test_dense_equals_megatron_core(megatron, overrides):
    cfg = small_config(**overrides)
    assert_megatron_matches(cfg, random_model(cfg).state_dict(), TOKENS)  # keys (shapes by loading) and logits


@pytest.mark.parametrize("router", ["softmax_then_topk", "topk_then_softmax", "sigmoid"])
@pytest.mark.parametrize("overrides, shorthand, layers", [
    (dict(), "E4G2T2", None),
    (dict(normalization="rmsnorm", activation="swiglu", bias=True), "E2G2T2", (1,)),
    (dict(num_layers=3), "E8G1T2", (0, 2)),
])
def test_moe_equals_megatron_core(megatron, router, overrides, shorthand, layers):
    cfg = small_config(**overrides)
    recipe = UpcycleConfig.from_shorthand(shorthand, router=router, layers=layers, router_init="virtual_group",
                                          router_init_std=0.5)
    moe_cfg, sd = upcycle_state_dict(random_model(cfg).state_dict(), cfg, recipe)
    # perturb the experts so routing decisions matter
    sd = {k: v + 0.01 * torch.randn_like(v) if ".experts." in k else v for k, v in sd.items()}
    assert_megatron_matches(moe_cfg, sd, TOKENS)


def test_layernorm1p_stores_gamma_minus_one():
    cfg = small_config()
    model = random_model(cfg)
    norm = model.decoder.final_layernorm
    x = torch.randn(3, cfg.hidden_size)
    want = torch.nn.functional.layer_norm(x, (cfg.hidden_size,), norm.weight + 1, norm.bias, cfg.layernorm_epsilon)
    torch.testing.assert_close(norm(x), want)
    assert GPTModel(cfg).decoder.final_layernorm.weight.abs().max() == 0  # neutral init is gamma - 1 = 0


def test_te_key_map_round_trip():
    cfg = small_config(num_layers=2)
    recipe = UpcycleConfig.from_shorthand("E2G1T1", layers=(1,))
    moe_cfg, sd = upcycle_state_dict(random_model(cfg).state_dict(), cfg, recipe)
    te = local_to_te(sd, moe_cfg.moe_layer_pattern())
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_bias" in te  # dense layer: fused into fc1
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in te  # MoE layer keeps a separate norm
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    te["decoder.layers.0.mlp.linear_fc1._extra_state"] = None
    assert te_to_local(te).keys() == sd.keys()
    stacked = stack_experts(sd)
    assert stacked["decoder.layers.1.mlp.experts.linear_fc1.weight"].shape == (2, 64, 32)
    assert unstack_experts(stacked).keys() == sd.keys()


def _moe_layer(router="softmax_then_topk", topk=2, experts=4, aux=0.01, z=0.001):
    cfg = small_config(num_layers=1, num_moe_experts=experts, moe_ffn_hidden_size=16, moe_router_topk=topk,
                       moe_router_pre_softmax=router == "softmax_then_topk",
                       moe_router_score_function="sigmoid" if router == "sigmoid" else "softmax",
                       moe_aux_loss_coeff=aux, moe_z_loss_coeff=z)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    return layer


@pytest.mark.parametrize("router", ["softmax_then_topk", "topk_then_softmax", "sigmoid"])
def test_moe_layer_equals_a_per_token_loop(router):
    layer = _moe_layer(router)
    x = torch.randn(2, 7, 32)
    out = layer(x)
    r = layer.last_routing
    flat = x.reshape(-1, 32)
    want = torch.stack([
        sum(r.weights[t, j] * layer.experts.local_experts[int(r.experts[t, j])](flat[t]) for j in range(2))
        for t in range(flat.shape[0])
    ]).reshape(x.shape)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # fp32, two summation orders
    assert r.tokens_per_expert.sum() == 14 * 2
    torch.testing.assert_close(r.tokens_per_expert, torch.bincount(r.experts.flatten(), minlength=4))


@pytest.mark.parametrize("router", ["softmax_then_topk", "topk_then_softmax", "sigmoid"])
def test_router_matches_megatron_routing_and_losses(megatron, router):
    from megatron.core.transformer.moe.moe_utils import (
        compute_routing_scores_for_aux_loss, switch_load_balancing_loss_func, topk_routing_with_score_function,
        z_loss_func)

    layer = _moe_layer(router)
    x = torch.randn(50, 32)
    r = layer.router(x)
    logits = x @ layer.router.weight.T
    score_fn = "sigmoid" if router == "sigmoid" else "softmax"
    probs, routing_map = topk_routing_with_score_function(
        logits, 2, use_pre_softmax=router == "softmax_then_topk", score_function=score_fn)
    ours = torch.zeros_like(probs).scatter(1, r.experts, r.weights)
    torch.testing.assert_close(ours, probs)
    _, scores = compute_routing_scores_for_aux_loss(logits, 2, score_fn)
    aux = switch_load_balancing_loss_func(scores, routing_map.sum(0), 50, 2, 4, 0.01)
    torch.testing.assert_close(r.aux_loss, aux)
    torch.testing.assert_close(r.z_loss, z_loss_func(logits, 0.001))


def test_bf16_router_picks_the_experts_megatron_picks_in_fp32(megatron):
    """moe_router_dtype="fp32" casts the input and the router weight before the projection: logits projected in
    bf16 and cast afterwards pick another expert set for about 2% of these tokens."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    cfg = small_config(num_layers=1, hidden_size=1024, num_attention_heads=8, num_moe_experts=64,
                       moe_ffn_hidden_size=16, moe_router_topk=8, moe_router_pre_softmax=True)
    torch.manual_seed(0)
    router = Router(cfg).to(torch.bfloat16)
    torch.nn.init.normal_(router.weight, 0, 0.02)
    x = torch.randn(4096, 1024).to(torch.bfloat16)
    ours = router(x)
    probs, routing_map = topk_routing_with_score_function(x.float() @ router.weight.float().T, 8,
                                                          use_pre_softmax=True)
    assert torch.equal(torch.zeros_like(routing_map).scatter(1, ours.experts, True), routing_map)
    torch.testing.assert_close(ours.weights.float(), probs.gather(1, ours.experts).to(torch.bfloat16).float())


def test_aux_loss_gradient_pushes_towards_balance():
    layer = _moe_layer("softmax_then_topk", aux=1.0, z=None)
    with torch.no_grad():
        layer.router.weight[0] += 3.0 * torch.ones(32) / 32 ** 0.5  # expert 0 favoured
    x = torch.randn(400, 32) + 1.0 / 32 ** 0.5 * 3
    r = layer.router(x)
    r.aux_loss.backward()
    # descending the aux loss lowers expert 0's logit for these tokens
    grad_logit0 = (x @ layer.router.weight.grad[0]).mean()
    assert grad_logit0 > 0


def test_top_k_breaks_ties_towards_whole_virtual_groups():
    layer = _moe_layer("softmax_then_topk", topk=4, experts=8)
    with torch.no_grad():
        layer.router.weight.zero_()
    r = layer.router(torch.randn(10, 32))
    assert torch.equal(r.experts.sort(dim=1).values, torch.arange(4).expand(10, 4))


def test_lm_loss_masks_and_gradients_reach_every_parameter():
    cfg = small_config()
    recipe = UpcycleConfig.from_shorthand("E2G2T2")
    moe_cfg, sd = upcycle_state_dict(random_model(cfg).state_dict(), cfg, recipe)
    model = GPTModel(moe_cfg)
    model.load_state_dict(sd)
    out = model(TOKENS[:, :-1])
    labels = TOKENS[:, 1:]
    mask = torch.ones_like(labels)
    mask[:, :5] = 0
    loss = lm_loss(out.logits, labels, mask)
    per_token = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(loss, per_token.view_as(labels)[:, 5:].mean())
    (loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert len(out.tokens_per_expert) == 2 and int(out.tokens_per_expert[0].sum()) == TOKENS[:, :-1].numel() * 2


@pytest.mark.parametrize("activation, bias", [("squared-relu", False), ("swiglu", True)])
def test_grouped_gemm_experts_equal_the_per_expert_path(activation, bias):
    """The grouped-GEMM path (automatic on Hopper GPUs in bf16) gives the per-expert path's outputs and
    gradients; forced on here, on CPU in float32."""
    cfg = small_config(num_layers=1, activation=activation, bias=bias, num_moe_experts=8, moe_ffn_hidden_size=16,
                       moe_router_topk=2)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(40, 32, requires_grad=True)
    results = []
    for grouped in (False, True):
        layer.experts.grouped_mm = grouped
        layer.zero_grad()
        x.grad = None
        out = layer(x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in layer.parameters()]))
    (a, ga, pa), (b, gb, pb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
