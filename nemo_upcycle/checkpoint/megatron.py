"""Megatron-LM / Megatron-Bridge torch_dist checkpoints: read (any iteration directory) and write (with the
matching command-line flags).

Layout written for Megatron-LM and Megatron-Bridge:
    OUT/latest_checkpointed_iteration.txt      "0"
    OUT/iter_0000000/                          torch_dist: .metadata, __0_*.distcp, common.pt, metadata.json
    OUT/megatron_args.txt                      the model flags for pretrain_gpt.py, one per line
    OUT/model_config.yaml                      the same model as a NeMo-style config (human-readable)
Load it with `--load OUT --finetune --no-load-optim --no-load-rng $(cat OUT/megatron_args.txt)` (Megatron-LM)
or `checkpoint.pretrained_checkpoint=OUT` (Megatron-Bridge).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import yaml

from nemo_upcycle.activations import activation_name
from nemo_upcycle.checkpoint.archive import atomic_output, load_yaml_mapping
from nemo_upcycle.checkpoint.base import (
    CheckpointReader, CheckpointWriter, Fetch, ReadOptions, SourceMeta, TensorInfo, model_order, refusal)
from nemo_upcycle.checkpoint.layout import canonical_names, dist_fetch_order, write_megatron_dist
from nemo_upcycle.checkpoint.nemo_config import gpt_config_from_nemo, nemo_config_from_gpt
from nemo_upcycle.checkpoint.torch_dist import DistCheckpointReader
from nemo_upcycle.errors import UpcycleError, bad_file
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.megatron import rope_arguments

TRACKER = "latest_checkpointed_iteration.txt"


# ---- model config from a Megatron checkpoint ------------------------------------------------------------

def gpt_config_from_megatron_args(args: dict[str, Any], vocab_size: int) -> GPTConfig:
    """GPTConfig from Megatron-LM's saved command-line args (`common.pt['args']`)."""
    if args.get("position_embedding_type", "learned_absolute") != "rope":
        raise UpcycleError("the Megatron checkpoint does not use RoPE (position_embedding_type): unsupported")
    if args.get("swiglu"):
        activation = "swiglu"
    elif args.get("squared_relu"):
        activation = "squared-relu"
    else:
        activation = "gelu"
    norm = "rmsnorm" if args.get("normalization", "LayerNorm") == "RMSNorm" else "layernorm"
    if args.get("apply_layernorm_1p"):
        norm = "layernorm1p"
    return GPTConfig(
        num_layers=args["num_layers"], hidden_size=args["hidden_size"], ffn_hidden_size=args["ffn_hidden_size"],
        num_attention_heads=args["num_attention_heads"],
        num_query_groups=args.get("num_query_groups") if args.get("group_query_attention") else None,
        kv_channels=args.get("kv_channels"), vocab_size=vocab_size,
        seq_length=args.get("max_position_embeddings") or args.get("seq_length") or 4096,
        activation=activation, normalization=norm, layernorm_epsilon=args.get("norm_epsilon", 1e-5),
        bias=bool(args.get("add_bias_linear", True)), qkv_bias=bool(args.get("add_qkv_bias", False)),
        qk_layernorm=bool(args.get("qk_layernorm", False)), rotary_percentage=args.get("rotary_percent", 1.0),
        rotary_base=float(args.get("rotary_base", 10000)),
        share_embeddings_and_output_weights=not args.get("untie_embeddings_and_output_weights", False),
        init_method_std=args.get("init_method_std", 0.02),
        **_rope_scaling_from_args(args),
        **({"num_moe_experts": args["num_experts"], "moe_ffn_hidden_size": args.get("moe_ffn_hidden_size"),
            "moe_router_topk": args.get("moe_router_topk", 2),
            "moe_router_pre_softmax": bool(args.get("moe_router_pre_softmax", False)),
            "moe_layer_freq": args.get("moe_layer_freq", 1),
            "moe_shared_expert_intermediate_size": args.get("moe_shared_expert_intermediate_size"),
            "moe_shared_expert_gate": bool(args.get("moe_shared_expert_gate", False))}
           if args.get("num_experts") else {}),
    )


