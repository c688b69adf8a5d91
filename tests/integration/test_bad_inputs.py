"""Every bad input is one line `error: ...` with exit 2: no traceback, no hang, nothing left behind.

One regression test per corrupted input the fuzz suite (benchmarks/fuzz_inputs.py) once broke on, each with
its exact message, and a sample of the fuzz suite itself (the full run is the benchmark)."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import signal
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_inputs import BAD_FLAGS, bad_results, build_seeds, run_fuzz, summarise
from nemo_upcycle.checkpoint import open_checkpoint
from nemo_upcycle.cli import main
from tests.conftest import random_model, small_config
from tests.nemo_fixtures import pack_nemo, write_nemo_dir


@pytest.fixture(scope="module")
def seeds(megatron, tmp_path_factory) -> dict[str, Path]:
    return build_seeds(tmp_path_factory.mktemp("fuzz") / "seeds")


@pytest.fixture
def copy(seeds, tmp_path):
    def make(kind: str) -> Path:
        target = tmp_path / kind
        (shutil.copytree if seeds[kind].is_dir() else shutil.copyfile)(seeds[kind], target)
        return target
    return make


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """A TMPDIR of this test's own, to see what a failed run leaves in it."""
    tmp = tmp_path / "private_tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    return tmp


def error_line(*argv: str | Path, seconds: int = 60) -> str:
    """Run `nemo-upcycle` in this process; assert exit 2 and a one-line error; return that line."""
    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail(f"hang: {argv}"))
    signal.alarm(seconds)
    try:
        with contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
    return lines[0]


def convert_error(inp: Path, out: Path, *extra: str) -> str:
    line = error_line("convert", inp, out, "--quiet", *extra)
    assert not out.exists()
    return line


# ---- Hugging Face folders ---------------------------------------------------------------------------------------

def test_truncated_safetensors(copy, tmp_path):
    hf = copy("hf_single")
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert convert_error(hf, tmp_path / "o.nemo") == (
        f"error: {weights} is not a readable safetensors file (truncated or corrupt header?) (SafetensorError: "
        "Error while deserializing header: incomplete metadata, file not fully covered): re-download or re-copy it")


@pytest.mark.parametrize("text, message", [
    ("{", "is not valid JSON (JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 "
          "(char 1)): fix it or re-download config.json"),
    ("[]", "holds a JSON list, not an object: fix it or re-download config.json"),
])
def test_broken_config_json(copy, tmp_path, text, message):
    hf = copy("hf_single")
    (hf / "config.json").write_text(text)
    assert convert_error(hf, tmp_path / "o.nemo") == f"error: {hf / 'config.json'} {message}"


# ---- Megatron directories ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["abc", ""])
def test_bad_tracker_file(copy, tmp_path, text):
    lm = copy("megatron_lm")
    tracker = lm / "latest_checkpointed_iteration.txt"
    tracker.write_text(text)
    assert convert_error(lm, tmp_path / "o.nemo") == (
        f"error: {tracker} holds {text!r}, not an iteration number or 'release': write the iteration to convert "
        "into it (e.g. 1000), or pass the iter_XXXXXXX directory")


def test_truncated_distcp(copy, tmp_path):
    lm = copy("megatron_lm")
    data = sorted((lm / "iter_0000100").glob("*.distcp"))[-1]
    data.write_bytes(data.read_bytes()[:100])
    line = convert_error(lm, tmp_path / "o.nemo")
    assert line.startswith(f"error: the torch_dist metadata in {lm / 'iter_0000100'} declares a chunk of ")
    assert line.endswith(f" past the end of {data.name} (the file is truncated?): the checkpoint is corrupt or "
                         "was edited; re-copy it")


def test_corrupt_distcp_metadata(copy, tmp_path):
    lm = copy("megatron_lm")
    meta = lm / "iter_0000100" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:300])
    assert convert_error(lm, tmp_path / "o.nemo") == (
        f"error: unreadable torch_dist metadata in {lm / 'iter_0000100'} (UnpicklingError: pickle data was "
        "truncated): the checkpoint is corrupt or not torch_dist; re-copy it")


