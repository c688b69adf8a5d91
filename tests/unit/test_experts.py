"""Expert construction: sharding, tiling, biases, weight scaling by homogeneity, router init, Drop-Upcycling,
and agreement with Megatron-LM's own `upcycling_utils.upcycle_state_dict`."""

from __future__ import annotations

import pytest
import torch

from nemo_upcycle.activations import ACTIVATIONS, Activation, get_activation
from nemo_upcycle.recipe import MLPWeights, UpcycleConfig, init_router, scaling_factors, upcycle_mlp
from nemo_upcycle.recipe.experts import shard_dense_mlp, virtual_group_rows
from tests.conftest import random_model, small_config

H, F = 16, 32


def dense_mlp(act: Activation, bias: bool, seed: int = 0) -> MLPWeights:
    g = torch.Generator().manual_seed(seed)
    rows = 2 * F if act.gated else F
    return MLPWeights(
        fc1_weight=torch.randn(rows, H, generator=g) * 0.3,
        fc2_weight=torch.randn(H, F, generator=g) * 0.3,
        fc1_bias=torch.randn(rows, generator=g) * 0.3 if bias else None,
        fc2_bias=torch.randn(H, generator=g) * 0.3 if bias else None,
    )


def expert(w: MLPWeights, k: int) -> MLPWeights:
    return MLPWeights(w.fc1_weight[k], w.fc2_weight[k],
                      None if w.fc1_bias is None else w.fc1_bias[k],
                      None if w.fc2_bias is None else w.fc2_bias[k])


def mlp_out(w: MLPWeights, x: torch.Tensor, act: Activation) -> torch.Tensor:
    h = torch.nn.functional.linear(x, w.fc1_weight, w.fc1_bias)
    if act.gated:
        gate, up = h.chunk(2, dim=-1)
        h = act.fn(gate) * up
    else:
        h = act.fn(h)
    return torch.nn.functional.linear(h, w.fc2_weight, w.fc2_bias)


def group_sum(experts: MLPWeights, group: int, g: int, x: torch.Tensor, act: Activation) -> torch.Tensor:
    return sum(mlp_out(expert(experts, k), x, act) for k in range(group * g, group * g + g))


