"""Opening a store, and running code against it in transactions and snapshots.

A write call (``run``, ``run_batched``, ``transactional``, ``transaction``)
takes the path :mod:`snaptree._write_calls` describes: retried attempts on the
thread's kept connection, the guards, the commit, the wait for the disk.
Snapshots borrow a connection of their own from the pool for one block.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from persistent import Persistent
from ZODB import DB
from ZODB.Connection import Connection
from ZODB.FileStorage import FileStorage
from ZODB.POSException import POSKeyError, ReadOnlyError

from . import _history, paths
from ._database import open_database
from ._history import Point, parse_point, tid_time
from ._pool import CLOSE_TIMEOUT, ConnectionPool
from ._results import refuse_deferred
from ._storage_facts import btree_parts, is_client_of_a_server, keeps_history, visible_tid
from ._write_calls import CallAttempt as CallAttempt  # where synchronizers' tools look for it
from ._write_calls import WriteCalls, replacement_error
from ._write_turns import Turns
from .errors import ArgumentError, MisuseError, OpenError
from .paths import ROOT_KEY
from .retry import ConflictStats, RetryPolicy
from .tree import Mapping
from .uris import Durability

log = logging.getLogger(__name__)

#: Objects each connection keeps in its cache unless ``cache_size`` says otherwise.
#: ZODB's own default (400) is zodburi's 10,000 for every URI but memory://, whose
#: calls then reloaded every object of a tree larger than 400 in every call.
DEFAULT_CACHE_SIZE = 10_000

#: Values looked at, at most, to find where in the tree a conflicting object lives.
PATH_SEARCH_LIMIT = 100_000

#: Versions of the tree's root looked at, at most, to say how far back history goes.
_HISTORY_LIMIT = 100_000

R = TypeVar("R")


@dataclass(frozen=True)
class Snapshot:
    """A read-only view of one committed state of the tree."""

    root: Mapping
    tid: str
    committed_at: datetime.datetime
    connection: Connection


#: The functions ``Store.transactional`` made, each with the function it calls.
_transactional: weakref.WeakKeyDictionary[Callable[..., Any], Callable[..., Any]] = (
    weakref.WeakKeyDictionary()
)


def transactional_function(fn: Any) -> Callable[..., Any] | None:
    """The function a ``@store.transactional`` wrapper *fn* calls in its store; None otherwise.

    ``snaptree.testing`` checks that function on copies of the tree, where the
    wrapper would run it in its own store instead.
    """
    try:
        return _transactional.get(fn)
    except TypeError:  # not weakly referable: not one of ours
        return None


class Store:
    """A shared tree in a ZODB database. Safe to use from many threads at once.

    Create it with :func:`snaptree.open`; close it with :meth:`close` (or a
    ``with`` block).
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
        take_turns: bool | None = None,
    ) -> None:
        self.db = db
        self.source = source
        # The URI another process can open (exporter processes), password
        # included: kept private and never printed; ``source`` is for people.
        self._shareable_uri = shareable_uri
        self.retry_policy = retry
        self.pool_timeout = pool_timeout
        self._pool = ConnectionPool(db, source=source, size=pool_size, timeout=pool_timeout)
        self._stats = ConflictStats()
        # The last function run() found to be plain, held weakly: a closure over
        # large data must not outlive the call that used it.
        self._plain_function: weakref.ref[Any] | None = None
        self._export_fragments: Any = None  # export's FragmentCaches, made by the first export
        # What a write call waits for before it returns: the disk (durability
        # "commit", "group"), or nothing ("relaxed", and storages snaptree
        # does not make durable itself).
        durable = db.storage if self.durability in ("commit", "group") else None
        if take_turns is None:  # through a server, other threads use a commit's network wait
            take_turns = not is_client_of_a_server(db.storage)
        turns = Turns() if take_turns else None
        self._writes = WriteCalls(self._pool, self._stats, durable, self._locate, turns)

    @property
    def shareable_uri(self) -> str | None:
        """What another process opens to read this store's storage, or None if nothing can.

        A FileStorage is read by its absolute path (read-only, no lock, so it
        works while this process writes); ZEO and RelStorage by the URI this
        store was opened with, password included: never print it (``source``
        is the printable name). An in-memory storage lives in this process only.
        """
        storage = self.db.storage
        if isinstance(storage, FileStorage):
            return os.path.abspath(storage.getName())
        return self._shareable_uri

    # -- writing ---------------------------------------------------------------

    @property
    def durability(self) -> str | None:
        """How commits reach the disk: "commit", "group", "relaxed" (None: not snaptree's choice).

        A FileStorage opened for writing has a mode (docs/store.md); memory://,
        a read-only file and servers (ZEO, PostgreSQL) have none.
        """
        return getattr(self.db.storage, "durability", None)

    def sync(self) -> None:
        """Make every commit so far durable: what ``relaxed`` otherwise leaves to its window.

        A no-op where everything is on disk already, or where snaptree does
        not decide durability. Raises DurabilityError if an fsync failed.
        """
        self._pool.check_open()
        if self.durability is not None:
            self.db.storage.make_durable()

    def run(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn(root, *args, **kwargs)`` in a transaction and commit, retrying conflicts.

        Returns what ``fn`` returns, read inside the transaction: persistent
        nodes become plain copies (dict, list, set, Counter), and views
        and iterators over them as views and iterators over plain copies,
        since live persistent objects must not outlive their transaction.
        A generator or coroutine (function) is refused: it would run after
        the transaction. The call returns once its commit is as durable as
        the store's mode promises (:attr:`durability`).
        """
        checked = self._plain_function  # the last one checked: calls repeat themselves
        if checked is None or checked() is not fn:
            refuse_deferred(fn)
            try:
                self._plain_function = weakref.ref(fn)
            except TypeError:  # a callable without weak references is checked at every call
                self._plain_function = None
        return self._writes.run(fn, args, kwargs, self.retry_policy)

    def run_batched(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Like :meth:`run`, but committed together with other threads' batched calls.

        Calls that arrive while one is being committed are run one after
        another, in arrival order, by one of the calling threads, in one
        transaction with one commit and one fsync: writes then scale with
        threads where separate commits cannot (docs/store.md, "Batched
        calls"). Each caller still gets its own return value or its own
        exception, and its own retries. ``fn`` runs on another thread,
        in a copy of the caller's ``contextvars`` context.
        """
        refuse_deferred(fn)
        return self._writes.run_batched(fn, args, kwargs, self.retry_policy)

    def transactional(
        self,
        fn: Callable[..., R] | None = None,
        *,
        retries: int | None = None,
        deadline: float | None = None,
        batched: bool = False,
    ) -> Any:
        """Decorator form of :meth:`run`: ``@store.transactional(retries=20)``.

        ``retries`` is how many times a conflicting call is tried again after
        its first attempt (0: never); the default is the store's policy.
        ``deadline`` bounds the whole call, in seconds. ``batched=True``
        runs each call as :meth:`run_batched` does.
        """
        policy = self.retry_policy
        if retries is not None:
            if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
                raise ArgumentError(
                    "retries must be an int of 0 or more (tries after the first "
                    f"attempt), not {retries!r}"
                )
            policy = dataclasses.replace(policy, attempts=retries + 1)
        if deadline is not None:
            policy = dataclasses.replace(policy, deadline=deadline)
        call = self._writes.run_batched if batched else self._writes.run

        def decorate(func: Callable[..., R]) -> Callable[..., R]:
            refuse_deferred(func)

            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> R:
                return call(func, args, kwargs, policy)

            _transactional[wrapper] = func
            return wrapper

        return decorate(fn) if fn is not None else decorate

    def transaction(self) -> AbstractContextManager[Mapping]:
        """A block that runs exactly once: commit on success, abort on exception.

        There is no retry: a conflict at commit propagates (as a ZODB
        ConflictError). Use :meth:`run` for retried work. The block ends
        once its commit is as durable as the store's mode promises.
        """
        self._pool.check_open()
        return self._writes.transaction()

    def alongside(self) -> AbstractContextManager[None]:
        """A block during which write calls run alongside one another instead of taking turns.

        For tests that look for interleavings (write skew needs two
        transactions open at once, which turns make rare):
        ``snaptree.testing``'s ``race`` and ``interleave`` run in one.
        Blocks may nest and overlap; turns resume when the last one ends.
        """
        return self._writes.alongside()

    def register_synchronizer(self, synchronizer: Any) -> None:
        """Register a ``transaction`` ISynchronizer with every later write call's transaction.

        Each call of run/transactional/transaction runs on a transaction
        manager of its own (kept by its thread between calls);
        *synchronizer* is registered with it before the call's transaction
        begins, so ``newTransaction(txn)`` can join a data manager to the
        call's transaction (how a test kit forces a conflict at commit
        through the store's real retry path). Snapshots do not get it.
        """
        self._writes.register_synchronizer(synchronizer)

    def unregister_synchronizer(self, synchronizer: Any) -> None:
        """Stop registering *synchronizer* with new calls (calls under way keep it)."""
        self._writes.unregister_synchronizer(synchronizer)

    # -- reading ---------------------------------------------------------------

    @contextmanager
    def snapshot(self, at: Point | None = None) -> Iterator[Snapshot]:
        """A read-only view of one committed state, stable however long it is held.

        With ``at`` (an aware datetime, a hex tid or tid bytes) the view is the
        state as of that moment, where the storage keeps history; ``tid`` is
        then that moment, not necessarily the tid of a transaction (opening
        the store at it again gives the same state). A past moment after the
        newest commit is the newest state, with its tid. A moment before the
        tree existed, or before the oldest history kept, is an ArgumentError
        that says how far back the history goes; so is one still to come.
        """
        with self._read(at) as snap:
            yield snap

    @contextmanager
    def _read(self, at: Point | None, *, borrow: bool = False) -> Iterator[Snapshot]:
        """:meth:`snapshot`; with *borrow*, on the connection write calls last took turns
        on, else the calling thread's kept one.

        Borrowing reloads nothing the calls committed (an export right after
        a write), but the next call on that connection then takes every object
        read for its own: only for a reader that keeps none past the block.
        """
        point = None if at is None else parse_point(at)
        self._pool.check_open()
        if point is not None and not keeps_history(self.db.storage):
            raise ArgumentError(
                f"{self.source} keeps no history; a snapshot at a past time needs one"
            )
        if point is not None:
            last = self.db.lastTransaction()
            if point > last and tid_time(point) <= datetime.datetime.now(datetime.UTC):
                # A past moment after the newest commit: the state then is the newest
                # (ZODB would call any moment past its last transaction "the future").
                point = last
        missing = False
        lend = self._writes.turns_pair() if borrow else None
        with self._pool.lease(at=point, read_only=True, borrow=borrow, prefer=lend) as (conn, tm):
            tm.begin()
            try:
                root = conn.root()[ROOT_KEY]
                root._p_activate()
            except KeyError:  # POSKeyError too
                if point is None:
                    raise
                missing = True
            if not missing:
                tid = visible_tid(conn)
                try:
                    yield Snapshot(root, tid.hex(), tid_time(tid), conn)
                except POSKeyError as exc:
                    if point is None or self._pool.closed:
                        raise
                    assert at is not None
                    raise _history.packed_away(self.source, at, point, exc) from exc
                except Exception as exc:
                    replacement = replacement_error(self._pool, exc, None, None)
                    if replacement is not None:
                        raise replacement from exc
                    raise
        if missing:
            assert at is not None and point is not None
            raise _history.no_tree_at(self.source, at, point, self._oldest_tree_state())

    def _oldest_tree_state(self) -> bytes | None:
        """The tid of the oldest version of the tree's root the storage keeps, if it can tell."""
        try:
            with self._pool.lease(read_only=True, wait=1.0) as (conn, tm):
                tm.begin()
                oid = conn.root()[ROOT_KEY]._p_oid
            versions = self.db.storage.history(oid, size=_HISTORY_LIMIT)
        except Exception:  # a hint for an error message must never replace that error
            log.debug("could not read the history of the tree's root", exc_info=True)
            return None
        if not versions or len(versions) >= _HISTORY_LIMIT:
            return None
        return versions[-1]["tid"]

    def _locate(self, oid: bytes) -> str | None:
        """Where the object *oid* is in the newest tree, for RetriesExhausted; None if not found.

        Searched only when a call gives up, in a fresh read of the newest
        state, looking at most at PATH_SEARCH_LIMIT values. A conflict on a
        bucket or an inner node of a large mapping names the mapping.
        """

        def is_it(value: Any) -> bool:
            return isinstance(value, Persistent) and (
                value._p_oid == oid or any(part._p_oid == oid for part in btree_parts(value))
            )

        try:
            with self._pool.lease(read_only=True, wait=1.0) as (conn, tm):
                tm.begin()
                found = paths.find(conn.root()[ROOT_KEY], is_it, limit=PATH_SEARCH_LIMIT)
        except Exception:  # the path is a hint: it must never replace the real error
            log.debug("could not find the path of oid %r", oid, exc_info=True)
            return None
        return "" if found == paths.ROOT else found  # the root is "", as in UnstorableValueError

    # -- import and export (the modules named after them do the work) --------

    def import_tree(self, data: Any, path: str = "/", replace: bool = False, **options: Any) -> Any:
        """Store a plain tree at *path*, atomically. See :mod:`snaptree.imports`."""
        from .imports import import_tree

        self._pool.check_open()
        return import_tree(self, data, path=path, replace=replace, **options)

    def export(
        self,
        path: str | os.PathLike[str],
        format: str | None = None,  # noqa: A002 - the name users know from the CLI
        at: Point | None = None,
        subtree: str = "/",
        **options: Any,
    ) -> Any:
        """Write one committed snapshot of the tree to *path*. See snaptree.exports.

        ``format=None`` takes the format from the file name's suffix;
        ``compress="zstd"`` compresses it (``dump.pickle.zst``). Repeated
        pickle exports reuse what the previous one wrote for every node that
        did not change, once the tree is seen to fit the connections' cache
        (the store keeps the fragments; ``fragments=None`` keeps none).
        """
        from .exports import FragmentCaches, export

        self._pool.check_open()
        if "fragments" not in options:
            # Kept for the store's life; created on the first export (a Store that
            # never exports pays nothing). Two threads racing here keep one of two.
            kept = self._export_fragments
            if kept is None:
                kept = self._export_fragments = FragmentCaches(when_cached=True)
            options["fragments"] = kept
        # The dump is all that leaves the snapshot: it may borrow this thread's connection.
        options.setdefault("snapshot", functools.partial(self._read, borrow=True))
        return export(self, path, format=format, at=at, subtree=subtree, **options)

    def stats(self) -> dict[str, Any]:
        """Commits, conflicts, retries, exhausted calls, connections, the most conflicting classes.

        ``connections_open`` counts the connections calls hold now (ZODB's
        open connections but the ones kept idle by threads between calls,
        ``connections_kept``); ``batches`` the transactions that committed
        batched calls (``commits`` counts calls).
        """
        self._pool.check_open()
        stats = {"commits": self._pool.commits(), **self._stats.snapshot()}
        kept = self._pool.kept()
        opened = sum(1 for info in self.db.connectionDebugInfo() if info["opened"])
        stats["connections_open"] = opened - kept
        stats["connections_kept"] = kept
        return stats

    def last_tid(self) -> str:
        """The tid of the newest committed transaction, as hex.

        Read through a fresh snapshot: ``DB.lastTransaction()`` is not kept
        current by every storage (RelStorage's stays at its first value).
        """
        with self.snapshot() as snap:
            return snap.tid

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close the store: refuse new calls, let calls under way finish, close the database.

        From the moment ``close`` begins, every call that asks for a
        connection (a new call, or the next attempt of a retried one) gets
        StoreClosedError. Calls holding one may finish and commit for up to
        *timeout* seconds; after that the database is closed anyway (said in
        a warning), and what those calls do next fails with StoreClosedError
        rather than touching a closed database. A commit already under way
        is never cut off in the middle: ``close`` waits up to COMMIT_WAIT more
        seconds for it. Closing twice is harmless.
        """
        self._pool.close(timeout, in_call=self._writes.inside())

    def _create_root(self) -> None:
        """Create the tree's root mapping on first use (retried: two processes may race)."""

        def create(zodb_root: Any) -> None:
            if ROOT_KEY not in zodb_root:
                zodb_root[ROOT_KEY] = Mapping()

        try:
            self._writes.run(create, (), {}, self.retry_policy, root_key=None)
        except ReadOnlyError:
            raise OpenError(f"{self.source} is read-only and holds no snaptree tree yet") from None

    def __enter__(self) -> Store:
        self._pool.check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<snaptree.Store {self.source}>"


def read_current(obj: Persistent) -> None:
    """Make the current transaction fail with a conflict if *obj* changes before it commits.

    A transaction that decides what to write from objects it only *reads*
    is open to write skew: two transactions each read what the other writes
    and both commit. Calling this on the objects the decision depends on
    turns that into a retried conflict. *obj* is loaded first if it is not
    yet (ZODB records nothing for an object it has not loaded); for a
    mapping large enough to be split into buckets every bucket is covered,
    since a change to one key rewrites only its bucket.
    """
    jar = getattr(obj, "_p_jar", None)
    if not isinstance(obj, Persistent) or jar is None:
        raise MisuseError(
            "read_current() needs a persistent object loaded in a store call, "
            f"not {type(obj).__name__}"
        )
    jar.check_owner(obj)
    for record in (obj, *btree_parts(obj)):
        if record._p_changed is None:  # a ghost: its serial is not known until loaded
            record._p_activate()
        jar.readCurrent(record)


def open(  # noqa: A001 - snaptree.open() is the API the issue asks for
    uri: str | None = None,
    *,
    pool_size: int = 32,
    pool_timeout: float = 60.0,
    cache_size: int | None = None,
    retry: RetryPolicy | None = None,
    read_only: bool = False,
    durability: str | None = None,
    sync_every: float | None = None,
    save_index_every: int | None = None,
    take_turns: bool | None = None,
) -> Store:
    """Open the store at *uri*: a path, file://, memory://, zeo://, postgresql:// or zconfig://.

    With no URI, ``$SNAPTREE_DB`` if set, else ``./data/snaptree.fs``.
    ``pool_size`` bounds the connections open at once: calls beyond it wait
    up to ``pool_timeout`` seconds for a free one. ``cache_size`` is each
    connection's object cache, in objects (DEFAULT_CACHE_SIZE unless the
    URI or this argument says otherwise).

    A FileStorage opened for writing makes commits durable as
    ``durability`` says: ``"commit"`` (an fsync per commit), ``"group"``
    (the default: a call still returns only once its commit is on disk,
    and commits waiting for the disk share one fsync) or ``"relaxed"``
    (fsynced in the background every ``sync_every`` seconds, 0.05 by
    default: a machine crash may lose that window, a killed process
    nothing). Its index file is saved whenever ``save_index_every`` bytes
    were committed since the last save (16 MiB by default, 0: only at
    close), so that another process opening the file reads little of it.
    A ``file://`` URI may carry the same settings (``?durability=relaxed``);
    these arguments win. docs/store.md says what each mode costs and risks.

    ``take_turns`` decides whether ``run`` and ``transactional`` calls of
    several threads take turns, one transaction at a time on one connection
    (a call whose turn has not changed hands for 20 ms, or has not come
    within 0.2 s, runs alongside instead). By default they do on memory:// and a FileStorage,
    where that commits about twice as much with four threads, and not
    through ZEO or PostgreSQL, where other threads use a commit's network
    wait. docs/store.md has the measurements.
    """
    if pool_size < 1:
        raise ArgumentError(f"pool_size must be at least 1, not {pool_size}")
    database = open_database(
        uri,
        read_only=read_only,
        pool_size=pool_size,
        cache_size=cache_size,
        default_cache_size=DEFAULT_CACHE_SIZE,
        durability=Durability(durability, sync_every, save_index_every),
    )
    store = Store(
        database.db,
        source=database.source,
        retry=retry or RetryPolicy(),
        pool_size=pool_size,
        pool_timeout=pool_timeout,
        shareable_uri=database.shareable_uri,
        take_turns=take_turns,
    )
    try:
        store._create_root()
        with _open_hooks_lock:
            hooks = list(_open_hooks)
        for hook in hooks:
            hook(store)
    except BaseException:
        database.db.close()
        raise
    return store


# -- process-wide hooks on open() ------------------------------------------------
#
# A test tool that must reach every store a test session opens, including the
# ones an application opens itself deep inside its own code (the pytest
# plugin's --snaptree-chaos), has no object to hold on to but snaptree.open.
# Rather than replace that function, open() calls the hooks registered here
# with each store it opened. Nothing in snaptree registers one; only test
# tooling should (one process-wide list is global state on purpose here).

_open_hooks: list[Callable[[Store], None]] = []
_open_hooks_lock = threading.Lock()


def add_open_hook(hook: Callable[[Store], None]) -> None:
    """Call ``hook(store)`` with every store :func:`open` opens from now on, in this process.

    The hook runs once the store is ready, before ``open`` returns it; an
    exception from it closes the store and propagates from ``open``.
    """
    with _open_hooks_lock:
        _open_hooks.append(hook)


def remove_open_hook(hook: Callable[[Store], None]) -> None:
    """Stop calling a hook added with :func:`add_open_hook`."""
    with _open_hooks_lock:
        if hook not in _open_hooks:
            raise ArgumentError(f"{hook!r} is not an open hook")
        _open_hooks.remove(hook)
