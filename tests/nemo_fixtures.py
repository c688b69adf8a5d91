"""Dense checkpoints built the way NeMo, Megatron and Hugging Face build them, for the converter tests."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path

import torch
import yaml

from nemo_upcycle.checkpoint.nemo_config import nemo_config_from_gpt
from nemo_upcycle.models import GPTConfig, GPTModel


def spm_model_bytes(tmp: Path, vocab_size: int = 96) -> bytes:
    """A real SentencePiece model trained on a little stdlib text."""
    import sentencepiece as spm

    from nemo_upcycle.data.corpus import stdlib_text

    text = tmp / "spm.txt"
    text.write_text(stdlib_text(200_000))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp / "spm"), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=False, minloglevel=2)
    return (tmp / "spm.model").read_bytes()


def megatron_save(model: GPTModel, directory: Path, prefix: str = "model.") -> None:
    """Save with megatron-core's own dist_checkpointing.save from a Megatron GPTModel holding our weights."""
    from megatron.core import dist_checkpointing

    from nemo_upcycle.models.megatron import build_megatron_gpt, load_reference_weights

    dtype = next(model.parameters()).dtype
    mg = build_megatron_gpt(model.config, use_te=False, params_dtype=dtype).to(dtype)  # as Float16Module does
    load_reference_weights(mg, model.state_dict(), model.config)
    directory.mkdir(parents=True)
    dist_checkpointing.save(mg.sharded_state_dict(prefix=prefix), str(directory))


def write_megatron_lm_dir(directory: Path, model: GPTModel, iteration: int = 100) -> Path:
    """A Megatron-LM checkpoint of `small_config()`'s model: tracker file, iter_XXXXXXX/ with torch_dist weights
    and the pretrain_gpt.py args in common.pt, as Megatron-LM saves them."""
    import argparse

    megatron_save(model, directory / f"iter_{iteration:07d}", prefix="")
    (directory / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    args = argparse.Namespace(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                              group_query_attention=True, num_query_groups=2, kv_channels=None, squared_relu=True,
                              normalization="LayerNorm", apply_layernorm_1p=True, norm_epsilon=1e-5,
                              add_bias_linear=False, position_embedding_type="rope", rotary_percent=0.5,
                              rotary_base=10000, untie_embeddings_and_output_weights=True, seq_length=32,
                              max_position_embeddings=32, init_method_std=0.02)
    torch.save({"args": args, "iteration": iteration, "checkpoint_version": 3.0},
               directory / f"iter_{iteration:07d}" / "common.pt")
    return directory


def nemo_config(cfg: GPTConfig, tokenizer_artifact: str | None) -> dict:
    out = nemo_config_from_gpt(cfg)
    out.update(precision="bf16-mixed", megatron_amp_O2=True, make_vocab_size_divisible_by=128,
               transformer_engine=True, fp8=False, data={"seq_length": cfg.seq_length})
    if tokenizer_artifact:
        out["tokenizer"] = {"library": "sentencepiece", "type": None, "model": f"nemo:{tokenizer_artifact}",
                            "vocab_file": None, "merge_file": None, "delimiter": None, "sentencepiece_legacy": False}
    return out


def write_nemo_dir(directory: Path, model: GPTModel, spm: bytes | None, layout: str = "torch_dist",
                   tp: int = 1, pp: int = 1) -> Path:
    """An extracted .nemo directory; layout torch_dist (mcore save) or legacy (TP/PP shards)."""
    directory.mkdir(parents=True)
    artifact = f"{uuid.uuid4().hex}_tokenizer.model" if spm else None
    if spm:
        (directory / artifact).write_bytes(spm)
    (directory / "model_config.yaml").write_text(yaml.safe_dump(nemo_config(model.config, artifact)))
    if layout == "torch_dist":
        megatron_save(model, directory / "model_weights")
    else:
        for (t, p), shard in legacy_shards(model, tp, pp).items():
            if tp == 1 and pp == 1:
                path = directory / "model_weights.ckpt"
            elif pp == 1:
                path = directory / f"mp_rank_{t:02d}" / "model_weights.ckpt"
            else:
                path = directory / f"tp_rank_{t:02d}_pp_rank_{p:03d}" / "model_weights.ckpt"
            path.parent.mkdir(exist_ok=True)
            torch.save(shard, path)
    return directory


def pack_nemo(directory: Path, tar_path: Path, gzip: bool = False) -> Path:
    """Tar a .nemo directory as NeMo does: members named ./..."""
    with tarfile.open(tar_path, "w:gz" if gzip else "w:") as tar:
        tar.add(directory, arcname=".")
    return tar_path


def legacy_shards(model: GPTModel, tp: int, pp: int) -> dict[tuple[int, int], dict]:
    """Split a model's TE-named state dict into Megatron TP/PP shards (column-parallel on dim 0, row on 1,
    gated fc1 as [gate_t; up_t] per shard, layers renumbered per pipeline stage)."""
    from nemo_upcycle.models.keys import local_to_te

    cfg = model.config
    sd = local_to_te(model.state_dict(), cfg.moe_layer_pattern())
    per_stage = cfg.num_layers // pp
    shards = {}
    for p in range(pp):
        for t in range(tp):
            out = {}
            for k, v in sd.items():
                i = _layer(k)
                if i is not None and not (p * per_stage <= i < (p + 1) * per_stage):
                    continue
                if i is None and ((k.startswith("embedding") and p != 0) or (not k.startswith("embedding") and p != pp - 1)):
                    continue
                name = k if i is None else k.replace(f"layers.{i}.", f"layers.{i - p * per_stage}.", 1)
                out["model." + name] = _tp_slice(k, v, t, tp, cfg.gated).clone()
                if name.endswith(".weight") and "linear" in name:
                    out["model." + name.replace(".weight", "._extra_state")] = io.BytesIO(b"")
            shards[(t, p)] = out
    return shards


def _layer(key: str) -> int | None:
    import re

    m = re.search(r"layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def _tp_slice(key: str, v: torch.Tensor, t: int, tp: int, gated: bool) -> torch.Tensor:
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return v.chunk(tp, dim=1)[t]
    if key.endswith(("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")):
        return v.chunk(tp, dim=0)[t]
    if key.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        if gated:
            gate, up = v.chunk(2, dim=0)
            return torch.cat([gate.chunk(tp, dim=0)[t], up.chunk(tp, dim=0)[t]])
        return v.chunk(tp, dim=0)[t]
    return v
