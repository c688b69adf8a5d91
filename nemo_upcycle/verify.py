"""Step-0 verification of an upcycled checkpoint against its dense source: per-expert checksums, and the
reference model's output.

Checksums: every expert tensor of every MoE layer (and each layer's router and shared expert) is recomputed
from the dense source with the recipe (expert k = dense shard k mod G, times the scaling factors; Drop-Upcycling
and router rows redrawn from the same seeds) and hashed, and so is the tensor read back from the output through
its reader, whatever its layout (torch_dist stacked or per layer, legacy shards, Hugging Face per-expert
tensors). A lost, duplicated, mis-ordered or mis-scaled expert is named, e.g. "layer 3 expert 5
linear_fc2.weight: expected dense shard 1 x 2, found expert 4's tensor (duplicated or mis-ordered?)".

The recipe's guarantee, checked per MoE layer on the dense model's own hidden states: with virtual-group
routers every token selects whole copies of the dense MLP, so

    moe(x) = (s / G) * (sum of the token's routing weights) * dense(x)

exactly (s the weight-scaling factor). That identity covers every router type (it is dense(x) itself for
topK-then-softmax) and fails for a lost, duplicated, mis-ordered or mis-scaled expert. It does not hold by design
for Drop-Upcycling, random router init or the approximate `megatron` scaling of non-homogeneous MLPs; those
conversions are reported without a pass/fail verdict. Logit differences and losses are reported always.

The function, measured on real text (the dense checkpoint's tokenizer on demo_data/verify_text.txt or
--verify-data; random tokens without a tokenizer): held-out loss of dense and MoE and their relative gap,
next-token top-1 agreement and greedy continuations of a few prompts. The identity above can hold while the
function moves: rho(x) = (s / G) * (sum of routing weights) is 1 only when the router is flat enough, and a
token whose group probabilities tie may route to parts of several groups. A gap above the threshold (default
0.1%) fails, naming the cause found: ties between virtual groups, rho spread, scaling that rounds in the
checkpoint's dtype.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from nemo_upcycle.activations import get_activation
from nemo_upcycle.checkpoint.base import CheckpointReader
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.keys import layer_index, unstack_experts
from nemo_upcycle.models.reference import GPTModel, MoELayer, lm_loss
from nemo_upcycle.recipe import UpcycleConfig, scaling_factors, upcycle_layer_mlp
from nemo_upcycle.recipe.calibration import directions_from_reader, reader_tokenizer
from nemo_upcycle.recipe.state_dict import DENSE_MLP_KEYS

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _truncated(cfg: GPTConfig, n: int) -> GPTConfig:
    freq = cfg.moe_layer_freq
    if isinstance(freq, tuple):
        freq = freq[:n]
    return cfg.replace(num_layers=n, moe_layer_freq=freq)


def _load(reader: CheckpointReader, n: int) -> GPTModel:
    cfg = _truncated(reader.config, n)
    names = [k for k in reader.tensors() if layer_index(k) is None or layer_index(k) < n]
    model = GPTModel(cfg).eval()
    sd = unstack_experts(reader.read(names))
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
    return model


def identity_holds(recipe: UpcycleConfig, activation: str) -> bool:
    """Whether the per-layer identity is a guarantee for this recipe (see the module docstring)."""
    return (recipe.router_init != "random" and recipe.drop_ratio == 0
            and scaling_factors(recipe, get_activation(activation)).exact)


DEFAULT_THRESHOLD = 1e-3  # largest relative held-out loss gap (MoE vs dense) that passes
PROMPTS = ("The capital of France is", "A river carries sand and")


@dataclass(frozen=True)
class VerifyOptions:
    """What a conversion's step-0 verification measures: the first `layers` layers (0 = all), on `text` (None:
    the bundled held-out sample), failing above a relative loss gap of `threshold`."""

    layers: int = 0
    text: str | None = None
    threshold: float = DEFAULT_THRESHOLD


def verify_tokens(tokenizer, vocab_size: int, text: str | None = None, max_tokens: int = 512) -> torch.Tensor:
    """(1, <= max_tokens) tokens of `text` (default: the bundled held-out sample, demo_data/verify_text.txt),
    bos first when the tokenizer has one; seeded random tokens when there is no tokenizer."""
    if tokenizer is None:
        return torch.randint(0, vocab_size, (1, min(max_tokens, 256)), generator=torch.Generator().manual_seed(0))
    if text is None:
        text = resources.files("nemo_upcycle").joinpath("demo_data/verify_text.txt").read_text()
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)
    if len(ids) < 2 or max(ids[:max_tokens]) >= vocab_size:
        raise UpcycleError("the verify text gives fewer than 2 tokens, or ids beyond the model's vocabulary: "
                           "pass a longer --verify-data text, or a checkpoint whose tokenizer matches")
    return torch.tensor([ids[:max_tokens]])


def function_stats(dense_logits: torch.Tensor, moe_logits: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """Held-out next-token loss of both, the relative gap (MoE - dense) / dense, and top-1 agreement."""
    labels = tokens[:, 1:]
    dense_loss = lm_loss(dense_logits[:, :-1], labels).item()
    moe_loss = lm_loss(moe_logits[:, :-1], labels).item()
    top1 = (dense_logits.argmax(-1) == moe_logits.argmax(-1)).float().mean().item()
    return {"dense": dense_loss, "moe": moe_loss, "gap": (moe_loss - dense_loss) / dense_loss, "top1": top1}


@torch.no_grad()
def greedy(model: GPTModel, ids: list[int], steps: int) -> list[int]:
    tokens = torch.tensor([ids])
    for _ in range(steps):
        tokens = torch.cat([tokens, model(tokens).logits[:, -1:].argmax(-1)], dim=1)
    return tokens[0, len(ids):].tolist()


def group_problems(routing, recipe: UpcycleConfig) -> tuple[int, float]:
    """(tokens whose chosen experts are not whole virtual groups, largest |rho - 1|) for one MoE layer, where rho
    is the routed output's factor on the dense MLP: (s / G) * (sum of the routing weights) (+ 1/2 shared)."""
    g = recipe.granularity
    groups = routing.experts // g
    per_group = torch.zeros(groups.shape[0], recipe.expansion, dtype=torch.long).scatter_add_(
        1, groups, torch.ones_like(groups))
    split = ((per_group != 0) & (per_group != g)).any(-1).sum().item()
    rho = recipe.scale_factor() / g * routing.weights.float().sum(-1) + (0.5 if recipe.shared_expert else 0.0)
    return int(split), (rho - 1).abs().max().item()