X = torch.randn(64, H, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_shards_of_a_dense_mlp_sum_to_it(name):
    act = get_activation(name)
    dense = dense_mlp(act, bias=True)
    shards = shard_dense_mlp(dense, 4, act.gated)
    assert shards.fc1_weight.shape == (4, (2 if act.gated else 1) * F // 4, H)
    assert shards.fc2_weight.shape == (4, H, F // 4)
    no_b2 = MLPWeights(shards.fc1_weight, shards.fc2_weight, shards.fc1_bias, None)
    total = sum(mlp_out(expert(no_b2, j), X, act) for j in range(4)) + dense.fc2_bias
    torch.testing.assert_close(total, mlp_out(dense, X, act), rtol=1e-5, atol=1e-5)


def test_gated_shards_pair_gate_rows_with_up_rows():
    act = get_activation("swiglu")
    dense = dense_mlp(act, bias=True)
    shards = shard_dense_mlp(dense, 4, gated=True)
    fe = F // 4
    for j in range(4):
        torch.testing.assert_close(shards.fc1_weight[j, :fe], dense.fc1_weight[j * fe:(j + 1) * fe])
        torch.testing.assert_close(shards.fc1_weight[j, fe:], dense.fc1_weight[F + j * fe:F + (j + 1) * fe])
        torch.testing.assert_close(shards.fc1_bias[j, fe:], dense.fc1_bias[F + j * fe:F + (j + 1) * fe])
        torch.testing.assert_close(shards.fc2_weight[j], dense.fc2_weight[:, j * fe:(j + 1) * fe])


def test_expert_k_holds_shard_k_mod_g_and_input_is_untouched():
    act = get_activation("squared-relu")
    dense = dense_mlp(act, bias=True)
    before = [t.clone() for t in (dense.fc1_weight, dense.fc2_weight, dense.fc1_bias, dense.fc2_bias)]
    recipe = UpcycleConfig.from_shorthand("E3G4T4", weight_scaling="off")
    experts = upcycle_mlp(dense, recipe, act)
    shards = shard_dense_mlp(dense, 4, gated=False)
    assert experts.fc1_weight.shape == (12, F // 4, H)
    for k in range(12):
        torch.testing.assert_close(experts.fc1_weight[k], shards.fc1_weight[k % 4])
        torch.testing.assert_close(experts.fc2_weight[k], shards.fc2_weight[k % 4])
        torch.testing.assert_close(experts.fc1_bias[k], shards.fc1_bias[k % 4])
    for t, b in zip((dense.fc1_weight, dense.fc2_weight, dense.fc1_bias, dense.fc2_bias), before):
        assert torch.equal(t, b)


def test_bias_rules():
    """fc1 bias: split with its rows and scaled like them. fc2 bias: b2 * s / G per expert."""
    act = get_activation("squared-relu")
    dense = dense_mlp(act, bias=True)
    recipe = UpcycleConfig.from_shorthand("E8G4T4")  # softmax_then_topk: s = 8*16/4 = 32
    experts = upcycle_mlp(dense, recipe, act)
    f = scaling_factors(recipe, act)
    # squared ReLU keeps s^(1/3) on both (as Megatron); the power-of-two split is for gated MLPs
    assert f.fc1 == pytest.approx(32 ** (1 / 3)) and f.fc2_bias == pytest.approx(32 / 4)
    torch.testing.assert_close(experts.fc1_bias[5], dense.fc1_bias[8:16] * f.fc1)
    torch.testing.assert_close(experts.fc2_bias[5], dense.fc2_bias * 8.0)
    # gated: gate half unscaled, up half scaled (homogeneous method)
    act = get_activation("swiglu")
    dense = dense_mlp(act, bias=True)
    experts = upcycle_mlp(dense, recipe, act)
    f = scaling_factors(recipe, act)
    torch.testing.assert_close(experts.fc1_bias[1, :8], dense.fc1_bias[8:16])
    torch.testing.assert_close(experts.fc1_bias[1, 8:], dense.fc1_bias[F + 8:F + 16] * f.fc1)


@pytest.mark.parametrize("method", ["homogeneous", "megatron", "fc2"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_each_virtual_group_sums_to_s_times_dense_exactly_when_claimed(name, method):
    """The exactness claim is derived from homogeneity; check it both ways, biases included."""
    act = get_activation(name)
    dense = dense_mlp(act, bias=True)
    recipe = UpcycleConfig.from_shorthand("E2G4T4", scaling_method=method)
    s = recipe.scale_factor()
    experts = upcycle_mlp(dense, recipe, act)
    want = s * mlp_out(dense, X, act)
    rel = ((group_sum(experts, 1, 4, X, act) - want).norm() / want.norm()).item()
    if scaling_factors(recipe, act).exact:
        assert rel < 1e-5, f"{name}/{method} claimed exact but is off by {rel:.2e}"
    else:
        assert rel > 1e-3, f"{name}/{method} claimed approximate but is exact"


def test_exactness_table():
    """Homogeneous scaling (the default) is exact for every activation; Megatron's exponents only for
    squared ReLU, ReLU and ReGLU; fc2-only for everything."""
    r = UpcycleConfig.from_shorthand("E8G8T8")
    exact = {m: {n for n, a in ACTIVATIONS.items() if scaling_factors(r.replace(scaling_method=m), a).exact}
             for m in ("homogeneous", "megatron", "fc2")}
    assert exact["homogeneous"] == set(ACTIVATIONS)
    assert exact["megatron"] == {"squared-relu", "relu", "reglu"}
    assert exact["fc2"] == set(ACTIVATIONS)


@pytest.mark.parametrize("name, preact_std, low, high", [
    ("gelu", 0.1, 0.20, 0.28), ("gelu", 1.0, 0.14, 0.21), ("silu", 0.1, 0.12, 0.20), ("silu", 1.0, 0.23, 0.32),
])
def test_megatron_sqrt_scaling_of_plain_gelu_silu_is_approximate(name, preact_std, low, high, record_property):
    """Megatron spreads s as sqrt(s) on fc1 and fc2 of a plain GeLU/SiLU MLP, as if the activation were
    ReLU-like. Measured for E8G8T8 with topK-then-softmax (s = 8): an expert group's output is off from
    s * dense by the relative error asserted here (documented in scaling_exponents); our default puts s
    on fc2 alone for these activations, which is exact."""
    act = get_activation(name)
    g = torch.Generator().manual_seed(3)
    dense = MLPWeights(torch.randn(F, H, generator=g) * preact_std / H**0.5, torch.randn(H, F, generator=g) * 0.02)
    recipe = UpcycleConfig.from_shorthand("E8G8T8", router="topk_then_softmax")
    x = torch.randn(256, H, generator=g)
    want = recipe.scale_factor() * mlp_out(dense, x, act)

    def rel_error(method: str) -> float:
        experts = upcycle_mlp(dense, recipe.replace(scaling_method=method), act)
        return ((group_sum(experts, 0, 8, x, act) - want).norm() / want.norm()).item()

    rel = rel_error("megatron")
    record_property("relative_error", rel)
    assert low < rel < high
    assert rel_error("homogeneous") < 1e-5


def test_virtual_group_router_rows():
    recipe = UpcycleConfig.from_shorthand("E4G4T8", router_init="virtual_group")
    w = init_router(recipe, hidden_size=H, std=0.02, layer=3)
    assert w.shape == (16, H)
    for g in range(4):
        for k in range(g * 4, g * 4 + 4):
            assert torch.equal(w[k], w[g * 4])
    assert not torch.equal(w[0], w[4])
    assert torch.equal(w, init_router(recipe, H, 0.02, layer=3))  # seeded
    assert not torch.equal(w, init_router(recipe, H, 0.02, layer=4))  # independent per layer
    assert w.std().item() == pytest.approx(0.02, rel=0.35)
    base = torch.randn(3, H)
    assert torch.equal(virtual_group_rows(base, 2)[[0, 1, 2, 3, 4, 5]], base[[0, 0, 1, 1, 2, 2]])
    rand = init_router(recipe.replace(router_init="random"), H, 0.02, layer=3)
    assert len({tuple(r.tolist()) for r in rand}) == 16


@pytest.mark.parametrize("gated", [False, True])
def test_drop_upcycling_reinitialises_exactly_r_of_each_expert(gated):
    act = get_activation("swiglu" if gated else "squared-relu")
    dense = dense_mlp(act, bias=True)
    recipe = UpcycleConfig.from_shorthand("E4G2T2", weight_scaling="off", drop_ratio=0.5, seed=7)
    plain = upcycle_mlp(dense, recipe.replace(drop_ratio=0.0), act)
    dropped = upcycle_mlp(dense, recipe, act)
    fe = F // 2
    changed_sets = []
    for k in range(8):
        cols = (dropped.fc2_weight[k] != plain.fc2_weight[k]).any(dim=0)
        assert int(cols.sum()) == fe // 2  # exactly r * F_e neurons re-drawn
        rows = (dropped.fc1_weight[k] != plain.fc1_weight[k]).any(dim=1)
        expected_rows = torch.cat([cols, cols]) if gated else cols
        assert torch.equal(rows, expected_rows)  # the same neurons in fc1 (gate and up) and fc2
        changed_sets.append(tuple(cols.nonzero().flatten().tolist()))
        new = dropped.fc2_weight[k][:, cols]
        old = plain.fc2_weight[k][:, cols]
        assert new.std().item() == pytest.approx(old.std().item(), rel=0.5)
    assert len(set(changed_sets)) > 1  # each expert drops its own neurons
    again = upcycle_mlp(dense, recipe, act)
    assert torch.equal(again.fc1_weight, dropped.fc1_weight)  # seeded


# ---- agreement with Megatron-LM's upcycling_utils ---------------------------------------------------------

def _megatron_upcycle(megatron, dense_cfg, moe_cfg, dense_sd):
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    from nemo_upcycle.models.megatron import build_megatron_gpt, load_reference_weights

    torch.manual_seed(0)
    mg_dense = build_megatron_gpt(dense_cfg, use_te=False)
    load_reference_weights(mg_dense, dense_sd, dense_cfg)
    mg_moe = build_megatron_gpt(moe_cfg, use_te=False)
    router_init = {k: v.clone() for k, v in mg_moe.state_dict().items() if k.endswith("router.weight")}
    return upcycle_state_dict([mg_moe], [mg_dense])["model"], router_init


@pytest.mark.parametrize("shorthand", ["E4G1T2", "E2G4T4", "E4G2T2"])
def test_experts_equal_megatron_upcycle_state_dict_squared_relu(megatron, shorthand):
    from nemo_upcycle.recipe import upcycle_state_dict

    cfg = small_config()
    dense_sd = random_model(cfg).state_dict()
    for router in ("softmax_then_topk", "topk_then_softmax"):
        recipe = UpcycleConfig.from_shorthand(shorthand, router=router)
        moe_cfg, ours = upcycle_state_dict(dense_sd, cfg, recipe)
        theirs, router_init = _megatron_upcycle(megatron, cfg, moe_cfg, dense_sd)
        expert_keys = [k for k in ours if ".experts." in k]
        assert len(expert_keys) == cfg.num_layers * recipe.num_experts * 2
        for k in expert_keys:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=0, msg=k)
        for k, w in router_init.items():  # Megatron: first E rows of its random router, each repeated G times
            torch.testing.assert_close(theirs[k], virtual_group_rows(w[: recipe.expansion], recipe.granularity))


def test_swiglu_megatron_method_equals_megatron_and_homogeneous_is_exact_where_megatron_is_not(megatron):
    from nemo_upcycle.models import GPTModel
    from nemo_upcycle.recipe import upcycle_state_dict

    cfg = small_config(activation="swiglu", normalization="rmsnorm")
    dense = random_model(cfg)
    recipe = UpcycleConfig.from_shorthand("E2G2T2", router="topk_then_softmax")
    moe_cfg, ours_mg = upcycle_state_dict(dense.state_dict(), cfg, recipe.replace(scaling_method="megatron"))
    theirs, _ = _megatron_upcycle(megatron, cfg, moe_cfg, dense.state_dict())
    for k in (k for k in ours_mg if ".experts." in k):
        torch.testing.assert_close(ours_mg[k], theirs[k], rtol=1e-6, atol=0, msg=k)

    _, ours = upcycle_state_dict(dense.state_dict(), cfg, recipe)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))

    def max_diff(sd):
        moe = GPTModel(moe_cfg).eval()
        moe.load_state_dict(sd)
        with torch.no_grad():
            return (moe(tokens).logits - dense(tokens).logits).abs().max().item()

    assert max_diff(ours) < 1e-5  # gate untouched: exact
    assert max_diff(ours_mg) > 1e-4  # SiLU gate scaled by s^(1/3): approximate
