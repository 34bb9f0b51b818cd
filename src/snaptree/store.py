"""Opening a store, and running code against it in transactions and snapshots.

Every call gets its own ZODB connection from the pool and its own explicit
transaction manager, so threads share nothing but the database itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import transaction
import zc.lockfile
from persistent import Persistent
from persistent.timestamp import TimeStamp
from transaction.interfaces import NoTransaction, TransientError
from ZODB import DB
from ZODB.Connection import Connection
from ZODB.FileStorage.FileStorage import FileStorageFormatError
from ZODB.POSException import ReadOnlyError
from ZODB.utils import p64, u64

from . import _file_follower, uris
from ._connection import OwnedConnection
from ._storage_facts import is_client_of_a_server, keeps_history, visible_tid
from .errors import Error, MisuseError, OpenError, one_line
from .retry import ConflictStats, Retry, RetryPolicy, run_with_retries
from .tree import Mapping, walk
from .tree import to_plain as _to_plain

#: The key of the ZODB root under which the tree's root mapping lives.
ROOT_KEY = "snaptree"

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Snapshot:
    """A read-only view of one committed state of the tree."""

    root: Mapping
    tid: str
    committed_at: datetime.datetime
    connection: Connection


def tid_time(tid: bytes) -> datetime.datetime:
    """The commit time a tid encodes, as an aware UTC datetime."""
    return datetime.datetime.fromtimestamp(TimeStamp(tid).timeTime(), datetime.UTC)


def parse_point(at: datetime.datetime | str | bytes) -> bytes:
    """Turn a datetime, a hex tid or an 8-byte tid into the tid of that moment."""
    if isinstance(at, bytes) and len(at) == 8:
        return at
    if isinstance(at, datetime.datetime):
        if at.tzinfo is None:
            raise Error(f"{at.isoformat()}: give a timezone (for example {at.isoformat()}+00:00)")
        # A datetime has microseconds, a tid finer steps: "at" a datetime means
        # up to the end of that microsecond, so a commit time read back from a
        # tid (and so truncated) still includes that commit.
        end = at.astimezone(datetime.UTC) + datetime.timedelta(microseconds=1)
        seconds = end.second + end.microsecond / 1e6
        stamp = TimeStamp(end.year, end.month, end.day, end.hour, end.minute, seconds)
        return p64(u64(stamp.raw()) - 1)
    if isinstance(at, str):
        text = at.strip()
        if len(text) == 16:
            try:
                return bytes.fromhex(text)
            except ValueError:
                pass
        try:
            when = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise Error(
                f"{at!r} is neither a tid (16 hex digits) nor an ISO 8601 time "
                "such as 2026-11-25T17:00:00+00:00"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return parse_point(when)
    raise Error(f"{at!r}: expected a datetime, a hex tid or 8 tid bytes")


class _GlobalTransactionGuard:
    """Notices ``transaction.commit()`` and friends on the thread's *global* manager.

    Code ported from plain ZODB commits through the global manager. Inside
    a store call that does nothing to the store's changes (they belong to the
    call's own manager), so it is an error rather than a silent no-op.
    """

    def __init__(self) -> None:
        self.used: str | None = None

    def newTransaction(self, txn: Any) -> None:  # noqa: N802 - ISynchronizer
        self.used = self.used or "transaction.begin()"

    def beforeCompletion(self, txn: Any) -> None:  # noqa: N802
        self.used = self.used or "transaction.commit() or transaction.abort()"

    def afterCompletion(self, txn: Any) -> None:  # noqa: N802
        pass

    def __enter__(self) -> _GlobalTransactionGuard:
        transaction.manager.registerSynch(self)
        return self

    def __exit__(self, *exc: object) -> None:
        transaction.manager.unregisterSynch(self)
        if self.used and exc[0] is None:
            raise MisuseError(
                f"{self.used} was called inside a store call; it acts on the thread's "
                "global transaction, not on the store's, so it would do nothing; remove "
                "it and let store.run()/store.transaction() commit"
            )


def _detach(result: Any) -> Any:
    """Return a plain copy of *result* if it holds snaptree nodes; refuse other persistent objects.

    Returning live persistent objects from a call would hand back objects
    whose connection has gone back to the pool.
    """
    if result is None or isinstance(result, int | float | str | bytes):
        return result
    needs_copy = False
    for item in walk(result):
        if isinstance(item, Persistent):
            if item.__class__.__module__ != "snaptree.tree":
                raise MisuseError(
                    f"the function returned a persistent {type(item).__qualname__}; it would "
                    "outlive its transaction; return plain values (its attributes) instead"
                )
            needs_copy = True
    return _to_plain(result) if needs_copy else result


class Store:
    """A shared tree in a ZODB database. Safe to use from many threads at once.

    Create it with :func:`snaptree.open`.
    """

    def __init__(
        self,
        db: DB,
        *,
        source: str,
        retry: RetryPolicy,
        pool_size: int,
        pool_timeout: float,
        shareable_uri: str | None = None,
    ) -> None:
        self.db = db
        self.source = source
        # The URI another process can open (exporter processes), password
        # included: kept private and never printed; ``source`` is for people.
        self._shareable_uri = shareable_uri
        self.retry_policy = retry
        self.pool_timeout = pool_timeout
        self._slots = threading.BoundedSemaphore(pool_size)
        self._stats = ConflictStats()
        self._local = threading.local()

    # -- connections ---------------------------------------------------------

    @contextmanager
    def _lease(
        self, *, at: bytes | None = None, read_only: bool = False
    ) -> Iterator[tuple[Any, Any]]:
        """Borrow a pooled connection with its own explicit transaction manager.

        The semaphore keeps the number of open connections within the pool
        size, so ZODB never warns about an oversized pool however many
        threads call in; a thread that cannot get one within
        ``pool_timeout`` gets an error instead of waiting forever.
        """
        if not self._slots.acquire(timeout=self.pool_timeout):
            raise Error(
                f"no connection became free within {self.pool_timeout:g} s: all "
                "connections are busy; raise pool_size or shorten long transactions"
            )
        conn = None
        try:
            tm = transaction.TransactionManager(explicit=True)
            try:
                conn = self.db.open(transaction_manager=tm, at=at)
            except ValueError as exc:  # historical open in the future
                raise Error(f"cannot open the tree at that time: {exc}") from None
            conn.claim(read_only=read_only)
            yield conn, tm
        finally:
            if conn is not None:
                conn.release()
                try:
                    tm.abort()
                except NoTransaction:
                    pass
                conn.close()
            self._slots.release()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        if getattr(self._local, "writing", False):
            raise MisuseError(
                "store.run()/store.transaction() called inside another one in the same "
                "thread; the inner call would commit separately from the outer one: "
                "call the inner function directly with the root you already have"
            )
        self._local.writing = True
        try:
            yield
        finally:
            self._local.writing = False

    # -- writing ---------------------------------------------------------------

    def _attempt(
        self,
        fn: Callable[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        root_key: str | None = ROOT_KEY,
    ) -> R:
        """One attempt: begin, call, commit; a transient failure becomes ``Retry``.

        ``root_key=None`` hands ``fn`` ZODB's own root (only for creating the tree).
        """
        with self._lease() as (conn, tm):
            txn = None
            try:
                # Beginning can fail transiently too: with ZEO's server_sync the
                # begin pings a server that may be restarting.
                txn = tm.begin()
                root = conn.root()
                with _GlobalTransactionGuard():
                    result = fn(root if root_key is None else root[root_key], *args, **kwargs)
                self._check_still_open(tm, txn)
                result = _detach(result)
                tm.commit()
            except Exception as exc:
                if _is_transient(exc, txn):
                    raise Retry(exc) from exc
                raise
        self._stats.count("commits")
        return result

    @staticmethod
    def _check_still_open(tm: Any, txn: Any) -> None:
        try:
            current = tm.get()
        except NoTransaction:
            current = None
        if current is not txn:
            raise MisuseError(
                "the function committed or aborted the store's transaction itself; "
                "store.run() commits when the function returns: remove that call "
                "(use store.transaction() blocks if you need several commits)"
            )

    def run(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn(root, *args, **kwargs)`` in a transaction and commit, retrying conflicts.

        ``fn`` may run several times, so it should only change the tree (no
        side effects outside it). Its return value is returned; snaptree nodes
        in it are returned as plain copies, since live persistent objects
        must not outlive their transaction.
        """
        return self._run(fn, args, kwargs, self.retry_policy)

    def _run(self, fn: Callable[..., R], args: tuple, kwargs: dict, policy: RetryPolicy) -> R:
        with self._writing():
            return run_with_retries(lambda: self._attempt(fn, args, kwargs), policy, self._stats)

    def transactional(
        self,
        fn: Callable[..., R] | None = None,
        *,
        retries: int | None = None,
        deadline: float | None = None,
    ) -> Any:
        """Decorator form of :meth:`run`: ``@store.transactional(retries=20)``.

        ``retries`` is the total number of attempts allowed.
        """
        policy = self.retry_policy
        if retries is not None:
            policy = dataclasses.replace(policy, attempts=retries)
        if deadline is not None:
            policy = dataclasses.replace(policy, deadline=deadline)

        def decorate(func: Callable[..., R]) -> Callable[..., R]:
            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> R:
                return self._run(func, args, kwargs, policy)

            return wrapper

        return decorate(fn) if fn is not None else decorate

    @contextmanager
    def transaction(self) -> Iterator[Mapping]:
        """A block that runs exactly once: commit on success, abort on exception.

        There is no retry: a conflict at commit propagates (as a ZODB
        ConflictError). Use :meth:`run` for retried work.
        """
        with self._writing(), self._lease() as (conn, tm):
            txn = tm.begin()
            with _GlobalTransactionGuard():
                yield conn.root()[ROOT_KEY]
            self._check_still_open(tm, txn)
            try:
                tm.commit()
            except TransientError as exc:
                self._stats.count("conflicts", getattr(exc, "get_class_name", lambda: None)())
                raise
        self._stats.count("commits")

    # -- reading ---------------------------------------------------------------

    @contextmanager
    def snapshot(self, at: datetime.datetime | str | bytes | None = None) -> Iterator[Snapshot]:
        """A read-only view of one committed state, stable however long it is held.

        With ``at`` (an aware datetime, a hex tid or tid bytes) the view is the
        state as of that moment, where the storage keeps history; ``tid`` is
        then that moment, not necessarily the tid of a transaction.
        """
        point = None if at is None else parse_point(at)
        if point is not None and not keeps_history(self.db.storage):
            raise Error(f"{self.source} keeps no history; a snapshot at a past time needs one")
        with self._lease(at=point, read_only=True) as (conn, tm):
            tm.begin()
            tid = visible_tid(conn)
            yield Snapshot(conn.root()[ROOT_KEY], tid.hex(), tid_time(tid), conn)

    # -- import and export (the modules named after them do the work) --------

    def import_tree(self, data: Any, path: str = "/", replace: bool = False, **options: Any) -> Any:
        """Store a plain tree at *path*, atomically. See :mod:`snaptree.imports`."""
        from .imports import import_tree

        return import_tree(self, data, path=path, replace=replace, **options)

    def export(
        self,
        path: str | os.PathLike[str],
        format: str = "pickle",  # noqa: A002 - the name users know from the CLI
        at: datetime.datetime | str | bytes | None = None,
        subtree: str = "/",
        **options: Any,
    ) -> Any:
        """Write one committed snapshot of the tree to *path*. See snaptree.exports."""
        from .exports import export

        return export(self, path, format=format, at=at, subtree=subtree, **options)

    def stats(self) -> dict[str, Any]:
        """Commits, conflicts, retries, exhausted calls, and the classes that conflict most."""
        stats = self._stats.snapshot()
        stats["connections_open"] = sum(
            1 for info in self.db.connectionDebugInfo() if info["opened"]
        )
        return stats

    def last_tid(self) -> str:
        """The tid of the newest committed transaction, as hex.

        Read through a fresh snapshot: ``DB.lastTransaction()`` is not kept
        current by every storage (RelStorage's stays at its first value).
        """
        with self.snapshot() as snap:
            return snap.tid

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<snaptree.Store {self.source}>"


