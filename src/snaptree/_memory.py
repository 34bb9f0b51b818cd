"""An in-memory storage that resolves conflicts like FileStorage does.

ZODB's MappingStorage raises ConflictError on every concurrent change to one
object, even where the object's class can merge the changes (BTree buckets,
BTrees.Length). Tests of ``memory://`` would then show conflicts that no
real storage has. This subclass adds the standard conflict-resolution step.
"""

from __future__ import annotations

from typing import Any

from ZODB.ConflictResolution import ConflictResolvingStorage
from ZODB.MappingStorage import MappingStorage
from ZODB.POSException import StorageTransactionError


class ResolvingMappingStorage(ConflictResolvingStorage, MappingStorage):
    """MappingStorage plus conflict resolution.

    Relies on MappingStorage's private ``_data``, ``_tdata`` and
    ``_transaction`` (checked against ZODB 6.x), the same attributes its own
    ``store`` uses.
    """

    def store(self, oid: bytes, serial: bytes, data: bytes, version: str, transaction: Any) -> None:
        assert not version, "versions are not supported"
        if transaction is not self._transaction:
            raise StorageTransactionError(self, transaction)
        history = self._data.get(oid)
        if history:
            committed = history.maxKey()
            if serial != committed:
                # raises ConflictError itself when the class cannot merge
                data = self.tryToResolveConflict(oid, committed, serial, data)
                self._resolved.append(oid)
        self._tdata[oid] = data

    def tpc_begin(self, transaction: Any, tid: bytes | None = None) -> None:
        super().tpc_begin(transaction, tid)
        self._resolved: list[bytes] = []

    def tpc_vote(self, transaction: Any) -> list[bytes]:
        super().tpc_vote(transaction)
        # Tell the connection which objects now differ from what it wrote.
        return self._resolved
