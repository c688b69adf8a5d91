"""What tensors a model of a config has: shapes and dtypes without data, and the one check of a checkpoint's
tensors against its config. Shared by the readers, the converter and the training module."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.keys import layer_index, stack_experts


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of this config has (canonical names, experts stacked), built on the meta device."""
    from nemo_upcycle.models.reference import GPTModel

    with torch.device("meta"):
        model = GPTModel(cfg)
    return {k: tuple(v.shape) for k, v in stack_experts(model.state_dict()).items()}


def check_tensors(given: dict[str, TensorInfo], cfg: GPTConfig, where: str) -> None:
    """One-line errors for missing or unexpected tensors and shape mismatches against the config."""
    held = len({layer_index(k) for k in given} - {None})
    if cfg.num_layers > held:  # checked before building the config's model, which may declare 2^31 layers
        raise UpcycleError(f"{where} is missing tensor decoder.layers.{held}.* (the config declares {cfg.num_layers} "
                           f"layers, the weights hold {held}): incomplete checkpoint, or a config of another model?")
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in given]
    if missing:
        raise UpcycleError(f"{where} is missing tensor {missing[0]} ({len(missing)} missing): incomplete checkpoint?")
    unexpected = [k for k in given if k not in want]
    if unexpected:
        raise UpcycleError(
            f"{where} has unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected): does model_config "
            "match the weights?"
        )
    for k, shape in want.items():
        if not given[k].dtype.is_floating_point:
            raise UpcycleError(f"tensor {k} in {where} has dtype {str(given[k].dtype).replace('torch.', '')}: only "
                               "floating-point checkpoints can be upcycled; is the checkpoint corrupt or quantised?")
        if given[k].shape != shape:
            raise UpcycleError(
                f"shape mismatch for {k} in {where}: checkpoint {given[k].shape}, config implies {shape}"
            )
