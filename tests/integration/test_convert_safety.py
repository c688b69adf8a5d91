"""Bad input gets one-line errors; outputs are atomic; inputs are never touched; memory stays bounded."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from nemo_upcycle.checkpoint import WriteOptions, open_checkpoint
from nemo_upcycle.cli import main
from nemo_upcycle.convert import LayerStream, convert
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.recipe import UpcycleConfig
from nemo_upcycle.verify import VerifyOptions, verify_conversion
from tests.conftest import random_model, small_config
from tests.nemo_fixtures import pack_nemo, spm_model_bytes, write_nemo_dir

RECIPE = UpcycleConfig.from_shorthand("E2G2T2")


@pytest.fixture
def dense_dir(megatron, tmp_path):
    return write_nemo_dir(tmp_path / "dense", random_model(small_config()), spm=None)


def one_line_error(fn, match: str) -> str:
    with pytest.raises(UpcycleError) as err:
        fn()
    text = str(err.value)
    assert match in text and "\n" not in text, text
    return text


def test_missing_input(tmp_path):
    one_line_error(lambda: convert(tmp_path / "nope.nemo", tmp_path / "out", RECIPE), "does not exist")


def test_not_a_tar_and_truncated_tar(dense_dir, tmp_path):
    bogus = tmp_path / "bogus.nemo"
    bogus.write_bytes(b"this is not a tar file at all" * 100)
    one_line_error(lambda: open_checkpoint(bogus), "is not a readable tar archive")
    whole = pack_nemo(dense_dir, tmp_path / "whole.nemo").read_bytes()
    cut = tmp_path / "cut.nemo"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    one_line_error(lambda: open_checkpoint(cut), "truncated")


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink"])
def test_unsafe_tar_members_are_refused_before_reading(tmp_path, kind):
    path = tmp_path / "evil.nemo"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("./model_config.yaml")
        data = b"num_layers: 1\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        evil = tarfile.TarInfo({"absolute": "/etc/evil", "dotdot": "./../evil"}.get(kind, "./link"))
        if kind == "symlink":
            evil.type, evil.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            evil.type, evil.linkname = tarfile.LNKTYPE, "model_config.yaml"
        tar.addfile(evil, io.BytesIO(b"") if evil.isfile() else None)
    one_line_error(lambda: open_checkpoint(path), "unsafe member" if kind in ("absolute", "dotdot") else "is a link")


def _edit_config(directory: Path, **changes):
    cfg = yaml.safe_load((directory / "model_config.yaml").read_text())
    cfg.update(changes)
    (directory / "model_config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize("changes, message", [
    (dict(activation="quick-geglu"), "unsupported activation 'quick-geglu'"),
    (dict(normalization="batchnorm"), "unsupported normalization 'batchnorm'"),
    (dict(ffn_hidden_size=96), "shape mismatch for decoder.layers.0.mlp.linear_fc1.weight"),
    (dict(num_layers=3), "is missing tensor decoder.layers.2"),
    (dict(position_embedding_type="learned_absolute"), "unsupported position_embedding_type"),
])
def test_config_and_weight_mismatches(dense_dir, tmp_path, changes, message):
    _edit_config(dense_dir, **changes)
    one_line_error(lambda: convert(dense_dir, tmp_path / "out.nemo", RECIPE, progress=False), message)


def test_legacy_checkpoint_with_a_missing_key(megatron, tmp_path):
    d = write_nemo_dir(tmp_path / "legacy", random_model(small_config()), spm=None, layout="legacy")
    sd = torch.load(d / "model_weights.ckpt", weights_only=False)
    del sd["model.decoder.layers.1.self_attention.linear_proj.weight"]
    torch.save(sd, d / "model_weights.ckpt")
    one_line_error(lambda: convert(d, tmp_path / "out.nemo", RECIPE, progress=False),
                   "is missing tensor decoder.layers.1.self_attention.linear_proj.weight")


def test_input_already_moe_and_invalid_recipe(dense_dir, tmp_path):
    convert(dense_dir, tmp_path / "moe.nemo", RECIPE, progress=False)
    one_line_error(lambda: convert(tmp_path / "moe.nemo", tmp_path / "again.nemo", RECIPE, progress=False),
                   "already an MoE model")
    one_line_error(lambda: convert(dense_dir, tmp_path / "x.nemo", UpcycleConfig(expansion=1, granularity=3, topk=3),
                                   progress=False), "ffn_hidden_size 64 is not divisible by granularity 3")


def test_not_enough_disk_is_checked_before_writing(dense_dir, tmp_path, monkeypatch):
    full_disk = shutil._ntuple_diskusage(total=10**9, used=10**9 - 1000, free=1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full_disk)
    one_line_error(lambda: convert(dense_dir, tmp_path / "out.nemo", RECIPE, progress=False), "not enough free disk")
    assert not any(tmp_path.glob("*out*"))


def test_refuses_to_overwrite_unless_told(dense_dir, tmp_path):
    out = tmp_path / "out.nemo"
    out.write_text("precious")
    one_line_error(lambda: convert(dense_dir, out, RECIPE, progress=False), "already exists")
    assert out.read_text() == "precious"
    convert(dense_dir, out, RECIPE, write=WriteOptions(overwrite=True), progress=False)
    assert tarfile.is_tarfile(out)


def test_refuses_an_output_that_is_holds_or_lies_inside_the_input(dense_dir, tmp_path):
    packed = pack_nemo(dense_dir, tmp_path / "in.nemo")
    before = packed.read_bytes()
    for source, out in ((packed, packed), (packed, tmp_path), (dense_dir, dense_dir / "moe.nemo")):
        one_line_error(lambda: convert(source, out, RECIPE, write=WriteOptions(overwrite=True), progress=False),
                       "is, holds or lies inside the input")
    assert packed.read_bytes() == before and not (dense_dir / "moe.nemo").exists()


def test_overwrite_replaces_a_link_not_its_target(dense_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("precious")
    link = tmp_path / "out.nemo"
    link.symlink_to(elsewhere, target_is_directory=True)
    one_line_error(lambda: convert(dense_dir, link, RECIPE, progress=False), "already exists")
    convert(dense_dir, link, RECIPE, write=WriteOptions(overwrite=True), progress=False)
    assert tarfile.is_tarfile(link) and not link.is_symlink()
    assert (elsewhere / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "elsewhere", "out.nemo"]  # no temporary left


def test_an_output_that_appears_while_writing_is_not_replaced(dense_dir, tmp_path, monkeypatch):
    out = tmp_path / "out.nemo"
    original = LayerStream._compute_layer

    def another_process_writes_out(self, i):
        out.write_text("someone else's")
        original(self, i)

    monkeypatch.setattr(LayerStream, "_compute_layer", another_process_writes_out)
    text = one_line_error(lambda: convert(dense_dir, out, RECIPE, progress=False), "appeared while the output")
    assert out.read_text() == "someone else's"
    kept = Path(text.split(" is kept as ")[1].split(";")[0])
    assert tarfile.is_tarfile(kept) and kept.parent.parent == tmp_path  # the finished output, not lost


def test_free_disk_is_measured_where_a_new_output_folder_will_be(tmp_path, monkeypatch):
    from nemo_upcycle.checkpoint.archive import check_free_disk

    asked = []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: asked.append(Path(path)) or
                        shutil._ntuple_diskusage(total=10**9, used=0, free=10**9))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    check_free_disk(tmp_path / "new" / "deeper" / "out.nemo", 10)
    assert asked == [tmp_path]


def test_tar_headers_hold_members_past_8_gib():
    from nemo_upcycle.checkpoint.archive import TarWriter

    for size in (8 ** 11 - 1, 8 ** 11, 11_300_000_000):
        block = TarWriter._header("model_weights/__0_0.distcp", size)
        info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        assert len(block) == tarfile.BLOCKSIZE and info.size == size and info.name == "./model_weights/__0_0.distcp"


@pytest.mark.parametrize("mode", ["w:bz2", "w:xz"])
def test_bz2_and_xz_nemo_files_are_read_by_extraction(dense_dir, tmp_path, mode):
    packed = tmp_path / f"in.{mode[2:]}.nemo"
    with tarfile.open(packed, mode) as tar:
        tar.add(dense_dir, arcname=".")
    convert(packed, tmp_path / "moe.nemo", RECIPE, progress=False)
    assert tarfile.is_tarfile(tmp_path / "moe.nemo")


@pytest.mark.parametrize("threshold", [float("nan"), -1.0, float("inf")])
def test_a_verify_threshold_that_could_not_pass_or_fail_is_refused(dense_dir, tmp_path, threshold):
    one_line_error(lambda: convert(dense_dir, tmp_path / "o.nemo", RECIPE, verify=VerifyOptions(threshold=threshold),
                                   progress=False), "must be a finite relative loss gap >= 0")
    assert not (tmp_path / "o.nemo").exists()


def test_a_verify_text_too_short_to_measure_fails_before_writing(megatron, tmp_path):
    with_tokenizer = write_nemo_dir(tmp_path / "spm_dense", random_model(small_config()), spm_model_bytes(tmp_path))
    one_line_error(lambda: convert(with_tokenizer, tmp_path / "o.nemo", RECIPE, verify=VerifyOptions(text=""),
                                   progress=False), "the verify text gives fewer than 2 tokens")
    assert not (tmp_path / "o.nemo").exists()


def test_a_verified_conversion_tokenizes_its_text_once_and_measures_on_it(megatron, tmp_path, monkeypatch):
    import nemo_upcycle.convert as convert_module
    import nemo_upcycle.verify as verify_module

    calls, original = [], verify_module.verify_tokens

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(verify_module, "verify_tokens", counting)
    monkeypatch.setattr(convert_module, "verify_tokens", counting)
    with_tokenizer = write_nemo_dir(tmp_path / "spm_dense", random_model(small_config()), spm_model_bytes(tmp_path))
    text = "Rivers carry sand to the sea. " * 3
    summary = convert(with_tokenizer, tmp_path / "o.nemo", RECIPE, verify=VerifyOptions(text=text), progress=False)
    assert len(calls) == 1
    n = original(calls[0][0], calls[0][1], text).shape[1]
    assert n < 512 and f"loss dense / MoE ({n} tokens of held-out text)" in summary.verify


def test_the_hydra_path_takes_every_option_and_refuses_unknown_ones(dense_dir, tmp_path):
    from nemo_upcycle.convert import convert_from_config

    base = {"input": str(dense_dir), "output": str(tmp_path / "o.nemo"), "recipe": {"shorthand": "E2G2T2"}}
    for extra, message in (({"foo": 1}, "unknown option foo in the convert config"),
                           ({"target_engine": "bogus"}, "target_engine must be one of vllm, llama.cpp, sglang"),
                           ({"gguf_dtype": "int8"}, "gguf_dtype must be one of"),
                           ({"verify": 0, "verify_threshold": -1}, "must be a finite relative loss gap"),
                           ({"verify_data": str(tmp_path / "nope.txt")}, f"verify_data={tmp_path / 'nope.txt'} is not a file"),
                           ({"verify_data": 3}, "verify_data=3 is not a file"),
                           ({"max_shard_size": "1GB"}, "max_shard_size applies to output_format=hf only, not nemo")):
        one_line_error(lambda: convert_from_config({**base, **extra}), message)
    assert not (tmp_path / "o.nemo").exists()
    text = tmp_path / "text.txt"
    text.write_text("Rivers carry sand to the sea. " * 40)
    summary = convert_from_config({**base, "verify": 0, "verify_data": str(text), "verify_threshold": 0.5})
    assert summary.verify["status"] == "PASSED"


def test_the_shipped_hydra_config_converts_with_its_defaults_and_shards_only_hf(dense_dir, tmp_path):
    """conf/upcycle.yaml as examples/convert.py composes it: its defaults convert a .nemo (a max_shard_size default
    was refused there for every output but hf), and a shard size given for a .nemo output is a one-line error."""
    from omegaconf import OmegaConf

    from nemo_upcycle.convert import convert_from_config
    from nemo_upcycle.train.run import load_config

    def composed(*overrides: str) -> dict:
        cfg = load_config([f"input={dense_dir}", f"output={tmp_path / 'o.nemo'}", *overrides], config_name="upcycle")
        return OmegaConf.to_container(cfg, resolve=True)

    one_line_error(lambda: convert_from_config(composed("max_shard_size=2GB")),
                   "max_shard_size applies to output_format=hf only, not nemo: drop it")
    summary = convert_from_config(composed("recipe.shorthand=E2G2T2"))
    assert (tmp_path / "o.nemo").is_file() and "E2G2T2" in summary.table()


def test_interrupted_run_leaves_nothing_that_looks_complete(dense_dir, tmp_path, monkeypatch):
    original = LayerStream._compute_layer

    def fail_on_layer_one(self, i):
        if i == 1:
            raise KeyboardInterrupt
        original(self, i)

    monkeypatch.setattr(LayerStream, "_compute_layer", fail_on_layer_one)
    before = {p: p.stat().st_mtime_ns for p in dense_dir.rglob("*")}
    for fmt in ("nemo", "megatron"):
        with pytest.raises(KeyboardInterrupt):
            convert(dense_dir, tmp_path / f"out-{fmt}", RECIPE, write=WriteOptions(fmt), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]  # no output, no leftovers
    assert {p: p.stat().st_mtime_ns for p in dense_dir.rglob("*")} == before  # input untouched


def test_verify_catches_a_misordered_expert(dense_dir, tmp_path):
    convert(dense_dir, tmp_path / "moe.nemo", RECIPE, progress=False)
    dense, moe = open_checkpoint(dense_dir), open_checkpoint(tmp_path / "moe.nemo")
    assert verify_conversion(dense, moe, RECIPE)["status"] == "PASSED"
    read = moe.read

    def swapped(names):  # experts 0 and 1 of layer 1 trade places in fc2 only
        out = read(names)
        key = "decoder.layers.1.mlp.experts.linear_fc2.weight"
        if key in out:
            out[key] = out[key][[1, 0, 2, 3]]
        return out

    moe.read = swapped
    assert verify_conversion(dense, moe, RECIPE)["status"].startswith("FAILED")


def test_cli_dry_run_writes_nothing_and_errors_are_one_line(dense_dir, tmp_path, capsys):
    out = tmp_path / "out.nemo"
    assert main(["convert", str(dense_dir), str(out), "--recipe", "E8G8T8", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"decoder\.layers\.1\.mlp\.experts\.linear_fc1\.weight +\| 64x8x32 ", text)
    assert not out.exists()
    assert main(["convert", str(dense_dir), str(out), "--recipe", "E4G4T6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: top-k 6 must be a multiple of granularity 4 for virtual-group routing: pick topk "
                   "in multiples of G, or --router-init random")
    assert main(["convert", str(dense_dir), str(out), "--granularity", "2", "--topk", "2", "--num-experts", "8",
                 "--router", "sigmoid", "--verify", "--quiet"]) == 0
    assert "PASSED" in capsys.readouterr().out


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from nemo_upcycle.convert import convert, peak_rss_bytes
    from nemo_upcycle.recipe import UpcycleConfig
    recipe = UpcycleConfig.from_shorthand("E8G1T2")
    convert(sys.argv[3], sys.argv[4], recipe, progress=False)  # warm-up: lazy imports, allocator pools
    before = peak_rss_bytes()
    s = convert(sys.argv[1], sys.argv[2], recipe, progress=False)
    print(json.dumps({"baseline": before, "peak": s.peak_rss_bytes,
                      "layer_out": s.plan.bytes_out / s.plan.moe.num_layers}))
""")


