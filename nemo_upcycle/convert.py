"""The conversion as a library: `plan_conversion` lists the output tensors from the input's headers alone and
the operation that makes each (`Copy` it from the input, or `UpcycleMLP` of its layer); one executor
(`LayerStream`) runs them in the order the writer declares it fetches tensors, which is checked to take one layer
at a time, so memory stays bounded by about one layer's output whatever the model size. The `convert` command
(cli/convert.py), the Hydra entry point and `from_dense` call these."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemo_upcycle.checkpoint import (
    INPUT_FORMATS, OUTPUT_FORMATS, CheckpointReader, ReadOptions, WriteOptions, make_writer, open_checkpoint)
from nemo_upcycle.checkpoint.archive import check_free_disk, check_output_path, load_yaml_mapping
from nemo_upcycle.checkpoint.hf_export import HF_ARCHS
from nemo_upcycle.checkpoint.hf_keys import ENGINES
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.keys import layer_index
from nemo_upcycle.models.manifest import TensorInfo, check_tensors, expected_shapes
from nemo_upcycle.recipe import UpcycleConfig, moe_config, upcycle_layer_mlp
from nemo_upcycle.recipe.calibration import directions_from_reader, reader_tokenizer
from nemo_upcycle.recipe.state_dict import DENSE_MLP_KEYS
from nemo_upcycle.report import human_count, markdown_table
from nemo_upcycle.verify import DEFAULT_THRESHOLD, VerifyOptions, verify_conversion, verify_tokens


# ---- plan ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Copy:
    """An output tensor read from the input as it is."""

    name: str


@dataclass(frozen=True)
class UpcycleMLP:
    """Layer `layer`'s dense MLP turned into `outputs` (router, experts, shared expert) by the recipe."""

    layer: int
    outputs: tuple[str, ...]


Op = Copy | UpcycleMLP


@dataclass
class Plan:
    dense: GPTConfig
    moe: GPTConfig
    recipe: UpcycleConfig | None  # None: a format conversion, the checkpoint as it is (dense or MoE)
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]  # canonical names in model order (what the writer will fetch)
    ops: dict[str, Op]  # output name -> the operation that makes it

    def upcycles(self) -> dict[int, UpcycleMLP]:
        return {op.layer: op for op in self.ops.values() if isinstance(op, UpcycleMLP)}

    @property
    def bytes_in(self) -> int:
        return sum(t.nbytes for t in self.inputs.values())

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.outputs.values())

    @staticmethod
    def params(infos: dict[str, TensorInfo]) -> int:
        return sum(int(torch.Size(t.shape).numel()) for t in infos.values())


def plan_conversion(reader: CheckpointReader, recipe: UpcycleConfig | None, where: str = "the input") -> Plan:
    """The output tensors of upcycling `reader` with `recipe`; `recipe` None: of copying it unchanged (e.g. an
    exported Hugging Face MoE back to .nemo for training)."""
    dense = reader.config
    inputs = reader.tensors()
    if recipe is None:
        check_tensors(inputs, dense, where)
        return Plan(dense, dense, None, dict(inputs), dict(inputs), {n: Copy(n) for n in inputs})
    moe = moe_config(dense, recipe)  # raises for MoE inputs and invalid recipes
    check_tensors(inputs, dense, where)
    outputs = {}
    for name, shape in expected_shapes(moe).items():
        if name in inputs:
            outputs[name] = TensorInfo(shape, inputs[name].dtype)
        else:  # router / experts: the dtype of the dense MLP they come from
            fc1 = name.split("mlp.")[0] + "mlp.linear_fc1.weight"
            outputs[name] = TensorInfo(shape, inputs[fc1].dtype)
    return Plan(dense, moe, recipe, dict(inputs), outputs, _operations(inputs, outputs))


