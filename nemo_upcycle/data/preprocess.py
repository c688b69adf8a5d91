"""Tokenize text into Megatron's indexed dataset files (<prefix>_<key>_document.bin/.idx), GPTDataset's input:
jsonl files, plain text files and folders, tokenized in worker processes in input order, written under temporary
names renamed only when everything succeeded (the `preprocess` command, cli/preprocess.py, says more)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nemo_upcycle.data.tokenizers import Tokenizer
from nemo_upcycle.errors import UpcycleError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
DEFAULT_GLOBS = ("*.py", "*.txt")
DEFAULT_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


def token_dtype(vocab_size: int) -> type[np.integer]:
    """uint16 up to 65536 ids, else int32: the two widths GPTDataset assumes when it reads token files."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


@dataclass(frozen=True)
class Document:
    """One unit of work for a worker: a whole file, or line `line` (1-based, text in `raw`) of a jsonl file."""

    path: Path
    line: int | None = None
    raw: bytes | None = None


class Encoded(NamedTuple):
    """A document's token ids per json key (EOD included), its size in bytes, and whether it was valid UTF-8."""

    ids: list[np.ndarray]
    nbytes: int
    valid_utf8: bool


@dataclass
class PreprocessStats:
    """What a run did, for the one-line summary."""

    documents: int = 0  # documents read
    empty: int = 0  # document fields skipped for having no tokens
    not_utf8: int = 0  # documents whose invalid UTF-8 bytes were replaced by U+FFFD
    tokens: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    def summary(self, workers: int) -> str:
        notes = "".join([f", {self.empty} empty skipped" if self.empty else "",
                         f", {self.not_utf8} not UTF-8 (bad bytes replaced)" if self.not_utf8 else ""])
        return (f"{self.documents} documents{notes}, {self.tokens:,} tokens, {self.bytes_in / 1e6:.1f} MB in "
                f"{self.seconds:.1f} s ({self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s, {workers} "
                f"worker{'s' if workers > 1 else ''}) -> {', '.join(p + '.{bin,idx}' for p in self.outputs)}")


def collect_files(inputs: Sequence[str | Path], globs: Sequence[str] = DEFAULT_GLOBS,
                  exclude_dirs: Sequence[str] = DEFAULT_EXCLUDED_DIRS) -> list[Path]:
    """The files to read, in a fixed order: files as given, folders expanded to their matching files, sorted."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(_matching_files(item, globs, exclude_dirs))
            if not found:
                raise UpcycleError(f"input folder {item} has no files matching {' '.join(globs)}; change --glob "
                                   f"or --exclude-dir")
            files += found
        elif item.is_file():
            if item.stat().st_size == 0:
                raise UpcycleError(f"input file {item} is empty; remove it from --input")
            files.append(item)
        else:
            raise UpcycleError(f"input {item} does not exist; pass existing files or folders to --input")
    return files


def _matching_files(folder: Path, globs: Sequence[str], exclude_dirs: Sequence[str]) -> Iterator[Path]:
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in exclude_dirs]  # pruned, never walked (site-packages is large)
        yield from (Path(root, name) for name in names if any(fnmatch(name, g) for g in globs))


def iter_documents(files: Sequence[Path]) -> Iterator[Document]:
    """Whole files, and the non-blank lines of jsonl files."""
    for path in files:
        if path.suffix not in JSONL_SUFFIXES:
            yield Document(path)
            continue
        with open(path, "rb") as lines:
            for number, raw in enumerate(lines, start=1):
                if raw.strip():
                    yield Document(path, number, raw)


class Encoder:
    """Document -> Encoded; runs in the worker processes, so it carries everything it needs (picklable)."""

    def __init__(self, tokenizer: Tokenizer, json_keys: Sequence[str], append_eod: bool):
        self.tokenizer, self.json_keys, self.append_eod = tokenizer, list(json_keys), append_eod
        self.dtype = token_dtype(tokenizer.vocab_size)

    def __call__(self, doc: Document) -> Encoded:
        raw = doc.path.read_bytes() if doc.raw is None else doc.raw
        try:
            text, valid = raw.decode("utf-8"), True
        except UnicodeDecodeError:
            text, valid = raw.decode("utf-8", errors="replace"), False
        texts = [text] if doc.line is None else self._fields(doc, text)
        return Encoded([self._ids(t, doc) for t in texts], len(raw), valid)

    def _fields(self, doc: Document, line: str) -> list[str]:
        where = f"{doc.path}:{doc.line}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UpcycleError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line must be "
                               f"one JSON object") from err
        if not isinstance(record, dict):
            raise UpcycleError(f"{where}: a JSON {type(record).__name__}, not an object; each line must be one "
                               f"JSON object")
        texts = []
        for key in self.json_keys:
            if key not in record:
                raise UpcycleError(f"{where}: no key {key!r} (keys: {', '.join(map(repr, record)) or 'none'}); "
                                   f"name the text field with --json-keys")
            if not isinstance(record[key], str):
                raise UpcycleError(f"{where}: {key!r} is a {type(record[key]).__name__}, not a string; name "
                                   f"a text field with --json-keys")
            texts.append(record[key])
        return texts

    def _ids(self, text: str, doc: Document) -> np.ndarray:
        ids = self.tokenizer.encode(text)
        if not ids:
            return np.empty(0, dtype=self.dtype)
        if self.append_eod:
            ids.append(self.tokenizer.eod)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.tokenizer.vocab_size:  # would wrap around silently when narrowed
            raise UpcycleError(f"{doc.path}: the tokenizer produced ids outside [0, vocab_size "
                               f"{self.tokenizer.vocab_size}); the tokenizer files are inconsistent")
        return ids.astype(self.dtype)


_worker_encoder: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(doc: Document) -> Encoded:
    return _worker_encoder(doc)


def output_prefixes(output_prefix: str | Path, json_keys: Sequence[str]) -> list[str]:
    """Megatron's naming: one dataset per key, `<output_prefix>_<key>_document`."""
    return [f"{output_prefix}_{key}_document" for key in json_keys]


