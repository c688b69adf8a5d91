"""Train/valid/test GPT datasets from preprocessed `.bin/.idx` files, built by Megatron-core itself.

`build_gpt_datasets` hands a blend, a split string and sample counts to Megatron-core's
BlendedMegatronDatasetBuilder with a GPTDatasetConfig, so training sees the samples Megatron-LM would: each
epoch's documents shuffled with `seed`, concatenated and cut into windows of seq_length + 1 tokens. Items are
dicts of tensors: `tokens`, `labels` (the same window shifted by one), `loss_mask`, `position_ids`, plus
`dataset_id` from a blend of several prefixes. No `attention_mask`: the models build their causal mask, and a
[1, seq, seq] mask per sample would dominate the batch's memory. Use them with a plain torch DataLoader.

The index cache (Megatron's `path_to_cache`): Megatron saves each dataset's document, sample and shuffle
indices (small .npy files) and reuses them when the data prefix, split, seed, seq_length, sample count and
tokenizer checksum match. They go to `cache_dir` (default: `index_cache/` next to the first data prefix, never
the home folder), in a sub-folder named by a fingerprint of the data files' sizes and times, so data written
again under the same prefix never meets stale indices. When torch.distributed is initialised, rank 0 builds
the indices first and the other ranks read them, so `cache_dir` must be on a shared file system; without it
the build runs in this process alone.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from nemo_upcycle.data.tokenizers import Tokenizer
from nemo_upcycle.errors import UpcycleError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

Blend = tuple[list[str], list[float] | None]


class GPTSplits(NamedTuple):
    """The three datasets; None for a split with no share of the data (test in "99,1,0"), and on ranks where
    is_built_on_rank() is False."""

    train: Dataset | None
    valid: Dataset | None
    test: Dataset | None


def parse_blend(blend: str | Sequence[str | float]) -> Blend:
    """Megatron's `--data-path` forms: `["0.7", "a", "0.3", "b"]` (weight, prefix pairs) or `["a", "b"]`
    (each prefix weighted by its size); a string is split on whitespace. Checks every prefix's files exist."""
    items = blend.split() if isinstance(blend, str) else [str(item) for item in blend]
    if not items:
        raise UpcycleError("the data blend is empty; give at least one dataset prefix (from nemo-upcycle "
                           "preprocess, e.g. data/stdlib_text_document)")
    weights = None
    if len(items) % 2 == 0 and all(_is_number(w) for w in items[::2]):
        weights, items = [float(w) for w in items[::2]], items[1::2]
        if min(weights) <= 0:
            raise UpcycleError(f"blend weights {weights} must all be positive; drop a dataset instead of giving "
                               f"it weight 0")
    for prefix in items:
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        if missing:
            raise UpcycleError(f"dataset prefix {prefix}: {' and '.join(missing)} not found; give the path without "
                               f".bin/.idx, as written by nemo-upcycle preprocess (PREFIX_text_document)")
    return items, weights


def _is_number(text: str) -> bool:
    return re.fullmatch(r"[0-9]*\.?[0-9]+", text) is not None  # what Megatron's split parser reads


def _check_split(split: str) -> None:
    parts = split.split(",")
    if len(parts) > 3 or not all(_is_number(p.strip()) for p in parts) or sum(float(p) for p in parts) <= 0:
        raise UpcycleError(f"split {split!r} must be up to three non-negative train,valid,test weights with a "
                           f"positive sum, e.g. 949,50,1")


def data_fingerprint(prefixes: Sequence[str]) -> str:
    """A short hash of the data files' paths, sizes and modification times."""
    digest = hashlib.sha256()
    for prefix in prefixes:
        for path in (prefix + ".bin", prefix + ".idx"):
            st = os.stat(path)
            digest.update(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def build_gpt_datasets(blend: str | Sequence[str | float], tokenizer: Tokenizer, seq_length: int, *,
                       split: str = "949,50,1",
                       num_samples: Sequence[int | None] = (None, None, None), seed: int = 1234,
                       cache_dir: str | Path | None = None, reset_position_ids: bool = False,
                       eod_mask_loss: bool = False,
                       is_built_on_rank: Callable[[], bool] = lambda: True) -> GPTSplits:
    """Megatron GPTDatasets for train/valid/test, see the module docstring.

    num_samples: samples wanted per split, None for one epoch. One prefix: whole epochs, at least that many.
    Weighted blend (needs all three counts): exactly that many. Unweighted blend: one epoch of each prefix,
    capped at that many.
    reset_position_ids restarts positions after each end-of-document token; eod_mask_loss drops the loss on it.
    is_built_on_rank: Megatron's hook for ranks that need no data (e.g. middle pipeline stages).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_blend(blend)
    _check_split(split)
    num_samples = list(num_samples)
    if len(num_samples) != 3 or any(n is not None and n < 0 for n in num_samples):
        raise UpcycleError(f"num_samples {num_samples} must be three counts (train, valid, test), each None or "
                           f">= 0")
    if weights is not None and None in num_samples:
        raise UpcycleError(f"a weighted blend needs a sample count for every split, got {num_samples}; give "
                           f"all three or leave out the weights")
    if seq_length < 1:
        raise UpcycleError(f"seq_length {seq_length} must be at least 1")
    _check_every_split_has_documents(prefixes, split, num_samples)
    cache_dir = Path(cache_dir) if cache_dir is not None else Path(prefixes[0]).parent / "index_cache"
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=str(cache_dir / data_fingerprint(prefixes)), tokenizer=tokenizer,
        reset_position_ids=reset_position_ids, reset_attention_mask=False, eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, num_samples, is_built_on_rank, config)
    with _process_group():
        return GPTSplits(*builder.build())


def _check_every_split_has_documents(prefixes: Sequence[str], split: str, num_samples: list[int | None]) -> None:
    """Megatron loops forever when samples are asked of a split that got no documents; say so instead."""
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        documents = len(IndexedDataset(prefix))
        for name, bounds, wanted in zip(("train", "valid", "test"), matrix, num_samples):
            # the same rounding as Megatron's builder; an unweighted blend needs every part non-empty too
            empty = bounds is not None and round(bounds[0] * documents) == round(bounds[1] * documents)
            if empty and (wanted or (wanted is None and len(prefixes) > 1)):
                raise UpcycleError(f"split {split} gives the {name} split none of the {documents} documents of "
                                   f"{prefix}; add documents, change the split, or ask for 0 {name} samples")


@contextmanager
def _process_group() -> Iterator[None]:
    """A one-process group for the build when none exists (a shim for megatron-core 0.16: BlendedDataset calls
    torch.distributed.get_rank() unguarded on a cache miss). In-memory store, no network; removed after."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class MegatronOrderSampler(torch.utils.data.Sampler[int]):
    """Megatron-LM's sample order for pretraining data (already shuffled by GPTDataset): in order, each of the
    `data_parallel` ranks taking every data_parallel-th sample, starting after `consumed()` samples. A global
    batch thus holds the same consecutive samples whatever the data-parallel size, and a resumed run, whose
    trainer has consumed global_step x global_batch_size samples, continues with the next ones."""

    def __init__(self, size: int, data_parallel: int = 1, rank: int = 0, consumed: Callable[[], int] = lambda: 0):
        self.size, self.data_parallel, self.rank, self.consumed = size, data_parallel, rank, consumed

    def _indices(self) -> range:
        start = min(self.consumed(), self.size)
        stop = start + (self.size - start) // self.data_parallel * self.data_parallel
        return range(start + self.rank, stop, self.data_parallel)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())