class _DB(DB):
    klass = OwnedConnection  # ZODB's documented hook for the connection class


def read_current(obj: Persistent) -> None:
    """Make the current transaction fail with a conflict if *obj* changes before it commits.

    A transaction that decides what to write from objects it only *reads*
    is open to write skew: two transactions each read what the other writes
    and both commit. Calling this on the objects the decision depends on
    turns that into a retried conflict.
    """
    jar = getattr(obj, "_p_jar", None)
    if not isinstance(obj, Persistent) or jar is None:
        raise MisuseError(
            "read_current() needs a persistent object loaded in a store call, "
            f"not {type(obj).__name__}"
        )
    jar.check_owner(obj)
    jar.readCurrent(obj)


def open(  # noqa: A001 - snaptree.open() is the API the issue asks for
    uri: str | None = None,
    *,
    pool_size: int = 32,
    pool_timeout: float = 60.0,
    cache_size: int | None = None,
    retry: RetryPolicy | None = None,
    read_only: bool = False,
) -> Store:
    """Open the store at *uri*: a path, file://, memory://, zeo://, postgresql:// or zconfig://.

    With no URI, ``$SNAPTREE_DB`` if set, else ``./data/snaptree.fs``.
    ``pool_size`` bounds the connections open at once: calls beyond it wait
    up to ``pool_timeout`` seconds for a free one.
    """
    if pool_size < 1:
        raise ValueError(f"pool_size must be at least 1, not {pool_size}")
    resolved = uris.resolve(uri)
    factory = resolved.factory
    if read_only and resolved.scheme == "file":
        uri_text = f"file://{resolved.file_path}?read_only=1"
        factory = uris.resolve(uri_text).factory
    companions = _absent_companions(resolved.file_path)
    try:
        # A live file's index is stale on every read-only open (docs/export.md).
        quiet = _file_follower.expected_stale_index() if read_only else contextlib.nullcontext()
        with quiet:
            storage = factory()
    except FileStorageFormatError:
        _remove(companions)
        raise OpenError(
            f"cannot open {resolved.display}: it is not a FileStorage file (ZODB's "
            "header is missing); name a Data.fs written by ZODB, or a new file"
        ) from None
    except zc.lockfile.LockError:
        raise OpenError(
            f"cannot open {resolved.display}: another process has it open (FileStorage "
            "allows one writer); stop that process, or serve the file with "
            "`snaptree serve` and connect to it with zeo://"
        ) from None
    except FileNotFoundError as exc:
        raise OpenError(f"cannot open {resolved.display}: {exc.strerror}: {exc.filename}") from None
    except Exception as exc:
        # Scrubbed before it is made one line: joining strips the lines, and a
        # password at a line's edge would no longer match.
        reason = one_line(uris.scrub(str(exc), str(uri)))
        raise OpenError(f"cannot open {resolved.display}: {reason}") from exc
    db_kwargs = dict(resolved.db_kwargs)
    db_kwargs.update(pool_size=pool_size, historical_pool_size=pool_size)
    if cache_size is not None:
        db_kwargs["cache_size"] = cache_size
    try:
        _file_follower.settle(storage)
        db = _DB(storage, **db_kwargs)
    except ReadOnlyError:
        storage.close()
        raise OpenError(
            f"cannot open {resolved.display} read-only: nothing has been committed to it yet "
            "(ZODB would have to create the root object)"
        ) from None
    except _file_follower.FileReplaced:
        storage.close()
        raise OpenError(
            f"cannot open {resolved.display}: the file was replaced (packed?) while it was "
            "being opened; open it again"
        ) from None
    except Exception:
        storage.close()
        raise
    store = Store(
        db,
        source=resolved.display,
        retry=retry or RetryPolicy(),
        pool_size=pool_size,
        pool_timeout=pool_timeout,
        shareable_uri=str(uri) if is_client_of_a_server(storage) else None,
    )
    try:
        _ensure_root(store)
    except BaseException:
        db.close()
        raise
    return store


