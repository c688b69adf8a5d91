"""`--verify` hashes every expert tensor against what the recipe says it must be (which dense shard, which
scale), through the output's reader, so a lost, duplicated or mis-ordered expert is named whatever the layout:
Hugging Face per-expert tensors, Megatron torch_dist with stacked layers, or per-layer keys."""

from __future__ import annotations

import json

import pytest

from nemo_upcycle.checkpoint import WriteOptions, make_writer, open_checkpoint
from nemo_upcycle.cli import main
from nemo_upcycle.convert import LayerStream, convert, plan_conversion
from nemo_upcycle.recipe import UpcycleConfig
from nemo_upcycle.verify import VerifyOptions, verify_conversion
from tests.hf_fixtures import rewrite_tensors, save_dense


def problems(dense_path, out_path, recipe) -> list[str]:
    with open_checkpoint(dense_path) as dense, open_checkpoint(out_path) as moe:
        result = verify_conversion(dense, moe, recipe)
    bad = [c["problem"] for c in result["checksums"] if c["problem"]]
    assert result["status"].startswith("FAILED") == bool(bad)
    return bad


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "dense"
    save_dense(path, "llama")
    return path


def test_a_swapped_and_a_duplicated_expert_in_a_hugging_face_export_are_named(dense, tmp_path):
    recipe = UpcycleConfig.from_shorthand("E4G2T2", drop_ratio=0.5)  # every expert distinct
    out = tmp_path / "moe"
    convert(dense, out, recipe, write=WriteOptions("hf", hf_arch="qwen2_moe"), progress=False)
    assert problems(dense, out, recipe) == []
    layer = "model.layers.1.mlp.experts."

    def tamper(name, t):
        swap = {f"{layer}2.down_proj.weight": f"{layer}5.down_proj.weight",
                f"{layer}5.down_proj.weight": f"{layer}2.down_proj.weight"}
        if name in swap:
            return original[swap[name]]
        if name.startswith("model.layers.0.mlp.experts.7.") and "down" not in name:  # expert 6 duplicated into 7
            return original[name.replace("experts.7.", "experts.6.")]
        return t

    from tests.hf_fixtures import folder_tensors

    original = folder_tensors(out)
    rewrite_tensors(out, tamper)
    found = problems(dense, out, recipe)
    assert len(found) == 3, found
    # s = E*G^2/T = 8, a power of two: split exactly as up x4, down x2 (recipe.experts.power_of_two_split)
    assert found[0].startswith("layer 0 expert 7 linear_fc1.weight: expected dense shard 1 (gate x1, up x4),")
    assert found[0].endswith("found the tensor of expert 6 (duplicated or mis-ordered?)")
    assert found[1] == ("layer 1 expert 2 linear_fc2.weight: expected dense shard 0 x2, 0.5 of its neurons "
                        "re-drawn (seed 1234), found the tensor of expert 5 (duplicated or mis-ordered?)")
    assert found[2].startswith("layer 1 expert 5 linear_fc2.weight") and found[2].endswith("of expert 2 (duplicated "
                                                                                            "or mis-ordered?)")


def _write_tampered(dense, out, recipe, output_format, tamper):
    """A real checkpoint written by the real writer, from a stream whose tensors `tamper` corrupts."""
    with open_checkpoint(dense) as reader:
        plan = plan_conversion(reader, recipe)
        stream = LayerStream(reader, plan)
        writer = make_writer(out, WriteOptions(output_format))
        writer.write(plan.moe, plan.outputs, lambda n: tamper(n, stream.fetch(n)), reader.meta())


@pytest.mark.parametrize("layers", [None, (1,)])  # torch_dist stacked layers, and per-layer keys
def test_a_lost_expert_and_a_mis_scaled_one_in_a_megatron_checkpoint_are_named(megatron, dense, tmp_path, layers):
    recipe = UpcycleConfig.from_shorthand("E4G2T2", router="topk_then_softmax", layers=layers)

    def tamper(name, t):
        if name == "decoder.layers.1.mlp.experts.linear_fc1.weight":
            t = t.clone()
            t[3] = 0  # expert 3 lost
            t[4, t.shape[1] // 2:] *= 2  # expert 4's up half twice as large
        return t

    _write_tampered(dense, tmp_path / "mlm", recipe, "megatron", tamper)
    found = problems(dense, tmp_path / "mlm", recipe)
    assert len(found) == 2, found
    # s = G = 2: all of it on down_proj, so up keeps its dense values (power_of_two_split)
    assert found[0] == ("layer 1 expert 3 linear_fc1.weight: expected dense shard 1 (gate x1, up x1), "
                        "found zeros (a lost expert?)")
    assert found[1].startswith("layer 1 expert 4 linear_fc1.weight: expected dense shard 0 (gate x1, up x1), "
                               "found a tensor the recipe does not make (sha256 ")


def test_cli_verify_writes_per_expert_checksums_next_to_the_output(dense, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["convert", str(dense), str(out), "--recipe", "E2G2T2", "--router", "softmax_then_topk",
                 "--shared-expert", "--format", "hf", "--hf-arch", "qwen2_moe", "--verify", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "PASSED" in text and "all 24 tensors match the recipe" in text
    records = json.loads((tmp_path / "moe.checksums.json").read_text())
    experts = [r for r in records if r["expert"] is not None]
    assert len(experts) == 2 * 4 * 2  # layers x experts x (fc1, fc2)
    assert {r["tensor"] for r in records if r["expert"] is None} == {
        "mlp.router.weight", "mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight",
        "mlp.shared_experts.gate_weight"}
    assert all(r["expected_sha256"] == r["found_sha256"] and r["problem"] is None for r in records)
    assert records[1]["expected"] == "dense shard 0 (gate x1, up x1)"  # E2G2T2, s = E*G^2/T / 2 = 2, all on down


def test_torch_dist_verify_passes_for_a_good_conversion_with_drop_upcycling(dense, tmp_path):
    recipe = UpcycleConfig.from_shorthand("E2G2T2", drop_ratio=0.25, seed=7)
    s = convert(dense, tmp_path / "moe.nemo", recipe, verify=VerifyOptions(), progress=False)
    assert s.verify["status"] == "not checked (no exact guarantee)"  # no identity for Drop-Upcycling ...
    assert s.verify["expert checksums"] == "all 18 tensors match the recipe"  # ... but the checksums still hold
