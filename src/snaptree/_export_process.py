"""The exporter process, seen from the parent: start it, ask it for one run at a time, stop it.

Why a process: an export is CPU-bound Python (unpickling records,
pickling the plain tree). Run as a thread beside the application's writer
threads, it shares their interpreter lock, and every writer then waits up
to a switch interval at each I/O call it makes (the convoy effect): measured
before the exporter process existed, writers fell to 3% of their throughput
and their p99 latency grew 120-fold. In its own process it shares nothing
with them but the disk.

Why long-lived: a fresh process per export starts cold (interpreter,
imports, a rescan of the FileStorage index, an empty object cache). This
one stays up, keeps its ZODB cache and the pickle fragments of its last
export, and before each export only reads what was committed since the
last one (:mod:`snaptree._following_reader`).

The protocol, spoken by :class:`ExportProcess` here and by the child's
``main`` (:mod:`snaptree._export_worker`, run as ``python -m``, imported
by nobody): length-prefixed pickles over the child's stdin and stdout.
The first message is the configuration: the store to open, its cache size,
the descriptor of the directory's lock, which the child inherits (see
:class:`snaptree._directory_lock.DirectoryLock`), and the parent's log
level. The child answers it, and then every request, which holds the
keyword arguments of one :func:`snaptree.export_run.export_into`, with
``("ok", result)`` or ``("error", exception)``: a snaptree error
unchanged, anything else as one ExportError line that names its type (the
child's stderr is the parent's, and a traceback there is no report). End
of input means "exit". The child ignores SIGINT, so a Ctrl-C in the
terminal reaches only the parent, which decides whether to finish or
abandon the export in progress.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO

from ._directory_lock import DirectoryLock
from .errors import ExportError, one_line
from .export_run import RunResult
from .retention import Retention

_LENGTH = 8
#: How often a waiting parent checks that the child is alive and not cancelled.
_POLL_SECONDS = 0.5


class Abandoned(ExportError):
    """The export in progress was abandoned on request; nothing was written under a final name."""


def write_message(out: BinaryIO, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(len(data).to_bytes(_LENGTH, "big") + data)
    out.flush()


def read_message(fd: int) -> Any:
    """The next message on *fd*; EOFError at the end of input."""
    header = _read_exactly(fd, _LENGTH)
    if header is None:
        raise EOFError
    body = _read_exactly(fd, int.from_bytes(header, "big"))
    if body is None:
        raise EOFError
    return pickle.loads(body)


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class ExportProcess:
    """The parent's handle on one exporter process: start it, run exports in it, stop it.

    *lock* (a DirectoryLock the caller holds) is handed to the child as an
    inherited descriptor: its runs are made under it instead of locking
    again, and it stays held until both have let go of it.
    """

    def __init__(
        self, uri: str, *, cache_size: int, lock: DirectoryLock, start_timeout: float = 300.0
    ) -> None:
        self.uri = uri
        self.lock = lock
        self._one_call = threading.Lock()
        fd = lock.fileno()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "snaptree._export_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            pass_fds=(fd,),
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._in = self._proc.stdin
        self._out = self._proc.stdout.fileno()
        config = {
            "uri": uri,
            "cache_size": cache_size,
            "lock": {"directory": str(lock.directory), "format": lock.format, "fd": fd},
            # the parent's verbosity for snaptree's own records (tracebacks at DEBUG)
            "log_level": logging.getLogger("snaptree").getEffectiveLevel(),
        }
        try:
            write_message(self._in, config)
            self._receive(deadline=time.monotonic() + start_timeout, cancel=None)
        except BaseException:
            self.close(timeout=5)
            raise

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def export_into(
        self,
        *,
        subtree: str,
        keep: Retention | None,
        compress: str | None,
        force: bool,
        cancel: threading.Event | None = None,
    ) -> RunResult:
        """One :func:`snaptree.export_run.export_into` into the lock's directory, in the child.

        Setting *cancel* abandons it: the child is killed (its temporary file
        carries its pid, and the next run in that directory removes it) and
        Abandoned is raised.
        """
        request = {"subtree": subtree, "keep": keep, "compress": compress, "force": force}
        with self._one_call:
            if not self.alive():
                raise ExportError(
                    f"the export process {_describe_exit(self._proc.returncode)}; "
                    "see its messages above"
                )
            try:
                write_message(self._in, request)
            except BrokenPipeError:
                raise ExportError("the export process exited before it got the request") from None
            result: RunResult = self._receive(deadline=None, cancel=cancel)
            return result

    def _receive(self, *, deadline: float | None, cancel: threading.Event | None) -> Any:
        while True:
            ready, _, _ = select.select([self._out], [], [], _POLL_SECONDS)
            if ready:
                break
            if cancel is not None and cancel.is_set():
                self.kill()
                raise Abandoned("the export in progress was abandoned; nothing was written")
            if deadline is not None and time.monotonic() > deadline:
                self.kill()
                raise ExportError("the export process did not start in time")
            if not self.alive():
                break
        try:
            status, value = read_message(self._out)
        except EOFError:
            self._proc.wait(timeout=10)
            raise ExportError(
                f"the export process {_describe_exit(self._proc.returncode)} in the "
                "middle of an export; nothing was written under a final name"
            ) from None
        except Exception as exc:  # a reply this process cannot unpickle
            raise ExportError(
                one_line(f"cannot read the export process's reply: {type(exc).__name__}: {exc}")
            ) from None
        if status == "error":
            raise value
        return value

    def kill(self) -> None:
        if self.alive():
            self._proc.kill()
        self._proc.wait(timeout=30)

    def close(self, timeout: float = 30.0) -> None:
        """Ask the child to exit (end of its input); kill it after *timeout* seconds."""
        try:
            self._in.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def _describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            pass
    return f"exited (status {returncode})"
