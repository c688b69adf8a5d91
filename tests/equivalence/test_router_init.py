"""The calibrated router init (recipe.calibration), bf16-exact weight scaling, and `--verify` on real text: each
test checks a property that a wrong init, scaling or verify breaks (and shows the old behaviour failing it)."""

from __future__ import annotations

import pytest
import torch

from nemo_upcycle.activations import get_activation
from nemo_upcycle.convert import convert
from nemo_upcycle.models.reference import GPTModel, MoELayer, Router, lm_loss
from nemo_upcycle.recipe import UpcycleConfig, scaling_factors, upcycle_mlp, upcycle_state_dict
from nemo_upcycle.recipe.calibration import group_multipliers
from nemo_upcycle.recipe.experts import MLPWeights, shard_dense_mlp
from nemo_upcycle.verify import VerifyOptions, group_problems
from tests.conftest import random_model, small_config

TOKENS = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(21))


def swiglu_config(**overrides):
    return small_config(normalization="rmsnorm", activation="swiglu", rotary_percentage=1.0, **overrides)


def anisotropic_config(**overrides):
    """Hidden states with a common component, as real models have (SmolLM2's MLP inputs: cosine 0.4-0.9 with
    their mean): the norm's bias adds one. Isotropic random states put some tokens at d.x ~ 0."""
    return small_config(normalization="layernorm", **overrides)


def upcycled(recipe: UpcycleConfig, cfg=None) -> tuple[GPTModel, GPTModel]:
    cfg = cfg or swiglu_config()
    dense = random_model(cfg)
    moe_cfg, sd = upcycle_state_dict(dense.state_dict(), cfg, recipe)
    moe = GPTModel(moe_cfg).eval()
    moe.load_state_dict(sd)
    return dense.eval(), moe


@torch.no_grad()
def routing_on_dense_states(dense: GPTModel, moe: GPTModel, dtype: torch.dtype, topk_fn=None):
    """Each MoE layer's routing of the dense model's own MLP inputs (unseen tokens), in `dtype`, selected with
    torch.topk (what transformers and Megatron use: ties unspecified) unless `topk_fn` is given."""
    captured = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0]))
             for i, layer in enumerate(dense.decoder.layers)]
    dense(TOKENS)
    for h in hooks:
        h.remove()
    out = {}
    for i, layer in enumerate(moe.decoder.layers):
        if isinstance(layer.mlp, MoELayer):
            router: Router = layer.mlp.router
            x = captured[i].reshape(-1, captured[i].shape[-1]).to(dtype)
            logits = torch.nn.functional.linear(x, router.weight.to(dtype)).float()
            probs = logits.softmax(-1)
            weights, experts = torch.topk(probs, router.topk, dim=-1)
            out[i] = (probs, type("R", (), {"weights": weights.to(dtype), "experts": experts})())
    return out


