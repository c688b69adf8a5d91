"""Hugging Face MoE folders back in: exported MoE -> .nemo / Megatron -> Hugging Face MoE is bit-identical, the
.nemo loads in megatron-core with the same logits (so an export can be trained), transformers' fused in-memory
expert layout reads like the per-expert one; and every combination a target cannot represent is refused before
any work, in one line naming the targets that would work."""

from __future__ import annotations

import hashlib

import pytest
import torch
import yaml

from nemo_upcycle.checkpoint import WriteOptions, open_checkpoint
from nemo_upcycle.cli import main
from nemo_upcycle.convert import convert
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.recipe import UpcycleConfig
from tests.hf_fixtures import TOKENS, folder_tensors, hf_config, load_hf, logits, save_dense


def _bytes(t: torch.Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)} " + hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()


def megatron_logits(moe_cfg, ckpt_dir, prefix):
    """Load a torch_dist directory with megatron-core's own loader and run it."""
    from megatron.core import dist_checkpointing

    from nemo_upcycle.models.megatron import build_megatron_gpt, megatron_forward

    model = build_megatron_gpt(moe_cfg, use_te=False).eval()
    loaded = dist_checkpointing.load(model.sharded_state_dict(prefix=prefix), str(ckpt_dir))
    model.load_state_dict({k[len(prefix):]: v for k, v in loaded.items() if k[len(prefix):] in model.state_dict()})
    with torch.no_grad():
        return megatron_forward(model, TOKENS)


@pytest.mark.parametrize("family, arch, recipe, dtype", [
    ("llama", "mixtral", dict(router="topk_then_softmax"), torch.float32),
    ("llama", "qwen2_moe", dict(router="softmax_then_topk", shared_expert=True, layers=(1,)), torch.float32),
    ("qwen2", "qwen2_moe", dict(router="softmax_then_topk"), torch.bfloat16),
    ("qwen3", "qwen3_moe", dict(router="softmax_then_topk", tie=True), torch.float32),
])
def test_hf_moe_to_nemo_and_megatron_and_back_is_bit_identical(megatron, tmp_path, family, arch, recipe, dtype):
    recipe = dict(recipe)
    model = save_dense(tmp_path / "dense", family, num_hidden_layers=2, tie_word_embeddings=recipe.pop("tie", False))
    if dtype != torch.float32:
        model.to(dtype).save_pretrained(tmp_path / "dense")
    moe = tmp_path / "moe"
    convert(tmp_path / "dense", moe, UpcycleConfig.from_shorthand("E4G2T2", router_init="virtual_group", router_init_std=0.5, **recipe),
            write=WriteOptions("hf", hf_arch=arch), progress=False)
    want = folder_tensors(moe)
    assert {t.dtype for t in want.values()} == {dtype}
    for fmt, path, prefix in (("nemo", "moe.nemo", "model."), ("megatron", "moe-megatron", "")):
        convert(moe, tmp_path / path, None, write=WriteOptions(fmt), progress=False)
        convert(tmp_path / path, tmp_path / f"back-{fmt}", None, write=WriteOptions("hf", hf_arch=arch), progress=False)
        got = folder_tensors(tmp_path / f"back-{fmt}")
        assert got.keys() == want.keys()
        assert all(_bytes(got[k]) == _bytes(want[k]) for k in want), fmt
        a, b = hf_config(moe), hf_config(tmp_path / f"back-{fmt}")
        assert {k: v for k, v in a.items() if not k.endswith("token_id")} == \
               {k: v for k, v in b.items() if not k.endswith("token_id")}
    if dtype == torch.float32:  # the .nemo trains in Megatron: megatron-core loads it and computes the same logits
        with open_checkpoint(tmp_path / "moe.nemo") as r:
            cfg = r.config
        assert cfg.router_type == recipe["router"]
        ckpt = tmp_path / "nemo-dir"
        convert(moe, ckpt, None, write=WriteOptions("nemo", pack=False), progress=False)
        torch.testing.assert_close(megatron_logits(cfg, ckpt / "model_weights", "model."), logits(load_hf(moe)),
                                   rtol=1e-5, atol=1e-5)


