"""The one registry of checkpoint formats: every reader (which says whether it `detect`s a path) and every
writer (which says what it cannot represent), by name. A new format is a class here, not a branch elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nemo_upcycle.checkpoint.base import CheckpointReader, CheckpointWriter, ReadOptions, WriteOptions
from nemo_upcycle.checkpoint.gguf import GGUFReader
from nemo_upcycle.checkpoint.hf import HFReader
from nemo_upcycle.checkpoint.hf_export import HFExportWriter
from nemo_upcycle.checkpoint.megatron import MegatronReader, MegatronWriter
from nemo_upcycle.checkpoint.nemo import NemoReader, NemoWriter
from nemo_upcycle.errors import UpcycleError

READERS: dict[str, type[CheckpointReader]] = {r.name: r for r in (NemoReader, MegatronReader, HFReader, GGUFReader)}
WRITERS: dict[str, type[CheckpointWriter]] = {w.name: w for w in (NemoWriter, MegatronWriter, HFExportWriter)}
INPUT_FORMATS = ("auto", *READERS)
OUTPUT_FORMATS = tuple(WRITERS)


def detect_format(path: Path) -> str:
    if not path.exists():
        raise UpcycleError(f"{path} does not exist: check the path")
    for name, reader in READERS.items():
        if reader.detect(path):
            return name
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
    if fmt not in READERS:
        raise UpcycleError(f"unknown input format '{input_format}': use one of {', '.join(INPUT_FORMATS)}")
    return READERS[fmt].open(path, ReadOptions(model_config, gguf_dtype))


def make_writer(output_format: str, path: Path | str, overwrite: bool = False, pack: bool = True,
                hf_arch: str | None = None, max_shard_size: str | int | None = None,
                target_engine: str | None = None) -> CheckpointWriter:
    """A writer for `output_format`; `hf_arch` (mixtral, qwen2_moe, qwen3_moe), `max_shard_size` and
    `target_engine` are for Hugging Face folders. Nothing is written until `write`."""
    if output_format not in WRITERS:
        raise UpcycleError(f"unknown output format '{output_format}': use one of {', '.join(OUTPUT_FORMATS)}")
    return WRITERS[output_format].create(Path(path), WriteOptions(overwrite, pack, hf_arch, max_shard_size,
                                                                  target_engine))
