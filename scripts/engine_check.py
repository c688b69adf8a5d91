"""Do serving engines compute what we export? Two stages, run by scripts/engine_check.sh:

  make DIR   (the project's Python) small dense Llama / Qwen3 models saved by transformers, upcycled by our
             converter into every Hugging Face target we write; DIR/cases.json lists them.
  serve DIR  (the vLLM venv's Python) each export loaded by vLLM and by transformers; prompt logprobs and greedy
             tokens compared, and with the dense source where the recipe is exact (topK-then-softmax routing).
             Prints one table and writes DIR/engine_check.json.

Prompts are token ids (the random models have no tokenizer worth serving), vLLM runs in float32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PROMPTS = [[(7 * i + 3 * j) % 509 + 1 for j in range(24)] for i in range(4)]
GREEDY_TOKENS = 16
# Big enough for vLLM's CPU attention (head_dim 64), small enough to serve in seconds.
DENSE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, rms_norm_eps=1e-6)
# name -> (source family, layers, target, recipe options, exact vs the dense source)
CASES = {
    "mixtral": ("llama", 2, "mixtral", dict(router="topk_then_softmax"), True),
    "qwen2_moe": ("llama", 2, "qwen2_moe", dict(router="topk_then_softmax"), True),
    "qwen2_moe-shared": ("llama", 2, "qwen2_moe", dict(router="topk_then_softmax", shared_expert=True), True),
    "qwen2_moe-softmax_then_topk": ("llama", 2, "qwen2_moe", dict(router="softmax_then_topk"), False),
    "qwen2_moe-partial": ("llama", 3, "qwen2_moe", dict(router="topk_then_softmax", layers=(0, 2)), True),
    "qwen3_moe": ("qwen3", 2, "qwen3_moe", dict(router="topk_then_softmax"), True),
    "qwen3_moe-softmax_then_topk": ("qwen3", 2, "qwen3_moe", dict(router="softmax_then_topk"), False),
    "qwen3_moe-partial": ("qwen3", 3, "qwen3_moe", dict(router="topk_then_softmax", layers=(1,)), True),
}


def make(root: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_upcycle.checkpoint import WriteOptions
    from nemo_upcycle.convert import convert
    from nemo_upcycle.recipe import UpcycleConfig

    root.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, (family, layers, arch, options, exact) in CASES.items():
        dense = root / f"dense-{family}-{layers}"
        if not dense.exists():
            extra = {"head_dim": 64} if family == "qwen3" else {}
            cfg = AutoConfig.for_model(family, num_hidden_layers=layers, **DENSE, **extra)
            torch.manual_seed(layers)
            model = AutoModelForCausalLM.from_config(cfg).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            model.save_pretrained(dense)
        out = root / name
        if not out.exists():
            recipe = UpcycleConfig.from_shorthand("E4G2T2", router_init="virtual_group", router_init_std=0.5, **options)
            convert(dense, out, recipe, write=WriteOptions("hf", hf_arch=arch), progress=False)
        cases.append({"name": name, "folder": str(out), "dense": str(dense), "arch": arch, "exact": exact})
    (root / "cases.json").write_text(json.dumps(cases, indent=1))


def transformers_run(folder: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    out = {"class": type(model).__name__, "prompt_logprobs": [], "greedy": []}
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            logp = model(ids).logits.log_softmax(-1)[0]
            out["prompt_logprobs"].append([logp[i - 1, t].item() for i, t in enumerate(prompt) if i > 0])
            gen = model.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=0)
            out["greedy"].append(gen[0, len(prompt):].tolist())
    return out


def vllm_run(folder: str) -> dict:
    """One export served by vLLM in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so the model is reachable)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # on CPU, gpu_memory_utilization is the share of RAM reserved (the default 0.92 fails on a shared machine)
    llm = LLM(model=folder, dtype="float32", skip_tokenizer_init=True, enforce_eager=True, max_model_len=128,
              seed=0, gpu_memory_utilization=float(os.environ.get("ENGINE_CHECK_MEMORY_SHARE", "0.08")))
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, prompt_logprobs=0, detokenize=False)
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    out: dict = {"prompt_logprobs": [], "greedy": []}
    for prompt, res in zip(PROMPTS, results):
        out["prompt_logprobs"].append([res.prompt_logprobs[i][t].logprob for i, t in enumerate(prompt) if i > 0])
        out["greedy"].append(list(res.outputs[0].token_ids))
    out["router"] = llm.apply_model(_router_settings)[0]
    return out


