"""Random streams of the recipe: one per (seed, layer, purpose), shared by expert construction and router init."""

from __future__ import annotations

import torch

ROUTER_STREAM, DROP_STREAM = 0, 1


def layer_generator(seed: int, layer: int, stream: int) -> torch.Generator:
    """An independent, reproducible random stream per (seed, layer, purpose): a layer's result never depends
    on which other layers were processed, so streaming conversion equals in-memory upcycling."""
    return torch.Generator().manual_seed((seed * 1_000_003 + layer * 16 + stream) % (2**63))
