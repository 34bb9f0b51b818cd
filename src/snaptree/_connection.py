"""A ZODB connection that knows which thread owns it.

ZODB lets any thread touch any loaded object; the change then joins whatever
transaction the object's connection is in at that moment, possibly another
thread's, or no transaction at all. snaptree hands each connection to exactly
one thread for one transaction, so it can refuse such changes outright.
"""

from __future__ import annotations

import threading

from ZODB.Connection import Connection

from .errors import MisuseError, WrongThreadError

_IDLE = 0  # thread idents are never 0 on CPython


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

    def release(self) -> None:
        self._snaptree_owner = _IDLE

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
        self.check_owner(obj)
        super().register(obj)


def check_writable(obj: object) -> None:
    """Raise WrongThreadError if *obj* is not owned by the calling thread's transaction."""
    jar = getattr(obj, "_p_jar", None)
    if jar is not None and isinstance(jar, OwnedConnection):
        jar.check_owner(obj)
