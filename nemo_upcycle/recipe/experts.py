"""Dense MLP -> experts: sharding (granularity), tiling (expansion), weight scaling and Drop-Upcycling.

Layouts are Megatron's. A dense MLP has fc1 [F, H] (gated: [2F, H] = [gate; up]) and fc2 [H, F]; experts carry a
leading expert axis N = E*G: fc1 [N, F/G, H] (gated [N, 2F/G, H] = [gate shard; up shard]), fc2 [N, H, F/G],
which is also how Megatron's distributed checkpoint stores them.

Why the output is preserved. Split F into G shards: dense(x) = sum_j fc2[:, j] act(fc1[j] x + b1[j]) + b2.
Expert k holds shard k mod G, so each "virtual group" of G consecutive experts is one whole copy of the dense
MLP. With weight factor s applied exactly (below), a group sums to s * dense(x), bias included, which
`UpcycleConfig.scale_factor` chooses so that the routed sum equals dense(x) at step 0.

Biases:
  fc1 bias  is split with the fc1 rows it belongs to, and scaled with them (gate half with the gate factor,
            up half with the up factor), which keeps the homogeneity argument exact.
  fc2 bias  is added once per selected expert (Megatron multiplies it by the routing weight like the rest of
            the expert output), so each expert gets b2 * s / G: a group of G experts then adds s * b2.
            (Megatron's upcycling_utils copies b2 unchanged, which is only right when s = G.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from nemo_upcycle.activations import Activation
from nemo_upcycle.recipe.config import UpcycleConfig
from nemo_upcycle.recipe.seeds import DROP_STREAM, ROUTER_STREAM, layer_generator


@dataclass
class MLPWeights:
    """One MLP's tensors (dense), or all experts' tensors stacked on a leading axis."""

    fc1_weight: torch.Tensor
    fc2_weight: torch.Tensor
    fc1_bias: torch.Tensor | None = None
    fc2_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class ScalingFactors:
    """Multipliers for each part of every expert; together they scale the expert output by s (or about s)."""

    gate: float  # fc1's gate half, gated MLPs only
    fc1: float  # fc1 of a plain MLP, or fc1's up half of a gated one
    fc2: float
    fc2_bias: float
    exact: bool  # True when the expert output is exactly s times the shard's output


def scaling_exponents(activation: Activation, method: str) -> tuple[Fraction, Fraction, Fraction]:
    """Exponents (gate, fc1/up, fc2) with factor = s ** exponent, derived from homogeneity.

    homogeneous (default): s is spread equally over the largest set of weights in which the MLP output is
    positively homogeneous, which makes it exact for every activation:
      plain MLP, activation of degree d (ReLU 1, squared ReLU 2): the output has degree d+1 in (fc1, fc2)
          jointly -> both by s^(1/(d+1)): squared ReLU s^(1/3) (the paper's cbrt), ReLU s^(1/2).
      gated MLP, any gate activation: output = fc2(act(gate x) * up x) is linear in up and in fc2
          -> up and fc2 by s^(1/2), gate untouched (exact for SwiGLU/GeGLU, unlike scaling the gate).
      plain GeLU/SiLU: no degree exists, the output is homogeneous in fc2 alone -> fc2 by s.
    megatron: Megatron-LM upcycling_utils' exponents: s^(1/3) on all of fc1 and fc2 for gated and
      squared-ReLU MLPs, s^(1/2) on fc1 and fc2 otherwise. Exact for squared ReLU, ReLU and ReGLU only;
      for GeLU/SiLU (treated as if ReLU-like) the measured error of an expert group against s * dense is
      14-39% of the output at pre-activation scales 0.1-1 (tests/unit/test_experts.py), for SwiGLU smaller.
    fc2: all of s on fc2, exact for every activation (the paper found it trains worse than spreading s).
    """
    zero, half, third = Fraction(0), Fraction(1, 2), Fraction(1, 3)
    if method == "fc2":
        return zero, zero, Fraction(1)
    if method == "megatron":
        if activation.gated or activation.name == "squared-relu":
            return third, third, third
        return zero, half, half
    if activation.gated:
        return zero, half, half
    if activation.degree is None:
        return zero, zero, Fraction(1)
    e = Fraction(1, activation.degree + 1)
    return zero, e, e


def is_exact(activation: Activation, exponents: tuple[Fraction, Fraction, Fraction]) -> bool:
    """Whether scaling the parts by s**exponents scales the MLP output by exactly s (positive homogeneity)."""
    e_gate, e_fc1, e_fc2 = exponents
    d = activation.degree
    if activation.gated:
        if e_gate and d is None:
            return False
        return (d * e_gate if e_gate else 0) + e_fc1 + e_fc2 == 1
    if e_fc1 and d is None:
        return False
    return (d * e_fc1 if e_fc1 else 0) + e_fc2 == 1


def scaling_factors(recipe: UpcycleConfig, activation: Activation) -> ScalingFactors:
    """The factors s**exponents, or, when s is a power of two and the exponents are exact, a power-of-two split
    of s with the same product (`power_of_two_split`): exact in bfloat16 as in float32."""
    s = recipe.scale_factor()
    exps = scaling_exponents(activation, recipe.scaling_method)
    exact = is_exact(activation, exps)
    split = (power_of_two_split(s, activation, exps)
             if exact and activation.gated and recipe.scaling_method == "homogeneous" else None)
    gate, fc1, fc2 = split or tuple(s ** float(e) for e in exps)
    return ScalingFactors(gate=gate, fc1=fc1, fc2=fc2, fc2_bias=s / recipe.granularity, exact=exact)


def power_of_two_split(s: float, activation: Activation,
                       exps: tuple[Fraction, Fraction, Fraction]) -> tuple[float, float, float] | None:
    """For s = 2**k: factors 2**k_gate, 2**k_fc1, 2**k_fc2 with integer exponents nearest k * exps whose
    product on the output is still exactly s (the homogeneity degrees of `is_exact`), so every scaled weight
    is its dense value times a power of two, which no dtype rounds (sqrt(8) on two bf16 tensors does: E8G8T8
    topK-then-softmax from a bf16 Llama gave logit errors of 6e-3). None when s is not a power of two. Used by the homogeneous method; megatron keeps Megatron-LM's own factors."""
    k = math.log2(s) if s > 0 else 0.5
    if k != round(k):
        return None
    k = round(k)
    d = activation.degree
    e_gate, e_fc1, e_fc2 = exps
    k_gate = round(k * e_gate) if e_gate else 0
    k_fc1 = round(k * e_fc1) if e_fc1 else 0
    inner = (d * k_gate if e_gate else 0) if activation.gated else 0
    k_fc2 = k - inner - (k_fc1 if activation.gated else (d or 1) * k_fc1)
    if not e_fc2 and k_fc2:
        return None  # s cannot be moved onto fc2 by this method
    return 2.0 ** k_gate, 2.0 ** k_fc1, 2.0 ** k_fc2


def shard_dense_mlp(dense: MLPWeights, granularity: int, gated: bool) -> MLPWeights:
    """Split a dense MLP along its FFN dimension into G shards (views where possible): leading axis G.

    Gated MLPs split the gate and the up halves separately and pair shard j of each, so every shard is itself
    a gated MLP: fc1 shard j = [gate rows j; up rows j].
    """
    g = granularity
    hidden = dense.fc2_weight.shape[0]

    def split_rows(t: torch.Tensor) -> torch.Tensor:  # [F, ...] -> [G, F/G, ...]
        return t.reshape(g, t.shape[0] // g, *t.shape[1:])

    def split_fc1(t: torch.Tensor) -> torch.Tensor:
        if not gated:
            return split_rows(t)
        gate, up = t.chunk(2, dim=0)
        return torch.cat([split_rows(gate), split_rows(up)], dim=1)

    fc2 = dense.fc2_weight.reshape(hidden, g, -1).transpose(0, 1)  # [H, F] -> [G, H, F/G]
    return MLPWeights(
        fc1_weight=split_fc1(dense.fc1_weight),
        fc2_weight=fc2,
        fc1_bias=None if dense.fc1_bias is None else split_fc1(dense.fc1_bias),
        fc2_bias=None if dense.fc2_bias is None else dense.fc2_bias.expand(g, hidden),
    )


def upcycle_mlp(dense: MLPWeights, recipe: UpcycleConfig, activation: Activation, layer: int = 0) -> MLPWeights:
    """The E*G experts of one layer, stacked on a leading axis (expert k = dense shard k mod G, scaled).

    The dense tensors are never modified. Output dtype = input dtype (scaling rounds once).
    """
    recipe.check_ffn_hidden_size(dense.fc2_weight.shape[1])
    shards = shard_dense_mlp(dense, recipe.granularity, activation.gated)
    e = recipe.expansion
    experts = MLPWeights(
        fc1_weight=shards.fc1_weight.repeat(e, 1, 1),
        fc2_weight=shards.fc2_weight.repeat(e, 1, 1),
        fc1_bias=None if shards.fc1_bias is None else shards.fc1_bias.repeat(e, 1),
        fc2_bias=None if shards.fc2_bias is None else shards.fc2_bias.repeat(e, 1),
    )
    if recipe.drop_ratio:
        drop_upcycle_(experts, recipe.drop_ratio, activation.gated, layer_generator(recipe.seed, layer, DROP_STREAM))
    scale_experts_(experts, scaling_factors(recipe, activation), activation.gated)
    return experts


def scale_experts_(experts: MLPWeights, f: ScalingFactors, gated: bool) -> None:
    """Apply the weight-scaling factors in place to freshly built expert tensors."""

    def scale_fc1(t: torch.Tensor) -> None:  # weight [N, rows, H] or bias [N, rows]
        if gated:
            gate, up = t.chunk(2, dim=1)
            if f.gate != 1.0:
                gate.mul_(f.gate)
            if f.fc1 != 1.0:
                up.mul_(f.fc1)
        elif f.fc1 != 1.0:
            t.mul_(f.fc1)

    scale_fc1(experts.fc1_weight)
    if experts.fc1_bias is not None:
        scale_fc1(experts.fc1_bias)
    if f.fc2 != 1.0:
        experts.fc2_weight.mul_(f.fc2)
    if experts.fc2_bias is not None and f.fc2_bias != 1.0:
        experts.fc2_bias.mul_(f.fc2_bias)


def drop_upcycle_(experts: MLPWeights, ratio: float, gated: bool, generator: torch.Generator) -> None:
    """Drop-Upcycling: in each expert, re-initialise round(ratio * F_e) random FFN neurons in place.

    A neuron j is fc1 row j (gated: gate row j and up row j) with its fc1 bias entry, and fc2 column j. Each
    re-initialised block is drawn from a normal with the mean and std of the values it replaces, so the
    experts diverge while the layer's weight statistics stay those of the dense model.
    """
    n, _, f = experts.fc2_weight.shape
    k = round(ratio * f)
    for e in range(n):
        idx = torch.randperm(f, generator=generator)[:k]
        fc1_rows = [idx, idx + f] if gated else [idx]
        for rows in fc1_rows:
            _reinit_(experts.fc1_weight[e], rows, 0, generator)
            if experts.fc1_bias is not None:
                _reinit_(experts.fc1_bias[e], rows, 0, generator)
        _reinit_(experts.fc2_weight[e], idx, 1, generator)


def _reinit_(t: torch.Tensor, idx: torch.Tensor, dim: int, generator: torch.Generator) -> None:
    dropped = t.index_select(dim, idx).float()
    mean, std = dropped.mean().item(), dropped.std(unbiased=False).item()
    fresh = torch.empty(dropped.shape).normal_(mean, std, generator=generator)
    t.index_copy_(dim, idx, fresh.to(t.dtype))


def init_router(recipe: UpcycleConfig, hidden_size: int, std: float, layer: int = 0,
                dtype: torch.dtype = torch.float32, direction: torch.Tensor | None = None) -> torch.Tensor:
    """Router weight [E*G, H] for one layer.

    calibrated: group g's row is m_g * `direction` (recipe.calibration: ordered groups, no ties, rho ~ 1);
    balanced (G = 1): `direction` holds the E rows themselves (recipe.calibration.balanced_rows);
    virtual_group: the paper's E normal(0, std) rows; random: E*G normal(0, std) rows, seeded per layer.
    In both virtual-group inits each row is repeated G times consecutively, so experts g*G .. g*G+G-1 (one whole
    copy of the dense MLP) always score the same and top-T (T a multiple of G) selects whole copies.
    """
    if recipe.router_init == "calibrated":
        from nemo_upcycle.recipe.calibration import group_multipliers

        if direction is None:
            raise ValueError("router_init=calibrated needs the layer's calibrated direction")
        base = group_multipliers(recipe.expansion)[:, None].float() * direction.float()[None, :]
        return virtual_group_rows(base, recipe.granularity).to(dtype)
    if recipe.router_init == "balanced":
        if direction is None:
            raise ValueError("router_init=balanced needs the layer's calibrated rows")
        return direction.to(dtype)
    gen = layer_generator(recipe.seed, layer, ROUTER_STREAM)
    rows = recipe.expansion if recipe.router_init == "virtual_group" else recipe.num_experts
    base = torch.empty(rows, hidden_size).normal_(0.0, std, generator=gen)
    if recipe.router_init == "virtual_group":
        base = virtual_group_rows(base, recipe.granularity)
    return base.to(dtype)


def virtual_group_rows(base: torch.Tensor, granularity: int) -> torch.Tensor:
    """[E, H] -> [E*G, H]: row g repeated G times consecutively (experts g*G .. g*G+G-1 share it)."""
    return base.repeat_interleave(granularity, dim=0)