def test_shared_expert_round_trips_through_nemo_config(tmp_path):
    save_dense(tmp_path / "dense", "llama")
    convert(tmp_path / "dense", tmp_path / "moe.nemo", UpcycleConfig.from_shorthand("E2G2T2", shared_expert=True),
            write=WriteOptions(pack=False), progress=False)
    conf = yaml.safe_load((tmp_path / "moe.nemo" / "model_config.yaml").read_text())
    assert conf["moe_shared_expert_intermediate_size"] == 64 and conf["moe_shared_expert_gate"] is True
    convert(tmp_path / "dense", tmp_path / "moe-mlm", UpcycleConfig.from_shorthand("E2G2T2", shared_expert=True),
            write=WriteOptions("megatron"), progress=False)
    flags = (tmp_path / "moe-mlm" / "megatron_args.txt").read_text().split("\n")
    assert "--moe-shared-expert-intermediate-size 64" in flags and "--moe-shared-expert-gate" in flags
    with open_checkpoint(tmp_path / "moe.nemo") as a, open_checkpoint(tmp_path / "moe-mlm") as b:
        assert a.config == b.config and a.config.moe_shared_expert_gate


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_transformers_fused_expert_layout_reads_like_the_per_expert_one(tmp_path, arch):
    """transformers 5 holds experts fused (experts.gate_up_proj [N, 2F, H]); a folder saved that way reads the same."""
    import shutil

    from safetensors.torch import save_file

    save_dense(tmp_path / "dense", "llama", tie_word_embeddings=True)
    convert(tmp_path / "dense", tmp_path / "moe", UpcycleConfig.from_shorthand("E4G2T2", router="topk_then_softmax"),
            write=WriteOptions("hf", hf_arch=arch), progress=False)
    fused = load_hf(tmp_path / "moe").state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)
    (tmp_path / "fused").mkdir()
    save_file({k: v.clone() for k, v in fused.items()}, tmp_path / "fused" / "model.safetensors")  # lm_head too
    shutil.copy(tmp_path / "moe" / "config.json", tmp_path / "fused" / "config.json")
    with open_checkpoint(tmp_path / "moe") as a, open_checkpoint(tmp_path / "fused") as b:
        assert a.config == b.config
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    for name, family, kw in [("llama", "llama", {}), ("qwen2", "qwen2", {}), ("qwen3", "qwen3", {}),
                             ("mistral-head-dim", "mistral", dict(head_dim=16))]:
        save_dense(root / name, family, **kw)
    return root


TOPK = dict(router="topk_then_softmax")


@pytest.mark.parametrize("source, recipe, arch, problem, fix", [
    ("llama", dict(router="softmax_then_topk"), "mixtral", "softmax-then-topK routing", "use hf_arch=qwen2_moe"),
    ("llama", dict(router="sigmoid"), "qwen2_moe", "sigmoid routing", "no Hugging Face MoE target can"),
    ("qwen3", TOPK, "qwen2_moe", "qk-norm (only Qwen3-MoE", "use hf_arch=qwen3_moe"),
    ("qwen3", TOPK, "mixtral", "qk-norm", "use hf_arch=qwen3_moe"),
    ("llama", TOPK, "qwen3_moe", "no qk-norm", "use hf_arch=mixtral or qwen2_moe"),
    ("qwen2", TOPK, "mixtral", "q/k/v biases", "use hf_arch=qwen2_moe"),
    ("qwen2", TOPK, "qwen3_moe", "q/k/v biases", "use hf_arch=qwen2_moe"),
    ("llama", dict(TOPK, shared_expert=True), "mixtral", "a shared expert", "use hf_arch=qwen2_moe"),
    ("llama", dict(TOPK, layers=(0,)), "mixtral", "dense layers among the MoE ones", "use hf_arch=qwen2_moe"),
    ("mistral-head-dim", TOPK, "qwen2_moe", "head_dim 16", "use hf_arch=mixtral"),
    ("llama", dict(TOPK, topk_scaling_factor=2.0), "qwen2_moe", "moe_router_topk_scaling_factor", "no Hugging"),
    ("llama", None, "qwen2_moe", "the model is dense", "no Hugging Face MoE target can"),
])
def test_unrepresentable_combinations_are_refused_before_any_work(sources, tmp_path, source, recipe, arch, problem,
                                                                   fix):
    recipe = None if recipe is None else UpcycleConfig.from_shorthand("E4G2T2", **recipe)
    with pytest.raises(UpcycleError) as err:
        convert(sources / source, tmp_path / "out", recipe, write=WriteOptions("hf", hf_arch=arch), progress=False)
    text = str(err.value)
    assert text.startswith(f"hf_arch={arch} cannot represent this model exactly: ") and "\n" not in text
    assert problem in text and fix in text, text
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary directory


