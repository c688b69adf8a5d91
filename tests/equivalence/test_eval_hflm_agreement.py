"""`nemo-upcycle eval` on a .nemo agrees with lm-eval's own Hugging Face model (`lm_eval.simple_evaluate(model="hf")`)
on the same MoE exported with `--format hf`: per-request loglikelihoods within 1e-4 and identical accuracies, with a
tokenizer that prepends BOS, one that adds none, and the `--add-bos-token` override. The embedding is larger than
the tokenizer (as Qwen2's), so a cut of the logits to the tokenizer's size would show."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import pytest

from nemo_upcycle.checkpoint import WriteOptions
from nemo_upcycle.cli import main
from nemo_upcycle.convert import convert
from nemo_upcycle.eval.runner import task_manager
from nemo_upcycle.recipe import UpcycleConfig
from tests.hf_fixtures import save_dense, save_tokenizer

MMLU = Path(__file__).parents[2] / "nemo_upcycle" / "demo_data" / "mmlu_sample"
SHOTS = 1


def mmlu_text() -> list[str]:
    return [p.read_text() for p in sorted(MMLU.rglob("*.csv"))]


def loglikelihoods(samples: dict[str, list[dict]]) -> dict[tuple[str, int], list[float]]:
    """(task, doc id) -> the four choices' loglikelihoods, from lm-eval's logged samples."""
    return {(task, s["doc_id"]): [float(r[0]) for r in s["filtered_resps"]] for task, rows in samples.items()
            for s in rows}


@pytest.fixture(scope="module", params=[True, False], ids=["bos-tokenizer", "no-bos-tokenizer"])
def models(request, tmp_path_factory):
    """A dense Llama with a real BPE tokenizer, upcycled E4G2T2 (softmax-then-topK, random router) into a Hugging
    Face Qwen2-MoE folder and into a .nemo; the source folder is gone before anything is evaluated."""
    root = tmp_path_factory.mktemp("agree")
    src = root / "dense"
    size = save_tokenizer(src, mmlu_text(), adds_bos=request.param)
    save_dense(src, "llama", vocab_size=size + 48, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
               scale=0.2)
    recipe = UpcycleConfig.from_shorthand("E4G2T2", router_init="virtual_group", router_init_std=0.5)
    convert(src, root / "moe_hf", recipe, write=WriteOptions("hf", hf_arch="qwen2_moe"), progress=False)
    convert(src, root / "moe.nemo", recipe, progress=False)
    src.rename(root / "moved_away")
    return root, request.param


def ours(root: Path, out: Path, *flags: str) -> dict:
    assert main(["eval", str(root / "moe.nemo"), "--data-dir", str(MMLU), "--num-fewshot", str(SHOTS),
                 "--log-samples", "--batch-size", "4", "--output-dir", str(out), *flags]) == 0
    folder = next(p for p in out.iterdir() if p.is_dir())
    result = json.loads((folder / "results.json").read_text())
    result["samples"] = {p.name[len("samples_"):-len(".jsonl")]: [json.loads(l) for l in p.read_text().splitlines()]
                         for p in folder.glob("samples_*.jsonl")}
    return result


def lm_evals_hf(root: Path, **model_args) -> dict:
    with task_manager(["mmlu"], MMLU, SHOTS) as manager:
        return lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(root / "moe_hf"), "dtype": "float32",
                                                               "device": "cpu", **model_args},
                                       tasks=["mmlu"], num_fewshot=SHOTS, batch_size=4, task_manager=manager,
                                       log_samples=True)


def assert_agree(mine: dict, theirs: dict) -> None:
    a, b = loglikelihoods(mine["samples"]), loglikelihoods(theirs["samples"])
    assert a.keys() == b.keys() and len(a) == 34
    worst = max(abs(x - y) for key in a for x, y in zip(a[key], b[key], strict=True))
    assert worst < 1e-4, worst
    accuracy = {t: r["acc,none"] for t, r in mine["results"].items()}
    assert accuracy == {t: r["acc,none"] for t, r in theirs["results"].items()}


def test_default_bos_handling_agrees_with_lm_evals_hf_model(models, tmp_path):
    root, adds_bos = models
    mine, theirs = ours(root, tmp_path / "default"), lm_evals_hf(root)
    assert_agree(mine, theirs)
    # the other BOS choice moves the scores far beyond the tolerance: the comparison above can tell them apart
    flipped = ours(root, tmp_path / "flipped", "--no-add-bos-token" if adds_bos else "--add-bos-token")
    a, b = loglikelihoods(flipped["samples"]), loglikelihoods(theirs["samples"])
    assert sum(abs(a[k][0] - b[k][0]) for k in a) / len(a) > 1e-3


def test_add_bos_token_override_agrees_with_lm_evals_hf_model(models, tmp_path):
    root, _ = models
    assert_agree(ours(root, tmp_path / "bos", "--add-bos-token"), lm_evals_hf(root, add_bos_token=True))
