"""Hugging Face checkpoint folders (config.json + safetensors), read lazily one layer at a time.

Dense Llama, Mistral, Qwen2, Qwen3 and Nemotron models, and the MoE Mixtral, Qwen2-MoE and Qwen3-MoE (experts
one tensor each as `save_pretrained` writes them, or fused as transformers 5 holds them in memory). Tensors come
from `safetensors.safe_open` (one tensor at a time); shapes are known from the headers before anything is read.
Names and configs are mapped to Megatron's by `nemo_upcycle.checkpoint.hf_keys`, one literal table per family.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from nemo_upcycle.checkpoint import hf_keys as hf_names
from nemo_upcycle.checkpoint.base import CheckpointReader, SourceMeta, TensorInfo, model_order
from nemo_upcycle.checkpoint.megatron import is_megatron_dir
from nemo_upcycle.data.tokenizers import HF_TOKENIZER_ARTIFACTS, TokenizerSpec
from nemo_upcycle.errors import UpcycleError, bad_file
from nemo_upcycle.models.keys import layer_index

# Files a Hugging Face export carries over from its source folder (tokenizer and generation defaults).
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                 "chat_template.json", "generation_config.json")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def packed_hf_tokenizer(folder: Path, name: str | None = None) -> TokenizerSpec:
    """A Hugging Face tokenizer folder as a NeMo tokenizer whose files travel as `nemo:` artifacts, so the
    output never needs `folder` again (`name`: the tokenizer's `type`, default the folder's name)."""
    config: dict[str, Any] = {"library": "huggingface", "type": name or folder.name, "use_fast": True}
    artifacts = {}
    for filename, key in HF_TOKENIZER_ARTIFACTS.items():
        if (folder / filename).is_file():
            artifact = f"{uuid.uuid4().hex}_{filename}"
            config[key], artifacts[artifact] = f"nemo:{artifact}", (folder / filename).read_bytes()
    return TokenizerSpec(config, artifacts)


class HFReader(CheckpointReader):
    name = "hf"

    @staticmethod
    def detect(path: Path) -> bool:
        """A folder with a config.json that is neither a Megatron nor an extracted .nemo directory."""
        return (path.is_dir() and (path / "config.json").is_file() and not is_megatron_dir(path)
                and not (path / "model_config.yaml").is_file())

    def meta(self) -> SourceMeta:
        return SourceMeta(self.name, self.source_config, self.tokenizer, dict(self.carried_files))

    def __init__(self, path: Path | str):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise UpcycleError(f"{self.path} has no config.json: pass a Hugging Face model folder")
        self.source_config = _load_json(config_file)
        self.family = self.source_config.get("model_type")
        if not isinstance(self.family, str) or self.family not in hf_names.FAMILIES:
            raise UpcycleError(f"unsupported Hugging Face model_type '{self.family}': supported are "
                               f"{', '.join(hf_names.FAMILIES)}")
        self._files = self._weight_files()
        # Files are opened for the duration of one read: a long-lived memory map would keep every layer
        # already converted in the resident set.
        self._open: dict[str, Any] = self._open_files()
        if not self._has("model.embed_tokens.weight"):
            raise UpcycleError(f"{self.path} has no model.embed_tokens.weight: is it a decoder-only language model?")
        vocab = self._meta("model.embed_tokens.weight").shape[0]
        with bad_file(config_file, "has a value of the wrong type", "fix that field or re-download config.json"):
            self.config = hf_names.gpt_config_from_hf({**self.source_config, "vocab_size": vocab})
        self._check_layers()
        self._ignored = self._noop_shared_experts()
        if self.config.share_embeddings_and_output_weights and self._has("lm_head.weight"):
            self._ignored.add("lm_head.weight")  # a copy of the tied embedding; transformers ignores it too
        self._infos = self._index()
        self.tokenizer = self._read_tokenizer()
        self.carried_files = {n: self.path / n for n in CARRIED_FILES if (self.path / n).is_file()}
        self._open = {}

    def _weight_files(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _load_json(index).get("weight_map")
            if not (isinstance(weight_map, dict) and all(
                    isinstance(k, str) and isinstance(f, str) and (self.path / f).is_file()
                    and "/" not in f and f not in (".", "..") for k, f in weight_map.items())):
                raise UpcycleError(f"{index} has no weight_map of tensor names to safetensors files in {self.path} "
                                   "(or names a missing file): re-download the checkpoint")
            return dict(weight_map)
        single = self.path / "model.safetensors"
        if single.is_file():
            from safetensors import safe_open

            with bad_file(single, "is not a readable safetensors file (truncated or corrupt header?)"):
                with safe_open(str(single), framework="pt") as f:
                    return {k: "model.safetensors" for k in f.keys()}
        raise UpcycleError(f"{self.path} has no model.safetensors or model.safetensors.index.json")

    def _open_files(self) -> dict[str, Any]:
        from safetensors import safe_open

        files = {}
        for name in sorted(set(self._files.values())):
            with bad_file(self.path / name, "is not a readable safetensors file (truncated or corrupt header?)"):
                files[name] = safe_open(str(self.path / name), framework="pt")
        return files

    def _check_layers(self) -> None:
        """The layers the weights hold are those config.json declares (checked before any loop over them)."""
        held = {int(m[1]) for k in self._files if (m := re.match(r"model\.layers\.(\d+)\.", k))}
        if len(held) != self.config.num_layers or held != set(range(self.config.num_layers)):
            raise UpcycleError(f"config.json in {self.path} declares {self.config.num_layers} layers but the weights "
                               f"hold {len(held)} (model.layers.N): does config.json belong to these weights?")

    def _has(self, key: str) -> bool:
        return key in self._files

    def _get(self, key: str) -> torch.Tensor:
        if key not in self._files:
            raise UpcycleError(f"tensor '{key}' is missing from {self.path}")
        with bad_file(self.path / self._files[key], f"has unreadable data for tensor '{key}' (truncated?)"):
            return self._open[self._files[key]].get_tensor(key)

    def _meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the stored shape and dtype (header only, no data read)."""
        if key not in self._files:
            raise UpcycleError(f"tensor '{key}' is missing from {self.path}: is it a complete {self.family} model?")
        with bad_file(self.path / self._files[key], f"has no readable header entry for tensor '{key}'"):
            sl = self._open[self._files[key]].get_slice(key)
        if sl.get_dtype() not in _DTYPES:
            raise UpcycleError(f"tensor '{key}' in {self.path} has dtype {sl.get_dtype()}: only floating-point "
                               f"({', '.join(_DTYPES)}) checkpoints are supported")
        return torch.empty(sl.get_shape(), dtype=_DTYPES[sl.get_dtype()], device="meta")

    def _noop_shared_experts(self) -> set[str]:
        """Our Qwen2-MoE export writes "no shared expert" as an all-zero one (an exact no-op): read it back as
        none, so a round trip returns the model it started from. Gates are checked first (a trained model's
        non-zero gate ends the check before any large tensor is read)."""
        cfg = self.config
        if not cfg.moe_shared_expert_intermediate_size:
            return set()
        layers = [i for i, moe in enumerate(cfg.moe_layer_pattern()) if moe]
        keys = [f"model.layers.{i}.mlp.shared_expert_gate.weight" for i in layers]
        keys += [f"model.layers.{i}.mlp.shared_expert.{p}_proj.weight" for i in layers for p in ("gate", "up", "down")]
        if not all(self._has(k) for k in keys) or any(self._get(k).any() for k in keys):
            return set()
        self.config = cfg.replace(moe_shared_expert_intermediate_size=None, moe_shared_expert_gate=False)
        return set(keys)

    def _layer(self, i: int, get: Callable[[str], torch.Tensor],
               wanted: set[str] | None = None) -> dict[str, torch.Tensor]:
        prefix = f"decoder.layers.{i}."
        only = None if wanted is None else {n[len(prefix):] for n in wanted if n.startswith(prefix)}
        layer = hf_names.layer_from_hf(get, self._has, i, self.config, self.family, only)
        return {prefix + k: v for k, v in layer.items()}

    def _global_keys(self) -> dict[str, str]:
        keys = {ours: theirs for ours, theirs in hf_names.GLOBAL_KEYS.items() if self._has(theirs)}
        if self.config.share_embeddings_and_output_weights:
            keys.pop("output_layer.weight", None)
        return keys

    def _index(self) -> dict[str, TensorInfo]:
        infos = {ours: _info(self._meta(theirs)) for ours, theirs in self._global_keys().items()}
        used = set(self._global_keys().values()) | self._ignored
        for i in range(self.config.num_layers):
            with bad_file(self.path / "config.json", "does not match the tensor shapes of the weights",
                          "does config.json belong to these weights?"):
                infos.update({k: _info(v) for k, v in self._layer(i, self._meta).items()})
            for groups, _ in hf_names.layer_sources(self._has, i, self.config, self.family).values():
                used.update(n for g in groups for n in g)
        unexpected = set(self._files) - used
        if unexpected:
            raise UpcycleError(
                f"{self.path} has tensors nemo-upcycle cannot map, e.g. {sorted(unexpected)[0]}: is it a "
                f"{self.family} model with a standard layout?"
            )
        return model_order(infos)

    def _read_tokenizer(self) -> TokenizerSpec | None:
        spm = self.path / "tokenizer.model"
        if spm.is_file():
            name = f"{uuid.uuid4().hex}_tokenizer.model"
            return TokenizerSpec({"library": "sentencepiece", "type": None, "model": f"nemo:{name}",
                              "vocab_file": None, "merge_file": None, "delimiter": None,
                              "sentencepiece_legacy": False}, {name: spm.read_bytes()})
        if (self.path / "tokenizer.json").is_file():
            return packed_hf_tokenizer(self.path)
        return None

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        self._open = self._open_files()
        try:
            return self._read(names)
        finally:
            self._open = {}

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        wanted = set(names)
        for i in sorted({layer_index(n) for n in names if layer_index(n) is not None}):
            out.update(self._layer(i, self._get, wanted))
        globals_ = self._global_keys()
        for n in names:
            if layer_index(n) is None:
                out[n] = self._get(globals_[n])
        return {n: out[n] for n in names}


def _load_json(path: Path) -> dict[str, Any]:
    with bad_file(path, "is not valid JSON", f"fix it or re-download {path.name}"):
        data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise UpcycleError(f"{path} holds a JSON {type(data).__name__}, not an object: fix it or re-download "
                           f"{path.name}")
    return data


def _info(t: torch.Tensor) -> TensorInfo:
    return TensorInfo(tuple(t.shape), t.dtype)
