"""`nemo-upcycle <command>`: all argument parsing, one module per command (cli/<command>.py: its --help text,
add_arguments and run), which calls the library to do the work.

Bad input (`UpcycleError`) is printed as one line, `error: ...`, with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from nemo_upcycle import __version__
from nemo_upcycle.errors import UpcycleError

# command -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "convert": ("nemo_upcycle.cli.convert", "upcycle a dense .nemo / Megatron / Hugging Face checkpoint into an MoE one"),
    "train": ("nemo_upcycle.cli.train", "continue training a .nemo (dense or upcycled) with Lightning on Megatron data"),
    "demo": ("nemo_upcycle.cli.demo", "upcycle a small dense Nemotron to E8G1T2 and E8G8T8 and check step-0 equivalence"),
    "preprocess": ("nemo_upcycle.cli.preprocess", "tokenize jsonl, text files or folders into Megatron .bin/.idx datasets"),
    "eval": ("nemo_upcycle.cli.eval", "evaluate checkpoints on MMLU (or other lm-eval tasks) offline, side by side"),
}


# Library errors name the config fields (conf/upcycle.yaml's and conf/eval.yaml's, the Python API's):
# `hf_arch=mixtral`. Here they name the flags that set them: `--hf-arch mixtral`. A field is mapped where it is
# given a value, and the names in BARE also alone (other fields' bare names are words of other messages).
FLAGS = {"output_format": "--format", "hf_arch": "--hf-arch", "target_engine": "--target-engine",
         "model_config": "--model-config", "tasks": "--tasks", "data_dir": "--data-dir", "num_fewshot": "--num-fewshot",
         "verify_data": "--verify-data", "verify_threshold": "--verify-threshold", "device": "--device",
         "router_init": "--router-init"}
BARE = ("hf_arch", "target_engine", "data_dir")
_FIELD = re.compile(r"\b(?:(" + "|".join(FLAGS) + r")=|(" + "|".join(BARE) + r")\b)")


def as_flags(message: str) -> str:
    return _FIELD.sub(lambda m: FLAGS[m[1]] + " " if m[1] else FLAGS[m[2]], message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-upcycle",
        description="Upcycle dense GPT checkpoints into Mixture-of-Experts models (arXiv 2410.07524).",
    )
    parser.add_argument("--version", action="version", version=f"nemo-upcycle {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UpcycleError as err:
        print(f"error: {as_flags(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
