"""The upcycling recipe as one validated, frozen config object, in the paper's notation (arXiv 2410.07524).

    E  expansion rate: MoE MLP parameters / dense MLP parameters (not the expert count)
    G  granularity:    dense ffn_hidden_size / expert ffn_hidden_size
    T  top-k:          experts each token is sent to
    number of experts = E * G;   `E8G8T8` = 64 experts of 1/8 the dense FFN, 8 active per token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any

from nemo_upcycle.errors import UpcycleError, check_field_types
from nemo_upcycle.models.config import layer_pattern

ROUTER_TYPES = ("softmax_then_topk", "topk_then_softmax", "sigmoid")
ROUTER_INITS = ("calibrated", "balanced", "virtual_group", "random")
SCALING_METHODS = ("homogeneous", "megatron", "fc2")
MAX_EXPERTS = 4096  # far beyond any published MoE (DeepSeek-V3: 256); a typo like E999999 would never finish

_SHORTHAND = re.compile(r"^E(\d+)G(\d+)T(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class UpcycleConfig:
    """What to turn a dense MLP into, and how. Invalid combinations raise `UpcycleError` when built."""

    expansion: int = 8  # E
    granularity: int = 1  # G
    topk: int = 2  # T
    # softmax_then_topk: the paper's choice (Megatron moe_router_pre_softmax=True); topk_then_softmax: Mixtral's;
    # sigmoid: Megatron's moe_router_score_function="sigmoid" (top-k scores renormalised when T > 1).
    router: str = "softmax_then_topk"
    # "auto": the factor s that keeps the step-0 output equal to the dense one (see `scale_factor`);
    # "off": s = 1; a number: that s.
    weight_scaling: str | float = "auto"
    # How s is spread over the expert weights (see recipe.experts.scaling_factors):
    # homogeneous: exact wherever the MLP is positively homogeneous in some weights (our default);
    # megatron: Megatron-LM's upcycling_utils exponents; fc2: all of s on fc2 (exact for any activation).
    scaling_method: str = "homogeneous"
    # calibrated: virtual groups whose rows are one direction (from the dense model's own hidden states) times
    # distinct multipliers, so groups never tie and the routed sum stays ~1 (recipe.calibration);
    # balanced (G = 1 only): random rows orthogonal to the mean hidden state at the calibrated logit scale, so
    # tokens spread over the experts from step 0 and the routed sum stays ~1;
    # virtual_group: the paper's E random rows, each repeated G times (the default before 0.2);
    # random: E*G independent random rows (no step-0 guarantee).
    router_init: str = "calibrated"
    router_init_std: float | None = None  # None: the dense model's init_method_std
    seed: int = 1234
    # Which layers become MoE: None = every `layer_freq`-th layer (0, k, 2k, ...; Megatron's moe_layer_freq),
    # or an explicit tuple of layer indices.
    layers: tuple[int, ...] | None = None
    layer_freq: int = 1
    # Drop-Upcycling (Nakamura et al. 2025): re-initialise this fraction of each expert's FFN neurons.
    drop_ratio: float = 0.0
    # Training-time router losses written into the MoE config (the paper: aux 1e-2, no z-loss).
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float | None = None
    # Megatron's moe_router_topk_scaling_factor: multiplies the routing weights; the weight scale divides by it.
    topk_scaling_factor: float | None = None
    # Qwen-MoE style: keep the dense MLP whole as a shared expert behind a zero-initialised sigmoid gate (1/2 of
    # it at step 0) and upcycle the routed experts beside it to the other half (see `scale_factor`).
    shared_expert: bool = False

    def __post_init__(self) -> None:
        for name in ("expansion", "granularity", "topk", "layer_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UpcycleError(f"{name} must be a positive integer, got {value!r}")
        check_field_types(self, "recipe")
        if self.num_experts > MAX_EXPERTS:
            raise UpcycleError(f"{self.num_experts} experts (= E*G = {self.expansion}*{self.granularity}) is more than "
                               f"the {MAX_EXPERTS} nemo-upcycle supports: lower expansion or granularity")
        if self.router not in ROUTER_TYPES:
            raise UpcycleError(f"unknown router type '{self.router}': use one of {', '.join(ROUTER_TYPES)}")
        if self.router_init not in ROUTER_INITS:
            raise UpcycleError(f"unknown router init '{self.router_init}': use one of {', '.join(ROUTER_INITS)}")
        if self.scaling_method not in SCALING_METHODS:
            raise UpcycleError(
                f"unknown scaling method '{self.scaling_method}': use one of {', '.join(SCALING_METHODS)}"
            )
        if self.topk > self.num_experts:
            raise UpcycleError(
                f"top-k {self.topk} exceeds the number of experts {self.num_experts} (= E*G = "
                f"{self.expansion}*{self.granularity}): lower topk or raise expansion"
            )
        if self.router == "topk_then_softmax" and self.topk == 1:
            raise UpcycleError("router topk_then_softmax with top-k 1 gives the one chosen expert weight 1, so the "
                               "router never learns (Megatron refuses it): use top-k >= 2, or router "
                               "softmax_then_topk or sigmoid")
        if self.router_init != "random" and self.topk % self.granularity:
            raise UpcycleError(
                f"top-k {self.topk} must be a multiple of granularity {self.granularity} for virtual-group "
                "routing: pick topk in multiples of G, or router_init=random"
            )
        ws = self.weight_scaling
        if isinstance(ws, str):
            if ws not in ("auto", "off"):
                raise UpcycleError(f"weight_scaling must be 'auto', 'off' or a positive number, got '{ws}'")
        elif isinstance(ws, bool) or not isinstance(ws, (int, float)) or ws <= 0:
            raise UpcycleError(f"weight_scaling must be 'auto', 'off' or a positive number, got {ws!r}")
        if not 0.0 <= self.drop_ratio < 1.0:
            raise UpcycleError(f"drop_ratio must be in [0, 1), got {self.drop_ratio}")
        if self.router_init == "balanced" and self.granularity != 1:
            raise UpcycleError(f"router_init=balanced needs granularity 1 (got {self.granularity}): with G > 1 its "
                               "random groups can tie and split a copy; use calibrated")
        if self.router_init_std is not None and self.router_init in ("calibrated", "balanced"):
            raise UpcycleError("router_init_std sets the std of virtual_group or random router rows, not of the "
                               "calibrated init: add router_init=virtual_group")
        if self.router_init_std is not None and self.router_init_std <= 0:
            raise UpcycleError(f"router_init_std must be positive, got {self.router_init_std}")
        if self.topk_scaling_factor is not None and self.topk_scaling_factor <= 0:
            raise UpcycleError(f"topk_scaling_factor must be positive, got {self.topk_scaling_factor}")
        for name in ("aux_loss_coeff", "z_loss_coeff"):  # a negative coefficient rewards the imbalance it penalises
            if (getattr(self, name) or 0) < 0:
                raise UpcycleError(f"{name} must be >= 0 (0 or null: no such loss), got {getattr(self, name)}")
        if self.layers is not None:
            if self.layer_freq != 1:
                raise UpcycleError("give either layers or layer_freq, not both")
            if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise UpcycleError(f"layers must be distinct non-negative layer indices, got {list(self.layers)}")
            object.__setattr__(self, "layers", tuple(sorted(self.layers)))

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_shorthand(cls, shorthand: str, **overrides: Any) -> "UpcycleConfig":
        """`UpcycleConfig.from_shorthand("E8G8T8", router="topk_then_softmax")`."""
        match = _SHORTHAND.match(shorthand.strip()) if isinstance(shorthand, str) else None
        if not match:
            raise UpcycleError(
                f"recipe '{shorthand}' is not of the form E<expansion>G<granularity>T<topk>, e.g. E8G8T8 or E8G1T2"
            )
        e, g, t = (int(x) for x in match.groups())
        return cls(expansion=e, granularity=g, topk=t, **overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "UpcycleConfig":
        """Build from a plain mapping (a Hydra/YAML `recipe:` node). `shorthand` (e.g. E8G8T8) sets E, G and T;
        explicit expansion / granularity / topk override it; null values mean "default"."""
        values = {k: v for k, v in values.items() if v is not None}
        known = {f.name for f in fields(cls)} | {"shorthand"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UpcycleError(f"unknown recipe option(s) {', '.join(unknown)}: valid options are {', '.join(sorted(known))}")
        shorthand = values.pop("shorthand", None)
        if shorthand:
            base = cls.from_shorthand(shorthand, router_init="random")
            for key in ("expansion", "granularity", "topk"):
                values.setdefault(key, getattr(base, key))
        if "layers" in values:
            if not isinstance(values["layers"], (list, tuple)):
                raise UpcycleError(f"recipe layers must be a list of 0-based layer indices, got {values['layers']!r}")
            values["layers"] = tuple(values["layers"])
        return cls(**values)

    def replace(self, **changes: Any) -> "UpcycleConfig":
        return replace(self, **changes)

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.expansion * self.granularity

    @property
    def name(self) -> str:
        return f"E{self.expansion}G{self.granularity}T{self.topk}"

    def scale_factor(self) -> float:
        """The factor s by which each expert's output is scaled so the step-0 MoE output equals the dense one.

        With virtual groups a token picks T/G whole groups (each group = the G shards of one dense MLP copy),
        all experts in a group having one probability p. The MoE output is then (s/G) * (sum of selected p) * dense:
          softmax_then_topk: p = 1/(E*G) for a zero router, selected sum T/(E*G)   ->  s = E*G^2/T
          topk_then_softmax: selected probabilities sum to 1 for ANY router        ->  s = G
          sigmoid, T > 1:    Megatron renormalises the top-T scores to sum to 1     ->  s = G
          sigmoid, T = 1:    p = sigmoid(0) = 1/2 for a zero router (and G = 1)     ->  s = 2*G
        divided by Megatron's topk scaling factor when one is set (it multiplies every routing weight).
        With a shared expert (the dense MLP times sigmoid(0) = 1/2) the routed experts make the other half: s / 2.
        """
        if self.weight_scaling == "off":
            return 1.0
        if not isinstance(self.weight_scaling, str):
            return float(self.weight_scaling)
        e, g, t = self.expansion, self.granularity, self.topk
        if self.router == "softmax_then_topk":
            s = e * g * g / t
        elif self.router == "topk_then_softmax" or t > 1:
            s = float(g)
        else:
            s = 2.0 * g
        if self.shared_expert:
            s /= 2
        return s / (self.topk_scaling_factor or 1.0)

    def moe_layer_pattern(self, num_layers: int) -> list[bool]:
        """For each layer of the dense model, whether it becomes an MoE layer."""
        if self.layers is not None:
            if max(self.layers) >= num_layers:
                raise UpcycleError(
                    f"recipe layers {list(self.layers)} name a layer beyond the model's {num_layers} layers (0-based)"
                )
            chosen = set(self.layers)
            return [i in chosen for i in range(num_layers)]
        return layer_pattern(self.layer_freq, num_layers)

    def check_dense_shapes(self, ffn_hidden_size: int, num_layers: int) -> None:
        """Raise a one-line error when this recipe cannot apply to a dense model of these sizes."""
        self.check_ffn_hidden_size(ffn_hidden_size)
        self.moe_layer_pattern(num_layers)

    def check_ffn_hidden_size(self, ffn_hidden_size: int) -> None:
        if ffn_hidden_size % self.granularity:
            raise UpcycleError(
                f"ffn_hidden_size {ffn_hidden_size} is not divisible by granularity {self.granularity}: "
                "pick a granularity that divides it"
            )
        if self.drop_ratio and round(self.drop_ratio * (ffn_hidden_size // self.granularity)) == 0:
            raise UpcycleError(
                f"drop_ratio {self.drop_ratio} drops no neuron of a {ffn_hidden_size // self.granularity}-wide expert: "
                "raise drop_ratio or lower granularity"
            )

    def megatron_moe_fields(self, ffn_hidden_size: int, num_layers: int) -> dict[str, Any]:
        """The Megatron-core TransformerConfig / NeMo model_config MoE fields this recipe produces."""
        self.check_dense_shapes(ffn_hidden_size, num_layers)
        pattern = self.moe_layer_pattern(num_layers)
        fields_: dict[str, Any] = {
            "num_moe_experts": self.num_experts,
            "moe_ffn_hidden_size": ffn_hidden_size // self.granularity,
            "moe_router_topk": self.topk,
            "moe_router_pre_softmax": self.router == "softmax_then_topk",
            "moe_router_score_function": "sigmoid" if self.router == "sigmoid" else "softmax",
            "moe_router_topk_scaling_factor": self.topk_scaling_factor,
            "moe_aux_loss_coeff": self.aux_loss_coeff,
            "moe_z_loss_coeff": self.z_loss_coeff,
            "moe_layer_freq": 1 if all(pattern) else [int(p) for p in pattern],
        }
        if self.shared_expert:
            fields_.update(moe_shared_expert_intermediate_size=ffn_hidden_size, moe_shared_expert_gate=True)
        return fields_
