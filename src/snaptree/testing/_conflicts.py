"""Forcing conflicts at commit: the data manager that votes no, and force_conflicts.

How a conflict is forced: the kit registers a synchronizer with the store
(``Store.register_synchronizer``), which hands it to each write call's
transaction manager; it joins a data manager to the call's transaction, and
that data manager votes no at ``tpc_vote`` with a ``ConflictError``. Nothing
the application calls is replaced. The store tells it which function and
which attempt a commit belongs to (``snaptree.store.CallAttempt``), so
conflicts can be aimed at one function, and chaos can leave a call alone
when its policy allows no retry.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ZODB.POSException import ConflictError

from ..errors import ArgumentError, StoreClosedError
from ..store import CallAttempt, Store


class _NoState:
    """A savepoint of a data manager that holds nothing to roll back."""

    def rollback(self) -> None:
        pass


class _VoteNo:
    """A data manager that makes the commit fail with a ConflictError when ``decide`` says so.

    It votes last (its sort key), after the storages voted, so a commit it
    fails has been checked for real conflicts first. It keeps no data, so
    joining it changes nothing else about the transaction, savepoints included.
    """

    transaction_manager = None

    def __init__(self, decide: Callable[[CallAttempt], str | None]) -> None:
        self._decide = decide

    def tpc_vote(self, txn: Any) -> None:
        try:
            attempt = txn.data(CallAttempt)
        except KeyError:  # a store.transaction() block: never retried, never forced
            return
        reason = self._decide(attempt)
        if reason is not None:
            raise ConflictError(message=f"database conflict error ({reason})")

    def abort(self, txn: Any) -> None:
        pass

    tpc_begin = commit = tpc_finish = tpc_abort = abort

    def savepoint(self) -> _NoState:
        return _NoState()

    def sortKey(self) -> str:  # noqa: N802 - IDataManager
        return "~snaptree.testing"


class JoinEachTransaction:
    """The synchronizer a helper registers with a store: joins a ``_VoteNo`` to each write call."""

    def __init__(self, store: Store, decide: Callable[[Store, CallAttempt], str | None]) -> None:
        self._store = weakref.ref(store)
        self._decide = decide

    def newTransaction(self, txn: Any) -> None:  # noqa: N802 - ISynchronizer
        store = self._store()
        if store is not None:
            txn.join(_VoteNo(functools.partial(self._decide, store)))

    def beforeCompletion(self, txn: Any) -> None:  # noqa: N802
        pass

    def afterCompletion(self, txn: Any) -> None:  # noqa: N802
        pass


# Stores whose calls a helper of this module controls exactly (interleave, the
# copies assert_retry_safe makes, force_conflicts): chaos stands down there, so
# that "forced twice" means twice. Counted, since helpers may nest.
_controlled: weakref.WeakKeyDictionary[Store, int] = weakref.WeakKeyDictionary()
_controlled_lock = threading.Lock()


@contextmanager
def in_control(store: Store) -> Iterator[None]:
    with _controlled_lock:
        _controlled[store] = _controlled.get(store, 0) + 1
    try:
        yield
    finally:
        with _controlled_lock:
            _controlled[store] -= 1
            if not _controlled[store]:
                del _controlled[store]


def is_controlled(store: Store) -> bool:
    with _controlled_lock:
        return store in _controlled


def unwrapped(fn: Any) -> Any:
    """The function behind decorators (``__wrapped__``) and ``functools.partial``."""
    for _ in range(100):  # a wrapper chain that loops must not hang us
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif getattr(fn, "__wrapped__", None) is not None:
            fn = fn.__wrapped__
        else:
            break
    return fn


class ForcedConflicts:
    """What :func:`force_conflicts` did: read it inside the block or after it.

    ``conflicts`` is how many commits it failed; ``retries`` and
    ``exhausted`` are the store's own counts (``store.stats()``) since the
    block began: the attempts that followed a conflict, forced or real, and
    the calls that gave up.
    """

    def __init__(self, store: Store, times: int, where: Callable[..., Any] | None) -> None:
        self.times = times
        self.where = where
        self._store = store
        self._lock = threading.Lock()
        self._forced = 0
        self._before = store.stats()
        self._after: dict[str, Any] | None = None

    def _take(self, store: Store, attempt: CallAttempt) -> str | None:
        if self.where is not None:
            aimed = unwrapped(self.where)
            if not any(unwrapped(fn) == aimed for fn in attempt.functions):
                return None  # a batch matches if any of its calls runs *where*
        with self._lock:
            if self._forced >= self.times:
                return None
            self._forced += 1
            number = self._forced
        return f"forced by snaptree.testing.force_conflicts, {number} of {self.times}"

    def _since(self, what: str) -> int:
        now = self._after if self._after is not None else self._store.stats()
        return now[what] - self._before[what]

    @property
    def conflicts(self) -> int:
        with self._lock:
            return self._forced

    @property
    def retries(self) -> int:
        return self._since("retries")

    @property
    def exhausted(self) -> int:
        return self._since("exhausted")

    def __repr__(self) -> str:
        return (
            f"<ForcedConflicts {self.conflicts} of {self.times} forced, "
            f"{self.retries} retries, {self.exhausted} exhausted>"
        )


@contextmanager
def force_conflicts(
    store: Store, times: int = 1, where: Callable[..., Any] | None = None
) -> Iterator[ForcedConflicts]:
    """Make the next *times* commits of ``store.run`` calls in the block fail with a conflict.

    Each such commit fails at ``tpc_vote`` with a genuine
    ``ZODB.POSException.ConflictError``; the store aborts, backs off and runs
    the function again, and counts it in ``store.stats()``, as it does for a
    conflict between two threads. ``times`` may exceed what the store's
    retry policy allows: the call then ends in ``RetriesExhausted``, as it
    would in production.

    ``where`` aims the conflicts at one function: only commits of calls that
    run it count (``store.run(where, ...)``, or a ``@store.transactional``
    function; compared after unwrapping decorators and ``functools.partial``,
    and bound methods by equality). A function is what a test has in hand
    and is exact; which *objects* a commit changes, ZODB keeps to itself.
    Calls of other functions commit normally, and so do ``store.transaction()``
    blocks (never retried) and snapshots (never commit). Conflicts are forced
    in calls from any thread. Chaos (``--snaptree-chaos``) leaves the store
    alone while the block runs, so the counts are exactly the ones asked for.

    Example::

        with force_conflicts(store, times=2, where=transfer) as forced:
            store.run(transfer, "a1", "a2", 5)
        assert forced.conflicts == 2 and forced.retries == 2
    """
    if isinstance(times, bool) or not isinstance(times, int) or times < 0:
        raise ArgumentError(f"times must be an int of 0 or more, not {times!r}")
    if where is not None and not callable(where):
        raise ArgumentError(f"where must be the function whose calls conflict, not {where!r}")
    report = ForcedConflicts(store, times, where)
    synchronizer = JoinEachTransaction(store, report._take)
    with in_control(store):
        store.register_synchronizer(synchronizer)
        try:
            yield report
        finally:
            store.unregister_synchronizer(synchronizer)
            with contextlib.suppress(StoreClosedError):  # the block closed it: counts are gone
                report._after = store.stats()


def name_of(obj: Any) -> str:
    """How a message names a function or an object: its qualified name, else its repr."""
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
