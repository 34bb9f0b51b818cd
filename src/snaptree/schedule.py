"""Scheduled exports into a directory: file names, ``latest``, retention, and the Exporter thread.

The same code serves ``snaptree export --dir`` (the script, run by cron,
systemd or with ``--every``) and :class:`Exporter` (the same schedule as a
thread inside the application). Decisions about time are pure functions of
the current time (:func:`next_run`, :func:`seconds_until`), so tests drive
them with a fake clock and never sleep.

A directory holds, per format:

- ``snaptree-<UTC time of the snapshot>-<tid>.<ext>`` and its
  ``.manifest.json``: one complete dump. Names sort in commit order.
- ``latest.<ext>``: a relative symlink to the newest complete dump,
  replaced atomically (a new link renamed over the old one), so
  ``pickle.load(open("dumps/latest.pickle", "rb"))`` always reads a whole
  dump. A symlink rather than a pointer file, because every program can
  open it without knowing about snaptree.
- ``.<name>.<pid>.<random>.tmp``: a dump being written. A temporary left by
  a killed exporter is removed by the next run in that directory.

- ``.snaptree-export-<format>.lock``: held by the one writer of that
  format's dumps (see :class:`DirectoryLock`).

Retention (``keep``) only ever deletes complete dumps whose names match the
pattern above and that have a snaptree manifest, never the one ``latest``
points at, and nothing else in the directory. It never races another
writer: there is none while the lock is held.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zc.lockfile

from . import _atomic
from .errors import ArgumentError, Error, ExportError, one_line
from .exports import (
    MANIFEST_SUFFIX,
    SUFFIXES,
    ExportInfo,
    check_format,
    export_snapshot,
    manifest_path,
    resolve_format,
)
from .uris import redact

log = logging.getLogger(__name__)

#: Longest accepted interval between exports (31 days); longer is almost
#: certainly a unit mistake (milliseconds for seconds).
MAX_EVERY = 31 * 24 * 3600.0
#: Most dumps ``keep`` may retain per format.
MAX_KEEP = 100_000
#: Most of the wall time a schedule lets its exports spend flushing dumps to
#: disk (fsync). The flush, not the export's CPU, is what writers on the same
#: disk feel most: each of their commits fsyncs too and queues behind it.
#: Measured with 2 writer threads on a FileStorage (docs/export.md): exports
#: back to back from the exporter process raised the writers' p99 2.2-2.5-fold
#: at 10k objects (1.4-fold with the exporter's fsyncs turned off), 1.6-fold
#: at 100k; paced to this share, 1.05-1.3-fold. Why so small a share: each
#: exporter fsync delays the commits that overlap it, and a p99 moves once
#: about 1% of commits are delayed; at 0.5% it still ranged from 1.2x to
#: 1.7x from run to run. That is an export about every 0.6 s at
#: 10k objects, every 0.9 s at 100k. A longer ``every`` is stretched only
#: when an export's fsyncs take more than this share of it (0.15 s for
#: every=60, a dump of several hundred MB), and that is logged.
FLUSH_SHARE = 0.0025
#: Least time between the starts of two runs when the last one found nothing
#: new (0.1 s) or failed (1 s): with ``every=0`` the schedule would otherwise
#: spin on an idle store, or on a full disk, as fast as it can.
PAUSE_AFTER_NOTHING_NEW = 0.1
PAUSE_AFTER_FAILURE = 1.0

DUMP_NAME = re.compile(
    r"^snaptree-(?P<time>\d{8}T\d{6}\.\d{6}Z)-(?P<tid>[0-9a-f]{16})(?P<suffix>\.pickle|\.json|\.zexp)$"
)
_OWNED = re.compile(DUMP_NAME.pattern[:-1] + r"(?:\.manifest\.json)?$|^latest\.(pickle|json|zexp)$")


# -- validation and pure decisions --------------------------------------------------


def check_every(every: float | None) -> float | None:
    """Seconds between exports: 0 (back to back) up to 31 days, or None (once)."""
    if every is None:
        return None
    try:
        value = float(every)
    except (TypeError, ValueError):
        raise ArgumentError(f"every must be a number of seconds, not {every!r}") from None
    if not (0 <= value <= MAX_EVERY) or value != value:
        raise ArgumentError(
            f"every must be between 0 and {MAX_EVERY:.0f} seconds (31 days), not {every!r}"
        )
    return value


def check_keep(keep: int | None) -> int | None:
    """How many complete dumps to retain per format: 1 up to 100,000, or None (all)."""
    if keep is None:
        return None
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ArgumentError(f"keep must be a whole number of dumps, not {keep!r}")
    if not 1 <= keep <= MAX_KEEP:
        raise ArgumentError(f"keep must be between 1 and {MAX_KEEP}, not {keep}")
    return keep


def check_flush_share(flush_share: float) -> float:
    """The share of time exports may spend in fsync: above 0, at most 1 (no pacing)."""
    if not 0 < flush_share <= 1:
        raise ArgumentError(f"flush_share must be above 0 and at most 1, not {flush_share!r}")
    return flush_share


def next_run(
    last_start: float | None,
    every: float,
    *,
    flushed: float = 0.0,
    flush_share: float = FLUSH_SHARE,
    at_least: float = 0.0,
) -> float | None:
    """When (on the same clock as *last_start*) the next export is due; None: right away.

    Exports start every *every* seconds measured from the start of the
    previous one. One that overran its interval is followed at once by the
    next, with no burst of catch-up runs, unless the previous export spent
    *flushed* seconds in fsync: then the next waits until that is at most
    *flush_share* of the time since the previous one started (see
    FLUSH_SHARE). *at_least* is a floor for the interval (see
    PAUSE_AFTER_FAILURE).
    """
    if last_start is None:
        return None
    return last_start + max(every, at_least, flushed / flush_share if flushed > 0 else 0.0)


def seconds_until(now: float, due: float | None) -> float:
    """How long to wait at *now* for an export due at *due* (0 if due or overdue)."""
    return 0.0 if due is None else max(0.0, due - now)


def dump_name(format: str, committed_at: datetime.datetime, tid: str) -> str:  # noqa: A002
    """``snaptree-20261125T171200.123456Z-<tid>.pickle``: sorts in commit order."""
    stamp = committed_at.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"snaptree-{stamp}-{tid}{SUFFIXES[format]}"


def dumps_to_delete(dumps: list[Path], keep: int | None) -> list[Path]:
    """The oldest of *dumps* (sorted oldest first) beyond the newest *keep*."""
    if keep is None or len(dumps) <= keep:
        return []
    return dumps[: len(dumps) - keep]


# -- the directory's one writer -----------------------------------------------------

#: The lock file of a format's dumps in a directory; ``{format}`` is pickle, json or zodb.
LOCK_NAME = ".snaptree-export-{format}.lock"


def lock_path(directory: str | os.PathLike[str], format: str) -> Path:  # noqa: A002
    """The lock file of *format*'s dumps in *directory* (see DirectoryLock)."""
    return Path(directory) / LOCK_NAME.format(format=format)


