"""Whole checkpoints for small-scale work: a checkpoint's tokenizer, a `--tokenizer` argument's tokenizer, and a
model with its tokenizer in memory (evaluation, the demo)."""

from __future__ import annotations

import tarfile
from pathlib import Path

from nemo_upcycle.checkpoint.base import CheckpointReader, ReadOptions
from nemo_upcycle.checkpoint.formats import open_checkpoint
from nemo_upcycle.checkpoint.nemo import NemoFiles
from nemo_upcycle.data.tokenizers import (
    TOKENIZER_ARGUMENT_HELP, ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, TokenizerSpec,
    load_tokenizer_spec)
from nemo_upcycle.errors import UpcycleError


def load_tokenizer_of(source: CheckpointReader | TokenizerSpec | Path | str) -> Tokenizer:
    """The tokenizer of a checkpoint (a reader, its TokenizerSpec, or a .nemo path: only its config and
    tokenizer artifacts are read). Artifacts are loaded into memory; nothing stays on disk."""
    where = "the checkpoint"
    if isinstance(source, (str, Path)):
        files = NemoFiles(source)
        files.close()
        spec, where = files.tokenizer, str(source)
    else:
        spec = source if isinstance(source, TokenizerSpec) else source.tokenizer
    if spec is None:
        raise UpcycleError(f"{where} has no tokenizer section in its model_config.yaml: pass a tokenizer explicitly "
                           "(a SentencePiece .model, a Hugging Face tokenizer folder, or 'byte')")
    return load_tokenizer_spec(spec)


def tokenizer_from_argument(argument: str) -> Tokenizer:
    """The tokenizer a `--tokenizer` argument names: 'byte', a .nemo file or extracted .nemo folder (the
    tokenizer in its model_config.yaml), a SentencePiece .model file, or a Hugging Face tokenizer folder."""
    if argument == "byte":
        return ByteTokenizer()
    path = Path(argument).expanduser()
    if not path.exists():
        raise UpcycleError(f"tokenizer {argument} does not exist; pass {TOKENIZER_ARGUMENT_HELP}")
    if (path / "model_config.yaml").is_file() or (path.is_file() and (path.suffix == ".nemo" or
                                                                      tarfile.is_tarfile(path))):
        return load_tokenizer_of(path)  # reads only model_config.yaml and the tokenizer artifacts
    if path.is_dir():
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def load_model(path: Path | str, options: ReadOptions = ReadOptions()):
    """A checkpoint as (reference GPTModel in eval mode, its tokenizer), all in memory: for evaluation and
    small-scale work. Weights keep their stored dtype."""
    from nemo_upcycle.models.keys import unstack_experts
    from nemo_upcycle.models.reference import GPTModel

    with open_checkpoint(path, options) as reader:
        state = unstack_experts(reader.state_dict())
        dtypes = {t.dtype for t in state.values()}
        model = GPTModel(reader.config)
        if len(dtypes) == 1:
            model.to(dtypes.pop())
        model.load_state_dict(state)
        tokenizer = load_tokenizer_of(reader)
    return model.eval(), tokenizer