def test_pickle_payload_in_distcp_metadata_runs_nothing(copy, tmp_path, monkeypatch):
    """Protocol-4 dotted names reach other modules' types through DCP's own modules (filesystem imports operator):
    methodcaller(...)(itemgetter('os')(attrgetter('__init__.__globals__')(Metadata({})))) is os.system(...)."""
    def name(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()  # SHORT_BINUNICODE

    def dcp(module: str, attr: str) -> bytes:
        return name(f"torch.distributed.checkpoint.{module}") + name(attr) + b"\x93"  # STACK_GLOBAL

    payload = (b"\x80\x04" + dcp("filesystem", "operator.methodcaller") + name("system") + name("touch PWNED")
               + b"\x86R" + dcp("filesystem", "operator.itemgetter") + name("os") + b"\x85R"
               + dcp("filesystem", "operator.attrgetter") + name("__init__.__globals__") + b"\x85R"
               + dcp("metadata", "Metadata") + b"}\x85R" + b"\x85R" * 3 + b".")
    lm = copy("megatron_lm")
    (lm / "iter_0000100" / ".metadata").write_bytes(payload)
    monkeypatch.chdir(tmp_path)
    assert convert_error(lm, tmp_path / "o.nemo") == (
        f"error: unreadable torch_dist metadata in {lm / 'iter_0000100'} (UnpicklingError: refusing to load "
        "torch.distributed.checkpoint.filesystem.operator.methodcaller from checkpoint metadata): the checkpoint is "
        "corrupt or not torch_dist; re-copy it")
    assert not (tmp_path / "PWNED").exists()


def _rewrite_metadata(meta_file: Path, edit) -> None:
    from nemo_upcycle.checkpoint.torch_dist import _MetadataUnpickler

    meta = _MetadataUnpickler(io.BytesIO(meta_file.read_bytes())).load()
    edit(meta)
    meta_file.write_bytes(pickle.dumps(meta))


def test_metadata_declaring_2_31_stacked_layers_is_refused_at_once(copy, tmp_path):
    lm = copy("megatron_lm")
    fqn = "decoder.layers.mlp.linear_fc1.weight"

    def stack(meta):
        entry = meta.state_dict_metadata[fqn]
        entry.size = torch.Size([2 ** 31, *entry.size[1:]])
    _rewrite_metadata(lm / "iter_0000100" / ".metadata", stack)
    assert (lm / "iter_0000100" / ".metadata").stat().st_size < 20_000
    assert error_line("convert", lm, tmp_path / "o", "--dry-run", seconds=20) == (
        f"error: the torch_dist metadata in {lm / 'iter_0000100'} declares tensor {fqn} (2147483648, 64, 32) that "
        "its chunks do not cover: the checkpoint is corrupt or was edited; re-copy it")


def test_fifo_in_place_of_a_weight_file(copy, tmp_path):
    lm = copy("megatron_lm")
    data = sorted((lm / "iter_0000100").glob("*.distcp"))[0]
    data.unlink()
    os.mkfifo(data)
    assert error_line("convert", lm, tmp_path / "o.nemo", seconds=20) == (
        f"error: {data} is a FIFO, device or socket, not a regular file: replace it with the real file")


@pytest.mark.parametrize("text, message", [
    ("num_layers: [2\n", "is not valid YAML (ParserError: while parsing a flow sequence): fix its syntax (plain "
                         "YAML, no !!python tags)"),
    ("num_layers: !!python/object/apply:os.system ['touch PWNED']\n",
     "is not valid YAML (ConstructorError: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'): fix its syntax (plain YAML, no !!python tags)"),
])
def test_broken_model_config_yaml(copy, tmp_path, monkeypatch, text, message):
    plain = copy("megatron_model_config")
    config = tmp_path / "model.yaml"
    config.write_text(text)
    monkeypatch.chdir(tmp_path)
    assert convert_error(plain, tmp_path / "o.nemo", "--model-config", config) == f"error: model config {config} {message}"
    assert not (tmp_path / "PWNED").exists()


def test_tracker_naming_a_missing_iteration(copy, tmp_path):
    """No fall-back to another iter_* folder: the tracker says which iteration the user means."""
    lm = copy("megatron_lm")
    tracker = lm / "latest_checkpointed_iteration.txt"
    tracker.write_text("300")
    assert convert_error(lm, tmp_path / "o.nemo") == (
        f"error: {tracker} names iter_0000300, which is missing from {lm} (or has no .metadata; iterations there: "
        "iter_0000100): fix latest_checkpointed_iteration.txt, or pass the iter_XXXXXXX directory")


def test_model_config_errors_name_the_file_given_and_other_inputs_refuse_it(copy, tmp_path, monkeypatch):
    config = tmp_path / "model.yaml"
    config.write_text("num_layers: 2\n")
    monkeypatch.chdir(tmp_path)
    assert convert_error(copy("megatron_model_config"), tmp_path / "o.nemo", "--model-config", config) == (
        "error: the --model-config file has no 'hidden_size': is this a NeMo GPT checkpoint?")
    nemo = copy("nemo_tar")
    assert convert_error(nemo, tmp_path / "o.nemo", "--model-config", config) == (
        f"error: --model-config FILE is read only for Megatron checkpoints; {nemo} is a nemo "
        "checkpoint, which carries its own config: drop --model-config FILE")


# ---- .nemo files ------------------------------------------------------------------------------------------------

def test_pickle_payload_in_a_legacy_checkpoint(copy, tmp_path, monkeypatch):
    class Payload:
        def __reduce__(self):
            return os.system, ("touch PWNED",)

    legacy = tmp_path / "legacy"
    with tarfile.open(copy("nemo_legacy_tp2")) as tar:
        tar.extractall(legacy, filter="data")
    torch.save({"state_dict": {"x": Payload()}}, legacy / "mp_rank_01" / "model_weights.ckpt")
    monkeypatch.chdir(tmp_path)
    line = convert_error(legacy, tmp_path / "o.nemo")
    assert line.startswith(f"error: cannot read model_weights.ckpt in {legacy} (Weights only load failed.")
    assert line.endswith("): truncated, corrupt or holding objects other than tensors; re-export it with torch.save")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("kind", ["nemo_gzip", "nemo_legacy_tp2"])
def test_failed_extracting_read_leaves_no_temp_copy(copy, tmp_path, private_tmp, kind):
    """gzip and legacy .nemo files are extracted to a temporary directory; a failure after it is removed."""
    source = tmp_path / "source"
    with tarfile.open(copy(kind)) as tar:
        tar.extractall(source, filter="data")
    cfg = yaml.safe_load((source / "model_config.yaml").read_text())
    (source / "model_config.yaml").write_text(yaml.safe_dump({**cfg, "layernorm_epsilon": "tiny"}))
    bad = pack_nemo(source, tmp_path / "bad.nemo", gzip=kind == "nemo_gzip")
    assert convert_error(bad, tmp_path / "o.nemo") == "error: model config layernorm_epsilon must be float, got 'tiny'"
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize("kind", ["nemo_gzip", "nemo_legacy_tp2"])
def test_extraction_checks_the_temporary_folder_has_room(copy, tmp_path, private_tmp, monkeypatch, kind):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100)
                        if Path(path).is_relative_to(private_tmp) else real(path))
    source = copy(kind)
    line = convert_error(source, tmp_path / "o.nemo")
    assert line.startswith(f"error: not enough free disk for extracting {source} (compressed or legacy: it cannot "
                           "be read in place): need ")
    assert line.endswith(": set TMPDIR to a folder with room, or extract the .nemo yourself (tar -xf) and pass "
                         "the folder")
    assert list(private_tmp.iterdir()) == []


