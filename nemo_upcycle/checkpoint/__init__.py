"""Checkpoint formats behind one reader/writer interface (see base.py).

Readers: `.nemo` (tar or directory; torch_dist or legacy TP/PP layouts), Megatron-LM / Megatron-Bridge
torch_dist directories, Hugging Face folders (Llama, Mistral, Qwen2, Qwen3, Nemotron; Mixtral, Qwen2-MoE,
Qwen3-MoE), Llama GGUF files (llama.cpp; dequantised). Writers: `.nemo` (NeMo 1.x MegatronGPTModel), Megatron torch_dist, Hugging Face MoE folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nemo_upcycle.checkpoint.base import CheckpointReader, CheckpointWriter, TensorInfo
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.data.tokenizers import TOKENIZER_ARGUMENT_HELP, Tokenizer, TokenizerSpec
from nemo_upcycle.models.config import GPTConfig

INPUT_FORMATS = ("auto", "nemo", "megatron", "hf", "gguf")
OUTPUT_FORMATS = ("nemo", "megatron", "hf")


def detect_format(path: Path) -> str:
    if not path.exists():
        raise UpcycleError(f"{path} does not exist: check the path")
    if path.is_file():
        return "gguf" if path.suffix.lower() == ".gguf" else "nemo"
    megatron_markers = (".metadata", "latest_checkpointed_iteration.txt")
    if any((path / m).is_file() for m in megatron_markers) or any(path.glob("iter_*")):
        return "megatron"
    if (path / "model_config.yaml").is_file():
        return "nemo"
    if (path / "config.json").is_file():
        return "hf"
    raise UpcycleError(f"{path} is not a .nemo directory, Megatron checkpoint or Hugging Face folder: pass "
                       "--input-format if it is one")


def open_checkpoint(path: Path | str, input_format: str = "auto", model_config: dict[str, Any] | None = None,
                    gguf_dtype: torch.dtype = torch.bfloat16) -> CheckpointReader:
    """A reader for any supported checkpoint; `model_config` supplies NeMo-style model fields where the
    checkpoint carries none (Megatron directories without saved args); `gguf_dtype`: what a GGUF file's
    (quantised) tensors are dequantised to."""
    from nemo_upcycle.checkpoint.archive import refuse_special_files

    path = Path(path)
    if not path.exists():
        raise UpcycleError(f"{path} does not exist: check the path")
    refuse_special_files(path)
    fmt = detect_format(path) if input_format == "auto" else input_format
    if fmt == "nemo":
        from nemo_upcycle.checkpoint.nemo import NemoReader

        return NemoReader(path)
    if fmt == "hf":
        from nemo_upcycle.checkpoint.hf import HFReader

        return HFReader(path)
    if fmt == "megatron":
        from nemo_upcycle.checkpoint.megatron import MegatronReader

        return MegatronReader(path, model_config)
    if fmt == "gguf":
        from nemo_upcycle.checkpoint.gguf import GGUFReader

        return GGUFReader(path, gguf_dtype)
    raise UpcycleError(f"unknown input format '{input_format}': use one of {', '.join(INPUT_FORMATS)}")


def make_writer(output_format: str, path: Path | str, overwrite: bool = False, pack: bool = True,
                hf_arch: str | None = None, max_shard_size: str | int | None = None) -> CheckpointWriter:
    """A writer for `output_format`; `hf_arch` (mixtral, qwen2_moe, qwen3_moe) and `max_shard_size` are for
    Hugging Face folders."""
    if output_format == "nemo":
        from nemo_upcycle.checkpoint.nemo import NemoWriter

        return NemoWriter(Path(path), overwrite, pack)
    if output_format == "megatron":
        from nemo_upcycle.checkpoint.megatron import MegatronWriter

        return MegatronWriter(Path(path), overwrite)
    if output_format == "hf":
        from nemo_upcycle.checkpoint.hf_export import DEFAULT_MAX_SHARD_SIZE, HF_ARCHS, HFExportWriter

        if hf_arch is None:
            raise UpcycleError(f"--format hf needs --hf-arch: one of {', '.join(HF_ARCHS)}")
        return HFExportWriter(Path(path), overwrite, hf_arch, max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    raise UpcycleError(f"unknown output format '{output_format}': use one of {', '.join(OUTPUT_FORMATS)}")


def check_output_format(output_format: str, config: GPTConfig, hf_arch: str | None = None,
                        target_engine: str | None = None) -> None:
    """Refuse, before any tensor is read, a model `output_format` cannot represent exactly, or that
    `target_engine` would compute differently (one-line errors)."""
    if output_format == "hf":
        from nemo_upcycle.checkpoint.hf_keys import MOE_ARCHS, check_hf_target, engine_problem

        if not hf_arch:
            raise UpcycleError(f"--format hf needs --hf-arch: one of {', '.join(MOE_ARCHS)}")
        check_hf_target(config, hf_arch)
        problem = engine_problem(config, hf_arch, target_engine) if target_engine else None
        if problem:
            raise UpcycleError(f"--target-engine {target_engine} --hf-arch {hf_arch}: {problem}")
    elif target_engine:
        raise UpcycleError(f"--target-engine is for --format hf exports; {output_format} output has no engine to "
                           "check against: drop --target-engine")
    if output_format in ("nemo", "megatron"):
        from nemo_upcycle.checkpoint.megatron import megatron_args
        from nemo_upcycle.checkpoint.nemo_config import check_nemo_expressible, nemo_config_from_gpt

        nemo_config_from_gpt(config)
        if output_format == "nemo":
            check_nemo_expressible(config)
        else:
            megatron_args(config)


def load_tokenizer_of(source: CheckpointReader | TokenizerSpec | Path | str) -> Tokenizer:
    """The tokenizer of a checkpoint (a reader, its TokenizerSpec, or a .nemo path: only its config and
    tokenizer artifacts are read). Artifacts are loaded into memory; nothing stays on disk."""
    from nemo_upcycle.data.tokenizers import load_tokenizer_spec

    where = "the checkpoint"
    if isinstance(source, (str, Path)):
        from nemo_upcycle.checkpoint.nemo import NemoFiles

        files = NemoFiles(source)
        files.close()
        spec, where = files.tokenizer, str(source)
    else:
        spec = source if isinstance(source, TokenizerSpec) else source.tokenizer
    if spec is None:
        raise UpcycleError(f"{where} has no tokenizer section in its model_config.yaml: pass a tokenizer explicitly "
                           "(a SentencePiece .model, a Hugging Face tokenizer folder, or 'byte')")
    return load_tokenizer_spec(spec)


def tokenizer_from_argument(argument: str) -> Tokenizer:
    """The tokenizer a `--tokenizer` argument names: 'byte', a .nemo file or extracted .nemo folder (the
    tokenizer in its model_config.yaml), a SentencePiece .model file, or a Hugging Face tokenizer folder."""
    import tarfile

    from nemo_upcycle.data.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer

    if argument == "byte":
        return ByteTokenizer()
    path = Path(argument).expanduser()
    if not path.exists():
        raise UpcycleError(f"tokenizer {argument} does not exist; pass {TOKENIZER_ARGUMENT_HELP}")
    if (path / "model_config.yaml").is_file() or (path.is_file() and (path.suffix == ".nemo" or
                                                                      tarfile.is_tarfile(path))):
        return load_tokenizer_of(path)  # reads only model_config.yaml and the tokenizer artifacts
    if path.is_dir():
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def load_model(path: Path | str, input_format: str = "auto", model_config: dict[str, Any] | None = None):
    """A checkpoint as (reference GPTModel in eval mode, its tokenizer), all in memory: for evaluation and
    small-scale work. Weights keep their stored dtype."""
    from nemo_upcycle.models.keys import unstack_experts
    from nemo_upcycle.models.reference import GPTModel

    with open_checkpoint(path, input_format, model_config) as reader:
        state = unstack_experts(reader.state_dict())
        dtypes = {t.dtype for t in state.values()}
        model = GPTModel(reader.config)
        if len(dtypes) == 1:
            model.to(dtypes.pop())
        model.load_state_dict(state)
        tokenizer = load_tokenizer_of(reader)
    return model.eval(), tokenizer


__all__ = ["CheckpointReader", "CheckpointWriter", "TensorInfo", "open_checkpoint", "make_writer",
           "check_output_format", "detect_format", "load_model", "load_tokenizer_of", "tokenizer_from_argument"]
