"""Fuzz `nemo-upcycle convert` with mutated inputs of every kind and classify what each run does.

Seeds are small valid checkpoints built here: .nemo as a directory, a tar, a gzip tar and a legacy TP=2 tar,
Megatron-LM (args in common.pt) and Megatron-Bridge (run_config.yaml) directories, a Megatron directory with a
`--model-config` YAML, Hugging Face single-file and sharded folders, and the Hydra entry point
(examples/convert.py, overrides composed by Hydra). Each case copies one seed, mutates it (bytes, truncation,
header fields, config values and types, hostile tar members, YAML tags and pickles) and/or the command line,
and runs the real entry point IN this process (`cli.main(argv)`, or the Hydra main with its composed config),
under a per-case alarm, with a private TMPDIR. Outcomes:

  clean error        exit 2 with a one-line `error: ...` (argparse's usage error included), no traceback
  success            exit 0 (or 1: --verify ran and reported FAILED), output written
  traceback          any other exception escaped the entry point (recorded: type and deepest project frame)
  hang               the case ran past its time limit

and counted on top of the outcome, the safety failures: files left in the private TMPDIR or beside the output
(`.out.tmp-*`), an output path present after a failed run, an input file changed, a payload executed.
Before the cases each unmutated seed is converted once (it must succeed): caches that libraries make in TMPDIR
on first use (torchinductor's cache directory, wandb's media directories at import) appear then, so a case's
private TMPDIR shows only what that case left.

    python benchmarks/fuzz_inputs.py --cases 10000 [--seed 0] [--timeout 30] [--workdir fuzz_out]

Target: 0 tracebacks, 0 hangs, 0 leftovers, 0 outputs after failure, 0 modified inputs, 0 payloads run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import struct
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KINDS = ("nemo_dir", "nemo_tar", "nemo_gzip", "nemo_legacy_tp2", "megatron_lm", "megatron_bridge",
         "megatron_model_config", "hf_single", "hf_sharded", "hydra")
KIND_LABELS = dict(zip(KINDS, (".nemo directory", ".nemo tar", ".nemo gzip tar", ".nemo legacy TP=2 tar", "Megatron-LM",
                               "Megatron-Bridge", "Megatron + --model-config", "HF single file", "HF sharded",
                               "Hydra entry point")))
PAYLOAD = "PWNED"  # a hostile YAML tag or pickle would create this file in the case directory


# ---- seeds ----------------------------------------------------------------------------------------------------

def build_seeds(directory: Path) -> dict[str, Path]:
    """One small valid input per kind (the Hydra kind reuses the .nemo tar). Built once; cached on disk."""
    import yaml

    from nemo_upcycle.compat import init_megatron
    from tests.conftest import random_model, small_config
    from tests.hf_fixtures import save_dense
    from tests.nemo_fixtures import (
        megatron_save, nemo_config, pack_nemo, spm_model_bytes, write_megatron_lm_dir, write_nemo_dir)

    seeds = {k: directory / k / "input" for k in KINDS}
    if (directory / "done").is_file():
        return seeds
    shutil.rmtree(directory, ignore_errors=True)
    init_megatron()
    cfg = small_config()
    model = random_model(cfg)
    for k in KINDS:
        (directory / k).mkdir(parents=True)
    (directory / "spm").mkdir()
    write_nemo_dir(seeds["nemo_dir"], model, spm=spm_model_bytes(directory / "spm"))  # with a tokenizer artifact
    pack_nemo(seeds["nemo_dir"], seeds["nemo_tar"])
    pack_nemo(seeds["nemo_dir"], seeds["nemo_gzip"], gzip=True)
    legacy = write_nemo_dir(directory / "legacy_dir", model, spm=None, layout="legacy", tp=2)
    pack_nemo(legacy, seeds["nemo_legacy_tp2"])
    shutil.rmtree(legacy)
    shutil.copyfile(seeds["nemo_tar"], seeds["hydra"])

    write_megatron_lm_dir(seeds["megatron_lm"], model)

    bridge = seeds["megatron_bridge"]
    megatron_save(model, bridge / "iter_0000000", prefix="")
    run_model = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
                 "num_query_groups": 2, "activation_func": {"_target_": "megatron.core.activations.squared_relu"},
                 "gated_linear_unit": False, "normalization": "LayerNorm", "layernorm_zero_centered_gamma": True,
                 "add_bias_linear": False, "position_embedding_type": "rope", "rotary_percent": 0.5,
                 "seq_length": 32, "share_embeddings_and_output_weights": False}
    (bridge / "iter_0000000" / "run_config.yaml").write_text(yaml.safe_dump({"model": run_model}))

    plain = seeds["megatron_model_config"]
    megatron_save(model, plain / "iter_0000000", prefix="")
    (plain / "model.yaml").write_text(yaml.safe_dump(nemo_config(cfg, None)))

    save_dense(seeds["hf_single"], "llama")
    hf = save_dense(directory / "hf_tmp", "llama", seed=1)
    hf.save_pretrained(seeds["hf_sharded"], max_shard_size="20KB")
    shutil.rmtree(directory / "hf_tmp")
    (directory / "done").write_text("ok")
    return seeds


# ---- mutations --------------------------------------------------------------------------------------------------

HOSTILE_VALUES = [0, -1, 1, 2 ** 31, 2 ** 63, 10 ** 30, 1.5, -0.0, float("nan"), float("inf"), True, None, "abc", "",
                  "0", "1e3", [], [0], [-1, "x"], {}, {"a": 1}, "nemo:../../etc/passwd", "/etc/passwd"]
HOSTILE_TEXT = ["{", "[]", "[", "null", "0", "a: [1,", ": :", "\xff\xfe\x00", "!!python/object/apply:os.system ['touch PWNED']",
                "key: !!python/object/apply:os.system ['touch PWNED']", "&a [*a]", "a: &a [*a, *a]", "{}" * 2000]
TRACKER_TEXT = ["abc", "", "-1", "99999999999", "release", "1e3", " 100 \n", "\u0661\u0660\u0660", "100\x00", "0x64"]


class _Evil:
    def __reduce__(self):
        return os.system, (f"touch {PAYLOAD}",)


@dataclass
class Case:
    kind: str
    index: int
    mutations: list[str] = field(default_factory=list)
    argv_extra: list[str] = field(default_factory=list)
    dry_run: bool = False
    output_format: str = "nemo"


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _pick_file(root: Path, rng: random.Random, prefer: tuple[str, ...] = ()) -> Path | None:
    files = _files(root)
    if not files:
        return None
    liked = [f for f in files if f.name.endswith(prefer)] if prefer else []
    return rng.choice(liked if liked and rng.random() < 0.6 else files)


def _mutate_bytes(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    how = rng.choice(["flip", "truncate", "empty", "append", "zero_block", "header_flip"])
    if how == "flip" and data:
        for _ in range(rng.choice([1, 2, 8, 64])):
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    elif how == "header_flip" and data:
        for _ in range(rng.choice([1, 4])):
            data[rng.randrange(min(len(data), 1024))] ^= rng.randrange(1, 256)
    elif how == "truncate":
        data = data[: rng.choice([0, 1, 8, len(data) // 3, len(data) // 2, max(len(data) - 1, 0)])]
    elif how == "empty":
        data = bytearray()
    elif how == "append":
        data += os.urandom(rng.choice([1, 100, 5000]))
    elif how == "zero_block" and data:
        start = rng.randrange(len(data))
        data[start:start + 4096] = bytes(len(data[start:start + 4096]))
    path.write_bytes(bytes(data))
    return f"bytes:{how}:{path.name}"


def _replace_special(path: Path, rng: random.Random) -> str:
    how = rng.choice(["fifo", "dir", "delete", "symlink_out", "dangling"])
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "dir":
        path.mkdir()
    elif how == "symlink_out":
        path.symlink_to("/etc/hostname")
    elif how == "dangling":
        path.symlink_to(path.parent / "does-not-exist")
    return f"special:{how}:{path.name}"


def _walk_set(obj, rng: random.Random):
    """Set a random nested key of a dict/list to a hostile value (or delete it); returns a description."""
    path = []
    while isinstance(obj, (dict, list)) and obj:
        key = rng.choice(list(obj)) if isinstance(obj, dict) else rng.randrange(len(obj))
        child = obj[key]
        if not isinstance(child, (dict, list)) or not child or rng.random() < 0.5:
            path.append(str(key))
            if isinstance(obj, dict) and rng.random() < 0.2:
                del obj[key]
                return ".".join(path) + "=<deleted>"
            value = rng.choice(HOSTILE_VALUES)
            obj[key] = value
            return ".".join(path) + f"={value!r}"[:60]
        path.append(str(key))
        obj = child
    return "<nothing>"


def _mutate_structured(path: Path, rng: random.Random) -> str:
    import yaml

    if rng.random() < 0.3:
        text = rng.choice(HOSTILE_TEXT)
        path.write_text(text, errors="surrogateescape")
        return f"text:{path.name}:{text[:30]!r}"
    is_json = path.suffix == ".json"
    try:
        data = json.loads(path.read_text()) if is_json else yaml.safe_load(path.read_text())
    except Exception:  # noqa: BLE001 - already mutated beyond parsing: mutate bytes instead
        return _mutate_bytes(path, rng)
    desc = _walk_set(data, rng)
    path.write_text(json.dumps(data) if is_json else yaml.safe_dump(data))
    return f"field:{path.name}:{desc}"


def _mutate_dcp_metadata(path: Path, rng: random.Random) -> str:
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from nemo_upcycle.checkpoint.torch_dist import _MetadataUnpickler

    meta = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    fqns = [k for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]
    fqn = rng.choice(fqns)
    entry = meta.state_dict_metadata[fqn]
    how = rng.choice(["stack_2_31", "size_zero", "size_grow", "chunk_size", "chunk_offset", "storage_length",
                      "storage_offset", "storage_path", "storage_drop", "dtype", "drop_tensor", "no_chunks"])
    size = list(entry.size)
    if how == "stack_2_31":
        size[0] = 2 ** 31
        entry.size = torch.Size(size)
    elif how == "size_zero":
        size[rng.randrange(len(size))] = 0
        entry.size = torch.Size(size)
    elif how == "size_grow":
        size[-1] *= rng.choice([2, 1000])
        entry.size = torch.Size(size)
    elif how == "chunk_size":
        chunk = rng.choice(entry.chunks)
        sizes = list(chunk.sizes)
        sizes[-1] = rng.choice([0, sizes[-1] * 2, 2 ** 40])
        entry.chunks[entry.chunks.index(chunk)] = type(chunk)(offsets=chunk.offsets, sizes=torch.Size(sizes))
    elif how == "chunk_offset":
        chunk = rng.choice(entry.chunks)
        offsets = list(chunk.offsets)
        offsets[0] = rng.choice([10 ** 6, 2 ** 40])
        entry.chunks[entry.chunks.index(chunk)] = type(chunk)(offsets=torch.Size(offsets), sizes=chunk.sizes)
    elif how.startswith("storage"):
        keys = [k for k in meta.storage_data if k.fqn == fqn]
        key = rng.choice(keys)
        info = meta.storage_data[key]
        if how == "storage_length":
            info.length = rng.choice([0, info.length * 1000, 2 ** 40])
        elif how == "storage_offset":
            info.offset = rng.choice([2 ** 40, info.offset + 10 ** 7])
        elif how == "storage_path":
            info.relative_path = rng.choice(["../../etc/passwd", "missing.distcp", "/etc/passwd"])
        else:
            del meta.storage_data[key]
    elif how == "dtype":
        entry.properties.dtype = rng.choice([torch.int8, torch.complex64, torch.bool, torch.float64])
    elif how == "drop_tensor":
        del meta.state_dict_metadata[fqn]
    else:
        entry.chunks = []
    path.write_bytes(pickle.dumps(meta))
    return f"dcp:{how}:{fqn}"


def _mutate_safetensors_header(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    how = rng.choice(["length_huge", "shape", "offsets", "dtype", "drop", "not_json"])
    if how == "length_huge":
        path.write_bytes(struct.pack("<Q", rng.choice([2 ** 40, n + 10 ** 6, 0])) + data[8:])
        return f"safetensors:{how}:{path.name}"
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    if how == "shape":
        header[name]["shape"] = rng.choice([[2 ** 31, 2], [], [0], [-1, 3], ["a"]])
    elif how == "offsets":
        header[name]["data_offsets"] = rng.choice([[0, 2 ** 40], [10, 5], [0, 1]])
    elif how == "dtype":
        header[name]["dtype"] = rng.choice(["I8", "XX", "F8_E4M3", "BOOL"])
    elif how == "drop":
        del header[name]
    raw = b"{not json" if how == "not_json" else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return f"safetensors:{how}:{name}"


def _mutate_tar(path: Path, rng: random.Random) -> str:
    how = rng.choice(["header_field", "hostile_member", "huge_member", "truncate_member"])
    data = bytearray(path.read_bytes())
    if how == "hostile_member":
        # rewrite the archive with one extra hostile member (gzip kept as gzip)
        compressed = data[:2] == b"\x1f\x8b"
        with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:*") as src:
            members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
        kind = rng.choice(["symlink", "hardlink", "dotdot", "absolute", "fifo", "device", "dup_config"])
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz" if compressed else "w:") as out:
            for m, body in members:
                out.addfile(m, io.BytesIO(body) if body is not None else None)
            extra = tarfile.TarInfo({"dotdot": "./../evil.txt", "absolute": "/tmp/evil.txt",
                                     "dup_config": "./model_config.yaml"}.get(kind, "./model_weights/evil"))
            body = b""
            if kind == "symlink":
                extra.type, extra.linkname = tarfile.SYMTYPE, "/etc/passwd"
            elif kind == "hardlink":
                extra.type, extra.linkname = tarfile.LNKTYPE, "/etc/passwd"
            elif kind == "fifo":
                extra.type = tarfile.FIFOTYPE
            elif kind == "device":
                extra.type, extra.devmajor, extra.devminor = tarfile.CHRTYPE, 1, 3
            else:
                body = b"hostile: !!python/object/apply:os.system ['touch PWNED']\n"
            extra.size = len(body)
            out.addfile(extra, io.BytesIO(body) if body else None)
        path.write_bytes(buf.getvalue())
        return f"tar:hostile:{kind}"
    if data[:2] == b"\x1f\x8b":  # gzip: header fields are inside the compressed stream
        return _mutate_bytes(path, rng)
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
    m = rng.choice(members)
    if how == "header_field":
        field_at = rng.choice([(0, 100), (124, 12), (156, 1), (100, 8), (345, 155)])
        start = m.offset + field_at[0]
        for i in range(start, start + field_at[1]):
            if rng.random() < 0.3:
                data[i] = rng.randrange(256)
        if rng.random() < 0.5:  # a valid checksum, so tarfile believes the mutated header
            block = data[m.offset:m.offset + 512]
            block[148:156] = b" " * 8
            data[m.offset + 148:m.offset + 156] = b"%06o\0 " % sum(block)
        path.write_bytes(bytes(data))
        return f"tar:header:{m.name}:{field_at[0]}"
    if how == "huge_member":
        block = data[m.offset:m.offset + 512]
        block[124:136] = b"%011o\0" % rng.choice([2 ** 33 - 1, m.size * 100, m.size + 1])
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        data[m.offset:m.offset + 512] = block
        path.write_bytes(bytes(data))
        return f"tar:huge_member:{m.name}"
    path.write_bytes(bytes(data[:m.offset_data + m.size // 2]))
    return f"tar:truncate_member:{m.name}"


def _mutate_pickle_file(path: Path, rng: random.Random) -> str:
    import torch

    how = rng.choice(["torch_payload", "raw_payload", "not_dict", "wrong_values"])
    if how == "torch_payload":
        torch.save({"state_dict": {"x": _Evil()}}, path)
    elif how == "raw_payload":
        path.write_bytes(pickle.dumps(_Evil()))
    elif how == "not_dict":
        torch.save(rng.choice([[1, 2], 3, "abc", None]), path)
    else:
        torch.save({"args": argparse.Namespace(num_layers="x", hidden_size=-1, num_attention_heads=0,
                                               ffn_hidden_size=None, position_embedding_type="rope"),
                    "state_dict": {"model.decoder.layers.0.x": torch.zeros(3)}}, path)
    return f"pickle:{how}:{path.name}"


def _mutate_tracker(path: Path, rng: random.Random) -> str:
    text = rng.choice(TRACKER_TEXT)
    path.write_text(text)
    return f"tracker:{text!r}"


def mutate_input(root: Path, kind: str, rng: random.Random) -> str:
    """One mutation of the input at `root` (a file or directory), chosen for what that kind holds."""
    choices: list[tuple[float, Callable[[], str]]] = []
    any_file = _pick_file(root, rng)
    if any_file is None:
        return "none"
    choices.append((3, lambda: _mutate_bytes(_pick_file(root, rng), rng)))
    if root.is_dir():
        choices.append((1, lambda: _replace_special(_pick_file(root, rng), rng)))
    structured = [f for f in _files(root) if f.suffix in (".yaml", ".json")]
    if structured:
        choices.append((3, lambda: _mutate_structured(rng.choice(structured), rng)))
    metadata = [f for f in _files(root) if f.name == ".metadata"]
    if metadata:
        choices.append((3, lambda: _mutate_dcp_metadata(rng.choice(metadata), rng)))
    distcp = [f for f in _files(root) if f.suffix == ".distcp"]
    if distcp:
        choices.append((2, lambda: _mutate_bytes(rng.choice(distcp), rng)))
    safetensors = [f for f in _files(root) if f.suffix == ".safetensors"]
    if safetensors:
        choices.append((3, lambda: _mutate_safetensors_header(rng.choice(safetensors), rng)))
    pickles = [f for f in _files(root) if f.suffix in (".pt", ".ckpt")]
    if pickles:
        choices.append((2, lambda: _mutate_pickle_file(rng.choice(pickles), rng)))
    trackers = [f for f in _files(root) if f.name == "latest_checkpointed_iteration.txt"]
    if trackers:
        choices.append((2, lambda: _mutate_tracker(trackers[0], rng)))
    if root.is_file():
        choices.append((4, lambda: _mutate_tar(root, rng)))
    if kind == "nemo_legacy_tp2":
        choices.append((3, lambda: _mutate_legacy_member(root, rng)))
    weights, actions = zip(*choices)
    return rng.choices(actions, weights)[0]()


def _mutate_legacy_member(path: Path, rng: random.Random) -> str:
    """Replace one legacy shard inside the tar (pickle payload, truncation, junk), keeping the tar valid."""
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    shard = rng.choice([m.name for m, body in members if m.name.endswith(".ckpt")])
    with tempfile.TemporaryDirectory() as tmp:
        body_path = Path(tmp) / "model_weights.ckpt"
        body_path.write_bytes(dict((m.name, b) for m, b in members)[shard])
        desc = _mutate_pickle_file(body_path, rng) if rng.random() < 0.5 else _mutate_bytes(body_path, rng)
        body = body_path.read_bytes()
    with tarfile.open(path, "w:") as out:
        for m, old in members:
            new = body if m.name == shard else old
            if new is not None:
                m.size = len(new)
            out.addfile(m, io.BytesIO(new) if new is not None else None)
    return f"legacy:{shard}:{desc}"


CLI_MUTATIONS: list[list[str]] = [
    ["--recipe", "E999999G1T2"], ["--recipe", "E0G1T1"], ["--recipe", "E8G0T2"], ["--recipe", "E2G2T3"],
    ["--recipe", "e2g2t2"], ["--recipe", "E2G2"], ["--recipe", "E4097G1T2"], ["--recipe", ""],
    ["--granularity", "0"], ["--granularity", "-1"], ["--granularity", "3"], ["--expansion", "0"], ["--topk", "0"],
    ["--topk", "100"], ["--num-experts", "0"], ["--num-experts", "3"], ["--num-experts", "-4"],
    ["--layers", "0,x"], ["--layers", "-1"], ["--layers", "99"], ["--layers", "0,0"], ["--layers", ","],
    ["--layer-freq", "0"], ["--layer-freq", "5"], ["--drop-ratio", "2"], ["--drop-ratio", "nan"],
    ["--drop-ratio", "0.5"], ["--weight-scaling", "abc"], ["--weight-scaling", "-1"], ["--weight-scaling", "inf"],
    ["--weight-scaling", "nan"], ["--router-init-std", "0"], ["--router-init-std", "nan"], ["--seed", "-5"],
    ["--topk-scaling-factor", "0"], ["--aux-loss-coeff", "nan"], ["--verify", "-1"], ["--verify", "x"],
    ["--verify", "1"], ["--max-shard-size", "abc"], ["--max-shard-size", "0"], ["--max-shard-size", "-5MB"],
    ["--format", "hf"], ["--format", "hf", "--hf-arch", "mixtral"], ["--format", "hf", "--hf-arch", "qwen2_moe"],
    ["--format", "megatron"], ["--input-format", "hf"], ["--input-format", "megatron"], ["--input-format", "nemo"],
    ["--recipe", "none"], ["--recipe", "none", "--granularity", "2"], ["--router", "sigmoid"],
    ["--router", "topk_then_softmax", "--format", "hf", "--hf-arch", "mixtral"], ["--shared-expert"],
    ["--no-pack"], ["--model-config", "/nonexistent.yaml"], ["--model-config", "/dev/null"], ["--overwrite"],
    ["--verify", "1", "--verify-threshold", "nan"], ["--verify", "1", "--verify-threshold", "-1"],
    ["--aux-loss-coeff", "-1"], ["--expansion", "4", "--num-experts", "64", "--granularity", "8"],
    ["--router", "topk_then_softmax", "--topk", "1"],
]
HYDRA_OVERRIDES: list[list[str]] = [
    ["verify=abc"], ["verify=-1"], ["verify=[1]"], ["verify=true"], ["verify=0"], ["pack=maybe"], ["pack=0"],
    ["overwrite=yes"], ["output_format=xyz"], ["output_format=megatron"], ["input_format=zip"],
    ["recipe.granularity=0"], ["recipe.shorthand=E999999G1T2"], ["recipe.shorthand=123"], ["recipe.shorthand=null"],
    ["recipe.layers=[0,x]"], ["recipe.layers=5"], ["recipe.layers=[]"], ["recipe.drop_ratio=abc"],
    ["recipe.seed=abc"], ["recipe.router=none"], ["recipe.weight_scaling=[1]"], ["recipe.topk=0"],
    ["recipe.router_init_std=-1"], ["recipe.aux_loss_coeff=abc"], ["recipe=null"], ["recipe=5"],
    ["+recipe.bogus=1"], ["max_shard_size=abc"], ["output_format=hf", "hf_arch=foo"], ["+bogus=1"],
    ["verify=0", "verify_threshold=nan"], ["target_engine=bogus"], ["gguf_dtype=int8"],
    ["output_format=hf", "hf_arch=qwen2_moe", "max_shard_size=0"], ["model_config=/nonexistent.yaml"],
    ["input=/nonexistent"], ["output=5"], ["recipe.shared_expert=maybe"], ["recipe.expansion=2.5"],
]


def make_case(index: int, kinds: tuple[str, ...] = KINDS, seed: int = 0) -> tuple[Case, random.Random]:
    rng = random.Random(f"{seed}:{index}")
    case = Case(kind=kinds[index % len(kinds)], index=index)
    r = rng.random()
    if case.kind == "hydra":
        case.argv_extra = list(rng.choice(HYDRA_OVERRIDES)) if r < 0.6 else []
    else:
        case.dry_run = rng.random() < 0.25
        if r < 0.25:
            case.argv_extra = list(rng.choice(CLI_MUTATIONS))
    return case, rng


# ---- running one case --------------------------------------------------------------------------------------------

class CaseTimeout(BaseException):
    """Raised by the alarm in the case's own frame (a BaseException, so no `except Exception` swallows it)."""


