"""The same GPT built from Megatron-core: TransformerConfig and layer specs from a `GPTConfig`, and weight
transfer to and from the reference model's (local-spec) state dict.

With Transformer Engine (GPUs) the TE spec is used, with grouped-GEMM experts when asked; without it, the local
spec. One CPU detail: the local spec's torch LayerNorm has no zero-centred gamma, so a layernorm1p model is
built as plain LayerNorm and its norm weights are stored as gamma = weight + 1 inside the Megatron model
(`fold_layernorm1p`), converted back on the way out.
"""

from __future__ import annotations

from typing import Any

import torch

from nemo_upcycle.activations import get_activation
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.keys import is_extra_state, local_to_te, te_to_local


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def transformer_config(cfg: GPTConfig, use_te: bool = False, **overrides: Any):
    """Megatron-core TransformerConfig for `cfg`. `overrides` pass any other TransformerConfig field
    (bf16, fp8, tensor_model_parallel_size, ...)."""
    from megatron.core.activations import squared_relu as mcore_squared_relu
    from megatron.core.transformer import TransformerConfig

    act = get_activation(cfg.activation)
    fn = mcore_squared_relu if act.name == "squared-relu" else act.fn
    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_groups,
        kv_channels=cfg.head_dim,
        activation_func=fn,
        gated_linear_unit=act.gated,
        normalization="RMSNorm" if cfg.normalization == "rmsnorm" else "LayerNorm",
        layernorm_zero_centered_gamma=cfg.normalization == "layernorm1p" and use_te,
        layernorm_epsilon=cfg.layernorm_epsilon,
        add_bias_linear=cfg.bias,
        add_qkv_bias=cfg.qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        init_method_std=cfg.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )
    if cfg.is_moe:
        kwargs.update(
            num_moe_experts=cfg.num_moe_experts,
            moe_ffn_hidden_size=cfg.expert_ffn_hidden_size,
            moe_router_topk=cfg.moe_router_topk,
            moe_router_pre_softmax=cfg.moe_router_pre_softmax,
            moe_router_score_function=cfg.moe_router_score_function,
            moe_router_topk_scaling_factor=cfg.moe_router_topk_scaling_factor,
            moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
            moe_z_loss_coeff=cfg.moe_z_loss_coeff,
            moe_layer_freq=cfg.moe_layer_freq if isinstance(cfg.moe_layer_freq, int) else list(cfg.moe_layer_freq),
            moe_router_dtype="fp32",  # the reference model routes in float32 too
            moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",  # alltoall needs CUDA streams
            moe_router_load_balancing_type="aux_loss",
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_megatron_gpt(cfg: GPTConfig, use_te: bool | None = None, grouped_gemm: bool = False,
                       **config_overrides: Any):
    """A Megatron-core GPTModel for `cfg` (parallel state must be initialised; see nemo_upcycle.compat)."""
    from megatron.core.models.gpt import GPTModel as MegatronGPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if use_te is None:
        use_te = have_transformer_engine() and torch.cuda.is_available()
    if cfg.is_moe and grouped_gemm:
        config_overrides.setdefault("moe_grouped_gemm", True)
    tc = transformer_config(cfg, use_te=use_te, **config_overrides)
    spec = get_gpt_decoder_block_spec(tc, use_transformer_engine=use_te)
    return MegatronGPTModel(
        config=tc,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        position_embedding_type="rope",
        rotary_percent=cfg.rotary_percentage,
        rotary_base=int(cfg.rotary_base),
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
    )


def fold_layernorm1p(state_dict: dict[str, torch.Tensor], cfg: GPTConfig, sign: int = 1) -> dict[str, torch.Tensor]:
    """Add (sign=+1) or remove (-1) the implicit 1 of layernorm1p norm weights, for models whose norms
    cannot do it themselves (Megatron's local spec on CPU)."""
    if cfg.normalization != "layernorm1p":
        return state_dict
    norm_weight = ("layernorm.weight", "layer_norm_weight")
    return {k: (v + sign if k.endswith(norm_weight) else v) for k, v in state_dict.items()}


def _uses_te(model) -> bool:
    return any(k.endswith("layer_norm_weight") for k in model.state_dict()) or any(
        "linear_fc1.weight0" in k for k in model.state_dict()
    )


def load_reference_weights(model, state_dict: dict[str, torch.Tensor], cfg: GPTConfig) -> None:
    """Copy a reference-model (local-spec) state dict into a Megatron GPTModel, checking every key."""
    use_te = _uses_te(model)
    sd = local_to_te(state_dict, cfg.moe_layer_pattern()) if use_te else state_dict
    if not model.config.layernorm_zero_centered_gamma:
        sd = fold_layernorm1p(sd, cfg, +1)
    target = model.state_dict()
    missing = [k for k in target if not is_extra_state(k) and k not in sd]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected:
        raise UpcycleError(
            f"weights do not match the Megatron model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for k, v in sd.items():
            if target[k].shape != v.shape:
                raise UpcycleError(f"shape mismatch for {k}: Megatron {tuple(target[k].shape)}, given {tuple(v.shape)}")
            target[k].copy_(v)


def reference_weights(model, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A Megatron GPTModel's weights as a reference-model (local-spec) state dict."""
    sd = {k: v for k, v in model.state_dict().items() if not is_extra_state(k) and isinstance(v, torch.Tensor)}
    sd = te_to_local(sd)
    if not model.config.layernorm_zero_centered_gamma:
        sd = fold_layernorm1p(sd, cfg, -1)
    return sd


def megatron_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, S, V) with an explicit causal mask (Megatron's default mask is allocated on CUDA)."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=tokens.device), 1)[None, None]
    return model(tokens, position_ids, mask)
