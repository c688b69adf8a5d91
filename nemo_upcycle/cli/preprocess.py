"""Tokenize text into Megatron's indexed dataset files (<prefix>_<key>_document.bin/.idx), GPTDataset's input.

Inputs: jsonl files (one document per line, its text under --json-keys, as Megatron-LM's
tools/preprocess_data.py reads them), plain text files (one document each) and folders (every file below them
matching --glob is one document). --stdlib adds CPython's standard library source, a corpus every machine has.
Documents are tokenized in worker processes, kept in input order, each ended with the tokenizer's
end-of-document token, and written with Megatron-core's IndexedDatasetBuilder under temporary names that are
renamed only when everything succeeded. Documents with no tokens are skipped.

examples:
  nemo-upcycle preprocess --stdlib --tokenizer byte --output-prefix data/stdlib
  nemo-upcycle preprocess --input corpus.jsonl --tokenizer model.nemo --output-prefix data/corpus --workers 8
"""

from __future__ import annotations

import argparse
import os

from nemo_upcycle.checkpoint import tokenizer_from_argument
from nemo_upcycle.data.corpus import stdlib_root
from nemo_upcycle.data.preprocess import DEFAULT_EXCLUDED_DIRS, DEFAULT_GLOBS, preprocess
from nemo_upcycle.data.tokenizers import TOKENIZER_ARGUMENT_HELP
from nemo_upcycle.errors import UpcycleError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", action="extend", default=[], metavar="PATH",
                        help="jsonl files (one JSON object per line), plain text files (one document each) or "
                             "folders (every file below them matching --glob is a document); repeatable")
    parser.add_argument("--stdlib", action="store_true",
                        help="add CPython's standard library source folder as an input (a corpus every machine "
                             "has; with the default --glob and --exclude-dir about 1900 files, 32 MB)")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="output path prefix: writes PREFIX_<key>_document.bin and .idx per json key "
                             "(folders are created)")
    parser.add_argument("--tokenizer", required=True, metavar="SPEC", help=f"the tokenizer: {TOKENIZER_ARGUMENT_HELP}")
    parser.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                        help="fields of each jsonl line to tokenize, one output dataset per key (default: text); "
                             "plain text inputs only have text")
    parser.add_argument("--glob", nargs="+", default=list(DEFAULT_GLOBS), metavar="PATTERN",
                        help=f"file name patterns read from input folders, recursively (default: "
                             f"{' '.join(DEFAULT_GLOBS)}; the option replaces them, so list them to keep them)")
    parser.add_argument("--exclude-dir", nargs="+", default=list(DEFAULT_EXCLUDED_DIRS), metavar="NAME",
                        help=f"folder names skipped inside input folders (default: {' '.join(DEFAULT_EXCLUDED_DIRS)}, "
                             f"so --stdlib is the standard library without installed packages; the option "
                             f"replaces them, so list them to keep them)")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end every document with the tokenizer's end-of-document token, so training sees "
                             "where documents meet (default: on)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                        help="tokenizer processes; results keep input order (default: CPU count, at most 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def run(args: argparse.Namespace) -> int:
    inputs = args.input + ([stdlib_root()] if args.stdlib else [])
    if not inputs:
        raise UpcycleError("nothing to preprocess; pass --input PATH (files or folders) or --stdlib")
    tokenizer = tokenizer_from_argument(args.tokenizer)
    stats = preprocess(inputs, args.output_prefix, tokenizer, json_keys=args.json_keys,
                       append_eod=args.append_eod, workers=args.workers, globs=args.glob,
                       exclude_dirs=args.exclude_dir, overwrite=args.overwrite)
    print(stats.summary(args.workers))
    return 0
