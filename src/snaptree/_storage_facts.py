"""What a storage can tell about itself where ZODB has no public API for it.

Every private attribute snaptree reads from ZODB or RelStorage is read here,
in one place, with the versions it was checked against; so is the layout of
a BTree's pickled state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from BTrees.Interfaces import IBTree
from ZODB.Connection import Connection
from ZODB.utils import p64, u64


def visible_tid(conn: Connection) -> bytes:
    """The tid of the last transaction a connection's current transaction can see.

    There is no public API for this. Checked against ZODB 6.x: a connection's
    ``_storage`` is an MVCCAdapterInstance whose ``_start`` is one past the
    visible tid, or a HistoricalStorageAdapter with ``_before``; storages
    that do MVCC themselves (RelStorage) answer ``lastTransaction()`` for
    their own snapshot.

    Checked against RelStorage 4.3, history-preserving and history-free: the
    connection's storage is a per-connection RelStorage instance whose
    ``lastTransaction()`` is the newest tid its poll saw, and the poll runs
    in the same database transaction as every later load, so the answer is
    the tid of exactly the state the snapshot reads (tests/test_postgres.py
    compares it with ``max(tid)`` in the database). The *shared* RelStorage
    behind ``DB.lastTransaction()`` is not polled and goes stale: do not use
    it to ask "what is the newest tid".
    """
    instance = conn._storage
    for name in ("_start", "_before"):
        bound = getattr(instance, name, None)
        if bound is not None:
            return p64(u64(bound) - 1)
    return instance.lastTransaction()


def keeps_history(storage: Any) -> bool:
    """False for storages that keep only current records (RelStorage history-free).

    RelStorage 4.3 has a public ``keep_history`` property; ZEO's ClientStorage
    says nothing and is taken to keep history (``snaptree serve`` serves a
    FileStorage, which does).
    """
    keep = getattr(storage, "keep_history", None)  # RelStorage history-free says False
    if keep is None:
        options = getattr(storage, "_options", None)
        keep = getattr(options, "keep_history", True)
    return bool(keep() if callable(keep) else keep)


def is_client_of_a_server(storage: Any) -> bool:
    """True for ZEO and RelStorage: another process may open the same URI at the same time."""
    return type(storage).__module__.startswith(("ZEO.", "relstorage."))


def btree_parts(tree: Any) -> Iterator[Any]:
    """The inner nodes and buckets a BTree keeps as persistent records of their own.

    A BTree small enough for one bucket keeps it inline (none here); a
    larger one is a tree of inner nodes (of the BTree's own class) over
    buckets, and a change to one key rewrites only its bucket. Anything that
    must cover "the whole mapping" (``read_current``, finding which mapping
    a conflicting bucket belongs to) needs these records too. Read from the
    pickled state, ``((child, key, child, ..., child), first_bucket)``:
    the format BTrees writes into every database (checked against BTrees
    6.5); reading it loads the nodes, not the values.
    """
    if not IBTree.providedBy(tree):
        return
    stack = [tree]
    while stack:
        state = stack.pop().__getstate__()
        if state is None or len(state) < 2:
            continue  # empty, or a single bucket stored inline
        children, first_bucket = state
        bucket_type = type(first_bucket)
        for child in children[::2]:
            yield child
            if type(child) is not bucket_type:
                stack.append(child)


def snapshot_load(conn: Connection) -> Callable[[bytes], tuple[bytes, bytes]]:
    """The connection's own ``load``: a record as its snapshot sees it, read raw.

    No public API gives it. Checked against ZODB 6.4: ``Connection._storage``
    is the connection's MVCC view (an MVCCAdapterInstance, a
    HistoricalStorageAdapter for a snapshot in the past, or RelStorage's
    per-connection instance), whose ``load(oid)`` returns ``(data, serial)``.
    """
    return conn._storage.load  # type: ignore[no-any-return]
