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

# Spellings used by NeMo 1.x configs, Megatron and Hugging Face for the same functions: the one alias table.
_ALIASES = {
    "squared_relu": "squared-relu",
    "relu2": "squared-relu",
    "swish": "silu",
    "fast-swiglu": "swiglu",
    "fast-geglu": "geglu",
    "fast-reglu": "reglu",
}


# The gated linear unit of each function: Hugging Face's hidden_act and Megatron-Bridge's activation_func name
# the function, and a gated MLP makes it the GLU.
_GLU = {"silu": "swiglu", "gelu": "geglu", "relu": "reglu"}


def activation_name(name: object, gated: bool = False) -> str | None:
    """Our one spelling of an activation as NeMo, Megatron or Hugging Face spell it (`gated`: of the gated linear
    unit of that function), or None when there is none."""
    key = _ALIASES.get(name, name) if isinstance(name, str) else None
    if gated:
        key = _GLU.get(key)
    return key if key in ACTIVATIONS else None


def activation_spellings(gated: bool = False) -> list[str]:
    """Every name `activation_name` accepts, ours first then the aliases of each (for error messages)."""
    names = list(_GLU) if gated else list(ACTIVATIONS)
    return [s for n in names for s in (n, *(a for a, k in _ALIASES.items() if k == n))]


def get_activation(name: str) -> Activation:
    """Look an activation up by any of its spellings; unknown names get a one-line error listing the choices."""
    key = activation_name(name)
    if key is None:
        raise UpcycleError(
            f"unsupported activation '{name}': use one of {', '.join(ACTIVATIONS)} "
            "(set `activation` in the model config)"
        )
    return ACTIVATIONS[key]
