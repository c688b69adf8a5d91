"""Hugging Face <-> Megatron names and configs per model family, as torchtitan-style state-dict adapters: a
literal table of layer keys per family, applied one layer at a time through a getter, so a streaming reader
or writer never holds more than one layer.

    dense: nemotron, llama, mistral, qwen2, qwen3            MoE: mixtral, qwen2_moe, qwen3_moe

How a table joins Hugging Face tensors into one Megatron tensor (local-spec names, experts stacked):
  one name          a rename
  several names     concatenated on dim 0: Megatron's gated fc1 is [gate; up] ([2F, H] from two [F, H])
  "{e}" in a name   one tensor per expert, stacked on a new leading axis: experts fc1 [N, 2F_e, H]
  linear_qkv        q, k and v regrouped per query group (`merge_qkv`), Megatron's fused QKV row order
transformers 5 keeps MoE experts fused in memory (experts.gate_up_proj [N, 2F_e, H], which is our stacked fc1,
and experts.down_proj [N, H, F_e]) but `save_pretrained` writes one tensor per expert, which is also what vLLM
and SGLang read: the per-expert layout is written, both are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from nemo_upcycle.activations import activation_name, activation_spellings
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models.config import ROPE_SCALING_TYPES, GPTConfig
from nemo_upcycle.models.keys import stack_experts, unstack_experts

Table = dict[str, tuple[str, ...]]  # local-spec name under decoder.layers.<i>. -> HF names under model.layers.<i>.

_ATTENTION: Table = {  # every family; entries a checkpoint lacks (biases, qk-norm) are skipped on import
    "input_layernorm.weight": ("input_layernorm.weight",),
    "input_layernorm.bias": ("input_layernorm.bias",),
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
    "self_attention.linear_qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "self_attention.linear_proj.bias": ("self_attn.o_proj.bias",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "pre_mlp_layernorm.bias": ("post_attention_layernorm.bias",),
}
_PLAIN_MLP: Table = {  # Nemotron: up_proj, activation, down_proj
    "mlp.linear_fc1.weight": ("mlp.up_proj.weight",),
    "mlp.linear_fc1.bias": ("mlp.up_proj.bias",),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
    "mlp.linear_fc2.bias": ("mlp.down_proj.bias",),
}
_GATED_MLP: Table = {  # Llama family SwiGLU: fc1 = [gate_proj; up_proj]
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc1.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
    "mlp.linear_fc2.bias": ("mlp.down_proj.bias",),
}
_MIXTRAL_MOE: Table = {  # w1 = gate, w3 = up, w2 = down
    "mlp.router.weight": ("block_sparse_moe.gate.weight",),
    "mlp.experts.linear_fc1.weight": ("block_sparse_moe.experts.{e}.w1.weight",
                                      "block_sparse_moe.experts.{e}.w3.weight"),
    "mlp.experts.linear_fc2.weight": ("block_sparse_moe.experts.{e}.w2.weight",),
}
_QWEN_MOE: Table = {
    "mlp.router.weight": ("mlp.gate.weight",),
    "mlp.experts.linear_fc1.weight": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
    "mlp.experts.linear_fc2.weight": ("mlp.experts.{e}.down_proj.weight",),
}
_FUSED_MOE: Table = {  # transformers 5's in-memory names (Mixtral's block_sparse_moe renamed to mlp as well)
    "mlp.router.weight": ("mlp.gate.weight",),
    "mlp.experts.linear_fc1.weight": ("mlp.experts.gate_up_proj",),
    "mlp.experts.linear_fc2.weight": ("mlp.experts.down_proj",),
}
_QWEN2_SHARED_EXPERT: Table = {
    "mlp.shared_experts.linear_fc1.weight": ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"),
    "mlp.shared_experts.linear_fc2.weight": ("mlp.shared_expert.down_proj.weight",),
    "mlp.shared_experts.gate_weight": ("mlp.shared_expert_gate.weight",),
}
GLOBAL_KEYS = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
    "output_layer.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class Family:
    architecture: str  # config.json `architectures`
    dense_mlp: Table
    moe_mlp: tuple[Table, ...] = ()  # layouts read for MoE layers; the first is the one written


FAMILIES = {
    "nemotron": Family("NemotronForCausalLM", _PLAIN_MLP),
    "llama": Family("LlamaForCausalLM", _GATED_MLP),
    "mistral": Family("MistralForCausalLM", _GATED_MLP),
    "qwen2": Family("Qwen2ForCausalLM", _GATED_MLP),
    "qwen3": Family("Qwen3ForCausalLM", _GATED_MLP),
    "mixtral": Family("MixtralForCausalLM", {}, (_MIXTRAL_MOE, _FUSED_MOE)),
    "qwen2_moe": Family("Qwen2MoeForCausalLM", _GATED_MLP,
                        ({**_QWEN_MOE, **_QWEN2_SHARED_EXPERT}, {**_FUSED_MOE, **_QWEN2_SHARED_EXPERT})),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", _GATED_MLP, (_QWEN_MOE, _FUSED_MOE)),
}
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")  # the export targets (`--hf-arch`)


# ---- tensors --------------------------------------------------------------------------------------------------

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


def layer_table(family: str, cfg: GPTConfig, i: int, has: Callable[[str], bool] | None = None) -> Table:
    """Layer i's table: attention, plus the dense MLP or the MoE layout `has` finds (the written one without)."""
    fam = FAMILIES[family]
    if not cfg.moe_layer_pattern()[i]:
        mlp = fam.dense_mlp
    elif not fam.moe_mlp:
        raise UpcycleError(f"Hugging Face {family} has no MoE layers: export to {', '.join(MOE_ARCHS)}")
    else:
        def present(t: Table) -> bool:  # probe the first expert's first tensor
            return has is not None and has(f"model.layers.{i}." + t["mlp.experts.linear_fc1.weight"][0].format(e=0))

        found = [t for t in fam.moe_mlp if present(t)]
        mlp = (found or fam.moe_mlp)[0]
    table = {**_ATTENTION, **mlp}
    if not cfg.moe_shared_expert_intermediate_size:
        table = {k: v for k, v in table.items() if not k.startswith("mlp.shared_experts.")}
    elif not cfg.moe_shared_expert_gate:
        table.pop("mlp.shared_experts.gate_weight", None)
    return table


