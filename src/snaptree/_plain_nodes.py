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

from typing import Any

from ZODB.Connection import Connection
from ZODB.utils import u64

from .errors import ExportError

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
