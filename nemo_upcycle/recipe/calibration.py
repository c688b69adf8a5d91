"""The `calibrated` router initialisation: router rows that keep a real model's function at step 0.

Why the paper's init fails on real models. With softmax-then-topK the MoE output is rho(x) * dense(x), where
rho(x) = s * (sum of the selected routing weights) = mean over the selected groups of exp(z_g) / mean over all
groups of exp(z_g), z_g = w_g . x the group logits. The paper sets s for p = 1/(E*G), i.e. rho = 1 for a zero
router, but top-K then always picks the LARGEST probabilities, so rho > 1 for every token whenever the logits
spread: with normal(0, 0.02) rows and the MLP inputs of SmolLM2-135M (norms 2-30) z spreads by 0.05-0.5 and
every MLP output is scaled by 1.07 or more, layer after layer (+6.9% loss, measured). Shrinking the std (1e-6)
fixes rho but not exactness: random logits that close together tie, in the float32 softmax and in bfloat16
logits, and torch.topk (transformers, Megatron) then takes experts from several groups.

The fix: every group row is one direction d scaled by a distinct multiplier m_g,

    w_g = m_g * d,   m_g = bf16(1.025 ** g),   d = sign(mu) * 2**round(log2|mu|) * c

with mu the mean of the dense model's own MLP inputs on a small calibration sample (`calibration_text.txt`
through the checkpoint's tokenizer, else random tokens) and c a power of two. Then z_g = m_g * (d . x): the
groups are ordered by m_g for every token (reversed when d . x < 0), so no two groups ever tie, in float32 and in
bfloat16 alike (m_g are 8-bit numbers and d's entries powers of two, so the bf16 rows are exactly m_g * d, and
consecutive m_g differ by more than two bf16 ulps), and c puts the calibration sample's median logit at
LOGIT_SCALE, so rho - 1 is about 1e-4 in float32 and rounds away in bfloat16 routing weights (routers that
renormalise the chosen weights, where rho = 1 for any logits, get larger logits: fewer near-ties). The router still
learns: its gradient is the usual one, only its starting point is nearly flat.

The cost: every token's group order is the same (reversed when d . x < 0), so at step 0 nearly all tokens go to
the top-multiplier group (or group 0) and the aux loss must spread them. The `balanced` init (G = 1 only, where
any set of full copies reproduces the dense MLP, so ties cannot break exactness) instead draws random rows, takes
out their component along mu (real hidden states share a large mean component, so plain random rows route by
r . mu, imbalanced too) and scales them to the same small logit scale: balanced at step 0, rho - 1 ~ 1e-3.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Callable

import torch

from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.recipe.seeds import ROUTER_STREAM, layer_generator

# Median over calibration tokens of the largest group logit |z_g|. softmax-then-topK and sigmoid top-1 scale the
# output by rho, which grows with the logits: small. topK-then-softmax and sigmoid top-T>1 renormalise the chosen
# weights (rho = 1 for any logits): large, which keeps tokens whose d . x is near zero away from ties.
LOGIT_SCALE = {"small": 1e-3, "renormalised": 1e-1}
GROUP_RATIO = 1.025  # m_g = GROUP_RATIO ** g, rounded to bfloat16
CALIBRATION_TOKENS = 384
CALIBRATED_INITS = ("calibrated", "balanced")  # router inits computed from the dense model's hidden states


def group_multipliers(groups: int) -> torch.Tensor:
    """m_g: distinct, increasing, exactly representable in bfloat16 (8 significant bits)."""
    return (GROUP_RATIO ** torch.arange(groups, dtype=torch.float64)).to(torch.bfloat16).double()


def calibration_tokens(tokenizer, vocab_size: int, length: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """(1, length) tokens: the bundled calibration text through the checkpoint's tokenizer (bos first when it
    has one), or seeded random tokens when there is no tokenizer."""
    if tokenizer is not None:
        text = resources.files("nemo_upcycle").joinpath("demo_data/calibration_text.txt").read_text()
        ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)
        ids = [i for i in ids if i < vocab_size][:length]
        if len(ids) >= 16:
            return torch.tensor([ids])
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def mlp_inputs(cfg: GPTConfig, tokens: torch.Tensor, embedding: torch.Tensor,
               layer_tensors: Callable[[int], dict[str, torch.Tensor]], wanted: set[int]):
    """Yield (layer, MLP input [tokens, H]) of the dense model for the layers in `wanted`, computed one layer at
    a time in float32 (`layer_tensors(i)`: layer i's tensors, names relative to the layer)."""
    from nemo_upcycle.models.reference import TransformerLayer, rope_cos_sin

    cos, sin = rope_cos_sin(cfg, tokens.shape[1], tokens.device)
    x = torch.nn.functional.embedding(tokens, embedding.float())
    for i in range(max(wanted) + 1):
        with torch.device("meta"):  # no random init of weights about to be replaced (0.4 s a layer at H=2048)
            layer = TransformerLayer(cfg, moe=False)
        layer.load_state_dict({k: v.float() for k, v in layer_tensors(i).items()}, assign=True)
        h = x + layer.self_attention(layer.input_layernorm(x), cos, sin)
        mlp_in = layer.pre_mlp_layernorm(h)
        if i in wanted:
            yield i, mlp_in.reshape(-1, cfg.hidden_size)
        x = h + layer.mlp(mlp_in)


def logit_scale(recipe) -> float:
    renormalised = recipe.router == "topk_then_softmax" or (recipe.router == "sigmoid" and recipe.topk > 1)
    return LOGIT_SCALE["renormalised" if renormalised else "small"]


def router_direction(hidden: torch.Tensor, groups: int, scale: float) -> torch.Tensor:
    """d for one layer from its calibration MLP inputs [tokens, H]: powers of two times a power of two, in fp32."""
    mu = hidden.double().mean(0)
    nonzero = mu != 0
    d = torch.zeros_like(mu)
    d[nonzero] = torch.sign(mu[nonzero]) * 2.0 ** torch.round(torch.log2(mu[nonzero].abs()))
    tau = (hidden.double() @ d).abs().median().item()
    if tau == 0 or not math.isfinite(tau):
        return torch.zeros_like(mu, dtype=torch.float32)
    m_max = group_multipliers(groups)[-1].item()
    c = 2.0 ** round(math.log2(scale / (m_max * tau)))
    return (d * c).float()


def balanced_rows(hidden: torch.Tensor, experts: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """[experts, H] random rows orthogonal to the mean MLP input, scaled so the calibration tokens' median
    largest |logit| is `scale` (the `balanced` init, see the module docstring)."""
    h = hidden.double()
    mu = h.mean(0)
    rows = torch.empty(experts, h.shape[1], dtype=torch.float64).normal_(generator=generator)
    if mu.norm() > 0:
        u = mu / mu.norm()
        rows -= (rows @ u)[:, None] * u[None, :]
    tau = (h @ rows.T).abs().max(dim=1).values.median().item()
    if tau == 0 or not math.isfinite(tau):
        return torch.zeros(experts, h.shape[1])
    return (rows * (scale / tau)).float()


def calibrated_directions(cfg: GPTConfig, recipe, tokens: torch.Tensor, embedding: torch.Tensor,
                          layer_tensors: Callable[[int], dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Per MoE layer of `recipe`: d [H] (calibrated) or the router rows [E, H] (balanced); see the module
    docstring."""
    layers = [i for i, moe in enumerate(recipe.moe_layer_pattern(cfg.num_layers)) if moe]
    if not layers:
        return {}
    scale = logit_scale(recipe)

    def rows(i: int, hidden: torch.Tensor) -> torch.Tensor:
        if recipe.router_init == "balanced":
            return balanced_rows(hidden, recipe.num_experts, scale, layer_generator(recipe.seed, i, ROUTER_STREAM))
        return router_direction(hidden, recipe.expansion, scale)

    return {i: rows(i, h) for i, h in mlp_inputs(cfg, tokens, embedding, layer_tensors, set(layers))}


def reader_tokenizer(reader):
    """The checkpoint's tokenizer, or None when it has none or it cannot be loaded here."""
    from nemo_upcycle.checkpoint import load_tokenizer_of
    from nemo_upcycle.errors import UpcycleError

    if reader.tokenizer is None:
        return None
    try:
        return load_tokenizer_of(reader)
    except UpcycleError:
        return None


def directions_from_reader(reader, recipe) -> dict[int, torch.Tensor] | None:
    """Calibrated directions for every MoE layer of `recipe` applied to the checkpoint `reader` (one extra pass
    over the dense layers, one at a time); None when the recipe's router init needs no calibration."""
    if recipe.router_init not in CALIBRATED_INITS:
        return None
    cfg = reader.config
    tokenizer = reader_tokenizer(reader)
    embedding = reader.read(["embedding.word_embeddings.weight"])["embedding.word_embeddings.weight"]

    def layer_tensors(i: int) -> dict[str, torch.Tensor]:
        prefix = f"decoder.layers.{i}."
        return {k[len(prefix):]: v for k, v in reader.read(reader.layer_names(i)).items()}

    tokens = calibration_tokens(tokenizer, cfg.vocab_size)
    return calibrated_directions(cfg, recipe, tokens, embedding, layer_tensors)


def directions_from_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig, recipe,
                               tokenizer=None) -> dict[int, torch.Tensor] | None:
    """As `directions_from_reader`, for an in-memory dense state dict (local-spec names)."""
    if recipe.router_init not in CALIBRATED_INITS:
        return None
    def layer_tensors(i: int) -> dict[str, torch.Tensor]:
        prefix = f"decoder.layers.{i}."
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    tokens = calibration_tokens(tokenizer, cfg.vocab_size)
    return calibrated_directions(cfg, recipe, tokens, sd["embedding.word_embeddings.weight"], layer_tensors)