def _operations(inputs: dict[str, TensorInfo], outputs: dict[str, TensorInfo]) -> dict[str, Op]:
    """What the input holds is copied; the rest of a layer (router, experts) is its upcycled MLP."""
    ops: dict[str, Op] = {n: Copy(n) for n in outputs if n in inputs}
    new: dict[int, list[str]] = {}
    for name in outputs:
        if name not in inputs:
            new.setdefault(layer_index(name), []).append(name)
    for i, names in new.items():
        ops.update(dict.fromkeys(names, UpcycleMLP(i, tuple(names))))
    return {n: ops[n] for n in outputs}


# ---- execute ------------------------------------------------------------------------------------------------

def check_one_layer_at_a_time(order: list[str], writer: str) -> None:
    """Refuse a fetch order that comes back to a layer it has left: the executor holds one layer at a time."""
    done: set[int] = set()
    current = None
    for name in order:
        i = layer_index(name)
        if i is not None and i != current:
            if i in done:
                raise UpcycleError(f"the {writer} writer fetches layer {i} again after leaving it ({name}): "
                                   "it must take one layer at a time")
            if current is not None:
                done.add(current)
            current = i


class LayerStream:
    """The executor: hands out output tensors one at a time, reading a whole layer and running its operations
    when its first tensor is asked for. Given the writer's declared `order`, every fetch is checked against it."""

    def __init__(self, reader: CheckpointReader, plan: Plan, progress=None,
                 router_directions: dict[int, torch.Tensor] | None = None, order: list[str] | None = None):
        self.reader, self.plan, self.progress = reader, plan, progress
        if router_directions is None and plan.recipe is not None:
            router_directions = directions_from_reader(reader, plan.recipe)
        self.router_directions = router_directions or {}
        self.upcycles = plan.upcycles()
        self.order = iter(order) if order is not None else None
        self.layer: int | None = None
        self.cache: dict[str, torch.Tensor] = {}

    def fetch(self, name: str) -> torch.Tensor:
        if self.order is not None:
            expected = next(self.order, None)
            if name != expected:
                raise UpcycleError(f"the writer fetched {name} where its declared order has {expected}")
        i = layer_index(name)
        if i is None:
            return self.reader.read([name])[name]
        if i != self.layer:
            self._compute_layer(i)
        return self.cache.pop(name)

    def _compute_layer(self, i: int) -> None:
        self.cache.clear()
        prefix = f"decoder.layers.{i}."
        tensors = self.reader.read(self.reader.layer_names(i))
        if i in self.upcycles:
            mlp = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k[len(prefix):] in DENSE_MLP_KEYS}
            new = upcycle_layer_mlp(mlp, self.plan.dense, self.plan.recipe, i, self.router_directions.get(i))
            tensors.update({prefix + k: v for k, v in new.items()})
        self.cache, self.layer = tensors, i
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix_str(f"layer {i}")


@dataclass
class Summary:
    plan: Plan
    seconds: float
    peak_rss_bytes: int
    output: Path
    verify: dict[str, Any] | None = field(default=None)

    def table(self) -> str:
        p = self.plan
        recipe = "none (format conversion)" if p.recipe is None else (
            f"{p.recipe.name} {p.recipe.router}{' + shared expert' if p.recipe.shared_expert else ''} "
            f"(scaling {p.recipe.scaling_method}, s={p.recipe.scale_factor():g})")
        rows = [
            ["recipe", recipe],
            ["parameters in -> out", f"{human_count(Plan.params(p.inputs))} -> {human_count(Plan.params(p.outputs))}"],
            ["active parameters out", human_count(p.moe.num_parameters(active=True))],
            ["bytes in -> out", f"{p.bytes_in / 1e9:.3f} GB -> {p.bytes_out / 1e9:.3f} GB"],
            ["time", f"{self.seconds:.2f} s"],
            ["write throughput", f"{p.bytes_out / 1e9 / max(self.seconds, 1e-9):.3f} GB/s"],
            ["peak RSS", f"{self.peak_rss_bytes / 1e9:.3f} GB"],
            ["output", str(self.output)],
        ]
        if self.verify:
            rows += [[f"verify: {k}", v] for k, v in self.verify.items()]
        return markdown_table(["", "value"], rows)


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, which (unlike ru_maxrss) does not inherit the
    parent's peak across fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


