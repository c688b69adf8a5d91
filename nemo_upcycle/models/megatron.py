"""The same GPT built from Megatron-core: TransformerConfig and layer specs from a `GPTConfig`, and weight
transfer to and from the reference model's (local-spec) state dict.

With Transformer Engine (GPUs) the TE spec is used, with grouped-GEMM experts when asked; without it, the local
spec, with two adjustments so it trains and checkpoints like the TE spec: norms that allow layernorm1p and
sequence parallelism (Megatron's torch norm wrapper refuses both) and the `pre_mlp_layernorm` name in MoE layers.
"""

from __future__ import annotations

import functools
from pathlib import Path
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
        layernorm_zero_centered_gamma=cfg.normalization == "layernorm1p",
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
            cfg.moe_fields(),
            moe_router_dtype="fp32",  # the reference model routes in float32 too
            moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",  # alltoall needs CUDA streams
            moe_router_load_balancing_type="aux_loss",
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def rope_arguments(cfg: GPTConfig) -> dict[str, Any]:
    """GPTModel's RoPE-scaling arguments for `cfg`. Megatron-core has linear interpolation
    (seq_len_interpolation_factor) and Llama 3.1's scaling with low/high frequency factors 1/4 and an original
    context of 8192 fixed (rope_scaling); anything else is refused rather than trained with other RoPE."""
    kind = cfg.rope_scaling_type
    if kind is None:
        return {}
    if kind == "linear":
        return {"seq_len_interpolation_factor": cfg.rope_scaling_factor}
    if kind == "llama3" and (cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                             cfg.rope_original_max_position_embeddings) == (1.0, 4.0, 8192):
        return {"rope_scaling": True, "rope_scaling_factor": cfg.rope_scaling_factor}
    raise UpcycleError(
        f"Megatron-core cannot express RoPE scaling {kind} with these parameters (it has linear, and llama3 with "
        "low/high frequency factors 1/4 and original context 8192): export to Hugging Face (output_format=hf) instead"
    )


def build_megatron_gpt(cfg: GPTConfig, use_te: bool | None = None, grouped_gemm: bool = False,
                       stage: dict[str, Any] | None = None, **config_overrides: Any):
    """A Megatron-core GPTModel for `cfg` (parallel state must be initialised; see nemo_upcycle.compat).
    `stage`: GPTModel's pipeline arguments (pre_process, post_process, vp_stage) for one pipeline chunk."""
    from megatron.core.models.gpt import GPTModel as MegatronGPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if use_te is None:
        use_te = have_transformer_engine() and torch.cuda.is_available()
    if cfg.is_moe and grouped_gemm:
        config_overrides.setdefault("moe_grouped_gemm", True)
    tc = transformer_config(cfg, use_te=use_te, **config_overrides)
    spec = get_gpt_decoder_block_spec(tc, use_transformer_engine=use_te,
                                      **({"vp_stage": stage["vp_stage"]} if stage else {}))
    if not use_te:
        _checkpoint_moe_norm_like_te(spec)
        _use_local_norms(spec)
    return MegatronGPTModel(
        config=tc,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        position_embedding_type="rope",
        rotary_percent=cfg.rotary_percentage,
        rotary_base=int(cfg.rotary_base),
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        **rope_arguments(cfg),
        **(stage or {}),
    )


def spec_class(spec: Any) -> Any:
    """The class a Megatron spec entry builds: a ModuleSpec's `module`, a bare class, or either wrapped in
    `functools.partial` (megatron-core >= 0.19 binds spec arguments that way), unwrapped."""
    module = getattr(spec, "module", spec)
    while isinstance(module, functools.partial):
        module = module.func
    return module


