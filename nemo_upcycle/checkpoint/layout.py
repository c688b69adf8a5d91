"""Where each tensor of a GPT lives in a Megatron torch_dist checkpoint (the TE-spec names NeMo and
Megatron-LM train with), and the reverse.

Inside this project every tensor has a canonical name: the reference model's local-spec key with experts
stacked, e.g. `decoder.layers.3.input_layernorm.weight` or `decoder.layers.3.mlp.experts.linear_fc1.weight`
[N, F, H]. In a torch_dist checkpoint the same tensor is

    <prefix>decoder.layers.self_attention.linear_qkv.layer_norm_weight      [L, H]        at index (3,)
    <prefix>decoder.layers.mlp.experts.experts.linear_fc1.weight           [L, N, F, H]  at index (3,)

when all layers are alike (Megatron stacks them), or `<prefix>decoder.layers.3.<...>` with no layer axis when
dense and MoE layers are mixed (`moe_layer_freq` not 1). NeMo prefixes `model.`; Megatron-LM and
Megatron-Bridge use no prefix.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemo_upcycle.checkpoint.archive import TarWriter
from nemo_upcycle.checkpoint.base import Fetch
from nemo_upcycle.checkpoint.torch_dist import BytesItem, Chunk, write_dist_checkpoint
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.keys import layer_index, local_to_te_key, te_to_local_key
from nemo_upcycle.models.manifest import TensorInfo

# Modules whose Megatron checkpoints carry an `_extra_state` object (Transformer Engine's FP8 metadata).
_EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                        "mlp.linear_fc2", "mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2")
_SHARED_EXPERT_MODULES = ("mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2")
_STACKED_LAYER = re.compile(r"^(?P<prefix>.*?)decoder\.layers\.(?P<rest>[a-z_].*)$")
_PER_LAYER = re.compile(r"^(?P<prefix>.*?)decoder\.layers\.(?P<i>\d+)\.(?P<rest>.*)$")


@dataclass(frozen=True)
class DistKey:
    fqn: str  # the global tensor's key in the checkpoint
    index: tuple[int, ...]  # leading indices of our tensor inside it: (layer,) when layers are stacked


def layers_stacked(cfg: GPTConfig) -> bool:
    """Megatron stacks layers in its checkpoints exactly when they are homogeneous (moe_layer_freq == 1)."""
    return not cfg.is_moe or cfg.moe_layer_freq == 1


def dist_key(name: str, cfg: GPTConfig, prefix: str) -> DistKey:
    m = _PER_LAYER.match(name)
    if not m:
        return DistKey(prefix + name, ())
    i, rest = int(m["i"]), m["rest"]
    pattern = cfg.moe_layer_pattern()
    if rest.startswith("mlp.experts.linear_fc"):
        rest = "mlp.experts.experts." + rest[len("mlp.experts."):]
    else:
        rest = local_to_te_key(f"decoder.layers.{i}.{rest}", pattern[i]).split(f"layers.{i}.", 1)[1]
    if layers_stacked(cfg):
        return DistKey(f"{prefix}decoder.layers.{rest}", (i,))
    return DistKey(f"{prefix}decoder.layers.{i}.{rest}", ())


def canonical_names(fqn: str, shape: tuple[int, ...], prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    """A checkpoint tensor -> the canonical names it holds, each with its leading index into the tensor."""
    if not fqn.startswith(prefix):
        return []
    key = fqn[len(prefix):]
    m = _PER_LAYER.match(key)
    if m:
        return [(_canonical_layer_name(int(m["i"]), m["rest"]), ())]
    m = _STACKED_LAYER.match(key)
    if m:
        return [(_canonical_layer_name(i, m["rest"]), (i,)) for i in range(shape[0])]
    return [(key, ())]


def _canonical_layer_name(i: int, rest: str) -> str:
    if rest.startswith("mlp.experts.experts."):
        rest = "mlp.experts." + rest[len("mlp.experts.experts."):]
    return te_to_local_key(f"decoder.layers.{i}.{rest}")


def extra_state_keys(cfg: GPTConfig, prefix: str) -> list[tuple[str, int]]:
    """The `_extra_state` object keys Megatron's TE-spec model expects, with their layer: one per linear
    module (and per expert), named `<module>._extra_state/shard_<offsets>_<shape>` as Megatron names them."""
    keys = []
    stacked, n_layers = layers_stacked(cfg), cfg.num_layers
    for i, moe in enumerate(cfg.moe_layer_pattern()):
        modules = _EXTRA_STATE_MODULES[:2] + (_EXTRA_STATE_MODULES[4:] if moe else _EXTRA_STATE_MODULES[2:4])
        if moe and cfg.moe_shared_expert_intermediate_size:
            modules += _SHARED_EXPERT_MODULES
        for module in modules:
            base = f"{prefix}decoder.layers.{module}" if stacked else f"{prefix}decoder.layers.{i}.{module}"
            if module.startswith("mlp.experts."):
                n = cfg.num_moe_experts
                for e in range(n):
                    where = f"{i}.{e}_{n_layers}.{n}" if stacked else f"{e}_{n}"
                    keys.append((f"{base}._extra_state/shard_{where}", i))
            else:
                keys.append((f"{base}._extra_state/shard_{i}_{n_layers}" if stacked
                             else f"{base}._extra_state/shard_0_1", i))
    return keys


def empty_extra_state() -> bytes:
    """What Megatron stores for a module without FP8 state: a list holding one None, torch-serialised."""
    buf = io.BytesIO()
    torch.save([None], buf)
    return buf.getvalue()


# ---- the torch_dist layout of a whole model -------------------------------------------------------------

def dist_fetch_order(tensors: dict[str, TensorInfo]) -> list[str]:
    """The order `write_megatron_dist` fetches tensors in: the global ones, then layer by layer, each layer in
    the order given (its chunks are written grouped so)."""
    return sorted(tensors, key=lambda name: -1 if layer_index(name) is None else layer_index(name))


def write_megatron_dist(path: Path | str, config: GPTConfig, tensors: dict[str, TensorInfo], fetch: Fetch,
                        prefix: str, tar: TarWriter | None = None, common: dict | None = None) -> None:
    """Write every tensor of `tensors` (canonical names) as Megatron stores it: TE-spec keys, layers stacked
    when homogeneous, one chunk per layer (and per expert), `_extra_state` objects where TE expects them.

    Each tensor is fetched once, when its first chunk is written, and dropped after its last one."""
    items: list[Chunk | BytesItem] = []
    source: dict[tuple[str, tuple[int, ...]], tuple[str, int | None]] = {}  # chunk -> (name, expert)
    for name, info in tensors.items():
        key = dist_key(name, config, prefix)
        layer = layer_index(name)
        global_shape = ((config.num_layers,) if key.index else ()) + info.shape
        experts = range(info.shape[0]) if ".mlp.experts.experts." in key.fqn else [None]
        for e in experts:
            index = key.index + (() if e is None else (e,))
            offsets = index + (0,) * (len(global_shape) - len(index))
            sizes = (1,) * len(index) + info.shape[len(index) - len(key.index):]
            items.append(Chunk(key.fqn, global_shape, info.dtype, offsets, sizes, -1 if layer is None else layer))
            source[(key.fqn, offsets)] = (name, e)
    extra = empty_extra_state()
    items += [BytesItem(fqn, extra, layer) for fqn, layer in extra_state_keys(config, prefix)]
    items.sort(key=lambda item: item.group)  # stable: model order within each layer

    current: dict[str, Any] = {"name": None, "tensor": None}

    def produce(chunk: Chunk) -> torch.Tensor:
        name, expert = source[(chunk.fqn, chunk.offsets)]
        if current["name"] != name:
            current["name"], current["tensor"] = name, None  # drop the previous tensor first
            current["tensor"] = fetch(name)
        tensor = current["tensor"] if expert is None else current["tensor"][expert]
        return tensor.reshape(chunk.sizes)

    write_dist_checkpoint(path, items, produce, common=common, tar=tar)
