"""Key maps between Megatron-core's two GPT layer specs, and between per-expert and stacked expert tensors.

Local spec (our reference model)               Transformer Engine spec (NeMo, Megatron-LM on GPUs)
  layers.i.input_layernorm.weight / .bias        layers.i.self_attention.linear_qkv.layer_norm_weight / _bias
  layers.i.pre_mlp_layernorm.weight / .bias      layers.i.mlp.linear_fc1.layer_norm_weight / _bias   (dense MLP)
  layers.i.pre_mlp_layernorm.weight / .bias      layers.i.pre_mlp_layernorm.weight / .bias          (MoE layer:
                                                 TE fuses the norm into fc1 only where fc1 is one dense linear)
TE also adds `*._extra_state` entries (FP8 metadata); they carry no weights and are dropped on the way in.

Experts: the local spec keeps one module per expert (`mlp.experts.local_experts.<e>.linear_fc1.weight`);
the stacked form `mlp.experts.linear_fc1.weight` [N, ...] is what the recipe produces and what Megatron's
distributed checkpoint stores (as `mlp.experts.experts.linear_fc1.weight`).
"""

from __future__ import annotations

import re

import torch

_TE_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
_LOCAL_NORMS = {te: local for local, te in _TE_NORMS.items()}
_LAYER_KEY = re.compile(r"^(?P<prefix>.*?decoder\.layers\.\d+\.)(?P<rest>.+)$")
_LOCAL_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts\.)local_experts\.(?P<e>\d+)\.(?P<rest>.+)$")
_STACKED_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts\.)(?P<rest>linear_fc[12]\.(weight|bias))$")


def local_to_te_key(key: str, moe_layer: bool) -> str:
    """Local-spec key -> TE-spec key. `moe_layer`: whether the key's layer has an MoE MLP."""
    m = _LAYER_KEY.match(key)
    if not m:
        return key
    rest = m["rest"]
    if rest in _TE_NORMS and not (moe_layer and rest.startswith("pre_mlp_layernorm")):
        return m["prefix"] + _TE_NORMS[rest]
    return key


def te_to_local_key(key: str) -> str:
    m = _LAYER_KEY.match(key)
    if not m or m["rest"] not in _LOCAL_NORMS:
        return key
    return m["prefix"] + _LOCAL_NORMS[m["rest"]]


def is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def layer_index(key: str) -> int | None:
    """The layer number in a `...decoder.layers.<i>....` key, else None."""
    m = re.search(r"decoder\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def local_to_te(state_dict: dict[str, torch.Tensor], moe_pattern: list[bool]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        i = layer_index(k)
        out[local_to_te_key(k, i is not None and moe_pattern[i])] = v
    return out


def te_to_local(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {te_to_local_key(k): v for k, v in state_dict.items() if not is_extra_state(k)}


def stack_experts(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`...experts.local_experts.<e>.linear_fc1.weight` -> `...experts.linear_fc1.weight` [N, ...]."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for k, v in state_dict.items():
        m = _LOCAL_EXPERT.match(k)
        if m:
            groups.setdefault(m["prefix"] + m["rest"], {})[int(m["e"])] = v
        else:
            out[k] = v
    for k, per_expert in groups.items():
        out[k] = torch.stack([per_expert[e] for e in range(len(per_expert))])
    return out


def unstack_experts(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `stack_experts` (views, no copies)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        m = _STACKED_EXPERT.match(k)
        if m:
            for e, t in enumerate(v.unbind(0)):
                out[f"{m['prefix']}local_experts.{e}.{m['rest']}"] = t
        else:
            out[k] = v
    return out
