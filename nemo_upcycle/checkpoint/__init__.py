"""Checkpoint formats behind one reader/writer interface (see base.py), chosen in one registry (formats.py).

Readers: `.nemo` (tar or directory; torch_dist or legacy TP/PP layouts), Megatron-LM / Megatron-Bridge
torch_dist directories, Hugging Face folders (Llama, Mistral, Qwen2, Qwen3, Nemotron; Mixtral, Qwen2-MoE,
Qwen3-MoE), Llama GGUF files (llama.cpp; dequantised). Writers: `.nemo` (NeMo 1.x MegatronGPTModel), Megatron torch_dist, Hugging Face MoE folders.
"""

from nemo_upcycle.checkpoint.base import (
    CheckpointReader, CheckpointWriter, ReadOptions, SourceMeta, TensorInfo, WriteOptions)
from nemo_upcycle.checkpoint.formats import (
    INPUT_FORMATS, OUTPUT_FORMATS, READERS, WRITERS, detect_format, make_writer, open_checkpoint)
from nemo_upcycle.checkpoint.loading import load_model, load_tokenizer_of, tokenizer_from_argument

__all__ = ["CheckpointReader", "CheckpointWriter", "ReadOptions", "SourceMeta", "TensorInfo", "WriteOptions",
           "INPUT_FORMATS", "OUTPUT_FORMATS", "READERS", "WRITERS", "detect_format", "make_writer", "open_checkpoint",
           "load_model", "load_tokenizer_of", "tokenizer_from_argument"]