def _write_legacy_dense(path: Path, layers: int, hidden: int = 512) -> Path:
    """A dense legacy .nemo of `layers` layers (8 MB MLPs at hidden 512), written without Megatron."""
    cfg = small_config(num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden, num_attention_heads=8,
                       num_query_groups=8, vocab_size=128)
    from nemo_upcycle.checkpoint.nemo_config import nemo_config_from_gpt
    from nemo_upcycle.models import GPTModel
    from nemo_upcycle.models.keys import local_to_te

    path.mkdir()
    (path / "model_config.yaml").write_text(yaml.safe_dump(nemo_config_from_gpt(cfg)))
    sd = local_to_te(GPTModel(cfg).state_dict(), cfg.moe_layer_pattern())
    torch.save({"model." + k: v for k, v in sd.items()}, path / "model_weights.ckpt")
    return path


def test_peak_memory_is_bounded_by_a_layer_not_the_model(tmp_path):
    """Peak RSS growth over the post-import baseline stays under 3x one layer's output, for 2 and for 8 layers."""
    results = {}
    tiny = _write_legacy_dense(tmp_path / "tiny", 1, hidden=64)
    for layers in (2, 8):
        src = _write_legacy_dense(tmp_path / f"dense{layers}", layers)
        args = [str(src), str(tmp_path / f"moe{layers}.nemo"), str(tiny), str(tmp_path / f"warm{layers}.nemo")]
        proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *args],
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[layers] = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results.values():
        assert r["peak"] - r["baseline"] < 3 * r["layer_out"], r
    growth = results[8]["peak"] - results[2]["peak"]
    assert growth < 0.5 * results[8]["layer_out"], results  # independent of the number of layers
