"""The local-spec adjustments in models/megatron.py recognise spec entries in both forms megatron-core uses:
ModuleSpec(module=MoELayer) (0.16) and functools.partial(MoELayer, submodules=...) (0.19 and newer). The 0.19 form
is built here from megatron-core 0.16.1's own spec, entry by entry, as 0.19's moe_module_specs writes it."""

from __future__ import annotations

import functools

import pytest

from tests.conftest import small_config


def _block_spec(cfg):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from nemo_upcycle.models.megatron import transformer_config

    return get_gpt_decoder_block_spec(transformer_config(cfg), use_transformer_engine=False)


def _as_partials(block_spec) -> None:
    """Rewrite a 0.16-style block spec the way 0.19 writes it: the MoE MLP a `partial(MoELayer, submodules=...)`,
    a norm a partial of its class."""
    for layer_spec in block_spec.layer_specs:
        sub = layer_spec.submodules
        if hasattr(sub.mlp, "submodules") and sub.mlp.submodules.__class__.__name__ == "MoESubmodules":
            sub.mlp = functools.partial(sub.mlp.module, submodules=sub.mlp.submodules, **sub.mlp.params)
        sub.pre_mlp_layernorm = functools.partial(sub.pre_mlp_layernorm, eps=1e-6)


@pytest.mark.parametrize("form", ["module_spec", "partial"])
def test_moe_layers_keep_pre_mlp_layernorm_and_get_local_norms(megatron, form):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from nemo_upcycle.models.megatron import LocalNorm, _checkpoint_moe_norm_like_te, _use_local_norms, spec_class

    cfg = small_config(num_layers=3, num_moe_experts=4, moe_ffn_hidden_size=32, moe_layer_freq=(1, 0, 1))
    spec = _block_spec(cfg)
    if form == "partial":
        _as_partials(spec)
        assert isinstance(spec.layer_specs[0].submodules.mlp, functools.partial)
    moe = [spec_class(ls.submodules.mlp) is MoELayer for ls in spec.layer_specs]
    assert moe == [True, False, True]

    _checkpoint_moe_norm_like_te(spec)
    _use_local_norms(spec)
    for is_moe, layer_spec in zip(moe, spec.layer_specs):
        sub = layer_spec.submodules
        # MoE layers checkpoint the norm as pre_mlp_layernorm (as the TE spec does); dense ones fuse it into fc1
        assert ("pre_mlp_layernorm." in sub.sharded_state_dict_keys_map) is not is_moe
        assert spec_class(sub.input_layernorm) is LocalNorm
        assert spec_class(sub.pre_mlp_layernorm) is LocalNorm
        if form == "partial":
            assert sub.pre_mlp_layernorm.keywords == {"eps": 1e-6}  # the bound arguments survive the swap
    assert spec_class(spec.layer_norm) is LocalNorm


def test_spec_class_unwraps_nested_partials_and_module_specs():
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from nemo_upcycle.models.megatron import spec_class

    nested = functools.partial(functools.partial(MoELayer, submodules=None), layer_number=1)
    assert spec_class(nested) is MoELayer
    assert spec_class(ModuleSpec(module=nested)) is MoELayer
    assert spec_class(ModuleSpec(module=MoELayer)) is MoELayer
    assert spec_class(MoELayer) is MoELayer
