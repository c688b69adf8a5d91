"""Tokenizers with the small interface the rest of the project uses (and Megatron's datasets need):
`vocab_size`, `eod`, `encode(text) -> list[int]`, `decode(ids) -> str`, `unique_identifiers`."""

from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes as tokens (0-255), plus an end-of-document token 256. Needs no training and no files."""

    vocab_size = 257
    eod = 256

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "ByteTokenizer"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
