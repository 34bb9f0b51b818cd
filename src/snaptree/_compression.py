"""Compressed dumps: zstd, from the standard library where it has it, else its backport.

Python 3.14 ships ``compression.zstd``; ``backports.zstd`` is the same module
for older interpreters (a dependency there). No codec of snaptree's own.

Writing (:class:`CompressingWriter`) streams: each block the format's
writer hands over is compressed as it comes, and what zstd gives back goes
to the file, so memory stays bounded (zstd's window, a few MiB at the
default level) however large the dump. A compressed dump is named with
``.zst`` after its format's suffix (``dump.pickle.zst``); its manifest
records ``"compression": "zstd"`` and the size and sha256 of the
compressed file, which is what lies on disk.

Reading is transparent (:func:`open_for_reading`): a file that starts with
zstd's frame magic is decompressed as a stream, whatever its name, so
``verify`` and ``import`` take ``dump.pickle.zst`` as they take
``dump.pickle``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

try:  # Python 3.14+
    from compression import zstd
except ImportError:  # pragma: no cover - depends on the interpreter
    from backports import zstd

#: The four bytes every zstd frame starts with (RFC 8878, 3.1.1).
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: The suffix a compressed dump gets after its format's own.
ZSTD_SUFFIX = ".zst"
#: The compressions an export can ask for.
COMPRESSIONS = ("zstd",)


def is_zstd(head: bytes) -> bool:
    return head[:4] == ZSTD_MAGIC


def open_for_reading(path: str | os.PathLike[str]) -> IO[bytes]:
    """*path* opened for reading as a binary stream, decompressed if it is zstd.

    The decompressing stream reads the file in blocks and keeps a bounded
    window in memory, however large the dump. A damaged or truncated zstd
    stream raises, while it is read, one of :func:`decompressor_error`.
    """
    with open(path, "rb") as raw:
        compressed = is_zstd(raw.read(4))
    if compressed:
        return zstd.ZstdFile(path, "rb")  # type: ignore[no-any-return]
    return open(path, "rb")


def decompressor_error() -> tuple[type[Exception], ...]:
    """What a damaged zstd stream raises while it is read: ZstdError, or EOFError if cut short."""
    return (zstd.ZstdError, EOFError)


def compression_of(path: str | os.PathLike[str]) -> str | None:
    """The compression a dump's name says: ``"zstd"`` for ``.zst`` (any case), else None."""
    return "zstd" if Path(path).suffix.lower() == ZSTD_SUFFIX else None


def uncompressed_name(path: str | os.PathLike[str]) -> Path:
    """*path* without its ``.zst``: the name whose suffix tells the format (``x.pickle``)."""
    path = Path(path)
    return path.with_suffix("") if compression_of(path) else path


class CompressingWriter:
    """A writer that compresses what it is given into *out*, one zstd frame in all.

    :meth:`finish` ends the frame; until then zstd may hold back the last
    block. *out* is the hashing writer of the temporary file, so the size
    and checksum the manifest records are those of the compressed file.
    """

    def __init__(self, out: Any) -> None:
        self._out = out
        self._compressor = zstd.ZstdCompressor()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        compressed = self._compressor.compress(data)
        if compressed:
            self._out.write(compressed)
        return len(data)

    def finish(self) -> None:
        self._out.write(self._compressor.flush())


__all__ = [
    "COMPRESSIONS",
    "ZSTD_MAGIC",
    "ZSTD_SUFFIX",
    "CompressingWriter",
    "compression_of",
    "decompressor_error",
    "is_zstd",
    "open_for_reading",
    "uncompressed_name",
    "zstd",
]