def layer_sources(has: Callable[[str], bool], i: int, cfg: GPTConfig,
                  family: str) -> dict[str, tuple[list[list[str]], bool]]:
    """Which HF tensors make each local-spec tensor of layer i: a list of parts per expert (a single list when
    the tensor is not per expert), and whether it is per expert. Tensors the checkpoint lacks are left out."""
    out = {}
    for ours, theirs in layer_table(family, cfg, i, has).items():
        names = [f"model.layers.{i}.{t}" for t in theirs]
        per_expert = "{e}" in names[0]
        groups = [[n.format(e=e) for n in names] for e in range(cfg.num_moe_experts)] if per_expert else [names]
        if has(groups[0][0]):
            out[ours] = (groups, per_expert)
    return out


def _join_parts(ours: str, parts: list[torch.Tensor], cfg: GPTConfig) -> torch.Tensor:
    if ours.startswith("self_attention.linear_qkv."):
        return merge_qkv(*parts, cfg)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _split_parts(ours: str, t: torch.Tensor, n: int, cfg: GPTConfig) -> tuple[torch.Tensor, ...]:
    if ours.startswith("self_attention.linear_qkv."):
        return split_qkv(t, cfg)
    return t.chunk(n) if n > 1 else (t,)


def layer_from_hf(get: Callable[[str], torch.Tensor], has: Callable[[str], bool], i: int, cfg: GPTConfig,
                  family: str = "nemotron", only: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Layer i's tensors under local-spec names (relative to the layer, experts stacked), fetched through `get`;
    `only`: just these names."""
    out = {}
    for ours, (groups, per_expert) in layer_sources(has, i, cfg, family).items():
        if only is None or ours in only:
            joined = [_join_parts(ours, [get(n) for n in g], cfg) for g in groups]
            out[ours] = torch.stack(joined) if per_expert else joined[0]
    return out


def layer_to_hf(tensors: dict[str, torch.Tensor], i: int, cfg: GPTConfig,
                family: str = "nemotron") -> dict[str, torch.Tensor]:
    """Inverse of `layer_from_hf`: one layer's local-spec tensors -> HF names (experts one tensor each)."""
    table = layer_table(family, cfg, i)
    out = {}
    for ours, t in tensors.items():
        if ours not in table:
            raise UpcycleError(f"no Hugging Face {family} name for layer tensor '{ours}'")
        names = [f"model.layers.{i}.{n}" for n in table[ours]]
        if "{e}" in names[0]:
            for e, t_e in enumerate(t.unbind(0)):
                out.update(zip((n.format(e=e) for n in names), _split_parts(ours, t_e, len(names), cfg)))
        else:
            out.update(zip(names, _split_parts(ours, t, len(names), cfg)))
    return out


def moe_layer_to_hf(tensors: dict[str, torch.Tensor], i: int, cfg: GPTConfig, arch: str) -> dict[str, torch.Tensor]:
    """`layer_to_hf` for an export target, plus what the target needs to hold our model exactly. Qwen2-MoE:
    q/k/v biases in every layer (zeros when the model has none: vLLM's Qwen2-MoE always adds them) and a shared
    expert in every MoE layer (all zeros, an exact no-op, when the model has none; without a gate, a zero gate,
    sigmoid(0) = 1/2, with down_proj doubled, exact in floating point)."""
    out = layer_to_hf(tensors, i, cfg, arch)
    if arch != "qwen2_moe":
        return out
    ref = next(iter(tensors.values()))

    def zeros(*shape: int) -> torch.Tensor:  # meta while planning, real while writing, like the layer's tensors
        return torch.zeros(shape, dtype=ref.dtype, device=ref.device)

    hf = f"model.layers.{i}."
    if not (cfg.bias or cfg.qkv_bias):
        heads, groups, d = cfg.num_attention_heads, cfg.num_groups, cfg.head_dim
        for p, rows in (("q_proj", heads * d), ("k_proj", groups * d), ("v_proj", groups * d)):
            out[f"{hf}self_attn.{p}.bias"] = zeros(rows)
    if cfg.moe_layer_pattern()[i]:
        shared = hf + "mlp.shared_expert."
        if not cfg.moe_shared_expert_intermediate_size:
            f, h = cfg.expert_ffn_hidden_size, cfg.hidden_size
            out.update({shared + "gate_proj.weight": zeros(f, h), shared + "up_proj.weight": zeros(f, h),
                        shared + "down_proj.weight": zeros(h, f)})
        elif not cfg.moe_shared_expert_gate:
            out[shared + "down_proj.weight"] = out[shared + "down_proj.weight"] * 2
        if not cfg.moe_shared_expert_gate:
            out[hf + "mlp.shared_expert_gate.weight"] = zeros(1, cfg.hidden_size)
    return out


def globals_to_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Embedding, final norm and output layer -> HF names."""
    return {GLOBAL_KEYS[k]: v for k, v in tensors.items()}


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: GPTConfig,
                       family: str = "nemotron") -> dict[str, torch.Tensor]:
    """A whole HF state dict -> reference-model (local-spec) state dict, experts one key each."""
    out = {ours: hf_sd[theirs] for ours, theirs in GLOBAL_KEYS.items() if theirs in hf_sd}
    if cfg.share_embeddings_and_output_weights:
        out.pop("output_layer.weight", None)
    for i in range(cfg.num_layers):
        layer = layer_from_hf(hf_sd.__getitem__, hf_sd.__contains__, i, cfg, family)
        out.update({f"decoder.layers.{i}.{k}": v for k, v in layer.items()})
    return unstack_experts(out)


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig, family: str = "nemotron") -> dict[str, torch.Tensor]:
    """Inverse of `state_dict_from_hf` (one tensor per expert, as save_pretrained writes)."""
    sd = stack_experts(sd)
    out = globals_to_hf({k: v for k, v in sd.items() if k in GLOBAL_KEYS})
    for i in range(cfg.num_layers):
        prefix = f"decoder.layers.{i}."
        layer = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        out.update(layer_to_hf(layer, i, cfg, family))
    return out


# ---- configs --------------------------------------------------------------------------------------------------

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
    """GPTConfig from a NemotronForCausalLM config.json (legacy top-level or transformers-5 rope_parameters, with
    the RoPE scaling transformers applies to it; partial rotary 0.5 unless it says otherwise)."""
    rope = _rope_from_hf({"partial_rotary_factor": 0.5, **hf}, "nemotron")
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
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=hf.get("initializer_range", 0.02),
        **rope,
    )


_DEFAULT_THETA = {"mixtral": 1e6}  # what transformers assumes when an old config.json has no rope_theta


def gpt_config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig from any supported config.json, transformers 5 (`rope_parameters`) or older (top-level
    `rope_theta`, `rope_scaling`). Refuses what the reference model and Megatron would compute differently."""
    model_type = hf.get("model_type")
    if model_type == "nemotron":
        return gpt_config_from_nemotron_hf(hf)
    if model_type not in FAMILIES:
        raise UpcycleError(f"unsupported Hugging Face model_type '{model_type}': supported are {', '.join(FAMILIES)}")
    act = hf.get("hidden_act", "silu")
    if activation_name(act, gated=True) is None:
        raise UpcycleError(f"unsupported hidden_act '{act}' in the {model_type} config.json: supported are "
                           f"{', '.join(activation_spellings(gated=True))}")
    _check_sliding_window(hf, model_type)
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim")
    return GPTConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim if head_dim and head_dim * heads != hidden else None,
        vocab_size=hf["vocab_size"],
        seq_length=hf.get("max_position_embeddings", 4096),
        activation=activation_name(act, gated=True),
        normalization="rmsnorm",
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=hf.get("initializer_range", 0.02),
        **_biases_from_hf(hf, model_type),
        **_rope_from_hf(hf, model_type),
        **_moe_from_hf(hf, model_type),
    )