def _legacy_pp2_with_output_copy(directory: Path, change: float) -> Path:
    """A legacy PP=2 .nemo with tied embeddings whose last stage also saves output_layer.weight, as Megatron's does
    (a post_process stage without pre_process keeps a synced copy of the embedding): that copy plus `change`."""
    model = random_model(small_config(share_embeddings_and_output_weights=True))
    write_nemo_dir(directory, model, None, layout="legacy", pp=2)
    last = directory / "tp_rank_00_pp_rank_001" / "model_weights.ckpt"
    embedding = model.state_dict()["embedding.word_embeddings.weight"]
    torch.save({**torch.load(last, weights_only=False), "model.output_layer.weight": embedding + change}, last)
    return directory


def test_legacy_last_stage_copy_of_a_tied_embedding_is_dropped(tmp_path):
    source = _legacy_pp2_with_output_copy(tmp_path / "tied", 0.0)
    assert main(["convert", str(source), str(tmp_path / "o.nemo"), "--quiet"]) == 0
    with open_checkpoint(tmp_path / "o.nemo") as reader:
        assert reader.config.share_embeddings_and_output_weights and "output_layer.weight" not in reader.tensors()


def test_legacy_last_stage_output_layer_differing_from_a_tied_embedding(tmp_path):
    source = _legacy_pp2_with_output_copy(tmp_path / "tied", 1.0)
    assert convert_error(source, tmp_path / "o.nemo") == (
        f"error: {source} holds an output_layer.weight that differs from its word embedding, but model_config.yaml "
        "says share_embeddings_and_output_weights: set it to false if the model's output layer is untied")


