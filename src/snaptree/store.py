"""Opening a store, and running code against it in transactions and snapshots.

Every call gets its own ZODB connection from the pool and its own explicit
transaction manager, so threads share nothing but the database itself.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import datetime
import functools
import inspect
import io
import itertools
import logging
import os
import threading
import types
from collections.abc import (
    Callable,
    Generator,
    ItemsView,
    Iterable,
    Iterator,
    MappingView,
    ValuesView,
)
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import transaction
import zc.lockfile
from BTrees.OOBTree import TreeItems, TreeItemsPy
from persistent import Persistent
from persistent.timestamp import TimeStamp
from transaction.interfaces import NoTransaction, TransientError
from ZODB import DB
from ZODB.Connection import Connection
from ZODB.FileStorage import FileStorage
from ZODB.FileStorage.FileStorage import FileStorageFormatError
from ZODB.POSException import POSKeyError, ReadOnlyError
from ZODB.utils import p64, u64

from . import _file_follower, uris
from ._connection import OwnedConnection
from ._storage_facts import btree_parts, is_client_of_a_server, keeps_history, visible_tid
from .errors import (
    ArgumentError,
    Error,
    MisuseError,
    OpenError,
    StoreClosedError,
    StoreUnavailableError,
    one_line,
)
from .retry import ConflictStats, Retry, RetryPolicy, run_with_retries
from .tree import ROOT_KEY, Mapping
from .tree import to_plain as _to_plain

log = logging.getLogger(__name__)

#: Objects each connection keeps in its cache unless ``cache_size`` says otherwise.
#: ZODB's own default (400) is zodburi's 10,000 for every URI but memory://, whose
#: calls then reloaded every object of a tree larger than 400 in every call.
DEFAULT_CACHE_SIZE = 10_000

#: Seconds ``close()`` waits for calls in flight before it closes the database anyway.
CLOSE_TIMEOUT = 30.0

#: Seconds ``close()`` then still waits for commits already under way to end.
COMMIT_WAIT = 60.0

#: Values looked at, at most, to find where in the tree a conflicting object lives.
PATH_SEARCH_LIMIT = 100_000

#: Items a returned iterator may yield; each is read inside the transaction.
MAX_RETURNED_ITEMS = 1_000_000

#: Versions of the tree's root looked at, at most, to say how far back history goes.
_HISTORY_LIMIT = 100_000

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class CallAttempt:
    """One attempt of a retried write call (``run``, ``transactional``), told to synchronizers.

    The store attaches it to the attempt's transaction before calling the
    function: ``txn.data(CallAttempt)`` (``transaction``'s public per-transaction
    data; a ``store.transaction()`` block, which is never retried, has none).
    A data manager joined by a registered synchronizer reads it at commit to
    know which function the commit belongs to and whether a retry is left:
    how ``snaptree.testing`` forces conflicts on chosen calls only.
    """

    function: Callable[..., Any]
    number: int  # 1 for the first attempt
    attempts: int  # attempts the call's retry policy allows in all


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
            raise ArgumentError(
                f"{at.isoformat()}: give a timezone (for example {at.isoformat()}+00:00)"
            )
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
            raise ArgumentError(
                f"{at!r} is neither a tid (16 hex digits) nor an ISO 8601 time "
                "such as 2026-11-25T17:00:00+00:00"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return parse_point(when)
    raise ArgumentError(f"{at!r}: expected a datetime, a hex tid or 8 tid bytes")


def _describe_point(at: datetime.datetime | str | bytes, point: bytes) -> str:
    asked = at.isoformat() if isinstance(at, datetime.datetime) else at
    if isinstance(asked, bytes):
        return f"tid {point.hex()}"
    return f"{asked} (tid {point.hex()})"


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


class _CallGuard:
    """Keeps the end of a call's transaction to the store (a synchronizer on the call's manager).

    The function a call runs can reach the call's own transaction manager
    (``obj._p_jar.transaction_manager``). A commit through it would commit
    half of what the call means to do, so it is refused before anything is
    written (a before-commit hook raises). An abort cannot be stopped; once
    it happened, later changes are made outside any transaction, in a
    connection the pool hands to the next call, so the call must end in an
    error and its connection be cleaned.
    """

    def __init__(self, tm: Any) -> None:
        self.misuse: str | None = None
        self.ending = False  # set by the store just before its own commit
        self._began = False
        tm.registerSynch(self)  # a weak reference: the call keeps the guard alive

    def newTransaction(self, txn: Any) -> None:  # noqa: N802 - ISynchronizer
        if self._began:
            self._misused("began a transaction of its own on the store's transaction manager")
        self._began = True
        txn.addBeforeCommitHook(self._before_commit)

    def beforeCompletion(self, txn: Any) -> None:  # noqa: N802
        pass

    def afterCompletion(self, txn: Any) -> None:  # noqa: N802
        if not self.ending:
            self._misused("aborted the store's transaction itself")

    def _before_commit(self) -> None:
        if not self.ending:
            self._misused("tried to commit the store's transaction itself")
            raise self.error()

    def _misused(self, what: str) -> None:
        self.misuse = self.misuse or what

    def check(self) -> None:
        if self.misuse:
            raise self.error()

    def error(self) -> MisuseError:
        return MisuseError(
            f"the function {self.misuse} (through obj._p_jar.transaction_manager or the "
            "transaction object); nothing of this call was committed and its "
            "changes were discarded: store.run() and store.transaction() commit when the "
            "function or block ends, so remove that call (raise an exception to abandon "
            "a call; use one store.run() per commit)"
        )


# -- what a call returns -------------------------------------------------------
#
# A call's function may return anything, and it is returned after the
# transaction ended and the connection went back to the pool. Whatever in it
# still reads the tree (a node, a view or an iterator over one, a lazy BTree
# sequence) would then show the state of whichever call uses that connection
# next. So the result is read to the end inside the transaction: nodes become
# plain copies, views become the same kind of view over a plain copy,
# iterators become iterators over plain copies, and what cannot be read in
# advance (a generator, a coroutine) is refused. The walk keeps its own stack:
# a tree may be nested deeper than Python's recursion limit.

_ATOMS: frozenset[type] = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        range,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
    }
)
_SEQUENCES = (list, tuple, set, frozenset, collections.deque)
_DICTS = (dict, types.MappingProxyType)
_BTREE_SEQUENCES = (TreeItems, TreeItemsPy)


def _is_node(value: Any) -> bool:
    """A snaptree container (their class paths are fixed: they are in every database)."""
    return isinstance(value, Persistent) and type(value).__module__ == "snaptree.tree"


def _view_mapping(view: MappingView) -> Any:
    """The mapping behind a view: ``_mapping`` (collections.abc views), ``mapping`` (dict's)."""
    mapping = getattr(view, "_mapping", None)
    return getattr(view, "mapping", None) if mapping is None else mapping


def _is_lazy(value: Any) -> bool:
    """Whether *value* reads its data only when iterated (so after the transaction)."""
    if (
        isinstance(value, _BTREE_SEQUENCES)
        or inspect.iscoroutine(value)
        or inspect.isasyncgen(value)
    ):
        return True
    return isinstance(value, Iterator) and not isinstance(value, io.IOBase)


def _needs_copy(value: Any) -> bool:
    """Whether *value* holds anything :func:`_detach` must copy, read ahead or refuse."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if type(item) in _ATOMS or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Persistent) or _is_lazy(item):
            return True
        if isinstance(item, _DICTS):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, _SEQUENCES):
            stack.extend(item)
        elif isinstance(item, MappingView):
            mapping = _view_mapping(item)
            if mapping is None:
                return True
            stack.append(mapping)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
    return False


def _detach(result: Any) -> Any:
    """*result* as data that no longer reads the tree; unchanged if it never did."""
    if type(result) in _ATOMS or not _needs_copy(result):
        return result
    memo: dict[int, Any] = {}
    stack = [_copy(result, memo)]
    sent = None
    while True:
        try:
            part = stack[-1].send(sent)
        except StopIteration as done:
            stack.pop()
            if not stack:
                return done.value
            sent = done.value
        else:
            stack.append(_copy(part, memo))
            sent = None


_IN_PROGRESS = object()


def _copy(value: Any, memo: dict[int, Any]) -> Generator[Any, Any, Any]:
    """One value of :func:`_detach`: yields its parts, is sent their copies, returns its copy.

    ``memo`` maps what was already copied to its copy, so shared parts stay
    shared and lists or dicts that contain themselves are copied as such.
    """
    if type(value) in _ATOMS:
        return value
    key = id(value)
    if key in memo:
        if memo[key] is _IN_PROGRESS:
            raise MisuseError(
                "the returned value contains itself through a tuple or a set; "
                "return it without that cycle"
            )
        return memo[key]
    if _is_node(value):
        memo[key] = out = _plain_node(value)
        return out
    if isinstance(value, Persistent):
        raise _foreign_persistent(value, "")
    if isinstance(value, _DICTS):
        out = {} if type(value) in _DICTS else copy.copy(value)  # keeps a defaultdict's factory
        memo[key] = out
        for k, v in value.items():
            if isinstance(k, Persistent):
                raise MisuseError(
                    "the returned value uses a tree node as a dictionary key; nodes come "
                    "back as plain dicts and lists, which cannot be keys: use its key instead"
                )
            out[k] = v if type(v) in _ATOMS else (yield v)
        return out
    if isinstance(value, list | collections.deque):
        out = [] if type(value) is list else copy.copy(value)  # keeps a deque's maxlen
        out.clear()
        memo[key] = out
        for item in value:
            out.append(item if type(item) in _ATOMS else (yield item))
        return out
    if isinstance(value, tuple | set | frozenset):
        memo[key] = _IN_PROGRESS
        items = []
        for item in value:
            items.append(item if type(item) in _ATOMS else (yield item))
        memo[key] = out = _rebuild(value, items)
        return out
    if isinstance(value, MappingView):
        mapping = _view_mapping(value)
        if mapping is None:
            return (yield list(value))
        if isinstance(mapping, types.MappingProxyType):
            mapping = dict(mapping)  # a dict view: copy the dict it shows
        plain = yield mapping
        if isinstance(value, ItemsView):
            return plain.items()
        return plain.values() if isinstance(value, ValuesView) else plain.keys()
    if inspect.isgenerator(value) and not _iterates_a_node(value):
        value.close()
        raise MisuseError(
            "the function returned a generator; it would run after the transaction "
            "ended and read whatever the store holds then: return list(...) of it instead"
        )
    if inspect.iscoroutine(value) or inspect.isasyncgen(value):
        kind = "coroutine" if inspect.iscoroutine(value) else "async generator"
        if inspect.iscoroutine(value):
            value.close()  # never started: closing it only silences "never awaited"
        raise MisuseError(
            f"the function returned a {kind} (from an async def?); it cannot run inside "
            "the store's transaction: make it a plain function"
        )
    if _is_lazy(value):
        items = list(itertools.islice(value, MAX_RETURNED_ITEMS + 1))
        if len(items) > MAX_RETURNED_ITEMS:
            raise MisuseError(
                f"the function returned an iterator of more than {MAX_RETURNED_ITEMS:,} "
                "items; an iterator is read to its end inside the transaction, so it "
                "must end: return a list (or a slice) of what you need"
            )
        out = yield items
        return out if isinstance(value, _BTREE_SEQUENCES) else iter(out)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            if _needs_copy(getattr(value, field.name)):
                raise MisuseError(
                    f"the function returned a {type(value).__qualname__} whose field "
                    f"{field.name!r} holds a tree node, or a view or iterator over one; it "
                    "would outlive its transaction: put snaptree.to_plain(...) or "
                    "list(...) of it in the field instead"
                )
    return value


def _rebuild(value: tuple | set | frozenset, items: list[Any]) -> Any:
    kind = type(value)
    if isinstance(value, tuple):
        if hasattr(kind, "_make"):  # a namedtuple
            return kind._make(items)
        return tuple(items) if kind is tuple else kind(items)
    try:
        return kind(items)
    except TypeError:
        raise MisuseError(
            f"the returned {kind.__name__} holds tree nodes; they come back as plain dicts "
            "and lists, which cannot be in a set: return a list instead"
        ) from None


def _iterates_a_node(generator: Generator[Any, Any, Any]) -> bool:
    """Whether *generator* is a node's own iteration (``iter(node)``), which runs no user code.

    Either snaptree's node module made it, or it is a method a node class
    inherits (``collections.abc.Sequence.__iter__``) running on a node.
    """
    frame = generator.gi_frame
    if frame is None:
        return False
    if frame.f_globals.get("__name__") == Mapping.__module__:
        return True
    owner = inspect.getgeneratorlocals(generator).get("self")
    if not _is_node(owner):
        return False
    return any(
        getattr(member, "__code__", None) is generator.gi_code
        for cls in type(owner).__mro__
        for member in vars(cls).values()
    )


def _plain_node(node: Any) -> Any:
    _check_returnable(node)
    return _to_plain(node)


def _foreign_persistent(value: Any, path: str) -> MisuseError:
    where = f" at {path} of the returned value" if path else ""
    return MisuseError(
        f"the function returned a persistent {type(value).__qualname__}{where}; it would "
        "outlive its transaction; return plain values (its attributes) instead"
    )


# Where a value sits below the one a walk started from, as (parent's trail, key):
# joined into a path only when an error names it, so deep trees cost no long strings.
_Trail = tuple[Any, Any] | None


def _path_of(trail: _Trail) -> str:
    """*trail* in the tree's own path dialect (``accounts/a1/entries/0``)."""
    keys = []
    while trail is not None:
        trail, key = trail
        keys.append(str(key))
    return "/".join(reversed(keys))


def _check_returnable(node: Any) -> None:
    """Refuse a node that holds the user's own persistent objects, or itself."""
    on_path: set[int] = set()
    done: set[int] = set()
    stack: list[tuple[Any, _Trail, bool]] = [(node, None, False)]
    while stack:
        item, trail, leaving = stack.pop()
        ident = id(item)
        if leaving:
            on_path.discard(ident)
            done.add(ident)
            continue
        if ident in on_path:
            raise MisuseError(
                f"the returned node contains itself (at {_path_of(trail)} of it); a plain "
                "copy cannot be made: return the part you need"
            )
        if ident in done:
            continue
        if isinstance(item, Persistent) and not _is_node(item):
            raise _foreign_persistent(item, _path_of(trail))
        children = _children(item)
        if children is None:
            continue
        on_path.add(ident)
        stack.append((item, trail, True))
        for key, child in children:
            if type(child) not in _ATOMS:
                stack.append((child, (trail, key), False))


def _children(value: Any) -> Iterable[tuple[Any, Any]] | None:
    """(key or index, value) of what *value* holds, for nodes and plain containers."""
    if isinstance(value, _DICTS):
        return value.items()
    if isinstance(value, _SEQUENCES):
        return enumerate(value)
    if _is_node(value):
        items = getattr(value, "items", None)
        if callable(items):
            return items()
        if isinstance(value, Iterable):
            return enumerate(value)
    return None


def _find_path(root: Any, oid: bytes, limit: int) -> str | None:
    """The path of the object *oid* under *root*, or of the mapping whose bucket it is.

    Breadth first, so shallow hot spots are found soon; it gives up after
    looking at *limit* values (a bucket or an inner node of a mapping counts
    as one), so a large tree costs a bounded read.
    """
    queue: collections.deque[tuple[Any, _Trail]] = collections.deque([(root, None)])
    seen: set[int] = set()
    looked = 0
    while queue:
        item, trail = queue.popleft()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Persistent):
            if item._p_oid == oid:
                return _path_of(trail)
            for part in btree_parts(item):
                looked += 1
                if part._p_oid == oid:
                    return _path_of(trail)
        for key, child in _children(item) or ():
            looked += 1
            if looked > limit:
                return None
            if type(child) not in _ATOMS:
                queue.append((child, (trail, key)))
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
    ) -> None:
        self.db = db
        self.source = source
        # The URI another process can open (exporter processes), password
        # included: kept private and never printed; ``source`` is for people.
        self._shareable_uri = shareable_uri
        self.retry_policy = retry
        self.pool_timeout = pool_timeout
        self._stats = ConflictStats()
        self._local = threading.local()
        # One condition guards the pool's free slots, the calls holding a
        # connection, the commits under way, the closing state and the
        # registered synchronizers.
        self._state = threading.Condition()
        self._free = pool_size
        self._leased = 0
        self._committing = 0
        self._closing = False  # close() began: no connection is lent any more
        self._closed = False  # the database is (being) closed: nothing may commit
        self._synchronizers: list[Any] = []

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

    # -- connections ---------------------------------------------------------

    @contextmanager
    def _lease(
        self,
        *,
        at: bytes | None = None,
        read_only: bool = False,
        write: bool = False,
        wait: float | None = None,
    ) -> Iterator[tuple[Any, Any]]:
        """Borrow a pooled connection with its own explicit transaction manager.

        Counting free connections keeps the number open within the pool
        size, so ZODB never warns about an oversized pool however many
        threads call in; a thread that cannot get one within
        ``pool_timeout`` (or *wait*) gets an error instead of waiting
        forever, and one waiting when the store closes gets StoreClosedError
        at once. Write calls get the registered synchronizers.
        """
        wait = self.pool_timeout if wait is None else wait
        with self._state:
            if not self._state.wait_for(lambda: self._closing or self._free > 0, wait):
                raise Error(
                    f"no connection became free within {wait:g} s: all connections "
                    "are busy; raise pool_size or shorten long transactions"
                )
            if self._closing:
                raise self._closed_error()
            self._free -= 1
            self._leased += 1
            synchronizers = list(self._synchronizers) if write else []
        self._local.leases = getattr(self._local, "leases", 0) + 1
        conn = None
        discard = False
        try:
            tm = transaction.TransactionManager(explicit=True)
            for synchronizer in synchronizers:
                tm.registerSynch(synchronizer)
            try:
                conn = self.db.open(transaction_manager=tm, at=at)
            except ValueError as exc:  # historical open in the future
                raise ArgumentError(
                    f"cannot open the tree at that time: {exc}; ask for a time up to "
                    f"store.last_tid() ({self.source})"
                ) from None
            conn.claim(read_only=read_only)
            try:
                yield conn, tm
            except MisuseError:
                discard = True
                raise
        finally:
            try:
                if conn is not None:
                    self._give_back(conn, tm, discard)
            finally:
                self._local.leases -= 1
                with self._state:
                    self._free += 1
                    self._leased -= 1
                    self._state.notify_all()

    def _give_back(self, conn: Any, tm: Any, discard: bool) -> None:
        """End the connection's transaction and return it to ZODB's pool.

        After a misuse, objects may hold changes made outside any
        transaction (after an abort through the jar, say); the pool would
        hand them to the next call, which would commit them. Ghosting every
        unchanged object in the cache drops them: they are read again.
        """
        try:
            conn.release()
            try:
                tm.abort()
            except NoTransaction:
                pass
            if discard:
                conn.cacheMinimize()
            conn.close()
        except Exception:
            if not self._closed:
                raise
            # The database was closed under this call (close() timed out
            # waiting for it): the connection went with it.

    def _closed_error(self) -> StoreClosedError:
        state = "closed" if self._closed else "closing"
        return StoreClosedError(
            f"{self.source} is {state} (store.close() was called); nothing more can be "
            "read or committed through this Store: open it again with snaptree.open()"
        )

    def _check_open(self) -> None:
        if self._closing:
            raise self._closed_error()

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

    def _commit(self, tm: Any, guard: _CallGuard) -> None:
        """Commit the call's transaction, unless the database is being closed."""
        with self._state:
            if self._closed:
                raise self._closed_error()
            self._committing += 1
        try:
            guard.ending = True
            tm.commit()
        finally:
            with self._state:
                self._committing -= 1
                self._state.notify_all()

    def _failure(self, exc: Exception, guard: _CallGuard | None) -> Exception | None:
        """The error a failed call should raise instead of *exc*, if any.

        When close() gave up waiting and closed the database under the call,
        whatever the call ran into (ZODB's closing aborts its transaction
        from the closing thread) is reported as the store being closed.
        """
        if isinstance(exc, StoreClosedError):
            return None
        if self._closed:
            error: Exception = self._closed_error()
        elif isinstance(exc, Error):
            return None
        elif guard is not None and guard.misuse:
            error = guard.error()
        else:
            return None
        error.__cause__ = exc
        return error

    # -- writing ---------------------------------------------------------------

    def _attempt(
        self,
        fn: Callable[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        root_key: str | None = ROOT_KEY,
        attempt: CallAttempt | None = None,
    ) -> R:
        """One attempt: begin, call, commit; a transient failure becomes ``Retry``.

        ``root_key=None`` hands ``fn`` ZODB's own root (only for creating the tree).
        """
        with self._lease(write=True) as (conn, tm):
            guard = _CallGuard(tm)
            txn = None
            try:
                # Beginning can fail transiently too: with ZEO's server_sync the
                # begin pings a server that may be restarting.
                txn = tm.begin()
                if attempt is not None:
                    txn.set_data(CallAttempt, attempt)
                root = conn.root()
                with _GlobalTransactionGuard():
                    result = fn(root if root_key is None else root[root_key], *args, **kwargs)
                guard.check()
                result = _detach(result)
                guard.check()  # reading a returned iterator ran the user's code too
                self._commit(tm, guard)
            except Exception as exc:
                replacement = self._failure(exc, guard)
                if replacement is not None:
                    raise replacement from exc
                if _is_transient(exc, tm, txn):
                    raise Retry(exc) from exc
                raise
        self._stats.count("commits")
        return result

    def run(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn(root, *args, **kwargs)`` in a transaction and commit, retrying conflicts.

        ``fn`` may run several times, so it should only change the tree (no
        side effects outside it). Its return value is returned, read to the
        end inside the transaction: nodes come back as plain copies, views
        and iterators over them as views and iterators over plain copies,
        since live persistent objects must not outlive their transaction.
        A generator or coroutine (function) is refused: it would run after
        the transaction.
        """
        _refuse_deferred(fn)
        return self._run(fn, args, kwargs, self.retry_policy)

    def _run(self, fn: Callable[..., R], args: tuple, kwargs: dict, policy: RetryPolicy) -> R:
        self._check_open()
        numbers = itertools.count(1)
        with self._writing():
            return run_with_retries(
                lambda: self._attempt(
                    fn, args, kwargs, attempt=CallAttempt(fn, next(numbers), policy.attempts)
                ),
                policy,
                self._stats,
                self._locate,
            )

    def transactional(
        self,
        fn: Callable[..., R] | None = None,
        *,
        retries: int | None = None,
        deadline: float | None = None,
    ) -> Any:
        """Decorator form of :meth:`run`: ``@store.transactional(retries=20)``.

        ``retries`` is how many times a conflicting call is tried again after
        its first attempt (0: never); the default is the store's policy.
        ``deadline`` bounds the whole call, in seconds.
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

        def decorate(func: Callable[..., R]) -> Callable[..., R]:
            _refuse_deferred(func)

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
        self._check_open()
        with self._writing(), self._lease(write=True) as (conn, tm):
            guard = _CallGuard(tm)
            try:
                tm.begin()
                with _GlobalTransactionGuard():
                    yield conn.root()[ROOT_KEY]
                guard.check()
                self._commit(tm, guard)
            except TransientError as exc:
                self._stats.count("conflicts", getattr(exc, "get_class_name", lambda: None)())
                raise
            except Exception as exc:
                replacement = self._failure(exc, guard)
                if replacement is not None:
                    raise replacement from exc
                raise
        self._stats.count("commits")

    def register_synchronizer(self, synchronizer: Any) -> None:
        """Register a ``transaction`` ISynchronizer with every later write call's transaction.

        Each call of run/transactional/transaction gets its own transaction
        manager; *synchronizer* is registered with it before its transaction
        begins, so ``newTransaction(txn)`` can join a data manager to the
        call's transaction (how a test kit forces a conflict at commit
        through the store's real retry path). Snapshots do not get it.
        """
        with self._state:
            if synchronizer not in self._synchronizers:
                self._synchronizers.append(synchronizer)

    def unregister_synchronizer(self, synchronizer: Any) -> None:
        """Stop registering *synchronizer* with new calls (calls under way keep it)."""
        with self._state:
            if synchronizer not in self._synchronizers:
                raise ArgumentError(f"{synchronizer!r} is not registered with this store")
            self._synchronizers.remove(synchronizer)

    # -- reading ---------------------------------------------------------------

    @contextmanager
    def snapshot(self, at: datetime.datetime | str | bytes | None = None) -> Iterator[Snapshot]:
        """A read-only view of one committed state, stable however long it is held.

        With ``at`` (an aware datetime, a hex tid or tid bytes) the view is the
        state as of that moment, where the storage keeps history; ``tid`` is
        then that moment, not necessarily the tid of a transaction. A moment
        before the tree existed, or before the oldest history kept, is an
        ArgumentError that says how far back the history goes.
        """
        point = None if at is None else parse_point(at)
        self._check_open()
        if point is not None and not keeps_history(self.db.storage):
            raise ArgumentError(
                f"{self.source} keeps no history; a snapshot at a past time needs one"
            )
        missing = False
        with self._lease(at=point, read_only=True) as (conn, tm):
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
                    if point is None or self._closed:
                        raise
                    raise ArgumentError(
                        f"part of the tree as of {_describe_point(at, point)} is no longer "
                        f"kept in {self.source} ({exc!r} could not be read): its history "
                        "was packed away after that time; ask for a later time"
                    ) from exc
                except Exception as exc:
                    replacement = self._failure(exc, None)
                    if replacement is not None:
                        raise replacement from exc
                    raise
        if missing:
            assert at is not None and point is not None
            raise self._no_tree_at(at, point)

    def _no_tree_at(self, at: datetime.datetime | str | bytes, point: bytes) -> ArgumentError:
        asked = _describe_point(at, point)
        oldest = self._oldest_tree_state()
        if oldest is None:
            return ArgumentError(
                f"there is no tree in {self.source} at {asked}: it did not exist yet, or "
                "the history of that time was packed away; ask for a later time "
                "(store.last_tid() is the newest)"
            )
        return ArgumentError(
            f"there is no tree in {self.source} at {asked}: the oldest state of the "
            f"tree it keeps is from {tid_time(oldest).isoformat()} (tid {oldest.hex()}); "
            "the tree did not exist yet at the time asked, or the history before it was "
            "packed away: ask for that time or later"
        )

    def _oldest_tree_state(self) -> bytes | None:
        """The tid of the oldest version of the tree's root the storage keeps, if it can tell."""
        try:
            with self._lease(read_only=True, wait=1.0) as (conn, tm):
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
        state, looking at most at PATH_SEARCH_LIMIT values.
        """
        try:
            with self._lease(read_only=True, wait=1.0) as (conn, tm):
                tm.begin()
                return _find_path(conn.root()[ROOT_KEY], oid, PATH_SEARCH_LIMIT)
        except Exception:  # the path is a hint: it must never replace the real error
            log.debug("could not find the path of oid %r", oid, exc_info=True)
            return None

    # -- import and export (the modules named after them do the work) --------

    def import_tree(self, data: Any, path: str = "/", replace: bool = False, **options: Any) -> Any:
        """Store a plain tree at *path*, atomically. See :mod:`snaptree.imports`."""
        from .imports import import_tree

        self._check_open()
        return import_tree(self, data, path=path, replace=replace, **options)

    def export(
        self,
        path: str | os.PathLike[str],
        format: str | None = None,  # noqa: A002 - the name users know from the CLI
        at: datetime.datetime | str | bytes | None = None,
        subtree: str = "/",
        **options: Any,
    ) -> Any:
        """Write one committed snapshot of the tree to *path*. See snaptree.exports.

        ``format=None`` takes the format from the file name's suffix.
        """
        from .exports import export

        self._check_open()
        return export(self, path, format=format, at=at, subtree=subtree, **options)

    def stats(self) -> dict[str, Any]:
        """Commits, conflicts, retries, exhausted calls, and the classes that conflict most."""
        self._check_open()
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
        with self._state:
            if self._closing:
                return
            self._closing = True
            self._state.notify_all()  # callers waiting for a connection give up now
            own = getattr(self._local, "leases", 0)  # close() called inside a call
            finished = self._state.wait_for(lambda: self._leased <= own, timeout)
            running = self._leased - own
            self._closed = True  # no commit starts from now on
            # Closing the storage under a commit can hang threads for good
            # (seen with FileStorage: the cut-off commit never releases the
            # commit lock, and the next commit waits in tpc_begin forever).
            # Commits under way are bounded by the storage itself: wait.
            committed = self._state.wait_for(lambda: self._committing == 0, COMMIT_WAIT)
        if not finished:
            log.warning(
                "closing %s with %d call(s) still running after %g s; they will fail "
                "with StoreClosedError",
                self.source,
                running,
                timeout,
            )
        if not committed:
            log.warning(
                "closing %s while a commit is still under way after %g s more",
                self.source,
                COMMIT_WAIT,
            )
        self.db.close()

    def __enter__(self) -> Store:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<snaptree.Store {self.source}>"


def _refuse_deferred(fn: Callable[..., Any]) -> None:
    """Refuse a generator or async function: calling it runs none of its body."""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise MisuseError(
            f"{name} is a generator function: calling it only creates a generator, so "
            "nothing would run or be committed; make it a plain function (return "
            "list(...) of what it yields)"
        )
    if inspect.iscoroutinefunction(fn):
        raise MisuseError(
            f"{name} is an async function: a store call runs it synchronously in one "
            "thread, so its body would never run; make it a plain def (from async code, "
            "await asyncio.to_thread(store.run, fn))"
        )


class _DB(DB):
    klass = OwnedConnection  # ZODB's documented hook for the connection class


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
) -> Store:
    """Open the store at *uri*: a path, file://, memory://, zeo://, postgresql:// or zconfig://.

    With no URI, ``$SNAPTREE_DB`` if set, else ``./data/snaptree.fs``.
    ``pool_size`` bounds the connections open at once: calls beyond it wait
    up to ``pool_timeout`` seconds for a free one. ``cache_size`` is each
    connection's object cache, in objects (DEFAULT_CACHE_SIZE unless the
    URI or this argument says otherwise).
    """
    if pool_size < 1:
        raise ArgumentError(f"pool_size must be at least 1, not {pool_size}")
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
        raise StoreUnavailableError(
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
        unreachable = isinstance(exc, ConnectionError) or _is_driver_connection_error(exc)
        kind = StoreUnavailableError if unreachable else OpenError
        raise kind(f"cannot open {resolved.display}: {reason}") from exc
    db_kwargs = dict(resolved.db_kwargs)
    db_kwargs.update(pool_size=pool_size, historical_pool_size=pool_size)
    if cache_size is not None:
        db_kwargs["cache_size"] = cache_size
    db_kwargs.setdefault("cache_size", DEFAULT_CACHE_SIZE)
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
        with _open_hooks_lock:
            hooks = list(_open_hooks)
        for hook in hooks:
            hook(store)
    except BaseException:
        db.close()
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


def _is_driver_connection_error(exc: BaseException) -> bool:
    """psycopg2's OperationalError: the server refused or did not answer (PEP 249's name)."""
    return type(exc).__name__ == "OperationalError" and type(exc).__module__.startswith("psycopg")


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


def _is_transient(exc: Exception, tm: Any, txn: Any) -> bool:
    """Whether *exc* means "try again"; decided before the transaction is aborted.

    snaptree's own errors are never transient. ``txn`` is None when the
    transaction could not even begin; a transaction that already ended
    (the function ended it itself) can no longer ask its data managers.
    """
    if isinstance(exc, Error):
        return False
    if isinstance(exc, TransientError):
        return True
    try:
        current = tm.get()
    except NoTransaction:
        return False
    return txn is not None and current is txn and txn.isRetryableError(exc)