def group_ties(probs: torch.Tensor, recipe: UpcycleConfig) -> int:
    """Tokens where the last chosen virtual group and the first one left out have equal probabilities."""
    per_group = probs[:, ::recipe.granularity]
    top = per_group.sort(-1, descending=True).values
    k = recipe.topk // recipe.granularity
    return int((top[:, k - 1] == top[:, k]).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shorthand", ["E8G1T2", "E4G2T2", "E8G8T8"])
def test_calibrated_groups_never_tie_and_rho_stays_one(shorthand, dtype):
    recipe = UpcycleConfig.from_shorthand(shorthand)
    dense, moe = upcycled(recipe, anisotropic_config())
    for i, (probs, routing) in routing_on_dense_states(dense, moe, dtype).items():
        if recipe.granularity > 1:  # with G = 1 every expert is a whole copy: a tie changes nothing
            assert group_ties(probs, recipe) == 0, f"layer {i}"
        split, rho = group_problems(routing, recipe)
        assert split == 0, f"layer {i}: torch.topk took parts of several groups"
        assert rho < (1e-3 if dtype == torch.float32 else 1e-6), f"layer {i}"  # bf16 weights round to 1/(E*G)


def test_the_checks_catch_ties_and_rho_spread_of_the_old_init():
    tiny = UpcycleConfig.from_shorthand("E4G2T2", router_init="virtual_group", router_init_std=1e-12)
    dense, moe = upcycled(tiny)
    found = routing_on_dense_states(dense, moe, torch.float32)
    assert sum(group_ties(p, tiny) for p, _ in found.values()) > 0  # logits below fp32 resolution: all tie
    assert sum(group_problems(r, tiny)[0] for _, r in found.values()) > 0
    paper = UpcycleConfig.from_shorthand("E4G2T2", router_init="virtual_group", router_init_std=0.5)
    dense, moe = upcycled(paper)
    spread = max(group_problems(r, paper)[1] for _, r in routing_on_dense_states(dense, moe, torch.float32).values())
    assert spread > 1e-2  # top-K picks the largest probabilities: rho > 1


def test_calibrated_rows_are_ordered_multiples_of_one_direction_exact_in_bf16():
    recipe = UpcycleConfig.from_shorthand("E8G2T2")
    dense, moe = upcycled(recipe)
    w = moe.decoder.layers[0].mlp.router.weight.detach()
    m = group_multipliers(8)
    assert torch.equal(w[::2], w[1::2])  # virtual groups
    assert len(set(m.tolist())) == 8 and torch.all(m[1:] / m[:-1] > 1 + 2 ** -6)  # > 2 bf16 ulps apart
    d = w[0] / m[0]
    assert torch.equal(w[::2], (m[:, None].float() * d[None]))
    assert torch.equal(w.to(torch.bfloat16).float(), w)  # no rounding when the model runs in bf16
    nonzero = d[d != 0].abs()
    assert torch.equal(torch.log2(nonzero), torch.log2(nonzero).round())  # powers of two


def test_calibrated_router_learns_and_balances():
    """Step-0 routing is ordered (one group gets most tokens: a flat router is balanced in the aux loss's eyes,
    P_e = 1/N, but not in load); training moves the router rows and spreads the load."""
    torch.manual_seed(0)
    recipe = UpcycleConfig.from_shorthand("E4G1T1", aux_loss_coeff=1e-1)
    dense, moe = upcycled(recipe, anisotropic_config())
    moe.train()
    start = moe.decoder.layers[0].mlp.router.weight.detach().clone()
    opt = torch.optim.Adam(moe.parameters(), lr=3e-3)
    tokens = torch.randint(0, 96, (8, 33), generator=torch.Generator().manual_seed(1))
    busiest = []
    for _ in range(60):
        out = moe(tokens[:, :-1])
        loss = lm_loss(out.logits, tokens[:, 1:]) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        counts = out.tokens_per_expert[0].float()
        busiest.append((counts.max() / counts.sum()).item())
    moved = (moe.decoder.layers[0].mlp.router.weight.detach() - start).norm() / start.norm().clamp(min=1e-12)
    assert moved > 1.0
    assert busiest[0] > 0.6 and busiest[-1] < 0.5  # the load spreads over the experts


@pytest.mark.parametrize("shorthand", ["E8G1T2", "E4G1T1", "E8G1T2:topk_then_softmax"])
@torch.no_grad()
def test_bf16_g1_upcycle_reproduces_the_dense_model_bit_for_bit(shorthand):
    """With G = 1 every expert is the whole dense MLP, and power-of-two scaling and routing weights make the bf16
    upcycle compute exactly the dense bf16 model. (For G > 1 bit-exactness is impossible: G shard GEMMs round
    differently from one dense GEMM; see the README's step-0 section for what that costs.)"""
    name, _, router = shorthand.partition(":")
    dense, moe = upcycled(UpcycleConfig.from_shorthand(name, router=router or "softmax_then_topk"),
                          swiglu_config(hidden_size=64, ffn_hidden_size=256))
    dense, moe = dense.to(torch.bfloat16), moe.to(torch.bfloat16)
    mlp_inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: mlp_inputs.__setitem__(i, a[0]))
             for i, layer in enumerate(dense.decoder.layers)]
    dense_logits = dense(TOKENS).logits
    for h in hooks:
        h.remove()
    for i, layer in enumerate(moe.decoder.layers):
        assert torch.equal(layer.mlp(mlp_inputs[i]), dense.decoder.layers[i].mlp(mlp_inputs[i])), f"layer {i}"
    assert torch.equal(moe(TOKENS).logits, dense_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_balanced_init_spreads_tokens_at_step_0_and_keeps_rho_one(dtype):
    """G = 1: the balanced rows (orthogonal to the mean MLP input) send tokens to every expert at step 0, where
    the calibrated rows send nearly all of them to one pair, and the routed sum still scales the MLP by ~1."""
    busiest = {}
    for init in ("balanced", "calibrated"):
        recipe = UpcycleConfig.from_shorthand("E8G1T2", router_init=init)
        dense, moe = upcycled(recipe, anisotropic_config())
        for i, (probs, routing) in routing_on_dense_states(dense, moe, dtype).items():
            counts = torch.bincount(routing.experts.flatten(), minlength=8).float()
            busiest[init, i] = (counts / counts.sum()).max().item()
            assert group_problems(routing, recipe)[1] < 5e-3, f"{init} layer {i}"  # rho - 1 ~ the logit scale
    layers = {i for _, i in busiest}
    assert all(busiest["calibrated", i] > 0.3 for i in layers)  # ordered: the top pair (d.x > 0) or the bottom one
    assert all(busiest["balanced", i] < 0.25 for i in layers)  # uniform would be 1/8 of the slots each


def test_balanced_init_needs_whole_copies():
    from nemo_upcycle.errors import UpcycleError

    with pytest.raises(UpcycleError, match="granularity 1"):
        UpcycleConfig.from_shorthand("E8G8T8", router_init="balanced")


def test_power_of_two_factors_are_exact_in_bf16_and_sqrt8_is_not():
    act = get_activation("swiglu")
    g = torch.Generator().manual_seed(0)
    dense = MLPWeights((torch.randn(2 * 64, 32, generator=g) * 0.1).to(torch.bfloat16),
                       (torch.randn(32, 64, generator=g) * 0.1).to(torch.bfloat16))
    recipe = UpcycleConfig.from_shorthand("E8G8T8", router="topk_then_softmax")  # s = 8
    f = scaling_factors(recipe, act)
    assert f.exact and f.fc1 * f.fc2 == 8 and {f.fc1, f.fc2} == {2.0, 4.0}
    experts = upcycle_mlp(dense, recipe, act)
    shards = shard_dense_mlp(dense, 8, gated=True)
    up = experts.fc1_weight[:8, 8:].float()
    assert torch.equal(up, shards.fc1_weight[:, 8:].float() * f.fc1)
    assert torch.equal(experts.fc2_weight[:8].float(), shards.fc2_weight.float() * f.fc2)
    # the old split: sqrt(8) on both tensors rounds in bf16
    rounded = (shards.fc2_weight.float() * 8 ** 0.5).to(torch.bfloat16).float()
    assert not torch.equal(rounded, shards.fc2_weight.float() * 8 ** 0.5)


def test_verify_fails_when_the_loss_moves_and_names_the_cause(megatron, tmp_path):
    from tests.nemo_fixtures import spm_model_bytes, write_nemo_dir

    # weights large enough that the MLP shapes the logits (at the default 0.05 a 3x MLP moves the loss < 0.1%)
    src = write_nemo_dir(tmp_path / "dense.nemo", random_model(swiglu_config(), scale=0.5), spm_model_bytes(tmp_path))
    good = convert(src, tmp_path / "good.nemo", UpcycleConfig.from_shorthand("E4G2T2"), verify=VerifyOptions(),
                   progress=False)
    assert good.verify["status"] == "PASSED"
    # weight scaling 3x the right factor: the recipe identity holds (it uses the recipe's s), the function does not
    old = UpcycleConfig.from_shorthand("E4G2T2", weight_scaling=3 * 16.0)
    bad = convert(src, tmp_path / "bad.nemo", old, verify=VerifyOptions(), progress=False)
    assert bad.verify["status"].startswith("FAILED: held-out loss moved")
    assert "rho spread" in bad.verify["status"]
    lenient = convert(src, tmp_path / "lenient.nemo", old, verify=VerifyOptions(threshold=1.0), progress=False)
    assert lenient.verify["status"] == "PASSED"
