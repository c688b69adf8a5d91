"""Functional preservation at step 0, over the config space (hypothesis): the upcycled model against the dense one.

Claims under test (derived in recipe/config.py `scale_factor` and recipe/experts.py):
  topK-then-softmax, sigmoid with T > 1: exact for ANY router (selected probabilities sum to 1).
  softmax-then-topK, sigmoid with T = 1: exact for a zero router; for a random router the MoE MLP output is
      exactly rho(x) * dense(x), with rho the per-token routing mass relative to uniform:
        softmax-then-topK: rho = (E / k) * sum_top-k exp(l_g) / sum_g exp(l_g),  k = T/G groups,
                           so 1 <= rho <= exp(max_g l_g - min_g l_g);
        sigmoid, T = 1:    rho = 2 * sigmoid(l_max), so |rho - 1| <= tanh(max_g |l_g| / 2).
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nemo_upcycle.activations import ACTIVATIONS
from nemo_upcycle.models import GPTModel
from nemo_upcycle.recipe import UpcycleConfig, upcycle_state_dict
from tests.conftest import random_model, small_config


@st.composite
def recipes(draw):
    g = draw(st.sampled_from([1, 2, 4, 8]))
    router = draw(st.sampled_from(["softmax_then_topk", "topk_then_softmax", "sigmoid"]))
    fewest = 2 if router == "topk_then_softmax" and g == 1 else 1  # top-1 topK-then-softmax is refused
    e = draw(st.integers(fewest, 3))
    t = g * draw(st.integers(fewest, e))
    return UpcycleConfig(expansion=e, granularity=g, topk=t, router=router,
                         seed=draw(st.integers(0, 10_000)), router_init="virtual_group", router_init_std=0.3)


def _models(recipe, activation, bias, zero_router=False):
    cfg = small_config(num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
                       num_query_groups=1, activation=activation, bias=bias,
                       normalization="rmsnorm" if ACTIVATIONS[activation].gated else "layernorm1p")
    dense = random_model(cfg, seed=recipe.seed, scale=0.3)
    moe_cfg, sd = upcycle_state_dict(dense.state_dict(), cfg, recipe)
    if zero_router:
        sd = {k: torch.zeros_like(v) if ".router." in k else v for k, v in sd.items()}
    moe = GPTModel(moe_cfg).eval()
    moe.load_state_dict(sd)
    assert moe_cfg.num_parameters() == sum(p.numel() for p in moe.parameters())
    return dense, moe


def _logit_diff(dense, moe):
    tokens = torch.randint(0, dense.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = dense(tokens).logits, moe(tokens).logits
    return (a - b).abs().max().item() / a.abs().max().item()


def _exact_for_any_router(recipe):
    return recipe.router == "topk_then_softmax" or (recipe.router == "sigmoid" and recipe.topk > 1)


@settings(max_examples=60, deadline=None)
@given(recipe=recipes(), activation=st.sampled_from(sorted(ACTIVATIONS)), bias=st.booleans())
def test_upcycled_logits_equal_dense_where_exact(recipe, activation, bias):
    zero_router = not _exact_for_any_router(recipe)
    dense, moe = _models(recipe, activation, bias, zero_router=zero_router)
    assert _logit_diff(dense, moe) < 1e-5


@settings(max_examples=40, deadline=None)
@given(recipe=recipes(), activation=st.sampled_from(sorted(ACTIVATIONS)), bias=st.booleans())
def test_random_router_output_is_rho_times_dense_within_bound(recipe, activation, bias):
    assume(not _exact_for_any_router(recipe))
    dense, moe = _models(recipe, activation, bias)
    dense_mlp, moe_mlp = dense.decoder.layers[0].mlp, moe.decoder.layers[0].mlp
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = dense_mlp(x), moe_mlp(x)
        logits = torch.nn.functional.linear(x, moe_mlp.router.weight, moe_mlp.router.bias)
    group_logits = logits[:, :: recipe.granularity]  # one logit per virtual group
    if recipe.router == "softmax_then_topk":
        k = recipe.topk // recipe.granularity
        top = group_logits.exp().topk(k, dim=1).values.sum(1)
        rho = recipe.expansion / k * top / group_logits.exp().sum(1)
        spread = group_logits.max(1).values - group_logits.min(1).values
        assert (rho >= 1 - 1e-6).all() and (rho <= spread.exp() + 1e-6).all()
    else:  # sigmoid, T = 1
        rho = 2 * torch.sigmoid(group_logits.max(1).values)
        assert ((rho - 1).abs() <= torch.tanh(group_logits.abs().max(1).values / 2) + 1e-6).all()
    torch.testing.assert_close(got, rho[:, None] * want, rtol=1e-4, atol=1e-5)


def test_weight_scaling_is_what_makes_softmax_then_topk_preserve_the_output():
    """Without scaling, E8G8T8 softmax-then-topK starts at 1/8 of the dense MLP output (T/(E*G^2) * dense
    at a zero router); with it, exactly the dense output."""
    recipe = UpcycleConfig.from_shorthand("E8G8T8", seed=3)
    dense, scaled = _models(recipe, "squared-relu", False, zero_router=True)
    _, unscaled = _models(recipe.replace(weight_scaling="off"), "squared-relu", False, zero_router=True)
    x = torch.randn(32, 16)
    with torch.no_grad():
        d = dense.decoder.layers[0].mlp(x)
        torch.testing.assert_close(scaled.decoder.layers[0].mlp(x), d, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(unscaled.decoder.layers[0].mlp(x), d * 8 / (8 * 64), rtol=1e-4, atol=1e-6)
    assert math.isclose(recipe.scale_factor(), 64.0)
