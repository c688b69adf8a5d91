"""Dense Llama / Mistral / Qwen2 / Qwen3 saved by transformers -> upcycle -> Hugging Face MoE folder -> loaded by
transformers' own MoE class: the logits are the dense model's (topK-then-softmax for any router,
softmax-then-topK for a zero router) or rho(x) times it per layer within the recipe's bound (a random router).
Also: the folder's files, the router semantics in config.json, partial and shared-expert layouts."""

from __future__ import annotations

import json

import pytest
import torch

from nemo_upcycle.checkpoint import WriteOptions, open_checkpoint
from nemo_upcycle.convert import convert
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.recipe import UpcycleConfig
from tests.conftest import random_model, small_config
from tests.hf_fixtures import folder_tensors, hf_config, load_hf, logits, rewrite_tensors, save_dense
from tests.nemo_fixtures import write_nemo_dir

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 16}
SOURCES = {  # family, overrides: a rope-scaling case and a tied-embedding case among them
    "llama": ("llama", {}),
    "llama-llama3-tied": ("llama", dict(rope_parameters=LLAMA3, tie_word_embeddings=True)),
    "mistral": ("mistral", {}),
    "qwen2-yarn": ("qwen2", dict(rope_parameters=YARN)),
    "qwen3": ("qwen3", {}),
}
TARGETS = {"llama": ("mixtral", "qwen2_moe"), "llama-llama3-tied": ("mixtral", "qwen2_moe"),
           "mistral": ("mixtral", "qwen2_moe"), "qwen2-yarn": ("qwen2_moe",), "qwen3": ("qwen3_moe",)}
CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Each source saved once: name -> (transformers model, folder)."""
    root = tmp_path_factory.mktemp("dense")
    return {name: (save_dense(root / name, family, seed=i, **overrides), root / name)
            for i, (name, (family, overrides)) in enumerate(SOURCES.items())}


def export(src, out, arch, **recipe):
    recipe = UpcycleConfig.from_shorthand(recipe.pop("shorthand", "E4G2T2"), **{"router_init": "virtual_group",
                                                                                 "router_init_std": 0.5, **recipe})
    convert(src, out, recipe, write=WriteOptions("hf", hf_arch=arch), progress=False)
    return load_hf(out)


@pytest.mark.parametrize("source, arch", [(s, a) for s, targets in TARGETS.items() for a in targets])
def test_topk_then_softmax_export_reproduces_the_dense_model(dense, tmp_path, source, arch):
    model, src = dense[source]
    moe = export(src, tmp_path / "moe", arch, router="topk_then_softmax")
    assert type(moe).__name__ == CLASSES[arch]
    assert (logits(moe) - logits(model)).abs().max().item() < 1e-5
    conf = hf_config(tmp_path / "moe")
    assert conf["num_experts_per_tok"] == 2 and conf.get("num_local_experts", conf.get("num_experts")) == 8
    if arch != "mixtral":
        assert conf["norm_topk_prob"] is True and conf["moe_intermediate_size"] == 32


def zero_routers(folder):
    rewrite_tensors(folder, lambda k, v: torch.zeros_like(v) if k.endswith(("mlp.gate.weight",
                                                                            "block_sparse_moe.gate.weight")) else v)


@pytest.mark.parametrize("source, arch, shorthand", [("llama-llama3-tied", "qwen2_moe", "E4G2T2"),
                                                     ("qwen3", "qwen3_moe", "E2G4T4"),
                                                     ("mistral", "qwen2_moe", "E8G1T2")])
def test_softmax_then_topk_is_exact_for_a_zero_router(dense, tmp_path, source, arch, shorthand):
    model, src = dense[source]
    moe = export(src, tmp_path / "moe", arch, router="softmax_then_topk", shorthand=shorthand)
    assert hf_config(tmp_path / "moe")["norm_topk_prob"] is False  # softmax over all experts, top-k kept as is
    assert (logits(moe) - logits(model)).abs().max().item() > 1e-3  # the random router moves the output ...
    zero_routers(tmp_path / "moe")
    assert (logits(load_hf(tmp_path / "moe")) - logits(model)).abs().max().item() < 1e-5  # ... a zero one does not


def _moe_layer_io(moe, layer):
    """Input and output of one MoE block during a forward pass of the exported model."""
    seen = {}
    block = moe.model.layers[layer].mlp
    handle = block.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    logits(moe)
    handle.remove()
    return block, seen["x"], seen["y"]


@pytest.mark.parametrize("shared", [False, True])
def test_softmax_then_topk_random_router_is_rho_times_dense_within_the_bound(dense, tmp_path, shared):
    """Per layer: MoE(x) = rho(x) * dense(x) (shared expert: (1 + rho(x)) / 2 * dense(x)), where rho(x) is the
    routing mass of the chosen virtual groups relative to uniform, 1 <= rho <= exp(max - min group logit)."""
    model, src = dense["qwen2-yarn"]
    e, g = 4, 2
    moe = export(src, tmp_path / "moe", "qwen2_moe", router="softmax_then_topk", shared_expert=shared)
    for layer in range(2):
        block, x, y = _moe_layer_io(moe, layer)
        with torch.no_grad():
            want = model.model.layers[layer].mlp(x)
            group_logits = torch.nn.functional.linear(x, block.gate.weight)[..., ::g]
        k = 2 // g
        rho = e / k * group_logits.exp().topk(k, dim=-1).values.sum(-1) / group_logits.exp().sum(-1)
        spread = group_logits.max(-1).values - group_logits.min(-1).values
        assert (rho >= 1 - 1e-6).all() and (rho <= spread.exp() + 1e-6).all() and rho.max() > 1.01
        factor = (1 + rho) / 2 if shared else rho
        torch.testing.assert_close(y, factor[..., None] * want, rtol=1e-4, atol=1e-6)


def test_partial_upcycling_maps_to_mlp_only_layers(tmp_path):
    model = save_dense(tmp_path / "dense", "llama", num_hidden_layers=3)
    moe = export(tmp_path / "dense", tmp_path / "moe", "qwen2_moe", router="topk_then_softmax", layers=(0, 2))
    conf = hf_config(tmp_path / "moe")
    assert conf["mlp_only_layers"] == [1] and conf["decoder_sparse_step"] == 1 and conf["intermediate_size"] == 64
    assert type(moe.model.layers[1].mlp).__name__ == "Qwen2MoeMLP"
    assert (logits(moe) - logits(model)).abs().max().item() < 1e-5


def test_shared_expert_is_the_dense_mlp_behind_a_zero_gate(dense, tmp_path):
    model, src = dense["llama"]
    moe = export(src, tmp_path / "moe", "qwen2_moe", router="topk_then_softmax", shared_expert=True)
    conf = hf_config(tmp_path / "moe")
    assert conf["shared_expert_intermediate_size"] == 64 and conf["moe_intermediate_size"] == 32
    assert (logits(moe) - logits(model)).abs().max().item() < 1e-5
    got, dense_sd = folder_tensors(tmp_path / "moe"), model.state_dict()
    for p in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(got[f"model.layers.1.mlp.shared_expert.{p}.weight"],
                           dense_sd[f"model.layers.1.mlp.{p}.weight"])
    assert not got["model.layers.1.mlp.shared_expert_gate.weight"].any()


def test_no_shared_expert_is_an_exact_no_op_and_q_k_v_biases_are_zero(dense, tmp_path):
    """Qwen2-MoE always has a shared expert and (in vLLM) q/k/v biases: a Llama without them gets zeros."""
    model, src = dense["llama"]
    export(src, tmp_path / "moe", "qwen2_moe", router="softmax_then_topk")
    got = folder_tensors(tmp_path / "moe")
    assert hf_config(tmp_path / "moe")["qkv_bias"] is True
    for name in ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.down_proj.weight",
                 "mlp.shared_expert_gate.weight", "self_attn.q_proj.bias", "self_attn.v_proj.bias"):
        assert not got[f"model.layers.0.{name}"].any(), name


def test_folder_layout_shards_index_config_and_tokenizer(dense, tmp_path):
    from nemo_upcycle.checkpoint.hf_export import parse_size

    model, src = dense["llama"]
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (src / "chat_template.jinja").write_text("{{ messages }}")
    out = tmp_path / "moe"
    export(src, out, "mixtral", router="topk_then_softmax", shorthand="E4G1T2")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-{k:05d}-of-00001.safetensors" for k in (1,)]
    tensors = folder_tensors(out)
    assert set(index["weight_map"]) == set(tensors) and all(f == shards[0] for f in index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert {f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight" for e in range(4) for w in ("w1", "w2", "w3")} \
        <= set(tensors)  # one tensor per expert, as save_pretrained writes and vLLM reads
    conf = hf_config(out)
    assert conf["architectures"] == ["MixtralForCausalLM"] and conf["intermediate_size"] == 64
    assert conf["dtype"] == conf["torch_dtype"] == "float32"
    assert conf["rope_theta"] == conf["rope_parameters"]["rope_theta"]
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    generation = (out / "generation_config.json").read_text()
    assert json.loads(generation) == json.loads((src / "generation_config.json").read_text())

    small = tmp_path / "sharded"
    convert(src, small, UpcycleConfig.from_shorthand("E4G1T2", router="topk_then_softmax"),
            write=WriteOptions("hf", hf_arch="qwen2_moe", max_shard_size="40KB"), progress=False)
    sizes = [p.stat().st_size for p in small.glob("*.safetensors")]
    assert len(sizes) > 3 and max(sizes) < parse_size("40KB") + 30_000  # a shard ends at the tensor that crosses 40KB
    assert (logits(load_hf(small)) - logits(model)).abs().max().item() < 1e-5
    assert parse_size("2GiB") == 2 * 1024 ** 3 and parse_size("5GB") == 5 * 10 ** 9


def test_bytes_reach_disk_as_each_layer_is_computed(dense, tmp_path):
    """The shard's header is fixed up front, so a layer's bytes are on disk before the next layer is computed:
    memory stays at one layer whatever the shard size (here one shard holds the whole model)."""
    from nemo_upcycle.checkpoint import make_writer
    from nemo_upcycle.convert import LayerStream, plan_conversion

    _, src = dense["llama"]
    recipe = UpcycleConfig.from_shorthand("E8G1T2", router="topk_then_softmax")
    on_disk = {}
    with open_checkpoint(src) as reader:
        plan = plan_conversion(reader, recipe)
        writer = make_writer(tmp_path / "moe", WriteOptions("hf", hf_arch="mixtral"))
        stream = LayerStream(reader, plan)

        def fetch(name):  # record what is on disk when layer 1 is first asked for
            if name.startswith("decoder.layers.1.") and not on_disk:
                on_disk["bytes"] = sum(f.stat().st_size for f in tmp_path.rglob("*.safetensors"))
            return stream.fetch(name)

        writer.write(plan.moe, plan.outputs, fetch, reader.meta())
        planned = writer.hf_tensors(plan.moe, plan.outputs)
    before = sum(t.nbytes for n, t in planned.items() if n.startswith(("model.embed_tokens", "model.layers.0.")))
    layer1 = sum(t.nbytes for n, t in planned.items() if n.startswith("model.layers.1."))
    total = (tmp_path / "moe" / "model-00001-of-00001.safetensors").stat().st_size
    assert before - 8192 <= on_disk["bytes"] <= total - layer1  # layer 0 written (less a file buffer), layer 1 not


@pytest.mark.parametrize("source, arch, router", [("qwen3", "qwen3_moe", "softmax_then_topk"),
                                                  ("llama-llama3-tied", "qwen2_moe", "softmax_then_topk"),
                                                  ("mistral", "mixtral", "topk_then_softmax")])
def test_transformers_own_save_of_the_export_is_the_same_checkpoint(dense, tmp_path, source, arch, router):
    """What we write equals what transformers writes for the same model: same names, shapes, dtypes, values."""
    _, src = dense[source]
    moe = export(src, tmp_path / "ours", arch, router=router, shorthand="E2G2T2")
    moe.save_pretrained(tmp_path / "theirs")
    ours, theirs = folder_tensors(tmp_path / "ours"), folder_tensors(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    with open_checkpoint(tmp_path / "ours") as a, open_checkpoint(tmp_path / "theirs") as b:  # its config.json too
        assert a.config == b.config


def test_corrupt_sentencepiece_artifact_is_a_one_line_error(tmp_path):
    """A .nemo's SentencePiece tokenizer becomes the export's tokenizer.model: a corrupt one is named, not a
    RuntimeError from inside sentencepiece, and nothing is written."""
    model = random_model(small_config(activation="swiglu", normalization="rmsnorm", rotary_percentage=1.0))
    src = write_nemo_dir(tmp_path / "in", model, spm=b"this is not a sentencepiece model", layout="legacy")
    artifact = next(src.glob("*_tokenizer.model")).name
    with pytest.raises(UpcycleError) as err:
        export(src, tmp_path / "moe", "qwen2_moe")
    line = str(err.value)
    assert line.startswith(f"tokenizer nemo:{artifact} is not a SentencePiece model (RuntimeError: INTERNAL: ")
    assert line.endswith("): replace it with the model's tokenizer .model file")
    assert not (tmp_path / "moe").exists()
