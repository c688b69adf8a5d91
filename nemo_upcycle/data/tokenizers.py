"""Tokenizers behind one small interface, so preprocessing, datasets and training never ask which library made
the ids: `vocab_size`, `eod`, `bos_id`, `encode(text)` (no special tokens added; `add_special_tokens=True` adds
what the tokenizer adds by default, as Hugging Face's `encode` does: evaluation needs it), `decode(ids)` and
`unique_identifiers` (what Megatron-core's datasets put in their cache keys; it holds the tokenizer file's
checksum, so a changed tokenizer never reuses stale indices).

Three kinds: `ByteTokenizer` (UTF-8 bytes; needs no file), `SentencePieceTokenizer` (a `.model` file, the
Nemotron / Llama family) and `HFTokenizer` (a local Hugging Face tokenizer folder). `load_tokenizer` reads the
`tokenizer:` section of a NeMo 1.x `model_config.yaml` (a Hugging Face tokenizer's files packed in the .nemo as
`nemo:` artifacts, see HF_TOKENIZER_ARTIFACTS, so the .nemo needs no outside folder); a `TokenizerSpec` is that
section with its artifact bytes, as checkpoints carry it (`checkpoint.tokenizer_from_argument` turns a
`--tokenizer` argument, which may name a `.nemo` file, into a tokenizer). Every tokenizer is held in
memory once built and pickles without its files, so worker processes get it whole and temporary files can go.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nemo_upcycle.errors import UpcycleError

TOKENIZER_ARGUMENT_HELP = ("'byte', a .nemo file (its own tokenizer), a SentencePiece .model file, or a Hugging Face "
                       "tokenizer folder")


class Tokenizer(Protocol):
    """What the project (and Megatron-core's GPTDataset: vocab_size, eod, unique_identifiers) needs."""

    vocab_size: int
    eod: int
    bos_id: int | None
    unique_identifiers: dict

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class TokenizerSpec:
    """A tokenizer as a NeMo config section (`model: nemo:<name>` references) and the artifact files it names:
    what a checkpoint carries, not a tokenizer that encodes (`load_tokenizer_spec` builds that)."""

    config: dict[str, Any]
    artifacts: dict[str, bytes] = field(default_factory=dict)  # artifact file name -> content


class ByteTokenizer:
    """UTF-8 bytes as tokens (0-255), plus an end-of-document token 256. Needs no training and no files."""

    vocab_size = 257
    eod = 256
    bos_id = None

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "ByteTokenizer"}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))  # no special tokens to add

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model; its eos id ends documents, as in NeMo's and Megatron's SentencePiece tokenizers."""

    def __init__(self, model_file: str | Path):
        import sentencepiece

        model_file = Path(model_file)
        proto = model_file.read_bytes()
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as err:
            raise UpcycleError(f"{model_file} is not a SentencePiece model; pass a tokenizer .model file, "
                               f"or a folder for a Hugging Face tokenizer") from err
        if self._sp.eos_id() < 0:
            raise UpcycleError(f"SentencePiece model {model_file} has no eos piece to end documents with; "
                               f"train it with an eos_id")
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.unique_identifiers = {"class": "SentencePieceTokenizer", "sha256": hashlib.sha256(proto).hexdigest()}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # special tokens: BOS, as the LlamaTokenizer our Hugging Face export writes for it adds (add_bos_token)
        ids = self._sp.encode(text, out_type=int)
        return [self.bos_id] + ids if add_special_tokens and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


# The files AutoTokenizer reads from a folder: hashed for the cache key; model weights next to them are not.
_HF_TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "added_tokens.json",
                       "*.model", "*.tiktoken")


# The Hugging Face tokenizer files a .nemo carries as `nemo:` artifacts, and the `tokenizer:` keys naming them
# (vocab_file and merge_file are NeMo's own keys for a BPE vocabulary and its merges).
HF_TOKENIZER_ARTIFACTS = {"tokenizer.json": "tokenizer_file", "tokenizer_config.json": "tokenizer_config_file",
                          "special_tokens_map.json": "special_tokens_file", "added_tokens.json": "added_tokens_file",
                          "vocab.json": "vocab_file", "merges.txt": "merge_file",
                          "chat_template.jinja": "chat_template_file", "chat_template.json": "chat_template_json_file"}


def packed_hf_files(cfg: Mapping) -> dict[str, str]:
    """File name -> artifact name (`nemo:` dropped) of the Hugging Face tokenizer files a tokenizer section packs."""
    out = {}
    for filename, key in HF_TOKENIZER_ARTIFACTS.items():
        value = str(cfg.get(key) or "")
        if value.startswith("nemo:"):
            out[filename] = value[len("nemo:"):]
    return out


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder (offline: `local_files_only=True`); its eos ends documents."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        files = sorted({p for pattern in _HF_TOKENIZER_FILES for p in folder.glob(pattern) if p.is_file()})
        if not files:
            raise UpcycleError(f"{folder} holds no Hugging Face tokenizer files (tokenizer.json, "
                               f"tokenizer_config.json, vocab/merges); pass a folder saved with save_pretrained")
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if self._tok.eos_token_id is None:
            raise UpcycleError(f"Hugging Face tokenizer {folder} has no eos_token to end documents with; set "
                               f"eos_token in its tokenizer_config.json")
        self.vocab_size = len(self._tok)  # with added tokens, unlike HF's vocab_size
        self.eod = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id
        self.unique_identifiers = {"class": "HFTokenizer", "sha256": _sha256_files(files)}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # verbose=False: documents longer than model_max_length are expected here, not an error.
        return self._tok.encode(text, add_special_tokens=add_special_tokens, verbose=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


def _sha256_files(files: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def load_tokenizer(cfg: Mapping, resolve: Callable[[str], Path] | None = None) -> Tokenizer:
    """The tokenizer a NeMo 1.x `model_config.yaml` `tokenizer:` section describes.

    `library` is sentencepiece (`model`: the .model file), huggingface (`type`: a local folder) or byte (ours).
    Values written `nemo:<32 hex>_<name>` are artifacts inside a .nemo file: `resolve` gets `<32 hex>_<name>`
    and returns a local path to it (the .nemo reader supplies it); other values are local paths.
    """
    library = cfg.get("library")

    def path(field: str) -> Path:
        value = cfg.get(field)
        if not value:
            raise UpcycleError(f"tokenizer library {library} needs tokenizer.{field}, which is not set; add the "
                               f"tokenizer file's path to the config")
        value = str(value)
        if value.startswith("nemo:"):
            if resolve is None:
                raise UpcycleError(f"tokenizer.{field} = {value} is a file inside a .nemo archive; load the "
                                   f"tokenizer from the .nemo file itself")
            return Path(resolve(value[len("nemo:"):]))
        if not Path(value).expanduser().exists():
            raise UpcycleError(f"tokenizer.{field} = {value} is not an existing local path; point it at the "
                               f"tokenizer file or folder (Hugging Face names are not downloaded: save the "
                               f"tokenizer to a folder first)")
        return Path(value).expanduser()

    if library == "sentencepiece":
        return SentencePieceTokenizer(path("model"))
    if library == "huggingface" and packed_hf_files(cfg):
        # the files under their own names in a folder of their own, which AutoTokenizer reads into memory
        with tempfile.TemporaryDirectory(prefix="nemo-upcycle-hf-tok-") as folder:
            for filename, key in HF_TOKENIZER_ARTIFACTS.items():
                if cfg.get(key):
                    shutil.copyfile(path(key), Path(folder) / filename)
            return HFTokenizer(folder)
    if library == "huggingface":  # an older .nemo: `type` is a local tokenizer folder
        return HFTokenizer(path("type"))
    if library == "byte":
        return ByteTokenizer()
    raise UpcycleError(f"tokenizer library {library!r} is not supported; use sentencepiece, huggingface or byte")


def load_tokenizer_spec(spec: TokenizerSpec) -> Tokenizer:
    """The tokenizer a spec describes; its artifacts are written to a temporary folder only while loading."""
    with tempfile.TemporaryDirectory(prefix="nemo-upcycle-tok-") as tmp:
        for name, data in spec.artifacts.items():
            (Path(tmp) / name).write_bytes(data)
        return load_tokenizer(spec.config, resolve=lambda name: Path(tmp) / name)


def train_sentencepiece(texts: Iterable[str] | Path, vocab_size: int, model_prefix: str | Path,
                        model_type: str = "bpe") -> Path:
    """Train a small SentencePiece model on `texts` (documents, or a text file as a Path); returns
    `<model_prefix>.model`. model_type: "bpe" or "unigram".

    Set up for source code and any other text: byte fallback (every string encodes, rare characters as bytes),
    no normalisation and no dummy prefix (decode(encode(text)) == text, whitespace included), whitespace-only
    pieces (indentation). One thread and no sampling, so the same input gives the same model, byte for byte.
    """
    import sentencepiece

    if vocab_size < 260:
        raise UpcycleError(f"vocab_size {vocab_size} is too small: byte fallback needs 256 byte pieces plus "
                           f"unk, bos and eos; use 260 or more")
    if isinstance(texts, Path):
        texts = [texts.read_text(encoding="utf-8")]
    elif isinstance(texts, str):  # one document, not an iterable of characters
        texts = [texts]
    model = Path(f"{model_prefix}.model")
    model.parent.mkdir(parents=True, exist_ok=True)
    with open(model, "wb") as writer:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=(line for text in texts for line in text.splitlines()), model_writer=writer,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
        )
    return model