def convert(input_path: Path | str, output_path: Path | str, recipe: UpcycleConfig | None, *,
            read: ReadOptions = ReadOptions(), write: WriteOptions = WriteOptions(),
            verify: VerifyOptions | None = None, progress: bool = True) -> Summary:
    """Upcycle `input_path` into `output_path` (`recipe` None: convert the format only), read and written as
    `read` and `write` say. `verify`: after writing, compare input and output with the reference model and check
    every expert tensor's checksum against the recipe (written to `<output>.checksums.json`); None skips it."""
    from tqdm import tqdm

    start = time.perf_counter()
    check_options(read, write, verify)
    output_path = Path(output_path)
    check_output_path(output_path, write.overwrite, input_path)
    with open_checkpoint(input_path, read) as reader:
        plan = plan_conversion(reader, recipe, str(input_path))
        writer = make_writer(output_path, write)
        writer.check(plan.moe)
        order = writer.fetch_order(plan.moe, plan.outputs)
        check_one_layer_at_a_time(order, writer.name)
        check_free_disk(output_path, plan.bytes_out + writer.overhead_bytes(plan.outputs))
        tokens = None
        if verify is not None and recipe is not None:  # a verify text too short to measure on fails before writing
            tokens = verify_tokens(reader_tokenizer(reader), plan.dense.vocab_size, verify.text)
        directions = directions_from_reader(reader, recipe) if recipe is not None else None
        bar = tqdm(total=plan.dense.num_layers, unit="layer", desc="upcycling", disable=not progress)
        stream = LayerStream(reader, plan, bar, directions, order)
        writer.write(plan.moe, plan.outputs, stream.fetch, reader.meta())
        bar.close()
        seconds = time.perf_counter() - start
        summary = Summary(plan, seconds, peak_rss_bytes(), output_path)
        if verify is not None:
            summary.verify = _verify(reader, output_path, recipe, verify, tokens, directions)
    return summary


def check_options(read: ReadOptions, write: WriteOptions, verify: VerifyOptions | None = None) -> None:
    """Every option of a conversion checked before any file is read or written (the Hydra entry point passes
    them as they come from YAML), so a bad value never fails after the output was renamed into place."""
    from nemo_upcycle.checkpoint.hf_export import parse_size

    for name, value, choices in (("output_format", write.format, OUTPUT_FORMATS),
                                 ("input_format", read.format, INPUT_FORMATS)):
        if value not in choices:
            raise UpcycleError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    for name, value in (("pack", write.pack), ("overwrite", write.overwrite)):
        if not isinstance(value, bool):
            raise UpcycleError(f"{name} must be true or false, got {value!r}")
    if verify is not None and (not isinstance(verify.layers, int) or isinstance(verify.layers, bool)
                               or verify.layers < 0):
        raise UpcycleError(f"verify must be null (skip), 0 (all layers) or a positive number of layers, "
                           f"got {verify.layers!r}")
    t = None if verify is None else verify.threshold
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf):
        raise UpcycleError(f"verify_threshold={t!r} must be a finite relative loss gap >= 0, e.g. 0.001 (0.1%)")
    if write.hf_arch is not None and write.hf_arch not in HF_ARCHS:
        raise UpcycleError(f"hf_arch must be one of {', '.join(HF_ARCHS)}, got {write.hf_arch!r}")
    if write.hf_arch is not None and write.format != "hf":
        raise UpcycleError(f"hf_arch={write.hf_arch} applies to output_format=hf only, not {write.format}: drop it")
    if write.target_engine is not None and write.target_engine not in ENGINES:
        raise UpcycleError(f"target_engine must be one of {', '.join(ENGINES)}, got {write.target_engine!r}")
    size = write.max_shard_size
    if size is not None and (isinstance(size, bool) or parse_size(size) < 1):
        raise UpcycleError(f"max shard size {size!r} is not a size such as 5GB, 500MB or 2GiB")
    if size is not None and write.format != "hf":
        raise UpcycleError(f"max_shard_size applies to output_format=hf only, not {write.format}: drop it")