def _existing_directory(directory: str | os.PathLike[str]) -> Path:
    folder = Path(os.path.abspath(directory))
    if not folder.is_dir():
        if folder.exists():
            raise ExportError(f"cannot export into {folder}: it is a file, not a directory")
        raise ExportError(f"cannot export into {folder}: no such directory; create it first")
    return folder


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
    --dir`` for as long as it runs, a one-off :func:`export_into` for its
    run) and a second is refused at once, with the holder's name. The lock
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
    def acquire(cls, directory: str | os.PathLike[str], format: str) -> DirectoryLock:  # noqa: A002
        """Take the lock, or raise ExportError naming its holder and what to do."""
        check_format(format)
        folder = _existing_directory(directory)
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
                f"cannot export {format} dumps into {folder}: {path.name} is held by "
                f"{_describe_holder(path)}, which exports them there (itself or through its "
                "export process), and two writers in one directory delete each other's "
                "dumps; stop that schedule or wait for its run to end, or export into "
                "another directory"
            ) from None
        except OSError as exc:
            raise ExportError(_atomic.describe_os_error(exc, path)) from exc
        lock = cls(folder, format, file, file.fileno())
        _warn_about_dumps_without_manifest(folder, format)
        return lock

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


def _warn_about_dumps_without_manifest(folder: Path, format: str) -> None:  # noqa: A002
    """Say once per writer which dumps retention will never delete, and why.

    A writer renames the manifest before the dump and retention deletes the
    dump before its manifest, so neither a crash nor (with the lock) a second
    writer leaves a dump without its manifest. One without is a copy someone
    made, or a leftover of snaptree versions before the lock, when two
    schedules could share a directory; nothing tells it from a file put there
    on purpose, so it is reported, not deleted.
    """
    suffix = SUFFIXES[format]
    strays = sorted(
        entry.name
        for entry in folder.iterdir()
        if (match := DUMP_NAME.match(entry.name))
        and match["suffix"] == suffix
        and not manifest_path(entry).exists()
    )
    if strays:
        log.warning(
            "%s holds %d %s dump(s) without a manifest (%s%s): retention never deletes "
            "them, since they cannot be verified; delete them, or move them out with their "
            "manifests if you have them",
            folder,
            len(strays),
            format,
            ", ".join(strays[:3]),
            ", ..." if len(strays) > 3 else "",
        )


