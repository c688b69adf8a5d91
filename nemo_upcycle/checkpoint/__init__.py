"""Checkpoint formats behind one reader/writer interface (see base.py).

Readers: `.nemo` (tar or directory; torch_dist or legacy TP/PP layouts), Megatron-LM / Megatron-Bridge
torch_dist directories, Hugging Face folders. Writers: `.nemo` (NeMo 1.x MegatronGPTModel), Megatron torch_dist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemo_upcycle.checkpoint.base import CheckpointReader, CheckpointWriter, TensorInfo, Tokenizer
from nemo_upcycle.errors import UpcycleError

INPUT_FORMATS = ("auto", "nemo", "megatron", "hf")
OUTPUT_FORMATS = ("nemo", "megatron")


def detect_format(path: Path) -> str:
    if not path.exists():
        raise UpcycleError(f"{path} does not exist: check the path")
    if path.is_file():
        return "nemo"
    if (path / "model_config.yaml").is_file():
        return "nemo"
    if (path / "config.json").is_file():
        return "hf"
    return "megatron"


def open_checkpoint(path: Path | str, input_format: str = "auto",
                    model_config: dict[str, Any] | None = None) -> CheckpointReader:
    """A reader for any supported checkpoint; `model_config` supplies NeMo-style model fields where the
    checkpoint carries none (Megatron directories without saved args)."""
    path = Path(path)
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
    raise UpcycleError(f"unknown input format '{input_format}': use one of {', '.join(INPUT_FORMATS)}")


def make_writer(output_format: str, path: Path | str, overwrite: bool = False, pack: bool = True) -> CheckpointWriter:
    if output_format == "nemo":
        from nemo_upcycle.checkpoint.nemo import NemoWriter

        return NemoWriter(Path(path), overwrite, pack)
    if output_format == "megatron":
        from nemo_upcycle.checkpoint.megatron import MegatronWriter

        return MegatronWriter(Path(path), overwrite)
    raise UpcycleError(f"unknown output format '{output_format}': use one of {', '.join(OUTPUT_FORMATS)}")


__all__ = ["CheckpointReader", "CheckpointWriter", "TensorInfo", "Tokenizer", "open_checkpoint", "make_writer",
           "detect_format"]
