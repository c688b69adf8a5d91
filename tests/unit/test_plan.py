"""The conversion plan: each output tensor's operation (Copy or UpcycleMLP), and the writers' declared fetch
orders, which the executor checks take one layer at a time."""

from __future__ import annotations

import pytest

from nemo_upcycle.checkpoint import WriteOptions, make_writer
from nemo_upcycle.checkpoint.memory import InMemoryCheckpoint
from nemo_upcycle.convert import Copy, LayerStream, UpcycleMLP, check_one_layer_at_a_time, plan_conversion
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.recipe import UpcycleConfig
from tests.conftest import random_model, small_config

RECIPE = UpcycleConfig.from_shorthand("E2G2T2", layer_freq=2, router_init="virtual_group")


@pytest.fixture(scope="module")
def dense():
    cfg = small_config(num_layers=3, activation="swiglu", normalization="rmsnorm")
    return InMemoryCheckpoint(cfg, random_model(cfg).state_dict())


def test_plan_copies_what_the_input_holds_and_upcycles_the_mlp_of_moe_layers(dense):
    plan = plan_conversion(dense, RECIPE)
    assert list(plan.ops) == list(plan.outputs)
    upcycles = plan.upcycles()
    assert sorted(upcycles) == [0, 2]  # layer_freq 2 of 3 layers
    assert set(upcycles[0].outputs) == {"decoder.layers.0.mlp.router.weight",
                                        "decoder.layers.0.mlp.experts.linear_fc1.weight",
                                        "decoder.layers.0.mlp.experts.linear_fc2.weight"}
    assert plan.ops["decoder.layers.1.mlp.linear_fc1.weight"] == Copy("decoder.layers.1.mlp.linear_fc1.weight")
    assert isinstance(plan.ops["decoder.layers.2.mlp.router.weight"], UpcycleMLP)
    assert all(isinstance(op, Copy) for op in plan_conversion(dense, None).ops.values())


@pytest.mark.parametrize("fmt, options", [("nemo", {}), ("megatron", {}), ("hf", {"hf_arch": "qwen2_moe"})])
def test_every_writer_declares_an_order_of_one_layer_at_a_time(dense, tmp_path, fmt, options):
    plan = plan_conversion(dense, RECIPE)
    order = make_writer(tmp_path / "out", WriteOptions(fmt, **options)).fetch_order(plan.moe, plan.outputs)
    assert sorted(order) == sorted(plan.outputs)  # every tensor, once
    check_one_layer_at_a_time(order, fmt)


def test_an_order_that_returns_to_a_layer_and_a_fetch_out_of_order_are_refused(dense):
    plan = plan_conversion(dense, RECIPE)
    names = list(plan.outputs)
    layer0 = [n for n in names if n.startswith("decoder.layers.0.")]
    layer1 = [n for n in names if n.startswith("decoder.layers.1.")]
    with pytest.raises(UpcycleError, match="fetches layer 0 again after leaving it"):
        check_one_layer_at_a_time(layer0[:1] + layer1 + layer0[1:], "test")
    stream = LayerStream(dense, plan, order=names)
    stream.fetch(names[0])
    with pytest.raises(UpcycleError, match=f"fetched {names[2]} where its declared order has {names[1]}"):
        stream.fetch(names[2])