def preprocess(inputs: Sequence[str | Path], output_prefix: str | Path, tokenizer: Tokenizer, *,
               json_keys: Sequence[str] = ("text",), append_eod: bool = True, workers: int = 1,
               globs: Sequence[str] = DEFAULT_GLOBS, exclude_dirs: Sequence[str] = DEFAULT_EXCLUDED_DIRS,
               overwrite: bool = False, progress: bool = True) -> PreprocessStats:
    """Tokenize `inputs` and write one Megatron indexed dataset per json key; see the module docstring."""
    if workers < 1:
        raise UpcycleError(f"--workers {workers} must be 1 or more")
    if len(set(json_keys)) != len(json_keys):  # one dataset per key: a repeated key would write each document twice
        raise UpcycleError(f"--json-keys {' '.join(json_keys)} repeats a key: give each key once")
    files = collect_files(inputs, globs, exclude_dirs)
    if list(json_keys) != ["text"] and any(f.suffix not in JSONL_SUFFIXES for f in files):
        raise UpcycleError(f"plain text inputs have one field, text, but --json-keys is {' '.join(json_keys)}; "
                           f"give only jsonl inputs or use --json-keys text")
    prefixes = output_prefixes(output_prefix, json_keys)
    for prefix in prefixes:
        for path in (Path(prefix + ".bin"), Path(prefix + ".idx")):
            if path.exists() and not overwrite:
                raise UpcycleError(f"{path} exists; pass --overwrite to replace it or choose another "
                                   f"--output-prefix")
    folder = Path(prefixes[0]).parent
    if folder.exists() and not folder.is_dir() or any(p.is_file() for p in folder.parents):
        raise UpcycleError(f"--output-prefix {output_prefix}: {folder} is under a file, not a folder; choose "
                           "another --output-prefix")
    folder.mkdir(parents=True, exist_ok=True)
    # after the checks, whose errors its warnings would precede; seconds of import, kept out of the timing
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    start = time.perf_counter()
    encoder = Encoder(tokenizer, json_keys, append_eod)
    stats = PreprocessStats(outputs=prefixes)
    with _ordered_results(encoder, iter_documents(files), workers) as results:
        _write(results, prefixes, encoder.dtype, stats, total_bytes=sum(f.stat().st_size for f in files),
               progress=progress)
    stats.seconds = time.perf_counter() - start
    return stats


@contextmanager
def _ordered_results(encoder: Encoder, docs: Iterator[Document], workers: int) -> Iterator[Iterator[Encoded]]:
    """Encoded documents in input order: in this process for one worker, else from a process pool."""
    if workers == 1:
        yield map(encoder, docs)
        return
    import multiprocessing

    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(encoder,)) as pool:
        yield pool.imap(_encode_in_worker, docs, chunksize=16)


def _write(results: Iterator[Encoded], prefixes: list[str], dtype: type[np.integer],
           stats: PreprocessStats, total_bytes: int, progress: bool) -> None:
    """Stream results into one IndexedDatasetBuilder per prefix; rename the files into place only at the end."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    tmp = {p: (f"{p}.tmp{os.getpid()}.bin", f"{p}.tmp{os.getpid()}.idx") for p in prefixes}
    builders = {p: IndexedDatasetBuilder(tmp[p][0], dtype=dtype) for p in prefixes}
    finished, start = False, time.perf_counter()
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="preprocess",
               disable=None if progress else True)
    try:
        for ids_per_key, nbytes, valid in results:
            stats.documents += 1
            stats.bytes_in += nbytes
            stats.not_utf8 += not valid
            for prefix, ids in zip(prefixes, ids_per_key):
                if ids.size == 0:
                    stats.empty += 1
                    continue
                builders[prefix].add_document(ids, [ids.size])
                stats.tokens += ids.size
            bar.set_postfix_str(f"{stats.documents} docs, "
                                f"{stats.documents / (time.perf_counter() - start):.0f} docs/s", refresh=False)
            bar.update(nbytes)
        if stats.tokens == 0:
            raise UpcycleError("the inputs hold no text to tokenize; check --input, --glob and --json-keys")
        for prefix, builder in builders.items():
            builder.finalize(tmp[prefix][1])
        for prefix in prefixes:  # a dataset exists once both files are there: an old .idx goes first, the new last,
            Path(prefix + ".idx").unlink(missing_ok=True)  # so no moment pairs the new .bin with the old .idx
            os.replace(tmp[prefix][0], prefix + ".bin")
            os.replace(tmp[prefix][1], prefix + ".idx")
        finished = True
    finally:
        bar.close()
        if not finished:
            for prefix, builder in builders.items():
                builder.data_file.close()
                for path in tmp[prefix]:
                    Path(path).unlink(missing_ok=True)