# -- the directory ------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """One scheduled run: the dump written, or why nothing was; the dumps retention removed."""

    info: ExportInfo | None
    directory: Path
    format: str
    skipped_tid: str | None = None
    deleted: list[Path] = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        return self.info is None

    @property
    def flush_seconds(self) -> float:
        return 0.0 if self.info is None else self.info.flush_seconds

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "written": self.info is not None,
            "directory": str(self.directory),
            "format": self.format,
            "deleted": [str(p) for p in self.deleted],
        }
        if self.info is not None:
            data.update(self.info.to_json())
            del data["summary"]
        else:
            data["tid"] = self.skipped_tid
            data["reason"] = "nothing committed since the last export"
        return data

    def log_line(self) -> str:
        """The one line a run logs: file, tid, objects, bytes, seconds."""
        if self.info is None:
            return (
                f"nothing committed since the last export (tid {self.skipped_tid}); "
                f"wrote nothing in {self.directory}"
            )
        i = self.info
        removed = f", removed {len(self.deleted)} old" if self.deleted else ""
        return (
            f"exported {i.path} tid {i.tid}: {i.objects} objects, {i.bytes} bytes "
            f"in {i.seconds:.3f} s{removed}"
        )


def complete_dumps(directory: Path, format: str) -> list[Path]:  # noqa: A002
    """The complete dumps of *format* in *directory* (named ours, with a manifest), oldest first."""
    suffix = SUFFIXES[format]
    found = []
    for entry in directory.iterdir():
        match = DUMP_NAME.match(entry.name)
        if match and match["suffix"] == suffix and manifest_path(entry).is_file():
            found.append(entry)
    return sorted(found, key=lambda p: p.name)


