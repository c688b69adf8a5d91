"""Megatron `torch_dist` checkpoints, read one tensor slice at a time and written as a stream.

A torch_dist checkpoint is a PyTorch Distributed Checkpoint (DCP) directory plus two Megatron files:
`metadata.json` (which backend wrote it) and `common.pt` (non-tensor state). Layers that are all alike are
stacked: the layer index becomes the leading axis of one global tensor (`decoder.layers.mlp.linear_fc1.weight`
[L, F, H]); experts add a second axis ([L, N, F, H]). Each layer (and expert) is stored as its own chunk.

Reading uses DCP's own loader with a planner that asks only for the chunk region we want (one layer), and a
metadata unpickler that admits only DCP's metadata classes (`.metadata` is a pickle). Inside an uncompressed
`.nemo` tar the same reader works on file windows, without extraction.

Writing uses DCP's own writer with a planner that produces each chunk on demand (`resolve_data`) in plan
order, one file per layer, so at most one layer's tensors are alive at a time.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (
    LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from nemo_upcycle.checkpoint.archive import TarArchive, TarWriter
from nemo_upcycle.errors import UpcycleError, bad_file, reason

MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@contextmanager
def _unwrapped_errors() -> Iterator[None]:
    """DCP wraps every error of a save or load (Ctrl-C and our one-line errors included) in a
    CheckpointException; re-raise the original so it reaches the user as itself. Its warning that
    torch.distributed is not initialized is dropped: every call here passes no_dist=True, one process by design."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            yield
    except CheckpointException as err:
        for exc, _ in err.failures.values():
            raise exc from None
        raise


# ---- safe metadata ------------------------------------------------------------------------------------------

# Every global a `.metadata` file names, as torch's DCP and Megatron's cached save plans write them. An exact list:
# a prefix rule would admit dotted names (pickle protocol 4) that reach other modules' callables through these.
_METADATA_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType",
                                                             "TensorWriteData")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
       ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")])  # the last two: StorageMeta.checkpoint_id


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP `.metadata` admitting only the classes DCP metadata is made of, torch.Size and dtypes: no
    code can run."""

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def _safe_metadata(stream: IO[bytes], where: str = "the checkpoint") -> Metadata:
    try:
        metadata = _MetadataUnpickler(stream).load()
    except Exception as err:  # noqa: BLE001 - a corrupt pickle raises almost anything
        raise UpcycleError(f"unreadable torch_dist metadata in {where} ({type(err).__name__}: {reason(err)}): the "
                           "checkpoint is corrupt or not torch_dist; re-copy it") from None
    if not (isinstance(metadata, Metadata) and isinstance(metadata.state_dict_metadata, dict)
            and isinstance(metadata.storage_data, dict)):
        raise UpcycleError(f"the torch_dist metadata in {where} is not a PyTorch Distributed Checkpoint index: "
                           "the checkpoint is corrupt or not torch_dist; re-copy it")
    return metadata


def _check_metadata(metadata: Metadata, file_size: Callable[[str], int | None], where: str) -> None:
    """Check what `.metadata` declares against the checkpoint's real files before anything loops over or
    allocates by it: chunks tile each tensor exactly, every chunk lies in an existing data file and fits in it.
    So a corrupt or hand-edited index (e.g. 2^31 stacked layers in a 10 KB file) is refused at once."""
    def bad(what: str) -> UpcycleError:
        return UpcycleError(f"the torch_dist metadata in {where} {what}: the checkpoint is corrupt or was edited; "
                            "re-copy it")

    sizes: dict[str, int | None] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise bad(f"has a non-string key {fqn!r}")
        if not isinstance(entry, TensorStorageMetadata):
            continue
        shape = entry.size
        if (not isinstance(shape, tuple) or len(shape) > 8 or not all(_is_count(d) and d > 0 for d in shape)
                or not isinstance(getattr(entry.properties, "dtype", None), torch.dtype)
                or not isinstance(entry.chunks, list)):
            raise bad(f"declares tensor {fqn} with an invalid shape or dtype")
        itemsize = torch.empty((), dtype=entry.properties.dtype).element_size()
        covered = 0
        for chunk in entry.chunks:
            offsets, lengths = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
            if not (isinstance(offsets, tuple) and isinstance(lengths, tuple) and len(offsets) == len(lengths) == len(shape)
                    and all(_is_count(o) and _is_count(n) and o + n <= d for o, n, d in zip(offsets, lengths, shape))):
                raise bad(f"declares a chunk of {fqn} outside its shape {tuple(shape)}")
            numel = math.prod(lengths)
            covered += numel
            info = metadata.storage_data.get(MetadataIndex(fqn, offsets))
            path = getattr(info, "relative_path", None)
            if not isinstance(path, str) or "/" in path or path in ("", ".", ".."):
                raise bad(f"has no data file for a chunk of {fqn}")
            if path not in sizes:
                sizes[path] = file_size(path)
            offset, length = getattr(info, "offset", None), getattr(info, "length", None)
            if sizes[path] is None:
                raise bad(f"names a data file {path} that is missing")
            if not (_is_count(offset) and _is_count(length) and length >= numel * itemsize
                    and offset + length <= sizes[path]):
                raise bad(f"declares a chunk of {fqn} past the end of {path} (the file is truncated?)")
        if covered != math.prod(shape):
            raise bad(f"declares tensor {fqn} {tuple(shape)} that its chunks do not cover")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _TarPaths(FileSystem):
    """Paths of DCP's file system interface as tar member names (`folder/file`)."""

    def init_path(self, path):  # type: ignore[override]
        return str(path)

    def concat_path(self, path, suffix):  # type: ignore[override]
        return f"{path}/{suffix}" if path else suffix


