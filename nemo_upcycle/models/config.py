"""One config object for a decoder-only GPT, dense or MoE, in the vocabulary of NeMo 1.x `model_config.yaml`
and Megatron-core's TransformerConfig (the same field names, so configs map across without a table)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from nemo_upcycle.activations import get_activation
from nemo_upcycle.errors import UpcycleError, check_field_types

NORMALIZATIONS = ("layernorm", "layernorm1p", "rmsnorm")
# RoPE frequency scalings, by Hugging Face's rope_type names (None: plain RoPE); see reference.rope_cos_sin.
ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3", "yarn")
MAX_SIZE = 1 << 31  # any width, vocabulary or context length beyond this is a corrupt config
MAX_LAYERS = 1 << 16  # per-layer lists and loops stay small (the deepest published models have ~200 layers)


def layer_pattern(freq: int | Sequence[int], num_layers: int) -> list[bool]:
    """Megatron's moe_layer_freq rule, the one place it is written: every `freq`-th layer (0, k, 2k, ...), or a
    0/1 flag per layer."""
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(num_layers)]
    return [bool(x) for x in freq]


@dataclass(frozen=True)
class GPTConfig:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int  # already padded (make_vocab_size_divisible_by applied)
    num_query_groups: int | None = None  # None: multi-head attention (one group per head)
    kv_channels: int | None = None  # head dim; None: hidden_size // num_attention_heads
    seq_length: int = 4096
    activation: str = "squared-relu"  # Nemotron-4; also relu, gelu, silu, swiglu, geglu, reglu
    # layernorm1p = LayerNorm with zero-centred gamma: the stored weight is gamma - 1 (Nemotron-4)
    normalization: str = "layernorm1p"
    layernorm_epsilon: float = 1e-5
    bias: bool = False  # bias on every linear layer (Megatron add_bias_linear)
    qkv_bias: bool = False  # bias on linear_qkv only (Qwen2); implied by `bias`
    qk_layernorm: bool = False  # per-head norm of queries and keys before RoPE (Qwen3)
    rotary_percentage: float = 1.0  # fraction of each head's channels that RoPE rotates (Nemotron-4: 0.5)
    rotary_base: float = 10000.0
    # RoPE scaling (Llama 3.1+ llama3, Qwen long-context yarn, linear position interpolation, dynamic NTK):
    rope_scaling_type: str | None = None
    rope_scaling_factor: float = 1.0
    rope_original_max_position_embeddings: int | None = None  # llama3, yarn: the pretraining context length
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: float | None = None  # yarn: multiplies cos and sin; None = 0.1 * ln(factor) + 1
    share_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    # ---- Mixture of Experts (num_moe_experts None = dense) ----
    num_moe_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int = 2
    moe_router_pre_softmax: bool = False  # True: softmax over all experts, then top-k (the paper's choice)
    moe_router_score_function: str = "softmax"  # or "sigmoid"
    moe_router_topk_scaling_factor: float | None = None
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_layer_freq: int | tuple[int, ...] = 1  # every k-th layer is MoE, or a 0/1 pattern per layer
    # A shared expert every token goes through beside the routed ones (Qwen-MoE; Megatron's shared_experts),
    # optionally scaled by a sigmoid gate sigmoid(x . w) as Qwen2-MoE's shared_expert_gate.
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.moe_layer_freq, list):
            object.__setattr__(self, "moe_layer_freq", tuple(self.moe_layer_freq))
        check_field_types(self, "model config")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                     "num_query_groups", "kv_channels", "seq_length", "num_moe_experts", "moe_ffn_hidden_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UpcycleError(f"model config {name} must be a positive integer, got {value!r}")
            limit = MAX_LAYERS if name == "num_layers" else MAX_SIZE
            if value is not None and value > limit:
                raise UpcycleError(f"model config {name} {value} is beyond any real model (at most {limit}): "
                                   "is the config corrupt?")
        for name in ("init_method_std", "rotary_base", "layernorm_epsilon"):
            if not getattr(self, name) > 0:
                raise UpcycleError(f"model config {name} must be positive, got {getattr(self, name)!r}")
        object.__setattr__(self, "activation", get_activation(self.activation).name)  # one spelling
        if self.normalization not in NORMALIZATIONS:
            raise UpcycleError(
                f"unsupported normalization '{self.normalization}': use one of {', '.join(NORMALIZATIONS)}"
            )
        if self.num_attention_heads % self.num_groups:
            raise UpcycleError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by num_query_groups "
                f"{self.num_query_groups}"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise UpcycleError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}: set kv_channels"
            )
        if not 0.0 < self.rotary_percentage <= 1.0 or (self.head_dim * self.rotary_percentage) % 2:
            raise UpcycleError(
                f"rotary_percentage {self.rotary_percentage} must give an even number of rotated channels "
                f"out of head dim {self.head_dim}"
            )
        if self.rope_scaling_type is not None:
            if self.rope_scaling_type not in ROPE_SCALING_TYPES:
                raise UpcycleError(f"unsupported RoPE scaling '{self.rope_scaling_type}': use one of "
                                   f"{', '.join(ROPE_SCALING_TYPES)} (or none)")
            if not self.rope_scaling_factor > 0:
                raise UpcycleError(f"rope_scaling_factor must be positive, got {self.rope_scaling_factor}")
            if self.rope_scaling_type in ("llama3", "yarn") and not self.rope_original_max_position_embeddings:
                raise UpcycleError(f"RoPE scaling {self.rope_scaling_type} needs rope_original_max_position_embeddings")
        if self.num_moe_experts is not None:
            if self.moe_router_score_function not in ("softmax", "sigmoid"):
                raise UpcycleError(
                    f"unknown moe_router_score_function '{self.moe_router_score_function}': use softmax or sigmoid"
                )
            if not 1 <= self.moe_router_topk <= self.num_moe_experts:
                raise UpcycleError(
                    f"moe_router_topk {self.moe_router_topk} must be between 1 and num_moe_experts "
                    f"{self.num_moe_experts}"
                )
            if isinstance(self.moe_layer_freq, tuple) and len(self.moe_layer_freq) != self.num_layers:
                raise UpcycleError(
                    f"moe_layer_freq lists {len(self.moe_layer_freq)} layers but the model has {self.num_layers}"
                )
            if self.moe_shared_expert_intermediate_size is not None and self.bias:
                raise UpcycleError("shared experts need a model without linear biases (Megatron's shared experts "
                                   "have none): drop the shared expert or use a bias-free model")

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def gated(self) -> bool:
        return get_activation(self.activation).gated

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def granularity(self) -> int:
        """G: the dense FFN width over the expert FFN width (1 for full-size experts and dense models)."""
        return max(1, self.ffn_hidden_size // self.expert_ffn_hidden_size)

    @property
    def router_type(self) -> str:
        """The recipe's name for this routing: softmax_then_topk | topk_then_softmax | sigmoid."""
        if self.moe_router_score_function == "sigmoid":
            return "sigmoid"
        return "softmax_then_topk" if self.moe_router_pre_softmax else "topk_then_softmax"

    def moe_layer_pattern(self) -> list[bool]:
        """For each layer, whether its MLP is an MoE layer."""
        if not self.is_moe:
            return [False] * self.num_layers
        return layer_pattern(self.moe_layer_freq, self.num_layers)

    def moe_fields(self) -> dict[str, Any]:
        """The MoE fields as Megatron-core's TransformerConfig and NeMo's model_config name them (unset ones
        left out; `moe_layer_freq` as an int or a list)."""
        if not self.is_moe:
            return {}
        fields_ = {k: getattr(self, k) for k in _MOE_DEFAULTS if getattr(self, k) is not None}
        fields_["moe_ffn_hidden_size"] = self.expert_ffn_hidden_size
        if isinstance(self.moe_layer_freq, tuple):
            fields_["moe_layer_freq"] = list(self.moe_layer_freq)
        return fields_

    def dense(self) -> "GPTConfig":
        """The same model with every MLP dense (drops the MoE fields)."""
        return replace(self, **{k: v for k, v in _MOE_DEFAULTS.items()})

    def replace(self, **changes: Any) -> "GPTConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["moe_layer_freq"], tuple):
            d["moe_layer_freq"] = list(d["moe_layer_freq"])
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GPTConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UpcycleError(f"unknown model config field(s) {', '.join(unknown)}")
        return cls(**values)

    # ---- parameter counts --------------------------------------------------------------------------------
    def num_parameters(self, active: bool = False) -> int:
        """Total parameters, or those a token uses (active=True: top-k experts instead of all)."""
        h, d = self.hidden_size, self.head_dim
        qkv_rows = (self.num_attention_heads + 2 * self.num_groups) * d
        norm = h * (1 if self.normalization == "rmsnorm" else 2)
        attn = qkv_rows * h + self.num_attention_heads * d * h + norm
        if self.bias or self.qkv_bias:
            attn += qkv_rows
        if self.bias:
            attn += h
        if self.qk_layernorm:
            attn += 2 * d * (1 if self.normalization == "rmsnorm" else 2)
        fc1_rows = 2 if self.gated else 1

        def mlp(ffn: int) -> int:
            return fc1_rows * ffn * h + h * ffn + ((fc1_rows * ffn + h) if self.bias else 0)

        total = 0
        for is_moe in self.moe_layer_pattern():
            total += attn + norm
            if is_moe:
                n = self.moe_router_topk if active else self.num_moe_experts
                total += n * mlp(self.expert_ffn_hidden_size) + self.num_moe_experts * (h + int(self.bias))
                if self.moe_shared_expert_intermediate_size:
                    total += mlp(self.moe_shared_expert_intermediate_size) + h * self.moe_shared_expert_gate
            else:
                total += mlp(self.ffn_hidden_size)
        embeddings = self.vocab_size * h * (1 if self.share_embeddings_and_output_weights else 2)
        return total + embeddings + norm


_MOE_DEFAULTS = {
    name: f.default
    for name, f in GPTConfig.__dataclass_fields__.items()
    if name.startswith("moe_") or name == "num_moe_experts"
}
