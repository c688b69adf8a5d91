"""The recipe applied to Megatron-named tensors: one layer's MLP at a time (what the streaming converter
calls), or a whole in-memory state dict (the demo, tests, and `from_dense`). No file I/O here."""

from __future__ import annotations

import torch

from nemo_upcycle.activations import get_activation
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.keys import layer_index, unstack_experts
from nemo_upcycle.recipe.config import UpcycleConfig
from nemo_upcycle.recipe.experts import MLPWeights, init_router, upcycle_mlp

DENSE_MLP_KEYS = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias")


def moe_config(dense: GPTConfig, recipe: UpcycleConfig) -> GPTConfig:
    """The upcycled model's config: the dense one plus the recipe's MoE fields."""
    if dense.is_moe:
        raise UpcycleError(
            f"the input is already an MoE model ({dense.num_moe_experts} experts): upcycle a dense checkpoint"
        )
    return dense.replace(**recipe.megatron_moe_fields(dense.ffn_hidden_size, dense.num_layers))


def upcycle_layer_mlp(mlp: dict[str, torch.Tensor], dense: GPTConfig, recipe: UpcycleConfig, layer: int,
                      router_direction: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One layer's dense MLP tensors (keys `mlp.linear_fc1.weight`, ...) -> its router and stacked experts
    (`mlp.router.weight` [N, H], `mlp.experts.linear_fc1.weight` [N, F_e(x2), H], ...). `router_direction`: the
    layer's calibrated direction (recipe.calibration), needed by router_init=calibrated."""
    experts = upcycle_mlp(
        MLPWeights(
            fc1_weight=mlp["mlp.linear_fc1.weight"],
            fc2_weight=mlp["mlp.linear_fc2.weight"],
            fc1_bias=mlp.get("mlp.linear_fc1.bias"),
            fc2_bias=mlp.get("mlp.linear_fc2.bias"),
        ),
        recipe,
        get_activation(dense.activation),
        layer,
    )
    std = recipe.router_init_std or dense.init_method_std
    out = {
        "mlp.router.weight": init_router(recipe, dense.hidden_size, std, layer, experts.fc1_weight.dtype,
                                          router_direction),
        "mlp.experts.linear_fc1.weight": experts.fc1_weight,
        "mlp.experts.linear_fc2.weight": experts.fc2_weight,
    }
    if dense.bias:  # Megatron's router has a bias with add_bias_linear; zero keeps the virtual groups tied
        out["mlp.router.bias"] = torch.zeros(recipe.num_experts, dtype=experts.fc1_weight.dtype)
    if recipe.shared_expert:  # the dense MLP, unchanged; its zero gate gives sigmoid(0) = 1/2 at step 0
        out["mlp.shared_experts.linear_fc1.weight"] = mlp["mlp.linear_fc1.weight"]
        out["mlp.shared_experts.linear_fc2.weight"] = mlp["mlp.linear_fc2.weight"]
        out["mlp.shared_experts.gate_weight"] = torch.zeros(1, dense.hidden_size, dtype=experts.fc1_weight.dtype)
    if experts.fc1_bias is not None:
        out["mlp.experts.linear_fc1.bias"] = experts.fc1_bias
    if experts.fc2_bias is not None:
        out["mlp.experts.linear_fc2.bias"] = experts.fc2_bias
    return out


def upcycle_state_dict(dense_sd: dict[str, torch.Tensor], dense: GPTConfig, recipe: UpcycleConfig,
                       tokenizer=None) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """A dense reference-model (local-spec) state dict -> (MoE config, MoE state dict with per-expert keys).
    `tokenizer`: the model's, for the calibration text of router_init=calibrated (random tokens without)."""
    from nemo_upcycle.recipe.calibration import directions_from_state_dict

    moe = moe_config(dense, recipe)
    directions = directions_from_state_dict(dense_sd, dense, recipe, tokenizer) or {}
    pattern = moe.moe_layer_pattern()
    out: dict[str, torch.Tensor] = {}
    layer_mlps: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in dense_sd.items():
        i = layer_index(key)
        rest = key.split(f"layers.{i}.", 1)[1] if i is not None else None
        if i is not None and pattern[i] and rest in DENSE_MLP_KEYS:
            layer_mlps.setdefault(i, {})[rest] = value
        else:
            out[key] = value
    for i, mlp in sorted(layer_mlps.items()):
        prefix = next(k for k in dense_sd if layer_index(k) == i).split(f"layers.{i}.")[0] + f"layers.{i}."
        out.update({prefix + k: v for k, v in upcycle_layer_mlp(mlp, dense, recipe, i, directions.get(i)).items()})
    return moe, unstack_experts(out)