def _absent_companions(path: Path | None) -> list[Path]:
    """The files FileStorage creates beside *path* that do not exist yet."""
    if path is None:
        return []
    return [
        companion
        for companion in (path.with_name(path.name + ext) for ext in (".lock", ".tmp", ".index"))
        if not companion.exists()
    ]


def _remove(paths: list[Path]) -> None:
    """Remove files a failed open created, so that it leaves the directory as it was."""
    for path in paths:
        path.unlink(missing_ok=True)


def _ensure_root(store: Store) -> None:
    """Create the tree's root mapping on first use (retried: two processes may race)."""

    def create(zodb_root: Any) -> None:
        if ROOT_KEY not in zodb_root:
            zodb_root[ROOT_KEY] = Mapping()

    try:
        run_with_retries(
            lambda: store._attempt(create, (), {}, root_key=None),
            store.retry_policy,
            store._stats,
        )
    except ReadOnlyError:
        raise OpenError(f"{store.source} is read-only and holds no snaptree tree yet") from None


def _is_transient(exc: Exception, txn: Any) -> bool:
    """Whether *exc* means "try again"; decided before the transaction is aborted.

    snaptree's own errors are never transient. ``txn`` is None when the
    transaction could not even begin.
    """
    if isinstance(exc, Error):
        return False
    if isinstance(exc, TransientError):
        return True
    return txn is not None and txn.isRetryableError(exc)
