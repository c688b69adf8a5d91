"""Tokenizers: a SentencePiece model trained on real stdlib text round-trips unseen text; NeMo tokenizer
configs load, `nemo:` artifacts through the .nemo reader's resolve callback; Hugging Face folders load offline;
bad input gives one-line errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from nemo_upcycle.checkpoint import tokenizer_from_argument
from nemo_upcycle.data.corpus import stdlib_text
from nemo_upcycle.data.tokenizers import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer,
                                          train_sentencepiece)
from nemo_upcycle.errors import UpcycleError

UNICODE = "\tunicode: héllo ✓ 日本語 🙂 \r\n  trailing  \n"
ARTIFACT = "0123456789abcdef0123456789abcdef_tokenizer.model"  # how NeMo names a .nemo artifact


def train_stdlib_sentencepiece(folder: Path, vocab_size: int = 800) -> Path:
    """A small BPE model on the first 300 kB of stdlib source (shared with the preprocessing tests)."""
    return train_sentencepiece([stdlib_text(300_000)], vocab_size=vocab_size, model_prefix=folder / "sp")


def train_hf_folder(folder: Path) -> Path:
    """A real byte-level BPE tokenizer saved as a Hugging Face folder, as save_pretrained writes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([stdlib_text(200_000)], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_stdlib_sentencepiece(tmp_path_factory.mktemp("sp"))


def assert_one_line_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_sentencepiece_round_trips_unseen_text(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    text = stdlib_text(30_000, offset=5_000_000) + UNICODE  # not in the training text
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 1.4  # it merges, not just bytes
    assert tok.vocab_size == 800 and max(ids) < 800
    assert tok.eod == 2 and tok.bos_id == 1 and tok.eod not in ids and tok.bos_id not in ids  # nothing added


def test_sentencepiece_training_is_deterministic(tmp_path, sp_model):
    again = train_stdlib_sentencepiece(tmp_path)
    assert again.read_bytes() == sp_model.read_bytes()
    other = train_stdlib_sentencepiece(tmp_path / "other", vocab_size=700)
    assert SentencePieceTokenizer(other).unique_identifiers != SentencePieceTokenizer(sp_model).unique_identifiers


def test_load_tokenizer_resolves_nemo_artifacts(sp_model):
    asked = []

    def resolve(name: str) -> Path:
        asked.append(name)
        return sp_model

    cfg = {"library": "sentencepiece", "type": None, "model": f"nemo:{ARTIFACT}", "vocab_file": None,
           "merge_file": None, "delimiter": None, "sentencepiece_legacy": False}
    tok = load_tokenizer(cfg, resolve)
    assert asked == [ARTIFACT]
    assert tok.unique_identifiers["sha256"] == hashlib.sha256(sp_model.read_bytes()).hexdigest()
    code = "def f(x):\n    return x\n"
    assert tok.encode(code) == SentencePieceTokenizer(sp_model).encode(code)
    assert isinstance(load_tokenizer({"library": "byte"}), ByteTokenizer)


def test_huggingface_folder(tmp_path):
    folder = train_hf_folder(tmp_path / "hf")
    via_config = load_tokenizer({"library": "huggingface", "type": str(folder)})
    via_spec = tokenizer_from_argument(str(folder))
    text = stdlib_text(20_000, offset=3_000_000) + UNICODE
    for tok in (via_config, via_spec):
        assert isinstance(tok, HFTokenizer)
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.eod not in ids
        assert tok.vocab_size == 600 and tok.eod == 0 and tok.bos_id is None
    assert via_config.unique_identifiers == via_spec.unique_identifiers
    assert len(via_config.unique_identifiers["sha256"]) == 64


def test_tokenizer_from_argument_kinds(sp_model):
    assert isinstance(tokenizer_from_argument("byte"), ByteTokenizer)
    assert isinstance(tokenizer_from_argument(str(sp_model)), SentencePieceTokenizer)


@pytest.mark.parametrize("cfg, fragments", [
    ({"library": "tiktoken"}, ["'tiktoken' is not supported", "sentencepiece, huggingface or byte"]),
    ({"library": "sentencepiece", "model": None}, ["needs tokenizer.model"]),
    ({"library": "sentencepiece", "model": f"nemo:{ARTIFACT}"}, [f"nemo:{ARTIFACT}", "inside a .nemo"]),
    ({"library": "sentencepiece", "model": "/no/such/tokenizer.model"}, ["/no/such/tokenizer.model",
                                                                          "not an existing local path"]),
    ({"library": "huggingface", "type": "meta-llama/Llama-2-7b-hf"}, ["meta-llama/Llama-2-7b-hf",
                                                                      "save the tokenizer to a folder"]),
])
def test_bad_configs_are_one_line_errors(cfg, fragments):
    with pytest.raises(UpcycleError) as excinfo:
        load_tokenizer(cfg)
    assert_one_line_error(excinfo, *fragments)


def test_bad_tokenizer_files_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.model").write_bytes(b"not a model")
    for spec, fragments in [(str(tmp_path / "missing"), ["does not exist", "'byte', a .nemo file"]),
                            (str(tmp_path / "empty"), ["holds no Hugging Face tokenizer files"]),
                            (str(tmp_path / "junk.model"), ["is not a SentencePiece model"])]:
        with pytest.raises(UpcycleError) as excinfo:
            tokenizer_from_argument(spec)
        assert_one_line_error(excinfo, *fragments)
    with pytest.raises(UpcycleError) as excinfo:
        train_sentencepiece(["x"], vocab_size=100, model_prefix=tmp_path / "tiny")
    assert_one_line_error(excinfo, "vocab_size 100 is too small")
