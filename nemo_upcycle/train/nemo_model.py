"""The NeMo model class for an upcycled Nemotron-style GPT (and its dense source): a `nemo.core.ModelPT`,
hence a Lightning module, with `.nemo` save/restore in the format NeMo 1.x MegatronGPTModel uses.

    model = MegatronUpcycledGPTModel.restore_from("moe.nemo", trainer=trainer)      # converter output
    model = MegatronUpcycledGPTModel.restore_from("dense.nemo")                     # a dense NeMo 1.x .nemo
    model = MegatronUpcycledGPTModel.from_dense("dense.nemo", UpcycleConfig.from_shorthand("E8G8T8"))
    trainer.fit(model); model.save_to("trained.nemo")

`from_dense` upcycles at restore time (what Megatron-LM's `--moe-use-upcycling` does) with the same recipe code
as `nemo-upcycle convert`, so both give identical weights. The model config is NeMo's `model_config.yaml`
(model fields plus `vocab_size`, `backend`, `data`, `optim`, batch sizes). `backend` picks the implementation:
`torch` (the reference model) or `megatron` (Megatron-core; default where CUDA and Transformer Engine exist).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from lightning.pytorch import Trainer
from nemo.core.classes import ModelPT
from nemo.core.classes.common import ALLOWED_TARGET_PREFIXES
from nemo.core.connectors.save_restore_connector import SaveRestoreConnector
from nemo.utils.get_rank import is_global_rank_zero
from omegaconf import DictConfig, OmegaConf

from nemo_upcycle.checkpoint import CheckpointReader, open_checkpoint
from nemo_upcycle.checkpoint.base import Fetch
from nemo_upcycle.checkpoint.layout import write_megatron_dist
from nemo_upcycle.checkpoint.memory import InMemoryCheckpoint
from nemo_upcycle.checkpoint.nemo import NEMO_PREFIX, NemoReader, NemoWriter
from nemo_upcycle.checkpoint.nemo_config import gpt_config_from_nemo, nemo_config_from_gpt
from nemo_upcycle.convert import LayerStream, plan_conversion
from nemo_upcycle.data.tokenizers import TokenizerSpec
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models.backends import build_backend
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.manifest import TensorInfo, check_tensors
from nemo_upcycle.models.reference import lm_loss
from nemo_upcycle.recipe import UpcycleConfig

if "nemo_upcycle." not in ALLOWED_TARGET_PREFIXES:  # let NeMo's restore instantiate our classes
    ALLOWED_TARGET_PREFIXES.append("nemo_upcycle.")

TARGET = "nemo_upcycle.train.nemo_model.MegatronUpcycledGPTModel"
# training options of the torch backend's loop, with their off values (Megatron's engine refuses anything else)
TORCH_ONLY_OPTIONS = {"expert_lr_mult": 1.0, "tie_virtual_groups": False}


def padded_vocab_size(vocab: int, divisible_by: int = 128, tensor_parallel: int = 1) -> int:
    """Megatron's vocabulary padding: round up to a multiple of divisible_by * TP."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab // multiple) * multiple


class UpcycleSaveRestoreConnector(SaveRestoreConnector):
    """Reads every `.nemo` layout nemo-upcycle reads (torch_dist, legacy TP/PP, tar or directory) and writes
    NeMo 1.x's torch_dist `.nemo`, so NeMo, Megatron-LM and the converter all read what the model saves."""

    def save_to(self, model: "MegatronUpcycledGPTModel", save_path: str) -> None:
        if model.backend.sharded:  # NeMo calls every rank here when AppState.model_parallel_size > 1
            self._save_model_parallel(model, save_path)
        elif is_global_rank_zero():
            ckpt = model.as_checkpoint()
            self._write(ckpt, ckpt, save_path)

    def _write(self, weights: CheckpointReader, meta: CheckpointReader, save_path: str) -> None:
        writer = NemoWriter(Path(save_path), overwrite=True, pack=self.pack_nemo_file)
        writer.write(weights.config, weights.tensors(), lambda name: weights.read([name])[name], meta.meta())

    def _save_model_parallel(self, model: "MegatronUpcycledGPTModel", save_path: str) -> None:
        """Every rank saves its shards with Megatron's saver; rank 0 streams them into the .nemo layer by layer."""
        with shared_tmpdir() as tmp:
            model.backend.save_sharded(tmp / "model_weights", NEMO_PREFIX)
            if is_global_rank_zero():
                (tmp / "model_config.yaml").write_text(yaml.safe_dump(nemo_config_from_gpt(model.gpt_config)))
                meta = InMemoryCheckpoint(model.gpt_config, {}, tokenizer=model._packaged_tokenizer())
                with NemoReader(tmp) as weights:
                    self._write(weights, meta, save_path)

    def restore_from(self, calling_cls, restore_path: str, override_config_path=None, map_location=None,
                     strict: bool = True, return_config: bool = False, trainer: Trainer | None = None,
                     validate_access_integrity: bool = True):
        with open_checkpoint(restore_path) as reader:
            conf = model_config_for(reader.config, reader.source_config, reader.tokenizer)
            if override_config_path is not None:
                override = override_config_path if isinstance(override_config_path, DictConfig) \
                    else OmegaConf.load(override_config_path)
                conf = with_overrides(conf, override)
            if return_config:
                return conf
            instance = calling_cls.from_config_dict(config=conf, trainer=trainer)
            instance.tokenizer_spec = reader.tokenizer
            instance.load_checkpoint(reader, strict=strict)
        if map_location is not None:
            instance.to(map_location)
        return instance


