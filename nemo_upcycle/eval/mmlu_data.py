"""MMLU questions from local files, in either layout people download, read into one form.

Accepted (`--data-dir`):

    Hugging Face `cais/mmlu` snapshot   <dir>/<subject>/{dev,test}-00000-of-00001.parquet
                                        or <dir>/all/{dev,test}-00000-of-00001.parquet (every subject, `subject` column)
    Hendrycks' original data.tar        <dir>/data/{dev,test}/<subject>_{dev,test}.csv (or <dir> = that data folder),
                                        CSV without header: question, A, B, C, D, answer letter
    the .tar / .tar.gz of either        extracted safely: absolute paths, '..' and links are refused

Only the two splits lm-eval's MMLU task uses are read: test (scored) and dev (the few-shot examples). Each question
becomes a dict in the Hugging Face schema that lm-eval's MMLU template reads: question, subject, choices (4), answer
(0-3).
"""

from __future__ import annotations

import csv
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from nemo_upcycle.errors import UpcycleError

SPLITS = ("dev", "test")
LETTERS = "ABCD"
LAYOUTS_HELP = ("the cais/mmlu folder (<subject>/test-00000-of-00001.parquet or all/...) or Hendrycks' data.tar "
                "or its data folder (data/test/<subject>_test.csv)")

Docs = dict[str, dict[str, list[dict]]]  # subject -> split -> questions


def read_mmlu(path: str | Path, scratch: Path) -> Docs:
    """Every subject with both dev and test questions under `path` (a folder or a tarball; extracted into scratch)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UpcycleError(f"MMLU data {path} does not exist: pass --data-dir {LAYOUTS_HELP}")
    if path.is_file():
        path = extract_tar(path, scratch / "mmlu_extracted")
    for reader in (_read_hf_all, _read_hf_subjects, _read_hendrycks):
        docs = reader(path)
        if docs:
            return docs
    raise UpcycleError(f"no MMLU files in {path}: pass --data-dir {LAYOUTS_HELP}")


def extract_tar(archive: Path, dest: Path) -> Path:
    """Extract a tarball into dest, refusing any member that could land outside it or is not a plain file/folder."""
    if not tarfile.is_tarfile(archive):
        raise UpcycleError(f"{archive} is not a folder or a .tar/.tar.gz archive: pass --data-dir {LAYOUTS_HELP}")
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


# ---- files ----------------------------------------------------------------------------------------------------------
def _complete(docs: Docs, where: Path) -> Docs:
    for subject, splits in docs.items():
        for split in SPLITS:
            if not splits.get(split):
                raise UpcycleError(f"MMLU subject '{subject}' has no {split} questions in {where}: every subject "
                                   f"needs a test split and a dev split (the few-shot examples); restore the files")
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


def _doc(row: dict, subject: str) -> dict:
    """One question in the cais/mmlu schema, checked: four choices, answer an index into them."""
    choices, answer = list(row["choices"]), row["answer"]
    if len(choices) != 4 or answer not in range(4):
        raise UpcycleError(f"{row['where']}: expected 4 choices and an answer 0-3, got {len(choices)} choices and "
                           f"answer {answer!r}; fix or re-download the file")
    return {"question": row["question"], "subject": subject, "choices": choices, "answer": int(answer)}
