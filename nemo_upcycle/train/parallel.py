"""Training on several processes: data, tensor and expert parallelism from Megatron's parallel_state, in Lightning.

    torchrun --nproc-per-node 4 -m nemo_upcycle.cli train restore_from=moe.nemo backend=megatron \
        tensor_model_parallel_size=2 expert_model_parallel_size=2

Lightning's own DDP would average every gradient over every process, which mixes tensor-parallel shards and
expert shards into each other. This strategy instead sets up parallel_state and reduces gradients the way
Megatron's finalize_model_grads does without pipeline parallelism: sequence-parallel and q/k norms summed over
the tensor-parallel group, then parameters Megatron marks `allreduce=False` (experts) over the
expert-data-parallel group and the rest over the data-parallel group, both divided by the data-parallel size,
as the loss is a mean over the data-parallel ranks' micro-batches. The
model's data loaders give each data-parallel rank its own samples (tensor-parallel ranks read the same ones),
and gradient-norm clipping counts every shard once. Lightning checkpoints hold one file per model-parallel
rank. Pipeline parallelism needs Megatron's schedules: use NeMo or Megatron-LM for that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from nemo_upcycle.errors import UpcycleError


def check_parallel_sizes(world_size: int, tensor_parallel: int, expert_parallel: int, backend: str) -> None:
    """One-line errors for layouts Megatron would reject deep inside its set-up."""
    if tensor_parallel < 1 or expert_parallel < 1:
        raise UpcycleError("tensor_model_parallel_size and expert_model_parallel_size must be >= 1")
    if world_size % (tensor_parallel * expert_parallel):
        raise UpcycleError(f"{world_size} processes cannot be split into tensor_model_parallel_size {tensor_parallel} "
                           f"x expert_model_parallel_size {expert_parallel} groups: make the product divide it")
    if tensor_parallel * expert_parallel > 1 and backend != "megatron":
        raise UpcycleError("tensor and expert parallelism need backend=megatron (the torch backend is one process "
                           "per model replica)")


def data_parallel_size() -> int:
    """Model replicas that read different samples (1 outside a parallel run)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_data_parallel_world_size()


def data_parallel_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0


def reduce_gradients(module: torch.nn.Module) -> None:
    """Megatron's gradient reduction for one model chunk without pipeline parallelism: sum the gradients of
    sequence-parallel norms (each tensor-parallel rank saw part of the sequence) and of q/k norms (part of the
    heads) over the tensor-parallel group, then sum every gradient over the ranks that hold the same parameter
    and divide by the data-parallel size."""
    from megatron.core import parallel_state

    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    for _, p in named:
        if p.grad is None:  # e.g. an expert that got no tokens here: its replicas may have got some
            p.grad = torch.zeros_like(p)
    tp_partial = [p for n, p in named if getattr(p, "sequence_parallel", False) or "q_layernorm" in n
                  or "k_layernorm" in n]
    dp = parallel_state.get_data_parallel_world_size()
    _all_reduce(tp_partial, parallel_state.get_tensor_model_parallel_group(), 1.0)
    _all_reduce([p for _, p in named if getattr(p, "allreduce", True)], parallel_state.get_data_parallel_group(),
                1.0 / dp)
    _all_reduce([p for _, p in named if not getattr(p, "allreduce", True)],
                parallel_state.get_expert_data_parallel_group(), 1.0 / dp)


def clip_grad_norm_(module: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over the whole model when it is split over ranks: each shard counted once
    (replicas of tensor-parallel-duplicated parameters only on tensor-parallel rank 0), dense shards summed over
    the tensor-parallel group, expert shards over the expert tensor-and-expert-parallel group, as Megatron does
    (Megatron's own clip_grads needs CUDA multi-tensor kernels, so it cannot run the CPU tests)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    params = [p for p in module.parameters() if p.grad is not None]
    squares = torch.zeros(2, dtype=torch.float64, device=params[0].device if params else "cpu")  # dense, expert
    for p in params:
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            squares[0 if getattr(p, "allreduce", True) else 1] += p.grad.double().pow(2).sum()
    grads = [p.grad for p in params]
    dense, expert = squares.unbind()
    dist.all_reduce(dense, group=parallel_state.get_tensor_model_parallel_group())
    dist.all_reduce(expert, group=parallel_state.get_expert_tensor_and_model_parallel_group())
    total = (dense + expert).sqrt()
    coeff = max_norm / (total.item() + 1e-6)
    if coeff < 1.0:
        for g in grads:
            g.mul_(coeff)
    return total


def _all_reduce(params: list[torch.nn.Parameter], group, scale: float) -> None:
    """Sum the gradients of `params` over `group` (one flat buffer), times `scale`."""
    if not params or (dist.get_world_size(group) == 1 and scale == 1.0):
        return
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


class MegatronParallelStrategy(DDPStrategy):
    """Lightning's process set-up from torchrun's environment, Megatron's parallel groups and gradient rules."""

    def __init__(self, tensor_parallel: int = 1, expert_parallel: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        self.tensor_parallel, self.expert_parallel = tensor_parallel, expert_parallel

    def setup_distributed(self) -> None:
        super().setup_distributed()
        from nemo.utils import AppState

        from nemo_upcycle.compat import init_megatron

        init_megatron(tensor_parallel=self.tensor_parallel, expert_parallel=self.expert_parallel)
        # NeMo's ModelPT.save_to then calls the save connector on every rank, which a sharded save needs.
        AppState().model_parallel_size = self.tensor_parallel * self.expert_parallel

    def configure_ddp(self) -> None:
        """No DDP wrapper: gradients are reduced per parallel group in optimizer_step."""

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        def closure_then_reduce() -> Any:
            loss = closure()  # the last micro-batch's forward and backward: all gradients are in
            reduce_gradients(self.lightning_module)
            return loss

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    # ---- Lightning checkpoints: one file per model-parallel rank -----------------------------------------
    def _shard_path(self, filepath) -> Path:
        from megatron.core import parallel_state

        rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_expert_model_parallel_rank()
        return Path(f"{filepath}.shards") / f"tp{rank[0]:02d}_ep{rank[1]:02d}.pt"

    def _model_parallel(self) -> bool:
        return self.tensor_parallel * self.expert_parallel > 1

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, filepath, storage_options)  # rank 0: the file Lightning tracks
        from megatron.core import parallel_state

        # One writer per distinct shard: the first rank of each expert-data-parallel group (same TP and EP rank).
        if self._model_parallel() and parallel_state.get_expert_data_parallel_rank() == 0:
            shard = self._shard_path(filepath)
            shard.parent.mkdir(parents=True, exist_ok=True)
            self.checkpoint_io.save_checkpoint(checkpoint, shard, storage_options=storage_options)
        self.barrier()

    def load_checkpoint(self, checkpoint_path) -> dict[str, Any]:
        if self._model_parallel():
            shard = self._shard_path(checkpoint_path)
            if not shard.is_file():
                raise UpcycleError(f"{checkpoint_path} has no shard {shard.name} for this rank: resume with the "
                                   "tensor/expert parallel sizes it was saved with")
            return self.checkpoint_io.load_checkpoint(shard)
        return super().load_checkpoint(checkpoint_path)

    def remove_checkpoint(self, filepath) -> None:
        super().remove_checkpoint(filepath)
        if self._model_parallel() and self.is_global_zero:
            import shutil

            shutil.rmtree(f"{filepath}.shards", ignore_errors=True)
