"""Safe access to checkpoint files: `.nemo` tars (validated before anything is read), read-only file windows
into uncompressed tars (no extraction), atomic outputs, free-disk checks.

A `.nemo` file is a tar whose members are named `./model_config.yaml`, `./model_weights/...` and so on. We
refuse absolute paths, `..`, links and special files before reading or extracting anything, and read members
of an uncompressed tar in place, through offset windows, so a 100 GB checkpoint is never copied.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Iterator

from nemo_upcycle.errors import UpcycleError, bad_file, reason


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bz2, xz: what tarfile's "r:*" decompresses


def _normalise(name: str) -> str:
    """`./model_weights/x` -> `model_weights/x`; rejects unsafe names."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        raise UpcycleError(f"unsafe member '{name}' in the archive (absolute path or '..'): refusing to read it")
    return str(PurePosixPath(*[part for part in p.parts if part != "."])) if p.parts else ""


class TarArchive:
    """Index of a `.nemo` tar (plain, or gzip / bz2 / xz: read by extraction): member name -> TarInfo, validated
    as a whole when opened."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._tar = tarfile.open(self.path, "r:*")
        except Exception:  # noqa: BLE001 - tarfile, gzip and zlib each raise their own errors
            raise UpcycleError(f"{self.path} is not a readable tar archive (plain or gzip): pass a .nemo file or "
                               "an extracted .nemo directory") from None
        try:
            members = self._tar.getmembers()
        except Exception as err:  # noqa: BLE001 - EOFError, OSError, zlib.error, tarfile.TarError, ...
            self._tar.close()
            raise UpcycleError(f"{self.path} is truncated or corrupt ({reason(err)}): re-download or re-copy it") from None
        with open(self.path, "rb") as f:
            self.compressed = f.read(6).startswith(COMPRESSED_MAGIC)
        self.members: dict[str, tarfile.TarInfo] = {}
        size = self.path.stat().st_size
        for m in members:
            name = _normalise(m.name)
            if m.issym() or m.islnk():
                raise UpcycleError(f"archive member '{m.name}' is a link: refusing to read {self.path}")
            if not (m.isfile() or m.isdir()):
                raise UpcycleError(f"archive member '{m.name}' is not a regular file: refusing to read {self.path}")
            if m.isfile() and not self.compressed and m.offset_data + m.size > size:
                raise UpcycleError(f"{self.path} is truncated: member '{m.name}' runs past the end of the file")
            if name:
                self.members[name] = m

    def close(self) -> None:
        self._tar.close()

    def names(self) -> list[str]:
        return [n for n, m in self.members.items() if m.isfile()]

    def read_bytes(self, name: str) -> bytes:
        member = self.members.get(name)
        if member is None or not member.isfile():
            raise UpcycleError(f"'{name}' is missing from {self.path}")
        with bad_file(self.path, f"is truncated or corrupt at member '{name}'"):
            f = self._tar.extractfile(member)
            assert f is not None
            return f.read()

    def window(self, name: str) -> "FileWindow":
        """A seekable read-only view of one member's bytes inside an uncompressed tar (no copy)."""
        if self.compressed:
            raise UpcycleError(f"{self.path} is compressed: windows need an uncompressed tar (use extract_to)")
        m = self.members[name]
        return FileWindow(self.path, m.offset_data, m.size)

    def extract_to(self, prefix: str, dest: Path) -> Path:
        """Extract the members under `prefix` (already validated) into dest; returns dest/prefix."""
        chosen = {name: m for name, m in self.members.items()
                  if m.isfile() and (name == prefix or name.startswith(prefix.rstrip("/") + "/"))}
        check_free_disk(dest / prefix, sum(m.size for m in chosen.values()),
                        f"extracting {self.path} (compressed or legacy: it cannot be read in place)",
                        "set TMPDIR to a folder with room, or extract the .nemo yourself (tar -xf) and pass the folder")
        for name, m in chosen.items():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with bad_file(self.path, f"is truncated or corrupt at member '{name}'"), open(target, "wb") as out:
                src = self._tar.extractfile(m)
                assert src is not None
                shutil.copyfileobj(src, out, 16 << 20)
        return dest / prefix


class FileWindow(io.RawIOBase):
    """A read-only, seekable file-like object over bytes [offset, offset+size) of a file."""

    def __init__(self, path: Path, offset: int, size: int):
        super().__init__()
        self._f: IO[bytes] = open(path, "rb")
        self._start, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + pos))
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def refuse_special_files(path: Path) -> None:
    """A FIFO, device or socket blocks or never ends when read: refuse one anywhere in the input up front."""
    entries = [Path(path)]
    if entries[0].is_dir():
        for root, dirs, files in os.walk(path):  # does not follow links to directories
            entries += [Path(root, name) for name in dirs + files]
    for entry in entries:
        try:
            mode = entry.stat().st_mode
        except OSError:  # a dangling link: the reader reports the missing file
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UpcycleError(f"{entry} is a FIFO, device or socket, not a regular file: replace it with the "
                               "real file")


def load_yaml_mapping(path: Path | str, what: str = "") -> dict:
    """A YAML file that must hold a mapping, read with safe_load (no tag constructs an object); anything else,
    including a refused `!!python` tag, is a one-line error naming the file."""
    import yaml

    with bad_file(f"{what}{path}", "is not valid YAML", "fix its syntax (plain YAML, no !!python tags)"):
        cfg = yaml.safe_load(Path(path).read_text())
    if not isinstance(cfg, dict):
        raise UpcycleError(f"{what}{path} is not a YAML mapping of config fields: fix its contents")
    return cfg


