"""The reference model against transformers for Llama, Mistral, Qwen2 and Qwen3 (RoPE scalings, qk-norm, q/k/v
bias, tied embeddings), read through HFReader; and against Megatron-core for what Megatron trains: shared
experts (gated or not) and its two RoPE scalings."""

from __future__ import annotations

import pytest
import torch

from nemo_upcycle.checkpoint import open_checkpoint
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models import GPTModel
from nemo_upcycle.checkpoint.hf_keys import gpt_config_from_hf, state_dict_to_hf
from nemo_upcycle.models.keys import unstack_experts
from nemo_upcycle.models.reference import rope_inv_freq
from nemo_upcycle.recipe import UpcycleConfig, upcycle_state_dict
from tests.conftest import assert_megatron_matches, random_model, small_config
from tests.hf_fixtures import FAMILY_DEFAULTS, SMALL, TOKENS, logits, save_dense

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 16}
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 1000.0},
    "linear": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 1000.0, "factor": 2.0},
    "llama3": LLAMA3,
    "yarn": YARN,
    "yarn-mscale": {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16.0},
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_frequencies_equal_transformers_init_functions(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaConfig(**{**SMALL, "hidden_size": 128, "max_position_embeddings": 64}, rope_parameters=ROPES[name])
    cfg = gpt_config_from_hf(hf.to_dict())
    for seq_len in (40, 200):  # dynamic NTK changes its base beyond max_position_embeddings (64)
        ours, scale = rope_inv_freq(cfg, seq_len)
        kind = ROPES[name]["rope_type"]
        if kind == "default":
            theirs, their_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
        else:
            theirs, their_scale = ROPE_INIT_FUNCTIONS[kind](hf, None, seq_len=seq_len)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert scale == pytest.approx(their_scale, rel=1e-12)


@pytest.mark.parametrize("family, overrides", [
    ("llama", dict(rope_parameters=LLAMA3)),
    ("llama", dict(tie_word_embeddings=True, rope_parameters=ROPES["linear"])),
    ("llama", dict(rope_parameters=ROPES["dynamic"], attention_bias=True, mlp_bias=True)),
    ("mistral", dict(head_dim=16)),  # head_dim != hidden / heads, as Mistral-Nemo
    ("qwen2", dict(rope_parameters=YARN)),
    ("qwen3", dict(tie_word_embeddings=True)),
])
def test_dense_logits_equal_transformers(tmp_path, family, overrides):
    hf = save_dense(tmp_path / "hf", family, **overrides)
    with open_checkpoint(tmp_path / "hf") as reader:
        assert reader.family == family
        cfg, sd = reader.config, unstack_experts(reader.state_dict())
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(sd)
    long = torch.randint(0, 96, (1, 100), generator=torch.Generator().manual_seed(2))  # past max_position_embeddings
    for tokens in (TOKENS, long):
        with torch.no_grad():
            assert (ours(tokens).logits - logits(hf, tokens)).abs().max().item() < 1e-5
    assert cfg.qk_layernorm == (family == "qwen3") and cfg.qkv_bias == (family == "qwen2")
    assert cfg.share_embeddings_and_output_weights == overrides.get("tie_word_embeddings", False)
    tied = cfg.share_embeddings_and_output_weights
    theirs = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    back = state_dict_to_hf(sd, cfg, family)
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in back)


