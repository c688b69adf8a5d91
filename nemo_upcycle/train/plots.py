"""Plots people would rather look at than read: loss curves and expert load (matplotlib, PNG, no display)."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], k: int) -> list[float]:
    return torch.tensor(values).unfold(0, k, 1).mean(1).tolist() if len(values) >= k else values


def plot_loss_curves(curves: dict[str, tuple[list[int], list[float]]], path: Path, title: str = "",
                     baseline: str = "dense") -> Path:
    """Training loss against tokens seen, one line per run (moving average over ~5% of the run). When the runs
    saw the same batches, a second panel shows each run's loss minus the `baseline` run's on the same batch,
    which takes out the batch-to-batch variation that dominates short runs."""
    plt = _pyplot()
    base = curves.get(baseline)
    paired = base is not None and all(len(c[1]) == len(base[1]) for c in curves.values()) and len(curves) > 1
    side_legend = len(curves) > 4  # one legend beside the panels, where it hides no curve (2.5 in wider)
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=((13 if paired else 7) + 2.5 * side_legend, 4.2),
                             layout="constrained", squeeze=False)
    # ten colours, then the same colours dashed: every run keeps one distinguishable style in both panels
    style = {name: {"color": f"C{i % 10}", "ls": ("-", "--", ":")[i // 10 % 3]} for i, name in enumerate(curves)}
    ax = axes[0][0]
    for name, (tokens, losses) in curves.items():
        k = max(1, len(losses) // 20)
        ax.plot(tokens[k - 1:], _smooth(losses, k), label=name, **style[name])
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("training LM loss (nats/token)")
    ax.set_title(title or "Training loss")
    ax.grid(alpha=0.3)
    if paired:
        ax = axes[0][1]
        for name, (tokens, losses) in curves.items():
            diff = [a - b for a, b in zip(losses, base[1])]
            k = max(1, len(diff) // 10)
            ax.plot(tokens[k - 1:], _smooth(diff, k), label=name, **style[name])
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(f"loss minus {baseline} loss, same batch")
        ax.set_title(f"Against {baseline} at equal tokens (moving average)")
        ax.grid(alpha=0.3)
    if side_legend:
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    else:
        axes[0][0].legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_load(steps: list[int], loads: list[list[torch.Tensor]], path: Path, title: str = "") -> Path:
    """One panel per MoE layer: expert (rows) x training step (columns), colour = fraction of routed tokens."""
    plt = _pyplot()
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
