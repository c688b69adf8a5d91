"""`.nemo` checkpoints (NeMo 1.x MegatronGPTModel): read in every weight layout, written as NeMo writes them.

Accepted inputs: an uncompressed or gzip tar, or an extracted directory, holding `model_config.yaml`,
artifacts (`<32 hex>_tokenizer.model`, referenced from the config as `nemo:<name>`) and the weights as
  model_weights/                         torch_dist (NeMo's default for mcore models; read inside the tar)
  model_weights.ckpt                     legacy, TP = PP = 1
  mp_rank_XX/model_weights.ckpt          legacy, tensor parallel (shards merged on the right dimension)
  tp_rank_XX_pp_rank_YYY/...             legacy, tensor and pipeline parallel (layers renumbered)
Legacy files are memory-mapped (`torch.load(mmap=True, weights_only=True)`), so only the tensors being
converted are paged in. Written output: model_config.yaml + artifacts + model_weights/ torch_dist with TE-spec
names under `model.`, packed as an uncompressed tar with `./` members (or left as a directory).
"""

from __future__ import annotations

import io
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from nemo_upcycle.activations import activation_name, get_activation
from nemo_upcycle.checkpoint.archive import TarArchive, TarWriter, atomic_output, refuse_special_files
from nemo_upcycle.checkpoint.base import (
    CheckpointReader, CheckpointWriter, Fetch, SourceMeta, TensorInfo, WriteOptions, model_order, refusal)
from nemo_upcycle.checkpoint.layout import canonical_names, dist_fetch_order, write_megatron_dist
from nemo_upcycle.checkpoint.megatron import is_megatron_dir, weights_dtype
from nemo_upcycle.checkpoint.nemo_config import (
    gpt_config_from_nemo, nemo_config_from_gpt, nemo_problem, with_nemo_restore_sections)
from nemo_upcycle.checkpoint.torch_dist import DistCheckpointReader
from nemo_upcycle.data.tokenizers import TokenizerSpec
from nemo_upcycle.errors import UpcycleError, bad_file, reason
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.keys import layer_index, te_to_local_key

NEMO_PREFIX = "model."
_LEGACY_DIR = re.compile(r"^(?:mp_rank_(?P<mp>\d+)|tp_rank_(?P<tp>\d+)_pp_rank_(?P<pp>\d+))$")
# Tensor-parallel layout of legacy shards: column-parallel weights concatenate on dim 0, row-parallel on dim 1.
_COLUMN_PARALLEL = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias",
                    "word_embeddings.weight", "output_layer.weight")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


