"""Continued training with Lightning, NeMo's exp_manager and optimizers, from conf/train.yaml: the config
(`load_config`), the model to train (`build_model`: restored, upcycled in memory, or new) and the run (`train`),
in one process or several (parallel.py). The `train` command (cli/train.py) calls these."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nemo_upcycle.errors import UpcycleError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
TRAINING_FIELDS = ("backend", "micro_batch_size", "global_batch_size", "expert_lr_mult",
                   "tie_virtual_groups")


@dataclass
class TrainResult:
    model: Any  # the trained MegatronUpcycledGPTModel
    exp_dir: Path
    nemo_path: Path
    steps: int
    seconds: float
    metrics: dict[str, float]
    expert_load_png: Path | None
    loss_history: tuple[list[int], list[float]]  # (tokens seen, training LM loss) per micro-batch
    global_rank: int = 0  # this process, in a multi-process run


class Preempted(Exception):
    """Training ended early on SIGTERM, at the end of a step whose checkpoint exp_manager saved; no .nemo is
    written, as the model is not the one asked for."""

    def __init__(self, step: int, max_steps: int, checkpoint: str | None, resumes: bool) -> None:
        self.step, self.checkpoint = step, checkpoint
        how = "the same command resumes from it" if resumes else "exp_manager.resume_if_exists=true resumes from it"
        where = (f"its checkpoint is {checkpoint}, and {how}" if checkpoint else
                 "no checkpoint was saved (exp_manager.create_checkpoint_callback is false)")
        super().__init__(f"terminated after step {step} of {max_steps}: {where}")


def load_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """conf/<config_name>.yaml with Hydra overrides applied (what `nemo-upcycle train` and tests use)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            return compose(config_name=config_name, overrides=list(overrides or []))
        except HydraException as err:  # a typo in an override or a group option, an unknown --config-name
            raise UpcycleError(f"{_one_line(err)}: fix the override or --config-name (configs in {CONF_DIR}; "
                               "--print-config shows what composes)") from None


def _one_line(err: Exception) -> str:
    """Hydra's multi-line message as one line: its tab-indented lists joined by commas, the search path left out."""
    out: list[str] = []
    for line in str(err).split("Config search path:")[0].splitlines():
        if line.startswith("\t") and out:
            out[-1] += (" " if out[-1].endswith(":") else ", ") + line.strip()
        elif line.strip():
            out.append(line.strip())
    return " ".join(out)


def _model_overrides(cfg: DictConfig) -> dict[str, Any]:
    """What the run config sets on top of any checkpoint's own model config."""
    out = {k: cfg[k] for k in TRAINING_FIELDS}
    out["data"] = OmegaConf.to_container(cfg.data, resolve=True)
    out["optim"] = OmegaConf.to_container(cfg.optim, resolve=True)
    return out


def build_model(cfg: DictConfig, trainer=None):
    """The model to train: restored (optionally upcycled in memory) or new from the `model` group."""
    from nemo_upcycle.train.nemo_model import MegatronUpcycledGPTModel, padded_vocab_size
    from nemo_upcycle.recipe import UpcycleConfig

    overrides = _model_overrides(cfg)
    if cfg.restore_from:
        if cfg.get("upcycle"):
            recipe = UpcycleConfig.from_dict(OmegaConf.to_container(cfg.upcycle, resolve=True))
            return MegatronUpcycledGPTModel.from_dense(cfg.restore_from, recipe, trainer, overrides)
        return MegatronUpcycledGPTModel.restore_from(cfg.restore_from, override_config_path=OmegaConf.create(overrides),
                                                     trainer=trainer)
    if cfg.get("upcycle"):
        raise UpcycleError("upcycle=... needs restore_from=<dense checkpoint>")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.update(overrides)
    if not model_cfg.get("vocab_size"):
        from nemo_upcycle.data.tokenizers import load_tokenizer

        vocab = load_tokenizer(model_cfg["tokenizer"]).vocab_size
        model_cfg["vocab_size"] = padded_vocab_size(vocab, model_cfg.get("make_vocab_size_divisible_by", 128))
    return MegatronUpcycledGPTModel(cfg=OmegaConf.create(model_cfg), trainer=trainer)


def _parallel_set_up(cfg: DictConfig, trainer_args: dict[str, Any]) -> int:
    """The megatron backend trains through Megatron-core's engine (MegatronParallelStrategy, set in trainer_args),
    in one process or, under torchrun, one Lightning process per device; returns the data-parallel size."""
    from nemo_upcycle.models.backends import default_backend
    from nemo_upcycle.train.parallel import MegatronParallelStrategy, ParallelLayout

    layout = ParallelLayout.from_config(cfg)
    world = int(os.environ.get("WORLD_SIZE", 1))
    shards = layout.model_parallel * layout.expert_model_parallel_size
    if world == 1 and shards > 1:
        raise UpcycleError(f"tensor x pipeline x expert parallel sizes need {shards} processes: launch with "
                           f"torchrun --nproc-per-node {shards} -m nemo_upcycle.cli train ...")
    backend = default_backend() if cfg.backend == "auto" else cfg.backend
    layout.check(world, backend, cfg.global_batch_size, cfg.micro_batch_size)
    if backend != "megatron":
        return 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    clip = trainer_args.pop("gradient_clip_val", None)  # Megatron's optimizer clips, over all shards
    trainer_args.update(devices=local, num_nodes=world // local, use_distributed_sampler=False,
                        strategy=MegatronParallelStrategy(
        layout, clip_grad=clip, process_group_backend="nccl" if trainer_args.get("accelerator") == "gpu" else "gloo"))
    return world // layout.model_parallel