@pytest.mark.parametrize("family, overrides, message", [
    ("mistral", dict(sliding_window=16), "sets sliding_window 16 < max_position_embeddings 64"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8), "sets sliding_window 8"),
    ("llama", dict(attention_bias=True), "attention_bias=True, mlp_bias=False is not supported"),
    ("qwen3", dict(attention_bias=True), "is not supported"),
    ("llama", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                    "long_factor": [1.0] * 4, "original_max_position_embeddings": 16}),
     "unsupported RoPE scaling 'longrope'"),
    ("llama", dict(hidden_act="gelu_pytorch_tanh"), "unsupported hidden_act 'gelu_pytorch_tanh'"),
])
def test_what_the_reference_model_cannot_compute_is_refused(tmp_path, family, overrides, message):
    save_dense(tmp_path / "hf", family, **overrides)
    with pytest.raises(UpcycleError) as err:
        open_checkpoint(tmp_path / "hf")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_legacy_config_keys_read_like_rope_parameters():
    legacy = {"model_type": "llama", **SMALL, **FAMILY_DEFAULTS["llama"], "rope_theta": 500.0,
              "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 16}}
    modern = {"model_type": "llama", **SMALL, "rope_parameters": LLAMA3}
    assert gpt_config_from_hf(legacy) == gpt_config_from_hf(modern)
    assert gpt_config_from_hf({"model_type": "mixtral", **SMALL, "num_local_experts": 4,
                               "num_experts_per_tok": 2}).rotary_base == 1e6  # Mixtral's own default theta


@pytest.mark.parametrize("router", ["softmax_then_topk", "topk_then_softmax"])
@pytest.mark.parametrize("gate", [True, False])
def test_shared_experts_equal_megatron_core(megatron, router, gate):
    cfg = small_config(normalization="rmsnorm", activation="swiglu", rotary_percentage=1.0, num_layers=3)
    recipe = UpcycleConfig.from_shorthand("E2G2T2", router=router, shared_expert=True, layers=(0, 2),
                                          router_init="virtual_group", router_init_std=0.5)
    moe_cfg, sd = upcycle_state_dict(random_model(cfg).state_dict(), cfg, recipe)
    assert moe_cfg.moe_shared_expert_intermediate_size == 64 and moe_cfg.moe_shared_expert_gate
    if not gate:
        moe_cfg = moe_cfg.replace(moe_shared_expert_gate=False)
        sd = {k: v for k, v in sd.items() if not k.endswith("gate_weight")}
    # perturb everything the routing and the gate act on, so a wrong combination shows
    sd = {k: v + 0.05 * torch.randn_like(v) if ".mlp." in k else v for k, v in sd.items()}
    assert_megatron_matches(moe_cfg, sd, TOKENS)
    assert moe_cfg.num_parameters() == sum(v.numel() for v in sd.values())


@pytest.mark.parametrize("rope", [dict(rope_scaling_type="linear", rope_scaling_factor=4.0),
                                  dict(rope_scaling_type="llama3", rope_scaling_factor=32.0,
                                       rope_original_max_position_embeddings=8192)])
def test_rope_scaling_equals_megatron_core(megatron, rope):
    cfg = small_config(normalization="rmsnorm", activation="swiglu", rotary_percentage=1.0, rotary_base=5e5,
                       hidden_size=64, num_attention_heads=2, num_query_groups=1, **rope)
    ours = random_model(cfg)
    logits = assert_megatron_matches(cfg, ours.state_dict(), TOKENS)
    unscaled = random_model(cfg.replace(rope_scaling_type=None))
    with torch.no_grad():
        effect = (logits - unscaled(TOKENS).logits).abs().max().item()
    assert effect > 1e-4  # the scaling matters here (far above float noise), and Megatron applies the same one


def test_megatron_refuses_rope_scaling_it_cannot_express():
    from nemo_upcycle.models.megatron import rope_arguments

    for rope in (dict(rope_scaling_type="yarn", rope_scaling_factor=4.0, rope_original_max_position_embeddings=16),
                 dict(rope_scaling_type="dynamic", rope_scaling_factor=2.0),
                 dict(rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_original_max_position_embeddings=16)):
        with pytest.raises(UpcycleError, match="Megatron-core cannot express RoPE scaling"):
            rope_arguments(small_config(**rope))


@pytest.mark.parametrize("router", ["softmax_then_topk", "topk_then_softmax", "sigmoid"])
@pytest.mark.parametrize("activation", ["swiglu", "squared-relu", "gelu"])
def test_shared_expert_recipe_keeps_the_dense_output(router, activation):
    """Shared expert = the dense MLP behind a zero gate (1/2 of it); routed experts scaled to the other half:
    exact for any router with topK-then-softmax, for a zero router otherwise, like the recipe without one."""
    cfg = small_config(activation=activation, normalization="rmsnorm", rotary_percentage=1.0)
    dense = random_model(cfg, scale=0.3)
    recipe = UpcycleConfig.from_shorthand("E4G2T2", router=router, shared_expert=True, router_init="virtual_group", router_init_std=0.3)
    assert recipe.scale_factor() == recipe.replace(shared_expert=False).scale_factor() / 2
    moe_cfg, sd = upcycle_state_dict(dense.state_dict(), cfg, recipe)
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}.mlp."
        for fc in ("linear_fc1.weight", "linear_fc2.weight"):  # the dense MLP, unchanged
            assert torch.equal(sd[p + "shared_experts." + fc], dense.state_dict()[p + fc])
        assert not sd[p + "shared_experts.gate_weight"].any()
    if router != "topk_then_softmax":
        sd = {k: torch.zeros_like(v) if ".router." in k else v for k, v in sd.items()}
    moe = GPTModel(moe_cfg).eval()
    moe.load_state_dict(sd)
    with torch.no_grad():
        want = dense(TOKENS).logits
        assert ((moe(TOKENS).logits - want).abs().max() / want.abs().max()).item() < 1e-5


def test_shared_expert_needs_a_bias_free_model():
    with pytest.raises(UpcycleError, match="shared experts need a model without linear biases") as err:
        upcycle_state_dict(random_model(small_config(bias=True)).state_dict(), small_config(bias=True),
                           UpcycleConfig.from_shorthand("E2G1T2", shared_expert=True))
    assert "\n" not in str(err.value)
