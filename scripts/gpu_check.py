"""The GPU check: everything nemo-upcycle claims for GPUs, measured on one GPU in under 8 minutes.

  1. environment: torch, CUDA device, megatron-core, Transformer Engine
  2. build a ~1B-parameter dense Nemotron (squared ReLU, layernorm1p, RoPE 0.5, GQA) with random bf16 weights
  3. upcycle it in memory (E8G1T2, E8G8T8) and through the converter (.nemo written and read back), and check
     both give identical tensors
  4. reference model vs Megatron-core GPTModel (TE spec with grouped GEMM when TE is there, else the local spec):
     logits on the GPU in bf16 for the dense model and both MoEs
  5. forward + backward steps for dense, E8G1T2 and E8G8T8 with both backends: tokens/s, model FLOPs
     utilisation (6 x active parameters + attention, against the GPU's dense bf16 peak), peak memory
  6. FP8 (Transformer Engine recipes), when TE is installed

Without a GPU it runs steps 1-3 at a reduced size and stops at the first GPU-only step, saying so.
Run it through scripts/gpu_check.sh on a bare machine (installs the wheels prepared beside it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def log(msg: str) -> None:
    print(msg, flush=True)


def environment() -> dict:
    from nemo_upcycle.models.megatron import have_transformer_engine

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "te": have_transformer_engine()}
    try:
        import megatron.core

        info["megatron-core"] = megatron.core.__version__
    except ImportError:
        info["megatron-core"] = None
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name()
    for k, v in info.items():
        log(f"  {k}: {v}")
    return info


def dense_config(scale: str):
    from nemo_upcycle.models import GPTConfig

    if scale == "1b":  # 20 layers x (10.5M attention + 33.6M MLP) + 2 x 67M embeddings = 1.02B parameters
        return GPTConfig(num_layers=20, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=16,
                         num_query_groups=4, vocab_size=32768, seq_length=2048, rotary_percentage=0.5,
                         init_method_std=0.0134)
    return GPTConfig(num_layers=2, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                     vocab_size=512, seq_length=128, rotary_percentage=0.5)


def upcycle_both_ways(dense_cfg, workdir: Path) -> dict:
    """In memory and through the converter; returns {recipe: (moe_cfg, state)} after checking they agree."""
    from nemo_upcycle.checkpoint import WriteOptions, open_checkpoint
    from nemo_upcycle.checkpoint.nemo import NemoWriter
    from nemo_upcycle.checkpoint.memory import InMemoryCheckpoint
    from nemo_upcycle.convert import convert
    from nemo_upcycle.models.manifest import expected_shapes
    from nemo_upcycle.models.keys import stack_experts
    from nemo_upcycle.recipe import UpcycleConfig, upcycle_state_dict

    gen = torch.Generator().manual_seed(0)
    dense = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in expected_shapes(dense_cfg).items()}
    for k in dense:
        if k.endswith("layernorm.weight"):
            dense[k].zero_()  # layernorm1p: gamma - 1
    ckpt = InMemoryCheckpoint(dense_cfg, dense, {"tokenizer": None})
    src = workdir / "dense.nemo"
    start = time.perf_counter()
    NemoWriter(src, overwrite=True).write(dense_cfg, ckpt.tensors(), lambda n: dense[n], ckpt.meta())
    log(f"  wrote dense .nemo: {src.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")
    out = {"dense": (dense_cfg, dense)}
    for name in ("E8G1T2", "E8G8T8"):
        recipe = UpcycleConfig.from_shorthand(name)
        moe_cfg, in_memory = upcycle_state_dict(dense, dense_cfg, recipe)
        in_memory = stack_experts(in_memory)
        s = convert(src, workdir / f"{name}.nemo", recipe, write=WriteOptions(overwrite=True), progress=False)
        with open_checkpoint(workdir / f"{name}.nemo") as r:
            written = r.state_dict()
        same = written.keys() == in_memory.keys() and all(torch.equal(written[k], in_memory[k]) for k in written)
        log(f"  {name}: converter {s.plan.bytes_out / 1e9:.2f} GB in {s.seconds:.1f} s "
            f"({s.plan.bytes_out / 1e9 / s.seconds:.2f} GB/s, peak RSS {s.peak_rss_bytes / 1e9:.2f} GB); "
            f"identical to in-memory upcycling: {same}")
        if not same:
            raise SystemExit("FAILED: converter output differs from in-memory upcycling")
        out[name] = (moe_cfg, in_memory)
        (workdir / f"{name}.nemo").unlink()
    src.unlink()
    return out


def parity(models: dict, use_te: bool, grouped: bool) -> None:
    from nemo_upcycle.models.keys import unstack_experts
    from nemo_upcycle.models.megatron import build_megatron_gpt, load_reference_weights, megatron_forward
    from nemo_upcycle.models.reference import GPTModel

    tokens = torch.randint(0, 32768, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for name, (cfg, state) in models.items():
        ref = GPTModel(cfg).to("cuda", torch.bfloat16).eval()
        ref.load_state_dict(unstack_experts(state))
        mg = build_megatron_gpt(cfg, use_te=use_te, grouped_gemm=grouped, bf16=True, params_dtype=torch.bfloat16)
        load_reference_weights(mg, unstack_experts(state), cfg)
        mg.cuda().eval()
        with torch.no_grad():
            a, b = ref(tokens).logits.float(), megatron_forward(mg, tokens).float()
        rel = ((a - b).abs().max() / a.abs().max()).item()
        ok = rel < 5e-2
        log(f"  {name}: reference vs megatron ({'TE' if use_te else 'local'} spec) max |diff| / max |logit| "
            f"= {rel:.2e} {'ok' if ok else 'FAILED'}")
        del ref, mg
        torch.cuda.empty_cache()


def throughput(models: dict, use_te: bool, grouped: bool, steps: int, batch: int, seq: int, fp8: bool = False) -> list:
    from nemo_upcycle.models.backends import MegatronBackend, TorchBackend

    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), 989.0) * 1e12
    rows = []
    tokens = torch.randint(0, 32768, (batch, seq + 1), device="cuda")
    for name, (cfg, state) in models.items():
        for backend in ("torch", "megatron"):
            if fp8 and backend == "torch":
                continue
            torch.cuda.reset_peak_memory_stats()
            if backend == "torch":
                model = TorchBackend(cfg)
                model.load_canonical_state_dict(state)
            else:
                extra = dict(fp8="hybrid", fp8_recipe="delayed") if fp8 else {}
                model = MegatronBackend(cfg, use_te=use_te, grouped_gemm=grouped, bf16=True,
                                        params_dtype=torch.bfloat16, **extra)
                model.load_canonical_state_dict(state)
            model = model.to("cuda", torch.bfloat16).train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-6)
            ctx = _fp8_context() if fp8 else torch.autocast("cuda", enabled=False)

            for _ in range(2):
                _train_step(model, opt, tokens, ctx)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                _train_step(model, opt, tokens, ctx)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / steps
            tok_s = batch * seq / seconds
            # model FLOPs per token: 6 x active parameters (non-embedding + output layer) + causal attention
            attn = 6 * cfg.num_layers * seq * cfg.num_attention_heads * cfg.head_dim
            flops = 6 * (cfg.num_parameters(active=True) - cfg.vocab_size * cfg.hidden_size) + attn
            mfu = flops * tok_s / peak
            mem = torch.cuda.max_memory_allocated() / 2**30
            label = f"{backend}{' fp8' if fp8 else ''}"
            rows.append([name, label, f"{tok_s:,.0f}", f"{100 * mfu:.1f}%", f"{mem:.1f}"])
            log(f"  {name:7s} {label:13s} {tok_s:12,.0f} tokens/s   MFU {100 * mfu:5.1f}%   peak memory {mem:6.1f} GiB")
            del model, opt
            torch.cuda.empty_cache()
    return rows


def _train_step(model, opt, tokens: torch.Tensor, ctx) -> None:
    from nemo_upcycle.models.reference import lm_loss

    opt.zero_grad(set_to_none=True)
    with ctx:
        out = model(tokens[:, :-1])
        loss = lm_loss(out.logits, tokens[:, 1:]) + out.objective
    loss.backward()
    opt.step()


def _fp8_context():
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling, Format

    return te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling(fp8_format=Format.HYBRID))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/nemo_upcycle_gpu_check"))
    p.add_argument("--steps", type=int, default=5, help="timed training steps per model and backend")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    args = p.parse_args()
    start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)

    from nemo_upcycle.report import human_count, markdown_table

    log("[1/6] environment")
    env = environment()
    gpu = env["cuda"]
    log(f"[2/6] dense Nemotron ({'~1B parameters' if gpu else 'reduced size: no GPU'})")
    cfg = dense_config("1b" if gpu else "tiny")
    log(f"  {human_count(cfg.num_parameters())} parameters")
    log("[3/6] upcycle in memory and through the converter")
    models = upcycle_both_ways(cfg, args.workdir)
    if not gpu:
        log("[4/6] STOP: no CUDA device here; the remaining steps (Megatron parity on the GPU, throughput, "
            "MFU, FP8) need a GPU. Everything up to here passed.")
        return 0
    use_te, grouped = env["te"], env["te"]
    log(f"[4/6] logit parity, bf16 ({'TE spec, grouped GEMM' if use_te else 'local spec: no Transformer Engine'})")
    parity(models, use_te, grouped)
    log(f"[5/6] training throughput: {args.batch} x {args.seq} tokens per step, {args.steps} timed steps")
    rows = throughput(models, use_te, grouped, args.steps, args.batch, args.seq)
    log("[6/6] FP8")
    if use_te:
        rows += throughput({k: v for k, v in models.items() if k != "dense"}, True, True, args.steps, args.batch,
                           args.seq, fp8=True)
    else:
        log("  skipped: Transformer Engine is not installed (FP8 needs its recipes)")
    log("\n" + markdown_table(["model", "backend", "tokens/s", "MFU", "peak GiB"], rows))
    log(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
