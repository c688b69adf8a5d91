"""Hugging Face MoE folders (Mixtral, Qwen2-MoE, Qwen3-MoE) that transformers, vLLM and SGLang load, written as
the converter streams: sharded safetensors with an index, config.json, generation_config.json and the source's
tokenizer files.

    OUT/model-00001-of-0000N.safetensors ...    experts one tensor each, as save_pretrained writes them
    OUT/model.safetensors.index.json            {"metadata": {"total_size"}, "weight_map": {name: shard}}
    OUT/config.json, generation_config.json, tokenizer files

Every tensor's name, shape and dtype follow from the plan before anything is read, so each shard's safetensors
header is written first and tensor bytes are appended the moment they are computed: memory stays at about one
layer however large the shards are. What the target cannot represent exactly is refused first
(`HFExportWriter.problem`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from nemo_upcycle.checkpoint import hf_keys as hf_names
from nemo_upcycle.checkpoint.archive import atomic_output
from nemo_upcycle.checkpoint.base import CheckpointWriter, Fetch, SourceMeta, TensorInfo, WriteOptions, model_order
from nemo_upcycle.checkpoint.hf import CARRIED_FILES, HFReader
from nemo_upcycle.data.tokenizers import packed_hf_files
from nemo_upcycle.errors import UpcycleError, bad_file
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.keys import layer_index

HF_ARCHS = hf_names.MOE_ARCHS
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5 * 10**9 bytes ('GiB' binary), as transformers' max_shard_size."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m or float(m[1]) <= 0:
        raise UpcycleError(f"max shard size '{text}' is not a size such as 5GB, 500MB or 2GiB")
    unit = (m[2] or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m[1]) * base ** "BKMGT".index(unit[0]))


class ShardedSafetensors:
    """Safetensors shards whose headers are fixed up front from the plan (names, dtypes, shapes), so each
    tensor's bytes go to disk as soon as it exists. Tensors must arrive in plan order."""

    def __init__(self, directory: Path, entries: dict[str, TensorInfo], max_shard_bytes: int):
        shards: list[list[str]] = [[]]
        size = 0
        for name, info in entries.items():
            if shards[-1] and size + info.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += info.nbytes
        n = len(shards)
        self.directory, self.entries = directory, entries
        self.files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.weight_map = {name: self.files[k] for k, names in enumerate(shards) for name in names}
        self.total_size = sum(info.nbytes for info in entries.values())
        self._order = iter(entries)
        self._file, self._shard = None, -1

    def _header(self, k: int) -> bytes:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in (n for n, f in self.weight_map.items() if f == self.files[k]):
            info = self.entries[name]
            header[name] = {"dtype": _SAFETENSORS_DTYPES[info.dtype], "shape": list(info.shape),
                            "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        data = json.dumps(header, separators=(",", ":")).encode()
        data += b" " * (-len(data) % 8)  # safetensors pads the header to 8 bytes, keeping tensor data aligned
        return len(data).to_bytes(8, "little") + data

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = next(self._order, None)
        info = self.entries.get(name)
        if name != expected or info is None or (tuple(tensor.shape), tensor.dtype) != (info.shape, info.dtype):
            raise RuntimeError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} arrived where the plan has "
                               f"{expected} {info}")
        k = self.files.index(self.weight_map[name])
        if k != self._shard:
            self.close()
            self._file, self._shard = open(self.directory / self.files[k], "wb"), k
            self._file.write(self._header(k))
        self._file.write(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class HFExportWriter(CheckpointWriter):
    """A Hugging Face MoE folder of architecture `arch` (mixtral, qwen2_moe, qwen3_moe)."""

    name = "hf"

    def __init__(self, path: Path, overwrite: bool = False, arch: str = "qwen2_moe",
                 max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, target_engine: str | None = None):
        super().__init__(path, overwrite)
        if arch not in HF_ARCHS:
            raise UpcycleError(f"unknown Hugging Face architecture '{arch}': use one of {', '.join(HF_ARCHS)}")
        self.arch, self.max_shard_bytes, self.target_engine = arch, parse_size(max_shard_size), target_engine

    @classmethod
    def create(cls, path: Path, options: WriteOptions) -> "HFExportWriter":
        if options.hf_arch is None:
            raise UpcycleError(f"output_format=hf needs hf_arch: one of {', '.join(HF_ARCHS)}")
        return cls(path, options.overwrite, options.hf_arch, options.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                   options.target_engine)

    def problem(self, config: GPTConfig) -> str | None:
        """What `arch` cannot represent exactly, or what `target_engine` would compute differently."""
        problem = hf_names.hf_arch_problem(config, self.arch)
        if problem is None and self.target_engine:
            engine = hf_names.engine_problem(config, self.arch, self.target_engine)
            problem = engine and f"target_engine={self.target_engine} hf_arch={self.arch}: {engine}"
        return problem

    def overhead_bytes(self, tensors: dict[str, TensorInfo]) -> int:
        """Qwen2-MoE's stand-in shared expert (at most 1.5 experts' fc1 per layer), plus config and tokenizer."""
        extra = 0
        if self.arch == "qwen2_moe":
            extra = sum(t.nbytes * 3 // (2 * t.shape[0]) for n, t in tensors.items()
                        if n.endswith("mlp.experts.linear_fc1.weight"))
        return extra + (64 << 20)

    @staticmethod
    def _units(tensors: dict[str, TensorInfo]) -> list[tuple[int | None, list[str]]]:
        """Canonical tensors converted together: each global tensor alone, each layer whole, in model order
        (the converter computes one layer at a time)."""
        units: list[tuple[int | None, list[str]]] = []
        for name in model_order(tensors):
            i = layer_index(name)
            if i is not None and units and units[-1][0] == i:
                units[-1][1].append(name)
            else:
                units.append((i, [name]))
        return units

    def _to_hf(self, config: GPTConfig, i: int | None, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if i is None:
            return hf_names.globals_to_hf(tensors)
        prefix = f"decoder.layers.{i}."
        return hf_names.moe_layer_to_hf({k[len(prefix):]: v for k, v in tensors.items()}, i, config, self.arch)

    def fetch_order(self, config: GPTConfig, tensors: dict[str, TensorInfo]) -> list[str]:
        return [name for _, names in self._units(tensors) for name in names]

    def hf_tensors(self, config: GPTConfig, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """Every tensor the folder will hold, in file order, from the plan alone (meta tensors, nothing read)."""
        out = {}
        for i, names in self._units(tensors):
            meta = {n: torch.empty(tensors[n].shape, dtype=tensors[n].dtype, device="meta") for n in names}
            out.update({k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._to_hf(config, i, meta).items()})
        return out

    def write(self, config: GPTConfig, tensors: dict[str, TensorInfo], fetch: Fetch, source: SourceMeta) -> None:
        hf_config = hf_names.hf_moe_config(config, self.arch)  # refuses before anything is read
        dtype = str(tensors["embedding.word_embeddings.weight"].dtype).removeprefix("torch.")
        special = special_token_ids(source)
        # transformers 5 reads dtype, transformers-4 based servers torch_dtype
        hf_config.update(dtype=dtype, torch_dtype=dtype, **special)
        files = tokenizer_files(source)
        generation = {**special, "_from_model_config": True}
        files.setdefault("generation_config.json", json.dumps(generation, indent=2).encode())
        entries = self.hf_tensors(config, tensors)
        with atomic_output(self.path, self.overwrite) as out:
            out.mkdir(parents=True)
            shards = ShardedSafetensors(out, entries, self.max_shard_bytes)
            try:
                for i, names in self._units(tensors):
                    for name, t in self._to_hf(config, i, {n: fetch(n) for n in names}).items():
                        shards.write(name, t)
            finally:
                shards.close()
            index = {"metadata": {"total_size": shards.total_size}, "weight_map": shards.weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            for name, data in files.items():
                (out / name).write_bytes(data)


def special_token_ids(source: SourceMeta) -> dict[str, Any]:
    """bos/eos/pad ids for config.json and generation_config.json: the source's own, or the SentencePiece
    model's; none when unknown."""
    if source.format == HFReader.name:
        return {k: source.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if source.config.get(k) is not None}
    sp = _sentencepiece(source)
    if sp is None:
        return {}
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: v for k, v in ids.items() if v >= 0}


def tokenizer_files(source: SourceMeta) -> dict[str, bytes]:
    """The tokenizer files the export carries: a Hugging Face source's own (and its generation_config.json);
    a SentencePiece model (.nemo, Megatron) as tokenizer.model with a LlamaTokenizer tokenizer_config.json;
    a .nemo's Hugging Face tokenizer files (its artifacts, or an older .nemo's local folder). Nothing otherwise
    (serve with --tokenizer)."""
    if source.format == HFReader.name:
        return {name: path.read_bytes() for name, path in source.extra_files.items()}
    tok = source.tokenizer
    if tok is None:
        return {}
    sp = _sentencepiece(source)
    if sp is not None:
        def piece(i: int) -> str | None:
            return sp.id_to_piece(i) if i >= 0 else None

        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(sp.bos_id()),
                  "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()), "pad_token": piece(sp.pad_id()),
                  "add_bos_token": sp.bos_id() >= 0, "add_eos_token": False, "legacy": False,
                  "clean_up_tokenization_spaces": False}
        return {"tokenizer.model": sp.serialized_model_proto(),
                "tokenizer_config.json": json.dumps(config, indent=2).encode()}
    packed = packed_hf_files(tok.config) if tok.config.get("library") == "huggingface" else {}
    if packed:
        return {filename: tok.artifacts[name] for filename, name in packed.items()}
    folder = Path(str(tok.config.get("type") or ""))
    if tok.config.get("library") == "huggingface" and folder.is_dir():
        return {n: (folder / n).read_bytes() for n in CARRIED_FILES if (folder / n).is_file()}
    return {}


def _sentencepiece(source: SourceMeta):
    """The source's SentencePiece model (from the .nemo artifact or a local path), or None."""
    tok = source.tokenizer
    if tok is None or tok.config.get("library") != "sentencepiece":
        return None
    import sentencepiece

    model = str(tok.config.get("model") or "")
    if model.startswith("nemo:"):
        proto = tok.artifacts[model[len("nemo:"):]]
    elif Path(model).is_file():
        proto = Path(model).read_bytes()
    else:
        return None
    # a corrupt artifact is a RuntimeError from inside sentencepiece: name it instead
    with bad_file(f"tokenizer {model}", "is not a SentencePiece model",
                  "replace it with the model's tokenizer .model file"):
        return sentencepiece.SentencePieceProcessor(model_proto=proto)
