"""A ZODB connection that knows which thread owns it.

ZODB lets any thread touch any loaded object; the change then joins whatever
transaction the object's connection is in at that moment, possibly another
thread's, or no transaction at all. snaptree hands each connection to exactly
one thread for one transaction, so it can refuse such changes outright.
"""

from __future__ import annotations

import threading

from persistent.interfaces import UPTODATE
from ZODB.Connection import Connection

from .errors import MisuseError, WrongThreadError

_IDLE = 0  # thread idents are never 0 on CPython

#: Per thread, the connections it holds for store calls, innermost last.
#: The conversion and the commit check ask for the innermost writable one: a
#: node created outside the tree during a store call belongs to that call's
#: transaction.
_held = threading.local()


class OwnedConnection(Connection):
    """Connection that refuses changes from any thread but its current owner.

    Installed as ``DB.klass`` (the attribute ZODB documents for choosing the
    connection class). ``register`` is the one call every persistent object
    makes when it is first changed in a transaction; for attribute changes
    persistent calls it *before* the change, so refusing there keeps the
    object intact. snaptree's own containers call :func:`check_writable`
    before they mutate, for the same reason.
    """

    _snaptree_owner = _IDLE
    _snaptree_read_only = False

    def claim(self, *, read_only: bool = False) -> None:
        self._snaptree_owner = threading.get_ident()
        self._snaptree_read_only = read_only
        _stack().append(self)

    def release(self) -> None:
        self._snaptree_owner = _IDLE
        stack = _stack()
        if self in stack:  # the last one claimed, unless leases ended out of order
            stack.remove(self)

    def check_owner(self, obj: object) -> None:
        owner = self._snaptree_owner
        if self._snaptree_read_only and owner == threading.get_ident():
            raise MisuseError(
                f"{type(obj).__name__} was changed inside a snapshot; snapshots are "
                "read-only: make changes with store.run() or store.transaction()"
            )
        if owner != threading.get_ident():
            where = "after its transaction ended" if owner == _IDLE else "from another thread"
            raise WrongThreadError(
                f"{type(obj).__name__} was changed {where}; persistent objects belong to "
                "the store.run()/store.transaction() call that loaded them: change them "
                "inside that call, or load them again in a new one"
            )

    def register(self, obj: object) -> None:
        try:
            self.check_owner(obj)
        except MisuseError:
            _discard_refused_change(obj)
            raise
        super().register(obj)


def _discard_refused_change(obj: object) -> None:
    """Turn *obj* back into a ghost, so that a refused change cannot be committed later.

    persistent calls ``register`` before an attribute assignment, but code that
    changes a plain attribute in place and then sets ``_p_changed`` (the usual
    idiom for a list attribute: ``self.items.append(x); self._p_changed = True``)
    has already changed the object when it is refused. The pooled connection
    would keep that state, and the next transaction to touch the object would
    commit it. ``register`` is only called on an object's first change in a
    transaction, so its state held no other uncommitted change: discarding it
    loses exactly the refused change, and the next access loads the committed
    state again. An object in use by C code (a BTree in the middle of an
    operation, state STICKY) is left alone: BTrees register before they write.
    """
    if getattr(obj, "_p_state", None) == UPTODATE:
        obj._p_invalidate()  # type: ignore[attr-defined]


def _stack() -> list[OwnedConnection]:
    stack = getattr(_held, "stack", None)
    if stack is None:
        stack = _held.stack = []
    return stack


def current_connection() -> OwnedConnection | None:
    """The connection of the store call the calling thread is in, if it can write; else None."""
    for conn in reversed(getattr(_held, "stack", ())):
        if not conn._snaptree_read_only:
            return conn
    return None


def check_writable(obj: object) -> None:
    """Raise WrongThreadError if *obj* is not owned by the calling thread's transaction."""
    jar = getattr(obj, "_p_jar", None)
    if jar is not None and isinstance(jar, OwnedConnection):
        jar.check_owner(obj)
