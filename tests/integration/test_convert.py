"""The streaming converter: every input layout in, NeMo and Megatron checkpoints out, proven by loading the
output with megatron-core's own `dist_checkpointing.load` and comparing logits with the reference model."""

from __future__ import annotations

import hashlib
import tarfile
import warnings

import pytest
import torch
import yaml

from nemo_upcycle.checkpoint import WriteOptions, open_checkpoint
from nemo_upcycle.convert import convert
from nemo_upcycle.models import GPTModel
from nemo_upcycle.models.keys import unstack_experts
from nemo_upcycle.checkpoint import load_tokenizer_of
from nemo_upcycle.recipe import UpcycleConfig, upcycle_state_dict
from nemo_upcycle.verify import VerifyOptions
from tests.conftest import random_model, small_config
from tests.nemo_fixtures import pack_nemo, spm_model_bytes, write_nemo_dir

TOKENS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return spm_model_bytes(tmp_path_factory.mktemp("spm"))


def megatron_load(moe_cfg, ckpt_dir, prefix):
    """Load a torch_dist directory into a Megatron MoE GPTModel with megatron-core's own loader."""
    from megatron.core import dist_checkpointing

    from nemo_upcycle.models.megatron import build_megatron_gpt, megatron_forward, reference_weights

    model = build_megatron_gpt(moe_cfg, use_te=False).eval()
    loaded = dist_checkpointing.load(model.sharded_state_dict(prefix=prefix), str(ckpt_dir))
    expected = model.state_dict()
    model.load_state_dict({k[len(prefix):]: v for k, v in loaded.items() if k[len(prefix):] in expected})
    with torch.no_grad():
        return megatron_forward(model, TOKENS), reference_weights(model)


def reference_logits(moe_cfg, sd):
    model = GPTModel(moe_cfg).eval()
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(TOKENS).logits


def extract(nemo_tar, dest):
    with tarfile.open(nemo_tar) as tar:
        tar.extractall(dest, filter="data")
    return dest


def test_nemo_built_by_nemo_converts_and_megatron_loads_it(megatron, tmp_path, spm):
    cfg = small_config()
    dense = random_model(cfg)
    src = pack_nemo(write_nemo_dir(tmp_path / "dense", dense, spm), tmp_path / "dense.nemo")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    recipe = UpcycleConfig.from_shorthand("E4G2T2", router_init="virtual_group", router_init_std=0.3)
    summary = convert(src, tmp_path / "moe.nemo", recipe, progress=False)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest  # input untouched

    with tarfile.open(tmp_path / "moe.nemo") as tar:
        names = tar.getnames()
    assert all(n == "." or n.startswith("./") for n in names)
    out = extract(tmp_path / "moe.nemo", tmp_path / "moe")
    conf = yaml.safe_load((out / "model_config.yaml").read_text())
    assert conf["num_moe_experts"] == 8 and conf["moe_ffn_hidden_size"] == 32 and conf["moe_router_topk"] == 2
    assert conf["moe_router_pre_softmax"] is True and conf["moe_aux_loss_coeff"] == 0.01
    assert conf["moe_token_dispatcher_type"] == "alltoall" and conf["moe_grouped_gemm"] is True
    assert conf["precision"] == "bf16-mixed" and conf["normalization"] == "layernorm1p"  # passed through
    artifact = conf["tokenizer"]["model"].removeprefix("nemo:")
    assert (out / artifact).read_bytes() == spm

    moe_cfg, want = upcycle_state_dict(dense.state_dict(), cfg, recipe, load_tokenizer_of(out))
    logits, loaded = megatron_load(moe_cfg, out / "model_weights", "model.")
    assert loaded.keys() == want.keys()
    for k in want:
        assert torch.equal(loaded[k], want[k]), k
    torch.testing.assert_close(logits, reference_logits(moe_cfg, want), rtol=1e-5, atol=1e-5)
    assert summary.plan.moe == moe_cfg


def test_megatron_output_with_mixed_layers_loads_in_megatron(megatron, tmp_path):
    cfg = small_config(num_layers=3, activation="swiglu", normalization="rmsnorm")
    dense = random_model(cfg)
    src = write_nemo_dir(tmp_path / "dense", dense, spm=None)
    recipe = UpcycleConfig.from_shorthand("E2G2T2", layers=(0, 2), router="topk_then_softmax")
    convert(src, tmp_path / "out", recipe, write=WriteOptions("megatron"), progress=False)
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == "0"
    flags = (tmp_path / "out" / "megatron_args.txt").read_text().split("\n")
    assert "--num-experts 4" in flags and "--moe-ffn-hidden-size 32" in flags and "--swiglu" in flags
    assert "--moe-layer-freq '[1,0,1]'" in flags and "--moe-router-pre-softmax" not in flags

    moe_cfg, want = upcycle_state_dict(dense.state_dict(), cfg, recipe)
    logits, loaded = megatron_load(moe_cfg, tmp_path / "out" / "iter_0000000", "")
    for k in want:
        assert torch.equal(loaded[k], want[k]), k
    torch.testing.assert_close(logits, reference_logits(moe_cfg, want), rtol=1e-5, atol=1e-5)
    dense_logits = random_model(cfg)(TOKENS).logits  # topK-then-softmax: the MoE equals the dense model
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-5)


def _outputs(path):
    with open_checkpoint(path) as r:
        return r.state_dict()


