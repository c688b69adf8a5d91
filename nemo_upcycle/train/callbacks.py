"""Training callbacks: what matters for an MoE, collected while it trains."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback

from nemo_upcycle.train.plots import plot_expert_load


class ExpertLoadMonitor(Callback):
    """Records, every optimizer step, the fraction of routed tokens each expert of each MoE layer received, and
    draws it as a heat-map per layer (experts x steps) at the end of training: dead or hogging experts show as
    dark or bright rows."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.steps: list[int] = []
        self.loads: list[list[torch.Tensor]] = []  # per step: one (N,) fraction vector per MoE layer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loads = getattr(pl_module, "last_expert_load", None)
        if loads:
            self.steps.append(trainer.global_step)
            self.loads.append([c / c.sum().clamp(min=1) for c in loads])

    def on_train_end(self, trainer, pl_module) -> None:
        if self.path is not None and self.loads and trainer.is_global_zero:
            plot_expert_load(self.steps, self.loads, self.path)


class LossHistory(Callback):
    """The training LM loss of every micro-batch, with the number of tokens seen so far (for loss curves)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.losses: list[float] = []
        self._seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._seen += batch["tokens"].numel()
        loss = trainer.callback_metrics.get("lm_loss")
        if loss is not None:
            self.tokens.append(self._seen)
            self.losses.append(float(loss))
