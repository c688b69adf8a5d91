"""Step-0 verification of an upcycled checkpoint against its dense source, with the reference model.

The recipe's guarantee, checked per MoE layer on the dense model's own hidden states: with virtual-group
routers every token selects whole copies of the dense MLP, so

    moe(x) = (s / G) * (sum of the token's routing weights) * dense(x)

exactly (s the weight-scaling factor). That identity covers every router type (it is dense(x) itself for
topK-then-softmax) and fails for a lost, duplicated, mis-ordered or mis-scaled expert. It does not hold by design
for Drop-Upcycling, random router init or the approximate `megatron` scaling of non-homogeneous MLPs; those
conversions are reported without a pass/fail verdict. Logit differences and losses are reported always.
"""

from __future__ import annotations

from typing import Any

import torch

from nemo_upcycle.activations import get_activation
from nemo_upcycle.checkpoint.base import CheckpointReader
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.keys import layer_index, unstack_experts
from nemo_upcycle.models.reference import GPTModel, MoELayer, lm_loss
from nemo_upcycle.recipe import UpcycleConfig, scaling_factors

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _truncated(cfg: GPTConfig, n: int) -> GPTConfig:
    freq = cfg.moe_layer_freq
    if isinstance(freq, tuple):
        freq = freq[:n]
    return cfg.replace(num_layers=n, moe_layer_freq=freq)


def _load(reader: CheckpointReader, n: int) -> GPTModel:
    cfg = _truncated(reader.config, n)
    names = [k for k in reader.tensors() if layer_index(k) is None or layer_index(k) < n]
    model = GPTModel(cfg).eval()
    sd = unstack_experts(reader.read(names))
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
    return model


def identity_holds(recipe: UpcycleConfig, activation: str) -> bool:
    """Whether the per-layer identity is a guarantee for this recipe (see the module docstring)."""
    return (recipe.router_init == "virtual_group" and recipe.drop_ratio == 0
            and scaling_factors(recipe, get_activation(activation)).exact)


@torch.no_grad()
def verify_conversion(dense_reader: CheckpointReader, moe_reader: CheckpointReader, recipe: UpcycleConfig,
                      layers: int = 0, batch: int = 4, seq: int = 64, seed: int = 0) -> dict[str, Any]:
    """Compare the first `layers` layers (0 = all) of both checkpoints on `batch` random sequences."""
    n = dense_reader.config.num_layers if layers <= 0 else min(layers, dense_reader.config.num_layers)
    dense, moe = _load(dense_reader, n), _load(moe_reader, n)
    dtype = next(iter(dense_reader.tensors().values())).dtype
    tokens = torch.randint(0, dense.config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))

    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0]))
             for i, layer in enumerate(dense.decoder.layers)]
    dense_logits = dense(tokens[:, :-1]).logits
    for h in hooks:
        h.remove()
    moe_logits = moe(tokens[:, :-1]).logits

    worst = 0.0
    for i, layer in enumerate(moe.decoder.layers):
        if not isinstance(layer.mlp, MoELayer):
            continue
        x = captured[i]
        got = layer.mlp(x)
        weight_sum = layer.mlp.last_routing.weights.sum(-1).reshape(*x.shape[:-1], 1).float()
        want = recipe.scale_factor() / recipe.granularity * weight_sum * dense.decoder.layers[i].mlp(x)
        worst = max(worst, ((got - want).norm() / want.norm().clamp(min=1e-12)).item())
    tol = TOLERANCE.get(dtype, 1e-4)
    guaranteed = identity_holds(recipe, dense_reader.config.activation)
    status = ("PASSED" if worst <= tol else "FAILED") if guaranteed else "not checked (no exact guarantee)"
    return {
        "layers compared": f"{n} of {dense_reader.config.num_layers}",
        "max rel. error of MoE layer vs recipe identity": f"{worst:.2e} (tolerance {tol:g})",
        "max abs logit diff": f"{(moe_logits - dense_logits).abs().max().item():.3e}",
        "loss dense / MoE (random tokens)": f"{lm_loss(dense_logits, tokens[:, 1:]).item():.4f} / "
                                            f"{lm_loss(moe_logits, tokens[:, 1:]).item():.4f}",
        "status": status,
    }
