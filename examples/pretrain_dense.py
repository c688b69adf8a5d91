"""Pretrain a dense Nemotron on CPython's standard library source and save it as a .nemo the demo and
benchmarks ship (bf16 weights, tokenizer inside).

    # the demo's 11.2M model (conf/model/demo_dense.yaml, 4096-piece SentencePiece): ~45 min on 2 cores
    python examples/pretrain_dense.py --model demo_dense --steps 1200 --output nemo_upcycle/demo_data/dense_nemotron.nemo
    # the paper-regime model (conf/model/plateau_dense.yaml, 0.46M, bytes), trained to its plateau: the first 2600
    # steps of an 8000-step cosine, then a 1000-step cosine anneal from there to a tenth of the peak (14.7M bytes,
    # 27 min on 2 shared cores; val loss 1.345 -> 1.257)
    python examples/pretrain_dense.py --model plateau_dense --steps 8000 --stop-at 2600 --anneal-steps 1000 \
        --lr 3e-3 --output nemo_upcycle/demo_data/dense_plateau.nemo
    # that model was not at its plateau: 10000 more steps (41M bytes, cosine 3e-3 -> 3e-5) drop its val loss by
    # 10%, 1.257 -> 1.129 (1.37 at step 200, after the lr reset); 25 min on 2 cores
    python examples/pretrain_dense.py --model plateau_dense --continue-from nemo_upcycle/demo_data/dense_plateau.nemo \
        --steps 10000 --lr 3e-3 --min-lr-ratio 0.01 --warmup-steps 100 --seed 777 --output dense_more.nemo

Steps: (SentencePiece models only) train a 4096-piece tokenizer on the stdlib text; tokenize the whole stdlib
(`nemo-upcycle preprocess`); train with `nemo-upcycle train` (cosine schedule to a tenth of the peak, so the
loss flattens out by the end); write the .nemo. Documents 98-100% are held out (train/compare.py SPLIT).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo_dense", choices=["demo_dense", "plateau_dense"],
                   help="conf/model/<name>.yaml: its tokenizer library (sentencepiece or byte) decides the tokenizer")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps (16 sequences of 256 tokens each)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (cosine to a tenth of it)")
    p.add_argument("--stop-at", type=int, help="stop after this many steps of the --steps schedule")
    p.add_argument("--anneal-steps", type=int, default=0,
                   help="then restore the model and decay the lr it reached to a tenth of --lr over these steps "
                        "(cosine, a fresh data order): a shorter route to the plateau than the full schedule")
    p.add_argument("--init", type=Path,
                   help="skip the first phase: start the --anneal-steps anneal from this .nemo of it (the "
                        "WORKDIR/phase1.nemo an earlier run with --anneal-steps wrote)")
    p.add_argument("--continue-from", type=Path,
                   help="instead of training from scratch, train this .nemo further for --steps steps (a fresh "
                        "warmup and cosine, --min-lr-ratio, --seed): the way to push a shipped model nearer its plateau")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine ends at this fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warmup steps before the cosine")
    p.add_argument("--seed", type=int, default=1234, help="model and data-order seed")
    p.add_argument("--output", type=Path, default=Path("nemo_upcycle/demo_data/dense_nemotron.nemo"))
    p.add_argument("--workdir", type=Path, default=Path("bench_out/pretrain_dense"),
                   help="tokenizer, tokenized corpus and training logs")
    args = p.parse_args()
    if args.init and not args.anneal_steps:
        p.error("--init starts the anneal: give --anneal-steps too")
    if args.continue_from and (args.init or args.anneal_steps or args.stop_at):
        p.error("--continue-from is a single phase: drop --init, --anneal-steps and --stop-at")
    for given in (args.init, args.continue_from):
        if given and not given.is_file():
            p.error(f"{given} is not a file: give the path of a .nemo checkpoint")

    from nemo_upcycle.checkpoint.memory import InMemoryCheckpoint
    from nemo_upcycle.checkpoint.nemo import NemoWriter
    from nemo_upcycle.data.corpus import stdlib_root, stdlib_text
    from nemo_upcycle.data.preprocess import preprocess
    from nemo_upcycle.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece
    from nemo_upcycle.train.compare import SPLIT
    from nemo_upcycle.train.run import load_config, train

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    overrides = [f"model={args.model}"]
    if load_config(overrides).model.tokenizer.library == "byte":
        tokenizer, data = ByteTokenizer(), work / "data" / "stdlib_bytes"
    else:
        spm = train_sentencepiece([stdlib_text(8_000_000)], vocab_size=4096, model_prefix=work / "stdlib_sp4096")
        tokenizer, data = SentencePieceTokenizer(spm), work / "data" / "stdlib"
        overrides.append(f"model.tokenizer.model={spm}")
    if not Path(f"{data}_text_document.idx").exists():
        preprocess([stdlib_root()], data, tokenizer, workers=2, overwrite=True)
    stop = args.stop_at or args.steps
    common = overrides + [
        f"data.data_prefix=[{data}_text_document]", f"data.splits_string='{SPLIT}'",
        f"exp_manager.exp_dir={work / 'exp'}", "exp_manager.resume_if_exists=false", "micro_batch_size=16",
        "global_batch_size=16", "backend=torch", "trainer.limit_val_batches=8", "trainer.enable_progress_bar=false",
        "expert_load_plot=false"]
    first = load_config(common + [
        "name=dense_continue" if args.continue_from else "name=dense_pretrain",
        *([f"restore_from={args.continue_from}"] if args.continue_from else []),
        f"trainer.max_steps={stop}", f"+optim.sched.max_steps={args.steps}",
        f"trainer.val_check_interval={min(200, stop)}", f"optim.lr={args.lr}",
        f"optim.sched.min_lr={args.lr * args.min_lr_ratio}", f"optim.sched.warmup_steps={args.warmup_steps}",
        f"seed={args.seed}", f"data.seed={args.seed}"])
    if not args.init:
        result = train(first)
        print(f"trained {result.steps} steps in {result.seconds / 60:.1f} min; val_loss {result.metrics.get('val_loss')}")
        model = result.model
    if args.anneal_steps:
        w, lo = args.warmup_steps, args.lr * args.min_lr_ratio  # NeMo's CosineAnnealing: the lr phase one reached
        reached = lo + (args.lr - lo) * 0.5 * (1 + math.cos(math.pi * (stop - w) / (args.steps - w)))
        phase1 = args.init or work / "phase1.nemo"
        if not args.init:
            model.save_to(str(phase1))
        result = train(load_config(common + [
            "name=dense_anneal", f"restore_from={phase1}", f"trainer.max_steps={args.anneal_steps}",
            f"trainer.val_check_interval={args.anneal_steps}", f"optim.lr={reached}", "optim.sched.warmup_steps=1",
            f"optim.sched.min_lr={lo}",
            "seed=4321", "data.seed=4321"]))
        print(f"annealed {result.steps} steps from lr {reached:.3g} in {result.seconds / 60:.1f} min; "
              f"val_loss {result.metrics.get('val_loss')}")
        model = result.model
    ckpt = model.as_checkpoint()
    state = {k: v.to(torch.bfloat16) for k, v in ckpt.read(list(ckpt.tensors())).items()}
    bf16 = InMemoryCheckpoint(ckpt.config, state, ckpt.source_config, ckpt.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / args.output.name
        NemoWriter(out).write(bf16.config, bf16.tensors(), lambda n: bf16.read([n])[n], bf16.meta())
        args.output.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(out, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
