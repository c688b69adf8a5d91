"""`nemo-upcycle eval` and conf/eval.yaml: the same options with the same defaults, documented, checked early,
and a `--help` that does not import lm-eval."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_upcycle.cli import build_parser, main
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.eval.runner import EvalOptions, run_eval

ROOT = Path(__file__).parents[2]


def eval_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["eval"]


def test_every_option_is_documented_and_maps_to_eval_options():
    actions = [a for a in eval_parser()._actions if a.dest != "help"]
    assert all(a.help and len(a.help) > 20 for a in actions)
    assert {a.dest for a in actions} == {f.name for f in fields(EvalOptions)}
    args = build_parser().parse_args(["eval", "a.nemo", "b.nemo", "--tasks", "mmlu_stem", "--limit", "3",
                                      "--num-fewshot", "0", "--batch-size", "2", "--data-dir", "mmlu"])
    options = EvalOptions(**{f.name: getattr(args, f.name) for f in fields(EvalOptions)})
    assert options == EvalOptions(models=("a.nemo", "b.nemo"), tasks=("mmlu_stem",), limit=3, num_fewshot=0,
                                  batch_size=2, data_dir="mmlu")


def test_hydra_config_has_the_cli_options_and_defaults():
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "eval.yaml"))
    defaults = {f.name: f.default for f in fields(EvalOptions) if f.default is not MISSING}
    assert set(cfg) == {f.name for f in fields(EvalOptions)}
    assert {k: v for k, v in EvalOptions.from_dict({**cfg, "models": ["m.nemo"]}).__dict__.items()
            if k in defaults} == defaults
    with pytest.raises(UpcycleError, match="no model"):
        EvalOptions.from_dict(cfg)
    with pytest.raises(UpcycleError, match="unknown eval option.*num_shots"):
        EvalOptions.from_dict({**cfg, "models": ["m.nemo"], "num_shots": 5})


@pytest.mark.parametrize("values, message", [
    ({"models": ["a.nemo", "a.nemo"]}, "listed twice"),
    ({"models": ["a.nemo"], "limit": 0}, "limit=0 must be 1 or more, or unset for every question"),
    ({"models": ["a.nemo"], "num_fewshot": -1}, "num_fewshot=-1 must be 0 or more"),
    ({"models": ["a.nemo"], "tasks": []}, "no task"),
])
def test_bad_options_are_one_line_errors(values, message):
    with pytest.raises(UpcycleError, match=message):
        EvalOptions(**values)


def test_a_bad_number_names_its_flag(capsys):
    assert main(["eval", "m.nemo", "--limit", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --limit 0 must be 1 or more, or unset for every question"


def test_missing_data_fails_before_any_model_is_loaded(capsys):
    assert main(["eval", "never_loaded.nemo", "--data-dir", "/no/such/mmlu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: MMLU data /no/such/mmlu does not exist") and "\n" not in err


@pytest.mark.parametrize("device, message", [
    ("foo", "{flag}foo is not a torch device: pass {flag}cpu, cuda or cuda:<index>"),
    ("cuda", "{flag}cuda: torch sees 0 CUDA device(s) here (torch.cuda.is_available() is False): pass {flag}cpu"),
])
def test_bad_device_fails_before_anything_is_read(monkeypatch, capsys, device, message):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    mmlu = str(ROOT / "nemo_upcycle/demo_data/mmlu_sample")
    assert main(["eval", "never_loaded.nemo", "--data-dir", mmlu, "--device", device]) == 2
    assert capsys.readouterr().err.strip() == "error: " + message.format(flag="--device ")
    with pytest.raises(UpcycleError) as err:  # examples/eval.py's Hydra key
        run_eval(EvalOptions(models=("never_loaded.nemo",), data_dir=mmlu, device=device))
    assert str(err.value) == message.format(flag="device=")


def test_help_does_not_import_lm_eval():
    code = "import sys, nemo_upcycle.cli.eval; print(sorted({'lm_eval', 'datasets'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_eval_of_converted_checkpoints_end_to_end(megatron, tmp_path, capsys, monkeypatch):
    """A dense .nemo and its upcycled version, evaluated side by side from the command line."""
    from nemo_upcycle.convert import convert
    from nemo_upcycle.recipe import UpcycleConfig
    from tests.conftest import random_model, small_config
    from tests.nemo_fixtures import pack_nemo, spm_model_bytes, write_nemo_dir

    dense = random_model(small_config(vocab_size=96))
    src = pack_nemo(write_nemo_dir(tmp_path / "d", dense, spm_model_bytes(tmp_path)), tmp_path / "dense.nemo")
    convert(src, tmp_path / "moe.nemo", UpcycleConfig.from_shorthand("E2G1T2", router="topk_then_softmax"),
            progress=False)
    out = tmp_path / "eval_out"
    assert main(["eval", str(src), str(tmp_path / "moe.nemo"), "--data-dir", str(ROOT / "nemo_upcycle/demo_data/mmlu_sample"),
                 "--limit", "2", "--num-fewshot", "1", "--output-dir", str(out)]) == 0
    table = capsys.readouterr().out
    assert "dense.nemo" in table and "moe.nemo" in table
    row = next(line for line in table.splitlines() if line.startswith("| mmlu "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[-1] == cells[-2]  # topK-then-softmax upcycling keeps every answer, so the same accuracy
    assert (out / "results.md").is_file() and len(list(out.glob("*/results.json"))) == 2

    # A second run into the same folder is refused before any model is loaded; with --overwrite it replaces the
    # folder whole (the old second model's results go); a folder holding a model being evaluated is never replaced.
    mmlu = str(ROOT / "nemo_upcycle/demo_data/mmlu_sample")
    assert main(["eval", "never_loaded.nemo", "--data-dir", mmlu, "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {out} already exists: choose another output path or pass --overwrite"
    assert main(["eval", str(src), "--data-dir", mmlu, "--limit", "1", "--num-fewshot", "0", "--output-dir", str(out),
                 "--overwrite"]) == 0
    capsys.readouterr()
    assert len(list(out.glob("*/results.json"))) == 1 and sorted(p.name for p in tmp_path.iterdir() if
                                                                  p.name.startswith(".eval_out")) == []
    assert main(["eval", str(src), "--data-dir", mmlu, "--output-dir", str(tmp_path), "--overwrite"]) == 2
    assert "is, holds or lies inside the input" in capsys.readouterr().err and src.is_file()
    # An empty folder is fine, but a file put into it while the models were scored is kept, not replaced.
    import nemo_upcycle.eval.results as results_module

    fresh, real_write = tmp_path / "fresh", results_module.write_results
    fresh.mkdir()

    def write_after_an_intruder(results, out):
        fresh.mkdir(exist_ok=True)
        (fresh / "mine.txt").write_text("keep me")
        real_write(results, out)

    monkeypatch.setattr(results_module, "write_results", write_after_an_intruder)
    assert main(["eval", str(src), "--data-dir", mmlu, "--limit", "1", "--num-fewshot", "0", "--output-dir",
                 str(fresh)]) == 2
    assert "appeared while the output was written" in capsys.readouterr().err
    assert (fresh / "mine.txt").read_text() == "keep me"