def _alarm(signum, frame):
    raise CaseTimeout


def _snapshot(root: Path) -> dict[str, tuple]:
    """Path -> (kind, size, sha256) of everything under root; special files are not opened."""
    out = {}
    entries = [root] if not root.is_dir() else [root, *root.rglob("*")]
    for p in entries:
        st = os.lstat(p)
        key = str(p.relative_to(root.parent))
        if p.is_symlink():
            out[key] = ("link", os.readlink(p))
        elif p.is_file() and not p.is_fifo():
            out[key] = ("file", st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[key] = ("other", st.st_mode)
    return out


def _deepest_project_frame(err: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "nemo_upcycle" in f.filename]
    if not frames:
        frames = traceback.extract_tb(err.__traceback__)[-1:]
    f = frames[-1] if frames else None
    return f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}" if f else "?"


@dataclass
class Result:
    case: Case
    description: str
    outcome: str  # clean_error, success, traceback, hang
    detail: str
    flags: list[str]
    seconds: float


def run_case(case: Case, rng: random.Random, seeds: dict[str, Path], workdir: Path, timeout: float,
             mutate: bool = True) -> Result:
    """Copy the seed, mutate it (unless `mutate` is false), run the entry point in this process, classify."""
    case_dir = workdir / f"case_{case.index}"
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    seed = seeds[case.kind]
    inp = case_dir / seed.name
    if seed.is_dir():
        shutil.copytree(seed, inp, symlinks=True)
    else:
        shutil.copyfile(seed, inp)
    descriptions = []
    mutate_chance = 1.0 if not case.argv_extra else 0.3
    if mutate and rng.random() < mutate_chance:
        descriptions.append(mutate_input(inp, case.kind, rng))
    if case.argv_extra:
        descriptions.append("args:" + " ".join(case.argv_extra))
    out_dir = case_dir / "out"
    out_dir.mkdir()
    output = out_dir / ("moe.nemo" if "megatron" not in " ".join(case.argv_extra) else "moe")
    private_tmp = case_dir / "tmp"
    private_tmp.mkdir()
    before = _snapshot(inp)

    stderr, stdout = io.StringIO(), io.StringIO()
    old_tmp, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(private_tmp), str(private_tmp)
    old_cwd = os.getcwd()
    os.chdir(case_dir)
    rc, detail, outcome = None, "", ""
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            rc = _entry(case, inp, output)
    except CaseTimeout:
        outcome, detail = "hang", f"ran past {timeout:g} s"
    except SystemExit as err:
        rc = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException as err:  # noqa: BLE001 - a traceback is what we are counting
        outcome, detail = "traceback", f"{type(err).__name__} at {_deepest_project_frame(err)}: {str(err)[:120]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old_cwd)
        tempfile.tempdir = old_tmp
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
    seconds = time.perf_counter() - start
    err_text = stderr.getvalue()
    if not outcome:
        lines = [line for line in err_text.replace("\r", "\n").splitlines() if line.strip()]
        error_lines = [line for line in lines if "error: " in line]  # after a progress bar's \r, or argparse's
        if rc == 2 and error_lines and "Traceback" not in err_text:
            outcome, detail = "clean_error", error_lines[-1][:200]
        elif rc in (0, 1) and "Traceback" not in err_text:
            outcome, detail = "success", "verify FAILED" if rc == 1 else "ok"
        else:
            outcome, detail = "traceback", f"exit {rc}: {(lines or [''])[-1][:160]}"
    flags = []
    left = sorted(p.name for p in private_tmp.iterdir())
    if left:
        flags.append("tmp_leftover")
        detail += f" [left in TMPDIR: {', '.join(left[:3])}]"
    if any(p.name.startswith(".") and ".tmp-" in p.name for p in out_dir.iterdir()):
        flags.append("output_tmp_leftover")
    if outcome != "success" and output.exists():
        flags.append("output_after_failure")
    if outcome == "success" and not case.dry_run and not output.exists():
        flags.append("success_without_output")
    if (case_dir / PAYLOAD).exists() or (inp.parent / PAYLOAD).exists():
        flags.append("payload_ran")
    if _snapshot(inp) != before:
        flags.append("modified_input")
    shutil.rmtree(case_dir, ignore_errors=True)
    return Result(case, " | ".join(descriptions) or "unmutated", outcome, detail, flags, seconds)


