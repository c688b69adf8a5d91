"""Everything needed to run Megatron-core (0.16.x) on a machine without CUDA, in one place.

Megatron-core assumes CUDA in a few spots that do not matter on CPU: `torch.cuda.current_device()` (rotary
embedding caches, dist-checkpoint writes), `torch.cuda.synchronize()` (dist-checkpoint saves), a missing
`te_general_gemm` symbol when Transformer Engine is absent, and an RNG tracker that wants CUDA seeds. These
shims are applied only when CUDA is unavailable, and only by callers that run Megatron on CPU.
"""

from __future__ import annotations

import os
import socket

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


def init_megatron(tensor_parallel: int = 1, pipeline_parallel: int = 1,
                                 expert_parallel: int = 1) -> None:
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
        )
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
    else:
        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