def _router_settings(model) -> list:
    """What vLLM's MoE layers will compute: per layer, its MLP class and whether its router renormalises the
    top-k weights (read off the router object vLLM built; dense layers: None)."""
    layers = []
    for layer in model.model.layers:
        mlp = getattr(layer, "block_sparse_moe", None) or layer.mlp
        experts = getattr(mlp, "experts", None)
        holders = [experts, *vars(experts).values(), *getattr(experts, "_modules", {}).values()] if experts else []
        flags = [h.renormalize for h in holders if isinstance(getattr(h, "renormalize", None), bool)]
        layers.append([type(mlp).__name__, flags[0] if flags else None])
    return layers


def compare(a: dict, b: dict) -> tuple[float, float]:
    """Max |logprob difference| over all prompt positions, and the share of greedy tokens that agree."""
    diff = max(abs(x - y) for pa, pb in zip(a["prompt_logprobs"], b["prompt_logprobs"]) for x, y in zip(pa, pb))
    pairs = [(x, y) for ga, gb in zip(a["greedy"], b["greedy"]) for x, y in zip(ga, gb)]
    return diff, sum(x == y for x, y in pairs) / len(pairs)


def serve(root: Path) -> int:
    import vllm

    cases = json.loads((root / "cases.json").read_text())
    rows, failed = [], 0
    for case in cases:
        # each export in its own process: vLLM keeps global state (distributed init) per process
        got = subprocess.run([sys.executable, __file__, "vllm-one", case["folder"]], capture_output=True, text=True)
        if got.returncode != 0:
            print(f"{case['name']}: vLLM failed\n{got.stderr[-3000:]}", file=sys.stderr)
            rows.append({**case, "error": got.stderr.strip().splitlines()[-1:]})
            failed += 1
            continue
        engine = json.loads(got.stdout.strip().splitlines()[-1])
        hf = transformers_run(case["folder"])
        row = {**case, "class": hf["class"], "router": engine["router"]}
        row["vllm_vs_hf_logprob"], row["vllm_vs_hf_greedy"] = compare(engine, hf)
        if case["exact"]:
            row["vllm_vs_dense_logprob"], row["vllm_vs_dense_greedy"] = compare(engine, transformers_run(case["dense"]))
        ok = row["vllm_vs_hf_logprob"] < 1e-4 and row["vllm_vs_hf_greedy"] == 1.0 and (
            not case["exact"] or (row["vllm_vs_dense_logprob"] < 1e-4 and row["vllm_vs_dense_greedy"] == 1.0))
        row["ok"] = ok
        failed += not ok
        rows.append(row)
    (root / "engine_check.json").write_text(json.dumps({"vllm": vllm.__version__, "cases": rows}, indent=1))
    print(f"vLLM {vllm.__version__} (CPU, float32), {len(PROMPTS)} prompts x {len(PROMPTS[0])} tokens, "
          f"{GREEDY_TOKENS} greedy tokens each")
    print(f"{'export':30} {'class':22} {'vLLM-HF max|dlogp|':>19} {'greedy':>7} {'vLLM-dense':>11} {'greedy':>7}  ok")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:30} vLLM failed: {r['error']}")
            continue
        dense = (f"{r['vllm_vs_dense_logprob']:11.1e} {r['vllm_vs_dense_greedy']:7.0%}" if r["exact"]
                 else f"{'(inexact)':>11} {'':>7}")
        print(f"{r['name']:30} {r['class']:22} {r['vllm_vs_hf_logprob']:19.1e} {r['vllm_vs_hf_greedy']:7.0%} "
              f"{dense}  {'yes' if r['ok'] else 'NO'}")
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["make", "serve", "vllm-one"], help="make the exports, or serve and compare them")
    p.add_argument("path", type=Path, help="work directory (make, serve) or one export folder (vllm-one)")
    args = p.parse_args()
    if args.stage == "make":
        make(args.path)
        return 0
    if args.stage == "serve":
        return serve(args.path)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    print(json.dumps(vllm_run(str(args.path))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