@contextmanager
def shared_tmpdir() -> Iterator[Path]:
    """A temporary directory made by rank 0 and used by every rank (one node, or TMPDIR on a shared filesystem)."""
    name = [tempfile.mkdtemp(prefix="nemo-upcycle-") if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(name, src=0)
    try:
        yield Path(name[0])
    finally:
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(name[0], ignore_errors=True)


def with_overrides(conf: DictConfig, override: DictConfig) -> DictConfig:
    """`conf` with `override` merged in, except that an `optim` in `override` replaces the checkpoint's whole: a
    run's optimiser is its own (a .nemo's fused_adam `betas` must not reach the run's SGD)."""
    if "optim" in override:
        conf = OmegaConf.create({k: v for k, v in OmegaConf.to_container(conf).items() if k != "optim"})
    return OmegaConf.merge(conf, override)


def model_config_for(gpt: GPTConfig, base: dict[str, Any] | None, tokenizer: TokenizerSpec | None) -> DictConfig:
    """The ModelPT config of a checkpoint: NeMo's model_config fields + vocab_size + our target."""
    cfg = nemo_config_from_gpt(gpt, base)
    cfg["vocab_size"] = gpt.vocab_size
    cfg["target"] = TARGET  # nemo_config_from_gpt keeps NeMo's MegatronGPTModel target for files; ours here
    if tokenizer is not None:
        cfg["tokenizer"] = tokenizer.config
    return OmegaConf.create(cfg)


class MegatronUpcycledGPTModel(ModelPT):
    def __init__(self, cfg: DictConfig, trainer: Trainer | None = None):
        super().__init__(cfg=cfg, trainer=trainer)
        self._save_restore_connector = UpcycleSaveRestoreConnector()
        self.gpt_config = gpt_config_from_nemo(OmegaConf.to_container(cfg, resolve=True), self._vocab_size(cfg))
        self.backend = build_backend(self.gpt_config, cfg.get("backend", "auto"))
        self.tokenizer_spec: TokenizerSpec | None = None  # the tokenizer config + artifact bytes saved with the model
        self._tokenizer = None
        self._last_step_end: float | None = None
        self.engine = None  # Megatron's DDP + optimizer + schedules, set by MegatronParallelStrategy

    # ---- construction --------------------------------------------------------------------------------------
    @staticmethod
    def _vocab_size(cfg: DictConfig) -> int:
        if cfg.get("vocab_size"):
            return int(cfg.vocab_size)
        raise UpcycleError("the model config has no vocab_size: set model.vocab_size (the padded embedding size)")

    @classmethod
    def restore_from(cls, restore_path: str, override_config_path=None, map_location=None, strict: bool = True,
                     return_config: bool = False, save_restore_connector: SaveRestoreConnector | None = None,
                     trainer: Trainer | None = None, validate_access_integrity: bool = True):
        if not Path(restore_path).exists():
            raise UpcycleError(f"{restore_path} does not exist: pass a .nemo file or directory")
        return super().restore_from(restore_path, override_config_path, map_location, strict, return_config,
                                    save_restore_connector or UpcycleSaveRestoreConnector(), trainer,
                                    validate_access_integrity)

    @classmethod
    def from_dense(cls, path: str | Path, recipe: UpcycleConfig, trainer: Trainer | None = None,
                   overrides: dict[str, Any] | None = None) -> "MegatronUpcycledGPTModel":
        """Restore a dense checkpoint and upcycle it with `recipe` on the way in (= convert, then restore): the
        converter's own plan and layer stream, so the dense model is never whole in memory."""
        with open_checkpoint(path) as reader:
            plan = plan_conversion(reader, recipe, str(path))
            conf = model_config_for(plan.moe, reader.source_config, reader.tokenizer)
            if overrides:
                conf = with_overrides(conf, OmegaConf.create(overrides))
            model = cls.from_config_dict(config=conf, trainer=trainer)
            model.tokenizer_spec = reader.tokenizer
            fetch = LayerStream(reader, plan).fetch
            if model.backend.sharded:
                model._load_sharded(plan.outputs, fetch)
            else:
                model.backend.load_canonical_state_dict({name: fetch(name) for name in plan.outputs})
        return model

    def load_checkpoint(self, reader: CheckpointReader, strict: bool = True) -> None:
        """Weights from any checkpoint reader, after checking names and shapes against this model."""
        if strict:
            check_tensors(reader.tensors(), self.gpt_config, "the checkpoint")
        if self.backend.sharded:
            self._load_sharded(reader.tensors(), lambda name: reader.read([name])[name])
        else:
            self.backend.load_canonical_state_dict(reader.state_dict())

    def load_canonical_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.backend.sharded:
            memory = InMemoryCheckpoint(self.gpt_config, state)
            self._load_sharded(memory.tensors(), lambda name: memory.read([name])[name])
        else:
            self.backend.load_canonical_state_dict(state)

    def _load_sharded(self, tensors: dict[str, TensorInfo], fetch: Fetch) -> None:
        """Split over ranks: rank 0 streams the weights once into a torch_dist checkpoint, tensor by tensor, and
        every rank reads only its shards with Megatron's loader."""
        with shared_tmpdir() as tmp:
            if torch.distributed.get_rank() == 0:
                write_megatron_dist(tmp / "model_weights", self.gpt_config, tensors, fetch, NEMO_PREFIX)
            torch.distributed.barrier()
            self.backend.load_sharded(tmp / "model_weights", NEMO_PREFIX)

    def as_checkpoint(self) -> InMemoryCheckpoint:
        """This model's weights, config and tokenizer as a checkpoint any writer can save."""
        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        return InMemoryCheckpoint(self.gpt_config, self.backend.canonical_state_dict(), cfg,
                                  self._packaged_tokenizer())

    def _packaged_tokenizer(self) -> TokenizerSpec | None:
        """The tokenizer as .nemo artifacts: local file paths in the config become `nemo:<hex>_<name>`."""
        if self.tokenizer_spec is not None:
            return self.tokenizer_spec
        tok = self.cfg.get("tokenizer")
        if tok is None:
            return None
        config, artifacts = dict(OmegaConf.to_container(tok, resolve=True)), {}
        for key, value in list(config.items()):
            if key in ("model", "vocab_file", "merge_file") and isinstance(value, str) and Path(value).is_file():
                name = f"{uuid.uuid4().hex}_{Path(value).name}"
                artifacts[name] = Path(value).read_bytes()
                config[key] = f"nemo:{name}"
        self.tokenizer_spec = TokenizerSpec(config, artifacts)
        return self.tokenizer_spec

    @property
    def tokenizer(self):
        """The model's own tokenizer, loaded on first use."""
        if self._tokenizer is None:
            from nemo_upcycle.checkpoint import load_tokenizer_of

            spec = self._packaged_tokenizer()
            if spec is None:
                raise UpcycleError("the model config has no tokenizer section: add model.tokenizer")
            self._tokenizer = load_tokenizer_of(spec)
        return self._tokenizer

    # ---- training ------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor):
        return self.backend(tokens)

    def _step(self, batch: dict[str, torch.Tensor]):
        step = self.backend(batch["tokens"])
        loss = lm_loss(step.logits, batch["labels"], batch.get("loss_mask"))
        return loss, step

    @property
    def uses_engine(self) -> bool:
        """Trained by Megatron-core's engine (train/parallel.py) rather than by Lightning's automatic loop."""
        from nemo_upcycle.train.parallel import MegatronParallelStrategy

        return self._trainer is not None and isinstance(self._trainer.strategy, MegatronParallelStrategy)

    @property
    def automatic_optimization(self) -> bool:
        return not self.uses_engine  # the engine steps Megatron's optimizer itself, once per global batch

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.uses_engine:
            return self._engine_training_step(batch)
        self.backend.set_router_loss_scale(self._loss_scale())
        loss, step = self._step(batch)
        self._log_step(loss, step.aux_loss, step.z_loss, batch["tokens"], step.tokens_per_expert)
        return loss + step.objective

    def _engine_training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One global batch: this rank's micro-batches through Megatron's schedule, then its optimizer step."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
        micro_batch_size = int(self.cfg.micro_batch_size)
        loss = self.engine.run(batch, micro_batch_size, forward_only=False)
        self.optimizers().step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:  # optim without sched: a constant lr
            scheduler.step()
        aux, z = self.backend.router_losses(num_microbatches=batch["tokens"].shape[0] // micro_batch_size)
        self._log_step(loss, aux, z, batch["tokens"], self.backend.tokens_per_expert())
        if self.engine.optimizer.last_grad_norm is not None:
            self.log("grad_norm", float(self.engine.optimizer.last_grad_norm), batch_size=1)
        return loss

    def _log_step(self, loss: torch.Tensor, aux: torch.Tensor, z: torch.Tensor, tokens: torch.Tensor,
                  tokens_per_expert: list[torch.Tensor]) -> None:
        now = time.perf_counter()
        metrics = {"lm_loss": loss.detach(), "aux_loss": aux, "z_loss": z}
        if self._last_step_end is not None:
            metrics["tokens_per_sec"] = tokens.numel() / max(now - self._last_step_end, 1e-9)
        self._last_step_end = now
        for i, counts in enumerate(tokens_per_expert):
            fractions = counts.float() / counts.sum().clamp(min=1)
            metrics.update({f"expert_load/layer{i}/expert{e}": f for e, f in enumerate(fractions.tolist())})
        self.log_dict(metrics, on_step=True, prog_bar=False, batch_size=tokens.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, batch_size=tokens.shape[0])
        self.last_expert_load = [c.detach().float().cpu() for c in tokens_per_expert]

    def _loss_scale(self) -> float:
        """What Lightning multiplies the returned loss by before backward."""
        scale = 1.0 / self.trainer.accumulate_grad_batches
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # fp16 mixed precision
        return scale * scaler.get_scale() if scaler is not None else scale

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.uses_engine:
            self.engine.sync_params()
            loss = self.engine.run(batch, batch["tokens"].shape[0], forward_only=True)
        else:
            loss, _ = self._step(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["tokens"].shape[0])
        return loss

    def configure_optimizers(self):
        """Megatron's optimizer (with NeMo's LR schedule) under the engine; NeMo's optimizer otherwise."""
        if not self.uses_engine:
            self._check_tied_groups()
            optimizers = super().configure_optimizers()
            self._apply_lr_mults()
            return optimizers
        for key, off in TORCH_ONLY_OPTIONS.items():
            if self.cfg.get(key, off) != off:
                raise UpcycleError(f"{key} is applied by the torch backend only: use backend=torch, or {key}={off} "
                                   "with the megatron backend")
        from nemo.core.optim import prepare_lr_scheduler

        optim = OmegaConf.to_container(self.cfg.optim, resolve=True)
        sched = dict(optim.pop("sched", None) or {})
        optimizer = self.engine.build_optimizer(optim)
        if not sched:
            return optimizer
        sched.setdefault("max_steps", self.trainer.max_steps)
        scheduler = prepare_lr_scheduler(optimizer=optimizer, scheduler_config=sched, train_dataloader=self._train_dl)
        return [optimizer], [scheduler]

    def lr_scheduler_step(self, scheduler, metric) -> None:
        super().lr_scheduler_step(scheduler, metric)
        self._apply_lr_mults()

    def _apply_lr_mults(self) -> None:
        """A param group's `lr_mult` (Megatron's name) scales the lr the schedule gives the base groups, at every
        step: the ratio holds through warmup and decay down to min_lr x lr_mult, where NeMo's schedules would
        anneal every group to the one absolute min_lr."""
        groups = self._optimizer.param_groups
        base = next(g["lr"] for g in groups if "lr_mult" not in g)
        for group in groups:
            if "lr_mult" in group:
                group["lr"] = base * group["lr_mult"]

    def _routers(self) -> list:
        from nemo_upcycle.models.reference import Router

        return [m for m in self.backend.model.modules() if isinstance(m, Router)]

    def _check_tied_groups(self) -> None:
        if not self.cfg.get("tie_virtual_groups", False):
            return
        routers, granularity = self._routers(), self.gpt_config.granularity
        if not routers or granularity == 1:
            raise UpcycleError(f"tie_virtual_groups needs fine-grained experts (granularity > 1); this model has "
                               f"{'no MoE layers' if not routers else 'full-size experts (G=1)'}: set "
                               "tie_virtual_groups=false")
        if not all(router.groups_tied(granularity) for router in routers):
            raise UpcycleError("tie_virtual_groups: the router rows of a virtual group differ, so top-k does not "
                               "select whole groups: start from a fresh upcycle with router_init calibrated or "
                               "virtual_group (not random)")

    def on_after_backward(self) -> None:
        """tie_virtual_groups: each virtual group's router rows get one shared gradient, so they stay equal and
        top-k keeps selecting whole groups: fine-grained experts routed as E coarse ones all run. At small scale
        Adam otherwise unties the groups at the first step, and mixing shards of different copies of the dense
        MLP costs more than continued training gains (benchmarks/replicate_paper.py)."""
        if self.cfg.get("tie_virtual_groups", False) and not self.uses_engine:
            for router in self._routers():
                router.tie_group_grads(self.gpt_config.granularity)

    def setup_optimizer_param_groups(self) -> None:
        """No weight decay on norms and biases (Megatron's default). With `expert_lr_mult` m != 1 the routed
        experts' weight matrices get their own group at lr * m all run (`lr_mult`, see _apply_lr_mults) and weight
        decay / m (the same decay per step):
        weight scaling multiplies them by f, so Adam's fixed-size steps change them f times less, relatively, than
        the dense weights they were copied from; m = f restores the dense model's relative step size."""
        mult = float(self.cfg.get("expert_lr_mult", 1.0))
        decay, no_decay, experts = [], [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                if p.ndim < 2:
                    no_decay.append(p)
                else:
                    (experts if mult != 1.0 and ".experts." in name else decay).append(p)
        self._optimizer_param_groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        if experts:
            wd = float(self.cfg.optim.get("weight_decay", 0.0))
            self._optimizer_param_groups.append({"params": experts, "lr_mult": mult, "weight_decay": wd / mult})

    # ---- data ----------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.cfg.get("data") is not None and self._train_dl is None:
            self.setup_training_data(self.cfg.data)
            self.setup_validation_data(self.cfg.data)

    def _datasets(self, data_cfg: DictConfig):
        """Train / valid datasets sized from the trainer: max_steps global batches, and limit_val_batches
        micro-batches at every validation (10 when the limit is a fraction)."""
        from nemo_upcycle.data.datasets import build_gpt_datasets
        from nemo_upcycle.train.parallel import data_parallel_size

        if getattr(self, "_splits", None) is None:
            trainer = self._trainer
            if trainer is None or trainer.max_steps <= 0:
                raise UpcycleError("training data needs a Trainer with max_steps set (trainer.max_steps=...)")
            val_batches = trainer.limit_val_batches if isinstance(trainer.limit_val_batches, int) else 10
            interval = (trainer.val_check_interval // trainer.accumulate_grad_batches  # in optimizer steps
                        if isinstance(trainer.val_check_interval, int) else trainer.max_steps)
            validations = trainer.max_steps // max(interval, 1) + 1
            self._splits = build_gpt_datasets(
                list(data_cfg.data_prefix), self.tokenizer, self.gpt_config.seq_length,
                split=data_cfg.get("splits_string", "949,50,1"),
                num_samples=(trainer.max_steps * int(self.cfg.global_batch_size),
                             validations * val_batches * int(self.cfg.micro_batch_size) * data_parallel_size(), 0),
                seed=int(data_cfg.get("seed", 1234)), cache_dir=data_cfg.get("index_cache_dir"),
            )
        return self._splits

    def _loader(self, dataset, resumes: bool):
        """Megatron's order (see MegatronOrderSampler); the training loader continues where a resumed run was."""
        if dataset is None:
            return None
        from nemo_upcycle.data.datasets import MegatronOrderSampler
        from nemo_upcycle.train.parallel import data_parallel_rank, data_parallel_size

        consumed = (lambda: self.trainer.global_step * int(self.cfg.global_batch_size)) if resumes else (lambda: 0)
        sampler = MegatronOrderSampler(len(dataset), data_parallel_size(), data_parallel_rank(), consumed)
        # The engine takes this rank's share of a global batch per step and splits it into micro-batches.
        batch = int(self.cfg.global_batch_size) // data_parallel_size() if resumes and self.uses_engine \
            else int(self.cfg.micro_batch_size)
        return torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler,
                                           num_workers=int(self.cfg.data.get("num_workers", 0)), drop_last=True)

    def setup_training_data(self, train_data_config: DictConfig) -> None:
        self._train_dl = self._loader(self._datasets(train_data_config).train, resumes=True)

    def setup_validation_data(self, val_data_config: DictConfig) -> None:
        self._validation_dl = self._loader(self._datasets(val_data_config).valid, resumes=False)

    @classmethod
    def list_available_models(cls) -> list:
        return []

