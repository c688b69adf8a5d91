"""Results on disk and on screen: lm-eval's JSON per model, and one markdown table with a column per model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from nemo_upcycle.report import markdown_table


def results_table(results: Mapping[str, dict]) -> str:
    """A row per task and metric (each group above its members), a column per model; n = questions scored."""
    first = next(iter(results.values()))
    rows = []
    for task in _task_order(first):
        entry = first["results"][task]
        for metric in (k for k in entry if "," in k and "_stderr," not in k):
            values = [res["results"].get(task, {}).get(metric, "-") for res in results.values()]
            rows.append([task, metric.removesuffix(",none"), entry.get("sample_len", ""), *values])
    return markdown_table(["task", "metric", "n", *results], rows)


def write_results(results: Mapping[str, dict], output_dir: Path) -> None:
    """output_dir/<model>/results.json (lm-eval's results, as its CLI writes them), samples_<task>.jsonl when
    samples were logged, and output_dir/results.md (the table)."""
    from lm_eval.utils import handle_non_serializable, sanitize_model_name

    for name, result in results.items():
        folder = output_dir / sanitize_model_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        summary = {k: v for k, v in result.items() if k != "samples"}
        (folder / "results.json").write_text(
            json.dumps(summary, indent=2, default=handle_non_serializable, ensure_ascii=False), encoding="utf-8")
        for task, samples in result.get("samples", {}).items():
            lines = (json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n" for s in samples)
            (folder / f"samples_{task}.jsonl").write_text("".join(lines), encoding="utf-8")
    (output_dir / "results.md").write_text(results_table(results) + "\n", encoding="utf-8")


def _task_order(result: dict) -> list[str]:
    """Tasks as lm-eval nests them: each top-level task or group, then its members, depth first."""
    children = result.get("group_subtasks", {})
    members = {t for subtasks in children.values() for t in subtasks}

    def walk(task: str) -> list[str]:
        return [task] + [t for child in children.get(task, []) for t in walk(child)]

    return [t for root in result["results"] if root not in members for t in walk(root)]
