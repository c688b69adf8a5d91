"""`--format megatron` writes Megatron-LM's `args` namespace into common.pt, so loaders that rebuild the model
from the checkpoint alone can: read with megatron-core's own `dist_checkpointing.load_common_state_dict` (what
Megatron-Bridge's `_load_args_from_checkpoint` calls; Megatron-LM's `load_args_from_checkpoint` reads the same
key), turned into a TransformerConfig by copying fields by name as Bridge's `_transformer_config_from_args` does,
and that config, with nothing from us, builds a Megatron model that loads the weights and computes our logits.
megatron-core's wheel does not ship `megatron.training` (Megatron-LM's parser and checkpointing module), so
those are exercised through the megatron-core code paths they call."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from nemo_upcycle.checkpoint import WriteOptions, open_checkpoint
from nemo_upcycle.convert import convert
from nemo_upcycle.models import GPTModel
from nemo_upcycle.recipe import UpcycleConfig, upcycle_state_dict
from tests.conftest import random_model, small_config
from tests.nemo_fixtures import write_nemo_dir

TOKENS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(5))


def config_from_args(args: argparse.Namespace):
    """A TransformerConfig from Megatron-LM args, the way Megatron-Bridge builds one (fields copied by name, the
    renamed ones mapped), with the two CPU-only choices of this machine on top."""
    from megatron.core.transformer import TransformerConfig

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TransformerConfig) if hasattr(args, f.name)}
    kw.update(num_moe_experts=args.num_experts, persist_layer_norm=not args.no_persist_layer_norm,
              layernorm_epsilon=args.norm_epsilon, pipeline_dtype=args.params_dtype,
              num_query_groups=args.num_query_groups if args.group_query_attention else None)
    if args.swiglu:
        kw.update(activation_func=torch.nn.functional.silu, gated_linear_unit=True)
    kw.update(moe_token_dispatcher_type="allgather", use_cpu_initialization=True, moe_grouped_gemm=False)
    return TransformerConfig(**kw)


def test_common_pt_args_rebuild_the_model_in_megatron(megatron, tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel as MegatronGPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.safe_globals import register_safe_globals

    from nemo_upcycle.models.megatron import _checkpoint_moe_norm_like_te, _use_local_norms, megatron_forward

    cfg = small_config(num_layers=3, activation="swiglu", normalization="rmsnorm")
    dense = random_model(cfg)
    src = write_nemo_dir(tmp_path / "dense", dense, spm=None)
    recipe = UpcycleConfig.from_shorthand("E2G2T2", layers=(0, 2))
    convert(src, tmp_path / "out", recipe, write=WriteOptions("megatron"), progress=False)

    register_safe_globals()  # Megatron-LM's and Bridge's loaders do this before reading common.pt
    common = dist_checkpointing.load_common_state_dict(str(tmp_path / "out" / "iter_0000000"))
    args = common["args"]
    assert isinstance(args, argparse.Namespace) and common["checkpoint_version"] == 3.0
    assert (args.num_experts, args.moe_layer_freq, args.padded_vocab_size) == (4, [1, 0, 1], 96)

    tc = config_from_args(args)
    spec = get_gpt_decoder_block_spec(tc, use_transformer_engine=False)
    _checkpoint_moe_norm_like_te(spec)
    _use_local_norms(spec)
    model = MegatronGPTModel(
        config=tc, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent, rotary_base=args.rotary_base,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights).eval()
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(tmp_path / "out" / "iter_0000000"))
    model.load_state_dict({k: v for k, v in loaded.items() if k in model.state_dict()})

    moe_cfg, want = upcycle_state_dict(dense.state_dict(), cfg, recipe)
    ours = GPTModel(moe_cfg).eval()
    ours.load_state_dict(want)
    with torch.no_grad():
        diff = (megatron_forward(model, TOKENS) - ours(TOKENS).logits).abs().max().item()
    assert diff < 1e-5, diff


def test_our_reader_takes_the_model_from_the_args_alone(megatron, tmp_path):
    cfg = small_config(activation="squared-relu", normalization="layernorm1p")
    src = write_nemo_dir(tmp_path / "dense", random_model(cfg), spm=None)
    recipe = UpcycleConfig.from_shorthand("E4G2T2", shared_expert=True)
    convert(src, tmp_path / "out", recipe, write=WriteOptions("megatron"), progress=False)
    want = open_checkpoint(tmp_path / "out").config
    (tmp_path / "out" / "model_config.yaml").unlink()  # leave common.pt's args the only description
    got = open_checkpoint(tmp_path / "out").config
    fields = ("num_layers", "hidden_size", "num_query_groups", "activation", "normalization", "num_moe_experts",
              "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax",
              "moe_shared_expert_intermediate_size", "rotary_percentage", "share_embeddings_and_output_weights")
    assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}


def test_reading_args_leaves_megatron_able_to_load_common_pt(megatron, tmp_path):
    """Our reader reads the args with weights_only=True; afterwards megatron-core's own loader (which relies on
    the Namespace allow-listing it did at import) must still read a common.pt holding them."""
    from megatron.core import dist_checkpointing

    src = write_nemo_dir(tmp_path / "dense", random_model(small_config()), spm=None)
    convert(src, tmp_path / "out", UpcycleConfig.from_shorthand("E2G1T2"), write=WriteOptions("megatron"),
            progress=False)
    (tmp_path / "out" / "model_config.yaml").unlink()
    open_checkpoint(tmp_path / "out").close()  # reads common.pt's args
    common = dist_checkpointing.load_common_state_dict(str(tmp_path / "out" / "iter_0000000"))
    assert isinstance(common["args"], argparse.Namespace)
