"""MMLU through lm-eval on the fixture (5 subjects, 4 categories, 34 test questions), in both file layouts:
scores of models whose answers we know, lm-eval's prompt format and aggregates, the results table, and errors."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from nemo_upcycle.data.tokenizers import ByteTokenizer
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.eval.mmlu_data import read_mmlu
from nemo_upcycle.eval.results import results_table, write_results
from nemo_upcycle.eval.runner import evaluate_models
from tests.conftest import random_model, small_config

TOK = ByteTokenizer()
HENDRYCKS = Path(__file__).parents[2] / "nemo_upcycle" / "demo_data" / "mmlu_sample"
# lm-eval's categories for the fixture's subjects (lm_eval/tasks/mmlu/default/mmlu_<subject>.yaml, `tag`)
CATEGORY = {"abstract_algebra": "stem", "college_physics": "stem", "philosophy": "humanities",
            "sociology": "social_sciences", "marketing": "other"}
LETTERS = "ABCD"
SPLITS = ("dev", "test")


def fixture_questions(split: str) -> dict[str, pd.DataFrame]:
    """The fixture CSVs read with pandas, as Hendrycks' own code reads them."""
    return {s: pd.read_csv(HENDRYCKS / "data" / split / f"{s}_{split}.csv", header=None, dtype=str,
                           keep_default_na=False, names=["question", "A", "B", "C", "D", "answer"])
            for s in CATEGORY}


TEST, DEV = fixture_questions("test"), fixture_questions("dev")


# ---- the same questions in the other layouts ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    """The fixture as cais/mmlu ships it: <subject>/<split>-00000-of-00001.parquet, and all/<split>-...parquet."""
    per_subject, everything = tmp_path_factory.mktemp("cais_mmlu"), tmp_path_factory.mktemp("cais_mmlu_all")
    for split, hf_split in (("dev", "dev"), ("val", "validation"), ("test", "test")):
        frames = []
        for subject, df in fixture_questions(split).items():
            frame = pd.DataFrame({"question": df.question, "subject": subject,
                                  "choices": df[list(LETTERS)].values.tolist(), "answer": df.answer.map(LETTERS.index)})
            (per_subject / subject).mkdir(exist_ok=True)
            frame.to_parquet(per_subject / subject / f"{hf_split}-00000-of-00001.parquet", index=False)
            frames.append(frame)
        (everything / "all").mkdir(exist_ok=True)
        pd.concat(frames).to_parquet(everything / "all" / f"{hf_split}-00000-of-00001.parquet", index=False)
    return {"subjects": per_subject, "all": everything}