def _check_sliding_window(hf: dict[str, Any], model_type: str) -> None:
    window = hf.get("sliding_window")
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        window = None
    max_pos = hf.get("max_position_embeddings")
    if window and (max_pos is None or window < max_pos):
        raise UpcycleError(
            f"the {model_type} config.json sets sliding_window {window} < max_position_embeddings {max_pos}: "
            "nemo-upcycle models (and Megatron training) attend to the whole context, so outputs would differ "
            f"beyond {window} tokens; set sliding_window to null if the model is only used within {window} tokens"
        )


def _biases_from_hf(hf: dict[str, Any], model_type: str) -> dict[str, bool]:
    if model_type == "qwen2":
        return {"qkv_bias": True}
    if model_type == "qwen2_moe":
        return {"qkv_bias": bool(hf.get("qkv_bias", True))}
    if model_type == "llama" and hf.get("attention_bias", False) == hf.get("mlp_bias", False):
        return {"bias": bool(hf.get("attention_bias", False))}
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UpcycleError(
            f"{model_type} with attention_bias={hf.get('attention_bias')}, mlp_bias={hf.get('mlp_bias')} is not "
            "supported: Megatron has biases on every linear layer or on q/k/v only"
        )
    return {}


def _rope_from_hf(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    params = dict(hf.get("rope_parameters") or {})
    if not params:  # transformers < 5: top-level rope_theta and an optional rope_scaling
        params = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")}
    theta = params.get("rope_theta") or hf.get("rope_theta") or _DEFAULT_THETA.get(model_type, 10000.0)
    out: dict[str, Any] = {
        "rotary_base": float(theta),
        "rotary_percentage": float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
    }
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return out
    if kind not in ROPE_SCALING_TYPES:
        raise UpcycleError(f"unsupported RoPE scaling '{kind}' in config.json: supported are default, "
                           f"{', '.join(ROPE_SCALING_TYPES)}")
    original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    factor = params.get("factor") or (hf["max_position_embeddings"] / original if kind == "yarn" else None)
    out.update(rope_scaling_type=kind, rope_scaling_factor=float(factor))
    if kind == "llama3":
        out.update(rope_original_max_position_embeddings=int(params["original_max_position_embeddings"]),
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]))
    elif kind == "yarn":
        if params.get("truncate", True) is False:
            raise UpcycleError("YaRN with truncate=false is not supported: its correction range is not rounded")
        attention = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if attention is None and mscale and mscale_all_dim:  # as transformers: a ratio of two mscales
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        out.update(rope_original_max_position_embeddings=int(original),
                   rope_beta_fast=float(params.get("beta_fast") or 32.0),
                   rope_beta_slow=float(params.get("beta_slow") or 1.0),
                   rope_attention_factor=None if attention is None else float(attention))
    return out


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _moe_from_hf(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    if model_type == "mixtral":
        return {"num_moe_experts": hf["num_local_experts"], "moe_ffn_hidden_size": hf["intermediate_size"],
                "moe_router_topk": hf["num_experts_per_tok"], "moe_router_pre_softmax": False,
                "moe_aux_loss_coeff": hf.get("router_aux_loss_coef", 0.0)}
    if model_type not in ("qwen2_moe", "qwen3_moe"):
        return {}
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    n, step, dense = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(n)]
    out = {"num_moe_experts": experts, "moe_ffn_hidden_size": hf["moe_intermediate_size"],
           "moe_router_topk": hf["num_experts_per_tok"],
           # norm_topk_prob: softmax over all, top-k, renormalised = softmax over the top-k logits
           "moe_router_pre_softmax": not hf.get("norm_topk_prob", False),
           "moe_aux_loss_coeff": hf.get("router_aux_loss_coef", 0.0),
           "moe_layer_freq": 1 if all(pattern) else tuple(pattern)}
    if model_type == "qwen2_moe" and hf.get("shared_expert_intermediate_size"):
        out.update(moe_shared_expert_intermediate_size=hf["shared_expert_intermediate_size"],
                   moe_shared_expert_gate=True)
    return out