def scaling_rounds(recipe: UpcycleConfig, activation: str, dtype: torch.dtype) -> bool:
    """Whether the weight-scaling factors round in `dtype`: a factor other than a power of two does, in bf16/fp16."""
    if dtype in (torch.float32, torch.float64):
        return False
    f = scaling_factors(recipe, get_activation(activation))
    return any(x > 0 and math.log2(x) != round(math.log2(x)) for x in (f.gate, f.fc1, f.fc2))


@torch.no_grad()
def verify_conversion(dense_reader: CheckpointReader, moe_reader: CheckpointReader, recipe: UpcycleConfig,
                      layers: int = 0, router_directions: dict[int, torch.Tensor] | None = None,
                      text: str | None = None, threshold: float = DEFAULT_THRESHOLD,
                      max_tokens: int = 512, tokens: torch.Tensor | None = None) -> dict[str, Any]:
    """Step 0 of the first `layers` layers (0 = all) of both checkpoints, in float32, on real text (the dense
    checkpoint's tokenizer on `text`, default the bundled held-out sample; random tokens without a tokenizer):
    the held-out loss gap (fails above `threshold`, naming the cause), top-1 agreement, greedy continuations,
    the recipe identity per MoE layer, and the expert checksums. `tokens` (from verify_tokens) replaces `text`
    where the caller has tokenized it already."""
    n = dense_reader.config.num_layers if layers <= 0 else min(layers, dense_reader.config.num_layers)
    dense, moe = _load(dense_reader, n), _load(moe_reader, n)
    dtype = next(iter(dense_reader.tensors().values())).dtype
    tokenizer = reader_tokenizer(dense_reader)
    if tokens is None:
        tokens = verify_tokens(tokenizer, dense.config.vocab_size, text, max_tokens)

    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0]))
             for i, layer in enumerate(dense.decoder.layers)]
    dense_logits = dense(tokens).logits
    for h in hooks:
        h.remove()
    moe_logits = moe(tokens).logits
    stats = function_stats(dense_logits, moe_logits, tokens)

    worst, split, spread = 0.0, {}, 0.0
    for i, layer in enumerate(moe.decoder.layers):
        if not isinstance(layer.mlp, MoELayer):
            continue
        x = captured[i]
        got = layer.mlp(x)
        routing = layer.mlp.last_routing
        weight_sum = routing.weights.sum(-1).reshape(*x.shape[:-1], 1).float()
        shared = 0.5 if recipe.shared_expert else 0.0  # the dense MLP behind a zero sigmoid gate
        want = (recipe.scale_factor() / recipe.granularity * weight_sum + shared) * dense.decoder.layers[i].mlp(x)
        worst = max(worst, ((got - want).norm() / want.norm().clamp(min=1e-12)).item())
        if recipe.router_init != "random":
            n_split, rho = group_problems(routing, recipe)
            spread = max(spread, rho)
            if n_split:
                split[i] = n_split
    tol = TOLERANCE.get(dtype, 1e-4)
    guaranteed = identity_holds(recipe, dense_reader.config.activation)
    checksums = expert_checksums(dense_reader, moe_reader, recipe, router_directions)
    bad = [c["problem"] for c in checksums if c["problem"]]
    causes = []
    if split:
        first = min(split)
        causes.append(f"ties between virtual groups: {sum(split.values())} token-layers route to parts of several "
                      f"groups (first in layer {first}); use --router-init calibrated")
    if spread > threshold:
        causes.append(f"rho spread: the routed weights scale the dense MLP by up to {1 + spread:.4f} (router rows "
                      "too large for these hidden states); use --router-init calibrated")
    if scaling_rounds(recipe, dense_reader.config.activation, dtype):
        causes.append(f"scaling rounding: a weight-scaling factor of s={recipe.scale_factor():g} is not a power of "
                      f"two and rounds in {str(dtype).replace('torch.', '')}")
    if guaranteed and worst > tol:
        causes.append(f"recipe identity off by {worst:.2e} (tolerance {tol:g})")
    loss_moved = abs(stats["gap"]) > threshold
    if bad:
        status = "FAILED: " + bad[0]
    elif loss_moved and guaranteed:
        status = (f"FAILED: held-out loss moved by {100 * stats['gap']:+.3f}% (threshold {100 * threshold:g}%); "
                  f"cause: {'; '.join(causes) or 'not a known one (drop-upcycling, random router or megatron scaling)'}")
    elif not guaranteed:
        status = "not checked (no exact guarantee)"
    elif worst > tol:
        status = "FAILED: " + causes[-1]
    else:
        status = "PASSED"
    where = "held-out text" if tokenizer is not None else "random tokens (no tokenizer)"
    report = {
        "layers compared": f"{n} of {dense_reader.config.num_layers}",
        f"loss dense / MoE ({tokens.shape[1]} tokens of {where})": f"{stats['dense']:.4f} / {stats['moe']:.4f} "
                                                                   f"(gap {100 * stats['gap']:+.4f}%)",
        "next-token top-1 agreement": f"{100 * stats['top1']:.2f}%",
        "max abs logit diff": f"{(moe_logits - dense_logits).abs().max().item():.3e}",
        "max rel. error of MoE layer vs recipe identity": f"{worst:.2e} (tolerance {tol:g})",
        "max |rho - 1| / tokens split across groups": f"{spread:.2e} / {sum(split.values())}",
    }
    if tokenizer is not None and n == dense_reader.config.num_layers:
        for prompt in PROMPTS:
            ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
            a, b = greedy(dense, ids, 12), greedy(moe, ids, 12)
            same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            report[f"greedy '{prompt}'"] = (f"dense {tokenizer.decode(a)!r} / MoE {tokenizer.decode(b)!r} "
                                            f"({'identical' if same == len(a) else f'differs from token {same}'})")
    report["expert checksums"] = (f"{len(bad)} of {len(checksums)} tensors differ from the recipe: " + "; ".join(bad[:3])
                                  if bad else f"all {len(checksums)} tensors match the recipe")
    report["status"] = status
    report["checksums"] = checksums
    return report