class _TarFileSystem(_TarPaths):
    """DCP's file system interface over members of an uncompressed tar, read through windows."""

    def __init__(self, archive: TarArchive):
        super().__init__()
        self.archive = archive

    @contextmanager
    def create_stream(self, path, mode):  # type: ignore[override]
        if mode != "rb":
            raise UpcycleError("checkpoints inside a tar are read-only")
        window = self.archive.window(str(path))
        try:
            yield window
        finally:
            window.close()


class _Reader(FileSystemReader):
    def __init__(self, path: str, archive: TarArchive | None = None):
        super().__init__(path)
        if archive is not None:
            self.fs = _TarFileSystem(archive)
            self.path = self.fs.init_path(path)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        with self.fs.create_stream(self.fs.concat_path(self.path, ".metadata"), "rb") as f:
            metadata = _safe_metadata(f, str(self.path))
        return metadata

    def file_size(self, name: str) -> int | None:
        """Size of the data file `name` of this checkpoint; None when missing or not a regular file."""
        if isinstance(self.fs, _TarFileSystem):
            member = self.fs.archive.members.get(self.fs.concat_path(self.path, name))
            return member.size if member is not None and member.isfile() else None
        file = Path(self.path) / name
        return file.stat().st_size if file.is_file() else None


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Loads chosen regions of chosen tensors into given destination tensors (no other state)."""

    def __init__(self, requests: list[tuple[str, tuple[int, ...], torch.Tensor]]):
        super().__init__()
        self.requests = {(fqn, torch.Size(offsets)): dest for fqn, offsets, dest in requests}

    def create_local_plan(self) -> LoadPlan:
        items = []
        for (fqn, offsets), dest in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=offsets, sizes=dest.shape)
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        dest = self.requests[(read_item.dest_index.fqn, torch.Size(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class DistCheckpointReader:
    """Lazy access to a torch_dist checkpoint: list tensors, read any tensor or one slice of its leading axes."""

    def __init__(self, path: Path | str, archive: TarArchive | None = None):
        self.path, self.archive = str(path), archive
        self._reader = _Reader(self.path, archive)
        self.metadata = self._reader.read_metadata()
        where = self.path if archive is None else f"{self.path} of {archive.path}"
        _check_metadata(self.metadata, self._reader.file_size, where)
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }

    def shape(self, fqn: str) -> tuple[int, ...]:
        return tuple(self.tensors[fqn].size)

    def dtype(self, fqn: str) -> torch.dtype:
        return self.tensors[fqn].properties.dtype

    def read(self, fqn: str, index: tuple[int, ...] = ()) -> torch.Tensor:
        """The tensor `fqn`, or its sub-tensor at leading indices `index` (e.g. (layer,) or (layer, expert))."""
        return self.read_many([(fqn, index)])[0]

    def read_many(self, requests: list[tuple[str, tuple[int, ...]]]) -> list[torch.Tensor]:
        """Several tensors (or leading-index slices of them) in one pass over the files."""
        planned = []
        for fqn, index in requests:
            if fqn not in self.tensors:
                raise UpcycleError(f"tensor '{fqn}' is missing from the checkpoint at {self.path}")
            shape = self.shape(fqn)
            sizes = (1,) * len(index) + shape[len(index):]
            offsets = tuple(index) + (0,) * (len(shape) - len(index))
            planned.append((fqn, offsets, torch.empty(sizes, dtype=self.dtype(fqn))))
        self._reader.reset(self.path)
        where = self.path if self.archive is None else f"{self.path} of {self.archive.path}"
        with bad_file(where, "has a truncated or corrupt .distcp data file"), _unwrapped_errors():
            dcp.load({}, storage_reader=self._reader, planner=_RegionLoadPlanner(planned), no_dist=True)
        return [dest.reshape(dest.shape[len(index):]) for (_, index), (_, _, dest) in zip(requests, planned)]


# ---- streaming writer ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a global tensor: `fqn` [global_shape], the block at `offsets` of size `sizes`."""

    fqn: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    group: int  # chunks of one group (a layer) are produced together and stored in one file