def hf_target_problem(cfg: GPTConfig, arch: str) -> str | None:
    """Why Hugging Face `arch` cannot hold `cfg` exactly, or None when it can."""
    if not cfg.is_moe:
        return "the model is dense (export an upcycled MoE model)"
    if cfg.activation != "swiglu":
        return f"activation {cfg.activation} (the targets are SwiGLU)"
    if cfg.normalization != "rmsnorm":
        return f"normalization {cfg.normalization} (the targets use RMSNorm)"
    if cfg.rotary_percentage != 1.0:
        return f"RoPE on {cfg.rotary_percentage:g} of each head (the targets rotate all of it)"
    if cfg.bias:
        return "biases on every linear layer (the targets' MLPs, experts and routers have none)"
    if cfg.router_type == "sigmoid":
        return "sigmoid routing (the targets route with a softmax)"
    if cfg.moe_router_topk_scaling_factor not in (None, 1.0):
        return "moe_router_topk_scaling_factor (the targets do not scale routing weights)"
    if arch == "mixtral" and cfg.moe_router_pre_softmax:
        return "softmax-then-topK routing (Mixtral always renormalises the top-k weights: topK-then-softmax only)"
    if arch == "mixtral" and not all(cfg.moe_layer_pattern()):
        return "dense layers among the MoE ones (every Mixtral layer is MoE)"
    if cfg.moe_shared_expert_intermediate_size and arch != "qwen2_moe":
        return "a shared expert (only Qwen2-MoE has one)"
    if cfg.qkv_bias and arch != "qwen2_moe":
        return "q/k/v biases (only Qwen2-MoE has them)"
    if cfg.qk_layernorm and arch != "qwen3_moe":
        return "qk-norm (only Qwen3-MoE normalises queries and keys)"
    if not cfg.qk_layernorm and arch == "qwen3_moe":
        return "no qk-norm (Qwen3-MoE always normalises queries and keys)"
    if arch == "qwen2_moe" and cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        return f"head_dim {cfg.head_dim} != hidden_size / heads (Qwen2-MoE servers derive it from hidden_size)"
    return None


