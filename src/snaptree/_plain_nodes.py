"""What the writers of plain data (pickle, json) do at each node of the tree they write.

Both write the tree as plain dicts and lists, without a memo (a memo would
hold every container written until the end), so a node reached from
several places is written once per place. Each node written is counted by
a :class:`NodeCount`, which

- trims the ZODB cache every few thousand nodes, so that a tree far larger
  than the cache is written in bounded memory;
- refuses a dump that sharing blows up. Ten nodes built as
  ``x = []; 9 times: x = [x] * 10`` are a dump of 10**9 nodes that never
  ends and fills the disk. A tree without sharing writes each node once,
  and a node's oid is an integer that no other node has, so it writes at
  most (largest oid met + 1) nodes: the bound, ``max(SHARING_FLOOR,
  SHARING_FACTOR x largest oid met)``, never refuses one.

A node ZODB could not load (its class cannot be imported here) stops the
writer too: :func:`broken_object_error` says why and what to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from BTrees.OOBTree import OOBTree, OOBucket
from persistent import Persistent
from ZODB.Connection import Connection
from ZODB.utils import u64

from ._storage_facts import is_client_of_a_server
from .errors import ExportError
from .tree import FlatMapping, List, Set

#: Nodes written between two trims of the ZODB cache (and checks of the bound).
GC_EVERY = 2000
#: A dump may always write this many nodes, however small the largest oid ...
SHARING_FLOOR = 1_000_000
#: ... and this many times the largest oid it met as an integer, if that is more.
SHARING_FACTOR = 10

_NO_OID = b"\0" * 8


class NodeCount:
    """The nodes one writer has written: trims the cache and bounds the copies sharing makes.

    *connection* is the snapshot's (None: nothing to trim); *where* (the
    subtree) and *format* name the export in the refusal.
    """

    def __init__(self, connection: Connection | None, where: str, format: str) -> None:  # noqa: A002
        self.nodes = 0
        self._connection = connection
        self._where = where
        self._format = format
        #: The largest oid met, as 8 big-endian bytes: they sort as the integers do.
        self._largest = _NO_OID
        self._next_check = GC_EVERY

    def add(self, oid: bytes | None) -> None:
        """One node written, whose oid is *oid*."""
        self.nodes += 1
        if oid is not None and oid > self._largest:
            self._largest = oid
        if self.nodes >= self._next_check:
            self._check()

    def add_many(self, nodes: int, largest_oid: bytes) -> None:
        """*nodes* nodes written at once (a reused fragment), the largest of their oids given."""
        self.nodes += nodes
        if largest_oid > self._largest:
            self._largest = largest_oid
        if self.nodes >= self._next_check:
            self._check()

    def rewind(self, nodes: int) -> None:
        """Forget what was counted since the count was *nodes* (a block given up, written anew)."""
        self.nodes = nodes

    def _check(self) -> None:
        self._next_check = self.nodes + GC_EVERY
        if self._connection is not None:
            self._connection.cacheGC()
        limit = max(SHARING_FLOOR, SHARING_FACTOR * u64(self._largest))
        if self.nodes > limit:
            raise ExportError(
                f"cannot export {self._where} as {self._format}: it reaches the same nodes from "
                f"so many places that the dump, which holds a copy of a node for each place it "
                f"is reached from, passed {limit:,} nodes ({SHARING_FACTOR} times the largest "
                f"object id met, at least {SHARING_FLOOR:,}) and would not end; nothing was "
                "written. Export it in the zodb format, which keeps each node once"
            )


def broken_object_error(obj: Any, path: str = "") -> ExportError:
    """Why an object ZODB could not load (a ``ZODB.broken.Broken``) stops an export.

    ZODB gives an object whose class this process cannot import as a broken
    stand-in that holds the state but not the class; a dump of it would load
    as that stand-in, not as the user's object. The usual cause is a class
    defined in the application's ``__main__``, which the exporter process
    (another program) cannot import.
    """
    kind = type(obj)
    name = f"{kind.__module__}.{kind.__name__}"
    oid = getattr(obj, "_p_oid", None)
    where = f"{path}: " if path else ""
    which = f" (oid 0x{oid.hex()})" if isinstance(oid, bytes) else ""
    return ExportError(
        f"{where}cannot export a {name}{which}: this process cannot import the class "
        f"{name}, so ZODB gives the object as a broken stand-in, and a dump would hold "
        "that instead of your object. A class defined in the application's __main__ (its "
        "script) cannot be imported by another process such as the exporter: define it "
        "in an importable module (myapp/models.py), or export in the application's own "
        "process (Exporter(..., process=False))"
    )


# -- loading ahead from a server ------------------------------------------------------

#: Most objects one :meth:`Prefetcher.load` brings in (a window of the tree ahead of
#: the writer): enough to make round trips rare, few enough for any client cache.
#: Never more than half the connection's cache: the writer trims the cache as it
#: goes, and what it trims before reaching it would be unpickled twice.
PREFETCH_WINDOW = 20_000
#: Objects asked for in one request: ZEO sends them pipelined, RelStorage in one query.
_BATCH = 1000
#: Buckets of a large mapping taken per window (up to 30 items each).
_BUCKETS_PER_WINDOW = 64


class Prefetcher:
    """Loads the nodes a writer is about to reach in batches, where each load is a round trip.

    A FileStorage reads an object from a local file; ZEO and RelStorage ask a
    server, once per object: a cold export of 10,000 objects one object at a
    time took 5 to 20 times as long through them as from the file
    (docs/export.md, "Exports through a server"). ZODB's public
    ``Connection.prefetch(oids)`` asks for many objects in one go (ZEO
    pipelines the requests, RelStorage makes one query per thousand), and
    later loads find them in the client's cache. The writers walk the tree
    depth first; this walks it breadth first a window ahead of them: a large
    mapping's buckets are found from its interior nodes, a window of them is
    fetched in one batch, then the nodes in their values, level by level, up
    to a window of objects, before the writer takes their items. For a
    storage without a server it does nothing, at no cost.
    """

    def __init__(self, connection: Connection | None) -> None:
        self.enabled = connection is not None and is_client_of_a_server(connection.db().storage)
        self._connection = connection
        cached = connection.db().getCacheSize() if connection is not None else PREFETCH_WINDOW
        self._window = max(_BATCH, min(PREFETCH_WINDOW, cached // 2))

    def load(self, nodes: list[Any]) -> None:
        """Load *nodes* and the nodes under them, breadth first, asking for them in batches.

        A batch is asked for once a full one is known, so the server works
        on it while this process unpickles what came before, or when all
        that was asked for has been read. Asking as soon as a few were known
        (a bucket's values, say) made a cold export through PostgreSQL, where
        each batch is a query, take 272 queries for 10,000 objects instead of
        38. The walk stops growing at a window's worth of objects: the writer
        gets to the rest later, and its own windows fetch them.
        """
        assert self._connection is not None
        prefetch = self._connection.prefetch
        queue = list(nodes)
        asked = done = 0
        while done < len(queue):
            pending = len(queue) - asked
            if pending >= _BATCH or (pending and done >= asked):
                end = min(len(queue), asked + _BATCH)
                ghosts = [node for node in queue[asked:end] if node._p_changed is None]
                if ghosts:
                    prefetch(ghosts)
                asked = end
            node = queue[done]
            done += 1
            if len(queue) < self._window:
                queue += _nodes_under(node)  # loads it
            elif node._p_changed is None:
                node._p_activate()

    def items(self, mapping: Any) -> Iterator[tuple[Any, Any]]:
        """The items of a snaptree Mapping (a BTree), loaded a window of buckets at a time."""
        buckets = self._buckets(mapping)
        if buckets is None:  # empty, or one bucket held inline
            self._load_ghosts(_nodes_under(mapping))
            yield from mapping.items()
            return
        for start in range(0, len(buckets), _BUCKETS_PER_WINDOW):
            window = buckets[start : start + _BUCKETS_PER_WINDOW]
            self.load(window)
            for bucket in window:
                yield from bucket.items()

    def values(self, values: list[Any]) -> Iterator[Any]:
        """*values* (a list's), the nodes among them loaded a window at a time."""
        if len(values) <= _BUCKETS_PER_WINDOW:
            self._load_ghosts([value for value in values if isinstance(value, Persistent)])
            yield from values
            return
        for start in range(0, len(values), self._window):
            window = values[start : start + self._window]
            self.load([value for value in window if isinstance(value, Persistent)])
            yield from window

    def _load_ghosts(self, nodes: list[Any]) -> None:
        """:meth:`load` *nodes* if one of them is a ghost (a small node's children).

        Checking only the children keeps a warm export from walking every
        subtree once per level above it; the windows of large nodes above
        walk theirs in full, and find what a walk cut short left behind.
        """
        for node in nodes:
            if node._p_changed is None:
                self.load(nodes)
                return

    def _buckets(self, tree: Any) -> list[Any] | None:
        """A BTree's buckets in key order, its interior nodes fetched a level at a time."""
        tree._p_activate()
        state = tree.__getstate__()
        if state is None or len(state) == 1:
            return None
        level = [tree]
        while True:
            children = [child for node in level for child in node.__getstate__()[0][::2]]
            if not isinstance(children[0], OOBTree):
                return children
            self.load(children)  # interior nodes: a few per thousand buckets
            level = children


def _nodes_under(node: Any) -> list[Any]:
    """The persistent objects *node*'s own state holds."""
    if isinstance(node, OOBTree | OOBucket):
        state = node.__getstate__()
        if state is None:
            return []
        if isinstance(node, OOBucket):
            values = state[0][1::2]
        elif len(state) == 1:  # one bucket held inline
            values = state[0][0][0][1::2]
        else:
            values = state[0][::2]
    elif isinstance(node, FlatMapping):
        values = node.data.values()
    elif isinstance(node, List | Set):
        values = node.data
    else:
        return []
    return [v for v in values if isinstance(v, Persistent)]