# ---- outputs ------------------------------------------------------------------------------------------------

def check_output_path(path: Path, overwrite: bool, source: Path | str | None = None) -> None:
    """Refuse an existing output unless `overwrite`, and an output that is, holds or lies inside `source` (the
    input): replacing it would delete the input, or write into it."""
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UpcycleError(f"{path} already exists: choose another output path or pass --overwrite")
    if source is not None:
        out, src = Path(os.path.realpath(path)), Path(os.path.realpath(source))
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise UpcycleError(f"output {path} is, holds or lies inside the input {source}: writing it would "
                               "replace or change the input; choose an output path outside the input")


def check_free_disk(path: Path, need_bytes: int, what: str | None = None,
                    fix: str = "free space or write elsewhere") -> None:
    """Refuse to start when the file system `path` will be on cannot hold `need_bytes` (plus 5% slack); `what`
    names the work in the message (default: writing `path`)."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():  # the folders the output will create: measure where they will be made
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if need_bytes * 1.05 > free:
        raise UpcycleError(
            f"not enough free disk for {what or path}: need {need_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free on "
            f"{parent.resolve()}: {fix}"
        )


@contextmanager
def atomic_output(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling path to write into; rename it to `path` only when the block completes.

    An interrupted run leaves only a `.<name>.tmp-*` entry, never something that looks like a finished output.
    An old output being replaced is first moved into that entry, so a crash leaves it there, not lost; a path
    that appeared while writing without `overwrite` is left alone, and the finished output kept beside it.
    """
    path = Path(path)
    check_output_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    target = tmp / path.name  # the caller creates it (a file, or a directory when is_dir)
    keep = False
    try:
        yield target
        if path.exists() or path.is_symlink():
            if not overwrite:
                keep = True
                raise UpcycleError(f"{path} appeared while the output was written: the finished output is kept "
                                   f"as {target}; move it into place yourself, or rerun with --overwrite")
            os.replace(path, tmp / f"{path.name}.replaced")  # a link is moved as itself, not its target
        os.replace(target, path)
    finally:
        if tmp.exists() and not keep:
            shutil.rmtree(tmp, ignore_errors=True)




class TarWriter:
    """Writes an uncompressed tar member by member, each member's bytes streamed straight into the archive
    (its header is written as a placeholder and fixed once the size is known), so a `.nemo` is packed while
    it is written, without a second copy on disk. Member names follow NeMo: `./model_config.yaml`, ..."""

    BLOCK = tarfile.BLOCKSIZE

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self._headers: dict[str, tuple[int, int]] = {}  # name -> (header offset, size)
        self._write_header(".", 0, tarfile.DIRTYPE)

    @staticmethod
    def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
        info = tarfile.TarInfo(name if name.startswith("./") or name == "." else f"./{name}")
        info.size, info.type, info.mode = size, kind, 0o755 if kind == tarfile.DIRTYPE else 0o644
        info.mtime = int(time.time())
        # ustar sizes stop below 8 GiB (11 octal digits); past that GNU's base-256 size, which readers since
        # GNU tar 1.13 and Python's tarfile take, in the same one block while the name fits 100 characters
        buf = info.tobuf(format=tarfile.USTAR_FORMAT if size < 8 ** 11 else tarfile.GNU_FORMAT)
        if len(buf) != TarWriter.BLOCK:
            raise UpcycleError(f"member name too long for a tar header: {name}")
        return buf

    def _write_header(self, name: str, size: int, kind: bytes = tarfile.REGTYPE) -> None:
        self._headers[name] = (self._f.tell(), size)
        self._f.write(self._header(name, size, kind))

    def add_dir(self, name: str) -> None:
        self._write_header(name.rstrip("/") + "/", 0, tarfile.DIRTYPE)

    def add_bytes(self, name: str, data: bytes) -> None:
        with self.member(name) as out:
            out.write(data)

    @contextmanager
    def member(self, name: str) -> Iterator["_MemberStream"]:
        self._write_header(name, 0)
        stream = _MemberStream(self._f)
        yield stream
        size = stream.tell()
        self._f.write(b"\0" * (-size % self.BLOCK))
        end = self._f.tell()
        header_at, _ = self._headers[name]
        self._f.seek(header_at)
        self._f.write(self._header(name, size))
        self._f.seek(end)
        self._headers[name] = (header_at, size)

    def rename(self, old: str, new: str) -> None:
        header_at, size = self._headers.pop(old)
        end = self._f.tell()
        self._f.seek(header_at)
        self._f.write(self._header(new, size))
        self._f.seek(end)
        self._headers[new] = (header_at, size)

    def exists(self, name: str) -> bool:
        return name in self._headers

    def close(self) -> None:
        self._f.write(b"\0" * (2 * self.BLOCK))  # end-of-archive marker
        self._f.close()


class _MemberStream(io.RawIOBase):
    """Write-only stream into the current tar member; `tell()` counts from the member's first byte."""

    def __init__(self, f: IO[bytes]):
        super().__init__()
        self._f, self._n = f, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        n = self._f.write(data)
        self._n += n
        return n

    def tell(self) -> int:
        return self._n

    def close(self) -> None:  # the archive stays open; the member ends when `TarWriter.member` exits
        pass
