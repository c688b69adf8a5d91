"""`nemo-upcycle <command>`: all argument parsing, one module per command (cli/<command>.py: its --help text,
add_arguments and run), which calls the library to do the work.

Bad input (`UpcycleError`) is printed as one line, `error: ...`, with exit status 2 and no traceback. Ctrl-C and
SIGTERM (a scheduler's kill, `timeout`) unwind the same way, so temporary outputs are removed, not left behind;
while training, SIGTERM stops it at the end of the optimizer step, exp_manager saves that step's checkpoint (the
same command resumes from it), and the command exits 143 with one line naming it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import NoReturn

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

# SIGTERM while these train ends the step (train.callbacks.StopAtStepEndOnSigterm; Lightning's SIGTERMException
# outside the training loop).
TRAINING_COMMANDS = ("train", "demo")

# Library errors name the config fields (conf/upcycle.yaml's and conf/eval.yaml's, the Python API's):
# `hf_arch=mixtral`. Here they name the flags that set them: `--hf-arch mixtral`. A field is mapped where it is
# given a value, and the names in BARE also alone (other fields' bare names are words of other messages).
FLAGS = {"output_format": "--format", "hf_arch": "--hf-arch", "target_engine": "--target-engine",
         "model_config": "--model-config", "tasks": "--tasks", "data_dir": "--data-dir", "num_fewshot": "--num-fewshot",
         "verify_data": "--verify-data", "verify_threshold": "--verify-threshold", "device": "--device",
         "router_init": "--router-init", "max_shard_size": "--max-shard-size", "limit": "--limit",
         "sample": "--sample", "batch_size": "--batch-size"}
BARE = ("hf_arch", "target_engine", "data_dir", "max_shard_size")
_FIELD = re.compile(r"\b(?:(" + "|".join(FLAGS) + r")=|(" + "|".join(BARE) + r")\b)")


def as_flags(message: str) -> str:
    return _FIELD.sub(lambda m: FLAGS[m[1]] + " " if m[1] else FLAGS[m[2]], message)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints its whole usage (20 lines for convert) above a bad flag's message; here the message is the
    one line, with where to look for the options."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
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
        p.set_defaults(_run=mod.run, _parser=p)
    return parser


def _unwind_on_sigterm(signum: int, frame) -> None:
    print("terminated", file=sys.stderr)
    raise SystemExit(128 + signum)


def _default_sigterm_in_child() -> None:
    """A forked worker (tokenizer pool, data loader) ends on SIGTERM as it would have: its interpreter may be
    stuck on a lock held at the fork, where a Python-level handler would never run."""
    if signal.getsignal(signal.SIGTERM) is _unwind_on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_child)


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block SIGTERM (a scheduler's kill, `timeout`) ends this process through SystemExit(143), as
    Ctrl-C does through KeyboardInterrupt, so `finally` blocks remove temporary outputs."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _unwind_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # named by the command's parser, whose --help lists the options that exist
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    trains = args.command in TRAINING_COMMANDS
    try:
        with nullcontext() if trains else sigterm_unwinds():
            return int(args._run(args) or 0)
    except UpcycleError as err:
        print(f"error: {as_flags(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as err:
        run = sys.modules.get("nemo_upcycle.train.run")
        if trains and run is not None and isinstance(err, run.Preempted):
            print(err, file=sys.stderr)
            return 128 + signal.SIGTERM
        lightning = sys.modules.get("lightning.pytorch.utilities.exceptions")
        if trains and lightning is not None and isinstance(err, lightning.SIGTERMException):
            print("terminated at the end of a training step", file=sys.stderr)
            return 128 + signal.SIGTERM
        raise
