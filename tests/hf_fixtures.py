"""Small dense Hugging Face models (Llama, Mistral, Qwen2, Qwen3) built and saved by transformers itself, and
helpers to load folders back with transformers and to rewrite tensors in a saved folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
# What each family needs on top of SMALL to be a plain small model (Qwen3's head_dim defaults to 128,
# Mistral's sliding window to 4096).
FAMILY_DEFAULTS = {"llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {"head_dim": 8}}
TOKENS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(11))


def save_dense(path: Path, family: str, seed: int = 0, scale: float = 0.05, **overrides):
    """A random dense model of `family` saved with save_pretrained; every weight perturbed (norms included)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, **{**SMALL, **FAMILY_DEFAULTS[family], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(path)
    return model


def load_hf(path: Path):
    """A folder loaded by transformers' own Auto class, offline."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


@torch.no_grad()
def logits(model, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    return model(tokens).logits


def folder_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors folder, by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def rewrite_tensors(path: Path, edit) -> None:
    """Apply `edit(name, tensor) -> tensor` to every tensor of a safetensors folder, in place."""
    from safetensors.torch import load_file, save_file

    for f in sorted(Path(path).glob("*.safetensors")):
        tensors = load_file(f)
        save_file({k: edit(k, v).contiguous() for k, v in tensors.items()}, f, metadata={"format": "pt"})


def hf_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def save_tokenizer(path: Path, texts: list[str], adds_bos: bool, vocab_size: int = 400) -> int:
    """A real byte-level BPE tokenizer trained on `texts`, saved with save_pretrained into `path`: bos "<s>" and
    eos "</s>" defined; `adds_bos` gives it a post-processor that prepends BOS (Llama-style) or none (GPT-2-style).
    Returns its size (len(tokenizer))."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf.save_pretrained(path)
    return len(hf)
