"""A converted `.nemo` holds every config section NeMo's MegatronGPTModel reads while restoring it. NeMo 2.4 (the
last release with MegatronGPTModel) cannot be installed beside nemo-toolkit 3.0, so the reads are replayed here
as NeMo 2.4 makes them, on an OmegaConf struct config (restore_from sets struct mode, so a missing key raises).
Where each comes from: nemo/collections/nlp/models/language_modeling/megatron_base_model.py (v2.4.0),
MegatronBaseModel.__init__, _validate_and_override_config, _build_tokenizer, build_model_parallel_config;
megatron_gpt_model.py MegatronGPTModel.__init__ and model_provider_func."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from nemo_upcycle.checkpoint import WriteOptions
from nemo_upcycle.checkpoint.nemo_config import NEMO_RESTORE_DEFAULTS
from nemo_upcycle.convert import convert
from nemo_upcycle.recipe import UpcycleConfig
from tests.conftest import random_model, small_config
from tests.nemo_fixtures import spm_model_bytes, write_nemo_dir

DEMO = Path(__file__).resolve().parents[2] / "nemo_upcycle" / "demo_data" / "dense_nemotron.nemo"
# torch_dtype_from_precision (nemo/collections/nlp/parts/utils_funcs.py, v2.4.0) accepts exactly these
NEMO_PRECISIONS = {"bf16", "bf16-mixed", 16, "16", "16-mixed", 32, "32", "32-true"}


def replay_nemo_restore_reads(cfg) -> None:
    """The attribute reads NeMo 2.4's MegatronGPTModel makes on its config while it is built for restore_from."""
    # MegatronBaseModel.__init__ takes the trainer's precision when the config has none, then
    # torch_dtype_from_precision(cfg.precision) refuses anything else
    assert cfg.get("precision", None) is None or cfg.precision in NEMO_PRECISIONS
    cfg.optim.get("name")  # __init__: use_mcore_dist_optim / with_distributed_adam
    cfg.optim.get("num_distributed_optimizer_instances", 1)  # __init__: initialize_model_parallel_for_nemo
    assert cfg.tokenizer.library  # _build_tokenizer; without a tokenizer padded_vocab_size is never set
    cfg.tokenizer.get("model", None)
    cfg.hidden_size  # build_model_parallel_config
    for key in ("num_layers", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings",
                "encoder_seq_length"):  # model_provider_func / build_transformer_config
        getattr(cfg, key)
    cfg.micro_batch_size, cfg.global_batch_size, cfg.seed  # compute_consumed_samples, model-parallel init


def nemo_config_of(nemo_tar: Path):
    with tarfile.open(nemo_tar) as tar:
        values = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
    cfg = OmegaConf.create(values)
    OmegaConf.set_struct(cfg, True)
    return values, cfg


def test_demo_without_optim_or_precision_converts_to_a_restorable_nemo(megatron, tmp_path):
    with tarfile.open(DEMO) as tar:
        source = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
    assert "optim" not in source and "precision" not in source  # the shipped case that failed in NeMo
    as_nemo_reads_it = OmegaConf.create(source)
    OmegaConf.set_struct(as_nemo_reads_it, True)
    with pytest.raises(Exception, match="Key 'optim' is not in struct"):  # NeMo 2.4.1's error on such a file
        replay_nemo_restore_reads(as_nemo_reads_it)
    out = tmp_path / "moe.nemo"
    convert(DEMO, out, UpcycleConfig.from_shorthand("E2G1T2"), write=WriteOptions("nemo"), progress=False)
    values, cfg = nemo_config_of(out)
    replay_nemo_restore_reads(cfg)
    assert values["optim"] == NEMO_RESTORE_DEFAULTS["optim"]
    assert values["precision"] == "bf16"  # the demo's weights are bfloat16
    assert values["tokenizer"]["library"] == "sentencepiece"


def test_the_sources_own_sections_are_kept(megatron, tmp_path):
    src = write_nemo_dir(tmp_path / "dense", random_model(small_config()), spm_model_bytes(tmp_path))
    source = yaml.safe_load((src / "model_config.yaml").read_text())
    source.update(optim={"name": "distributed_fused_adam", "lr": 3e-4}, micro_batch_size=2, seed=7)
    (src / "model_config.yaml").write_text(yaml.safe_dump(source))
    out = tmp_path / "moe.nemo"
    convert(src, out, UpcycleConfig.from_shorthand("E2G1T2"), write=WriteOptions("nemo"), progress=False)
    values, cfg = nemo_config_of(out)
    replay_nemo_restore_reads(cfg)
    assert values["optim"] == {"name": "distributed_fused_adam", "lr": 3e-4}
    assert (values["precision"], values["micro_batch_size"], values["seed"]) == ("bf16-mixed", 2, 7)
    assert values["global_batch_size"] == NEMO_RESTORE_DEFAULTS["global_batch_size"]

    del source["precision"]  # then it follows the weights (float32 here), not NeMo's bf16 default
    (src / "model_config.yaml").write_text(yaml.safe_dump(source))
    convert(src, tmp_path / "moe32.nemo", UpcycleConfig.from_shorthand("E2G1T2"), write=WriteOptions("nemo"),
            progress=False)
    assert nemo_config_of(tmp_path / "moe32.nemo")[0]["precision"] == 32