@pytest.mark.parametrize("layout, tp, pp, activation", [
    ("legacy", 1, 1, "squared-relu"),
    ("legacy", 2, 1, "squared-relu"),
    ("legacy", 2, 2, "swiglu"),
])
def test_legacy_layouts_convert_like_torch_dist(megatron, tmp_path, spm, layout, tp, pp, activation):
    cfg = small_config(num_layers=4, activation=activation)
    dense = random_model(cfg)
    ref = write_nemo_dir(tmp_path / "ref", dense, spm)
    legacy = pack_nemo(write_nemo_dir(tmp_path / "legacy", dense, spm, layout, tp, pp), tmp_path / "legacy.nemo")
    with open_checkpoint(legacy) as r:
        assert r.config == open_checkpoint(ref).config
        sd = r.state_dict()
    for k, v in dense.state_dict().items():
        assert torch.equal(sd[k], v), k
    recipe = UpcycleConfig.from_shorthand("E2G2T2")
    convert(ref, tmp_path / "a.nemo", recipe, progress=False)
    convert(legacy, tmp_path / "b.nemo", recipe, progress=False)
    a, b = _outputs(tmp_path / "a.nemo"), _outputs(tmp_path / "b.nemo")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gzip_tar_and_directory_inputs(megatron, tmp_path):
    dense = random_model(small_config())
    d = write_nemo_dir(tmp_path / "dense", dense, spm=None)
    gz = pack_nemo(d, tmp_path / "dense.nemo.gz", gzip=True)
    recipe = UpcycleConfig.from_shorthand("E2G1T2")
    convert(d, tmp_path / "a.nemo", recipe, write=WriteOptions(pack=False), progress=False)
    with warnings.catch_warnings(record=True) as caught:  # DCP's "torch.distributed is disabled" notes are dropped
        warnings.simplefilter("always")
        convert(gz, tmp_path / "b.nemo", recipe, progress=False)
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]
    assert (tmp_path / "a.nemo").is_dir()
    a, b = _outputs(tmp_path / "a.nemo"), _outputs(tmp_path / "b.nemo")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hugging_face_folder_saved_by_transformers(megatron, tmp_path, spm):
    from transformers import NemotronConfig, NemotronForCausalLM

    from nemo_upcycle.checkpoint.hf_keys import nemotron_hf_config, state_dict_to_hf

    cfg = small_config()
    dense = random_model(cfg)
    hf_cfg = {k: v for k, v in nemotron_hf_config(cfg).items() if k not in ("architectures", "model_type")}
    hf = NemotronForCausalLM(NemotronConfig(**hf_cfg))
    hf.load_state_dict(state_dict_to_hf(dense.state_dict(), cfg))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(spm)
    recipe = UpcycleConfig.from_shorthand("E2G2T2", router="topk_then_softmax")
    convert(tmp_path / "hf", tmp_path / "moe.nemo", recipe, progress=False)
    with open_checkpoint(tmp_path / "moe.nemo") as r:
        got = unstack_experts(r.state_dict())
        assert r.tokenizer.config["library"] == "sentencepiece"
        assert list(r.tokenizer.artifacts.values()) == [spm]
    _, want = upcycle_state_dict(dense.state_dict(), cfg, recipe, load_tokenizer_of(tmp_path / "moe.nemo"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_bf16_stays_bf16_and_verify_passes(megatron, tmp_path):
    dense = random_model(small_config())
    dense.to(torch.bfloat16)
    d = write_nemo_dir(tmp_path / "dense", dense, spm=None)
    s = convert(d, tmp_path / "moe.nemo", UpcycleConfig.from_shorthand("E2G2T2"), verify=VerifyOptions(),
                progress=False)
    assert s.verify["status"] == "PASSED"
    with open_checkpoint(tmp_path / "moe.nemo") as r:
        assert {t.dtype for t in r.tensors().values()} == {torch.bfloat16}


def test_megatron_lm_and_bridge_directories_read_their_config(megatron, tmp_path):
    """Megatron-LM keeps its args in common.pt, Megatron-Bridge a run_config.yaml; both give the model config."""
    from tests.nemo_fixtures import megatron_save, write_megatron_lm_dir

    cfg = small_config()
    dense = random_model(cfg)
    lm = write_megatron_lm_dir(tmp_path / "lm", dense)
    with open_checkpoint(lm) as r:
        assert r.config == cfg
        assert all(torch.equal(r.state_dict()[k], v) for k, v in dense.state_dict().items())

    bridge = tmp_path / "bridge" / "iter_0000000"
    megatron_save(dense, bridge, prefix="")
    model = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
             "num_query_groups": 2, "activation_func": {"_target_": "megatron.core.activations.squared_relu"},
             "gated_linear_unit": False, "normalization": "LayerNorm", "layernorm_zero_centered_gamma": True,
             "add_bias_linear": False, "position_embedding_type": "rope", "rotary_percent": 0.5, "seq_length": 32,
             "share_embeddings_and_output_weights": False}
    (bridge / "run_config.yaml").write_text(yaml.safe_dump({"model": model}))
    with open_checkpoint(bridge) as r:
        assert r.config == cfg

    recipe = UpcycleConfig.from_shorthand("E2G1T2")
    convert(lm, tmp_path / "moe", recipe, write=WriteOptions("megatron"), progress=False)
    with open_checkpoint(tmp_path / "moe") as r:  # our own Megatron output reads back, config included
        assert r.config == upcycle_state_dict(dense.state_dict(), cfg, recipe)[0]