def sha256(t: torch.Tensor) -> str:
    """Hash of a tensor's bytes (dtype and layout as stored: contiguous, native byte order)."""
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _expected_text(key: str, expert: int | None, recipe: UpcycleConfig, activation: str) -> str:
    """What the recipe puts in one tensor, in words: "dense shard 1 x 2" or "dense shard 0 (gate x1, up x1.41)"."""
    f = scaling_factors(recipe, get_activation(activation))
    drop = f", {recipe.drop_ratio:g} of its neurons re-drawn (seed {recipe.seed})" if recipe.drop_ratio else ""
    shard = f"dense shard {expert % recipe.granularity}" if expert is not None else ""
    if key.startswith("mlp.experts.linear_fc1."):
        gated = get_activation(activation).gated
        return (f"{shard} (gate x{f.gate:.4g}, up x{f.fc1:.4g})" if gated else f"{shard} x{f.fc1:.4g}") + drop
    if key == "mlp.experts.linear_fc2.weight":
        return f"{shard} x{f.fc2:.4g}{drop}"
    if key == "mlp.experts.linear_fc2.bias":
        return f"dense fc2 bias x{f.fc2_bias:.4g}"
    if key == "mlp.router.weight":
        if recipe.router_init == "calibrated":
            return "calibrated router rows (group multipliers x the dense model's mean MLP input direction)"
        return f"{recipe.router_init.replace('_', '-')} router rows (seed {recipe.seed})"
    if key.startswith("mlp.shared_experts.linear_fc"):
        return "the dense MLP, unchanged"
    return "zeros"  # router bias, shared-expert gate


