"""Hugging Face <-> Megatron names for the dense GPT families we read (Nemotron first).

Megatron fuses q, k and v into one `linear_qkv` whose rows are grouped per query group (see
`reference.SelfAttention`); Hugging Face keeps separate q_proj / k_proj / v_proj. `merge_qkv` / `split_qkv`
convert between the two. Everything else is a rename, driven by the literal tables below; layer maps work one
layer at a time through a getter, so a streaming reader never holds more than one layer.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models.config import GPTConfig

# Per-layer renames, local-spec name (under decoder.layers.<i>.) -> HF name (under model.layers.<i>.).
NEMOTRON_LAYER_KEYS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.linear_proj.bias": "self_attn.o_proj.bias",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
    "mlp.linear_fc1.weight": "mlp.up_proj.weight",
    "mlp.linear_fc1.bias": "mlp.up_proj.bias",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.linear_fc2.bias": "mlp.down_proj.bias",
}
GLOBAL_KEYS = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
    "output_layer.weight": "lm_head.weight",
}
_QKV = ("q_proj", "k_proj", "v_proj")


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """HF q [heads*d, ...], k and v [groups*d, ...] -> Megatron linear_qkv rows (works for weights and biases)."""
    g, d = cfg.num_groups, cfg.head_dim
    tail = q.shape[1:]
    per_group = cfg.num_attention_heads // g
    parts = [q.reshape(g, per_group * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `merge_qkv`."""
    g, d = cfg.num_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // g
    tail = qkv.shape[1:]
    q, k, v = qkv.reshape(g, (per_group + 2) * d, *tail).split([per_group * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def layer_from_hf(get: Callable[[str], torch.Tensor], has: Callable[[str], bool], i: int,
                  cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Layer i's tensors under local-spec names (relative to the layer), fetched through `get`."""
    hf = f"model.layers.{i}."
    out = {ours: get(hf + theirs) for ours, theirs in NEMOTRON_LAYER_KEYS.items() if has(hf + theirs)}
    for kind in ("weight", "bias"):
        names = [f"{hf}self_attn.{p}.{kind}" for p in _QKV]
        if has(names[0]):
            out[f"self_attention.linear_qkv.{kind}"] = merge_qkv(*(get(n) for n in names), cfg)
    return out


def layer_to_hf(tensors: dict[str, torch.Tensor], i: int, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Inverse of `layer_from_hf`: one layer's local-spec tensors -> HF names."""
    hf = f"model.layers.{i}."
    out = {}
    for ours, t in tensors.items():
        if ours.startswith("self_attention.linear_qkv."):
            kind = ours.rsplit(".", 1)[1]
            for p, part in zip(_QKV, split_qkv(t, cfg)):
                out[f"{hf}self_attn.{p}.{kind}"] = part
        elif ours in NEMOTRON_LAYER_KEYS:
            out[hf + NEMOTRON_LAYER_KEYS[ours]] = t
        else:
            raise UpcycleError(f"no Hugging Face Nemotron name for layer tensor '{ours}'")
    return out


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A whole HF NemotronForCausalLM state dict -> reference-model (local-spec) state dict."""
    out = {ours: hf_sd[theirs] for ours, theirs in GLOBAL_KEYS.items() if theirs in hf_sd}
    for i in range(cfg.num_layers):
        layer = layer_from_hf(hf_sd.__getitem__, hf_sd.__contains__, i, cfg)
        out.update({f"decoder.layers.{i}.{k}": v for k, v in layer.items()})
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    out = {GLOBAL_KEYS[k]: v for k, v in sd.items() if k in GLOBAL_KEYS}
    for i in range(cfg.num_layers):
        prefix = f"decoder.layers.{i}."
        layer = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        out.update(layer_to_hf(layer, i, cfg))
    return out


def nemotron_hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """config.json fields of the equivalent Hugging Face NemotronForCausalLM."""
    if cfg.normalization != "layernorm1p" or cfg.activation != "squared-relu":
        raise UpcycleError(
            "Hugging Face Nemotron needs normalization layernorm1p and activation squared-relu, got "
            f"{cfg.normalization} / {cfg.activation}"
        )
    return {
        "architectures": ["NemotronForCausalLM"],
        "model_type": "nemotron",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "relu2",
        "max_position_embeddings": cfg.seq_length,
        "initializer_range": cfg.init_method_std,
        "norm_eps": cfg.layernorm_epsilon,
        "rope_theta": cfg.rotary_base,
        "partial_rotary_factor": cfg.rotary_percentage,
        "attention_bias": cfg.bias or cfg.qkv_bias,
        "mlp_bias": cfg.bias,
        "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
    }


def gpt_config_from_nemotron_hf(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig from a NemotronForCausalLM config.json (legacy top-level or transformers-5 rope_parameters)."""
    rope = hf.get("rope_parameters") or {}
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise UpcycleError("Nemotron configs with attention_bias != mlp_bias are not supported")
    return GPTConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        kv_channels=hf.get("head_dim"),
        vocab_size=hf["vocab_size"],
        seq_length=hf.get("max_position_embeddings", 4096),
        activation=hf.get("hidden_act", "relu2"),
        normalization="layernorm1p",
        layernorm_epsilon=hf.get("norm_eps", 1e-5),
        bias=bool(hf.get("mlp_bias", False)),
        rotary_percentage=rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)),
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=hf.get("initializer_range", 0.02),
    )
