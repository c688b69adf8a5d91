"""MLP activations by name, with the one property the recipe needs: positive homogeneity.

An activation f is positively homogeneous of degree d when f(a*z) = a**d * f(z) for every a > 0 (ReLU: d=1,
squared ReLU: d=2). That degree decides how weight scaling can be spread over fc1 and fc2 exactly
(see `nemo_upcycle.recipe.experts.scaling_exponents`). GeLU and SiLU have no such degree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from nemo_upcycle.errors import UpcycleError


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """Nemotron-4's activation: relu(x)^2 (Megatron's `squared_relu`, Hugging Face's `relu2`)."""
    return torch.pow(F.relu(x), 2)


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    gated: bool  # GLU: fc1 holds [gate; up] and the MLP computes fn(gate) * up
    degree: int | None  # positive homogeneity degree of fn, None when fn has none


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("squared-relu", squared_relu, gated=False, degree=2),
        Activation("relu", F.relu, gated=False, degree=1),
        Activation("gelu", F.gelu, gated=False, degree=None),
        Activation("silu", F.silu, gated=False, degree=None),
        Activation("swiglu", F.silu, gated=True, degree=None),
        Activation("geglu", F.gelu, gated=True, degree=None),
        Activation("reglu", F.relu, gated=True, degree=1),
    )
}

# Spellings used by NeMo 1.x configs, Megatron and Hugging Face for the same functions.
_ALIASES = {
    "squared_relu": "squared-relu",
    "relu2": "squared-relu",
    "swish": "silu",
    "fast-swiglu": "swiglu",
    "fast-geglu": "geglu",
    "fast-reglu": "reglu",
}


def get_activation(name: str) -> Activation:
    """Look an activation up by any of its spellings; unknown names get a one-line error listing the choices."""
    key = _ALIASES.get(name, name)
    if key not in ACTIVATIONS:
        raise UpcycleError(
            f"unsupported activation '{name}': use one of {', '.join(ACTIVATIONS)} "
            "(set `activation` in the model config)"
        )
    return ACTIVATIONS[key]