def _rope_scaling_from_args(args: dict[str, Any]) -> dict[str, Any]:
    """Megatron-LM's --use-rope-scaling (Llama 3.1, low/high factors 1/4, original context 8192 fixed) and
    --rotary-seq-len-interpolation-factor (linear)."""
    if args.get("use_rope_scaling"):
        return {"rope_scaling_type": "llama3", "rope_scaling_factor": float(args.get("rope_scaling_factor") or 8.0),
                "rope_original_max_position_embeddings": 8192, "rope_low_freq_factor": 1.0,
                "rope_high_freq_factor": 4.0}
    if args.get("rotary_seq_len_interpolation_factor"):
        return {"rope_scaling_type": "linear",
                "rope_scaling_factor": float(args["rotary_seq_len_interpolation_factor"])}
    return {}


def gpt_config_from_transformer_config(model: dict[str, Any], vocab_size: int) -> GPTConfig:
    """GPTConfig from a Megatron-Bridge `run_config.yaml` `model:` section (TransformerConfig field names)."""
    act_target = str((model.get("activation_func") or {}).get("_target_", "gelu")
                     if isinstance(model.get("activation_func"), dict) else model.get("activation_func", "gelu"))
    act_name = act_target.rsplit(".", 1)[-1]
    gated = bool(model.get("gated_linear_unit", False))
    activation = activation_name(act_name, gated) or act_name  # GPTConfig refuses what has no name
    norm = "rmsnorm" if model.get("normalization", "LayerNorm") == "RMSNorm" else "layernorm"
    if model.get("layernorm_zero_centered_gamma") and norm == "layernorm":
        norm = "layernorm1p"
    return gpt_config_from_nemo({
        **model, "activation": activation, "normalization": norm, "bias": model.get("add_bias_linear", True),
        "qkv_bias": model.get("add_qkv_bias", False), "rotary_percentage": model.get("rotary_percent", 1.0),
        "encoder_seq_length": model.get("seq_length"), "position_embedding_type":
            model.get("position_embedding_type", "learned_absolute"),
    }, vocab_size)


