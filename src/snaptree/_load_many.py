"""Cold exports through ``snaptree serve``: many objects per round trip, straight to the export.

ZEO's ``Connection.prefetch`` sends one request per object (pipelined) and
stores every answer in the client's cache file in its I/O thread: a cold
pickle export of 10,000 objects through ZEO took 2.7 times as long as from
the file itself, and the client's cache alone (nothing asked of the server)
1.2 times (docs/benchmarks.md, "Cold exports through a server"). A server
started by ``snaptree serve`` also answers :data:`LOAD_MANY`: the states of
many objects as of one snapshot, in one request (:mod:`snaptree._zeo_storage`).
During an export the snapshot's connection asks it for what the export's
prefetcher names (except what the client's cache holds), and its loads
take the answers from here, not through the client's cache. A stock ZEO
server, which would drop a client that calls a method it does not know, is
never asked.

Why the answers are always the snapshot's: an answer is the server's
``loadBefore(oid, before)`` for the very ``before`` the connection's own
loads use, and it is used only while the connection still reads before that
tid; a state loaded before a given tid never changes. Anything else (an
object not answered, an error, a connection that moved on) is loaded as
ZODB would have loaded it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

#: The server method, and the key in the server's ``get_info`` that says it answers it.
LOAD_MANY = "snaptree_load_before_many"
#: The most objects one request may name (the server refuses more).
MOST_PER_REQUEST = 5000
#: Seconds to wait for an answer before loading its objects one at a time instead.
_ANSWER_TIMEOUT = 60.0


def serves_load_many(storage: Any) -> bool:
    """Whether *storage* is a ZEO client connected to a server that answers LOAD_MANY.

    ZEO's ClientStorage keeps the server's ``get_info`` answer in ``_info``
    (checked against ZEO 6.2): private, and the only place the client says
    what the server it is connected to offers.
    """
    info = getattr(storage, "_info", None)
    return isinstance(info, dict) and bool(info.get(LOAD_MANY))


@contextmanager
def loading_many(connection: Any) -> Iterator[None]:
    """While the block runs, *connection*'s prefetches ask the server for many objects at once.

    Does nothing unless the connection's storage serves LOAD_MANY. The
    connection's storage adapter (``Connection._storage``, checked against
    ZODB 6.4: the one attribute through which a connection loads and
    prefetches) is wrapped for the block and put back after it.
    """
    storage = connection.db().storage
    adapter = getattr(connection, "_storage", None)
    if adapter is None or not serves_load_many(storage) or _before(adapter) is None:
        yield
        return
    loads = _ManyLoads(adapter, storage)
    connection._storage = loads
    try:
        yield
    finally:
        if connection._storage is loads:  # a savepoint would have put its own in place
            connection._storage = adapter


def _before(adapter: Any) -> bytes | None:
    """The tid *adapter* loads before: ``_start`` now, ``_before`` in a past state."""
    before = getattr(adapter, "_start", None) or getattr(adapter, "_before", None)
    return before if isinstance(before, bytes) else None


class _ManyLoads:
    """A connection's storage adapter whose prefetch asks for many objects in one request.

    Every other attribute is the adapter's. Answers wait in ``_ready``
    until the connection loads their object (each is taken once); requests
    still in flight are in ``_pending``, and a load of one of their objects
    waits for the answer.
    """

    def __init__(self, adapter: Any, storage: Any) -> None:
        self._adapter = adapter
        self._call = storage._server.call  # ZEO 6.2's ClientRunner; wait=False gives a future
        # What ClientStorage.loadBefore looks in first (ZEO 6.2): a state found there is
        # taken from it as that load would, not asked of the server again.
        self._cache_load = storage._cache.loadBefore
        self._ready: dict[bytes, tuple[bytes, bytes, bytes]] = {}  # oid: (before, data, serial)
        self._pending: dict[bytes, tuple[list[bytes], bytes, Any]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)

    def prefetch(self, oids: Iterable[bytes]) -> None:
        before = _before(self._adapter)
        if before is None:
            return
        wanted = []
        for oid in oids:
            if oid in self._ready or oid in self._pending:
                continue
            cached = self._cache_load(oid, before)
            if cached is None:
                wanted.append(oid)
            else:
                self._ready[oid] = (before, cached[0], cached[1])
        if not wanted:
            return
        for start in range(0, len(wanted), MOST_PER_REQUEST):
            asked = wanted[start : start + MOST_PER_REQUEST]
            try:
                answer = self._call(LOAD_MANY, asked, before, wait=False)
            except Exception:  # disconnected: the loads will say so, or reconnect
                return
            request = (asked, before, answer)
            for oid in asked:
                self._pending[oid] = request

    def load(self, oid: bytes) -> tuple[bytes, bytes]:
        if oid in self._pending:
            self._receive(self._pending[oid])
        ready = self._ready.pop(oid, None)
        if ready is not None and ready[0] == _before(self._adapter):
            return ready[1], ready[2]
        return self._adapter.load(oid)  # type: ignore[no-any-return]

    def _receive(self, request: tuple[list[bytes], bytes, Any]) -> None:
        """Wait for *request*'s answer and keep the states in it (none if it failed)."""
        asked, before, answer = request
        for oid in asked:
            del self._pending[oid]
        try:
            states = answer.result(_ANSWER_TIMEOUT)
        except Exception:  # the objects are loaded one at a time, with ZEO's own errors
            return
        if not isinstance(states, list | tuple) or len(states) != len(asked):
            return
        for oid, state in zip(asked, states, strict=True):
            if state is not None:  # (data, serial, next serial), as loadBefore answers
                self._ready[oid] = (before, state[0], state[1])
