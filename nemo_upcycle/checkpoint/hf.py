"""Hugging Face checkpoint folders (config.json + safetensors), read lazily one layer at a time.

Tensors come from `safetensors.safe_open` (memory-mapped, one tensor at a time); shapes are known from the
headers before anything is read. Names are mapped to Megatron's by `nemo_upcycle.models.hf`.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from nemo_upcycle.checkpoint.base import CheckpointReader, TensorInfo, Tokenizer, model_order
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models import hf as hf_names
from nemo_upcycle.models.keys import layer_index

SUPPORTED = {"nemotron": hf_names.gpt_config_from_nemotron_hf}


class HFReader(CheckpointReader):
    def __init__(self, path: Path | str):
        from safetensors import safe_open

        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise UpcycleError(f"{self.path} has no config.json: pass a Hugging Face model folder")
        self.source_config = json.loads(config_file.read_text())
        model_type = self.source_config.get("model_type")
        if model_type not in SUPPORTED:
            raise UpcycleError(
                f"unsupported Hugging Face model_type '{model_type}': supported are {', '.join(SUPPORTED)}"
            )
        self._files = self._weight_files()
        # Files are opened for the duration of one read: a long-lived memory map would keep every layer
        # already converted in the resident set.
        self._open: dict[str, Any] = {f: safe_open(str(self.path / f), framework="pt") for f in set(self._files.values())}
        vocab = self._meta("model.embed_tokens.weight").shape[0]
        self.config = SUPPORTED[model_type]({**self.source_config, "vocab_size": vocab})
        self._infos = self._index()
        self.tokenizer = self._read_tokenizer()
        self._open = {}

    def _weight_files(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.path / "model.safetensors"
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                return {k: "model.safetensors" for k in f.keys()}
        raise UpcycleError(f"{self.path} has no model.safetensors or model.safetensors.index.json")

    def _has(self, key: str) -> bool:
        return key in self._files

    def _get(self, key: str) -> torch.Tensor:
        if key not in self._files:
            raise UpcycleError(f"tensor '{key}' is missing from {self.path}")
        return self._open[self._files[key]].get_tensor(key)

    def _meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the stored shape and dtype (header only, no data read)."""
        sl = self._open[self._files[key]].get_slice(key)
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[sl.get_dtype()]
        return torch.empty(sl.get_shape(), dtype=dtype, device="meta")

    def _layer(self, i: int, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"decoder.layers.{i}.{k}": v for k, v in hf_names.layer_from_hf(get, self._has, i, self.config).items()}

    def _index(self) -> dict[str, TensorInfo]:
        infos = {ours: _info(self._meta(theirs)) for ours, theirs in hf_names.GLOBAL_KEYS.items() if self._has(theirs)}
        for i in range(self.config.num_layers):
            infos.update({k: _info(v) for k, v in self._layer(i, self._meta).items()})
        infos = model_order(infos)
        unexpected = set(self._files) - _used_hf_keys(self.config, self._has)
        if unexpected:
            raise UpcycleError(
                f"{self.path} has tensors nemo-upcycle cannot map, e.g. {sorted(unexpected)[0]}: is it a "
                f"{self.source_config.get('model_type')} model with a standard layout?"
            )
        return infos

    def _read_tokenizer(self) -> Tokenizer | None:
        spm = self.path / "tokenizer.model"
        if spm.is_file():
            name = f"{uuid.uuid4().hex}_tokenizer.model"
            return Tokenizer({"library": "sentencepiece", "type": None, "model": f"nemo:{name}",
                              "vocab_file": None, "merge_file": None, "delimiter": None,
                              "sentencepiece_legacy": False}, {name: spm.read_bytes()})
        if (self.path / "tokenizer.json").is_file():
            return Tokenizer({"library": "huggingface", "type": str(self.path.resolve()), "use_fast": True})
        return None

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        self._open = {f: safe_open(str(self.path / f), framework="pt") for f in set(self._files.values())}
        try:
            return self._read(names)
        finally:
            self._open = {}

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        wanted = set(names)
        for i in sorted({layer_index(n) for n in names if layer_index(n) is not None}):
            out.update({k: v for k, v in self._layer(i, self._get).items() if k in wanted})
        for n in names:
            if layer_index(n) is None:
                out[n] = self._get(hf_names.GLOBAL_KEYS[n])
        return {n: out[n] for n in names}


def _info(t: torch.Tensor) -> TensorInfo:
    return TensorInfo(tuple(t.shape), t.dtype)


def _used_hf_keys(cfg, has: Callable[[str], bool]) -> set[str]:
    used = {k for k in hf_names.GLOBAL_KEYS.values() if has(k)}
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        used |= {prefix + k for k in hf_names.NEMOTRON_LAYER_KEYS.values() if has(prefix + k)}
        used |= {f"{prefix}self_attn.{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj") for kind in ("weight", "bias")
                 if has(f"{prefix}self_attn.{p}.{kind}")}
    return used