# Serving engines `--target-engine` knows: vLLM computes every export exactly (measured, scripts/engine_check.sh);
# llama.cpp hard-codes the top-k renormalisation per architecture (Qwen2-MoE never, Qwen3-MoE and Mixtral always)
# and does not convert Qwen3-MoE dense layers (measured); SGLang builds every Qwen2-MoE layer sparse (its source).
ENGINES = ("vllm", "llama.cpp", "sglang")


def engine_problem(cfg: GPTConfig, arch: str, engine: str) -> str | None:
    """Why `engine` would compute a different function from a `arch` export of `cfg`, or None when it would not."""
    partial = not all(cfg.moe_layer_pattern())
    if engine == "llama.cpp":
        if arch == "qwen2_moe" and not cfg.moe_router_pre_softmax:
            return ("llama.cpp never renormalises Qwen2-MoE top-k weights, this model routes topK-then-softmax: "
                    "use --router softmax_then_topk, or --hf-arch mixtral")
        if arch == "qwen3_moe" and cfg.moe_router_pre_softmax:
            return ("llama.cpp always renormalises Qwen3-MoE top-k weights, this model routes softmax-then-topK: "
                    "use --router topk_then_softmax")
        if arch == "qwen3_moe" and partial:
            return "llama.cpp cannot convert Qwen3-MoE dense layers (mlp_only_layers): upcycle every layer"
    if engine == "sglang" and arch == "qwen2_moe" and partial:
        return "SGLang builds every Qwen2-MoE layer as MoE (it ignores mlp_only_layers): upcycle every layer"
    return None