class NemoFiles:
    """The files of a `.nemo` (tar or extracted directory), validated: model_config.yaml, the tokenizer and its
    artifacts. Reading them never touches the weights, so a tokenizer comes out of a 100 GB file at once."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.exists():
            raise UpcycleError(f"{self.path} does not exist: pass a .nemo file or an extracted .nemo directory")
        refuse_special_files(self.path)
        self.archive = None if self.path.is_dir() else TarArchive(self.path)
        try:
            self.config = self._load_config()
            self.tokenizer = self._read_tokenizer()
        except BaseException:
            self.close()
            raise

    def names(self) -> list[str]:
        if self.archive is not None:
            return self.archive.names()
        return [str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()]

    def read_bytes(self, name: str) -> bytes:
        if self.archive is not None:
            return self.archive.read_bytes(name)
        p = self.path / name
        if p.is_symlink() or not p.resolve().is_relative_to(self.path.resolve()):
            raise UpcycleError(f"'{name}' in {self.path} is a link or lies outside the folder: refusing to read it")
        if not p.is_file():
            raise UpcycleError(f"'{name}' is missing from {self.path}")
        return p.read_bytes()

    def _load_config(self) -> dict[str, Any]:
        try:
            cfg = yaml.safe_load(self.read_bytes("model_config.yaml"))
        except UpcycleError:
            raise UpcycleError(f"{self.path} has no model_config.yaml: is it a .nemo checkpoint?")
        except yaml.YAMLError as err:
            raise UpcycleError(f"model_config.yaml in {self.path} is not valid YAML: {str(err).splitlines()[0]}")
        if not isinstance(cfg, dict):
            raise UpcycleError(f"model_config.yaml in {self.path} is not a mapping")
        return cfg

    def _read_tokenizer(self) -> TokenizerSpec | None:
        cfg = self.config.get("tokenizer")
        if not isinstance(cfg, dict):
            return None
        artifacts = {}
        for value in cfg.values():
            if isinstance(value, str) and value.startswith("nemo:"):
                name = value[len("nemo:"):]
                artifacts[name] = self.read_bytes(name)
        return TokenizerSpec(config=dict(cfg), artifacts=artifacts)

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()


class NemoReader(CheckpointReader):
    name = "nemo"

    @staticmethod
    def detect(path: Path) -> bool:
        """A .nemo tar is any file but a GGUF one; a directory, an extracted .nemo with its model_config.yaml."""
        if path.is_file():
            return path.suffix.lower() != ".gguf"
        return (path / "model_config.yaml").is_file() and not is_megatron_dir(path)

    def __init__(self, path: Path | str):
        self.files = NemoFiles(path)
        self.path, self.archive = self.files.path, self.files.archive
        self._tmp: Path | None = None
        self.source_config, self.tokenizer = self.files.config, self.files.tokenizer
        self._dist: DistCheckpointReader | None = None
        self._legacy: list[Path] | None = None  # legacy shard files, by slot
        self._index: dict[str, tuple[str, tuple[int, ...]]] = {}  # canonical -> (fqn, index) [torch_dist]
        self._legacy_index: dict[str, list[tuple[int, str]]] = {}  # canonical -> [(shard, key), ...]
        try:  # an extraction made before a failure is removed with it
            self._open_weights()
            if "embedding.word_embeddings.weight" not in self._infos:
                raise UpcycleError(f"{self.path} holds no GPT embedding (embedding.word_embeddings.weight): is the "
                                   "file complete?")
            vocab = self._infos["embedding.word_embeddings.weight"].shape[0]
            with bad_file(f"model_config.yaml in {self.path}", "has a value of the wrong type",
                          "fix that field"):
                self.config: GPTConfig = gpt_config_from_nemo(self.source_config, vocab)
            if self.config.share_embeddings_and_output_weights and "output_layer.weight" in self._infos:
                self._drop_tied_output_copy()
        except BaseException:
            self.close()
            raise

    def _drop_tied_output_copy(self) -> None:
        """With shared embeddings, Megatron's last pipeline stage (pre_process False) still has an output_layer
        weight, a copy of the word embedding kept in sync, and a legacy shard (its state_dict()) saves it. Drop
        that copy, once it is seen to equal the embedding: one that differs means the config is not this model's."""
        embedding, output = self.read(["embedding.word_embeddings.weight", "output_layer.weight"]).values()
        if not torch.equal(embedding, output):
            raise UpcycleError(f"{self.path} holds an output_layer.weight that differs from its word embedding, "
                               "but model_config.yaml says share_embeddings_and_output_weights: set it to false if "
                               "the model's output layer is untied")
        del self._infos["output_layer.weight"]

    def _local_copy(self, prefix: str) -> Path:
        """A real directory for `prefix`: the directory itself, or an extraction (gzip tars, legacy mmap)."""
        if self.archive is None:
            return self.path / prefix
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="nemo-upcycle-"))
        return self.archive.extract_to(prefix, self._tmp)

    # ---- weights ----------------------------------------------------------------------------------------
    def _open_weights(self) -> None:
        names = self.files.names()
        if "model_weights/.metadata" in names:
            if self.archive is not None and not self.archive.compressed:
                self._dist = DistCheckpointReader("model_weights", archive=self.archive)
            else:
                self._dist = DistCheckpointReader(self._local_copy("model_weights"))
            self._index_dist()
            return
        shards = self._legacy_shards(names)
        if not shards:
            raise UpcycleError(
                f"{self.path} holds no weights (no model_weights/, model_weights.ckpt, mp_rank_XX/ or "
                "tp_rank_XX_pp_rank_YYY/): is the file complete?"
            )
        self._index_legacy(shards)

    def _index_dist(self) -> None:
        assert self._dist is not None
        self._infos: dict[str, TensorInfo] = {}
        for fqn in self._dist.tensors:
            shape, dtype = self._dist.shape(fqn), self._dist.dtype(fqn)
            for name, index in canonical_names(fqn, shape, NEMO_PREFIX):
                self._index[name] = (fqn, index)
                self._infos[name] = TensorInfo(shape[len(index):], dtype)
        self._infos = model_order(self._infos)

    def _legacy_shards(self, names: list[str]) -> dict[tuple[int, int], str]:
        """(tp, pp) -> path of that shard's model_weights.ckpt."""
        shards = {}
        for name in names:
            parts = name.split("/")
            if parts[-1] != "model_weights.ckpt":
                continue
            if len(parts) == 1:
                shards[(0, 0)] = name
            elif len(parts) == 2 and (m := _LEGACY_DIR.match(parts[0])):
                tp = int(m["mp"] if m["mp"] is not None else m["tp"])
                shards[(tp, int(m["pp"] or 0))] = name
        return shards

    def _index_legacy(self, shards: dict[tuple[int, int], str]) -> None:
        tps = sorted({tp for tp, _ in shards})
        pps = sorted({pp for _, pp in shards})
        if set(shards) != {(t, p) for t in tps for p in pps} or tps != list(range(len(tps))):
            raise UpcycleError(f"{self.path} has an incomplete set of tensor/pipeline-parallel shards: {sorted(shards)}")
        self._legacy = []
        per_key: dict[str, dict[int, tuple[int, str, torch.Tensor]]] = {}  # canonical -> tp -> (shard, key, meta)
        layer_offset = 0
        for pp in pps:
            layers_here = 0
            for tp in tps:
                slot = len(self._legacy)
                self._legacy.append(self._local_copy(shards[(tp, pp)]))
                local_layers = set()
                for key, t in self._load_legacy(slot).items():
                    name = _strip_prefix(key)
                    if name is None:
                        continue
                    i = layer_index(name)
                    if i is not None:
                        local_layers.add(i)
                        name = name.replace(f"decoder.layers.{i}.", f"decoder.layers.{i + layer_offset}.", 1)
                    meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                    per_key.setdefault(te_to_local_key(name), {})[tp] = (slot, key, meta)
                layers_here = max(layers_here, len(local_layers))
            layer_offset += layers_here
        self._infos = {}
        for name, by_tp in per_key.items():
            if ".experts." in name:
                raise UpcycleError(f"{self.path} is already an MoE checkpoint (found {name}): upcycle a dense one")
            parts = [by_tp[t] for t in sorted(by_tp)]
            self._legacy_index[name] = [(s, k) for s, k, _ in parts]
            with bad_file(self.path, f"has tensor-parallel shards of {name} that do not fit together"):
                merged = _merge_tp(name, [m for _, _, m in parts], self._gated())
            self._infos[name] = TensorInfo(tuple(merged.shape), merged.dtype)
        self._infos = model_order(self._infos)

    def _gated(self) -> bool:
        return get_activation(activation_name(self.source_config.get("activation", "gelu")) or "gelu").gated

    def _load_legacy(self, slot: int) -> dict[str, torch.Tensor]:
        """One legacy shard, memory-mapped. Opened afresh per read, so pages of layers already converted are
        unmapped (and leave the resident set) instead of accumulating over the model."""
        path = self._legacy[slot]
        try:
            with torch.serialization.safe_globals([io.BytesIO, bytes]):  # TE extra states may be BytesIO
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - RuntimeError, UnpicklingError (refused objects), EOFError, ...
            raise UpcycleError(f"cannot read {path.name} in {self.path} ({reason(err)}): truncated, corrupt or "
                               "holding objects other than tensors; re-export it with torch.save") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UpcycleError(f"{path.name} in {self.path} holds a {type(state).__name__}, not a state dict: "
                               "re-export it with torch.save")
        return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}

    # ---- reader API -------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        if self._dist is not None:
            return dict(zip(names, self._dist.read_many([self._index[n] for n in names])))
        assert self._legacy is not None
        shards = {s: self._load_legacy(s) for n in names for s, _ in self._legacy_index[n]}
        return {n: _merge_tp(n, [shards[s][k] for s, k in self._legacy_index[n]], self._gated()).clone()
                for n in names}

    def close(self) -> None:
        self.files.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _strip_prefix(key: str) -> str | None:
    """Legacy keys: `model.` (or `model.module.` with megatron_amp_O2) + mcore name; extra states dropped."""
    if key.endswith("_extra_state"):
        return None
    for prefix in ("model.module.", "model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _merge_tp(name: str, parts: list[torch.Tensor], gated: bool) -> torch.Tensor:
    """Merge the tensor-parallel shards of one tensor (meta tensors give the merged shape)."""
    if len(parts) == 1:
        return parts[0]
    if name.endswith(_ROW_PARALLEL):
        return torch.cat(parts, dim=1)
    if name.endswith(_COLUMN_PARALLEL):
        if gated and ".linear_fc1." in name:  # each shard is [gate_t; up_t]: regroup as [gates; ups]
            halves = [p.chunk(2, dim=0) for p in parts]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        return torch.cat(parts, dim=0)
    return parts[0]  # replicated (norms, row-parallel biases)


class NemoWriter(CheckpointWriter):
    """Writes a `.nemo`: packed tar (default) or directory."""

    name = "nemo"

    def __init__(self, path: Path, overwrite: bool = False, pack: bool = True):
        super().__init__(path, overwrite)
        self.pack = pack

    @classmethod
    def create(cls, path: Path, options: WriteOptions) -> "NemoWriter":
        writer = super().create(path, options)
        writer.pack = options.pack
        return writer

    def problem(self, config: GPTConfig) -> str | None:
        return refusal(lambda: nemo_config_from_gpt(config)) or nemo_problem(config)

    def fetch_order(self, config: GPTConfig, tensors: dict[str, TensorInfo]) -> list[str]:
        return dist_fetch_order(tensors)

    def overhead_bytes(self, tensors: dict[str, TensorInfo]) -> int:
        return 1 << 20

    def write(self, config: GPTConfig, tensors: dict[str, TensorInfo], fetch: Fetch, source: SourceMeta) -> None:
        model_cfg = nemo_config_from_gpt(config, base=source.config if source.format == self.name else None)
        tokenizer = source.tokenizer
        if tokenizer is not None:
            model_cfg["tokenizer"] = tokenizer.config
        model_cfg = with_nemo_restore_sections(model_cfg, weights_dtype(tensors))
        files = {"model_config.yaml": yaml.safe_dump(model_cfg, sort_keys=False).encode()}
        if tokenizer is not None:
            files.update(tokenizer.artifacts)
        with atomic_output(self.path, self.overwrite) as out:
            if self.pack:
                tar = TarWriter(out)
                try:
                    for name, data in files.items():
                        tar.add_bytes(name, data)
                    write_megatron_dist("./model_weights", config, tensors, fetch, NEMO_PREFIX, tar=tar)
                finally:
                    tar.close()
            else:
                out.mkdir(parents=True)
                for name, data in files.items():
                    (out / name).write_bytes(data)
                write_megatron_dist(out / "model_weights", config, tensors, fetch, NEMO_PREFIX)

