"""The exporter process's ``main``: ``python -m snaptree._export_worker``, imported by nobody.

It opens the store read-only (a :class:`FollowingReader`), takes over the
directory's lock its parent handed it, and then runs one
:func:`snaptree.export_run.export_into` per request until its input ends.
The protocol and why the process exists: :mod:`snaptree._export_process`.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from typing import Any, BinaryIO

from ._directory_lock import DirectoryLock
from ._export_process import read_message, write_message
from ._following_reader import FollowingReader
from .errors import Error, ExportError, one_line
from .export_run import export_into

log = logging.getLogger(__name__)


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
        config = read_message(requests)
    except EOFError:
        return
    logging.getLogger("snaptree").setLevel(config["log_level"])
    try:
        lock = DirectoryLock.inherited(**config["lock"])
    except Exception as exc:
        _reply(replies, "error", _as_error(exc))
        return
    try:
        reader = FollowingReader(config["uri"], config["cache_size"])
    except Exception as exc:
        lock.release()
        _reply(replies, "error", _as_error(exc))
        return
    try:
        _reply(replies, "ok", os.getpid())
        while True:
            try:
                request = read_message(requests)
            except EOFError:
                return
            try:
                reader.catch_up()
                result = export_into(
                    reader.store,
                    lock.directory,
                    format=lock.format,
                    lock=lock,
                    fragments=reader.fragments,
                    **request,
                )
            except Exception as exc:  # a bug, a user's class, a storage error: report, go on
                _reply(replies, "error", _as_error(exc))
            else:
                _reply(replies, "ok", result)
    except BrokenPipeError:
        return  # the parent is gone; the export it asked for was finished under its lock
    finally:
        reader.close()
        lock.release()


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
    write_message(out, (status, value))


def _as_error(exc: Exception) -> Error:
    """What the parent is told: a snaptree error as it is, anything else in one line."""
    if isinstance(exc, Error):
        return exc
    log.debug("the traceback of the failure", exc_info=exc)
    return ExportError(
        one_line(f"the export process failed: unexpected {type(exc).__name__}: {exc}")
    )


class _OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return one_line(super().formatMessage(record))


if __name__ == "__main__":
    main()