def hf_arch_problem(cfg: GPTConfig, arch: str) -> str | None:
    """One-line refusal, naming the targets that would work, when `arch` cannot represent `cfg` exactly."""
    if arch not in MOE_ARCHS:
        return f"unknown hf_arch '{arch}': use one of {', '.join(MOE_ARCHS)}"
    problem = hf_target_problem(cfg, arch)
    if problem:
        ok = [a for a in MOE_ARCHS if hf_target_problem(cfg, a) is None]
        fix = f"use hf_arch={' or '.join(ok)}" if ok else "no Hugging Face MoE target can; write .nemo or megatron"
        return f"hf_arch={arch} cannot represent this model exactly: {problem}; {fix}"
    return None


def _rope_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """transformers 5's rope_parameters, plus the older rope_theta / rope_scaling that transformers-4 based
    servers read (both say the same; transformers 5 accepts the pair)."""
    kind = cfg.rope_scaling_type
    params: dict[str, Any] = {"rope_type": kind or "default", "rope_theta": cfg.rotary_base}
    if kind:
        params["factor"] = cfg.rope_scaling_factor
    if kind == "llama3":
        params.update(original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
                      low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    elif kind == "yarn":
        params.update(original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
                      beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
        if cfg.rope_attention_factor is not None:
            params["attention_factor"] = cfg.rope_attention_factor
    out: dict[str, Any] = {"rope_parameters": params, "rope_theta": cfg.rotary_base}
    if kind:
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def hf_moe_config(cfg: GPTConfig, arch: str) -> dict[str, Any]:
    """config.json of `cfg` as Hugging Face `arch` (mixtral, qwen2_moe, qwen3_moe); refuses what it cannot hold.

    The router maps exactly: softmax-then-topK is norm_topk_prob false (Qwen), topK-then-softmax is
    norm_topk_prob true or Mixtral (softmax, top-k, renormalise = softmax over the top-k logits); the weight
    scaling already lives in the expert weights. Dense layers are listed in mlp_only_layers.
    """
    problem = hf_arch_problem(cfg, arch)
    if problem:
        raise UpcycleError(problem)
    dense_layers = [i for i, moe in enumerate(cfg.moe_layer_pattern()) if not moe]
    out: dict[str, Any] = {
        "architectures": [FAMILIES[arch].architecture],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_length,
        "initializer_range": cfg.init_method_std,
        "rms_norm_eps": cfg.layernorm_epsilon,
        **_rope_to_hf(cfg),
        "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
        "attention_dropout": 0.0,
        "num_experts_per_tok": cfg.moe_router_topk,
        "router_aux_loss_coef": cfg.moe_aux_loss_coeff,
        "output_router_logits": False,
        "use_cache": True,
    }
    if arch == "mixtral":
        out.update(num_local_experts=cfg.num_moe_experts, intermediate_size=cfg.expert_ffn_hidden_size,
                   sliding_window=None, router_jitter_noise=0.0)
        return out
    out.update(num_experts=cfg.num_moe_experts, moe_intermediate_size=cfg.expert_ffn_hidden_size,
               intermediate_size=cfg.ffn_hidden_size, norm_topk_prob=not cfg.moe_router_pre_softmax,
               decoder_sparse_step=1, mlp_only_layers=dense_layers, use_sliding_window=False,
               sliding_window=None, max_window_layers=cfg.num_layers)
    if arch == "qwen2_moe":
        shared = cfg.moe_shared_expert_intermediate_size or cfg.expert_ffn_hidden_size  # none: an all-zero one
        out.update(qkv_bias=True, shared_expert_intermediate_size=shared)
    else:
        out["attention_bias"] = False
    return out
