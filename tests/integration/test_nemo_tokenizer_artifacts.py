"""A .nemo converted from a Hugging Face folder carries that folder's tokenizer files as `nemo:` artifacts: with the
source folder moved away, the .nemo still tokenizes identically (chat template included), evaluates, trains, and
exports the same tokenizer files back to a Hugging Face folder."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml

from nemo_upcycle.checkpoint import WriteOptions, load_tokenizer_of, tokenizer_from_argument
from nemo_upcycle.cli import main
from nemo_upcycle.convert import convert
from nemo_upcycle.data.preprocess import preprocess
from nemo_upcycle.recipe import UpcycleConfig
from tests.hf_fixtures import save_dense, save_tokenizer

MMLU = Path(__file__).parents[2] / "nemo_upcycle" / "demo_data" / "mmlu_sample"
TEXT = "Question: which planet is largest?\nA. Mars\nB. Jupiter\nAnswer: B"
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """dense.nemo and its E4G2T2 upcycle moe.nemo from a Hugging Face Llama folder, which is then moved away."""
    root = tmp_path_factory.mktemp("selfcontained")
    src = root / "src"
    size = save_tokenizer(src, [p.read_text() for p in sorted(MMLU.rglob("*.csv"))], adds_bos=True)
    (src / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    save_dense(src, "llama", vocab_size=size, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.name.startswith(("tokenizer", "chat_template"))}
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(src)
    convert(src, root / "dense.nemo", None, progress=False)
    convert(src, root / "moe.nemo", UpcycleConfig.from_shorthand("E4G2T2"), progress=False)
    src.rename(root / "moved_away")
    return root, reference, files, str(src)


def test_tokenizer_files_are_artifacts_and_the_config_names_no_outside_path(converted):
    root, _, files, src = converted
    with tarfile.open(root / "moe.nemo") as tar:
        names = tar.getnames()
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml"))
        tok = cfg["tokenizer"]
        assert tok["library"] == "huggingface" and src not in yaml.safe_dump(cfg)
        for key, filename in [("tokenizer_file", "tokenizer.json"), ("tokenizer_config_file", "tokenizer_config.json"),
                              ("chat_template_file", "chat_template.jinja")]:
            artifact = tok[key].removeprefix("nemo:")
            assert artifact.endswith("_" + filename) and f"./{artifact}" in names
            assert tar.extractfile(f"./{artifact}").read() == files[filename]


def test_moved_source_same_tokens_and_chat_template(converted):
    root, reference, _, _ = converted
    for path in ("dense.nemo", "moe.nemo"):
        tok = load_tokenizer_of(root / path)
        assert tok.encode(TEXT) == reference.encode(TEXT, add_special_tokens=False)
        assert tok.encode(TEXT, add_special_tokens=True) == reference.encode(TEXT)  # BOS as the source adds it
        assert (tok.bos_id, tok.eod) == (reference.bos_token_id, reference.eos_token_id)
        assert tok._tok.chat_template == CHAT_TEMPLATE


def test_moved_source_evaluates(converted, tmp_path):
    root, _, _, _ = converted
    assert main(["eval", str(root / "moe.nemo"), "--data-dir", str(MMLU), "--num-fewshot", "0", "--limit", "2",
                 "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text().count("mmlu") >= 5


def test_moved_source_trains(converted, megatron, tmp_path):
    from nemo_upcycle.train.run import load_config, train

    root, _, _, _ = converted
    docs = sorted(MMLU.rglob("*.csv"))  # a document each
    preprocess(docs, tmp_path / "data" / "mmlu", tokenizer_from_argument(str(root / "moe.nemo")), progress=False)
    data = tmp_path / "data" / "mmlu_text_document"
    result = train(load_config([f"restore_from={root / 'moe.nemo'}", f"data.data_prefix=[{data}]",
                                f"exp_manager.exp_dir={tmp_path / 'exp'}", "trainer.enable_progress_bar=false",
                                "data.splits_string='90,10,0'", "micro_batch_size=2", "global_batch_size=2",
                                "trainer.max_steps=1", "trainer.val_check_interval=1", "name=selfcontained"]))
    assert result.steps == 1
    assert load_tokenizer_of(result.nemo_path).encode(TEXT) == load_tokenizer_of(root / "moe.nemo").encode(TEXT)


def test_hf_export_of_the_nemo_carries_the_same_tokenizer_files(converted, tmp_path):
    root, _, files, _ = converted
    convert(root / "moe.nemo", tmp_path / "hf", None, write=WriteOptions("hf", hf_arch="qwen2_moe"), progress=False)
    for name, data in files.items():
        assert (tmp_path / "hf" / name).read_bytes() == data, name
