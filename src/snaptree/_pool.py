"""Lending a database's connections to store calls, bounded, and closing the database safely.

Every call gets its own ZODB connection with its own explicit transaction
manager, so threads share nothing but the database. The pool counts the
connections lent: calls beyond its size wait (boundedly) instead of making
ZODB open more and warn. It also owns the end of the database's life:
``close`` refuses new leases, lets the calls holding one finish, and never
closes the storage under a commit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import transaction
from transaction.interfaces import NoTransaction
from ZODB import DB

from .errors import ArgumentError, Error, MisuseError, StoreClosedError

# The store's logger: closing is the store closing, whoever does the work.
log = logging.getLogger("snaptree.store")

#: Seconds ``close()`` waits for calls in flight before it closes the database anyway.
CLOSE_TIMEOUT = 30.0

#: Seconds ``close()`` then still waits for commits already under way to end.
COMMIT_WAIT = 60.0


class ConnectionPool:
    """Lends *db*'s connections, at most *size* at once, each with its own transaction manager."""

    def __init__(self, db: DB, *, source: str, size: int, timeout: float) -> None:
        self.db = db
        self.source = source
        self.timeout = timeout
        # One condition guards the free slots, the calls holding a connection,
        # the commits under way and the closing state.
        self._state = threading.Condition()
        self._free = size
        self._leased = 0
        self._committing = 0
        self._closing = False  # close() began: no connection is lent any more
        self._closed = False  # the database is (being) closed: nothing may commit
        self._local = threading.local()  # leases held by the current thread

    @property
    def closed(self) -> bool:
        """Whether the database is closed, or being closed: nothing may commit any more."""
        return self._closed

    def check_open(self) -> None:
        """Raise StoreClosedError once ``close`` began."""
        if self._closing:
            raise self.closed_error()

    def closed_error(self) -> StoreClosedError:
        state = "closed" if self._closed else "closing"
        return StoreClosedError(
            f"{self.source} is {state} (store.close() was called); nothing more can be "
            "read or committed through this Store: open it again with snaptree.open()"
        )

    @contextmanager
    def lease(
        self,
        *,
        at: bytes | None = None,
        read_only: bool = False,
        synchronizers: Iterable[Any] = (),
        wait: float | None = None,
    ) -> Iterator[tuple[Any, Any]]:
        """Borrow a connection (as of tid *at*, if given) with its own transaction manager.

        A thread that cannot get one within the pool's timeout (or *wait*)
        gets an error instead of waiting forever, and one waiting when the
        store closes gets StoreClosedError at once. *synchronizers* are
        registered with the new transaction manager before anything begins.
        """
        wait = self.timeout if wait is None else wait
        with self._state:
            if not self._state.wait_for(lambda: self._closing or self._free > 0, wait):
                raise Error(
                    f"no connection became free within {wait:g} s: all connections "
                    "are busy; raise pool_size or shorten long transactions"
                )
            if self._closing:
                raise self.closed_error()
            self._free -= 1
            self._leased += 1
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

    @contextmanager
    def committing(self) -> Iterator[None]:
        """Count a commit under way, so that ``close`` waits for it; refused once closed."""
        with self._state:
            if self._closed:
                raise self.closed_error()
            self._committing += 1
        try:
            yield
        finally:
            with self._state:
                self._committing -= 1
                self._state.notify_all()

    def close(self, timeout: float) -> None:
        """Refuse new leases, wait up to *timeout* s for the ones out, close the database.

        A commit already under way is never cut off in the middle: closing
        then waits up to COMMIT_WAIT more seconds for it. Closing twice is
        harmless; closing from inside a call does not wait for that call.
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
