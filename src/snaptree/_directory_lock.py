"""The one writer of a format's dumps in a directory: ``.snaptree-export-<format>.lock``.

See :class:`DirectoryLock`. The lock file holds one JSON line naming its
holder (pid, host, since, command with any password masked), for whoever
is refused; a clean release empties it.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shlex
import socket
import sys
from pathlib import Path

import zc.lockfile

from . import _atomic
from .errors import ArgumentError, ExportError
from .manifest import check_format
from .uris import redact

#: The lock file of a format's dumps in a directory; ``{format}`` is pickle, json or zodb.
LOCK_NAME = ".snaptree-export-{format}.lock"


def lock_path(directory: str | os.PathLike[str], format: str) -> Path:  # noqa: A002
    """The lock file of *format*'s dumps in *directory* (see DirectoryLock)."""
    return Path(directory) / LOCK_NAME.format(format=format)


def _masked_command() -> str:
    """This process's command line, with the password of any URI in it masked."""
    words = []
    for word in sys.argv:
        option, equals, value = word.partition("=")
        if equals and "://" in value:
            word = option + equals + redact(value)
        elif "://" in word:
            word = redact(word)
        words.append(shlex.quote(word))
    return " ".join(words)


class _LockFile(zc.lockfile.SimpleLockFile):
    """zc.lockfile's lock (an flock, released by the kernel when its holder exits), with
    the holder's name written into the file for whoever is refused."""

    def __init__(self, path: Path, holder: str) -> None:
        self._holder = holder
        super().__init__(str(path))

    def _on_lock(self) -> None:
        # zc.lockfile 4.0's hook, called with the lock held; self._fp is its open file,
        # which its own LockFile writes here too. Unbuffered, so that a full disk
        # cannot leave data for zc.lockfile's flush() to fail on.
        fd = self.fileno()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._holder.encode(), 0)
        except OSError:
            pass  # the name is for people; the lock holds without it

    def fileno(self) -> int:
        return self._fp.fileno()  # type: ignore[no-any-return]


class DirectoryLock:
    """The right to write one format's dumps into a directory: one schedule or one run.

    Two writers in one directory undo each other: one's retention deletes the
    manifest the other has just renamed into place, leaving a dump no later
    run will ever delete, and ``latest`` ends up on a deleted dump. So each
    writer holds ``.snaptree-export-<format>.lock`` in the directory (an
    ``Exporter`` from its first export until ``stop()``, ``snaptree export
    --dir`` for as long as it runs, a one-off :func:`snaptree.export_run.export_into` for
    its run) and a second is refused at once, with the holder's name. The lock
    is zc.lockfile's, as for ZODB's ``Data.fs.lock``: the kernel releases it
    when its holder exits, however it exits, so a crashed holder never
    blocks the next one. Formats are independent (their own names, latest
    and retention), so an hourly pickle and a daily json schedule may share
    a directory.

    The exporter process does not lock again, which the parent's lock would
    refuse: it inherits the parent's descriptor, the same open file and so
    the same lock (:meth:`inherited`). If the application dies in the middle
    of an export, the directory stays locked until the exporter process has
    finished that export and exited.
    """

    def __init__(self, directory: Path, format: str, file: _LockFile | None, fd: int) -> None:  # noqa: A002
        self.directory = directory
        self.format = format
        self.path = lock_path(directory, format)
        self._file = file
        self._fd: int | None = fd

    @classmethod
    def acquire(
        cls,
        directory: str | os.PathLike[str],
        format: str,  # noqa: A002
        *,
        verb: str = "export",
    ) -> DirectoryLock:
        """Take the lock, or raise ExportError naming its holder and what to do.

        *verb* says in the errors what the lock was taken for ("prune").
        """
        check_format(format)
        folder = _atomic.existing_directory(directory, f"cannot {verb} {format} dumps")
        path = lock_path(folder, format)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": _masked_command(),
        }
        try:
            file = _LockFile(path, json.dumps(holder) + "\n")
        except zc.lockfile.LockError as exc:
            cause = exc.__context__
            if isinstance(cause, OSError) and cause.errno not in (errno.EAGAIN, errno.EACCES):
                raise ExportError(_atomic.describe_os_error(cause, path)) from cause
            raise ExportError(
                f"cannot {verb} {format} dumps in {folder}: {path.name} is held by "
                f"{_describe_holder(path)}, which exports them there (itself or through its "
                "export process), and two writers in one directory delete each other's "
                "dumps; stop that schedule or wait for its run to end, or export into "
                "another directory"
            ) from None
        except OSError as exc:
            raise ExportError(_atomic.describe_os_error(exc, path)) from exc
        return cls(folder, format, file, file.fileno())

    @classmethod
    def inherited(cls, directory: str, format: str, fd: int) -> DirectoryLock:  # noqa: A002
        """The lock a parent holds and handed over as descriptor *fd* (the exporter process)."""
        path = lock_path(directory, format)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if not same:
            raise ExportError(f"the export process was not handed the lock {path}")
        return cls(Path(directory), format, None, fd)

    def fileno(self) -> int:
        """The descriptor to hand to the exporter process (it then holds the lock too)."""
        if self._fd is None:
            raise ExportError(f"the lock {self.path} was released")
        return self._fd

    def check_covers(self, directory: str | os.PathLike[str], format: str) -> None:  # noqa: A002
        """Refuse to write under a lock that is not this directory's and format's, or released."""
        self.fileno()
        if Path(os.path.abspath(directory)) != self.directory:
            raise ArgumentError(f"lock= is the lock of {self.directory}, not of {directory}")
        if format != self.format:
            raise ArgumentError(f"lock= is the lock of {self.format} dumps, not {format}")

    def release(self) -> None:
        """Empty the file (its holder is gone) and unlock; an inherited lock is only closed."""
        if self._file is not None:
            try:
                os.ftruncate(self._file.fileno(), 0)
            except OSError:
                pass  # unlocking is what matters
            self._file.close()
        elif self._fd is not None:
            os.close(self._fd)
        self._file = self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_holder(path: Path) -> str:
    """``pid 123 on host web1 since <time> (command: <command>)`` from a held lock file."""
    try:
        holder = json.loads(path.read_text())
        return (
            f"pid {holder['pid']} on host {holder['host']} since {holder['since']} "
            f"(command: {holder['command']})"
        )
    except (OSError, ValueError, TypeError, KeyError):
        return "another process (it has not written its name into the file yet)"
