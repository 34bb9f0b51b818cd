"""Guards around a store call's transaction: ways of ending it that would lose changes silently.

Code ported from plain ZODB ends transactions itself: ``transaction.commit()``
on the thread's global manager, or through an object's jar. Inside a store
call the first does nothing to the store's changes and the second commits
or drops half of them, so both become a :class:`~snaptree.MisuseError`
naming what to remove.
"""

from __future__ import annotations

import threading
from typing import Any

import transaction
from transaction.interfaces import NoTransaction

from .errors import MisuseError


class GlobalTransactionGuard:
    """Notices ``transaction.commit()`` and friends on a thread's *global* manager during a call.

    Code ported from plain ZODB commits through the global manager. Inside
    a store call that does nothing to the store's changes (they belong to the
    call's own manager), so it is an error rather than a silent no-op.

    One guard per thread and store, registered once with the thread's
    global manager and listening only while the thread is inside a call
    (:attr:`active`): registering per call cost a tenth of a small commit,
    and registering reports the global transaction the thread may already
    hold (code that called ``transaction.get()`` earlier) as if the call
    had begun it.
    """

    __slots__ = ("__weakref__", "active", "used")

    def __init__(self) -> None:
        self.active = False
        self.used: str | None = None

    def newTransaction(self, txn: Any) -> None:  # noqa: N802 - ISynchronizer
        if self.active and self.used is None:
            self.used = "transaction.begin()"

    def beforeCompletion(self, txn: Any) -> None:  # noqa: N802
        if self.active and self.used is None:
            self.used = "transaction.commit() or transaction.abort()"

    def afterCompletion(self, txn: Any) -> None:  # noqa: N802
        pass

    def error(self) -> MisuseError:
        return MisuseError(
            f"{self.used} was called inside a store call; it acts on the thread's "
            "global transaction, not on the store's, so it would do nothing; remove "
            "it and let store.run()/store.transaction() commit"
        )


class ThreadCalls:
    """Per thread: whether it is inside a write call of one store, and its global guard.

    A write call started inside another one of the same store in the same
    thread is refused: the inner call would commit on its own, separately
    from the outer one, half of what the outer call means to do.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def enter(self) -> GlobalTransactionGuard:
        """Mark the thread as inside a write call; its global guard, armed."""
        try:
            guard = self._local.guard
        except AttributeError:  # the thread's first call
            guard = self._local.guard = GlobalTransactionGuard()
            transaction.manager.registerSynch(guard)  # the thread's own manager
        if guard.active:
            raise MisuseError(
                "store.run()/store.transaction() called inside another one in the same "
                "thread; the inner call would commit separately from the outer one: "
                "call the inner function directly with the root you already have"
            )
        guard.active = True
        guard.used = None
        return guard

    def inside(self) -> bool:
        """Whether the calling thread is inside a write call."""
        guard = getattr(self._local, "guard", None)
        return guard is not None and guard.active

    def current(self) -> GlobalTransactionGuard:
        """The guard of the call the calling thread is in (after :meth:`enter`)."""
        return self._local.guard  # type: ignore[no-any-return]


def call_misuse(conn: Any, tm: Any, txn: Any) -> str | None:
    """How the function of a call ended the call's transaction *txn* itself, if it did.

    A commit through ``obj._p_jar.transaction_manager`` is refused by the
    connection before anything is written (it records that); an abort
    cannot be stopped, and leaves later changes outside any transaction,
    in a connection the next call would commit, so the call must end in
    an error and its connection be cleaned: the transaction the call
    began is then no longer its manager's (aborted, or another one begun).
    """
    if conn.snaptree_misuse is None and not conn.snaptree_committing:
        try:
            current = tm.get()
        except NoTransaction:
            conn.snaptree_misuse = "aborted the store's transaction itself"
        else:
            if current is not txn:
                conn.snaptree_misuse = (
                    "began a transaction of its own on the store's transaction manager"
                )
    return conn.snaptree_misuse  # type: ignore[no-any-return]


def misuse_error(what: str) -> MisuseError:
    """The error of a call whose function ended its own transaction (*what* it did)."""
    return MisuseError(
        f"the function {what} (through obj._p_jar.transaction_manager or the "
        "transaction object); nothing of this call was committed and its "
        "changes were discarded: store.run() and store.transaction() commit when the "
        "function or block ends, so remove that call (raise an exception to abandon "
        "a call; use one store.run() per commit)"
    )


def check_guards(calls: GlobalTransactionGuard, conn: Any, tm: Any, txn: Any) -> None:
    """Raise the MisuseError of a global or through-the-jar end of the call's transaction."""
    if calls.used:
        raise calls.error()
    misuse = call_misuse(conn, tm, txn)
    if misuse:
        raise misuse_error(misuse)
