"""Lending a database's connections to store calls, bounded, and closing the database safely.

Every write call runs on a ZODB connection with its own explicit
transaction manager, so threads share nothing but the database. Opening
one per call (ZODB's pool, a new manager, closing it again) cost a fifth of
a small commit, so each thread *keeps* its pair between calls: its next
call takes it back with one lock. Pairs are bounded all the same: the pool
counts *slots*, one per connection that exists (a kept pair, or a
snapshot's connection lent for one block), never more than its size, so
ZODB never opens more connections than its own pool size and never warns.
A thread that finds no free slot takes the pair another thread has left
idle longest (a pair is not tied to a thread: its manager is explicit), or
waits (boundedly) for one. When a thread ends, its pair is the first one
given to a thread that needs one (see :meth:`ConnectionPool._orphan`).
An export of the newest state from a thread between its calls borrows
that thread's idle pair rather than a slot of its own.

The pool also owns the end of the database's life: ``close`` refuses new
calls, lets the calls holding a connection finish, and never closes the
storage under a commit.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import transaction
from transaction.interfaces import NoTransaction
from ZODB import DB
from ZODB.utils import z64

from .errors import ArgumentError, Error, MisuseError, StoreClosedError

# The store's logger: closing is the store closing, whoever does the work.
log = logging.getLogger("snaptree.store")

#: Seconds ``close()`` waits for calls in flight before it closes the database anyway.
CLOSE_TIMEOUT = 30.0

#: Seconds ``close()`` then still waits for commits already under way to end.
COMMIT_WAIT = 60.0


def _nobody() -> None:
    return None


class Pair:
    """A connection and its own transaction manager, lent to one call at a time."""

    __slots__ = (
        "_root_serial",
        "_tree",
        "_zodb_root",
        "commits",
        "conn",
        "owner",
        "synchronizers",
        "tm",
    )

    def __init__(self, conn: Any, tm: Any) -> None:
        self.conn = conn
        self.tm = tm
        self.synchronizers: tuple[Any, ...] = ()  # the store's, registered with tm
        self.owner: Callable[[], Any] = _nobody  # the thread that used it last (its holder)
        self.commits = 0  # calls committed on it: only the call holding it counts
        # The tree's root node as ZODB's root named it when that root was in
        # state _root_serial (see tree_root).
        self._zodb_root: Any = None
        self._root_serial = z64
        self._tree: Any = None

    def tree_root(self, key: str) -> Any:
        """The node ZODB's root holds under *key*, in the transaction just begun.

        Looking it up through ``conn.root()`` made up 1.4% of a small write
        call's instructions (a wrapper object and two Python lookups), so
        the node is kept with the state of ZODB's root it came from. The
        kept one is used only while that root object is loaded and in the
        same committed state (its serial): a change committed elsewhere
        ghosts it when the transaction begins, one committed or read again
        through this connection changes its serial, and an abort ghosts it.
        (The object stays the connection's own: ZODB swaps a connection's
        cache only when the connection is opened again, and a kept one is
        never closed.) Only write calls ask, right after they begin, before
        their function can change anything.
        """
        root = self._zodb_root
        if (
            root is not None
            and root._p_changed is not None  # not a ghost
            and root._p_serial == self._root_serial
        ):
            return self._tree
        root = self.conn.get(z64)
        tree = root[key]  # loads the root: its serial is then the state read
        self._zodb_root, self._root_serial, self._tree = root, root._p_serial, tree
        return tree

    def use_synchronizers(self, synchronizers: tuple[Any, ...]) -> None:
        """Register exactly *synchronizers* (the store's current ones) with the manager."""
        for synchronizer in self.synchronizers:
            if synchronizer not in synchronizers:
                self.tm.unregisterSynch(synchronizer)
        for synchronizer in synchronizers:
            if synchronizer not in self.synchronizers:
                self.tm.registerSynch(synchronizer)
        self.synchronizers = synchronizers

    def abort(self) -> None:
        """Abort the transaction the call left, if any (a failed commit, an exception)."""
        self.tm.abort()


class _Manager(transaction.TransactionManager):
    """An explicit transaction manager whose abort() without a transaction does nothing.

    ZODB's ``DB.close()`` aborts the manager of every connection, those of
    calls still running when a store closes with a timeout included. A call
    between two transactions (committed, not yet given back) has none, and
    an explicit manager refused: NoTransaction stopped ``DB.close()`` before
    it closed the storage, and ``store.close()`` raised it.
    """

    def __init__(self) -> None:
        super().__init__(explicit=True)

    def abort(self) -> None:
        try:
            txn = self.get()
        except NoTransaction:
            return
        txn.abort()  # what goes wrong inside (a synchronizer's error) still raises


class _Holder:
    """A thread's local value: the pair it keeps. It dies with the thread, which frees the pair."""

    __slots__ = ("__weakref__", "leases", "pair")

    def __init__(self) -> None:
        self.pair: Pair | None = None
        self.leases = 0  # connections lent to this thread for a block (snapshots)


class ConnectionPool:
    """Lends *db*'s connections, at most *size* at once: kept by threads, or lent per block."""

    def __init__(self, db: DB, *, source: str, size: int, timeout: float) -> None:
        self.db = db
        self.source = source
        self.timeout = timeout
        # One lock guards the slots, the pairs, the calls in flight and the
        # closing state; the condition is for callers waiting for a slot, and
        # for close() waiting for calls and commits.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._free = size  # slots no connection uses
        # Idle pairs, longest idle first (a dict keeps the order keys came in).
        self._idle: dict[Pair, None] = {}
        self._pairs: set[Pair] = set()  # every pair whose connection is open
        self._closed_commits = 0  # calls committed on pairs closed since
        self._in_use = 0  # pairs and leases held by calls
        self._waiting = 0  # callers waiting for a slot
        self.closing = False  # close() began: no connection is lent any more (read-only)
        self._closed = False  # the database is (being) closed: nothing may commit
        self._local = threading.local()

    @property
    def closed(self) -> bool:
        """Whether the database is closed, or being closed: nothing may commit any more."""
        return self._closed

    def check_open(self) -> None:
        """Raise StoreClosedError once ``close`` began."""
        if self.closing:
            raise self.closed_error()

    def closed_error(self) -> StoreClosedError:
        state = "closed" if self._closed else "closing"
        return StoreClosedError(
            f"{self.source} is {state} (store.close() was called); nothing more can be "
            "read or committed through this Store: open it again with snaptree.open()"
        )

    # -- writes: the thread's own pair --------------------------------------------

    def acquire(self, prefer: Pair | None = None) -> Pair:
        """The calling thread's pair, its connection claimed for one write call.

        Give it back with :meth:`release`. *prefer*, when it is idle, is
        taken instead: batched calls run on the pair the last batch ran
        on, whichever thread combines them.
        """
        if prefer is not None and self._take_idle(prefer):
            pair = prefer
        else:
            holder = getattr(self._local, "holder", None)  # None: the thread's first call
            pair = holder.pair if holder is not None else None
            if pair is None or not self._take_idle(pair):
                pair = self._acquire_another()
        pair.conn.claim()
        return pair

    def _holder(self) -> _Holder:
        holder = getattr(self._local, "holder", None)
        if holder is None:
            holder = self._local.holder = _Holder()
        return holder

    def _acquire_another(self) -> Pair:
        """An ended thread's pair, else a free slot (a new pair), else the longest idle one."""
        holder = self._holder()
        with self._lock:
            self._wait_for_slot(self.timeout)
            self._in_use += 1
            pair = self._orphan()
            if pair is None:
                if self._free:
                    self._free -= 1
                else:
                    pair = self._longest_idle()  # another thread's
        if pair is None:
            try:
                tm = _Manager()
                pair = Pair(self.db.open(transaction_manager=tm), tm)
            except BaseException:
                with self._lock:
                    self._free += 1
                    self._in_use -= 1
                    self._wake_one()
                raise
            with self._lock:
                self._pairs.add(pair)
        holder.pair = pair
        pair.owner = weakref.ref(holder)
        return pair

    def _orphan(self) -> Pair | None:
        """With the lock held: an idle pair whose thread has ended, taken out of the idle ones.

        A thread's local value dies with the thread, so the pair's weak
        reference to it tells. Reusing such a pair (warm cache, no new
        connection) is what "a thread that ends gives its connection back"
        means here; any idle pair can also be taken when no slot is free.
        """
        for pair in self._idle:
            if pair.owner() is None:
                del self._idle[pair]
                return pair
        return None

    def _longest_idle(self) -> Pair:
        """With the lock held: the pair idle longest, taken out of the idle ones."""
        pair = next(iter(self._idle))
        del self._idle[pair]
        return pair

    def release(self, pair: Pair, *, failed: bool = False, misused: bool = False) -> None:
        """Take back a pair whose call ended, its connection unclaimed (*failed*: its
        transaction still needs an abort).

        A *misused* pair is closed, its cache dropped first: after a misuse,
        objects may hold changes made outside any transaction (after an
        abort through the jar, say), and the next call on this connection
        would commit them. Ghosting every unchanged object drops them.
        """
        pair.conn.release()
        if not (failed or misused):  # the common case: committed, nothing to end
            with self._lock:
                self._in_use -= 1
                self._idle[pair] = None
                if self._waiting:
                    self._changed.notify()
            return
        try:
            pair.abort()
            if misused:
                pair.conn.cacheMinimize()
                pair.conn.close()
        except Exception:
            if not self._closed:
                raise
            # The database was closed under this call (close() timed out
            # waiting for it): the connection went with it.
            misused = True
        finally:
            with self._lock:
                self._in_use -= 1
                if misused:
                    self._free += 1
                    self._forget(pair)
                else:
                    self._idle[pair] = None
                self._wake_one()

    # -- snapshots and other short leases -------------------------------------------

    @contextmanager
    def lease(
        self,
        *,
        at: bytes | None = None,
        read_only: bool = False,
        wait: float | None = None,
        borrow: bool = False,
        prefer: Pair | None = None,
    ) -> Iterator[tuple[Any, Any]]:
        """Borrow a connection (as of tid *at*, if given) with its own manager, for one block.

        A thread that cannot get one within the pool's timeout (or *wait*)
        gets an error instead of waiting forever, and one waiting when the
        store closes gets StoreClosedError at once.

        With *borrow*, a read of the newest state from a thread between its
        write calls borrows *prefer* or the thread's own kept pair instead,
        whichever is idle first (see :meth:`_lend_own`): only for a reader
        that keeps none of its objects past the block (an export), since the
        next write call on that pair takes every object of its connection
        for its own.
        """
        if borrow and at is None and read_only:
            own = self._own_idle_pair(prefer)
            if own is not None:
                with self._lend_own(own) as lent:
                    yield lent
                return
        holder = self._holder()
        with self._lock:
            self._wait_for_slot(self.timeout if wait is None else wait)
            self._in_use += 1
            holder.leases += 1
            if self._free:
                self._free -= 1
                spare = None
            else:  # an idle pair's slot: its connection is closed to make room
                spare = self._orphan() or self._longest_idle()
                self._forget(spare)
        conn = tm = None
        misused = False
        try:
            if spare is not None:
                spare.conn.close()
            tm = _Manager()
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
                misused = True
                raise
        finally:
            try:
                if conn is not None:
                    self._give_back(conn, tm, misused)
            finally:
                holder.leases -= 1
                with self._lock:
                    self._in_use -= 1
                    self._free += 1
                    self._wake_one()

    def _own_idle_pair(self, prefer: Pair | None) -> Pair | None:
        """*prefer*, else the calling thread's kept pair, taken out of the idle ones; None if
        neither is idle."""
        holder = getattr(self._local, "holder", None)
        for pair in (prefer, holder.pair if holder is not None else None):
            if pair is not None and self._take_idle(pair):
                self._holder().leases += 1  # the thread's own count: only it reads it
                return pair
        return None

    def _take_idle(self, pair: Pair) -> bool:
        """Take *pair* out of the idle ones, for a call or a lease; False if it is not idle
        (in a call, or taken by another thread)."""
        with self._lock:
            if self.closing:
                raise self.closed_error()
            if self._idle.pop(pair, True) is not None:
                return False
            self._in_use += 1
            return True

    @contextmanager
    def _lend_own(self, pair: Pair) -> Iterator[tuple[Any, Any]]:
        """Lend the thread's own idle *pair* for one read-only block, then keep it again.

        Why: its cache already holds what the thread's calls committed (no
        other connection's cache does: ZODB invalidated it there), so an
        export right after a write reloads nothing, and the objects are
        cached once, not once per connection. The store's synchronizers are
        taken off first: they watch write calls, not reads.
        """
        holder = self._holder()
        if pair.synchronizers:
            pair.use_synchronizers(())
        misused = False
        pair.conn.claim(read_only=True)
        try:
            yield pair.conn, pair.tm
        except MisuseError:
            misused = True
            raise
        finally:
            holder.leases -= 1
            self.release(pair, failed=True, misused=misused)

    def _give_back(self, conn: Any, tm: Any, misused: bool) -> None:
        """End a lent connection's transaction and return it to ZODB's pool."""
        try:
            conn.release()
            tm.abort()
            if misused:
                conn.cacheMinimize()
            conn.close()
        except Exception:
            if not self._closed:
                raise
            # The database was closed under this call (close() timed out
            # waiting for it): the connection went with it.

    def _wait_for_slot(self, wait: float) -> None:
        """With the lock held: wait until a slot is free or a kept pair can be had."""
        deadline = None
        while not self.closing and not self._free and not self._idle:
            now = time.monotonic()
            deadline = now + wait if deadline is None else deadline
            if now >= deadline:
                raise Error(
                    f"no connection became free within {wait:g} s: all connections "
                    "are busy; raise pool_size or shorten long transactions"
                )
            self._waiting += 1
            try:
                self._changed.wait(deadline - now)
            finally:
                self._waiting -= 1
        if self.closing:
            raise self.closed_error()

    def _forget(self, pair: Pair) -> None:
        """With the lock held: *pair*'s connection is closed (or about to be)."""
        self._pairs.discard(pair)
        self._closed_commits += pair.commits

    def commits(self) -> int:
        """Calls committed through the pool's pairs so far."""
        with self._lock:
            return self._closed_commits + sum(pair.commits for pair in self._pairs)

    def _wake_one(self) -> None:
        """With the lock held: wake a caller waiting for a slot, if any."""
        if self._waiting:
            self._changed.notify()

    # -- committing and closing ---------------------------------------------------------

    def commit(self, pair: Pair) -> None:
        """Commit the pair's transaction, unless the database is being closed.

        The commit is marked under way, so that ``close`` waits for it. No
        lock: the flag is set before ``_closed`` is read here, and ``close``
        sets ``_closed`` before it reads the flags, so one of the two always
        sees the other (each step is one bytecode under the GIL). The flag
        is the connection's own: the commit it lets through.
        """
        conn = pair.conn
        conn.snaptree_committing = True
        try:
            if self._closed:
                raise self.closed_error()
            pair.tm.commit()
        finally:
            conn.snaptree_committing = False
            if self._closed:
                with self._lock:
                    self._changed.notify_all()

    def kept(self) -> int:
        """Connections kept between calls by threads (or left by threads that ended)."""
        with self._lock:
            return len(self._idle)

    def close(self, timeout: float, in_call: bool) -> None:
        """Refuse new calls, wait up to *timeout* s for the ones out, close the database.

        A commit already under way is never cut off in the middle: closing
        then waits up to COMMIT_WAIT more seconds for it. Closing twice is
        harmless; closing from inside a call (*in_call*, or a snapshot) does
        not wait for that call.
        """
        holder = getattr(self._local, "holder", None)
        own = (holder.leases if holder is not None else 0) + (1 if in_call else 0)
        with self._lock:
            if self.closing:
                return
            self.closing = True
            self._changed.notify_all()  # callers waiting for a connection give up now
            self._waiting += 1  # so that every release wakes this
            finished = self._changed.wait_for(lambda: self._in_use <= own, timeout)
            running = self._in_use - own
            self._closed = True  # no commit starts from now on
            # Closing the storage under a commit can hang threads for good
            # (seen with FileStorage: the cut-off commit never releases the
            # commit lock, and the next commit waits in tpc_begin forever).
            # Commits under way are bounded by the storage itself: wait.
            committed = self._changed.wait_for(
                lambda: not any(pair.conn.snaptree_committing for pair in self._pairs),
                COMMIT_WAIT,
            )
            self._waiting -= 1
            kept = list(self._idle)
            self._idle.clear()
            for pair in kept:
                self._forget(pair)
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
        for pair in kept:
            pair.conn.close()
        self.db.close()
