"""`nemo-upcycle train`: continued training with Lightning, NeMo's exp_manager and optimizers, from conf/train.yaml.

    nemo-upcycle train restore_from=moe.nemo data.data_prefix=[data/stdlib_text_document] trainer.max_steps=200
    nemo-upcycle train restore_from=dense.nemo +upcycle.shorthand=E8G8T8 data.data_prefix=[...]  # upcycle in memory
    nemo-upcycle train model=tiny_cpu data.data_prefix=[...]                 # from scratch (the dense baseline)
    torchrun --nproc-per-node 4 -m nemo_upcycle.cli train restore_from=moe.nemo data.data_prefix=[...] \\
        backend=megatron tensor_model_parallel_size=2 pipeline_model_parallel_size=2 use_distributed_optimizer=true
                                                  # Megatron-core's engine on several processes (parallel.py)

Arguments are Hydra overrides of conf/train.yaml (groups: model, data, trainer, optim). Logs, TensorBoard and
checkpoints go to <exp_manager.exp_dir>/<name>/ (resumed automatically when present); the trained model is saved
as a .nemo and the expert load over training as expert_load.png. In one process, SIGTERM (preemption) ends the run
at the end of an optimizer step with that step's checkpoint saved, exits 143, and the same command resumes it.
"""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf

from nemo_upcycle.report import markdown_table
from nemo_upcycle.train.run import load_config, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides of conf/train.yaml, e.g. restore_from=moe.nemo trainer.max_steps=200 "
                             "data.data_prefix=[data/stdlib_text_document] backend=megatron optim.lr=1e-4 "
                             "+upcycle.shorthand=E8G8T8 (upcycle a dense restore_from in memory first); under "
                             "torchrun also tensor_model_parallel_size, pipeline_model_parallel_size, "
                             "virtual_pipeline_model_parallel_size, expert_model_parallel_size, "
                             "expert_tensor_parallel_size (the rest of the process count is data parallelism), "
                             "use_distributed_optimizer, overlap_grad_reduce, overlap_param_gather")
    parser.add_argument("--config-name", default="train", help="config in conf/ to start from (default: train)")
    parser.add_argument("--print-config", action="store_true", help="print the composed config and exit")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.overrides, args.config_name)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    result = train(cfg)
    if result.global_rank != 0:
        return 0
    rows = [["steps", result.steps], ["seconds", f"{result.seconds:.1f}"], ["model", str(result.nemo_path)],
            ["logs", str(result.exp_dir)]]
    rows += [[k, f"{v:.4f}"] for k, v in sorted(result.metrics.items()) if not k.startswith("expert_load/")]
    if result.expert_load_png:
        rows.append(["expert load plot", str(result.expert_load_png)])
    print(markdown_table(["", "value"], rows))
    return 0