def test_nemotron_and_cli_refusals_are_one_line(sources, tmp_path, capsys):
    from tests.conftest import random_model, small_config
    from tests.nemo_fixtures import write_nemo_dir

    nemotron = write_nemo_dir(tmp_path / "nemotron", random_model(small_config()), spm=None, layout="legacy")
    out = tmp_path / "out"
    assert main(["convert", str(nemotron), str(out), "--format", "hf", "--hf-arch", "qwen2_moe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --hf-arch qwen2_moe cannot represent this model exactly: activation squared-relu")
    assert "\n" not in err and "no Hugging Face MoE target can" in err
    assert main(["convert", str(sources / "llama"), str(out), "--format", "hf"]) == 2
    assert "--format hf needs --hf-arch" in capsys.readouterr().err
    assert main(["convert", str(sources / "llama"), str(out), "--format", "hf", "--hf-arch", "mixtral",
                 "--dry-run"]) == 2  # softmax-then-topK, the default router, is refused in a dry run too
    assert "softmax-then-topK" in capsys.readouterr().err
    assert main(["convert", str(sources / "llama"), str(out), "--recipe", "none", "--topk", "2"]) == 2
    assert "--recipe none converts the format only: drop --topk" in capsys.readouterr().err
    assert not out.exists()


LLAMA3_MEGATRON = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_rope_scalings_megatron_and_nemo_cannot_express_are_refused(tmp_path):
    recipe = UpcycleConfig.from_shorthand("E2G1T2")
    save_dense(tmp_path / "yarn", "qwen2", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                            "original_max_position_embeddings": 16})
    save_dense(tmp_path / "llama3", "llama", rope_parameters=LLAMA3_MEGATRON)
    save_dense(tmp_path / "linear", "llama", rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    for fmt in ("nemo", "megatron"):
        with pytest.raises(UpcycleError, match="Megatron-core cannot express RoPE scaling yarn"):
            convert(tmp_path / "yarn", tmp_path / "out", recipe, write=WriteOptions(fmt), progress=False)
    with pytest.raises(UpcycleError, match="NeMo 1.x applies llama3 RoPE scaling with factor 8 only"):
        convert(tmp_path / "llama3", tmp_path / "out", recipe, progress=False)
    assert not (tmp_path / "out").exists()
    convert(tmp_path / "llama3", tmp_path / "mlm", recipe, write=WriteOptions("megatron"), progress=False)
    flags = (tmp_path / "mlm" / "megatron_args.txt").read_text().split("\n")
    assert "--use-rope-scaling" in flags and "--rope-scaling-factor 32" in flags
    convert(tmp_path / "linear", tmp_path / "linear.nemo", recipe, write=WriteOptions(pack=False), progress=False)
    assert yaml.safe_load((tmp_path / "linear.nemo" / "model_config.yaml").read_text())[
        "seq_len_interpolation_factor"] == 2.0
    for out, src in (("mlm", "llama3"), ("linear.nemo", "linear")):
        with open_checkpoint(tmp_path / out) as a, open_checkpoint(tmp_path / src) as b:
            fields = ("rope_scaling_type", "rope_scaling_factor", "rope_original_max_position_embeddings",
                      "rope_low_freq_factor", "rope_high_freq_factor", "rotary_base")
            assert [getattr(a.config, f) for f in fields] == [getattr(b.config, f) for f in fields]


def test_a_sentencepiece_tokenizer_travels_hf_to_nemo_to_hf(tmp_path):
    """A .nemo (or Megatron) source's SentencePiece model becomes tokenizer.model + a LlamaTokenizer config that
    transformers loads; its bos/eos ids go into config.json and generation_config.json."""
    import json

    import sentencepiece
    from transformers import AutoTokenizer

    from tests.nemo_fixtures import spm_model_bytes

    spm = spm_model_bytes(tmp_path)
    save_dense(tmp_path / "dense", "llama")
    (tmp_path / "dense" / "tokenizer.model").write_bytes(spm)
    convert(tmp_path / "dense", tmp_path / "moe.nemo", UpcycleConfig.from_shorthand("E2G1T2"), progress=False)
    convert(tmp_path / "moe.nemo", tmp_path / "hf", None, write=WriteOptions("hf", hf_arch="qwen2_moe"), progress=False)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == spm
    sp = sentencepiece.SentencePieceProcessor(model_proto=spm)
    text = "def f(x): return x + 1"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)(text)["input_ids"] == \
        [sp.bos_id()] + sp.encode(text)
    conf, gen = hf_config(tmp_path / "hf"), json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert conf["bos_token_id"] == gen["bos_token_id"] == sp.bos_id() and conf["eos_token_id"] == sp.eos_id()


def test_a_gateless_shared_expert_exports_as_a_zero_gate_and_doubled_down_proj(megatron, tmp_path):
    """Megatron's default shared expert has no gate; Qwen2-MoE's always has one: sigmoid(0) = 1/2 with down_proj
    doubled is the same function, exactly."""
    from nemo_upcycle.models import GPTModel
    from nemo_upcycle.recipe import upcycle_state_dict
    from tests.conftest import random_model, small_config
    from tests.nemo_fixtures import write_nemo_dir

    cfg = small_config(normalization="rmsnorm", activation="swiglu", rotary_percentage=1.0)
    recipe = UpcycleConfig.from_shorthand("E2G2T2", router="softmax_then_topk", shared_expert=True, router_init="virtual_group", router_init_std=0.3)
    moe_cfg, sd = upcycle_state_dict(random_model(cfg, scale=0.2).state_dict(), cfg, recipe)
    moe_cfg = moe_cfg.replace(moe_shared_expert_gate=False)
    model = GPTModel(moe_cfg).eval()
    model.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in sd.items() if "gate_weight" not in k})
    convert(write_nemo_dir(tmp_path / "moe.nemo", model, spm=None), tmp_path / "hf", None,
            write=WriteOptions("hf", hf_arch="qwen2_moe"), progress=False)
    got = folder_tensors(tmp_path / "hf")
    assert not got["model.layers.0.mlp.shared_expert_gate.weight"].any()
    assert torch.equal(got["model.layers.0.mlp.shared_expert.down_proj.weight"],
                       2 * model.state_dict()["decoder.layers.0.mlp.shared_experts.linear_fc2.weight"])
    with torch.no_grad():
        torch.testing.assert_close(logits(load_hf(tmp_path / "hf")), model(TOKENS).logits, rtol=1e-5, atol=1e-5)