def _checkpoint_moe_norm_like_te(block_spec) -> None:
    """Megatron's local spec renames every layer's `pre_mlp_layernorm` to `mlp.linear_fc1.layer_norm_*` in
    checkpoints, MoE layers included; the TE spec (what NeMo and Megatron-LM train with) keeps
    `pre_mlp_layernorm` in MoE layers, where the norm is not fused into fc1. Follow the TE spec so checkpoints
    of the local-spec model and of the TE-spec model are interchangeable."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for layer_spec in block_spec.layer_specs:
        sub = layer_spec.submodules
        if spec_class(sub.mlp) is MoELayer:
            sub.sharded_state_dict_keys_map = {
                k: v for k, v in sub.sharded_state_dict_keys_map.items() if k != "pre_mlp_layernorm."
            }


class LayerNorm1P(torch.nn.LayerNorm):
    """LayerNorm with zero-centred gamma (stored weight = gamma - 1); Transformer Engine's norm does the same."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps)
        torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class LocalNorm:
    """The local spec's norm. Megatron's torch norm wrapper refuses zero-centred gamma (layernorm1p) and sequence
    parallelism, which MoE training with tensor parallelism requires; this builds the same torch norms and marks
    their parameters `sequence_parallel` as Megatron's other norms do, so their gradients get summed over the
    tensor-parallel ranks. A class, because Megatron's specs build classes only."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.layernorm_zero_centered_gamma:
            norm = LayerNorm1P(hidden_size, eps=eps)
        else:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        return norm


def _use_local_norms(block_spec) -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def local(module):  # keeps the arguments a functools.partial bound
        if isinstance(module, functools.partial):
            return functools.partial(local(module.func), *module.args, **module.keywords)
        return LocalNorm

    def swap(holder, attr: str) -> None:
        norm = getattr(holder, attr, None)
        if spec_class(norm) is not WrappedTorchNorm:
            return
        if hasattr(norm, "module"):  # a ModuleSpec
            norm.module = local(norm.module)
        else:
            setattr(holder, attr, local(norm))

    swap(block_spec, "layer_norm")
    for layer_spec in block_spec.layer_specs:
        sub = layer_spec.submodules
        swap(sub, "input_layernorm")
        swap(sub, "pre_mlp_layernorm")
        attention = getattr(sub.self_attention, "submodules", None)
        for attr in ("q_layernorm", "k_layernorm"):
            swap(attention, attr)


def _uses_te(model) -> bool:
    return any(k.endswith("layer_norm_weight") for k in model.state_dict()) or any(
        "linear_fc1.weight0" in k for k in model.state_dict()
    )


def load_reference_weights(model, state_dict: dict[str, torch.Tensor], cfg: GPTConfig) -> None:
    """Copy a reference-model (local-spec) state dict into a Megatron GPTModel, checking every key."""
    use_te = _uses_te(model)
    sd = local_to_te(state_dict, cfg.moe_layer_pattern()) if use_te else state_dict
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


def reference_weights(model) -> dict[str, torch.Tensor]:
    """A Megatron GPTModel's weights as a reference-model (local-spec) state dict."""
    sd = {k: v for k, v in model.state_dict().items() if not is_extra_state(k) and isinstance(v, torch.Tensor)}
    return te_to_local(sd)


def as_chunks(model) -> list:
    """A GPTModel, or the list of one rank's pipeline chunks, as a list."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def sharded_state_dict_of(model, prefix: str) -> dict:
    """One sharded state dict for a model or its pipeline chunks, one entry per chunk: chunks of interleaved
    stages share tensor keys (layers stacked under one key, told apart by their global offsets)."""
    return {f"chunk{i}": chunk.sharded_state_dict(prefix=prefix) for i, chunk in enumerate(as_chunks(model))}


def load_chunk_states(model, loaded: dict, prefix: str, source) -> None:
    """Copy what dist_checkpointing.load returned for `sharded_state_dict_of(model)` into the chunks."""
    for i, chunk in enumerate(as_chunks(model)):
        expected = chunk.state_dict()
        state = {k[len(prefix):]: v for k, v in loaded[f"chunk{i}"].items()
                 if k.startswith(prefix) and k[len(prefix):] in expected}
        missing = [k for k in expected if k not in state and not is_extra_state(k)]
        if missing:
            raise UpcycleError(f"{source} lacks {missing[0]} ({len(missing)} tensors missing) for this model")
        chunk.load_state_dict(state, strict=False)


def load_dist_checkpoint(model, path, prefix: str = "model.") -> None:
    """Load a torch_dist checkpoint (ours, NeMo's or Megatron-LM's) into a Megatron GPTModel (or the list of its
    pipeline chunks) with Megatron's own sharded loader: each rank reads only its shard, at any TP / EP / PP."""
    from megatron.core import dist_checkpointing

    load_chunk_states(model, dist_checkpointing.load(sharded_state_dict_of(model, prefix), str(path)), prefix, path)


def save_dist_checkpoint(model, path, prefix: str = "model.") -> None:
    """Every rank writes its shards into one torch_dist checkpoint with Megatron's own saver (collective)."""
    from megatron.core import dist_checkpointing

    Path(path).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded_state_dict_of(model, prefix), str(path))


def megatron_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, S, V) with an explicit causal mask (Megatron's default mask is allocated on CUDA)."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=tokens.device), 1)[None, None]
    return model(tokens, position_ids, mask)
