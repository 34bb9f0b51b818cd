"""The ZEO server of ``snaptree serve``: ZEO's own, answering one request more.

:data:`snaptree._load_many.LOAD_MANY` gives the states of many objects as
of one snapshot in one answer, which a cold export through the server needs
(see :mod:`snaptree._load_many`). Everything else is ZEO's. ZEO serves only
the methods it lists (``ZEO.StorageServer.registered_methods``) and closes
the connection of a client that calls another one; its per-client handler
(``ZEOStorage``) is made by ``StorageServer.create_client_handler``
(checked against ZEO 6.2).
"""

from __future__ import annotations

from typing import Any

from ZEO.StorageServer import StorageServer, ZEOStorage, registered_methods
from ZODB.POSException import POSKeyError

from ._load_many import LOAD_MANY, MOST_BYTES_PER_ANSWER, MOST_PER_REQUEST

_P64_SIZE = 8


class SnaptreeStorageServer(StorageServer):  # type: ignore[misc]
    """ZEO's StorageServer whose clients may also call LOAD_MANY."""

    def create_client_handler(self) -> ZEOStorage:
        return _ZEOStorage(self, self.read_only)


class _ZEOStorage(ZEOStorage):  # type: ignore[misc]
    def setup_delegation(self) -> None:
        super().setup_delegation()
        self.connection.methods = registered_methods | {LOAD_MANY}

    def get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super().get_info()
        info[LOAD_MANY] = True
        return info

    def snaptree_load_before_many(self, oids: Any, before: Any) -> list[Any]:
        """``loadBefore(oid, before)`` of the first of *oids*; None where there is no such state.

        As many as fit in MOST_BYTES_PER_ANSWER (at least one): the client
        asks again for the rest. The request comes from the network: its
        shape is checked before anything is loaded, and an object the
        storage does not have is None (the client then loads it alone and
        gets ZODB's own error).
        """
        if not _eight_bytes(before):
            raise ValueError(f"{LOAD_MANY}: before must be 8 bytes")
        if not isinstance(oids, list | tuple) or len(oids) > MOST_PER_REQUEST:
            raise ValueError(f"{LOAD_MANY}: oids must be a list of at most {MOST_PER_REQUEST}")
        if not all(_eight_bytes(oid) for oid in oids):
            raise ValueError(f"{LOAD_MANY}: every oid must be 8 bytes")
        load = self.storage.loadBefore
        states: list[Any] = []
        size = 0
        for oid in oids:
            if size >= MOST_BYTES_PER_ANSWER:
                break
            try:
                state = load(oid, before)
            except POSKeyError:
                state = None
            states.append(state)
            if state is not None:
                size += len(state[0])
        self.stats.loads += len(states)
        return states


def _eight_bytes(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == _P64_SIZE
