"""Training-step time and peak memory through Megatron-core's engine (Megatron DDP, get_megatron_optimizer,
get_forward_backward_func): a dense GPT vs its E8G1T2 and E8G8T8 upcycles, side by side, each in its own
process. On a GPU it also prints MFU (model FLOPs utilisation, bf16 dense peak of the device).

    python benchmarks/train_step.py                       # CPU: small model, fp32
    python benchmarks/train_step.py --hidden 2048 --layers 16 --seq 2048 --batch 8    # on a GPU

Target (the paper's claim, arXiv 2410.07524): an upcycled MoE with the same active parameters trains at close to
the dense model's step time; E8G1T2 doubles the active MLP (top-2 of full-size experts), E8G8T8 keeps it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

LAYOUTS = ("dense", "E8G1T2", "E8G8T8")
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def measure(args) -> dict:
    """One layout, in this process: median step time over args.steps after warm-up, peak memory, FLOPs/step."""
    import torch

    from nemo_upcycle.compat import init_megatron
    from nemo_upcycle.models.backends import MegatronBackend
    from nemo_upcycle.models.config import GPTConfig
    from nemo_upcycle.recipe import UpcycleConfig
    from nemo_upcycle.recipe.state_dict import moe_config
    from nemo_upcycle.train.parallel import MegatronEngine, ParallelLayout

    init_megatron()
    cfg = GPTConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
                    num_attention_heads=max(args.hidden // 64, 1), num_query_groups=max(args.hidden // 256, 1),
                    vocab_size=args.vocab, seq_length=args.seq, activation="squared-relu", normalization="layernorm1p")
    if args.layout != "dense":
        cfg = moe_config(cfg, UpcycleConfig.from_shorthand(args.layout))
    gpu = torch.cuda.is_available()
    backend = MegatronBackend(cfg, bf16=gpu, params_dtype=torch.bfloat16 if gpu else torch.float32)
    if gpu:
        backend.cuda()
    engine = MegatronEngine(backend, ParallelLayout(overlap_grad_reduce=gpu), clip_grad=1.0)
    engine.build_optimizer({"name": "adamw", "lr": 1e-4, "weight_decay": 0.1, "betas": (0.9, 0.95)})
    device = "cuda" if gpu else "cpu"
    data = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_length + 1), device=device)
    batch = {"tokens": data[:, :-1], "labels": data[:, 1:]}
    times = []
    for i in range(args.warmup + args.steps):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.run(batch, args.micro_batch, forward_only=False)
        engine.optimizer.step()
        if gpu:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    active_mlp = cfg.ffn_hidden_size if not cfg.is_moe else cfg.moe_ffn_hidden_size * cfg.moe_router_topk
    mlp = (3 if backend.chunks[0].config.gated_linear_unit else 2) * cfg.hidden_size * active_mlp
    attention = cfg.hidden_size * (cfg.num_attention_heads + 2 * cfg.num_groups) * cfg.head_dim \
        + cfg.num_attention_heads * cfg.head_dim * cfg.hidden_size
    tokens = args.batch * cfg.seq_length
    flops = 6 * tokens * (cfg.num_layers * (mlp + attention) + cfg.hidden_size * cfg.vocab_size) \
        + 12 * cfg.num_layers * tokens * cfg.seq_length * cfg.num_attention_heads * cfg.head_dim / 2  # causal
    device_name = torch.cuda.get_device_name() if gpu else "cpu"
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)
    return {"layout": args.layout, "step_s": step, "peak_bytes": peak, "flops": flops, "device": device_name,
            "mfu": flops / step / peak_flops if peak_flops else None,
            "params": sum(p.numel() for p in backend.parameters())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="transformer layers")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (FFN 4x, heads of 64)")
    p.add_argument("--seq", type=int, default=256, help="sequence length")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--micro-batch", type=int, default=4, help="micro-batch size")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)  # internal: measure one, print JSON
    args = p.parse_args()
    if args.layout:
        print(json.dumps(measure(args)))
        return 0
    from nemo_upcycle.report import markdown_table

    rows, base = [], None
    for layout in LAYOUTS:
        cmd = [sys.executable, __file__, "--layout", layout] + [
            a for k, v in vars(args).items() if k != "layout" for a in (f"--{k.replace('_', '-')}", str(v))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        base = base or r
        rows.append([layout, f"{r['params'] / 1e6:.2f} M", f"{r['step_s'] * 1e3:.1f} ms",
                     f"{r['step_s'] / base['step_s']:.2f}x", f"{r['peak_bytes'] / 2**20:.0f} MiB",
                     f"{r['peak_bytes'] / base['peak_bytes']:.2f}x",
                     "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"])
    print(f"device: {base['device']}; {args.layers} layers, hidden {args.hidden}, seq {args.seq}, batch {args.batch} "
          f"(micro {args.micro_batch}); median of {args.steps} steps through Megatron-core's engine")
    print(markdown_table(["layout", "params", "step", "vs dense", "peak memory", "vs dense", "MFU"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