def check_numbers(cfg: DictConfig) -> None:
    """Refuse sizes and rates that would fail deep inside torch, Lightning or NeMo's scheduler (or, for a negative
    expert_lr_mult, train the experts up the loss) before anything is built."""
    for key in ("micro_batch_size", "global_batch_size"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise UpcycleError(f"{key} must be a positive integer, got {cfg[key]!r}")
    lr, mult = cfg.optim.get("lr"), cfg.get("expert_lr_mult", 1.0)
    for key, value in (("optim.lr", lr), ("expert_lr_mult", mult)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise UpcycleError(f"{key} must be a positive number, got {value!r}")
    min_lr = (cfg.optim.get("sched") or {}).get("min_lr")
    if isinstance(min_lr, (int, float)) and lr < min_lr:  # NeMo's schedule raises after warmup
        raise UpcycleError(f"optim.lr {lr:g} is below optim.sched.min_lr {min_lr:g}: raise the lr or lower min_lr")


def check_inputs(cfg: DictConfig) -> None:
    """Refuse a missing checkpoint or dataset before exp_manager makes a run folder (and NeMo logs a page):
    a missing data_prefix was OmegaConf's traceback from inside trainer.fit."""
    from nemo_upcycle.data.datasets import parse_blend

    if cfg.restore_from and not Path(str(cfg.restore_from)).exists():
        raise UpcycleError(f"restore_from={cfg.restore_from} does not exist: check the path")
    if cfg.get("data") is None or OmegaConf.is_missing(cfg.data, "data_prefix") or not cfg.data.data_prefix:
        raise UpcycleError("data.data_prefix is not set: pass data.data_prefix=[PREFIX], a dataset written by "
                           "nemo-upcycle preprocess (e.g. data/stdlib_text_document)")
    parse_blend(list(cfg.data.data_prefix))


def train(cfg: DictConfig) -> TrainResult:
    check_numbers(cfg)  # both before NeMo's import, whose start-up lines would precede the one-line error
    check_inputs(cfg)
    import lightning.pytorch as pl
    from nemo.utils.exp_manager import exp_manager

    from nemo_upcycle.train.callbacks import ExpertLoadMonitor, LossHistory, StopAtStepEndOnSigterm
    from nemo_upcycle.train.parallel import MegatronParallelStrategy

    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    data_parallel = _parallel_set_up(cfg, trainer_args)
    if cfg.global_batch_size % (cfg.micro_batch_size * data_parallel):
        raise UpcycleError(f"global_batch_size {cfg.global_batch_size} is not a multiple of micro_batch_size "
                           f"{cfg.micro_batch_size} x {data_parallel} data-parallel ranks")
    pl.seed_everything(cfg.seed, workers=True)
    monitor, history, stopper = ExpertLoadMonitor(), LossHistory(), StopAtStepEndOnSigterm()
    engine = isinstance(trainer_args.get("strategy"), MegatronParallelStrategy)
    # The engine runs a global batch's micro-batches itself; Lightning accumulates them for the torch backend.
    accumulate = 1 if engine else cfg.global_batch_size // (cfg.micro_batch_size * data_parallel)
    if isinstance(trainer_args.get("val_check_interval"), int):  # optimizer steps on either backend, as in NeMo;
        trainer_args["val_check_interval"] *= accumulate        # Lightning counts the micro-batches it accumulates
    trainer = pl.Trainer(**trainer_args, callbacks=[monitor, history, stopper], accumulate_grad_batches=accumulate)
    if engine:
        trainer.strategy.setup_environment()  # parallel_state must exist before the Megatron model is built
    em = OmegaConf.to_container(cfg.exp_manager, resolve=True)
    em.setdefault("name", cfg.name)
    exp_dir = Path(exp_manager(trainer, OmegaConf.create(em)))
    if cfg.expert_load_plot:
        monitor.path = exp_dir / "expert_load.png"
    model = build_model(cfg, trainer)
    start = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - start
    if stopper.stopped_at is not None:
        checkpoint = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
        raise Preempted(stopper.stopped_at, trainer.max_steps, checkpoint or None, bool(em.get("resume_if_exists")))
    if model.engine is not None:
        model.engine.sync_params()
    nemo_path = Path(cfg.save_nemo) if cfg.save_nemo else exp_dir / f"{cfg.name}.nemo"
    model.save_to(str(nemo_path))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    result = TrainResult(model, exp_dir, nemo_path, trainer.global_step, seconds, metrics,
                         monitor.path if monitor.path is not None and monitor.path.exists() else None,
                         (history.tokens, history.losses), trainer.global_rank)
    if trainer.is_global_zero:
        (exp_dir / "train_summary.json").write_text(json.dumps(
            {"steps": result.steps, "seconds": seconds, "nemo": str(nemo_path), "metrics": metrics}, indent=2))
    return result
