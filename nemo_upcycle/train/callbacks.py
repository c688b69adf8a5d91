"""Training callbacks: what matters for an MoE, collected while it trains."""

from __future__ import annotations

import signal
import threading
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


class StopAtStepEndOnSigterm(Callback):
    """In one process, SIGTERM (a scheduler's preemption, `timeout`) ends training at the end of the optimizer step
    it arrives in, through `Trainer.should_stop`, so exp_manager's checkpoint callback saves that whole step as
    training ends (its -last checkpoint) and the same command resumes from it exactly. Lightning's own handler
    stops after the current micro-batch, mid-accumulation, and saves nothing. Under torch.distributed on GPUs,
    NeMo's PreemptionCallback (exp_manager's create_preemption_callback) does this job for all ranks."""

    def __init__(self) -> None:
        self.stopped_at: int | None = None  # the step training ended at because of SIGTERM
        self._received = False
        self._step_at_batch_start = 0

    def _receive(self, signum: int, frame) -> None:
        self._received = True

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning's signal connector registered its handler; its teardown restores the original one
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._receive)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = trainer.global_step > self._step_at_batch_start  # this micro-batch ended an optimizer step
        if self._received and stepped and not trainer.should_stop:
            trainer.should_stop = True
            if trainer.max_steps < 0 or trainer.global_step < trainer.max_steps:  # else it finished anyway
                self.stopped_at = trainer.global_step
