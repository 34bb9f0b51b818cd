"""A ZODB connection that knows which thread owns it, and which commit is the store's.

ZODB lets any thread touch any loaded object; the change then joins whatever
transaction the object's connection is in at that moment, possibly another
thread's, or no transaction at all. snaptree hands each connection to exactly
one thread for one transaction, so it can refuse such changes outright.

Likewise ZODB lets any code commit a connection's transaction
(``obj._p_jar.transaction_manager.commit()``); inside a store call that
commits half of what the call means to do. The connection takes part in a
commit only when the store says it commits (:attr:`OwnedConnection.snaptree_committing`).
"""

from __future__ import annotations

import threading
from typing import Any

from persistent.interfaces import UPTODATE
from ZODB.Connection import Connection
from ZODB.POSException import InvalidObjectReference
from ZODB.utils import z64

from ._guards import misuse_error
from ._held import held as _held
from .errors import MisuseError, UnstorableValueError, WrongThreadError
from .paths import path_of

_IDLE = 0  # thread idents are never 0 on CPython
_get_ident = threading.get_ident


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
    #: Set by the store while it commits the call's transaction: the one commit allowed.
    snaptree_committing = False
    #: How the call's function ended, or tried to end, the call's transaction itself.
    snaptree_misuse: str | None = None

    def claim(self, *, read_only: bool = False) -> None:
        """Hand the connection to the calling thread for one call."""
        self._snaptree_owner = _get_ident()
        self._snaptree_read_only = read_only
        self.snaptree_committing = False
        self.snaptree_misuse = None
        try:
            _held.stack.append(self)
        except AttributeError:  # the thread's first
            _held.stack = [self]

    def release(self) -> None:
        self._snaptree_owner = _IDLE
        stack = _held.stack
        if stack and stack[-1] is self:
            stack.pop()
        elif self in stack:  # leases ended out of order
            stack.remove(self)

    def commit(self, transaction: object) -> None:
        """Commit changes only when the store commits: another commit would commit half a call.

        Refused before any change is handed to the storage (ZODB then
        aborts the two-phase commit), so nothing is written. Outside store
        calls (ZODB creating the root of a new database) commits are ZODB's.
        """
        if not self.snaptree_committing and self._snaptree_owner != _IDLE:
            self.snaptree_misuse = self.snaptree_misuse or (
                "tried to commit the store's transaction itself"
            )
            raise misuse_error(self.snaptree_misuse)
        super().commit(transaction)

    def setstate(self, obj: object) -> None:
        """Load a ghost's state, unless another thread's call has the connection.

        A node kept from a call and read from another thread while the
        connection serves someone's call would load into that call's cache
        from two threads at once (a connection is not thread-safe). An idle
        connection loads as ZODB does (opening a database reads its root so).
        """
        owner = self._snaptree_owner
        if owner != _IDLE and owner != _get_ident():
            raise _read_refused(obj, owner)
        super().setstate(obj)

    def check_owner(self, obj: object) -> None:
        owner = self._snaptree_owner
        me = _get_ident()
        if owner == me and not self._snaptree_read_only:
            return  # the common case, first: every change to a node asks
        if self._snaptree_read_only and owner == me:
            raise MisuseError(
                f"{type(obj).__name__} was changed inside a snapshot; snapshots are "
                "read-only: make changes with store.run() or store.transaction()"
            )
        if owner != me:
            where = "after its transaction ended" if owner == _IDLE else "from another thread"
            raise WrongThreadError(
                f"{type(obj).__name__} was changed {where}; persistent objects belong to "
                "the store.run()/store.transaction() call that loaded them: change them "
                "inside that call, or load them again in a new one"
            )

    def _store_objects(self, writer: Any, transaction: Any) -> None:
        """ZODB's store of one object and the new objects it reaches, undone whole if it fails.

        ZODB gives a new object its oid and this connection while pickling
        the object that refers to it, and adds it to what the abort undoes
        only when its own turn to be stored comes. If storing fails before
        then (a ConflictError from the referring object's store, a value
        that cannot be pickled), the abort leaves the new object looking
        stored; a retry that assigns the same object again (an import
        linking what it built, an application assigning a node it made
        outside its function) then writes only a reference to it, and the
        object is lost. So here every new object not stored yet is given back
        its ``_p_jar`` and ``_p_oid`` of None, as the abort does for the others.
        """
        walk = _Walk(writer)
        try:
            Connection._store_objects(self, walk, transaction)
        except InvalidObjectReference as exc:
            error = _foreign_node(walk.current, exc)  # while the tree still holds it
            self._forget_unstored(walk, writer)
            raise error from exc
        except BaseException:
            self._forget_unstored(walk, writer)
            raise

    def _forget_unstored(self, walk: _Walk, writer: Any) -> None:
        """Give the new objects not stored yet their jar and oid of None (_store_objects)."""
        for obj in (walk.current, *writer._stack):
            if (
                obj is not None
                and obj._p_jar is self
                and getattr(obj, "_p_serial", z64) == z64
                and self._cache.get(obj._p_oid) is not obj
            ):
                self._creating.pop(obj._p_oid, None)
                del obj._p_jar
                del obj._p_oid

    def register(self, obj: object) -> None:
        if self._snaptree_owner != _get_ident() or self._snaptree_read_only:
            try:
                self.check_owner(obj)
            except MisuseError:
                _discard_refused_change(obj)
                raise
        Connection.register(self, obj)


