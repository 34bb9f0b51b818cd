"""A long-lived exporter process that reads the storage itself.

Why a process: an export is CPU-bound Python (unpickling records,
pickling the plain tree). Run as a thread beside the application's writer
threads, it shares their interpreter lock, and every writer then waits up
to a switch interval at each I/O call it makes (the convoy effect): measured
before this module existed, writers fell to 3% of their throughput and their
p99 latency grew 120-fold. In its own process it shares nothing with them
but the disk.

Why long-lived: a fresh process per export starts cold (interpreter,
imports, a rescan of the FileStorage index, an empty object cache). This
one stays up, keeps its ZODB cache, and before each export only reads what
was committed since the last one (:mod:`snaptree._file_follower` for a
FileStorage; ZEO and RelStorage clients follow commits by themselves).

The protocol is deliberately small: length-prefixed pickles over the
child's stdin and stdout. The first message names the store to open and
the descriptor of the directory's lock, which the child inherits (see
snaptree.schedule.DirectoryLock); every later one is ``(function name,
keyword arguments)`` and gets back ``("ok", result)`` or ``("error",
exception)``: a snaptree error unchanged, anything else as one ExportError
line that names its type (the child's stderr is the parent's, and a
traceback there is no report). End of input means "exit". The worker
ignores SIGINT, so a Ctrl-C in the terminal reaches only the parent, which
decides whether to finish or abandon the export in progress.
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
from typing import TYPE_CHECKING, Any, BinaryIO

from .errors import Error, ExportError, one_line

if TYPE_CHECKING:
    from .schedule import DirectoryLock

log = logging.getLogger(__name__)

_LENGTH = 8
#: How often a waiting parent checks that the worker is alive and not cancelled.
_POLL_SECONDS = 0.5


class Abandoned(ExportError):
    """The export in progress was abandoned on request; nothing was written under a final name."""


def _write_message(out: BinaryIO, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(len(data).to_bytes(_LENGTH, "big") + data)
    out.flush()


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _reply(out: BinaryIO, status: str, value: Any) -> None:
    """Send a reply; an error that cannot be pickled goes as an ExportError with its message."""
    try:
        pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        if status == "error":
            value = ExportError(one_line(str(value)))
        else:
            status = "error"
            value = ExportError(one_line(f"the export process cannot send its result back: {exc}"))
    _write_message(out, (status, value))


def _as_error(exc: Exception) -> Error:
    """What the parent is told: a snaptree error as it is, anything else in one line."""
    if isinstance(exc, Error):
        return exc
    log.debug("the traceback of the failure", exc_info=exc)
    return ExportError(
        one_line(f"the export process failed: unexpected {type(exc).__name__}: {exc}")
    )


def _describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            pass
    return f"exited (status {returncode})"


def _read_message(fd: int) -> Any:
    header = _read_exactly(fd, _LENGTH)
    if header is None:
        raise EOFError
    body = _read_exactly(fd, int.from_bytes(header, "big"))
    if body is None:
        raise EOFError
    return pickle.loads(body)


# -- the parent's side --------------------------------------------------------------


class ExportProcess:
    """The parent's handle on one worker process: start it, call it, stop it.

    *lock* (a snaptree.schedule.DirectoryLock the caller holds) is handed to
    the worker as an inherited descriptor: the worker's export_into runs
    under it instead of locking again, and it stays held until both have
    let go of it (see DirectoryLock).
    """

    def __init__(
        self, uri: str, *, cache_size: int, lock: DirectoryLock, start_timeout: float = 300.0
    ) -> None:
        self.uri = uri
        self._lock = threading.Lock()
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
            _write_message(self._in, config)
            self._receive(deadline=time.monotonic() + start_timeout, cancel=None)
        except BaseException:
            self.close(timeout=5)
            raise

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def call(self, name: str, cancel: threading.Event | None = None, **kwargs: Any) -> Any:
        """Run ``name(store, **kwargs)`` in the worker and return its result.

        Setting *cancel* abandons the call: the worker is killed (its
        temporary file carries its pid, and the next run in that directory
        removes it) and Abandoned is raised.
        """
        with self._lock:
            if not self.alive():
                raise ExportError(
                    f"the export process {_describe_exit(self._proc.returncode)}; "
                    "see its messages above"
                )
            try:
                _write_message(self._in, (name, kwargs))
            except BrokenPipeError:
                raise ExportError("the export process exited before it got the request") from None
            return self._receive(deadline=None, cancel=cancel)

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
            status, value = _read_message(self._out)
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
        """Ask the worker to exit (end of its input); kill it after *timeout* seconds."""
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


def worker_uri(store: Any) -> str | None:
    """The URI another process can open to read *store*'s storage, if there is one.

    A FileStorage is opened read-only by path; a ZEO or RelStorage store by
    the URI it was opened with; an in-memory storage cannot be read from
    another process at all.
    """
    from ZODB.FileStorage import FileStorage

    storage = store.db.storage
    if isinstance(storage, FileStorage):
        return os.path.abspath(storage.getName())
    return store._shareable_uri


# -- the worker's side --------------------------------------------------------------


class FollowingReader:
    """A read-only store that keeps up with new commits between exports, and stays warm.

    Used by the exporter process and by ``snaptree export --every``: before
    each export it reads what was committed since the last one (reopening
    the file after a pack), and pickle exports reuse the fragments of the
    last export for every node whose serials are unchanged (see
    snaptree.exports). The fragments belong to the store's connections and
    go when it is opened again.
    """

    def __init__(self, uri: str | None, cache_size: int) -> None:
        from .exports import FragmentCaches

        self.uri = uri
        self.cache_size = cache_size
        self.store = self._open()
        self.fragments = FragmentCaches()

    def _open(self) -> Any:
        from .store import open as open_store

        return open_store(self.uri, read_only=True, cache_size=self.cache_size, pool_size=2)

    def catch_up(self) -> None:
        from . import _file_follower
        from .exports import FragmentCaches

        if not _file_follower.catch_up(self.store):
            log.info("%s was packed or replaced; opening it again", self.store.source)
            self.store.close()
            self.store = self._open()
            self.fragments = FragmentCaches()

    def call(self, function: Any, **kwargs: Any) -> Any:
        """``function(store, **kwargs)`` on the caught-up store, with fragments kept."""
        from . import exports

        self.catch_up()
        with exports.keeping_fragments(self.fragments):
            return function(self.store, **kwargs)

    def close(self) -> None:
        self.store.close()


class _Worker(FollowingReader):
    def __init__(self, uri: str | None, cache_size: int, lock: DirectoryLock) -> None:
        super().__init__(uri, cache_size)
        self.lock = lock

    def run(self, name: str, kwargs: dict[str, Any]) -> Any:
        from . import exports, schedule

        if name == "export_into":
            return self.call(schedule.export_into, lock=self.lock, **kwargs)
        functions = {"export": exports.export}
        return self.call(functions[name], **kwargs)


class _OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return one_line(super().formatMessage(record))


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The writers come first: an export may take longer, a commit should not.
    os.nice(10)
    requests = sys.stdin.buffer.fileno()
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but replies may reach the parent's pipe
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _OneLineFormatter("%(levelname)s %(name)s (export process %(process)d): %(message)s")
    )
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    try:
        config = _read_message(requests)
    except EOFError:
        return
    logging.getLogger("snaptree").setLevel(config["log_level"])
    try:
        from .schedule import DirectoryLock

        worker = _Worker(
            config["uri"], config["cache_size"], DirectoryLock.inherited(**config["lock"])
        )
    except Exception as exc:
        _reply(replies, "error", _as_error(exc))
        return
    try:
        _reply(replies, "ok", os.getpid())
        while True:
            try:
                name, kwargs = _read_message(requests)
            except EOFError:
                return
            try:
                result = worker.run(name, kwargs)
            except Exception as exc:  # a bug, a user's class, a storage error: report, go on
                _reply(replies, "error", _as_error(exc))
            else:
                _reply(replies, "ok", result)
    except BrokenPipeError:
        return  # the parent is gone; the export it asked for was finished under its lock
    finally:
        worker.close()
        worker.lock.release()


if __name__ == "__main__":
    main()