def _found_text(got: torch.Tensor, expected: list[torch.Tensor], hashes: list[str], e: int | None,
                granularity: int) -> str:
    """What a mismatching tensor is instead: another expert's, a rescaled copy, or nothing the recipe makes."""
    h = sha256(got)
    others = [j for j, other in enumerate(hashes) if other == h and j != e]
    if len(others) == 1:
        return f"the tensor of expert {others[0]} (duplicated or mis-ordered?)"
    if others:  # identical copies of one shard (no Drop-Upcycling)
        return (f"the tensor of experts {', '.join(map(str, others))} (dense shard {others[0] % granularity}; "
                "duplicated or mis-ordered?)")
    if not got.any():
        return "zeros (a lost expert?)"
    want = expected[0 if e is None else e].to(got.dtype).float()
    ratio = (got.float() * want).sum() / (want * want).sum().clamp(min=1e-30)
    if torch.allclose(got.float(), ratio * want, rtol=1e-3, atol=1e-6 * want.abs().max().item()):
        return f"the right shard scaled by {ratio.item():.4g} (mis-scaled?)"
    return f"a tensor the recipe does not make (sha256 {h[:12]})"


@torch.no_grad()
def expert_checksums(dense_reader: CheckpointReader, moe_reader: CheckpointReader, recipe: UpcycleConfig,
                     router_directions: dict[int, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Per MoE layer: every expert tensor, the router and the shared expert, recomputed from the dense source
    and hashed, against the output's; one record per tensor (per expert), with `problem` set on a mismatch.
    `router_directions`: the calibrated router directions, recomputed from the dense source when not given."""
    dense_cfg = dense_reader.config
    if router_directions is None:
        router_directions = directions_from_reader(dense_reader, recipe) or {}
    written = moe_reader.tensors()
    records: list[dict[str, Any]] = []
    for i, moe in enumerate(recipe.moe_layer_pattern(dense_cfg.num_layers)):
        if not moe:
            continue
        prefix = f"decoder.layers.{i}."
        mlp_names = [prefix + k for k in DENSE_MLP_KEYS if prefix + k in dense_reader.tensors()]
        mlp = {k[len(prefix):]: v for k, v in dense_reader.read(mlp_names).items()}
        expected = upcycle_layer_mlp(mlp, dense_cfg, recipe, i, router_directions.get(i))
        present = [prefix + k for k in expected if prefix + k in written]
        found = {k[len(prefix):]: v for k, v in moe_reader.read(present).items()}
        for key, want in expected.items():
            per_expert = key.startswith("mlp.experts.")
            got = found.get(key)
            wants = list(want.unbind(0)) if per_expert else [want]
            gots = [] if got is None else (list(got.unbind(0)) if per_expert else [got])
            hashes = [sha256(w.to(gots[0].dtype if gots else w.dtype)) for w in wants]
            for e in range(max(len(wants), len(gots))):
                expert = e if per_expert else None
                where = f"layer {i}" + (f" expert {e}" if per_expert else "") + f" {key.removeprefix('mlp.experts.')}"
                expected_text = _expected_text(key, expert, recipe, dense_cfg.activation) if e < len(wants) else None
                record = {"layer": i, "expert": expert, "tensor": key, "expected": expected_text,
                          "expected_sha256": hashes[e] if e < len(wants) else None,
                          "found_sha256": sha256(gots[e]) if e < len(gots) else None, "problem": None}
                if e >= len(gots):
                    record["problem"] = f"{where}: missing from the output"
                elif e >= len(wants):
                    record["problem"] = f"{where}: an expert the recipe does not make ({len(wants)} experts expected)"
                elif gots[e].shape != wants[e].shape:
                    record["problem"] = (f"{where}: shape {tuple(gots[e].shape)}, the recipe makes "
                                         f"{tuple(wants[e].shape)}")
                elif record["found_sha256"] != record["expected_sha256"]:
                    found_text = _found_text(gots[e], wants, hashes, expert, recipe.granularity)
                    record["problem"] = f"{where}: expected {record['expected']}, found {found_text}"
                records.append(record)
    return records
