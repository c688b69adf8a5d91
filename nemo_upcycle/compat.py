"""Everything needed to run Megatron-core (0.16.x) on a machine without CUDA, in one place.

Megatron-core assumes CUDA in a few spots that do not matter on CPU: `torch.cuda.current_device()` (rotary
embedding caches, dist-checkpoint writes, DDP buffers, pipeline send/receive buffers), `torch.cuda.synchronize()`
(dist-checkpoint saves), a missing `te_general_gemm` symbol when Transformer Engine is absent, an RNG tracker
that wants CUDA seeds, and in the training engine tensors made with device='cuda' and dtype checks by CUDA
type names (`megatron_engine_on_cpu`). These shims are applied only when CUDA is unavailable, and only by
callers that run Megatron on CPU; they change where Megatron puts tensors, never what its code computes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from typing import Iterator

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply_megatron_cpu_shims() -> None:
    """Make Megatron-core importable and runnable on CPU (idempotent; no-op where CUDA is available)."""
    if torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # 0.16.1 references it unconditionally without TE
        moe_utils.te_general_gemm = None


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")


def _on_cpu(device):
    """'cuda', 'cuda:0' or torch.device('cuda') -> 'cpu'; anything else unchanged."""
    return "cpu" if device is not None and str(device).startswith("cuda") else device


@contextlib.contextmanager
def megatron_engine_on_cpu() -> Iterator[None]:
    """While Megatron's training engine runs (DDP buffers, optimizer construction and step, the schedules), let
    its CUDA-only spellings mean the CPU: tensors it creates with device='cuda' (found_inf, loss scales,
    clip-grad buffers, token counts) are made on the CPU, and `Tensor.type()` of a CPU float tensor answers
    'torch.cuda.FloatTensor' (the optimizer and clip_grads accept only those names). Scoped and undone on exit;
    a no-op where CUDA is available, so GPU runs execute Megatron untouched."""
    if torch.cuda.is_available():
        yield
        return
    apply_megatron_cpu_shims()
    saved = {name: getattr(torch, name) for name in _FACTORIES}
    saved_type = torch.Tensor.type

    def factory(fn):
        @functools.wraps(fn)
        def make(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _on_cpu(kwargs["device"])
            return fn(*args, **kwargs)
        return make

    def tensor_type(self, *args, **kwargs):
        name = saved_type(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu" or not isinstance(name, str):
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    for name, fn in saved.items():
        setattr(torch, name, factory(fn))
    torch.Tensor.type = tensor_type  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        torch.Tensor.type = saved_type  # type: ignore[method-assign]


def init_megatron(tensor_parallel: int = 1, pipeline_parallel: int = 1, expert_parallel: int = 1,
                  expert_tensor_parallel: int | None = None, virtual_pipeline_parallel: int | None = None) -> None:
    """torch.distributed plus Megatron's parallel state (idempotent): a one-process gloo group for CPU runs and
    tests, or under torchrun (WORLD_SIZE set) the launcher's processes, with NCCL when CUDA is there."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    apply_megatron_cpu_shims()
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            dist.init_process_group("gloo", world_size=1, rank=0)
        else:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            expert_model_parallel_size=expert_parallel,
            expert_tensor_parallel_size=expert_tensor_parallel,
            virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        )
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
    else:
        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def _torch_adam_distributed_optimizers(megatron_optimizer) -> list:
    """Megatron's distributed optimizer(s) (one per chained part) that fell back to torch's Adam(W) because
    neither Transformer Engine nor Apex is installed; empty otherwise."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:
        return []
    parts = getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer])
    return [p for p in parts
            if isinstance(p, DistributedOptimizer) and isinstance(p.optimizer, (torch.optim.Adam, torch.optim.AdamW))]


def torch_adam_state_before_load(megatron_optimizer) -> None:
    """Megatron 0.16's distributed optimizer with torch's Adam reads each parameter's `step` from the optimizer's
    state when it builds the state dict to load into (DistributedOptimizer.state_dict asserts one step value), but
    torch's Adam has no state before its first step. Give a fresh one Adam's own initial state (step 0, zero
    moments), which the load then overwrites."""
    for part in _torch_adam_distributed_optimizers(megatron_optimizer):
        adam = part.optimizer
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                     "exp_avg_sq": torch.zeros_like(p)}


@contextlib.contextmanager
def torch_adam_distributed_load(megatron_optimizer) -> Iterator[None]:
    """While Megatron 0.16's DistributedOptimizer.load_state_dict runs with torch's Adam: its model-space loaders
    (`load_parameter_state_from_fully_reshardable`, `..._from_fs_model_space`) drop the checkpoint's `step` and
    then copy every key of the Adam state, `step` included (KeyError: 'step'), and the step it restored before
    is one tensor shared by all parameters, which Adam would increment once per parameter. Around those loaders
    the step is set aside and given back to each parameter as its own copy. Scoped; Megatron's code does the
    load. A no-op with Transformer Engine's or Apex's Adam (their step lives in the param groups)."""
    patched = []
    for part in _torch_adam_distributed_optimizers(megatron_optimizer):
        for name in ("load_parameter_state_from_fully_reshardable", "load_parameter_state_from_fs_model_space"):
            original = getattr(part, name)

            def load(state_dict, _original=original, _adam=part.optimizer):
                steps = {p: s.pop("step") for p, s in _adam.state.items() if "step" in s}
                try:
                    return _original(state_dict)
                finally:
                    for p, step in steps.items():
                        _adam.state[p]["step"] = step.detach().clone()

            setattr(part, name, load)
            patched.append((part, name))
    try:
        yield
    finally:
        for part, name in patched:
            delattr(part, name)  # the class's method again
