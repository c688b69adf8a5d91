"""The paper's ablations (He et al. 2024, arXiv 2410.07524) in miniature, one table, on CPU.

Every arm starts from the same dense checkpoint (the demo's 11.2M Nemotron pretrained on CPython's standard
library, or --dense), is upcycled in memory (MegatronUpcycledGPTModel.from_dense, the same code as
`nemo-upcycle convert`) and continues training on the same tokens in the same order with the same cosine
schedule; losses are on the same held-out batches.

    arm                          what the paper found (15B / 2B models, 0.1-1T tokens)
    dense continued              baseline
    E8G1T2 / E8G8T8              upcycled beats dense at equal tokens (-5.2% / -4.1% val loss at 15B)
    topK-then-softmax            softmax-then-topK is consistently better for upcycling
    weight scaling off           scaling gave 1.5% better training loss (15B E8G1T1)
    virtual groups off           without them fine-grained upcycling starts at a much higher loss
    Drop-Upcycling r=0.5         (Nakamura et al.) pays off over hundreds of billions of tokens

    python benchmarks/replicate_paper.py            # ~1 hour on 2 CPU cores (150 steps per arm)
    python benchmarks/replicate_paper.py --quick    # minutes (20 steps per arm)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ARMS = {  # name -> recipe (None: the dense model itself)
    "dense continued": None,
    "E8G1T2": {"shorthand": "E8G1T2"},
    "E8G8T8": {"shorthand": "E8G8T8"},
    "E8G8T8 topK-then-softmax": {"shorthand": "E8G8T8", "router": "topk_then_softmax"},
    "E8G8T8 weight scaling off": {"shorthand": "E8G8T8", "weight_scaling": "off"},
    "E8G8T8 virtual groups off": {"shorthand": "E8G8T8", "router_init": "random"},
    "E8G1T2 Drop-Upcycling r=0.5": {"shorthand": "E8G1T2", "drop_ratio": 0.5},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", type=Path, help="dense .nemo (default: the demo's shipped checkpoint)")
    p.add_argument("--steps", type=int, default=150, help="continued-training steps per arm")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (cosine to a tenth); the demo's")
    p.add_argument("--val-batches", type=int, default=16, help="held-out batches for every loss")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="which arms to run")
    p.add_argument("--quick", action="store_true", help="20 steps and 4 held-out batches per arm")
    p.add_argument("--out", type=Path, default=Path("bench_out/replicate_paper"), help="results folder")
    args = p.parse_args()
    if args.quick:
        args.steps, args.val_batches = 20, 4

    from nemo_upcycle.checkpoint import load_tokenizer_of
    from nemo_upcycle.data.corpus import stdlib_root
    from nemo_upcycle.data.preprocess import preprocess
    from nemo_upcycle.demo import SHIPPED_DENSE
    from nemo_upcycle.train.nemo_model import MegatronUpcycledGPTModel
    from nemo_upcycle.recipe import UpcycleConfig
    from nemo_upcycle.report import markdown_table
    from nemo_upcycle.train.compare import held_out_batches, mean_loss, training_overrides
    from nemo_upcycle.train.plots import plot_loss_curves
    from nemo_upcycle.train.run import load_config, train

    dense = args.dense or SHIPPED_DENSE
    out = args.out
    prefix = out / "data" / "stdlib"
    if not Path(f"{prefix}_text_document.idx").exists():
        preprocess([stdlib_root()], prefix, load_tokenizer_of(dense), workers=2, overwrite=True)
    data = Path(f"{prefix}_text_document")
    held_out = held_out_batches(dense, data, args.val_batches, args.batch)

    results, curves = {}, {}
    for name in args.arms:
        recipe = ARMS[name]
        start = time.perf_counter()
        overrides = training_overrides(out / "runs", name.replace(" ", "_").replace("=", ""), dense, data,
                                       args.steps, args.batch, args.lr)
        if recipe is None:
            initial = MegatronUpcycledGPTModel.restore_from(str(dense))
        else:
            initial = MegatronUpcycledGPTModel.from_dense(dense, UpcycleConfig.from_dict(recipe))
            overrides.append("upcycle={" + ",".join(f"{k}:{v!r}" for k, v in recipe.items()) + "}")
        step0 = mean_loss(initial.backend.model, held_out)
        run = train(load_config(overrides))
        after = mean_loss(run.model.backend.model, held_out)
        results[name] = {"step0": step0, "after": after, "seconds": time.perf_counter() - start,
                         "active": run.model.gpt_config.num_parameters(active=True),
                         "total": run.model.gpt_config.num_parameters()}
        curves[name] = run.loss_history
        print(f"{name}: step-0 {step0:.4f} -> {after:.4f} ({results[name]['seconds']:.0f} s)", flush=True)
        del initial, run

    base = results.get("dense continued", {}).get("after")
    rows = [[name, f"{r['total'] / 1e6:.1f}M / {r['active'] / 1e6:.1f}M", f"{r['step0']:.4f}", f"{r['after']:.4f}",
             f"{100 * (r['after'] - base) / base:+.2f}%" if base else "-", f"{r['seconds']:.0f}"]
            for name, r in results.items()]
    table = markdown_table(["arm", "params total / active", "step-0 val loss", f"val loss after {args.steps} steps",
                            "vs dense continued", "seconds"], rows)
    tokens = args.steps * args.batch * held_out[0].shape[1]
    header = (f"Dense source {dense}; {args.steps} steps x {args.batch} sequences (~{tokens / 1e6:.2f}M tokens) per "
              f"arm, cosine lr {args.lr:g} -> {args.lr / 10:g}; val loss = mean over {len(held_out)} held-out "
              "batches (nats/token).")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"{header}\n\n{table}\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_loss_curves(curves, out / "loss_curves.png", "Ablations: continued-training loss")
    print(f"\n{header}\n\n{table}\n\nwritten to {out}/results.md, results.json, loss_curves.png")


if __name__ == "__main__":
    main()
