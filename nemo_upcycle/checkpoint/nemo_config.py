"""NeMo 1.x `model_config.yaml` (MegatronGPTModel) <-> GPTConfig.

Field names are NeMo's; everything we do not model (precision, tokenizer, data, optimiser, fp8 flags, ...)
passes through untouched, so the converted `.nemo` trains with the same settings as the dense one.
"""

from __future__ import annotations

from typing import Any

import torch

from nemo_upcycle.activations import activation_name, activation_spellings
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.megatron import rope_arguments

NEMO_GPT_TARGET = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"

# The MoE training defaults the paper recommends, written into every upcycled config.
MOE_TRAINING_DEFAULTS = {
    "moe_token_dispatcher_type": "alltoall",
    "moe_grouped_gemm": True,
    "moe_router_load_balancing_type": "aux_loss",
}


def gpt_config_from_nemo(cfg: dict[str, Any], vocab_size: int, source: str = "model_config.yaml") -> GPTConfig:
    """GPTConfig from a NeMo model config; `vocab_size` is the padded size read off the embedding tensor; errors
    name the config as `source`."""
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
        if key not in cfg:
            raise UpcycleError(f"{source} has no '{key}': is this a NeMo GPT checkpoint?")
    activation = cfg.get("activation", "gelu")
    if activation_name(activation) is None:
        raise UpcycleError(f"unsupported activation '{activation}' in {source}: supported are "
                           f"{', '.join(activation_spellings())}")
    normalization = cfg.get("normalization", "layernorm")
    if normalization == "layernorm" and cfg.get("layernorm_zero_centered_gamma", False):
        normalization = "layernorm1p"
    if normalization not in ("layernorm", "layernorm1p", "rmsnorm"):
        raise UpcycleError(
            f"unsupported normalization '{normalization}' in {source}: use layernorm, layernorm1p or rmsnorm"
        )
    position = cfg.get("position_embedding_type", "learned_absolute")
    if position != "rope":
        raise UpcycleError(
            f"unsupported position_embedding_type '{position}': nemo-upcycle handles RoPE models (Nemotron, Llama, ...)"
        )
    moe: dict[str, Any] = {}
    if cfg.get("num_moe_experts"):
        moe = {k: cfg[k] for k in ("num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk",
                                   "moe_router_pre_softmax", "moe_router_score_function",
                                   "moe_router_topk_scaling_factor", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                                   "moe_layer_freq", "moe_shared_expert_intermediate_size",
                                   "moe_shared_expert_gate") if cfg.get(k) is not None}
    bias = bool(cfg.get("bias", True))
    return GPTConfig(
        num_layers=cfg["num_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["ffn_hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg.get("num_query_groups"),
        kv_channels=cfg.get("kv_channels"),
        vocab_size=vocab_size,
        seq_length=cfg.get("encoder_seq_length") or cfg.get("max_position_embeddings") or 4096,
        activation=activation_name(activation),
        normalization=normalization,
        layernorm_epsilon=cfg.get("layernorm_epsilon", 1e-5),
        bias=bias,
        qkv_bias=bool(cfg.get("qkv_bias", False)),
        qk_layernorm=bool(cfg.get("qk_layernorm", False)),
        rotary_percentage=cfg.get("rotary_percentage", 1.0),
        rotary_base=float(cfg.get("rotary_base", 10000)),
        share_embeddings_and_output_weights=bool(cfg.get("share_embeddings_and_output_weights", True)),
        init_method_std=cfg.get("init_method_std", 0.02),
        **_rope_scaling_from_nemo(cfg),
        **moe,
    )


def _rope_scaling_from_nemo(cfg: dict[str, Any]) -> dict[str, Any]:
    """NeMo's seq_len_interpolation_factor (linear) and scale_positional_embedding (Llama 3.1 scaling, with
    Megatron's fixed low/high frequency factors 1/4 and original context 8192; Megatron-Bridge: rope_scaling)."""
    if cfg.get("scale_positional_embedding") or cfg.get("rope_scaling") is True:
        return {"rope_scaling_type": "llama3", "rope_scaling_factor": float(cfg.get("rope_scaling_factor") or 8.0),
                "rope_original_max_position_embeddings": 8192, "rope_low_freq_factor": 1.0,
                "rope_high_freq_factor": 4.0}
    if cfg.get("seq_len_interpolation_factor"):
        return {"rope_scaling_type": "linear", "rope_scaling_factor": float(cfg["seq_len_interpolation_factor"])}
    return {}


def nemo_config_from_gpt(gpt: GPTConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A NeMo model config for `gpt`: `base` (the source checkpoint's config) with the model fields set,
    plus the MoE fields and their training defaults when `gpt` is an MoE model."""
    cfg = dict(base or {})
    cfg.setdefault("target", NEMO_GPT_TARGET)
    cfg.update(
        mcore_gpt=True,
        num_layers=gpt.num_layers,
        hidden_size=gpt.hidden_size,
        ffn_hidden_size=gpt.ffn_hidden_size,
        num_attention_heads=gpt.num_attention_heads,
        num_query_groups=gpt.num_query_groups,
        kv_channels=gpt.kv_channels,
        encoder_seq_length=gpt.seq_length,
        max_position_embeddings=gpt.seq_length,
        activation=gpt.activation,
        normalization=gpt.normalization,
        layernorm_epsilon=gpt.layernorm_epsilon,
        bias=gpt.bias,
        qkv_bias=gpt.qkv_bias,
        qk_layernorm=gpt.qk_layernorm,
        position_embedding_type="rope",
        rotary_percentage=gpt.rotary_percentage,
        rotary_base=gpt.rotary_base,
        share_embeddings_and_output_weights=gpt.share_embeddings_and_output_weights,
        init_method_std=gpt.init_method_std,
    )
    cfg.pop("layernorm_zero_centered_gamma", None)  # expressed by normalization: layernorm1p
    for key in ("seq_len_interpolation_factor", "scale_positional_embedding", "rope_scaling_factor"):
        cfg.pop(key, None)
    rope = rope_arguments(gpt)  # refuses RoPE scalings Megatron cannot express
    if "seq_len_interpolation_factor" in rope:
        cfg["seq_len_interpolation_factor"] = rope["seq_len_interpolation_factor"]
    if rope.get("rope_scaling"):
        cfg.update(scale_positional_embedding=True, rope_scaling_factor=rope["rope_scaling_factor"])
    if gpt.is_moe:
        cfg.update(gpt.moe_fields(), **MOE_TRAINING_DEFAULTS)
        if not gpt.moe_shared_expert_gate:
            cfg.pop("moe_shared_expert_gate")
        if gpt.moe_layer_freq != 1:
            cfg["name"] = "decoder_block_gpt"  # NeMo's spec name for mixed dense / MoE decoders
    return cfg


# Sections NeMo 1.x/2.x MegatronGPTModel reads by attribute from its (struct) config while it is built or
# restored, with the values of NeMo 2.4's examples/nlp/language_modeling/conf/megatron_gpt_config.yaml.
# A config without one fails restore_from, e.g. "Key 'optim' is not in struct" (MegatronBaseModel.__init__
# reads cfg.optim.get('name')); `tokenizer` is required too (it sizes the vocabulary) and comes from the source.
NEMO_RESTORE_DEFAULTS: dict[str, Any] = {
    "precision": "bf16",
    "micro_batch_size": 4,
    "global_batch_size": 8,
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "make_vocab_size_divisible_by": 128,
    "seed": 1234,
    "optim": {
        "name": "fused_adam", "lr": 2e-4, "weight_decay": 0.01, "betas": [0.9, 0.98],
        "sched": {"name": "CosineAnnealing", "warmup_steps": 500, "constant_steps": 0, "min_lr": 2e-5},
    },
}
NEMO_PRECISIONS = {torch.bfloat16: "bf16", torch.float16: 16, torch.float32: 32}


def with_nemo_restore_sections(cfg: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, Any]:
    """`cfg` with every section NeMo's MegatronGPTModel needs to restore it present: the source's own where it
    had them, NeMo's defaults otherwise; `precision` follows the weights' dtype when the source set none."""
    out = dict(cfg)
    for key, value in NEMO_RESTORE_DEFAULTS.items():
        if out.get(key) is None:
            out[key] = NEMO_PRECISIONS.get(dtype, value) if key == "precision" and dtype is not None else value
    return out


def nemo_problem(gpt: GPTConfig) -> str | None:
    """What NeMo 1.x itself cannot hold beyond Megatron's limits: it applies Llama 3.1 RoPE scaling with its
    factor fixed at 8 (`scale_positional_embedding`)."""
    if gpt.rope_scaling_type == "llama3" and gpt.rope_scaling_factor != 8.0:
        return (f"NeMo 1.x applies llama3 RoPE scaling with factor 8 only, this model has "
                f"{gpt.rope_scaling_factor:g}: write output_format=megatron or output_format=hf instead")
    return None
