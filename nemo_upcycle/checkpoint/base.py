"""The one reader and one writer interface every checkpoint format implements.

Readers expose tensors lazily under canonical names (the reference model's local-spec keys, experts stacked:
see checkpoint/layout.py) and read only what is asked for. Writers are sinks that pull each tensor through a
`fetch(name)` callback in their own storage order, so the converter never holds more than one layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import torch

from nemo_upcycle.data.tokenizers import TokenizerSpec
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.keys import layer_index
from nemo_upcycle.models.manifest import TensorInfo


class CheckpointReader(ABC):
    """A dense or MoE GPT checkpoint, read tensor by tensor."""

    config: GPTConfig
    source_config: dict[str, Any]  # the format's own model config, passed through to outputs where it fits
    tokenizer: TokenizerSpec | None = None

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

    def __init__(self, path: Path, overwrite: bool = False):
        self.path, self.overwrite = Path(path), overwrite

    @abstractmethod
    def write(self, config: GPTConfig, tensors: dict[str, TensorInfo], fetch: Fetch,
              source: CheckpointReader) -> None:
        """Write the checkpoint atomically: nothing appears at `self.path` until it is complete."""

    @abstractmethod
    def overhead_bytes(self, tensors: dict[str, TensorInfo]) -> int:
        """Bytes written beyond the tensors themselves (for the free-disk check)."""
