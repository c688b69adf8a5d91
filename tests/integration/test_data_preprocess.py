"""`nemo-upcycle preprocess`: real stdlib files, jsonl and folders become Megatron .bin/.idx files whose token
ids (read back with Megatron's own IndexedDataset) decode to the original documents plus EOD; a .nemo file's
own tokenizer is used; unsafe .nemo archives are refused; bad input gives one-line errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from nemo_upcycle.cli import build_parser, main
from nemo_upcycle.data.corpus import stdlib_files
from nemo_upcycle.checkpoint.nemo import NemoFiles
from nemo_upcycle.data.preprocess import preprocess
from nemo_upcycle.checkpoint import tokenizer_from_argument
from nemo_upcycle.data.tokenizers import ByteTokenizer, SentencePieceTokenizer
from nemo_upcycle.errors import UpcycleError
from tests.unit.test_data_tokenizers import ARTIFACT, assert_one_line_error, train_stdlib_sentencepiece

TOK = ByteTokenizer()


def read_back(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].copy() for i in range(len(dataset))]  # copies: the arrays view an mmap closed with it


def small_stdlib_files(n: int) -> list[Path]:
    return [p for p in stdlib_files() if 3_000 < p.stat().st_size < 12_000][:n]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_stdlib_sentencepiece(tmp_path_factory.mktemp("sp"))


def test_stdlib_files_round_trip_with_two_workers(tmp_path, capsys):
    files = small_stdlib_files(6)
    assert main(["preprocess", "--input", *map(str, files), "--tokenizer", "byte", "--workers", "2",
                 "--output-prefix", str(tmp_path / "out" / "stdlib")]) == 0
    docs = read_back(str(tmp_path / "out" / "stdlib_text_document"))
    tok = ByteTokenizer()
    assert len(docs) == len(files)
    for ids, path in zip(docs, files):  # input order kept across workers
        assert ids.dtype == np.uint16 and ids[-1] == tok.eod
        assert tok.decode(ids[:-1].tolist()) == path.read_text(encoding="utf-8")
    summary = capsys.readouterr().out.strip()
    tokens = sum(len(d) for d in docs)
    assert "\n" not in summary and summary.startswith(f"{len(files)} documents, {tokens:,} tokens")
    assert "tokens/s" in summary and not list((tmp_path / "out").glob("*tmp*"))


def test_jsonl_with_two_keys_and_sentencepiece(tmp_path, sp_model):
    records = [{"text": "def f(x):\n    return x  # héllo ✓\n", "title": "first"},
               {"text": "", "title": "an empty text is skipped"},
               {"text": "class A:\n\tpass\n", "title": "日本語 🙂"}]
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]) + "\n")
    tok = SentencePieceTokenizer(sp_model)
    stats = preprocess([data], tmp_path / "docs", tok, json_keys=["text", "title"], progress=False)
    assert (stats.documents, stats.empty, stats.bytes_in) == (3, 1, data.stat().st_size - 1)  # minus blank line
    for key in ("text", "title"):
        docs = read_back(str(tmp_path / f"docs_{key}_document"))
        expected = [r[key] for r in records if r[key]]
        assert [tok.decode(d[:-1].tolist()) for d in docs] == expected
        assert all(d[-1] == tok.eod for d in docs)
        assert [d[:-1].tolist() for d in docs] == [tok.encode(t) for t in expected]
    assert stats.tokens == sum(len(tok.encode(r[k])) + 1 for r in records for k in ("text", "title") if r[k])


def test_folder_glob_exclude_and_no_eod(tmp_path):
    root = tmp_path / "src"
    for name, text in {"b/x.py": "x = 1\n", "a.txt": "notes\n", "c.md": "not matched\n",
                       "b/__init__.py": "", "site-packages/pkg.py": "excluded\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    stats = preprocess([root], tmp_path / "tree", ByteTokenizer(), append_eod=False, progress=False)
    docs = read_back(str(tmp_path / "tree_text_document"))
    assert [bytes(d.tolist()).decode() for d in docs] == ["notes\n", "x = 1\n"]  # sorted paths, empty skipped
    assert (stats.documents, stats.empty) == (3, 1)


def fake_nemo(folder: Path, sp_model: Path, *, gzip: bool = False, extracted: bool = False) -> Path:
    """A NeMo 1.x-style .nemo: ./model_config.yaml naming its tokenizer as a `nemo:` artifact."""
    config = {"target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
              "num_layers": 2, "tokenizer": {"library": "sentencepiece", "type": None,
                                             "model": f"nemo:{ARTIFACT}", "vocab_file": None, "merge_file": None}}
    members = {"./model_config.yaml": yaml.safe_dump(config).encode(), f"./{ARTIFACT}": sp_model.read_bytes()}
    folder.mkdir(parents=True)
    if extracted:
        for name, data in members.items():
            (folder / name).write_bytes(data)
        return folder
    path = folder / ("model.nemo" if not gzip else "old.nemo")
    with tarfile.open(path, "w:gz" if gzip else "w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("kind", ["tar", "gzip", "extracted"])
def test_nemo_file_supplies_its_tokenizer(tmp_path, sp_model, kind):
    nemo = fake_nemo(tmp_path / "ckpt", sp_model, gzip=kind == "gzip", extracted=kind == "extracted")
    files = small_stdlib_files(2)
    assert main(["preprocess", "--input", *map(str, files), "--tokenizer", str(nemo), "--workers", "1",
                 "--output-prefix", str(tmp_path / "nemo")]) == 0
    tok = SentencePieceTokenizer(sp_model)
    docs = read_back(str(tmp_path / "nemo_text_document"))
    assert [d.tolist() for d in docs] == [tok.encode(p.read_text(encoding="utf-8")) + [tok.eod] for p in files]
    files_ = NemoFiles(nemo)
    assert files_.tokenizer.artifacts[ARTIFACT] == sp_model.read_bytes()
    files_.close()


def unsafe_tar(path: Path, bad: tarfile.TarInfo) -> Path:
    config = yaml.safe_dump({"tokenizer": {"library": "sentencepiece", "model": "nemo:x.model"}}).encode()
    with tarfile.open(path, "w:") as tar:
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(config)
        tar.addfile(info, io.BytesIO(config))
        if bad.isfile():
            bad.size = 4
            tar.addfile(bad, io.BytesIO(b"evil"))
        else:
            tar.addfile(bad)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("bad, fragment", [
    (_member("../x.model"), "unsafe member '../x.model'"),
    (_member("/tmp/x.model"), "unsafe member '/tmp/x.model'"),
    (_member("./x.model", tarfile.SYMTYPE, "/etc/passwd"), "'./x.model' is a link"),
    (_member("./x.model", tarfile.LNKTYPE, "model_config.yaml"), "'./x.model' is a link"),
    (_member("./x.model", tarfile.CHRTYPE), "'./x.model' is not a regular file"),
])
def test_unsafe_nemo_members_are_refused(tmp_path, bad, fragment):
    nemo = unsafe_tar(tmp_path / "evil.nemo", bad)
    with pytest.raises(UpcycleError) as excinfo:
        tokenizer_from_argument(str(nemo))
    assert_one_line_error(excinfo, fragment)
    assert not (tmp_path.parent / "x.model").exists()


def test_broken_nemo_files_are_one_line_errors(tmp_path, sp_model):
    junk = tmp_path / "junk.nemo"
    junk.write_bytes(b"not a tar")
    no_config = tmp_path / "no_config.nemo"
    with tarfile.open(no_config, "w:") as tar:
        tar.add(sp_model, arcname=f"./{ARTIFACT}")
    no_tokenizer = fake_nemo(tmp_path / "no_tok", sp_model, extracted=True)
    (no_tokenizer / "model_config.yaml").write_text("num_layers: 2\n")
    missing_artifact = fake_nemo(tmp_path / "missing", sp_model, extracted=True)
    (missing_artifact / ARTIFACT).unlink()
    for path, fragment in [(junk, "is not a readable tar archive"), (no_config, "has no model_config.yaml"),
                           (no_tokenizer, "has no tokenizer section"), (missing_artifact, f"'{ARTIFACT}' is missing")]:
        with pytest.raises(UpcycleError) as excinfo:
            tokenizer_from_argument(str(path))
        assert_one_line_error(excinfo, str(path), fragment)


def test_symlinked_artifact_in_extracted_nemo_is_refused(tmp_path, sp_model):
    folder = fake_nemo(tmp_path / "ckpt", sp_model, extracted=True)
    (folder / ARTIFACT).unlink()
    (folder / ARTIFACT).symlink_to(sp_model)
    with pytest.raises(UpcycleError) as excinfo:
        tokenizer_from_argument(str(folder))
    assert_one_line_error(excinfo, ARTIFACT, "is a link or lies outside the folder")


def run_cli_error(capsys, *argv: str) -> str:
    assert main(["preprocess", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_input_is_one_line_error(tmp_path, capsys):
    out = ["--tokenizer", "byte", "--output-prefix", str(tmp_path / "o")]
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hi"}\n')
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "readme.md").write_text("no match")
    cases = [
        (["--input", str(tmp_path / "missing.txt")], f"input {tmp_path / 'missing.txt'} does not exist"),
        (["--input", str(tmp_path / "empty.txt")], "is empty"),
        (["--input", str(tmp_path / "nothing")], "has no files matching *.py *.txt; change --glob"),
        (["--input", str(bad_json), "--workers", "2"], f"{bad_json}:3: not valid JSON"),
        (["--input", str(good), "--json-keys", "body"], f"{good}:1: no key 'body' (keys: 'text')"),
        ([], "nothing to preprocess; pass --input"),
        (["--input", str(good), "--workers", "0"], "--workers 0 must be 1 or more"),
        (["--input", str(good), "--json-keys", "text", "text"], "--json-keys text text repeats a key"),
    ]
    (tmp_path / "afile").write_text("")
    assert "is under a file, not a folder" in run_cli_error(capsys, "--input", str(good), "--tokenizer", "byte",
                                                              "--output-prefix", str(tmp_path / "afile" / "x"))
    for argv, fragment in cases:
        assert fragment in run_cli_error(capsys, *argv, *out)
    assert not list(tmp_path.glob("o_*"))  # no output and no temporary files left by failures
    assert main(["preprocess", "--input", str(good), *out]) == 0
    assert "pass --overwrite" in run_cli_error(capsys, "--input", str(good), *out)
    assert main(["preprocess", "--input", str(good), "--overwrite", *out]) == 0


def test_overwrite_never_pairs_a_new_bin_with_the_old_idx(tmp_path, monkeypatch):
    """A crash between the two renames of an overwrite leaves no dataset (the old .idx is gone), not the new
    tokens read through the old index."""
    import os

    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("one document\n")
    second.write_text("another, longer document\n" * 3)
    preprocess([first], tmp_path / "o", TOK, progress=False)
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk went away")
        real_replace(src, dst)

    monkeypatch.setattr("nemo_upcycle.data.preprocess.os.replace", crash_on_second)
    with pytest.raises(OSError, match="disk went away"):
        preprocess([second], tmp_path / "o", TOK, overwrite=True, progress=False)
    assert [Path(p).suffix for p in calls] == [".bin", ".idx"]
    assert not (tmp_path / "o_text_document.idx").exists() and not list(tmp_path.glob("*tmp*"))


def test_a_bad_input_is_the_only_line_a_fresh_process_prints(tmp_path):
    """Megatron's import warnings (no Transformer Engine, no Apex) came before the error line."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "nemo_upcycle.cli", "preprocess", "--input", str(tmp_path / "nope.jsonl"),
                          "--tokenizer", "byte", "--output-prefix", str(tmp_path / "o")], capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"error: input {tmp_path / 'nope.jsonl'} does not exist; pass existing files or folders to --input\n"


def test_sigterm_removes_the_temporary_files(tmp_path):
    """A scheduler's kill mid-run: the command unwinds as on Ctrl-C, exits 143, and leaves no files."""
    import signal
    import subprocess
    import sys
    import time

    prefix = tmp_path / "out" / "stdlib"
    proc = subprocess.Popen([sys.executable, "-m", "nemo_upcycle.cli", "preprocess", "--stdlib", "--tokenizer", "byte",
                             "--workers", "2", "--output-prefix", str(prefix)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in (tmp_path / "out").glob("*tmp*.bin")) and proc.poll() is None:
        assert time.monotonic() < deadline, "preprocess never started writing"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and err.strip().endswith("terminated") and "Traceback" not in err, err[-2000:]
    assert list((tmp_path / "out").iterdir()) == []


def test_help_explains_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["preprocess"]
    for action in sub._actions:
        assert action.help and len(action.help) > 20, action.option_strings
    assert "--stdlib" in sub.format_help() and "examples:" in sub.format_help()
