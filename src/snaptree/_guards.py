"""Guards around a store call's transaction: ways of ending it that would lose changes silently.

Code ported from plain ZODB ends transactions itself: ``transaction.commit()``
on the thread's global manager, or through an object's jar. Inside a store
call the first does nothing to the store's changes and the second commits
or drops half of them, so both become a :class:`~snaptree.MisuseError`
naming what to remove.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import transaction

from .errors import MisuseError


class GlobalTransactionGuard:
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

    def __enter__(self) -> GlobalTransactionGuard:
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


class CallGuard:
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


class NestedCallGuard:
    """Refuses a write call started inside another one of the same store in the same thread.

    The inner call would commit on its own, separately from the outer one:
    half of what the outer call means to do, committed whatever the outer
    call does next.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    @contextmanager
    def outermost(self) -> Iterator[None]:
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
