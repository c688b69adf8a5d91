"""The one registry of checkpoint formats: every reader (which says whether it `detect`s a path) and every
writer (which says what it cannot represent), by name. A new format is a class here, not a branch elsewhere."""

from __future__ import annotations

from pathlib import Path

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


def open_checkpoint(path: Path | str, options: ReadOptions = ReadOptions()) -> CheckpointReader:
    """A reader for any supported checkpoint, in `options.format` (auto: detected)."""
    from nemo_upcycle.checkpoint.archive import refuse_special_files

    path = Path(path)
    if not path.exists():
        raise UpcycleError(f"{path} does not exist: check the path")
    refuse_special_files(path)
    fmt = detect_format(path) if options.format == "auto" else options.format
    if fmt not in READERS:
        raise UpcycleError(f"unknown input format '{options.format}': use one of {', '.join(INPUT_FORMATS)}")
    if options.model_config is not None and fmt != "megatron":  # it would be silently ignored
        raise UpcycleError(f"model_config=FILE is read only for Megatron checkpoints; {path} is a "
                           f"{fmt} checkpoint, which carries its own config: drop model_config=FILE")
    return READERS[fmt].open(path, options)


def make_writer(path: Path | str, options: WriteOptions = WriteOptions()) -> CheckpointWriter:
    """A writer for `options.format` at `path`. Nothing is written until `write`."""
    if options.format not in WRITERS:
        raise UpcycleError(f"unknown output format '{options.format}': use one of {', '.join(OUTPUT_FORMATS)}")
    return WRITERS[options.format].create(Path(path), options)
