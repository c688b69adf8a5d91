"""The recipe config: shorthand, validation errors (one line each), scale factors, layer selection."""

import math

import pytest

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.recipe import UpcycleConfig


def test_shorthand_parses_paper_notation():
    r = UpcycleConfig.from_shorthand("E8G8T8")
    assert (r.expansion, r.granularity, r.topk, r.num_experts, r.name) == (8, 8, 8, 64, "E8G8T8")
    r = UpcycleConfig.from_shorthand("e8g1t2", router="topk_then_softmax")
    assert (r.num_experts, r.topk, r.router) == (8, 2, "topk_then_softmax")


def test_from_dict_accepts_shorthand_and_rejects_unknown_options():
    r = UpcycleConfig.from_dict({"shorthand": "E4G2T2", "router": "sigmoid", "layers": [1, 0]})
    assert (r.num_experts, r.router, r.layers) == (8, "sigmoid", (0, 1))
    with pytest.raises(UpcycleError, match="unknown recipe option"):
        UpcycleConfig.from_dict({"experts": 8})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shorthand="E8T2"), "is not of the form E<expansion>G<granularity>T<topk>"),
        (dict(expansion=4, granularity=4, topk=6), "top-k 6 must be a multiple of granularity 4 for virtual-group"),
        (dict(expansion=2, granularity=1, topk=3), "top-k 3 exceeds the number of experts 2"),
        (dict(router="softmax"), "unknown router type 'softmax'"),
        (dict(router_init="zeros"), "unknown router init"),
        (dict(weight_scaling="on"), "weight_scaling must be"),
        (dict(weight_scaling=-2.0), "weight_scaling must be"),
        (dict(drop_ratio=1.0), "drop_ratio must be in"),
        (dict(expansion=0), "expansion must be a positive integer"),
        (dict(layers=(1, 1)), "layers must be distinct"),
        (dict(scaling_method="sqrt"), "unknown scaling method"),
        (dict(expansion=8, topk=1, router="topk_then_softmax"), "topk_then_softmax with top-k 1 gives the one"),
        (dict(aux_loss_coeff=-1.0), "aux_loss_coeff must be >= 0"),
        (dict(z_loss_coeff=-5.0), "z_loss_coeff must be >= 0"),
    ],
)
def test_invalid_recipes_raise_one_line_errors(kwargs, message):
    with pytest.raises(UpcycleError) as err:
        if "shorthand" in kwargs:
            UpcycleConfig.from_shorthand(kwargs["shorthand"])
        else:
            UpcycleConfig(**kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_random_router_init_allows_topk_not_multiple_of_granularity():
    assert UpcycleConfig(expansion=4, granularity=4, topk=6, router_init="random").num_experts == 16


def test_dense_shape_checks():
    with pytest.raises(UpcycleError, match="ffn_hidden_size 24576 is not divisible by granularity 7"):
        UpcycleConfig(expansion=1, granularity=7, topk=7).check_dense_shapes(24576, 32)
    with pytest.raises(UpcycleError, match="beyond the model's 4 layers"):
        UpcycleConfig(layers=(0, 4)).check_dense_shapes(64, 4)
    UpcycleConfig.from_shorthand("E8G8T8").check_dense_shapes(24576, 32)


@pytest.mark.parametrize(
    "router, shorthand, expected",
    [
        ("softmax_then_topk", "E8G1T2", 8 * 1 * 1 / 2),
        ("softmax_then_topk", "E8G8T8", 8 * 8 * 8 / 8),  # the paper's 64 -> cbrt = 4 on fc1 and fc2
        ("topk_then_softmax", "E8G8T8", 8.0),
        ("topk_then_softmax", "E8G1T2", 1.0),
        ("sigmoid", "E8G2T4", 2.0),
        ("sigmoid", "E8G1T1", 2.0),
    ],
)
def test_scale_factor_matches_the_derivation(router, shorthand, expected):
    assert math.isclose(UpcycleConfig.from_shorthand(shorthand, router=router).scale_factor(), expected)


def test_scale_factor_overrides():
    assert UpcycleConfig(weight_scaling="off").scale_factor() == 1.0
    assert UpcycleConfig(weight_scaling=2.5).scale_factor() == 2.5
    assert UpcycleConfig(topk_scaling_factor=2.0).scale_factor() == pytest.approx(8 / 2 / 2.0)


def test_layer_selection():
    assert UpcycleConfig().moe_layer_pattern(3) == [True, True, True]
    assert UpcycleConfig(layer_freq=2).moe_layer_pattern(5) == [True, False, True, False, True]
    assert UpcycleConfig(layers=(3, 1)).moe_layer_pattern(4) == [False, True, False, True]
    fields = UpcycleConfig(layer_freq=2).megatron_moe_fields(ffn_hidden_size=64, num_layers=4)
    assert fields["moe_layer_freq"] == [1, 0, 1, 0]
    assert UpcycleConfig().megatron_moe_fields(64, 4)["moe_layer_freq"] == 1


def test_megatron_fields_follow_router_type():
    f = UpcycleConfig.from_shorthand("E8G8T8").megatron_moe_fields(24576, 32)
    assert f["num_moe_experts"] == 64 and f["moe_ffn_hidden_size"] == 3072 and f["moe_router_topk"] == 8
    assert f["moe_router_pre_softmax"] is True and f["moe_router_score_function"] == "softmax"
    assert f["moe_aux_loss_coeff"] == 1e-2
    f = UpcycleConfig(router="sigmoid").megatron_moe_fields(64, 2)
    assert f["moe_router_pre_softmax"] is False and f["moe_router_score_function"] == "sigmoid"