class _Walk:
    """An ObjectWriter that remembers which object it handed out last (see _store_objects).

    It iterates the writer's stack of objects to store itself, as ZODB's
    ``NewObjectIterator`` does (``ZODB.serialize``, checked in ZODB 6): one
    Python call per object instead of a generator around that iterator.
    """

    __slots__ = ("_stack", "current", "serialize")

    def __init__(self, writer: Any) -> None:
        self._stack = writer._stack
        self.serialize = writer.serialize  # the writer's own, called as it is
        self.current: Any = None

    def __iter__(self) -> _Walk:
        return self

    def __next__(self) -> Any:
        stack = self._stack
        if stack:
            obj = self.current = stack.pop()
            return obj
        raise StopIteration


def _foreign_node(holder: Any, exc: InvalidObjectReference) -> UnstorableValueError:
    """The error for *holder*, being stored, holding an object of another connection.

    Conversion refuses such a node when it is assigned, but a new node made
    from a snapshot's nodes (``snap_list[0:2]``) holds them legitimately
    until it is stored; ZODB refuses the reference when the commit pickles it.
    """
    foreign = exc.args[-1] if exc.args else None
    return UnstorableValueError(
        path_of(holder) or "",
        f"this {type(holder).__name__} holds a {type(foreign).__name__} of another "
        "transaction (a snapshot, another store call or another database); store a "
        "plain copy made with snaptree.to_plain() instead",
    )


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


def check_readable(obj: object) -> None:
    """Raise WrongThreadError unless *obj* is read inside the call that has its connection.

    After the call ended, a loaded node keeps whatever the connection's
    cache held then: another thread's later commits are not in it until
    the connection's next call, so a kept node reads silently stale
    values. From another thread while the connection serves a call, it
    shows that call's changes before they are committed (and perhaps
    never are). A plain dict kept in a variable has neither problem, so
    the read is refused instead. Nodes not in a store, and objects of
    connections that are not snaptree's, are read as they are.
    """
    jar = obj._p_jar  # type: ignore[attr-defined]
    if type(jar) is OwnedConnection and jar._snaptree_owner != _get_ident():
        raise _read_refused(obj, jar._snaptree_owner)


def _read_refused(obj: object, owner: int) -> WrongThreadError:
    """The error for reading *obj* while its connection's owner is *owner*, not this thread."""
    if owner == _IDLE:
        where = "after the call that loaded it ended"
        why = "it holds what was committed then, not what other threads committed since"
    else:
        where = "from another thread while a call has its connection"
        why = "it would show that call's changes before they are committed"
    return WrongThreadError(
        f"{type(obj).__name__} was read {where}: {why}. Persistent objects belong "
        "to the store.run()/store.transaction()/store.snapshot() call that loaded "
        "them: read them inside a call (results come back as plain copies), or "
        "keep the plain copy a call returns"
    )


def check_writable(obj: object) -> None:
    """Raise WrongThreadError if *obj* is not owned by the calling thread's transaction."""
    jar = getattr(obj, "_p_jar", None)
    if type(jar) is OwnedConnection:
        if jar._snaptree_owner == _get_ident() and not jar._snaptree_read_only:
            return  # the common case, first: every change to a node asks
        jar.check_owner(obj)
    elif jar is not None and isinstance(jar, OwnedConnection):
        jar.check_owner(obj)
