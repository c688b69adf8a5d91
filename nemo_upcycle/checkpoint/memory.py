"""A checkpoint that lives in memory (a model being trained, an in-memory upcycle), behind the reader
interface, so every writer can save it."""

from __future__ import annotations

from typing import Any

import torch

from nemo_upcycle.checkpoint.base import CheckpointReader, TensorInfo, model_order
from nemo_upcycle.data.tokenizers import TokenizerSpec
from nemo_upcycle.models.config import GPTConfig


class InMemoryCheckpoint(CheckpointReader):
    name = "memory"

    def __init__(self, config: GPTConfig, state: dict[str, torch.Tensor], source_config: dict[str, Any] | None = None,
                 tokenizer: TokenizerSpec | None = None):
        self.config, self.source_config, self.tokenizer = config, dict(source_config or {}), tokenizer
        self._state = state  # canonical names (experts stacked)
        self._infos = model_order({k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()})

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self._state[n].detach().cpu() for n in names}
