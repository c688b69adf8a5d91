"""Training callbacks: what matters for an MoE, collected while it trains."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback


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
        if self.path is not None and self.loads:
            plot_expert_load(self.steps, self.loads, self.path)


def plot_expert_load(steps: list[int], loads: list[list[torch.Tensor]], path: Path, title: str = "") -> Path:
    """One panel per MoE layer: expert (rows) x training step (columns), colour = fraction of routed tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = len(loads[0])
    cols = min(n_layers, 4)
    rows = -(-n_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols + 1, 3 * rows + 0.6), squeeze=False,
                             layout="constrained")
    vmax = max(float(torch.stack([l[i] for l in loads]).max()) for i in range(n_layers))
    for i in range(n_layers):
        ax = axes[i // cols][i % cols]
        grid = torch.stack([l[i] for l in loads], dim=1).numpy()  # (experts, steps)
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=vmax,
                       extent=(steps[0], steps[-1] + 1, -0.5, grid.shape[0] - 0.5), interpolation="nearest")
        ax.set_title(f"MoE layer {i}")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
    for j in range(n_layers, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.colorbar(im, ax=axes, label="fraction of routed tokens", shrink=0.9)
    fig.suptitle(title or f"Expert load over training (uniform = {1 / grid.shape[0]:.3f})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
