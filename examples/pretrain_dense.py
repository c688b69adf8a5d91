"""Pretrain the demo's dense Nemotron (conf/model/demo_dense.yaml, 11.2M parameters) on CPython's standard
library source, and save it as the .nemo the demo ships (bf16 weights, SentencePiece tokenizer inside).

    python examples/pretrain_dense.py --steps 1200 --output nemo_upcycle/demo_data/dense_nemotron.nemo

Steps: train a 4096-piece SentencePiece tokenizer on the stdlib text, tokenize the whole stdlib with it
(`nemo-upcycle preprocess`), train with `nemo-upcycle train` (cosine schedule to a tenth of the peak, so the
loss flattens out by the end), and write the .nemo. On 2 CPU cores 1200 steps of 16 x 256 tokens take ~45 min.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps (16 sequences of 256 tokens each)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (cosine to a tenth of it)")
    p.add_argument("--output", type=Path, default=Path("nemo_upcycle/demo_data/dense_nemotron.nemo"))
    p.add_argument("--workdir", type=Path, default=Path("bench_out/pretrain_dense"),
                   help="tokenizer, tokenized corpus and training logs")
    args = p.parse_args()

    from nemo_upcycle.checkpoint.memory import InMemoryCheckpoint
    from nemo_upcycle.checkpoint.nemo import NemoWriter
    from nemo_upcycle.data.corpus import stdlib_root, stdlib_text
    from nemo_upcycle.data.preprocess import preprocess
    from nemo_upcycle.data.tokenizers import SentencePieceTokenizer, train_sentencepiece
    from nemo_upcycle.train.compare import SPLIT
    from nemo_upcycle.train.run import load_config, train

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    spm = train_sentencepiece([stdlib_text(8_000_000)], vocab_size=4096, model_prefix=work / "stdlib_sp4096")
    preprocess([stdlib_root()], work / "data" / "stdlib", SentencePieceTokenizer(spm), workers=2, overwrite=True)
    cfg = load_config([
        "model=demo_dense", f"model.tokenizer.model={spm}", "name=dense_pretrain",
        f"data.data_prefix=[{work / 'data' / 'stdlib_text_document'}]", f"data.splits_string='{SPLIT}'",
        f"exp_manager.exp_dir={work / 'exp'}", "micro_batch_size=16", "global_batch_size=16", "backend=torch",
        f"trainer.max_steps={args.steps}", "trainer.val_check_interval=200", "trainer.limit_val_batches=8",
        f"optim.lr={args.lr}", f"optim.sched.min_lr={args.lr / 10}", "optim.sched.warmup_steps=50",
        "expert_load_plot=false",
    ])
    result = train(cfg)
    print(f"trained {result.steps} steps in {result.seconds / 60:.1f} min; val_loss {result.metrics.get('val_loss')}")
    ckpt = result.model.as_checkpoint()
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