def _load_args(common_pt: Path) -> dict[str, Any] | None:
    """Megatron-LM's args from common.pt, with weights_only=True (argparse.Namespace allowed, nothing else)."""
    # Registered for good, as megatron-core does at import: the `safe_globals` context manager would un-register
    # it on exit even when megatron-core had, and its dist_checkpointing.load would then refuse our common.pt
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        common = torch.load(common_pt, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any object beyond plain data: fall back to other config sources
        return None
    args = common.get("args") if isinstance(common, dict) else None
    return vars(args) if isinstance(args, argparse.Namespace) else None


def resolve_iteration_dir(path: Path) -> Path:
    """`OUT` (with a tracker file) or `OUT/iter_XXXXXXX` / `OUT/release` -> the torch_dist directory."""
    if (path / ".metadata").is_file():
        return path
    iters = sorted(p for p in path.glob("iter_*") if (p / ".metadata").is_file())
    tracker = path / TRACKER
    if tracker.is_file():
        with bad_file(tracker, "is not readable text"):
            it = tracker.read_text().strip()
        if it != "release" and not (it.isascii() and it.isdigit()):
            raise UpcycleError(f"{tracker} holds {it[:40]!r}, not an iteration number or 'release': write the "
                               "iteration to convert into it (e.g. 1000), or pass the iter_XXXXXXX directory")
        d = path / ("release" if it == "release" else f"iter_{int(it):07d}")
        if (d / ".metadata").is_file():
            return d
        # never fall back to another iteration: the tracker says which one the user means
        held = ", ".join(p.name for p in iters) or "none"
        raise UpcycleError(f"{tracker} names {d.name}, which is missing from {path} (or has no .metadata; "
                           f"iterations there: {held}): fix {TRACKER}, or pass the iter_XXXXXXX directory")
    if iters:
        return iters[-1]
    raise UpcycleError(f"{path} is not a Megatron torch_dist checkpoint (no .metadata, {TRACKER} or iter_*/)")


def is_megatron_dir(path: Path) -> bool:
    """A torch_dist directory, or a Megatron save folder (tracker file or iter_*/); .nemo directories have
    neither at their top, but a folder this project writes also holds a model_config.yaml."""
    markers = (".metadata", TRACKER)
    return path.is_dir() and (any((path / m).is_file() for m in markers) or any(path.glob("iter_*")))


class MegatronReader(CheckpointReader):
    """A Megatron-LM or Megatron-Bridge torch_dist checkpoint (keys without a prefix, or NeMo's `model.`)."""

    name = "megatron"
    detect = staticmethod(is_megatron_dir)

    @classmethod
    def open(cls, path: Path, options: ReadOptions) -> "MegatronReader":
        return cls(path, options.model_config)

    def __init__(self, path: Path | str, model_config: dict[str, Any] | None = None):
        self.path = resolve_iteration_dir(Path(path))
        self._dist = DistCheckpointReader(self.path)
        fqns = list(self._dist.tensors)
        self.prefix = "model." if any(f.startswith("model.") for f in fqns) else ""
        self._index: dict[str, tuple[str, tuple[int, ...]]] = {}
        infos = {}
        for fqn in fqns:
            shape, dtype = self._dist.shape(fqn), self._dist.dtype(fqn)
            for name, index in canonical_names(fqn, shape, self.prefix):
                if name.startswith(("decoder.", "embedding.", "output_layer.")):
                    self._index[name] = (fqn, index)
                    infos[name] = TensorInfo(shape[len(index):], dtype)
        if "embedding.word_embeddings.weight" not in infos:
            raise UpcycleError(f"{self.path} holds no GPT embedding (embedding.word_embeddings.weight)")
        self._infos = model_order(infos)
        vocab = infos["embedding.word_embeddings.weight"].shape[0]
        self.config, self.source_config = self._find_config(model_config, vocab)

    def _find_config(self, given: dict[str, Any] | None, vocab: int) -> tuple[GPTConfig, dict[str, Any]]:
        if given is not None:
            with bad_file("the --model-config", "has a value of the wrong type", "fix that field"):
                return gpt_config_from_nemo(given, vocab, "the --model-config file"), dict(given)
        ours = self.path.parent / "model_config.yaml"  # written by MegatronWriter next to iter_0000000/
        if ours.is_file():
            cfg = load_yaml_mapping(ours)
            with bad_file(ours, "has a value of the wrong type", "fix that field"):
                return gpt_config_from_nemo(cfg, vocab, str(ours)), cfg
        for run_config in (self.path / "run_config.yaml", self.path.parent / "run_config.yaml"):
            if run_config.is_file():
                model = load_yaml_mapping(run_config).get("model")
                if isinstance(model, dict):
                    with bad_file(run_config, "has a model value of the wrong type", "fix that field"):
                        cfg = gpt_config_from_transformer_config(model, vocab)
                        return cfg, nemo_config_from_gpt(cfg)
        args = _load_args(self.path / "common.pt")
        if args is not None:
            with bad_file(self.path / "common.pt", "holds saved args of the wrong type",
                          "pass model_config=CONFIG.yaml instead"):
                cfg = gpt_config_from_megatron_args(args, vocab)
                return cfg, nemo_config_from_gpt(cfg)
        raise UpcycleError(
            f"no model config found with {self.path} (no run_config.yaml, no args in common.pt): pass "
            "model_config=CONFIG.yaml (NeMo model_config.yaml fields)"
        )

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return dict(zip(names, self._dist.read_many([self._index[n] for n in names])))


# ---- writing for Megatron-LM / Megatron-Bridge ------------------------------------------------------------

def megatron_args(cfg: GPTConfig) -> list[str]:
    """pretrain_gpt.py flags that build exactly this model (and its MoE layers)."""
    act = {"squared-relu": ["--squared-relu"], "swiglu": ["--swiglu"], "gelu": []}.get(cfg.activation)
    if act is None:
        raise UpcycleError(f"Megatron-LM has no flag for activation '{cfg.activation}'")
    flags = [
        f"--num-layers {cfg.num_layers}", f"--hidden-size {cfg.hidden_size}",
        f"--ffn-hidden-size {cfg.ffn_hidden_size}", f"--num-attention-heads {cfg.num_attention_heads}",
        f"--kv-channels {cfg.head_dim}", f"--seq-length {cfg.seq_length}",
        f"--max-position-embeddings {cfg.seq_length}", *act,
        f"--normalization {'RMSNorm' if cfg.normalization == 'rmsnorm' else 'LayerNorm'}",
        f"--norm-epsilon {cfg.layernorm_epsilon}", "--position-embedding-type rope",
        f"--rotary-percent {cfg.rotary_percentage}", f"--rotary-base {int(cfg.rotary_base)}",
        f"--init-method-std {cfg.init_method_std}", "--ckpt-format torch_dist",
    ]
    if cfg.normalization == "layernorm1p":
        flags.append("--apply-layernorm-1p")
    if cfg.num_query_groups and cfg.num_query_groups != cfg.num_attention_heads:
        flags += ["--group-query-attention", f"--num-query-groups {cfg.num_query_groups}"]
    if not cfg.bias:
        flags.append("--disable-bias-linear")
    if cfg.qkv_bias and not cfg.bias:
        flags.append("--add-qkv-bias")
    if cfg.qk_layernorm:
        flags.append("--qk-layernorm")
    if not cfg.share_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    rope = rope_arguments(cfg)
    if rope.get("rope_scaling"):
        flags += ["--use-rope-scaling", f"--rope-scaling-factor {rope['rope_scaling_factor']:g}"]
    if "seq_len_interpolation_factor" in rope:
        factor = rope["seq_len_interpolation_factor"]
        if factor != int(factor):
            raise UpcycleError(f"Megatron-LM takes an integer --rotary-seq-len-interpolation-factor, this model's "
                               f"linear RoPE factor is {factor:g}: write output_format=nemo or output_format=hf instead")
        flags.append(f"--rotary-seq-len-interpolation-factor {int(factor)}")
    if cfg.is_moe:
        flags += [
            f"--num-experts {cfg.num_moe_experts}", f"--moe-ffn-hidden-size {cfg.expert_ffn_hidden_size}",
            f"--moe-router-topk {cfg.moe_router_topk}", f"--moe-router-score-function {cfg.moe_router_score_function}",
            f"--moe-aux-loss-coeff {cfg.moe_aux_loss_coeff}", "--moe-router-load-balancing-type aux_loss",
            "--moe-token-dispatcher-type alltoall", "--moe-grouped-gemm", "--moe-router-dtype fp32",
        ]
        if cfg.moe_router_pre_softmax:
            flags.append("--moe-router-pre-softmax")
        if cfg.moe_z_loss_coeff:
            flags.append(f"--moe-z-loss-coeff {cfg.moe_z_loss_coeff}")
        if cfg.moe_router_topk_scaling_factor:
            flags.append(f"--moe-router-topk-scaling-factor {cfg.moe_router_topk_scaling_factor}")
        if cfg.moe_shared_expert_intermediate_size:
            flags.append(f"--moe-shared-expert-intermediate-size {cfg.moe_shared_expert_intermediate_size}")
        if cfg.moe_shared_expert_gate:
            flags.append("--moe-shared-expert-gate")
        if cfg.moe_layer_freq != 1:
            freq = cfg.moe_layer_freq
            pattern = str(freq) if isinstance(freq, int) else "'[" + ",".join(map(str, freq)) + "]'"
            flags.append(f"--moe-layer-freq {pattern}")
    return flags


def megatron_lm_args(cfg: GPTConfig, params_dtype: torch.dtype) -> argparse.Namespace:
    """The `args` namespace Megatron-LM saves in `common.pt` (its argument names), holding what a loader needs
    to rebuild this model: Megatron-LM's `load_args_from_checkpoint` (--use-checkpoint-args) sets the model
    arguments from it, and Megatron-Bridge reads it when a checkpoint has no run_config.yaml
    (`_load_args_from_checkpoint`, `_transformer_config_from_args`: TransformerConfig fields copied by name)."""
    moe = cfg.is_moe
    freq = cfg.moe_layer_freq
    values: dict[str, Any] = dict(
        # model, as pretrain_gpt.py's flags (megatron_args) set them
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, kv_channels=cfg.head_dim,
        group_query_attention=cfg.num_groups != cfg.num_attention_heads,
        num_query_groups=cfg.num_groups if cfg.num_groups != cfg.num_attention_heads else None,
        seq_length=cfg.seq_length, max_position_embeddings=cfg.seq_length,
        position_embedding_type="rope", add_position_embedding=True, use_rotary_position_embeddings=False,
        rotary_percent=cfg.rotary_percentage, rotary_base=int(cfg.rotary_base), rotary_interleaved=False,
        swiglu=cfg.activation == "swiglu", squared_relu=cfg.activation == "squared-relu",
        gated_linear_unit=cfg.gated,
        normalization="RMSNorm" if cfg.normalization == "rmsnorm" else "LayerNorm",
        apply_layernorm_1p=cfg.normalization == "layernorm1p",
        layernorm_zero_centered_gamma=cfg.normalization == "layernorm1p",
        norm_epsilon=cfg.layernorm_epsilon, layernorm_epsilon=cfg.layernorm_epsilon,
        add_bias_linear=cfg.bias, add_qkv_bias=cfg.qkv_bias or cfg.bias, qk_layernorm=cfg.qk_layernorm,
        untie_embeddings_and_output_weights=not cfg.share_embeddings_and_output_weights,
        init_method_std=cfg.init_method_std, apply_query_key_layer_scaling=False,
        attention_dropout=0.0, hidden_dropout=0.0, spec=None, params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        # MoE
        num_experts=cfg.num_moe_experts if moe else None, num_moe_experts=cfg.num_moe_experts if moe else None,
        moe_ffn_hidden_size=cfg.expert_ffn_hidden_size if moe else None, moe_router_topk=cfg.moe_router_topk,
        moe_router_pre_softmax=cfg.moe_router_pre_softmax, moe_router_score_function=cfg.moe_router_score_function,
        moe_router_topk_scaling_factor=cfg.moe_router_topk_scaling_factor, moe_router_enable_expert_bias=False,
        moe_layer_freq=freq if isinstance(freq, int) else list(freq), moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_z_loss_coeff=cfg.moe_z_loss_coeff, moe_router_load_balancing_type="aux_loss",
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=moe, moe_router_dtype="fp32" if moe else None,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=cfg.moe_shared_expert_gate,
        # vocabulary: no tokenizer travels in a Megatron checkpoint; a NullTokenizer of the padded size
        # (its vocab_size is the given one + 1 for EOD) rebuilds the embedding shape exactly
        tokenizer_type="NullTokenizer", vocab_size=cfg.vocab_size - 1, padded_vocab_size=cfg.vocab_size,
        make_vocab_size_divisible_by=1, tokenizer_model=None,
        # parallelism and checkpoint format of this (unsharded) checkpoint
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, context_parallel_size=1, ckpt_format="torch_dist",
        use_dist_ckpt=True, iteration=0,
        # the rest of what Bridge's _transformer_config_from_args reads by attribute, at Megatron-LM's defaults
        multi_latent_attention=False, heterogeneous_layers_config_path=None, no_persist_layer_norm=False,
        overlap_p2p_comm=False, decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
        fp8_param_gather=False, bias_swiglu_fusion=False, bias_gelu_fusion=False, init_method_xavier_uniform=False,
        config_logger_dir="", cp_comm_type=["p2p"], is_hybrid_model=False,
    )
    return argparse.Namespace(**values)


def weights_dtype(tensors: dict[str, TensorInfo]) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (every reader guarantees an embedding)."""
    return tensors["embedding.word_embeddings.weight"].dtype


class MegatronWriter(CheckpointWriter):
    name = "megatron"

    def problem(self, config: GPTConfig) -> str | None:
        return refusal(lambda: (nemo_config_from_gpt(config), megatron_args(config)))

    def fetch_order(self, config: GPTConfig, tensors: dict[str, TensorInfo]) -> list[str]:
        return dist_fetch_order(tensors)

    def overhead_bytes(self, tensors: dict[str, TensorInfo]) -> int:
        return 1 << 20

    def write(self, config: GPTConfig, tensors: dict[str, TensorInfo], fetch: Fetch, source: SourceMeta) -> None:
        flags = megatron_args(config)
        with atomic_output(self.path, self.overwrite) as out:
            out.mkdir(parents=True)
            write_megatron_dist(out / "iter_0000000", config, tensors, fetch, prefix="",
                                common={"checkpoint_version": 3.0, "iteration": 0,
                                        "args": megatron_lm_args(config, weights_dtype(tensors))})
            (out / TRACKER).write_text("0")
            (out / "megatron_args.txt").write_text("\n".join(flags) + "\n")
            (out / "model_config.yaml").write_text(yaml.safe_dump(nemo_config_from_gpt(config), sort_keys=False))
