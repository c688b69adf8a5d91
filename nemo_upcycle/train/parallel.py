"""Training on several processes through Megatron-core's own engine, inside Lightning.

    torchrun --nproc-per-node 8 -m nemo_upcycle.cli train restore_from=moe.nemo backend=megatron \
        tensor_model_parallel_size=2 pipeline_model_parallel_size=2 expert_model_parallel_size=2 \
        use_distributed_optimizer=true overlap_grad_reduce=true

The pattern of NeMo 2's MegatronStrategy / MegatronParallel, written small: a Lightning strategy sets up
Megatron's parallel groups, wraps every model chunk in `megatron.core.distributed.DistributedDataParallel`
(bucketed gradient reduce, overlapped with backward when asked, the distributed optimizer's buffers), and the
model trains with Lightning's manual optimization: one `training_step` is one global batch, run by
`get_forward_backward_func` (no pipelining, 1F1B, or interleaved 1F1B over virtual stages), which ends with
`finalize_model_grads` (data-parallel reduce per bucket, expert gradients over the expert-data-parallel group,
sequence-parallel norms and embeddings over their groups). The step itself is `get_megatron_optimizer`'s:
Adam or SGD, clipping by the norm over every model-parallel shard, the distributed optimizer's sharded state.
Lightning keeps what it is good at: the loop, validation, logging, exp_manager's checkpoints and resume.
Checkpoints are Megatron's sharded `dist_checkpointing` of model and optimizer, so a run resumes at any other
TP / PP / EP layout. Nothing of the reduction or the clipping is re-implemented here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from nemo_upcycle.errors import UpcycleError


@dataclass(frozen=True)
class ParallelLayout:
    """NeMo's YAML keys for the parallel layout and Megatron's DDP / optimizer options."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None  # None: the tensor-parallel size
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False

    @classmethod
    def from_config(cls, cfg) -> "ParallelLayout":
        return cls(**{f: cfg.get(f, getattr(cls, f)) for f in cls.__dataclass_fields__})

    @property
    def model_parallel(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def check(self, world_size: int, backend: str, global_batch_size: int | None = None,
              micro_batch_size: int | None = None) -> None:
        """One-line errors for layouts Megatron would reject deep inside its set-up (or its first step)."""
        tp, pp, ep = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.expert_model_parallel_size
        etp = self.expert_tensor_parallel_size or tp
        if min(tp, pp, ep, etp) < 1:
            raise UpcycleError("tensor/pipeline/expert(_tensor)_model_parallel_size must be >= 1")
        if world_size % (tp * pp) or world_size % (etp * ep * pp):
            raise UpcycleError(f"{world_size} processes cannot be split into tensor_model_parallel_size {tp} x "
                               f"pipeline_model_parallel_size {pp} (and expert_model_parallel_size {ep} x "
                               f"expert_tensor_parallel_size {etp} per stage): make the products divide it")
        if (world_size // (tp * pp)) % ep and etp == tp:
            raise UpcycleError(f"expert_model_parallel_size {ep} must divide the data-parallel size "
                               f"{world_size // (tp * pp)}")
        if self.virtual_pipeline_model_parallel_size and pp == 1:
            raise UpcycleError("virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1")
        micro = (global_batch_size or 0) // ((micro_batch_size or 1) * (world_size // (tp * pp)))
        if (self.virtual_pipeline_model_parallel_size or 1) > 1 and global_batch_size and micro % pp:
            raise UpcycleError(interleaved_batch_error(micro, pp))
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise UpcycleError("overlap_param_gather needs use_distributed_optimizer=true")
        if world_size > 1 and backend != "megatron":
            raise UpcycleError("several processes need backend=megatron (Megatron-core's engine); the torch backend "
                               "is one process")


def interleaved_batch_error(micro_batches: int, pipeline: int) -> str:
    return (f"virtual_pipeline_model_parallel_size (the interleaved schedule) needs the micro-batches per global "
            f"batch and data-parallel rank ({micro_batches}: global_batch_size / (micro_batch_size x data-parallel "
            f"size)) to be a multiple of pipeline_model_parallel_size {pipeline}")


def data_parallel_size() -> int:
    """Model replicas that read different samples (1 outside a parallel run)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_data_parallel_world_size()


def data_parallel_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0


class MegatronOptimizerForLightning(torch.optim.Optimizer):
    """A Megatron optimizer where Lightning and NeMo's LR schedulers expect a torch Optimizer: the schedulers set
    `lr` in its param groups (Megatron's own groups: decay / no decay, dense / expert), `step` is Megatron's
    (grad clipping over all model-parallel ranks, the distributed optimizer's reduce-scatter / all-gather)."""

    def __init__(self, megatron_optimizer):  # no super().__init__: the state lives in the Megatron optimizer
        self.megatron = megatron_optimizer
        self.defaults = {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self.last_grad_norm: float | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.megatron.param_groups

    @property
    def state(self):
        return self.megatron.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.megatron.zero_grad(set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        from nemo_upcycle.compat import megatron_engine_on_cpu

        loss = closure() if closure is not None else None
        with megatron_engine_on_cpu():
            ok, grad_norm, _ = self.megatron.step()
        if not ok:
            raise UpcycleError("the optimizer step was skipped (inf/nan gradients): lower optim.lr or use bf16")
        self.last_grad_norm = grad_norm
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {}  # saved sharded, with the model (MegatronParallelStrategy.save_checkpoint)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loaded sharded by the strategy."""


class MegatronEngine:
    """The model chunks in Megatron's DDP, Megatron's optimizer, and one global batch through its schedule."""

    def __init__(self, backend, layout: ParallelLayout, clip_grad: float | None = None):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        from nemo_upcycle.compat import megatron_engine_on_cpu

        self.backend, self.layout, self.clip_grad = backend, layout, clip_grad
        if len(backend.chunks) > 1:
            _unbatched_p2p(backend.chunks)
        self.ddp_config = DistributedDataParallelConfig(
            overlap_grad_reduce=layout.overlap_grad_reduce, overlap_param_gather=layout.overlap_param_gather,
            use_distributed_optimizer=layout.use_distributed_optimizer, grad_reduce_in_fp32=True,
            bucket_size=None if not layout.overlap_grad_reduce else 40_000_000)
        with megatron_engine_on_cpu():
            self.chunks = [DistributedDataParallel(c.config, self.ddp_config, c, disable_bucketing=i > 0)
                           for i, c in enumerate(backend.chunks)]  # Megatron-LM buckets only the first chunk
        for chunk in self.chunks:
            chunk.broadcast_params()  # data-parallel replicas start equal
        self.optimizer: MegatronOptimizerForLightning | None = None
        self.stateful_optimizer = False

    @property
    def config(self):
        return self.backend.chunks[0].config

    def build_optimizer(self, optim: dict[str, Any]) -> MegatronOptimizerForLightning:
        """Megatron's optimizer from NeMo's `optim` section (adamw / adam (decoupled decay) or sgd)."""
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from nemo_upcycle.compat import megatron_engine_on_cpu

        name = str(optim.get("name", "adamw")).lower()
        if name not in ("adamw", "adam", "sgd"):
            raise UpcycleError(f"optim.name {name}: Megatron's optimizer is adamw, adam or sgd")
        if name == "sgd" and float(optim.get("momentum", 0.0)):
            raise UpcycleError("Megatron cannot checkpoint SGD momentum (0.16): use optim.name=adamw, or momentum 0")
        self.stateful_optimizer = name != "sgd"
        betas = optim.get("betas", (0.9, 0.999))
        weight_decay = float(optim.get("weight_decay", 0.0))
        config = OptimizerConfig(
            optimizer="sgd" if name == "sgd" else "adam", decoupled_weight_decay=name == "adamw",
            lr=float(optim["lr"]), weight_decay=weight_decay,
            adam_beta1=float(betas[0]), adam_beta2=float(betas[1]), adam_eps=float(optim.get("eps", 1e-8)),
            sgd_momentum=0.0,  # Megatron's default is 0.9; NeMo's and torch's 0, and momentum > 0 is refused above
            clip_grad=float(self.clip_grad or 0.0),
            use_distributed_optimizer=self.layout.use_distributed_optimizer, bf16=self.config.bf16,
            fp16=self.config.fp16, params_dtype=self.config.params_dtype)
        with megatron_engine_on_cpu():
            megatron = get_megatron_optimizer(config, self.chunks)
        for group in megatron.param_groups:  # Megatron's scheduler would apply wd_mult each step; NeMo's does not
            group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
        self.config.finalize_model_grads_func = finalize_model_grads
        if self.layout.overlap_grad_reduce:
            self.config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 \
                else self.chunks[0].no_sync
        if self.layout.overlap_param_gather:
            self.config.param_sync_func = [c.start_param_sync for c in self.chunks] if len(self.chunks) > 1 \
                else self.chunks[0].start_param_sync
        self.optimizer = MegatronOptimizerForLightning(megatron)
        return self.optimizer

    def run(self, batch: dict[str, torch.Tensor], micro_batch_size: int, forward_only: bool) -> torch.Tensor:
        """One global batch (this rank's share: its micro-batches in order) through Megatron's schedule;
        returns the mean LM loss, on every rank of the pipeline (the last stage computes it)."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from nemo_upcycle.compat import megatron_engine_on_cpu

        n = batch["tokens"].shape[0] // micro_batch_size
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        micro = [{k: v[i * micro_batch_size:(i + 1) * micro_batch_size] for k, v in batch.items()} for i in range(n)]
        if len(self.chunks) > 1 and n % pp:  # Megatron's interleaved schedule runs groups of `pp` micro-batches
            if not forward_only:
                raise UpcycleError(interleaved_batch_error(n, pp))
            micro += micro[-1:] * (pp - n % pp)  # evaluation: repeated micro-batches, their losses dropped
        if not forward_only:
            for chunk in self.chunks:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
        with megatron_engine_on_cpu():
            losses = get_forward_backward_func()(
                forward_step_func=_forward_step, data_iterator=[iter(micro) for _ in self.chunks],
                model=self.chunks, num_microbatches=len(micro), seq_length=batch["tokens"].shape[1],
                micro_batch_size=micro_batch_size, forward_only=forward_only)
        mean = torch.stack([x["lm_loss"] for x in losses[:n]]).mean() if losses else torch.zeros(())
        if pp > 1:
            dist.broadcast(mean, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return mean

    def sync_params(self) -> None:
        """Finish the distributed optimizer's overlapped parameter all-gather (before evaluating or saving)."""
        if self.layout.overlap_param_gather:
            for chunk in self.chunks:
                chunk.start_param_sync(force_sync=True)

    def optimizer_layout(self) -> dict[str, Any]:
        """What decides the optimizer checkpoint's keys: the distributed optimizer also stores fp32 main params, and
        Megatron chains a second (expert) optimizer, with its own key prefix, when expert_model_parallel_size > 1."""
        megatron = self.optimizer.megatron
        return {"use_distributed_optimizer": self.layout.use_distributed_optimizer,
                "optimizers": len(getattr(megatron, "chained_optimizers", [megatron]))}

    def check_resumes_from(self, path: Path) -> None:
        """One-line error where Megatron's loader would fail on a key: optimizer state saved in another layout."""
        from megatron.core import dist_checkpointing

        if self.optimizer is None or not self.stateful_optimizer:
            return
        saved = dist_checkpointing.load_common_state_dict(str(path)).get("optimizer_layout")
        mine = self.optimizer_layout()
        if saved is not None and saved != mine:
            raise UpcycleError(
                f"{path} holds optimizer state with use_distributed_optimizer={saved['use_distributed_optimizer']} in "
                f"{saved['optimizers']} Megatron optimizer(s); this run has {mine['use_distributed_optimizer']} in "
                f"{mine['optimizers']} (a second, expert optimizer comes with expert_model_parallel_size > 1): resume "
                "with the same use_distributed_optimizer and expert_model_parallel_size on the same side of 1")

    def load_optimizer_state(self, loaded: dict[str, Any]) -> None:
        """The optimizer part of what dist_checkpointing.load returned for `sharded_state_dict(loading=True)`."""
        from nemo_upcycle.compat import megatron_engine_on_cpu, torch_adam_distributed_load

        with megatron_engine_on_cpu(), torch_adam_distributed_load(self.optimizer.megatron):
            self.optimizer.megatron.load_state_dict(loaded)

    def sharded_state_dict(self, loading: bool = False) -> dict[str, Any]:
        """Model and optimizer, sharded by Megatron; the distributed optimizer's state in its fully reshardable form
        (per parameter, like a plain optimizer's), so a run resumes at any other TP / PP / EP / DP layout."""
        from nemo_upcycle.compat import torch_adam_state_before_load
        from nemo_upcycle.models.megatron import sharded_state_dict_of

        chunks = sharded_state_dict_of([c.module for c in self.chunks], "model.")
        state = {"model": chunks}
        if loading and self.optimizer is not None and self.stateful_optimizer:
            torch_adam_state_before_load(self.optimizer.megatron)
        if self.optimizer is not None and self.stateful_optimizer:  # plain SGD has no state (nor a loader for one)
            state["optimizer"] = self.optimizer.megatron.sharded_state_dict(
                chunks, is_loading=loading, metadata={"distrib_optim_sharding_type": "fully_reshardable",
                                            # gathered through the gloo groups, in host memory
                                            "distrib_optim_fully_reshardable_mem_efficient": True})
            state["optimizer_layout"] = self.optimizer_layout()  # common (not sharded): checked before a resume
        return state


def _unbatched_p2p(chunks) -> None:
    """The interleaved schedule's activations and gradients travel as separate sends, overlapped with compute,
    as Megatron-LM configures it (batch_p2p_comm = not overlap_p2p_comm). Batched, with two pipeline stages (the
    previous and the next stage are the same process) a step's forward activation and backward gradient go to one
    peer in one batch whose sends and receives are posted in opposite orders on the two sides; gloo matches them
    by order, so activations arrive as gradients and the run trains 3.5e-2 away from one process. Unbatched,
    Megatron sends the two directions on two process groups."""
    for chunk in chunks:
        chunk.config.batch_p2p_comm, chunk.config.overlap_p2p_comm = False, True


def _forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model):
    """Megatron's forward_step_func: a micro-batch through one model chunk; the last stage returns per-token
    losses (vocabulary-parallel cross entropy) and the function that averages them over the loss mask."""
    batch = next(data_iterator)
    tokens, labels = batch["tokens"], batch["labels"]
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=tokens.device), 1)[None, None]
    output = model(tokens, position_ids, mask, labels=labels)
    loss_mask = batch.get("loss_mask")
    loss_mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.float()

    def loss_func(per_token: torch.Tensor):
        loss = (per_token.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)
        return loss, {"lm_loss": loss.detach().clone()}  # Megatron divides `loss` in place afterwards

    return output, loss_func


class MegatronParallelStrategy(DDPStrategy):
    """Lightning's process set-up from torchrun's environment, Megatron's parallel groups, DDP and checkpoints."""

    def __init__(self, layout: ParallelLayout, clip_grad: float | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.layout, self.clip_grad = layout, clip_grad
        self.engine: MegatronEngine | None = None
        self._resume_dir: Path | None = None

    def setup_distributed(self) -> None:
        super().setup_distributed()
        from nemo.utils import AppState

        from nemo_upcycle.compat import init_megatron

        lay = self.layout
        init_megatron(tensor_parallel=lay.tensor_model_parallel_size, pipeline_parallel=lay.pipeline_model_parallel_size,
                      expert_parallel=lay.expert_model_parallel_size,
                      expert_tensor_parallel=lay.expert_tensor_parallel_size,
                      virtual_pipeline_parallel=lay.virtual_pipeline_model_parallel_size)
        # NeMo's ModelPT.save_to then calls the save connector on every rank, which a sharded save needs.
        AppState().model_parallel_size = lay.model_parallel * lay.expert_model_parallel_size

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the sharded optimizer state loads into the optimizer, which exists only after setup

    def configure_ddp(self) -> None:
        """Megatron's DDP around each model chunk (kept beside the LightningModule, whose keys stay model.*)."""
        self.engine = MegatronEngine(self.lightning_module.backend, self.layout, self.clip_grad)
        self.lightning_module.engine = self.engine

    # ---- checkpoints: Megatron's sharded model + optimizer state beside Lightning's file --------------------
    @staticmethod
    def _dist_dir(filepath) -> Path:
        """NeMo's name for a distributed checkpoint: the .ckpt path without its suffix (what exp_manager resumes
        from and NeMoModelCheckpoint prunes); Lightning's own file beside it keeps the loop and scheduler state."""
        from nemo.utils.model_utils import ckpt_to_dir

        path = Path(filepath)
        return path if path.suffix != ".ckpt" else ckpt_to_dir(path)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # in the sharded checkpoint

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        return {}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any = None) -> None:
        from megatron.core import dist_checkpointing

        from nemo_upcycle.compat import megatron_engine_on_cpu

        target = self._dist_dir(filepath)
        if self.is_global_zero:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
        self.barrier()
        self.engine.sync_params()
        with megatron_engine_on_cpu():
            dist_checkpointing.save(self.engine.sharded_state_dict(), str(target))
        super().save_checkpoint(checkpoint, filepath, storage_options)  # rank 0: loops, scheduler, callbacks
        self.barrier()

    def load_checkpoint(self, checkpoint_path) -> dict[str, Any]:
        target = self._dist_dir(checkpoint_path)
        lightning_file = target.with_name(target.name + ".ckpt")
        if not target.is_dir() or not lightning_file.is_file():
            raise UpcycleError(f"{checkpoint_path} is not a checkpoint of a backend=megatron run (it needs the "
                               f"directory {target.name} and the file {lightning_file.name})")
        self._resume_dir = target
        return super().load_checkpoint(lightning_file)

    def _load_sharded(self, with_optimizer: bool) -> dict[str, Any]:
        from megatron.core import dist_checkpointing

        from nemo_upcycle.compat import megatron_engine_on_cpu

        self.engine.check_resumes_from(self._resume_dir)
        state = self.engine.sharded_state_dict(loading=True)
        if not with_optimizer:
            state.pop("optimizer", None)
        with megatron_engine_on_cpu():
            return dist_checkpointing.load(state, str(self._resume_dir))

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        from nemo_upcycle.models.megatron import load_chunk_states

        load_chunk_states([c.module for c in self.engine.chunks], self._load_sharded(with_optimizer=False)["model"],
                          "model.", self._resume_dir)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        if self.engine.stateful_optimizer:
            self.engine.load_optimizer_state(self._load_sharded(with_optimizer=True)["optimizer"])

    def remove_checkpoint(self, filepath) -> None:
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            shutil.rmtree(self._dist_dir(filepath), ignore_errors=True)
