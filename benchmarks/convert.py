"""Converter speed and memory, side by side in one run, on a synthetic dense Nemotron-style checkpoint of about
1.2B parameters in bf16 that this script generates (torch_dist, as NeMo saves it):

  ours      `nemo-upcycle convert` to a packed .nemo (streamed layer by layer), once with the default calibrated
            router init (one extra forward pass of 384 calibration tokens through the dense layers, one at a
            time) and once with `--router-init virtual_group` (the paper's random rows: no extra pass)
  megatron  Megatron-core's own path: build dense and MoE GPTModels in memory, dist_checkpointing.load the
            dense weights, upcycling_utils.upcycle_state_dict, load_state_dict, dist_checkpointing.save
  copy      a plain copy of the same number of output bytes on the same disk (shutil.copyfile)

Each runs in its own process; peak RSS is that process's VmHWM. Targets: our throughput at least 0.5x the plain
copy's, and our peak RSS under 20% of Megatron's.

    python benchmarks/convert.py [--layers 24 --hidden 2048 --recipe E2G1T2 --workdir bench_out]

The default recipe is E2G1T2 because Megatron's in-memory path for E8 (a 6.7B-parameter MoE plus deep copies of
both state dicts) does not fit in a 24 GB machine; ours runs E8G8T8 at the same size with `--skip-megatron`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def bench_config(layers: int, hidden: int):
    from nemo_upcycle.models import GPTConfig

    return GPTConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden, num_attention_heads=16,
                     num_query_groups=4, vocab_size=32768, seq_length=4096, rotary_percentage=0.5,
                     init_method_std=0.0134)


def generate(path: Path, layers: int, hidden: int) -> None:
    """A dense .nemo directory with random bf16 weights, written tensor by tensor (never all in memory)."""
    import yaml

    from nemo_upcycle.checkpoint.base import TensorInfo
    from nemo_upcycle.checkpoint.layout import write_megatron_dist
    from nemo_upcycle.checkpoint.nemo import NEMO_PREFIX
    from nemo_upcycle.checkpoint.nemo_config import nemo_config_from_gpt
    from nemo_upcycle.models.manifest import expected_shapes

    cfg = bench_config(layers, hidden)
    tensors = {k: TensorInfo(s, torch.bfloat16) for k, s in expected_shapes(cfg).items()}
    gen = torch.Generator().manual_seed(0)

    def fetch(name: str) -> torch.Tensor:
        return (torch.randn(tensors[name].shape, generator=gen) * 0.02).to(torch.bfloat16)

    path.mkdir(parents=True)
    (path / "model_config.yaml").write_text(yaml.safe_dump(nemo_config_from_gpt(cfg)))
    write_megatron_dist(path / "model_weights", cfg, tensors, fetch, NEMO_PREFIX)


def run_ours(src: Path, out: Path, recipe: str, router_init: str) -> dict:
    from nemo_upcycle.convert import convert
    from nemo_upcycle.recipe import UpcycleConfig

    s = convert(src, out, UpcycleConfig.from_shorthand(recipe, router_init=router_init), progress=False)
    return {"seconds": s.seconds, "peak_rss": s.peak_rss_bytes, "bytes_out": out.stat().st_size,
            "params_out": s.plan.params(s.plan.outputs)}


def run_megatron(src: Path, out: Path, recipe: str) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    from nemo_upcycle.checkpoint import open_checkpoint
    from nemo_upcycle.compat import init_megatron
    from nemo_upcycle.convert import peak_rss_bytes
    from nemo_upcycle.models.megatron import build_megatron_gpt
    from nemo_upcycle.recipe import UpcycleConfig, moe_config

    init_megatron()
    start = time.perf_counter()
    with open_checkpoint(src) as reader:
        dense_cfg = reader.config
    moe_cfg = moe_config(dense_cfg, UpcycleConfig.from_shorthand(recipe))
    kw = dict(use_te=False, params_dtype=torch.bfloat16)
    dense = build_megatron_gpt(dense_cfg, **kw)
    loaded = dist_checkpointing.load(dense.sharded_state_dict(prefix="model."), str(src / "model_weights"))
    dense.load_state_dict({k[len("model."):]: v for k, v in loaded.items()}, strict=False)
    del loaded
    moe = build_megatron_gpt(moe_cfg, **kw)
    state = upcycle_state_dict([moe], [dense])["model"]
    moe.load_state_dict(state, strict=False)
    del state, dense
    out.mkdir(parents=True)
    dist_checkpointing.save(moe.sharded_state_dict(prefix="model."), str(out))
    return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes()}


def run_copy(src_file: Path, out: Path) -> dict:
    start = time.perf_counter()
    shutil.copyfile(src_file, out)
    os.sync()
    return {"seconds": time.perf_counter() - start}


def child(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    if args.part in ROUTER_INITS:
        out = work / "ours.nemo"
        shutil.rmtree(out, ignore_errors=True)
        out.unlink(missing_ok=True)
        result = run_ours(work / "dense", out, args.recipe, args.part)
    elif args.part == "megatron":
        result = run_megatron(work / "dense", work / "megatron_out", args.recipe)
    else:
        result = run_copy(work / "ours.nemo", work / "copy.bin")
    print("RESULT " + json.dumps(result))


ROUTER_INITS = ("calibrated", "virtual_group")  # the "ours" parts: default first


def run_part(part: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--part", part, "--workdir", args.workdir, "--recipe", args.recipe]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{part} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24, help="decoder layers of the synthetic dense model")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (ffn = 4x)")
    p.add_argument("--recipe", default="E2G1T2", help="upcycling recipe shorthand")
    p.add_argument("--workdir", default="bench_out/convert", help="scratch directory (deleted at the end)")
    p.add_argument("--skip-megatron", action="store_true", help="only ours and the plain copy")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--part", choices=[*ROUTER_INITS, "megatron", "copy"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:
        return child(args)

    from nemo_upcycle.report import human_count, markdown_table

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    print(f"generating a synthetic dense checkpoint ({args.layers} layers, hidden {args.hidden}, bf16) ...")
    generate(work / "dense", args.layers, args.hidden)
    dense_bytes = sum(f.stat().st_size for f in (work / "dense").rglob("*") if f.is_file())
    runs = {init: run_part(init, args) for init in ROUTER_INITS}
    ours = runs["calibrated"]
    copy = run_part("copy", args)
    rows = [[f"ours (nemo-upcycle convert, --router-init {init})", f"{r['seconds']:.1f}",
             f"{r['bytes_out'] / 1e9 / r['seconds']:.2f}", f"{r['peak_rss'] / 1e9:.2f}"] for init, r in runs.items()]
    rows.append(["plain copy of the output bytes", f"{copy['seconds']:.1f}",
                 f"{ours['bytes_out'] / 1e9 / copy['seconds']:.2f}", "-"])
    ratios = [f"throughput ours ({init}) / plain copy: {copy['seconds'] / r['seconds']:.2f}x (target >= 0.5x)"
              for init, r in runs.items()]
    if not args.skip_megatron:
        meg = run_part("megatron", args)
        rows.append(["Megatron upcycle_state_dict (in memory)", f"{meg['seconds']:.1f}",
                     f"{ours['bytes_out'] / 1e9 / meg['seconds']:.2f}", f"{meg['peak_rss'] / 1e9:.2f}"])
        ratios += [f"peak RSS ours ({init}) / Megatron: {r['peak_rss'] / meg['peak_rss']:.1%} (target < 20%)"
                   for init, r in runs.items()]
        ratios += [f"time ours ({init}) / Megatron: {r['seconds'] / meg['seconds']:.2f}x" for init, r in runs.items()]
    print(f"\ndense input: {dense_bytes / 1e9:.2f} GB; recipe {args.recipe}; output {human_count(ours['params_out'])} "
          f"parameters, {ours['bytes_out'] / 1e9:.2f} GB (.nemo tar); {os.cpu_count()} CPUs\n")
    print(markdown_table(["", "seconds", "GB/s (output bytes)", "peak RSS GB"], rows))
    print("\n" + "\n".join(ratios))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
