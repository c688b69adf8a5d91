"""`--target-engine` refuses Hugging Face exports a serving engine would compute differently from our model
(llama.cpp's fixed per-architecture top-k renormalisation, its missing Qwen3-MoE dense layers; SGLang's all-sparse
Qwen2-MoE), before anything is written, and lets through the ones it computes exactly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nemo_upcycle.checkpoint import WriteOptions
from nemo_upcycle.convert import convert
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.recipe import UpcycleConfig
from tests.hf_fixtures import hf_config, save_dense

REFUSED = [  # engine, source, arch, recipe options, what the error names
    ("llama.cpp", "llama", "qwen2_moe", dict(router="topk_then_softmax"), "never renormalises"),
    ("llama.cpp", "qwen3", "qwen3_moe", dict(router="softmax_then_topk"), "always renormalises"),
    ("llama.cpp", "qwen3", "qwen3_moe", dict(router="topk_then_softmax", layers=(0,)), "dense layers"),
    ("sglang", "llama", "qwen2_moe", dict(router="softmax_then_topk", layers=(1,)), "mlp_only_layers"),
]
ACCEPTED = [
    ("llama.cpp", "llama", "qwen2_moe", dict(router="softmax_then_topk")),  # norm_topk_prob false: as llama.cpp
    ("llama.cpp", "qwen3", "qwen3_moe", dict(router="topk_then_softmax")),  # norm_topk_prob true: as llama.cpp
    ("llama.cpp", "llama", "mixtral", dict(router="topk_then_softmax")),
    ("vllm", "qwen3", "qwen3_moe", dict(router="softmax_then_topk", layers=(0,))),  # vLLM reads the config
    ("sglang", "llama", "qwen2_moe", dict(router="topk_then_softmax", shared_expert=True)),
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    save_dense(root / "llama", "llama")
    save_dense(root / "qwen3", "qwen3")
    return root


def export(src, out, arch, engine, **options):
    recipe = UpcycleConfig.from_shorthand("E2G2T2", **options)
    convert(src, out, recipe, write=WriteOptions("hf", hf_arch=arch, target_engine=engine), progress=False)


@pytest.mark.parametrize("engine, source, arch, options, reason", REFUSED)
def test_exports_the_engine_computes_differently_are_refused(sources, tmp_path, engine, source, arch, options,
                                                             reason):
    with pytest.raises(UpcycleError, match=reason):
        export(sources / source, tmp_path / "out", arch, engine, **options)
    assert not (tmp_path / "out").exists()
    export(sources / source, tmp_path / "plain", arch, None, **options)  # without the flag: written as before


@pytest.mark.parametrize("engine, source, arch, options", ACCEPTED)
def test_exports_the_engine_computes_exactly_are_written(sources, tmp_path, engine, source, arch, options):
    export(sources / source, tmp_path / "out", arch, engine, **options)
    if arch != "mixtral":
        assert hf_config(tmp_path / "out")["norm_topk_prob"] is (options["router"] == "topk_then_softmax")


def test_cli_refusal_is_one_line_and_only_for_hf(sources, tmp_path):
    cmd = [sys.executable, "-m", "nemo_upcycle.cli", "convert", str(sources / "llama"), str(tmp_path / "out"),
           "--recipe", "E2G2T2", "--router", "topk_then_softmax", "--format", "hf", "--hf-arch", "qwen2_moe",
           "--target-engine", "llama.cpp", "--quiet"]
    got = subprocess.run(cmd, capture_output=True, text=True)
    assert got.returncode == 2 and got.stderr.strip().count("\n") == 0 and "llama.cpp" in got.stderr
    got = subprocess.run(cmd[:8] + ["--format", "megatron", "--target-engine", "vllm"], capture_output=True, text=True)
    assert got.returncode == 2 and "--target-engine is for --format hf" in got.stderr
