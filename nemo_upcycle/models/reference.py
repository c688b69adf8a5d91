"""A compact PyTorch GPT in the Nemotron family, dense or Mixture-of-Experts, readable top to bottom.

Every module attribute is named so that `state_dict()` keys and shapes are exactly those of Megatron-core's
GPTModel with the local (non-Transformer-Engine) layer spec:

    embedding.word_embeddings.weight                                [V, H]
    decoder.layers.<i>.input_layernorm.{weight,bias}                [H]
    decoder.layers.<i>.self_attention.linear_qkv.weight             [(heads + 2*groups) * d, H]
    decoder.layers.<i>.self_attention.{q,k}_layernorm.weight        [d]          (qk_layernorm)
    decoder.layers.<i>.self_attention.linear_proj.weight            [H, heads * d]
    decoder.layers.<i>.pre_mlp_layernorm.{weight,bias}              [H]
    decoder.layers.<i>.mlp.linear_fc1.weight                        [F or 2F, H]   dense layer
    decoder.layers.<i>.mlp.linear_fc2.weight                        [H, F]
    decoder.layers.<i>.mlp.router.weight                            [N, H]         MoE layer
    decoder.layers.<i>.mlp.experts.local_experts.<e>.linear_fc1.weight   [F_e or 2F_e, H]
    decoder.layers.<i>.mlp.experts.local_experts.<e>.linear_fc2.weight   [H, F_e]
    decoder.layers.<i>.mlp.shared_experts.linear_fc{1,2}.weight, .gate_weight [1, H]   (shared expert)
    decoder.final_layernorm.{weight,bias}                           [H]
    output_layer.weight                                             [V, H]      (absent when tied)

so Megatron checkpoints load with a key map and no reshaping (see models/keys.py for the TE-spec names).
Shapes in comments: B batch, S sequence, H hidden, N experts, T top-k, d head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from nemo_upcycle.activations import get_activation
from nemo_upcycle.models.config import GPTConfig


class Norm(nn.Module):
    """LayerNorm, RMSNorm, or layernorm1p: LayerNorm whose stored weight is gamma - 1 (zero-centred gamma),
    which Nemotron uses so that weight decay pulls gamma towards 1 rather than 0."""

    def __init__(self, size: int, cfg: GPTConfig):
        super().__init__()
        self.kind, self.eps = cfg.normalization, cfg.layernorm_epsilon
        self.weight = nn.Parameter(torch.zeros(size) if self.kind == "layernorm1p" else torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if self.kind != "rmsnorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.weight + 1 if self.kind == "layernorm1p" else self.weight
        if self.kind == "rmsnorm":
            return F.rms_norm(x, gamma.shape, gamma, self.eps)
        return F.layer_norm(x, gamma.shape, gamma, self.bias, self.eps)


def rope_inv_freq(cfg: GPTConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies [rot/2] and the factor cos and sin are multiplied by, for each RoPE scaling
    (the formulas of Hugging Face's modeling_rope_utils, which Llama 3.1+, Qwen and Mistral checkpoints use):

      linear   position interpolation: every frequency / factor
      dynamic  NTK-aware: the base grows with seq_len once it exceeds seq_length (inference-time)
      llama3   wavelengths above original/low_freq_factor / factor, below original/high_freq_factor kept,
               a smooth blend between
      yarn     ramp between interpolated (/ factor) and original frequencies over the dims whose rotation
               count in the original context lies in [beta_slow, beta_fast]; cos and sin scaled by the
               attention factor (0.1 ln(factor) + 1 unless given)
    """
    rot = int(cfg.head_dim * cfg.rotary_percentage)
    kind, factor, base = cfg.rope_scaling_type, cfg.rope_scaling_factor, cfg.rotary_base
    if kind == "dynamic" and seq_len > cfg.seq_length:
        base = base * ((factor * seq_len / cfg.seq_length) - (factor - 1)) ** (rot / (rot - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.int64).float() / rot))
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old_len = cfg.rope_original_max_position_embeddings
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        def correction_dim(rotations: float) -> float:  # the dim whose rotation count over old_len is `rotations`
            return rot * math.log(cfg.rope_original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(base))

        low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), rot - 1)
        high = high + 0.001 if high == low else high
        ramp = ((torch.arange(rot // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate
        pos_freqs = base ** (torch.arange(0, rot, 2).float() / rot)
        inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolate) + 1.0 / pos_freqs * extrapolate
        scale = cfg.rope_attention_factor
        if scale is None:
            scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        return inv_freq, scale
    return inv_freq, 1.0


def rope_cos_sin(cfg: GPTConfig, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables [S, rot] for the first rot = head_dim * rotary_percentage channels of each head."""
    inv_freq, scale = rope_inv_freq(cfg, seq_len)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq).to(device)
    emb = torch.cat([freqs, freqs], dim=-1)  # Megatron's non-interleaved layout (rotate_half)
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, heads, d): rotate channels [:rot] of each head; channels [rot:] pass through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class SelfAttention(nn.Module):
    """Causal grouped-query attention with Megatron's fused QKV.

    linear_qkv's rows come grouped per query group: for each of the `groups` groups, its heads/groups query
    heads, then its one key head, then its one value head, d rows each. E.g. 4 heads, 2 groups, d=8:
    rows 0-15 q heads 0-1, 16-23 k0, 24-31 v0, 32-47 q heads 2-3, 48-55 k1, 56-63 v1.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads, self.groups, self.d = cfg.num_attention_heads, cfg.num_groups, cfg.head_dim
        qkv_rows = (self.heads + 2 * self.groups) * self.d
        self.linear_qkv = nn.Linear(cfg.hidden_size, qkv_rows, bias=cfg.bias or cfg.qkv_bias)
        self.linear_proj = nn.Linear(self.heads * self.d, cfg.hidden_size, bias=cfg.bias)
        if cfg.qk_layernorm:
            self.q_layernorm, self.k_layernorm = Norm(self.d, cfg), Norm(self.d, cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        per_group = self.heads // self.groups
        qkv = self.linear_qkv(x).view(b, s, self.groups, per_group + 2, self.d)
        q, k, v = qkv.split([per_group, 1, 1], dim=3)
        q = q.reshape(b, s, self.heads, self.d)
        k, v = k.reshape(b, s, self.groups, self.d), v.reshape(b, s, self.groups, self.d)
        if hasattr(self, "q_layernorm"):
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(  # (B, heads, S, d); 1/sqrt(d) scaling as in Megatron
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=self.groups != self.heads,
        )
        return self.linear_proj(y.transpose(1, 2).reshape(b, s, self.heads * self.d))


class MLP(nn.Module):
    """fc2(act(fc1 x)); gated: fc1 = [gate; up] and the hidden is act(gate x) * (up x).

    As an expert it gets each token's routing weight p and returns p * MLP(x), applying p to the hidden
    activations (half the width of H for fine-grained experts) and to fc2's bias, as Megatron does.
    """

    def __init__(self, cfg: GPTConfig, ffn_hidden_size: int):
        super().__init__()
        act = get_activation(cfg.activation)
        self.act, self.gated = act.fn, act.gated
        self.linear_fc1 = nn.Linear(cfg.hidden_size, ffn_hidden_size * (2 if act.gated else 1), bias=cfg.bias)
        self.linear_fc2 = nn.Linear(ffn_hidden_size, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        out = self.linear_fc2(h)
        return out if scale is None else out * scale.unsqueeze(-1)


@dataclass
class Routing:
    """What a router decided for a batch of tokens."""

    weights: torch.Tensor  # (tokens, T) routing weight of each chosen expert
    experts: torch.Tensor  # (tokens, T) chosen expert indices
    tokens_per_expert: torch.Tensor  # (N,) how many tokens each expert received
    aux_loss: torch.Tensor  # load-balancing loss, already multiplied by its coefficient
    z_loss: torch.Tensor  # router z-loss, already multiplied by its coefficient


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last axis with ties broken toward the lower expert index (a stable sort).

    torch.topk leaves ties unspecified; here equal scores (a zero router, or one virtual group's shared row)
    always select whole virtual groups, which the recipe's exactness at step 0 relies on.
    """
    values, idx = scores.sort(dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


class Router(nn.Module):
    """Top-k router: softmax-then-topK, topK-then-softmax, or sigmoid, with Megatron's losses.

    Routing maths runs in float32 whatever the model dtype, from the logits on (as Megatron's
    moe_router_dtype="fp32": input, weight and bias cast before the projection, so a bf16 model picks the experts
    Megatron picks); the chosen experts' weights are returned in the model dtype.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_moe_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.num_moe_experts)) if cfg.bias else None  # as Megatron
        self.topk, self.kind = cfg.moe_router_topk, cfg.router_type
        self.topk_scaling = cfg.moe_router_topk_scaling_factor
        self.aux_coeff, self.z_coeff = cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff

    def forward(self, x: torch.Tensor) -> Routing:  # x (tokens, H)
        logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        n_tok, n_exp = logits.shape
        if self.kind == "softmax_then_topk":
            scores = logits.softmax(dim=-1)
            weights, experts = top_k(scores, self.topk)
        elif self.kind == "topk_then_softmax":
            top_logits, experts = top_k(logits, self.topk)
            weights = top_logits.softmax(dim=-1)
            scores = logits.softmax(dim=-1)
        else:  # sigmoid: top-k scores renormalised to sum to 1 when k > 1 (Megatron)
            sig = logits.sigmoid()
            weights, experts = top_k(sig, self.topk)
            if self.topk > 1:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            scores = sig / (sig.sum(dim=-1, keepdim=True) + 1e-20)
        if self.topk_scaling:
            weights = weights * self.topk_scaling
        counts = torch.bincount(experts.flatten(), minlength=n_exp)
        # Switch-style load balancing as Megatron computes it: N * sum_e f_e * P_e, where f_e is the fraction
        # of routed slots that went to expert e and P_e its mean score over the tokens.
        aux = (scores.sum(dim=0) * counts).sum() * (n_exp * self.aux_coeff / (self.topk * n_tok * n_tok))
        z = torch.logsumexp(logits, dim=-1).square().mean() * (self.z_coeff or 0.0)
        return Routing(weights.to(x.dtype), experts, counts, aux, z)

    def groups_tied(self, granularity: int) -> bool:
        """Whether each virtual group (G consecutive experts) shares one router row, as the recipe initialises it."""
        grouped = [_by_group(p, granularity) for p in (self.weight, self.bias) if p is not None]
        return all(torch.equal(g, g[:, :1].expand_as(g)) for g in grouped)

    @torch.no_grad()
    def tie_group_grads(self, granularity: int) -> None:
        """Give each virtual group's G rows the mean of their gradients: rows that start equal then stay equal
        under any optimizer, so top-k keeps selecting whole groups."""
        for p in (self.weight, self.bias):
            if p is not None and p.grad is not None:
                g = _by_group(p.grad, granularity)
                g.copy_(g.mean(dim=1, keepdim=True).expand_as(g))


def _by_group(rows: torch.Tensor, granularity: int) -> torch.Tensor:
    """A per-expert tensor viewed as (virtual groups, G, ...): expert e is shard e mod G of group e // G."""
    return rows.view(-1, granularity, *rows.shape[1:])


class Experts(nn.Module):
    """N expert MLPs (Megatron's SequentialMLP keys). Takes tokens already sorted by expert.

    Each expert runs on its contiguous slice via `split`, whose backward is one concatenation: slicing the
    sorted tensor instead would allocate a full-size gradient per expert, ruinous for 64 fine-grained experts.
    On Hopper GPUs in bf16 the two projections are instead one grouped GEMM each (`torch._grouped_mm`, CUTLASS)
    over the stacked expert weights; `grouped_mm` forces either path (None: automatic).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.local_experts = nn.ModuleList(
            MLP(cfg, cfg.expert_ffn_hidden_size) for _ in range(cfg.num_moe_experts)
        )
        self.grouped_mm: bool | None = None

    def forward(self, x_sorted: torch.Tensor, weights_sorted: torch.Tensor,
                tokens_per_expert: list[int]) -> torch.Tensor:
        if self._use_grouped_mm(x_sorted):
            return self._grouped_forward(x_sorted, weights_sorted, tokens_per_expert)
        xs, ws = x_sorted.split(tokens_per_expert), weights_sorted.split(tokens_per_expert)
        return torch.cat([expert(x, w) for expert, x, w in zip(self.local_experts, xs, ws)])

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.grouped_mm is not None:
            return self.grouped_mm
        return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
                and torch.cuda.get_device_capability(x.device) >= (9, 0))

    def _grouped_forward(self, x: torch.Tensor, weights: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        first = self.local_experts[0]
        counts = torch.tensor(tokens_per_expert, device=x.device)
        offsets = counts.cumsum(0).to(torch.int32)
        expert_of_token = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)

        def project(h: torch.Tensor, name: str) -> torch.Tensor:  # (tokens, in) x N x (out, in) -> (tokens, out)
            linears = [getattr(e, name) for e in self.local_experts]
            out = torch._grouped_mm(h, torch.stack([lin.weight for lin in linears]).transpose(1, 2), offs=offsets)
            if linears[0].bias is not None:
                out = out + torch.stack([lin.bias for lin in linears])[expert_of_token]
            return out

        h = project(x, "linear_fc1")
        if first.gated:
            gate, up = h.chunk(2, dim=-1)
            h = first.act(gate) * up
        else:
            h = first.act(h)
        return project(h, "linear_fc2") * weights.unsqueeze(-1)


class SharedExpert(MLP):
    """Megatron's SharedExpertMLP: a dense MLP every token goes through beside the routed experts; with a gate
    its output is scaled by sigmoid(x . gate_weight) per token (Qwen2-MoE's shared_expert_gate)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg, cfg.moe_shared_expert_intermediate_size)
        self.gate_weight = nn.Parameter(torch.empty(1, cfg.hidden_size)) if cfg.moe_shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (tokens, H)
        out = super().forward(x)
        return out if self.gate_weight is None else out * torch.sigmoid(F.linear(x, self.gate_weight))


class MoELayer(nn.Module):
    """route -> permute tokens by expert -> run experts -> weight and sum back (+ the shared expert, if any).
    Dropless, no token loop."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        if cfg.moe_shared_expert_intermediate_size:
            self.shared_experts = SharedExpert(cfg)
        self.last_routing: Routing | None = None  # kept for monitoring (expert load) and the aux/z losses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (tokens, H)
        routing = self.router(x)
        self.last_routing = routing
        topk = routing.experts.shape[1]
        slot_expert = routing.experts.flatten()  # (tokens*T,) expert of each routed slot
        order = slot_expert.argsort(stable=True)  # slots grouped by expert
        token = order // topk  # source token of each sorted slot
        y = self.experts(x.index_select(0, token), routing.weights.flatten()[order],
                         routing.tokens_per_expert.tolist())
        out = torch.zeros_like(x).index_add_(0, token, y)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out.reshape(shape)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: GPTConfig, moe: bool):
        super().__init__()
        self.input_layernorm = Norm(cfg.hidden_size, cfg)
        self.self_attention = SelfAttention(cfg)
        self.pre_mlp_layernorm = Norm(cfg.hidden_size, cfg)
        self.mlp = MoELayer(cfg) if moe else MLP(cfg, cfg.ffn_hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(tokens)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, moe) for moe in cfg.moe_layer_pattern())
        self.final_layernorm = Norm(cfg.hidden_size, cfg)


@dataclass
class GPTOutput:
    logits: torch.Tensor  # (B, S, V)
    aux_loss: torch.Tensor  # summed over MoE layers (0 for a dense model)
    z_loss: torch.Tensor
    tokens_per_expert: list[torch.Tensor] = field(default_factory=list)  # one (N,) tensor per MoE layer


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embedding = Embedding(cfg)
        self.decoder = TransformerBlock(cfg)
        if not cfg.share_embeddings_and_output_weights:
            self.output_layer = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Megatron's initialisation: normal(0, std); output projections std / sqrt(2 * layers); norms neutral."""
        std = self.config.init_method_std
        out_std = std / math.sqrt(2.0 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight"):
                nn.init.constant_(p, 0.0 if self.config.normalization == "layernorm1p" else 1.0)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, out_std if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else std)

    def forward(self, tokens: torch.Tensor) -> GPTOutput:  # tokens (B, S) -> logits (B, S, V)
        cos, sin = rope_cos_sin(self.config, tokens.shape[1], tokens.device)
        x = self.embedding(tokens)
        for layer in self.decoder.layers:
            x = layer(x, cos, sin)
        x = self.decoder.final_layernorm(x)
        out_w = self.embedding.word_embeddings.weight if self.config.share_embeddings_and_output_weights \
            else self.output_layer.weight
        logits = F.linear(x, out_w)
        routings = [layer.mlp.last_routing for layer in self.decoder.layers if isinstance(layer.mlp, MoELayer)]
        zero = logits.new_zeros((), dtype=torch.float32)
        return GPTOutput(
            logits=logits,
            aux_loss=sum((r.aux_loss for r in routings), zero),
            z_loss=sum((r.z_loss for r in routings), zero),
            tokens_per_expert=[r.tokens_per_expert for r in routings],
        )


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy in float32; labels are already shifted (labels[t] = tokens[t+1])."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.flatten().float()
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
