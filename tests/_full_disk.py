"""A disk that fills up, simulated under the files ``snaptree._atomic`` writes, here or in a child.

ENOSPC is simulated at the lowest-level write an export makes: the
unbuffered ``io.FileIO.write`` under the buffered file that
``snaptree._atomic`` opens with ``os.fdopen``. It behaves as write(2) does
on a disk that fills up: a short write of what still fits, then ENOSPC.
Only ``_atomic``'s view of ``os`` is replaced (its ``fdopen``), so a
FileStorage committed to meanwhile is untouched.

A command started with :func:`command_env` in its environment (``snaptree
export`` through ``tests/_cli.py``) fills up the same way: the
``sitecustomize`` in ``tests/_full_disk_site`` installs a :class:`FullDisk`
in it at start-up.
"""

from __future__ import annotations

import errno
import io
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Bytes that still fit on the disk of a command started with command_env().
VARIABLE = "SNAPTREE_TEST_FULL_DISK"
SITE = Path(__file__).resolve().parent / "_full_disk_site"


class FullDisk:
    """ENOSPC once *budget* more bytes are written (None: not full)."""

    def __init__(self) -> None:
        self.budget: int | None = None
        self.refused = 0
        #: Called at the first refused write (the test holds it there to watch writers).
        self.on_first_refusal: Callable[[], None] | None = None

    def patched_os(self) -> types.ModuleType:
        """A copy of ``os`` whose ``fdopen`` gives files written through this disk."""
        disk = self

        class FillingFile(io.FileIO):
            def write(self, data: Any) -> int:
                view = memoryview(data).cast("B")
                if disk.budget is None:
                    return super().write(view)
                if disk.budget == 0:
                    disk.refused += 1
                    if disk.refused == 1 and disk.on_first_refusal is not None:
                        disk.on_first_refusal()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written = super().write(view[: disk.budget])  # a short write, as write(2) does
                disk.budget -= written
                return written

        def fdopen(fd: int, mode: str = "r", buffering: int = -1, **kwargs: Any) -> Any:
            assert mode == "wb", mode
            return io.BufferedWriter(FillingFile(fd, "wb"), max(buffering, io.DEFAULT_BUFFER_SIZE))

        patched = types.ModuleType("os")
        patched.__dict__.update(os.__dict__)
        patched.fdopen = fdopen  # type: ignore[attr-defined]
        return patched


def command_env(budget: int) -> dict[str, str]:
    """The environment that makes a command's disk full after *budget* more bytes."""
    tests = str(Path(__file__).resolve().parent)
    path = [str(SITE), tests, os.environ.get("PYTHONPATH", "")]
    return {VARIABLE: str(budget), "PYTHONPATH": os.pathsep.join(filter(None, path))}


def install_from_environment() -> None:
    """In a command started with command_env(): make snaptree._atomic write to a full disk."""
    budget = os.environ.get(VARIABLE)
    if budget is None:
        return
    from snaptree import _atomic

    disk = FullDisk()
    disk.budget = int(budget)
    _atomic.os = disk.patched_os()  # type: ignore[attr-defined]
