"""When scheduled exports run, and the :class:`Exporter` that runs them beside an application.

The same schedule serves ``snaptree export --every`` (the command, run in
the foreground by cron, systemd or a shell) and :class:`Exporter` (a thread
inside the application, whose exports run in a separate process). Each run
is one :func:`snaptree.export_run.export_into`. Decisions about time are
pure functions of the current time (:func:`next_run`, :func:`seconds_until`),
so tests drive them with a fake clock and never sleep.

The export path, from the application's side: :meth:`Exporter.start` takes
the directory's lock and starts the thread (:meth:`Exporter._loop`), which
calls :meth:`Exporter.export_now` on the schedule of :func:`run_periodically`;
each run goes to the exporter process (:class:`_InWorker`, then
:class:`snaptree._export_process.ExportProcess`), whose ``main``
(:mod:`snaptree._export_worker`) runs ``export_into`` on its read-only,
warm store: the dump (:mod:`snaptree.exports` and the writer of its
format), its manifest, fsync, rename, ``latest``, retention.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import paths
from ._directory_lock import DirectoryLock
from ._export_process import Abandoned, ExportProcess
from ._signals import SignalStop
from .dump_directory import lock_directory
from .errors import ArgumentError, Error
from .export_run import RunResult, describe_failure, export_into
from .manifest import check_compression, check_format
from .monitoring import MetricsFile
from .retention import Retention, check_keep

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

#: Longest accepted interval between exports (31 days); longer is almost
#: certainly a unit mistake (milliseconds for seconds).
MAX_EVERY = 31 * 24 * 3600.0
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


def run_periodically(
    run_once: Callable[[], RunResult | None],
    *,
    every: float,
    stop: threading.Event | SignalStop,
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
    warned = False
    while True:
        due = next_run(
            last_start, every, flushed=flushed, flush_share=flush_share, at_least=at_least
        )
        if every > 0 and flushed > every * flush_share:
            # An explicit interval this schedule cannot keep: said once as a
            # WARNING with the interval it can keep, then at INFO (-v) each time.
            log.log(
                logging.INFO if warned else logging.WARNING,
                "pacing: exports every %g s were asked for, but this schedule can keep about "
                "one every %.1f s here: the last one's fsyncs took %.3f s, and exports are "
                "paced to keep fsyncs to %g%% of the time (flush_share), as writers' commits "
                "on the same disk queue behind them",
                every,
                flushed / flush_share,
                flushed,
                flush_share * 100,
            )
            warned = True
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
    """Runs exports on the calling thread, in this process (memory:// stores, or on request)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def export_into(
        self,
        lock: DirectoryLock,
        *,
        subtree: str,
        keep: Retention | None,
        compress: str | None,
        force: bool,
        cancel: threading.Event,  # not consulted: a run on the calling thread cannot be abandoned
    ) -> RunResult:
        return export_into(
            self._store,
            lock.directory,
            format=lock.format,
            subtree=subtree,
            keep=keep,
            compress=compress,
            force=force,
            lock=lock,
        )

    def close(self, timeout: float) -> None:
        pass


class _InWorker:
    """Runs exports in a long-lived exporter process (started lazily, restarted if it dies).

    The process is handed the directory's lock (see DirectoryLock), so it
    serves one lock: a new one, after stop() and a later export_now(),
    starts a new process.
    """

    def __init__(self, uri: str, cache_size: int) -> None:
        self._uri = uri
        self._cache_size = cache_size
        self._process: ExportProcess | None = None

    def export_into(
        self,
        lock: DirectoryLock,
        *,
        subtree: str,
        keep: Retention | None,
        compress: str | None,
        force: bool,
        cancel: threading.Event,
    ) -> RunResult:
        process = self._process
        if process is not None and (process.lock is not lock or not process.alive()):
            process.close(timeout=0)
            process = None
        if process is None:
            process = self._process = ExportProcess(
                self._uri, cache_size=self._cache_size, lock=lock
            )
        return process.export_into(
            subtree=subtree, keep=keep, compress=compress, force=force, cancel=cancel
        )

    def close(self, timeout: float) -> None:
        # stop() may close while the exporting thread closes too (export_now after stop)
        process, self._process = self._process, None
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
    behind them (see FLUSH_SHARE). 1.0 turns pacing off. When that
    stretches an ``every`` you gave, a WARNING says once which interval the
    schedule can keep.

    ``keep`` is N (the newest N dumps) or a :class:`snaptree.Retention`
    (restic's rules: last, hourly, daily, weekly, monthly, yearly, within).
    ``compress="zstd"`` writes ``….pickle.zst`` dumps. ``metrics`` names a
    Prometheus textfile rewritten after every run (see
    :class:`snaptree.monitoring.MetricsFile`).
    """

    def __init__(
        self,
        store: Store,
        directory: str | os.PathLike[str],
        *,
        every: float = 60.0,
        keep: int | Retention | None = None,
        format: str = "pickle",  # noqa: A002
        subtree: str = "/",
        compress: str | None = None,
        process: bool | None = None,
        uri: str | None = None,
        cache_size: int = 200_000,
        on_export: Callable[[RunResult], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        flush_share: float = FLUSH_SHARE,
        metrics: str | os.PathLike[str] | None = None,
    ) -> None:
        every_checked = check_every(every)
        if every_checked is None:
            raise ArgumentError("every must be a number of seconds")
        self.every = every_checked
        self.flush_share = check_flush_share(flush_share)
        self.keep = check_keep(keep)
        self.format = check_format(format)
        self.compress = check_compression(compress)
        paths.parse(subtree, what="subtree")
        self.directory = Path(directory)
        self.subtree = subtree
        self.metrics = (
            None
            if metrics is None
            else MetricsFile(metrics, target=self.directory, format=self.format)
        )
        self._clock = clock
        self._on_export = on_export
        if process is not False:
            uri = uri or store.shareable_uri
            if uri is None and process:
                raise ArgumentError(
                    f"{store.source} cannot be read from another process; pass uri= "
                    "(zeo://, postgresql://) or process=False"
                )
        self._runner: _InWorker | _InProcess = (
            _InWorker(uri, cache_size) if uri and process is not False else _InProcess(store)
        )
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
            self._directory_lock = lock_directory(self.directory, self.format)
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
            started = time.monotonic()
            try:
                result = self._runner.export_into(
                    self._hold_directory(),
                    subtree=self.subtree,
                    keep=self.keep,
                    compress=self.compress,
                    force=force,
                    cancel=self._abandon,
                )
            except Exception as exc:
                if self.metrics is not None and not isinstance(exc, Abandoned):
                    self.metrics.failed(time.monotonic() - started)
                raise
            finally:
                if self._stopping.is_set():
                    self._let_go()
            if self.metrics is not None:
                self.metrics.succeeded(result, time.monotonic() - started)
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
