"""A real corpus every machine has: the Python source of CPython's own standard library (~30 MB).

Used where no user data is given (demo, tests, benchmarks), so nothing is downloaded at run time.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_root() -> Path:
    """The folder holding this Python's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a fixed order (site-packages excluded)."""
    return sorted(p for p in stdlib_root().rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def stdlib_text(max_bytes: int, offset: int = 0) -> str:
    """Up to `max_bytes` bytes of standard-library source, starting `offset` bytes into the concatenation."""
    chunks, have, skipped = [], 0, 0
    for path in stdlib_files():
        data = path.read_bytes()
        if skipped + len(data) <= offset:
            skipped += len(data)
            continue
        data = data[max(0, offset - skipped):]
        skipped = offset
        chunks.append(data[: max_bytes - have])
        have += len(chunks[-1])
        if have >= max_bytes:
            break
    return b"".join(chunks).decode("utf-8", errors="replace")