def _entry(case: Case, inp: Path, output: Path) -> int:
    if case.kind == "hydra":
        return hydra_entry(inp, output, case.argv_extra)
    from nemo_upcycle.cli import main

    argv = ["convert", str(inp), str(output), "--quiet"]
    if case.kind == "megatron_model_config":
        model_yaml = inp / "model.yaml"
        argv += ["--model-config", str(model_yaml)]
    if "--recipe" not in case.argv_extra:
        argv += ["--recipe", "E2G2T2"]
    if case.dry_run:
        argv.append("--dry-run")
    return main(argv + case.argv_extra)


_HYDRA_MAIN = None


def hydra_entry(inp: Path, output: Path, overrides: list[str]) -> int:
    """examples/convert.py's main with the config Hydra composes from conf/upcycle.yaml and the overrides
    (the decorated main takes a composed config as NeMo's hydra_runner allows)."""
    global _HYDRA_MAIN
    import importlib.util

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if _HYDRA_MAIN is None:
        spec = importlib.util.spec_from_file_location("_fuzz_examples_convert", ROOT / "examples" / "convert.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _HYDRA_MAIN = module.main
    given = [o for o in overrides if not o.startswith(("input=", "output="))]
    args = [f"input={next((o[6:] for o in overrides if o.startswith('input=')), inp)}",
            f"output={next((o[7:] for o in overrides if o.startswith('output=')), output)}",
            "recipe.shorthand=E2G2T2", *given]
    try:
        with initialize_config_dir(config_dir=str(ROOT / "nemo_upcycle" / "conf"), version_base=None):
            cfg = compose("upcycle", overrides=args)
    except (HydraException, OmegaConfBaseException) as err:  # Hydra prints these as one line and exits 1
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    _HYDRA_MAIN(cfg)
    return 0


# ---- the benchmark ------------------------------------------------------------------------------------------------

BAD_FLAGS = ("tmp_leftover", "output_tmp_leftover", "output_after_failure", "success_without_output",
             "payload_ran", "modified_input")


def run_fuzz(cases: int, workdir: Path, seed: int = 0, timeout: float = 30.0, start: int = 0,
             progress: bool = True, kinds: tuple[str, ...] = KINDS,
             on_result: Callable[[Result], None] | None = None) -> list[Result]:
    from tqdm import tqdm

    seeds = build_seeds(workdir / "seeds")
    for k, kind in enumerate(kinds):  # warm-up: libraries' one-time caches at first use are not a case's leftovers
        warm = run_case(Case(kind, -1 - k), random.Random(0), seeds, workdir / "cases", max(timeout, 600),
                        mutate=False)  # first use imports NeMo, Hydra, transformers: minutes on a loaded machine
        if warm.outcome != "success":
            raise RuntimeError(f"the unmutated {kind} seed does not convert: {warm.detail}")
    results = []
    for i in tqdm(range(start, start + cases), desc="fuzz", unit="case", disable=not progress):
        case, rng = make_case(i, kinds, seed)
        results.append(run_case(case, rng, seeds, workdir / "cases", timeout))
        if on_result is not None:
            on_result(results[-1])
    return results


def summarise(results: list[Result]) -> str:
    from nemo_upcycle.report import markdown_table

    outcomes = collections.Counter(r.outcome for r in results)
    flags = collections.Counter(f for r in results for f in r.flags)
    rows = [[name, str(outcomes.get(name, 0))] for name in ("clean_error", "success", "traceback", "hang")]
    rows += [[name, str(flags.get(name, 0))] for name in BAD_FLAGS]
    per_kind = collections.defaultdict(collections.Counter)
    for r in results:
        per_kind[r.case.kind][r.outcome] += 1
    per_kind["all"] = sum(per_kind.values(), collections.Counter())
    kind_rows = [[KIND_LABELS.get(k, f"**{k}**"), f"{sum(per_kind[k].values()):,}",
                  *(f"{per_kind[k].get(o, 0):,}" for o in ("clean_error", "success", "traceback", "hang"))]
                 for k in (*KINDS, "all") if k in per_kind]
    secs = sorted(r.seconds for r in results)
    return (markdown_table(["outcome / safety failure", "cases"], rows) + "\n\n"
            + markdown_table(["input kind", "cases", "clean error", "success", "traceback", "hang"], kind_rows)
            + f"\n\n{len(results)} cases, {sum(secs):.0f} s in cases, median {secs[len(secs) // 2]:.3f} s, "
              f"slowest {secs[-1]:.2f} s")


def bad_results(results: list[Result]) -> list[Result]:
    return [r for r in results if r.outcome in ("traceback", "hang") or set(r.flags) & set(BAD_FLAGS)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10_000, help="number of cases (default 10000)")
    p.add_argument("--start", type=int, default=0, help="first case index (cases are reproducible by index)")
    p.add_argument("--seed", type=int, default=0, help="fuzz seed (default 0)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a case counts as a hang")
    p.add_argument("--workdir", type=Path, default=Path("fuzz_out"), help="seeds and scratch space")
    p.add_argument("--report", type=Path, help="write every case's result as JSON lines here, as it comes")
    p.add_argument("--memory-limit-gb", type=float, default=12.0,
                   help="address-space limit of this process, so a runaway allocation is a MemoryError (counted "
                        "as a traceback) instead of the machine's OOM killer ending the run (default 12)")
    args = p.parse_args(argv)
    import logging
    import resource
    import warnings

    limit = int(args.memory_limit_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    report = open(args.report, "w") if args.report else None

    def record(r: Result) -> None:
        if report is not None:
            report.write(json.dumps({"index": r.case.index, "kind": r.case.kind, "mutation": r.description,
                                     "outcome": r.outcome, "detail": r.detail, "flags": r.flags,
                                     "seconds": round(r.seconds, 3)}) + "\n")
            report.flush()

    t0 = time.perf_counter()
    # absolute: each case runs in its own folder, where a relative --workdir would name nothing
    results = run_fuzz(args.cases, args.workdir.resolve(), args.seed, args.timeout, args.start, on_result=record)
    print(summarise(results))
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    bad = bad_results(results)
    for r in bad[:40]:
        print(f"case {r.case.index} [{r.case.kind}] {r.outcome} {r.flags}: {r.description} -> {r.detail}")
    if report is not None:
        report.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
