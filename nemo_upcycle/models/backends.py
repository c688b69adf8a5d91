"""Two interchangeable implementations of the same GPT for training, behind one small interface.

  torch     the reference model (nemo_upcycle/models/reference.py): CPU or one GPU, readable, no parallelism
  megatron  Megatron-core's GPTModel: the Transformer Engine spec with grouped-GEMM experts and FP8 on GPUs,
            the local spec on CPU; tensor / pipeline / expert parallelism through parallel_state

Both take token ids (B, S) and return a `Step`: logits, the extra objective terms to add to the LM loss, and
what to log (aux loss, z-loss, tokens per expert). Megatron injects its router losses into the gradient itself
(MoEAuxLossAutoScaler), so its `objective` is zero and its losses are read from Megatron's tracker; the
reference model returns them for the training step to add. Weights move in and out under canonical names
(local-spec keys, experts stacked), so checkpoints do not depend on the backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.keys import stack_experts, unstack_experts

BACKENDS = ("auto", "torch", "megatron")


@dataclass
class Step:
    logits: torch.Tensor  # (B, S, V)
    objective: torch.Tensor  # added to the LM loss (router losses when the backend does not inject them)
    aux_loss: torch.Tensor  # for logging: load-balancing loss summed over layers, coefficient applied
    z_loss: torch.Tensor
    tokens_per_expert: list[torch.Tensor] = field(default_factory=list)  # one (N,) per MoE layer


def default_backend() -> str:
    """megatron where CUDA and Transformer Engine are present, else torch."""
    from nemo_upcycle.models.megatron import have_transformer_engine

    return "megatron" if torch.cuda.is_available() and have_transformer_engine() else "torch"


def build_backend(cfg: GPTConfig, backend: str = "auto", **megatron_options) -> nn.Module:
    if backend == "auto":
        backend = default_backend()
    if backend == "torch":
        return TorchBackend(cfg)
    if backend == "megatron":
        return MegatronBackend(cfg, **megatron_options)
    raise UpcycleError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")


class TorchBackend(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        from nemo_upcycle.models.reference import GPTModel

        self.config = cfg
        self.model = GPTModel(cfg)
        self.sharded = False  # every process holds the whole model

    def forward(self, tokens: torch.Tensor) -> Step:
        out = self.model(tokens)
        return Step(out.logits, out.aux_loss + out.z_loss, out.aux_loss.detach(), out.z_loss.detach(),
                    out.tokens_per_expert)

    def set_router_loss_scale(self, scale: float) -> None:
        """Nothing to do: the router losses are part of the returned objective, which the trainer scales."""

    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        return stack_experts(self.model.state_dict())

    def load_canonical_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(unstack_experts(state))


class MegatronBackend(nn.Module):
    """Megatron-core GPTModel. Parallel state must be initialised (nemo_upcycle.compat does it for one process)."""

    def __init__(self, cfg: GPTConfig, use_te: bool | None = None, grouped_gemm: bool = False, **config_overrides):
        super().__init__()
        from megatron.core import parallel_state

        from nemo_upcycle.compat import init_megatron
        from nemo_upcycle.models.megatron import build_megatron_gpt

        init_megatron()
        self.config = cfg
        self.tensor_parallel = parallel_state.get_tensor_model_parallel_world_size()
        self.pipeline_parallel = parallel_state.get_pipeline_model_parallel_world_size()
        virtual = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        expert_parallel = parallel_state.get_expert_model_parallel_world_size()
        self.sharded = self.tensor_parallel * expert_parallel * self.pipeline_parallel > 1
        if cfg.is_moe and cfg.num_moe_experts % expert_parallel:
            raise UpcycleError(f"{cfg.num_moe_experts} experts cannot be split over expert_model_parallel_size "
                               f"{expert_parallel}: choose a divisor")
        if cfg.num_layers % (self.pipeline_parallel * (virtual or 1)):
            raise UpcycleError(f"{cfg.num_layers} layers cannot be split into pipeline_model_parallel_size "
                               f"{self.pipeline_parallel} x virtual_pipeline_model_parallel_size {virtual or 1} "
                               "equal stages: choose sizes whose product divides num_layers")
        config_overrides.setdefault("tensor_model_parallel_size", self.tensor_parallel)
        config_overrides.setdefault("expert_model_parallel_size", expert_parallel)
        config_overrides.setdefault("expert_tensor_parallel_size",
                                    parallel_state.get_expert_tensor_parallel_world_size())
        if self.pipeline_parallel > 1:
            config_overrides.update(pipeline_model_parallel_size=self.pipeline_parallel,
                                    virtual_pipeline_model_parallel_size=virtual, pipeline_dtype=torch.float32)
        # Megatron trains MoE with tensor parallelism only together with sequence parallelism.
        config_overrides.setdefault("sequence_parallel", self.tensor_parallel > 1)
        if config_overrides["sequence_parallel"] and cfg.seq_length % self.tensor_parallel:
            raise UpcycleError(f"seq_length {cfg.seq_length} is not divisible by tensor_model_parallel_size "
                               f"{self.tensor_parallel} (sequence parallelism splits the sequence)")
        chunks = [build_megatron_gpt(cfg, use_te=use_te, grouped_gemm=grouped_gemm, stage=stage, **config_overrides)
                  for stage in _pipeline_stages(virtual)]
        # One chunk: the GPTModel itself (keys model.*); interleaved pipeline stages: one GPTModel per stage.
        self.model = chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)
        self._counts: dict[int, torch.Tensor] = {}
        self._router_loss_scale = 1.0
        from megatron.core.transformer.moe.router import TopKRouter

        routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
        for i, router in enumerate(routers):
            router.register_forward_hook(lambda mod, inp, out, i=i: self._counts.__setitem__(i, out[1].sum(0)))

    @property
    def chunks(self) -> list[nn.Module]:
        """The GPTModel of each (virtual) pipeline stage this rank holds, in order."""
        return list(self.model) if isinstance(self.model, nn.ModuleList) else [self.model]

    def forward(self, tokens: torch.Tensor) -> Step:
        if self.pipeline_parallel > 1:
            raise UpcycleError("a pipeline-parallel model runs only inside Megatron's schedules: train it with "
                               "`nemo-upcycle train backend=megatron` under torchrun")
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, clear_aux_losses_tracker

        from nemo_upcycle.models.megatron import megatron_forward

        clear_aux_losses_tracker()
        # Megatron keeps it global, shape [1] as its schedules set it (the engine's runs share the process)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([self._router_loss_scale]))
        self._counts.clear()
        logits = megatron_forward(self.model, tokens)
        if self.tensor_parallel > 1:  # the output layer is vocabulary-parallel; gathering keeps the loss simple
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

            logits = gather_from_tensor_model_parallel_region(logits)
        aux, z = self.router_losses()
        return Step(logits, logits.new_zeros((), dtype=torch.float32), aux, z, self.tokens_per_expert())

    def router_losses(self, num_microbatches: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Load-balancing and z-loss (coefficients applied, summed over layers, averaged over micro-batches) from
        Megatron's tracker, reduced over the ranks that saw other tokens or held other layers (collective)."""
        from megatron.core.transformer.moe.moe_utils import (get_moe_layer_wise_logging_tracker,
                                                             reduce_aux_losses_tracker_across_ranks)

        if torch.distributed.get_world_size() > 1:
            reduce_aux_losses_tracker_across_ranks()
        tracker = get_moe_layer_wise_logging_tracker()

        def tracked(name: str, coeff: float | None) -> torch.Tensor:
            if name not in tracker or not coeff:
                return torch.zeros(())
            return tracker[name]["values"].sum().float().detach().cpu() * coeff / num_microbatches

        return tracked("load_balancing_loss", self.config.moe_aux_loss_coeff), \
            tracked("z_loss", self.config.moe_z_loss_coeff)

    def tokens_per_expert(self) -> list[torch.Tensor]:
        """Tokens each expert got in the last forward, per MoE layer held by this rank."""
        return [self._counts[i] for i in sorted(self._counts)]

    def set_router_loss_scale(self, scale: float) -> None:
        """The factor the trainer applies to the LM loss before backward (1 / accumulated micro-batches, times
        an fp16 loss scale). Megatron injects the router losses' gradient itself, so it must be told, as
        Megatron-LM's schedules do; otherwise accumulation multiplies the router-loss gradient."""
        self._router_loss_scale = float(scale)

    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        from nemo_upcycle.models.megatron import reference_weights

        return stack_experts(reference_weights(self.model))

    def load_canonical_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from nemo_upcycle.models.megatron import load_reference_weights

        load_reference_weights(self.model, unstack_experts(state), self.config)

    def load_sharded(self, path, prefix: str = "model.") -> None:
        """This rank's shards of a torch_dist checkpoint, through Megatron's sharded loader (any TP / EP)."""
        from nemo_upcycle.models.megatron import load_dist_checkpoint

        load_dist_checkpoint(self.chunks, path, prefix)

    def save_sharded(self, path, prefix: str = "model.") -> None:
        """Collective: every rank writes its shards of one torch_dist checkpoint."""
        from nemo_upcycle.models.megatron import save_dist_checkpoint

        save_dist_checkpoint(self.chunks, path, prefix)


def _pipeline_stages(virtual: int | None) -> list[dict | None]:
    """GPTModel's pipeline arguments for each model chunk on this rank (None without pipeline parallelism)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return [None]
    return [dict(pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v),
                 post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v),
                 vp_stage=v if virtual else None) for v in range(virtual or 1)]