def _verify(reader: CheckpointReader, output_path: Path, recipe: UpcycleConfig | None, verify: VerifyOptions,
            tokens: torch.Tensor | None, router_directions: dict[int, torch.Tensor] | None = None) -> dict[str, Any]:
    if recipe is None:
        return {"status": "not checked (format conversion, no recipe to check against)"}
    import json

    with open_checkpoint(output_path) as written:
        result = verify_conversion(reader, written, recipe, verify.layers, router_directions,
                                   threshold=verify.threshold, tokens=tokens)
    checksums = result.pop("checksums")
    sidecar = output_path.with_name(output_path.name + ".checksums.json")
    sidecar.write_text(json.dumps(checksums, indent=1) + "\n")
    result["expert checksums file"] = str(sidecar)
    return result


def read_verify_text(path: Path | str | None) -> str | None:
    """The text a verification measures on (None: the bundled sample)."""
    if path is None:
        return None
    is_path = isinstance(path, (str, Path))
    if not is_path or not Path(path).is_file():
        raise UpcycleError(f"verify_data={path if is_path else repr(path)} is not a file: pass a UTF-8 text file")
    return Path(path).read_text(encoding="utf-8", errors="replace")


def load_model_config(path: Path | str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise UpcycleError(f"model config {path} does not exist or is not a regular file")
    return load_yaml_mapping(path, "model config ")


GGUF_DTYPES = ("bfloat16", "float16", "float32")
# conf/upcycle.yaml's fields, each the Hydra twin of a `nemo-upcycle convert` option
CONFIG_KEYS = ("input", "output", "output_format", "hf_arch", "max_shard_size", "target_engine", "input_format",
               "pack", "overwrite", "model_config", "gguf_dtype", "verify", "verify_data", "verify_threshold",
               "recipe")


def convert_from_config(cfg: dict[str, Any]) -> Summary:
    """Run a conversion described by conf/upcycle.yaml (as a plain dict)."""
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise UpcycleError(f"unknown option {unknown[0]} in the convert config: use one of {', '.join(CONFIG_KEYS)} "
                           "(conf/upcycle.yaml documents them; recipe options go under recipe.)")
    if cfg.get("gguf_dtype", "bfloat16") not in GGUF_DTYPES:
        raise UpcycleError(f"gguf_dtype must be one of {', '.join(GGUF_DTYPES)}, got {cfg['gguf_dtype']!r}")
    for key in ("input", "output"):
        if cfg.get(key) in (None, "???"):
            raise UpcycleError(f"set {key}=... (the {key} checkpoint path)")
        if not isinstance(cfg[key], str):
            raise UpcycleError(f"{key} must be a path, got {cfg[key]!r}")
    recipe = cfg.get("recipe", {})
    if recipe is not None and not isinstance(recipe, dict):
        raise UpcycleError(f"recipe must be a mapping of recipe options (or null: format only), got {recipe!r}")
    read = ReadOptions(cfg.get("input_format", "auto"), load_model_config(cfg.get("model_config")),
                       getattr(torch, cfg.get("gguf_dtype", "bfloat16")))
    write = WriteOptions(cfg.get("output_format", "nemo"), cfg.get("overwrite", False), cfg.get("pack", True),
                         cfg.get("hf_arch"), cfg.get("max_shard_size"), cfg.get("target_engine"))
    text = read_verify_text(cfg.get("verify_data"))
    verify = None if cfg.get("verify") is None else VerifyOptions(
        cfg["verify"], text, cfg.get("verify_threshold", DEFAULT_THRESHOLD))
    return convert(cfg["input"], cfg["output"], None if recipe is None else UpcycleConfig.from_dict(recipe),
                   read=read, write=write, verify=verify)
