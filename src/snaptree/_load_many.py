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
#: The most objects one request may name (the server refuses more): about 15 ms of the
#: server's loop for small objects, as long as a commit holds it.
MOST_PER_REQUEST = 1000
#: An answer stops once its states reach this many bytes, and the rest is asked for
#: again: ZEO's client joins the pieces of one message in a way whose cost grows with
#: the square of its size (a 40 MB answer took 10 s), and its I/O thread, which every
#: thread of the process needs for its own calls, does nothing else meanwhile.
MOST_BYTES_PER_ANSWER = 1 << 20
#: Seconds to wait for an answer before loading its objects one at a time instead.
_ANSWER_TIMEOUT = 60.0


def serves_load_many(storage: Any) -> bool:
    """Whether *storage* is a ZEO client whose server, as of now, answers LOAD_MANY.

    The server is asked (``get_info``, one round trip): the answer ZEO's
    ClientStorage keeps from the connection (``_info``) is each server's
    merged into the ones before (checked against ZEO 6.2), so a snaptree
    server's flag would outlive a reconnection to a stock server, which
    drops a client that calls a method it does not list.
    """
    if not _is_zeo_client(storage):
        return False
    try:
        info = storage._server.call("get_info")
    except Exception:  # not connected: the export's loads will say so
        return False
    return isinstance(info, dict) and bool(info.get(LOAD_MANY))


@contextmanager
def loading_many(connection: Any) -> Iterator[None]:
    """While the block runs, *connection*'s prefetches ask for many objects at once.

    Only through a ZEO client, and only if its server answers LOAD_MANY
    when the first prefetch comes. The connection's storage adapter
    (``Connection._storage``, checked against ZODB 6.4: the one attribute
    through which a connection loads and prefetches) is wrapped for the
    block and put back after it.
    """
    storage = connection.db().storage
    adapter = getattr(connection, "_storage", None)
    if not _is_zeo_client(storage) or _before(adapter) is None:
        yield
        return
    loads = _ManyLoads(adapter, storage)
    connection._storage = loads
    try:
        yield
    finally:
        if connection._storage is loads:  # a savepoint would have put its own in place
            connection._storage = adapter


def _is_zeo_client(storage: Any) -> bool:
    """Whether *storage* is ZEO 6.2's ClientStorage, with the two private parts used here."""
    return (
        type(storage).__module__.startswith("ZEO.")
        and hasattr(getattr(storage, "_server", None), "call")
        and hasattr(getattr(storage, "_cache", None), "loadBefore")
    )


def _before(adapter: Any) -> bytes | None:
    """The tid *adapter* loads before: ``_start`` now, ``_before`` in a past state."""
    before = getattr(adapter, "_start", None) or getattr(adapter, "_before", None)
    return before if isinstance(before, bytes) else None


class _ManyLoads:
    """A connection's storage adapter whose prefetch asks for many objects in one request.

    Every other attribute is the adapter's. Answers wait in ``_ready``
    until the connection loads their object (each is taken once); requests
    still in flight are in ``_pending``, and a load of one of their objects
    waits for the answer. Whether the server answers LOAD_MANY is asked at
    the first prefetch (an export that prefetches nothing asks nothing).
    """

    def __init__(self, adapter: Any, storage: Any) -> None:
        self._adapter = adapter
        self._storage = storage
        self._serves: bool | None = None
        # What ClientStorage.loadBefore looks in first (ZEO 6.2): a state found there is
        # taken from it as that load would, not asked of the server again.
        self._cache_load = storage._cache.loadBefore
        self._ready: dict[bytes, tuple[bytes, bytes, bytes]] = {}  # oid: (before, data, serial)
        self._pending: dict[bytes, tuple[list[bytes], bytes, Any]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)

    def prefetch(self, oids: Iterable[bytes]) -> None:
        if self._serves is None:
            self._serves = serves_load_many(self._storage)
        before = _before(self._adapter)
        if not self._serves or before is None:
            prefetch = getattr(self._adapter, "prefetch", None)  # a past state's has none
            if prefetch is not None:
                prefetch(oids)
            return
        wanted: dict[bytes, None] = {}  # in order, each once: a node may be in two places
        for oid in oids:
            if oid in wanted or oid in self._ready or oid in self._pending:
                continue
            cached = self._cache_load(oid, before)
            if cached is None:
                wanted[oid] = None
            else:
                self._ready[oid] = (before, cached[0], cached[1])
        self._ask(list(wanted), before)

    def _ask(self, oids: list[bytes], before: bytes, per_request: int = MOST_PER_REQUEST) -> None:
        for start in range(0, len(oids), per_request):
            asked = oids[start : start + per_request]
            try:
                # ZEO 6.2's ClientRunner.call; wait=False gives a concurrent future
                answer = self._storage._server.call(LOAD_MANY, asked, before, wait=False)
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
        """Wait for *request*'s answer and keep its states; ask again for what it left out.

        The server answers the first objects asked for, up to
        MOST_BYTES_PER_ANSWER; the rest is asked for at once, in requests of
        as many objects as this answer held (large objects: several requests
        in flight, as ZEO's own prefetch would have). None if the request
        failed: the objects are then loaded one at a time, with ZEO's own errors.
        """
        asked, before, answer = request
        for oid in asked:
            self._pending.pop(oid, None)
        try:
            states = answer.result(_ANSWER_TIMEOUT)
        except Exception:
            return
        if not isinstance(states, list | tuple) or not 0 < len(states) <= len(asked):
            return
        for oid, state in zip(asked, states, strict=False):
            if state is not None:  # (data, serial, next serial), as loadBefore answers
                self._ready[oid] = (before, state[0], state[1])
        if len(states) < len(asked) and before == _before(self._adapter):
            self._ask(asked[len(states) :], before, len(states))
