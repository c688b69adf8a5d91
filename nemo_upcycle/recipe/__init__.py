"""The upcycling recipe (arXiv 2410.07524) as pure functions on tensors: no file I/O here."""

from nemo_upcycle.recipe.config import UpcycleConfig
from nemo_upcycle.recipe.experts import MLPWeights, init_router, scaling_factors, upcycle_mlp
from nemo_upcycle.recipe.state_dict import moe_config, upcycle_layer_mlp, upcycle_state_dict

__all__ = [
    "UpcycleConfig",
    "MLPWeights",
    "init_router",
    "scaling_factors",
    "upcycle_mlp",
    "moe_config",
    "upcycle_layer_mlp",
    "upcycle_state_dict",
]