@pytest.fixture(scope="module")
def hendrycks_tar(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tar") / "data.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(HENDRYCKS / "data", arcname="data")
    return path


# ---- models whose answers we know -----------------------------------------------------------------------------------
class Uniform(torch.nn.Module):
    """Equal logits everywhere: every letter ties and lm-eval's argmax picks the first, "A"."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*tokens.shape, TOK.vocab_size))


class Oracle(Uniform):
    """After "Answer: " puts its mass on the letter of the question just above, looked up in the fixture."""

    def __init__(self):
        super().__init__()
        frames = [*TEST.values(), *DEV.values()]
        self.answers = {q.strip(): a for df in frames for q, a in zip(df.question, df.answer)}

    def forward(self, tokens: torch.Tensor) -> SimpleNamespace:
        logits = super().forward(tokens).logits
        for row, ids in enumerate(tokens.tolist()):
            text = bytes(t for t in ids if t < 256)  # right padding (end-of-document) is past the text
            for match in re.finditer(rb"\nAnswer: ", text):
                block = text[: match.start()].rsplit(b"\n\n", 1)[-1]  # this question and its choices
                question = block.rsplit(b"\nA. ", 1)[0].decode()
                logits[row, match.end() - 1, ord(self.answers[question])] = 10.0
        return SimpleNamespace(logits=logits)


def evaluate(model: torch.nn.Module, data_dir: Path, tasks=("mmlu",), **kwargs) -> dict:
    return evaluate_models({"model": (model, TOK)}, tasks, data_dir=data_dir, max_length=2048, **kwargs)["model"]


def accuracies(result: dict) -> dict[str, float]:
    return {task: entry["acc,none"] for task, entry in result["results"].items()}


# ---- reading --------------------------------------------------------------------------------------------------------
def test_every_layout_reads_the_same_questions(hf_folders, hendrycks_tar, tmp_path):
    reference = read_mmlu(HENDRYCKS, tmp_path)
    assert sorted(reference) == sorted(CATEGORY)
    philosophy = reference["philosophy"]["test"][5]
    assert philosophy["question"] == TEST["philosophy"].question[5] and "\n" in philosophy["question"]
    assert philosophy["choices"] == ["false", "true", "valid", "unverifiable"] and philosophy["answer"] == 0
    assert [len(reference[s]["test"]) for s in CATEGORY] == [len(TEST[s]) for s in CATEGORY]
    for source in (HENDRYCKS / "data", hendrycks_tar, hf_folders["subjects"], hf_folders["all"]):
        assert read_mmlu(source, tmp_path / "scratch") == reference, source


# ---- scores ---------------------------------------------------------------------------------------------------------
def test_uniform_model_scores_its_share_of_a_answers_with_lm_evals_aggregates():
    acc = accuracies(evaluate(Uniform(), HENDRYCKS))
    n_a = {s: int((df.answer == "A").sum()) for s, df in TEST.items()}
    n = {s: len(df) for s, df in TEST.items()}
    for subject in CATEGORY:
        assert acc[f"mmlu_{subject}"] == n_a[subject] / n[subject]
    for category in set(CATEGORY.values()):  # micro averages: over questions, not over subjects
        members = [s for s, c in CATEGORY.items() if c == category]
        assert acc[f"mmlu_{category}"] == pytest.approx(sum(n_a[s] for s in members) / sum(n[s] for s in members))
    assert acc["mmlu"] == pytest.approx(11 / 34) == pytest.approx(sum(n_a.values()) / sum(n.values()))
    assert acc["mmlu_stem"] != pytest.approx((acc["mmlu_abstract_algebra"] + acc["mmlu_college_physics"]) / 2)


def test_model_that_knows_the_answers_scores_100_percent(hf_folders):
    acc = accuracies(evaluate(Oracle(), hf_folders["subjects"]))
    assert len(acc) == len(CATEGORY) + 4 + 1 and set(acc.values()) == {1.0}


def test_prompts_are_lm_evals_5_shot_mmlu_format():
    result = evaluate(Uniform(), HENDRYCKS, tasks=["mmlu_philosophy", "mmlu_sociology"], log_samples=True)

    def block(df: pd.DataFrame, i: int) -> str:
        q = df.iloc[i]
        return f"{q.question.strip()}\nA. {q.A}\nB. {q.B}\nC. {q.C}\nD. {q.D}\nAnswer:"

    for subject, index in (("philosophy", 5), ("philosophy", 6), ("sociology", 0)):
        expected = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                    + "".join(f"{block(DEV[subject], i)} {DEV[subject].answer[i]}\n\n" for i in range(5))
                    + block(TEST[subject], index))
        sample = next(s for s in result["samples"][f"mmlu_{subject}"] if s["doc_id"] == index)
        assert [tuple(a) for a in sample["arguments"]] == [(expected, f" {letter}") for letter in LETTERS]


def test_both_layouts_give_identical_results(hf_folders, hendrycks_tar):
    model = random_model(small_config(vocab_size=TOK.vocab_size), scale=0.5)
    from_csv = evaluate(model, hendrycks_tar, log_samples=True)
    from_parquet = evaluate(model, hf_folders["all"], log_samples=True)
    assert accuracies(from_csv) == accuracies(from_parquet)
    assert len(set(accuracies(from_csv).values())) > 2  # a model that does not answer everything alike
    for task, samples in from_csv["samples"].items():
        assert [s["resps"] for s in samples] == [s["resps"] for s in from_parquet["samples"][task]]


def test_limit_and_a_selection_of_tasks():
    result = evaluate(Uniform(), HENDRYCKS, tasks=["mmlu_stem", "mmlu_philosophy"], limit=2)
    acc = accuracies(result)
    assert set(acc) == {"mmlu_stem", "mmlu_abstract_algebra", "mmlu_college_physics", "mmlu_philosophy"}
    scored = {task: n["effective"] for task, n in result["n-samples"].items()}
    assert scored == dict.fromkeys(set(acc) - {"mmlu_stem"}, 2)
    assert acc["mmlu_philosophy"] == (TEST["philosophy"].answer[:2] == "A").mean()


def test_outside_a_git_repository_git_prints_nothing(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # lm-eval asks git for the working directory's commit
    result = evaluate(Uniform(), HENDRYCKS, tasks=["mmlu_philosophy"], limit=1)
    assert "not a git repository" not in capfd.readouterr().err
    assert result["git_hash"] is None
    monkeypatch.chdir(Path(__file__).parent)  # inside this repository (a clone has .git): its commit, as lm-eval
    if subprocess.run(["git", "rev-parse"], capture_output=True).returncode == 0:
        expected = subprocess.check_output(["git", "describe", "--always"], text=True).strip()
        assert evaluate(Uniform(), HENDRYCKS, tasks=["mmlu_philosophy"], limit=1)["git_hash"] == expected


def test_models_side_by_side_in_one_table_and_lm_eval_json_on_disk(tmp_path):
    results = evaluate_models({"oracle": (Oracle(), TOK), "uniform": (Uniform(), TOK)}, ["mmlu"],
                              data_dir=HENDRYCKS, max_length=2048)
    table = results_table(results)
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["task", "metric", "n", "oracle", "uniform"]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert rows["mmlu"] == ["mmlu", "acc", "34", "1.0000", f"{11 / 34:.4f}"]
    assert rows["mmlu_humanities"][2:] == ["7", "1.0000", f"{3 / 7:.4f}"]
    assert [line.split("|")[1].strip() for line in lines[2:5]] == ["mmlu", "mmlu_stem", "mmlu_abstract_algebra"]
    assert len(rows) == 1 + 4 + len(CATEGORY)
    write_results(results, tmp_path)
    saved = json.loads((tmp_path / "uniform" / "results.json").read_text())
    assert saved["results"]["mmlu"]["acc,none"] == pytest.approx(11 / 34)
    assert (tmp_path / "results.md").read_text() == table + "\n"


# ---- bad input ------------------------------------------------------------------------------------------------------
def make_tar(path: Path, member: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as tar:
        tar.addfile(member, io.BytesIO(b"x") if member.isfile() else None)
    return path


@pytest.mark.parametrize("member", [
    tarfile.TarInfo("/etc/evil.csv"), tarfile.TarInfo("data/../../evil.csv"),
    SimpleNamespace(name="data/test/link_test.csv", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
])
def test_unsafe_archives_are_refused(tmp_path, member):
    if isinstance(member, SimpleNamespace):
        info = tarfile.TarInfo(member.name)
        info.type, info.linkname = member.type, member.linkname
        member = info
    else:
        member.size = 1
    archive = make_tar(tmp_path / "evil.tar", member)
    with pytest.raises(UpcycleError, match="refusing to extract"):
        read_mmlu(archive, tmp_path / "out")
    assert not (tmp_path / "evil.csv").exists() and not list((tmp_path / "out").rglob("*"))


def copy_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "mmlu"
    for path in (HENDRYCKS / "data").rglob("*.csv"):
        target = root / "data" / path.relative_to(HENDRYCKS / "data")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    return root


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "data/dev/sociology_dev.csv").unlink(), "subject 'sociology' has no dev questions"),
    (lambda root: [(root / "data" / split / f"cooking_{split}.csv").write_text("q,a,b,c,d,A\n") for split in SPLITS],
     "subject\\(s\\) cooking that lm-eval's MMLU task does not know"),
    (lambda root: (root / "data/test/marketing_test.csv").write_text("q,a,b,c,d,E\n"), "marketing_test.csv row 1"),
    (lambda root: (root / "data/test/marketing_test.csv").write_text("q,a,b,c,d,\n"), "marketing_test.csv row 1"),
    (lambda root: (root / "data/test/marketing_test.csv").write_text("q,a,b,c,d,AB\n"), "marketing_test.csv row 1"),
    (lambda root: [p.unlink() for p in root.rglob("*.csv")], "no MMLU files"),
])
def test_damaged_data_is_a_one_line_error(tmp_path, damage, message):
    root = copy_fixture(tmp_path)
    damage(root)
    with pytest.raises(UpcycleError, match=message) as err:
        evaluate_models({}, ["mmlu"], data_dir=root)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tasks, data_dir, message", [
    (["mmlu"], None, "pass data_dir="),
    (["mmlu"], "/no/such/folder", "does not exist"),
    (["mmlu_anatomy"], HENDRYCKS, "mmlu_anatomy have no subject among the 5 in"),
])
def test_missing_data_is_a_one_line_error(tasks, data_dir, message):
    with pytest.raises(UpcycleError, match=message):
        evaluate_models({}, tasks, data_dir=data_dir)


def test_more_shots_than_dev_questions_is_a_one_line_error():
    with pytest.raises(UpcycleError, match="num_fewshot=6 is more than the 5 dev questions of the smallest subject"):
        evaluate_models({}, ["mmlu"], data_dir=HENDRYCKS, num_fewshot=6)


def test_unknown_task_is_a_one_line_error():
    with pytest.raises(UpcycleError, match="unknown task.*no_such_task"):
        evaluate_models({}, ["mmlu", "no_such_task"], data_dir=HENDRYCKS)


def test_builtin_task_without_cached_dataset_names_the_cache(tmp_path):
    """Other lm-eval tasks pass through; offline, a dataset missing from the cache is a clear error."""
    code = ("import torch; from nemo_upcycle.data.tokenizers import ByteTokenizer; "
            "from nemo_upcycle.eval.runner import evaluate_models; "
            "evaluate_models({'m': (torch.nn.Linear(1, 1), ByteTokenizer())}, ['arc_easy'], max_length=512)")
    # (the model is never called: building the task fails first)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode != 0
    assert f"not in the Hugging Face cache ({tmp_path / 'hf_home'}" in proc.stderr.splitlines()[-1]