# ---- command line and Hydra ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--granularity", "0"], "granularity must be a positive integer, got 0"),
    (["--num-experts", "8", "--granularity", "0"],
     "--num-experts 8 and granularity 0 must be positive integers"),
    (["--layers", "0,x"], "--layers must be comma-separated 0-based layer indices, e.g. 0,2,4; got '0,x'"),
    (["--recipe", "E999999G1T2"],
     "999999 experts (= E*G = 999999*1) is more than the 4096 nemo-upcycle supports: lower expansion or granularity"),
    (["--verify", "-1"], "verify must be null (skip), 0 (all layers) or a positive number of layers, got -1"),
])
def test_bad_numeric_options(copy, tmp_path, args, message):
    assert error_line("convert", copy("nemo_tar"), tmp_path / "o.nemo", *args, seconds=20) == f"error: {message}"


def test_hydra_bad_verify_value_fails_before_any_output(copy, tmp_path):
    from benchmarks.fuzz_inputs import hydra_entry

    out = tmp_path / "o.nemo"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        hydra_entry(copy("nemo_tar"), out, ["verify=abc"])
    assert exit_.value.code == 2
    assert err.getvalue().strip() == ("error: verify must be null (skip), 0 (all layers) or a positive number of "
                                      "layers, got 'abc'")
    assert not out.exists() and list(tmp_path.glob(".o.nemo.tmp-*")) == []


# ---- the fuzz suite, sampled ----------------------------------------------------------------------------------------

def test_fuzz_sample(seeds, tmp_path):
    """A few hundred mutated inputs of every kind (the benchmark runs 10,000): all clean errors or successes."""
    workdir = seeds["nemo_dir"].parents[2]  # the seeds built once for this module
    results = run_fuzz(300, workdir, seed=12, timeout=20, progress=False)
    bad = bad_results(results)
    assert not bad, summarise(results) + "\n" + "\n".join(
        f"case {r.case.index} [{r.case.kind}] {r.outcome} {r.flags}: {r.description} -> {r.detail}" for r in bad[:10])
    outcomes = {r.outcome for r in results}
    assert outcomes == {"clean_error", "success"}
    assert not any(set(r.flags) & set(BAD_FLAGS) for r in results)


@settings(max_examples=300, deadline=None)
@given(recipe=st.one_of(st.none(), st.text(max_size=12), st.from_regex(r"E\d{1,7}G\d{1,3}T\d{1,3}", fullmatch=True)),
       numbers=st.dictionaries(st.sampled_from(["--expansion", "--granularity", "--topk", "--num-experts",
                                                "--layer-freq", "--seed"]), st.integers(-2 ** 40, 2 ** 40)),
       layers=st.one_of(st.none(), st.text(alphabet="0123456789,-x ", max_size=10)),
       weight_scaling=st.one_of(st.none(), st.text(max_size=6), st.floats().map(str)))
def test_any_recipe_options_build_a_recipe_or_a_one_line_error(recipe, numbers, layers, weight_scaling):
    """Whatever numbers and text the recipe options get, the recipe is built or refused with an UpcycleError."""
    from nemo_upcycle.cli import build_parser
    from nemo_upcycle.cli.convert import recipe_from_args
    from nemo_upcycle.errors import UpcycleError

    argv = ["convert", "in", "out"]
    for flag, value in [("--recipe", recipe), ("--layers", layers), ("--weight-scaling", weight_scaling)]:
        if value is not None:
            argv.append(f"{flag}={value}")
    for flag, value in numbers.items():
        argv.append(f"{flag}={value}")
    args = build_parser().parse_args(argv)
    try:
        config = recipe_from_args(args)
    except UpcycleError as err:
        assert "\n" not in str(err)
        return
    assert config is None or 1 <= config.topk <= config.num_experts <= 4096
