"""Compressed dumps: zstd, from the standard library where it has it, else its backport.

Python 3.14 ships ``compression.zstd``; ``backports.zstd`` is the same module
for older interpreters (a dependency there). Reading is transparent: a file
that starts with zstd's frame magic is decompressed as a stream, whatever
its name, so ``verify`` and ``import`` take ``dump.pickle.zst`` as they take
``dump.pickle``.
"""

from __future__ import annotations

import os
from typing import IO

try:  # Python 3.14+
    from compression import zstd
except ImportError:  # pragma: no cover - depends on the interpreter
    from backports import zstd

#: The four bytes every zstd frame starts with (RFC 8878, 3.1.1).
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: The suffix a compressed dump gets after its format's own.
ZSTD_SUFFIX = ".zst"


def is_zstd(head: bytes) -> bool:
    return head[:4] == ZSTD_MAGIC


def open_for_reading(path: str | os.PathLike[str]) -> IO[bytes]:
    """*path* opened for reading as a binary stream, decompressed if it is zstd.

    The decompressing stream reads the file in blocks and keeps a bounded
    window in memory, however large the dump.
    """
    with open(path, "rb") as raw:
        compressed = is_zstd(raw.read(4))
    if compressed:
        return zstd.ZstdFile(path, "rb")  # type: ignore[no-any-return]
    return open(path, "rb")


def decompressor_error() -> type[Exception]:
    """The exception a damaged zstd stream raises while it is read."""
    return zstd.ZstdError  # type: ignore[no-any-return]


__all__ = ["ZSTD_MAGIC", "ZSTD_SUFFIX", "decompressor_error", "is_zstd", "open_for_reading", "zstd"]
