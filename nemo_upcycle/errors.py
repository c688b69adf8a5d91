"""The one exception type for bad user input.

Every message is a single line that names the problem and how to fix it; the CLI prints it without a traceback.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import fields
from typing import Callable, Iterator


class UpcycleError(ValueError):
    """Bad input (a recipe, a model config, a checkpoint): the message says what is wrong and what to do."""

    def __init__(self, message: str = "") -> None:
        # one line whatever user text the message quotes (a recipe or a file name with a newline in it)
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def reason(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for a one-line error."""
    lines = str(err).strip().splitlines()
    return lines[0].strip() if lines else type(err).__name__


@contextmanager
def bad_file(path: object, what: str, fix: str = "re-download or re-copy it") -> Iterator[None]:
    """Turn whatever the library parsing `path` raises on malformed bytes (json, yaml, pickle, safetensors,
    torch/DCP, tarfile, gzip) into one `UpcycleError` naming the file, what is wrong and the fix. Wrap only
    the library call that reads the file, so our own errors keep their messages."""
    try:
        yield
    except UpcycleError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to parse an untrusted file is that file's fault
        raise UpcycleError(f"{path} {what} ({type(err).__name__}: {reason(err)}): {fix}") from None


def check_field_types(obj: object, what: str) -> None:
    """Refuse a dataclass field whose value does not match its annotation (`int`, `float | None`, ...), so a
    hand-edited config value of the wrong type is a one-line error instead of a TypeError deep inside."""
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        checks = [_TYPE_CHECKS[k] for k in kinds if k in _TYPE_CHECKS]
        if len(checks) == len(kinds) and not any(check(value) for check in checks):
            raise UpcycleError(f"{what} {f.name} must be {' or '.join(kinds)}, got {value!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_TYPE_CHECKS: dict[str, Callable[[object], bool]] = {
    "int": _is_int,
    "float": lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v),  # type: ignore[arg-type]
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
    "tuple[int, ...]": lambda v: isinstance(v, tuple) and all(_is_int(x) for x in v),
}
