"""A persistent class whose pickle export fails or waits on request, for the schedule's tests.

An application's own class, as far as snaptree knows: the tests store a
``Trap`` in the tree and make the next export of it raise (a bug in a
user's class) or stop half-way until the test lets it go, in the test's
process or in an exporter process. That process imports this module, so
the tests put this directory on its PYTHONPATH.

The waiting export and the test meet at two FIFOs in a directory named by
``$SNAPTREE_TEST_GATE``: the export writes its pid into ``entered`` and
then waits to read ``go`` from ``release``. The test's side (:class:`Gate`)
opens both so that neither side can block on ``open`` and every wait of
the test has a timeout.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path
from typing import Any

import persistent

GATE_VARIABLE = "SNAPTREE_TEST_GATE"


class Trap(persistent.Persistent):
    """Exported as ``{"mode": mode}``: "raise" makes its export fail, "wait" stop at the gate."""

    def __init__(self, mode: str | None = None) -> None:
        self.mode = mode

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self.mode == "raise":
            raise ZeroDivisionError("this Trap refuses to be exported")
        if self.mode == "wait":
            gate = Path(os.environ[GATE_VARIABLE])
            with open(gate / "entered", "w") as entered:
                entered.write(f"{os.getpid()}\n")
            with open(gate / "release", "rb") as release:
                release.read(2)
        return (dict, ({"mode": self.mode},))


class Gate:
    """The test's side of the gate in *directory* (set ``$SNAPTREE_TEST_GATE`` to it)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        os.mkfifo(directory / "entered")
        os.mkfifo(directory / "release")
        # Read end, non-blocking: the export's open for writing finds a reader.
        self._entered = os.open(directory / "entered", os.O_RDONLY | os.O_NONBLOCK)
        # Both ends: the export's open for reading finds a writer, and "go"
        # stays in the FIFO until it is read.
        self._release = os.open(directory / "release", os.O_RDWR)

    def wait_entered(self, timeout: float) -> int:
        """Wait until an export is held at the gate; return the pid of its process."""
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._entered], [], [], max(0.0, remaining))
            chunk = os.read(self._entered, 64) if ready else b""
            if not chunk and time.monotonic() >= deadline:
                raise AssertionError(f"no export reached the gate in {timeout} s")
            data += chunk
        return int(data)

    def release(self) -> None:
        os.write(self._release, b"go")

    def close(self) -> None:
        os.close(self._entered)
        os.close(self._release)
