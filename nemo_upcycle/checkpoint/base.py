"""The one reader and one writer interface every checkpoint format implements.

Readers expose tensors lazily under canonical names (the reference model's local-spec keys, experts stacked:
see checkpoint/layout.py) and read only what is asked for; each says whether it `detect`s a path. Writers are
sinks that pull each tensor through a `fetch(name)` callback in their own storage order, so the converter never
holds more than one layer; each says what it cannot represent (`problem`) before anything is read. What a
writer carries over from the source besides tensors comes as a `SourceMeta`, never as the reader itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from nemo_upcycle.data.tokenizers import TokenizerSpec
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.keys import layer_index
from nemo_upcycle.models.manifest import TensorInfo


@dataclass(frozen=True)
class ReadOptions:
    """How to read a checkpoint: `format`, an input format name or auto (detected); `model_config`, NeMo-style
    model fields for Megatron directories (used instead of their saved args); `gguf_dtype`, what a GGUF file's (quantised)
    tensors are dequantised to."""

    format: str = "auto"
    model_config: dict[str, Any] | None = None
    gguf_dtype: torch.dtype = torch.bfloat16


@dataclass(frozen=True)
class WriteOptions:
    """How to write a checkpoint: `format`, an output format name; `overwrite` an existing output; `pack` (.nemo
    as a tar, else a directory); `hf_arch`, `max_shard_size` and `target_engine` (Hugging Face folders)."""

    format: str = "nemo"
    overwrite: bool = False
    pack: bool = True
    hf_arch: str | None = None
    max_shard_size: str | int | None = None
    target_engine: str | None = None


@dataclass
class SourceMeta:
    """What a writer carries over from the source besides its tensors."""

    format: str  # the source reader's name: nemo, megatron, hf, gguf; memory for a model in memory
    config: dict[str, Any]  # the source format's own model config
    tokenizer: TokenizerSpec | None = None
    extra_files: dict[str, Path] = field(default_factory=dict)  # name -> file an output of its family copies


class CheckpointReader(ABC):
    """A dense or MoE GPT checkpoint, read tensor by tensor."""

    name: ClassVar[str]  # the --input-format name
    config: GPTConfig
    source_config: dict[str, Any]  # the format's own model config, passed through to outputs where it fits
    tokenizer: TokenizerSpec | None = None

    @staticmethod
    def detect(path: Path) -> bool:
        """Whether `path` (which exists) is a checkpoint of this format; no reader claims another's paths."""
        return False

    @classmethod
    def open(cls, path: Path, options: ReadOptions) -> "CheckpointReader":
        return cls(path)

    def meta(self) -> SourceMeta:
        return SourceMeta(self.name, self.source_config, self.tokenizer)

    @abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """Canonical name -> shape and dtype, for every weight, in model order."""

    @abstractmethod
    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (ideally in one pass over the files)."""

    def layer_names(self, layer: int) -> list[str]:
        return [n for n in self.tensors() if layer_index(n) == layer]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything, in memory: for small models (tests, the demo, evaluation)."""
        return self.read(list(self.tensors()))

    def close(self) -> None:
        """Release open files and temporary extractions."""

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Fetch = Callable[[str], torch.Tensor]


def refusal(check: Callable[[], object]) -> str | None:
    """The one-line error `check` raises, as a writer's `problem` (None when it passes)."""
    try:
        check()
    except UpcycleError as err:
        return str(err)
    return None


def model_order(infos: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """Embedding, then the layers in order, then the final norm and the output layer."""
    def key(name: str) -> tuple[int, int]:
        i = layer_index(name)
        if i is not None:
            return (1, i)
        return (0 if name.startswith("embedding") else 2, 0)
    return {n: infos[n] for n in sorted(infos, key=key)}  # stable: keeps each layer's own order


class CheckpointWriter(ABC):
    """A sink for one checkpoint: `write` pulls every planned tensor through `fetch`, exactly once."""

    name: ClassVar[str]  # the --format name

    def __init__(self, path: Path, overwrite: bool = False):
        self.path, self.overwrite = Path(path), overwrite

    @classmethod
    def create(cls, path: Path, options: WriteOptions) -> "CheckpointWriter":
        if options.target_engine:
            raise UpcycleError(f"target_engine is for output_format=hf exports; {cls.name} output has no engine to "
                               "check against: drop target_engine")
        return cls(path, options.overwrite)

    def problem(self, config: GPTConfig) -> str | None:
        """Why this format cannot hold `config` exactly (one line), or None; asked before any tensor is read."""
        return None

    def check(self, config: GPTConfig) -> None:
        problem = self.problem(config)
        if problem:
            raise UpcycleError(problem)

    @abstractmethod
    def fetch_order(self, config: GPTConfig, tensors: dict[str, TensorInfo]) -> list[str]:
        """The order in which `write` fetches `tensors`, each once (the converter checks it takes one layer at a
        time, and every fetch against it)."""

    @abstractmethod
    def write(self, config: GPTConfig, tensors: dict[str, TensorInfo], fetch: Fetch, source: SourceMeta) -> None:
        """Write the checkpoint atomically: nothing appears at `self.path` until it is complete."""

    @abstractmethod
    def overhead_bytes(self, tensors: dict[str, TensorInfo]) -> int:
        """Bytes written beyond the tensors themselves (for the free-disk check)."""
