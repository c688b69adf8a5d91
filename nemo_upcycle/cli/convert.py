"""`nemo-upcycle convert`: a dense checkpoint in, an upcycled MoE checkpoint out, streamed layer by layer.

Plan, then execute (as mergekit does): the plan is a pure list of output tensors with shapes and dtypes,
computed from the input's headers alone (what `--dry-run` prints); execution walks the writer's storage order,
reading one dense layer, upcycling its MLP, handing each tensor to the writer and dropping it. Memory stays
bounded by about one layer's output whatever the model size.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nemo_upcycle.checkpoint import (
    INPUT_FORMATS, OUTPUT_FORMATS, ReadOptions, WriteOptions, make_writer, open_checkpoint)
from nemo_upcycle.checkpoint.archive import check_output_path
from nemo_upcycle.checkpoint.hf_export import HF_ARCHS
from nemo_upcycle.checkpoint.hf_keys import ENGINES
from nemo_upcycle.convert import (
    GGUF_DTYPES, Plan, check_options, convert, load_model_config, plan_conversion, read_verify_text)
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.recipe import UpcycleConfig
from nemo_upcycle.recipe.config import ROUTER_INITS, ROUTER_TYPES, SCALING_METHODS
from nemo_upcycle.report import human_count, markdown_table
from nemo_upcycle.verify import DEFAULT_THRESHOLD, VerifyOptions

_RECIPE_OPTIONS = ("expansion", "granularity", "topk", "num_experts", "router", "scaling_method", "router_init",
                   "router_init_std", "seed", "layer_freq", "drop_ratio", "aux_loss_coeff", "z_loss_coeff",
                   "topk_scaling_factor", "layers", "weight_scaling")


def recipe_from_args(args: argparse.Namespace) -> UpcycleConfig | None:
    """The recipe the flags describe: the mapping `UpcycleConfig.from_dict` takes (the Hydra path's), plus the
    flags only the command line has (--num-experts, --layers as text, --recipe none)."""
    if args.recipe == "none":
        given = [k for k in _RECIPE_OPTIONS if getattr(args, k) is not None]
        given += ["shared_expert"] if args.shared_expert else []
        if given:
            raise UpcycleError(f"--recipe none converts the format only: drop --{given[0].replace('_', '-')}")
        return None
    shorthand_granularity = (UpcycleConfig.from_shorthand(args.recipe, router_init="random").granularity
                             if args.recipe else 1)  # a bad shorthand is named first
    values: dict[str, Any] = {k: getattr(args, k) for k in _RECIPE_OPTIONS
                              if k not in ("num_experts", "layers", "weight_scaling")}
    values["shorthand"] = args.recipe
    if args.num_experts is not None:
        g = args.granularity if args.granularity is not None else shorthand_granularity
        if g < 1 or args.num_experts < 1:
            raise UpcycleError(f"--num-experts {args.num_experts} and granularity {g} must be positive integers")
        if args.num_experts % g:
            raise UpcycleError(f"--num-experts {args.num_experts} is not a multiple of granularity {g}")
        if args.expansion is not None and args.expansion != args.num_experts // g:
            raise UpcycleError(f"--expansion {args.expansion} and --num-experts {args.num_experts} disagree (E = "
                               f"experts / G = {args.num_experts // g} at granularity {g}): give one of the two")
        values["expansion"] = args.num_experts // g
    if args.layers is not None:
        values["layers"] = _layer_list(args.layers)
    if args.weight_scaling is not None:
        ws = args.weight_scaling
        values["weight_scaling"] = ws if ws in ("auto", "off") else _float(ws, "--weight-scaling")
    if args.shared_expert:
        values["shared_expert"] = True
    return UpcycleConfig.from_dict(values)


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UpcycleError(f"--layers must be comma-separated 0-based layer indices, e.g. 0,2,4; got '{text}'") from None


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UpcycleError(f"{flag} must be 'auto', 'off' or a number, got '{text}'")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="dense checkpoint: .nemo file or directory, Megatron torch_dist directory "
                                 "(iter_XXXXXXX/ or its parent), Hugging Face folder, or Llama-family .gguf file")
    p.add_argument("output", help="where to write the upcycled checkpoint (must not exist unless --overwrite)")
    r = p.add_argument_group("recipe (the paper's notation: E expansion, G granularity, T top-k)")
    r.add_argument("--recipe", help="shorthand E<E>G<G>T<T>, e.g. E8G8T8 (64 experts of 1/8 size, top-8) "
                                    "or E8G1T2 (8 full-size experts, top-2); default E8G1T2; 'none': convert the "
                                    "format only (e.g. an exported Hugging Face MoE back to .nemo)")
    r.add_argument("--expansion", type=int, help="E: MoE MLP parameters / dense MLP parameters")
    r.add_argument("--granularity", type=int, help="G: dense ffn_hidden_size / expert ffn_hidden_size")
    r.add_argument("--topk", type=int, help="T: experts per token")
    r.add_argument("--num-experts", type=int, help="E*G; sets E from G (alternative to --expansion)")
    r.add_argument("--router", choices=ROUTER_TYPES, help="routing: softmax_then_topk (default, the paper's), "
                   "topk_then_softmax (Mixtral's), sigmoid")
    r.add_argument("--weight-scaling", help="'auto' (default: keeps the step-0 output), 'off', or a factor")
    r.add_argument("--scaling-method", choices=SCALING_METHODS,
                   help="how the factor is spread over expert weights: homogeneous (default, exact for every "
                        "activation), megatron (Megatron-LM's exponents), fc2 (all on fc2)")
    r.add_argument("--router-init", choices=ROUTER_INITS,
                   help="calibrated (default): virtual groups ordered along the dense model's mean hidden state, "
                        "no ties and routed weights summing to ~1 on real models; balanced (granularity 1 only): random "
                        "rows orthogonal to the mean hidden state, tokens spread over experts from step 0; "
                        "virtual_group: the paper's random group rows (the old default); random: independent "
                        "random rows")
    r.add_argument("--router-init-std", type=float,
                   help="std of virtual_group / random router rows (default: the model's init_method_std)")
    r.add_argument("--seed", type=int, help="seed for router rows and Drop-Upcycling (default 1234)")
    r.add_argument("--layers", help="comma-separated 0-based layers to upcycle (default: all)")
    r.add_argument("--layer-freq", type=int, help="upcycle every k-th layer (0, k, 2k, ...)")
    r.add_argument("--drop-ratio", type=float, help="Drop-Upcycling: re-initialise this fraction of each "
                                                    "expert's neurons (default 0)")
    r.add_argument("--aux-loss-coeff", type=float, help="load-balancing loss coefficient written to the config "
                                                        "(default 1e-2)")
    r.add_argument("--z-loss-coeff", type=float, help="router z-loss coefficient (default none)")
    r.add_argument("--topk-scaling-factor", type=float, help="Megatron's moe_router_topk_scaling_factor")
    r.add_argument("--shared-expert", action="store_true",
                   help="Qwen-MoE style: keep the dense MLP whole as a shared expert (zero-initialised sigmoid gate, "
                        "1/2 at step 0) with the routed experts scaled to the other half")
    o = p.add_argument_group("input and output")
    o.add_argument("--format", dest="output_format", choices=OUTPUT_FORMATS, default="nemo",
                   help="nemo: .nemo for NeMo (default); megatron: torch_dist directory for Megatron-LM / "
                        "Megatron-Bridge, with megatron_args.txt; hf: Hugging Face MoE folder (transformers, "
                        "vLLM, SGLang), with --hf-arch")
    o.add_argument("--hf-arch", choices=HF_ARCHS,
                   help="Hugging Face MoE architecture for --format hf: mixtral (topK-then-softmax only), "
                        "qwen2_moe (either router, shared expert, q/k/v biases), qwen3_moe (qk-norm models)")
    o.add_argument("--target-engine", choices=ENGINES,
                   help="refuse an --format hf export this serving engine would compute differently from our model "
                        "(vllm: every export is exact; llama.cpp: fixed top-k renormalisation per architecture, "
                        "no Qwen3-MoE dense layers; sglang: no Qwen2-MoE dense layers)")
    o.add_argument("--max-shard-size", default=None,
                   help="largest safetensors shard for --format hf, e.g. 5GB (default), 500MB, 2GiB")
    o.add_argument("--input-format", choices=INPUT_FORMATS, default="auto", help="default: detected")
    o.add_argument("--no-pack", dest="pack", action="store_false",
                   help="write the .nemo as a directory instead of a tar")
    o.add_argument("--model-config", type=Path,
                   help="YAML with NeMo model_config fields, for Megatron checkpoints: needed without saved args "
                        "or run_config.yaml, and used instead of them when given (refused for other inputs)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing output")
    o.add_argument("--dry-run", action="store_true", help="print the plan (tensors, shapes, sizes); write nothing")
    o.add_argument("--verify", nargs="?", const=0, type=int, metavar="LAYERS",
                   help="after writing, run input and output through the reference model (all layers, or the "
                        "first LAYERS) on held-out text: loss gap, top-1 agreement, greedy continuations; fail "
                        "(exit 1, naming the cause) above --verify-threshold; check the recipe identity per layer "
                        "and hash every expert tensor against the recipe (written to OUTPUT.checksums.json)")
    o.add_argument("--verify-data", type=Path, metavar="TEXT_FILE",
                   help="UTF-8 text --verify measures the function on (default: a bundled English sample)")
    o.add_argument("--verify-threshold", type=float, default=DEFAULT_THRESHOLD, metavar="FRACTION",
                   help="largest relative held-out loss gap --verify passes (default 0.001 = 0.1%%)")
    o.add_argument("--gguf-dtype", choices=GGUF_DTYPES, default="bfloat16",
                   help="what a GGUF input's (quantised) tensors are dequantised to (default bfloat16)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    write = WriteOptions(args.output_format, args.overwrite, args.pack, args.hf_arch, args.max_shard_size,
                         args.target_engine)
    verify = None if args.verify is None else VerifyOptions(args.verify, threshold=args.verify_threshold)
    read = ReadOptions(args.input_format, gguf_dtype=getattr(torch, args.gguf_dtype))
    check_options(read, write, verify)  # a bad option is named before the model config file is read
    text = read_verify_text(args.verify_data)  # a wrong path is named even without --verify
    verify = None if verify is None else replace(verify, text=text)
    read = replace(read, model_config=load_model_config(args.model_config))
    if args.dry_run:
        check_output_path(Path(args.output), write.overwrite, args.input)  # what the real run would refuse
        with open_checkpoint(args.input, read) as reader:
            plan = plan_conversion(reader, recipe, str(args.input))
            make_writer(args.output, write).check(plan.moe)
        rows = [[n, "x".join(map(str, t.shape)), str(t.dtype).replace("torch.", ""), f"{t.nbytes / 1e6:.2f}"]
                for n, t in plan.outputs.items()]
        print(markdown_table(["tensor", "shape", "dtype", "MB"], rows))
        print(f"\n{len(rows)} tensors, {human_count(Plan.params(plan.outputs))} parameters, "
              f"{plan.bytes_out / 1e9:.3f} GB to write as {write.format} to {args.output}")
        return 0
    summary = convert(args.input, args.output, recipe, read=read, write=write, verify=verify,
                      progress=not args.quiet)
    print(summary.table())
    if summary.verify and str(summary.verify.get("status", "")).startswith("FAILED"):
        print(f"error: verification {summary.verify['status']}")
        return 1
    return 0