@dataclass(frozen=True)
class BytesItem:
    """A small non-tensor object stored in the DCP (Megatron stores each `_extra_state` this way)."""

    fqn: str
    data: bytes
    group: int


class _StreamSavePlanner(DefaultSavePlanner):
    def __init__(self, items: Sequence[Chunk | BytesItem], produce: Callable[[Chunk], torch.Tensor]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.items, self.produce = list(items), produce
        self._by_index: dict[MetadataIndex, Chunk | BytesItem] = {}

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        write_items = []
        for item in self.items:
            if isinstance(item, BytesItem):
                index = MetadataIndex(item.fqn)
                write_items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
            else:
                index = MetadataIndex(item.fqn, torch.Size(item.offsets))
                write_items.append(WriteItem(
                    index=index, type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(item.offsets), sizes=torch.Size(item.sizes)),
                        properties=TensorProperties(dtype=item.dtype),
                        size=torch.Size(item.global_shape)),
                ))
            self._by_index[index] = item
        self.plan = SavePlan(write_items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        item = self._by_index[write_item.index]
        if isinstance(item, BytesItem):
            return io.BytesIO(item.data)
        tensor = self.produce(item)
        if tuple(tensor.shape) != item.sizes or tensor.dtype != item.dtype:
            raise UpcycleError(
                f"internal: {item.fqn} produced {tuple(tensor.shape)} {tensor.dtype}, planned {item.sizes} {item.dtype}"
            )
        return tensor.contiguous()


class _TarWriteFileSystem(_TarPaths):
    """DCP's file system interface writing members straight into a `TarWriter` (under a folder prefix)."""

    def __init__(self, tar: TarWriter):
        super().__init__()
        self.tar = tar

    @contextmanager
    def create_stream(self, path, mode):  # type: ignore[override]
        with self.tar.member(str(path)) as stream:
            yield stream

    def mkdir(self, path) -> None:  # type: ignore[override]
        self.tar.add_dir(str(path))

    def exists(self, path) -> bool:  # type: ignore[override]
        return self.tar.exists(str(path))

    def rename(self, path, new_path) -> None:  # type: ignore[override]
        self.tar.rename(str(path), str(new_path))

    def rm_file(self, path) -> None:  # type: ignore[override]
        raise UpcycleError(f"internal: cannot remove {path} from a tar being written")


class _GroupedWriter(FileSystemWriter):
    """DCP's file writer, one file per group in plan order (its default sorts items by size across files)."""

    def __init__(self, path: str, groups: dict[MetadataIndex, int], tar: TarWriter | None = None):
        super().__init__(path, single_file_per_rank=True, thread_count=1, sync_files=False, overwrite=True)
        if tar is not None:
            self.fs = _TarWriteFileSystem(tar)
            self.path = self.fs.init_path(path)
        self.groups = groups

    def write_data(self, plan, planner):
        import queue

        buckets: dict[int, list[WriteItem]] = {}
        for item in plan.items:
            buckets.setdefault(self.groups[item.index], []).append(item)
        file_queue: queue.Queue = queue.Queue()
        for n, group_items in enumerate(buckets.values()):
            name = f"{plan.storage_data.prefix}{n}.distcp"
            file_queue.put((self.fs.concat_path(self.path, name), name, group_items))
        return self._write_data(planner, file_queue)


def write_dist_checkpoint(path: Path | str, items: Sequence[Chunk | BytesItem],
                          produce: Callable[[Chunk], torch.Tensor], common: dict | None = None,
                          tar: TarWriter | None = None) -> None:
    """Write a Megatron torch_dist checkpoint into the new directory `path` (or, with `tar`, into that
    folder of the archive being written).

    `produce(chunk)` is called once per chunk, in the order of `items` grouped by `group`; a chunk's tensor is
    written and dropped before the next is produced.
    """
    groups = {}
    for item in items:
        offsets = torch.Size(item.offsets) if isinstance(item, Chunk) else None
        groups[MetadataIndex(item.fqn, offsets)] = item.group
    if tar is None:
        Path(path).mkdir(parents=True, exist_ok=True)
    writer = _GroupedWriter(str(path), groups, tar)
    with _unwrapped_errors():
        dcp.save({}, storage_writer=writer, planner=_StreamSavePlanner(items, produce), no_dist=True)
    buf = io.BytesIO()
    torch.save(common or {}, buf)
    files = {"common.pt": buf.getvalue(), "metadata.json": json.dumps(MEGATRON_METADATA).encode()}
    for name, data in files.items():
        if tar is None:
            (Path(path) / name).write_bytes(data)
        else:
            tar.add_bytes(f"{path}/{name}", data)