def _manifest_tid(dump: Path) -> str | None:
    try:
        data = json.loads(manifest_path(dump).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and "snaptree_manifest" in data:
        return data.get("tid")
    return None


def latest_link(directory: Path, format: str) -> Path:  # noqa: A002
    return directory / f"latest{SUFFIXES[format]}"


def _point_latest(directory: Path, format: str, dump: Path) -> None:  # noqa: A002
    link = latest_link(directory, format)
    temp = directory / f".{link.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        os.symlink(dump.name, temp)
        os.replace(temp, link)
        _atomic.fsync_directory(directory)
    except OSError as exc:
        _atomic.discard(temp)
        raise ExportError(_atomic.describe_os_error(exc, link)) from exc


def _points_at(link: Path, dump: Path) -> bool:
    try:
        return os.readlink(link) == dump.name
    except OSError:
        return False


def _retain(directory: Path, format: str, keep: int | None) -> list[Path]:  # noqa: A002
    dumps = complete_dumps(directory, format)
    protected = set()
    link = latest_link(directory, format)
    if link.is_symlink():
        protected.add(directory / os.readlink(link))
    deleted = []
    for dump in dumps_to_delete(dumps, keep):
        if dump in protected or _manifest_tid(dump) is None:
            continue
        # The dump first: a crash in between leaves a manifest without a dump,
        # which is never mistaken for a complete dump and is removed below.
        _atomic.discard(dump)
        _atomic.discard(manifest_path(dump))
        deleted.append(dump)
    for entry in directory.iterdir():
        name = entry.name
        if name.endswith(MANIFEST_SUFFIX):
            dump = entry.with_name(name[: -len(MANIFEST_SUFFIX)])
            match = DUMP_NAME.match(dump.name)
            if (
                match
                and match["suffix"] == SUFFIXES[format]
                and not dump.exists()
                and _manifest_tid(dump) is not None
            ):
                _atomic.discard(entry)
    return deleted


def export_into(
    store: Any,
    directory: str | os.PathLike[str],
    *,
    format: str = "pickle",  # noqa: A002
    subtree: str = "/",
    keep: int | None = None,
    at: datetime.datetime | str | bytes | None = None,
    force: bool = False,
    lock: DirectoryLock | None = None,
) -> RunResult:
    """One scheduled run: export into *directory* unless nothing changed, point latest, retain.

    Writes nothing, and says so in the result, when the newest complete
    dump of this format already holds the tid the snapshot would export
    (unless *force*); ``latest`` is then pointed at that dump if it was not.
    The run holds the directory's :class:`DirectoryLock` for this format,
    taken here unless the caller holds it for a whole schedule (*lock*).

    *at* is refused: a past state in a schedule directory would become
    ``latest`` and count for retention, and the next run would skip as
    "nothing new". Export it to a file of its own.
    """
    check_format(format)
    check_keep(keep)
    if at is not None:
        raise ArgumentError(
            f"at={at!r}: a past state must not go into a schedule directory, where it would "
            "become latest and count for retention; export it to a file of its own "
            "(store.export(path, at=...), or snaptree export -o FILE --at ...)"
        )
    if lock is None:
        with DirectoryLock.acquire(directory, format) as held:
            return _export_held(store, held, subtree=subtree, keep=keep, force=force)
    lock.check_covers(directory, format)
    return _export_held(store, lock, subtree=subtree, keep=keep, force=force)


def _export_held(
    store: Any, lock: DirectoryLock, *, subtree: str, keep: int | None, force: bool
) -> RunResult:
    folder, fmt = lock.directory, lock.format
    if not folder.is_dir():
        raise ExportError(f"cannot export into {folder}: the directory is gone")
    _atomic.remove_stale_temporaries(folder, owned=_OWNED)
    existing = complete_dumps(folder, fmt)
    last_tid = _manifest_tid(existing[-1]) if existing and not force else None
    info = export_snapshot(
        store,
        lambda snap: folder / dump_name(fmt, snap.committed_at, snap.tid),
        format=fmt,
        at=None,
        subtree=subtree,
        unless_tid=last_tid,
    )
    if info is None:
        # latest may lag behind (a historical export of older versions moved it back)
        if not _points_at(latest_link(folder, fmt), existing[-1]):
            _point_latest(folder, fmt, existing[-1])
        return RunResult(None, folder, fmt, skipped_tid=last_tid)
    _point_latest(folder, fmt, info.path)
    return RunResult(info, folder, fmt, deleted=_retain(folder, fmt, keep))


def export_file(
    store: Any,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,  # noqa: A002
    subtree: str = "/",
    at: datetime.datetime | str | bytes | None = None,
    skip_unchanged: bool = False,
) -> RunResult:
    """One run into a fixed file name; with *skip_unchanged*, nothing is written if the file's
    manifest already holds the tid the snapshot would export. ``format=None``: from the name."""
    target = Path(path)
    format = resolve_format(target, format)  # noqa: A001
    last_tid = _manifest_tid(target) if skip_unchanged and target.is_file() else None
    info = export_snapshot(
        store, lambda snap: target, format=format, at=at, subtree=subtree, unless_tid=last_tid
    )
    return RunResult(info, target.parent, format, skipped_tid=None if info else last_tid)


def describe_failure(exc: BaseException) -> str:
    """One line for a failed run: a snaptree error's message, else the exception's type too."""
    if isinstance(exc, Error):
        return one_line(str(exc))
    return one_line(f"unexpected {type(exc).__name__}: {exc}")


def run_periodically(
    run_once: Callable[[], RunResult | None],
    *,
    every: float,
    stop: threading.Event,
    clock: Callable[[], float] = time.monotonic,
    on_error: Callable[[Exception], None] | None = None,
    flush_share: float = FLUSH_SHARE,
) -> int:
    """Call *run_once* every *every* seconds until *stop* is set; return the number of runs.

    Runs are paced so that their fsyncs take at most *flush_share* of the
    time (:func:`next_run`), and start no sooner than PAUSE_AFTER_NOTHING_NEW
    after one that wrote nothing. A run that fails is reported to *on_error*
    and the schedule goes on, PAUSE_AFTER_FAILURE later at the soonest (the
    disk may have space again, the bad value may be fixed). That includes
    exceptions that are not snaptree's (a bug, a user's class that cannot
    be pickled): a schedule runs unattended for months, and one bad value
    must not end it; their traceback is logged at DEBUG. Without *on_error*
    the error propagates. *stop* is checked between runs only: abandoning a
    run in progress is the caller's business.
    """
    check_flush_share(flush_share)
    runs = 0
    last_start: float | None = None
    flushed = at_least = 0.0
    while True:
        due = next_run(
            last_start, every, flushed=flushed, flush_share=flush_share, at_least=at_least
        )
        if every > 0 and flushed > every * flush_share:
            log.info(
                "pacing: the next export starts %.1f s after the last one, not %g s: its fsyncs "
                "took %.3f s, more than %g%% of the interval (flush_share)",
                flushed / flush_share,
                every,
                flushed,
                flush_share * 100,
            )
        if stop.wait(seconds_until(clock(), due)):
            return runs
        last_start = clock()
        flushed = at_least = 0.0
        try:
            result = run_once()
        except Exception as exc:
            if on_error is None:
                raise
            if not isinstance(exc, Error):
                log.debug("the traceback of the failed run", exc_info=exc)
            on_error(exc)
            at_least = PAUSE_AFTER_FAILURE
        else:
            if result is not None:
                flushed = result.flush_seconds
                at_least = PAUSE_AFTER_NOTHING_NEW if result.skipped else 0.0
        runs += 1


# -- the Exporter thread ------------------------------------------------------------


class _InProcess:
    """Exports on the calling thread, in this process (memory:// stores, or on request)."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def export_into(
        self, cancel: threading.Event | None, lock: DirectoryLock, **kwargs: Any
    ) -> RunResult:
        return export_into(self._store, lock=lock, **kwargs)

    def close(self, timeout: float) -> None:
        pass


class _InWorker:
    """Exports in a long-lived exporter process (started lazily, restarted if it dies).

    The process is handed the directory's lock (see DirectoryLock), so it
    serves one lock: a new one, after stop() and a later export_now(),
    starts a new process.
    """

    def __init__(self, uri: str, cache_size: int) -> None:
        self._uri = uri
        self._cache_size = cache_size
        self._process: Any = None
        self._lock: DirectoryLock | None = None

    def export_into(
        self, cancel: threading.Event | None, lock: DirectoryLock, **kwargs: Any
    ) -> RunResult:
        from ._export_worker import ExportProcess

        if self._process is not None and (self._lock is not lock or not self._process.alive()):
            self._process.close(timeout=0)
            self._process = None
        if self._process is None:
            self._process = ExportProcess(self._uri, cache_size=self._cache_size, lock=lock)
            self._lock = lock
        return self._process.call("export_into", cancel=cancel, **kwargs)  # type: ignore[no-any-return]

    def close(self, timeout: float) -> None:
        # stop() may close while the exporting thread closes too (export_now after stop)
        process, self._process, self._lock = self._process, None, None
        if process is not None:
            process.close(timeout=timeout)


class Exporter:
    """Exports *store* into *directory* every *every* seconds from a background thread.

    The thread replaces an application's own dumping thread in two lines::

        exporter = snaptree.Exporter(store, "dumps", every=60, keep=24)
        exporter.start()          # ... exporter.stop() at shutdown

    The export itself runs in a separate, long-lived exporter process when
    the storage can be read from one (a FileStorage, opened read-only
    there; the same zeo:// or postgresql:// URI), because a
    CPU-bound export in the writers' process slows every writer through
    the interpreter lock. An in-memory store is exported in-process. Pass
    ``process=False`` to force in-process exports.

    The Exporter is the one writer of its format's dumps in *directory*
    from ``start()`` (or its first ``export_now()``) until ``stop()``: it
    holds the directory's :class:`DirectoryLock`, and ``start()`` raises
    ExportError at once, naming the holder, when another schedule or run
    holds it. A failed run is logged in one line (ERROR), kept in
    ``last_error`` (until a later failure replaces it; ``last_result`` is
    the last run that did not fail) and the schedule goes on.

    ``cache_size`` is the exporter process's ZODB cache, in objects: a tree
    that fits is exported warm, only what changed is read again.
    ``on_export(result)`` is called after each run (written or skipped), on
    the exporting thread.

    ``flush_share`` paces a short ``every`` (0 means back to back): the next
    export waits until the last one's fsyncs are at most that share of the
    time since it started, because writers' commits on the same disk queue
    behind them (see FLUSH_SHARE). 1.0 turns pacing off.
    """

    def __init__(
        self,
        store: Any,
        directory: str | os.PathLike[str],
        *,
        every: float = 60.0,
        keep: int | None = None,
        format: str = "pickle",  # noqa: A002
        subtree: str = "/",
        process: bool | None = None,
        uri: str | None = None,
        cache_size: int = 200_000,
        on_export: Callable[[RunResult], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        flush_share: float = FLUSH_SHARE,
    ) -> None:
        every_checked = check_every(every)
        if every_checked is None:
            raise ArgumentError("every must be a number of seconds")
        self.every = every_checked
        self.flush_share = check_flush_share(flush_share)
        self.keep = check_keep(keep)
        self.format = check_format(format)
        self.directory = Path(directory)
        self.subtree = subtree
        self._clock = clock
        self._on_export = on_export
        self._store = store
        if process is not False:
            from ._export_worker import worker_uri

            uri = uri or worker_uri(store)
            if uri is None and process:
                raise ArgumentError(
                    f"{store.source} cannot be read from another process; pass uri= "
                    "(zeo://, postgresql://) or process=False"
                )
        self._runner: Any = _InWorker(uri, cache_size) if uri and process is not False else None
        if self._runner is None:
            self._runner = _InProcess(store)
        self._lock = threading.Lock()
        self._directory_lock: DirectoryLock | None = None
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_result: RunResult | None = None
        self.last_error: BaseException | None = None
        self.runs = 0

    @property
    def in_process(self) -> bool:
        return isinstance(self._runner, _InProcess)

    def _hold_directory(self) -> DirectoryLock:
        """The directory's lock, taken on first use and kept until stop(); self._lock is held."""
        if self._directory_lock is None:
            self._directory_lock = DirectoryLock.acquire(self.directory, self.format)
        return self._directory_lock

    def _let_go(self) -> None:
        """Once stopped: no exporter process, no lock on the directory; self._lock is held."""
        self._runner.close(timeout=30.0)
        if self._directory_lock is not None:
            self._directory_lock.release()
            self._directory_lock = None

    def export_now(self, *, force: bool = False) -> RunResult:
        """Run one export now, on the calling thread (waits for one in progress to end).

        After stop(), it holds the directory for its own run only.
        """
        with self._lock:
            try:
                result = self._runner.export_into(
                    self._abandon,
                    self._hold_directory(),
                    directory=self.directory,
                    format=self.format,
                    subtree=self.subtree,
                    keep=self.keep,
                    force=force,
                )
            finally:
                if self._stopping.is_set():
                    self._let_go()
            self.last_result = result
            self.runs += 1
        log.info("%s", result.log_line())
        if self._on_export is not None:
            self._on_export(result)
        return result

    def start(self) -> None:
        """Take the directory and start the background thread; the first export runs at once."""
        if self._thread is not None:
            raise RuntimeError("this Exporter was already started")
        with self._lock:
            self._hold_directory()
        self._thread = threading.Thread(target=self._loop, name="snaptree-exporter", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the schedule: an export in progress may finish within *timeout*, else is abandoned.

        An abandoned export leaves no file under a final name (its temporary
        file is removed by the next run in the directory). The directory's
        lock is released once no export of this Exporter runs any more (an
        in-process export still running lets go of it when it ends).
        """
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._abandon.set()
                self._thread.join(60.0)
        # Ends an export_now() running in the exporter process on another thread at once.
        self._runner.close(timeout=timeout)
        if self._lock.acquire(timeout=60.0):
            try:
                self._let_go()
            finally:
                self._lock.release()
        if self._thread is None or not self._thread.is_alive():
            self._abandon.clear()

    def _loop(self) -> None:
        from ._export_worker import Abandoned

        def failed(exc: Exception) -> None:
            if isinstance(exc, Abandoned):
                log.info(
                    "stop() abandoned the export into %s in progress; nothing was written "
                    "under a final name",
                    self.directory,
                )
                return
            self.last_error = exc
            log.error("scheduled export into %s failed: %s", self.directory, describe_failure(exc))

        try:
            run_periodically(
                self.export_now,
                every=self.every,
                stop=self._stopping,
                clock=self._clock,
                on_error=failed,
                flush_share=self.flush_share,
            )
        except BaseException as exc:  # SystemExit from on_export, say: recorded, the thread ends
            self.last_error = exc
            log.exception("the export thread stopped")

    def __enter__(self) -> Exporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
