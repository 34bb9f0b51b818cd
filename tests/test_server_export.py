"""Exports through a server (ZEO, PostgreSQL) fetch objects in batches and write the same tree.

Through a server each load is a round trip, so exports ask for the nodes
ahead of the writer in batches (``Connection.prefetch``). These tests check
what that must never change: a cold export through a server, in every
format and with the fragment writer, holds exactly the tree a FileStorage
export of the same data holds, however the tree is shaped (a mapping over
many buckets and interior nodes, long lists, nesting deeper than a batch).
The fast test walks the same code against a FileStorage, told it is a
server, with windows small enough to be cut short everywhere; the real
servers are slow tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from ZEO.ClientStorage import ClientStorage
from ZEO.Exceptions import ServerException
from ZEO.StorageServer import StorageServer
from ZODB.Connection import Connection
from ZODB.FileStorage import FileStorage

import snaptree
from _servers import postgres_database, postgres_uri, zeo_server
from snaptree import _load_many, _pickle_fragments, _plain_nodes, _zeo_storage, _zexp
from snaptree._load_many import LOAD_MANY, MOST_PER_REQUEST, serves_load_many
from snaptree.exports import FragmentCaches
from snaptree.server import STORAGE_NAME, Server

SUFFIX = {"pickle": ".pickle", "json": ".json", "zodb": ".zexp"}


def _fill(root: Any) -> None:
    root["accounts"] = {f"a{i:05}": {"balance": i, "history": [i, {"at": i}]} for i in range(500)}
    # Enough keys for a BTree of interior nodes over buckets (9000: three of them).
    root["wide"] = {i: i * i for i in range(9000)}
    root["log"] = [{"n": n, "more": [n]} for n in range(300)]  # a long list of nodes
    deep: dict[str, Any] = {"leaf": 1}
    for level in range(40):
        deep = {"level": level, "next": deep}
    root["deep"] = deep


def _exports(uri: str, out: Path) -> dict[str, Any]:
    """Every format, and the fragment writer's first (cold) export, from a fresh client."""
    loaded = {}
    for fmt in ("pickle", "json", "zodb"):
        with snaptree.open(uri) as store:
            info = store.export(out / f"{fmt}{SUFFIX[fmt]}", fragments=None)
        loaded[fmt] = snaptree.load_source(info.path)
    with snaptree.open(uri) as store:
        info = store.export(out / "fragments.pickle", fragments=FragmentCaches())
    loaded["fragments"] = snaptree.load_source(info.path)
    return loaded


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The tree in a FileStorage, and what its exports hold."""
    work = tmp_path_factory.mktemp("file")
    db = work / "Data.fs"
    with snaptree.open(str(db)) as store:
        store.run(_fill)
    return db, _exports(str(db), work)


@pytest.mark.slow
def test_prefetching_walks_never_change_what_is_written(expected, tmp_path, monkeypatch):
    """Every prefetch path (windows of buckets, of list items, walks cut short) on a file."""
    db, from_file = expected
    monkeypatch.setattr(_plain_nodes, "is_client_of_a_server", lambda storage: True)
    monkeypatch.setattr(_plain_nodes, "PREFETCH_WINDOW", 700)
    monkeypatch.setattr(_plain_nodes, "_BATCH", 64)
    monkeypatch.setattr(_plain_nodes, "_BUCKETS_PER_WINDOW", 5)
    monkeypatch.setattr(_pickle_fragments, "_PREFETCH_PIECES", 7)
    monkeypatch.setattr(_zexp, "_PREFETCH_BATCH", 50)
    assert _exports(str(db), tmp_path) == from_file


@pytest.mark.parametrize("fmt", ["pickle", "zodb"])
def test_a_cold_export_asks_for_objects_in_full_batches(tmp_path, monkeypatch, fmt):
    """Through PostgreSQL each ask is a query: asking for a bucket's few values as soon as
    they were known took 154 asks for these 6,000 objects."""
    db = tmp_path / "Data.fs"
    with snaptree.open(str(db)) as store:
        store.run(lambda root: root.update(accounts={i: {"n": i, "log": [i]} for i in range(3000)}))
    monkeypatch.setattr(_plain_nodes, "is_client_of_a_server", lambda storage: True)
    asks: list[int] = []
    real = Connection.prefetch

    def prefetch(self: Connection, *args: Any) -> None:
        asks.append(sum(len(arg) if isinstance(arg, list) else 1 for arg in args))
        real(self, *args)

    monkeypatch.setattr(Connection, "prefetch", prefetch)
    with snaptree.open(str(db)) as store:
        info = store.export(tmp_path / f"cold{SUFFIX[fmt]}", fragments=None)
    full_batches = -(-info.objects // _plain_nodes._BATCH)
    assert sum(asks) >= info.objects - 10  # (the root and the mapping's own record)
    assert len(asks) <= 2 * full_batches


@pytest.mark.slow
def test_a_cold_export_through_zeo_holds_what_the_file_holds(expected, tmp_path):
    db, from_file = expected
    served = tmp_path / "Data.fs"
    served.write_bytes(db.read_bytes())
    with zeo_server(tmp_path) as server:
        assert _exports(server.uri, tmp_path) == from_file


@pytest.fixture
def postgres(request: pytest.FixtureRequest) -> Iterator[str]:
    with postgres_database(request) as name:
        yield postgres_uri(name)


@pytest.mark.postgres
@pytest.mark.slow
def test_a_cold_export_through_postgresql_holds_what_the_file_holds(expected, tmp_path, postgres):
    _, from_file = expected
    with snaptree.open(postgres) as store:
        store.run(_fill)
    assert _exports(postgres, tmp_path) == from_file


# -- snaptree serve answers many objects in one request --------------------------------
#
# Through a server started by `snaptree serve` (here in this process, on a port chosen at
# run time), a cold export asks for the objects its prefetcher names in one request
# (_load_many.LOAD_MANY) and takes the answers straight into its loads, without ZEO's
# per-object requests or its client cache. What must hold: the dump is the snapshot's,
# whatever writers commit meanwhile, and a stock ZEO server is never asked.


#: Loads of single objects an export of the accounts makes before its first batch is known.
ONE_AT_A_TIME = 20


@contextmanager
def _snaptree_server(db: Path) -> Iterator[str]:
    with Server(str(db), "127.0.0.1:0") as server:
        yield server.uri


@contextmanager
def _stock_zeo_server(db: Path, port: int = 0) -> Iterator[str]:
    """ZEO's own StorageServer over *db*, which knows nothing of LOAD_MANY."""
    storage = FileStorage(str(db))
    zeo = StorageServer(("127.0.0.1", port), {STORAGE_NAME: storage})
    thread = threading.Thread(target=zeo.loop, daemon=True)
    thread.start()
    try:
        yield f"zeo://127.0.0.1:{zeo.addr[1]}"
    finally:
        zeo.acceptor.event_loop.call_soon_threadsafe(zeo.close)
        thread.join(10)
        assert not thread.is_alive()


def _accounts(root: Any) -> None:
    root["accounts"] = {f"a{i}": {"balance": 100, "log": [i]} for i in range(1500)}


def _double_balances(root: Any) -> None:
    for account in root["accounts"].values():
        account["balance"] *= 2


def _double_after_now(store: snaptree.Store) -> str:
    """The tid of the state now; then every balance doubled, and the caches emptied."""
    with store.snapshot() as snap:
        now = snap.tid
    store.run(_double_balances)
    store.db.cacheMinimize()
    return now


class _ZeoCalls:
    """Counts a store's per-object ZEO loads and prefetches from now on."""

    def __init__(self, store: snaptree.Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loads = self.prefetches = 0
        load, prefetch = ClientStorage.loadBefore, ClientStorage.prefetch

        def counted_load(storage: ClientStorage, *args: Any) -> Any:
            self.loads += storage is store.db.storage
            return load(storage, *args)

        def counted_prefetch(storage: ClientStorage, *args: Any) -> Any:
            self.prefetches += storage is store.db.storage
            return prefetch(storage, *args)

        monkeypatch.setattr(ClientStorage, "loadBefore", counted_load)
        monkeypatch.setattr(ClientStorage, "prefetch", counted_prefetch)


@pytest.fixture
def accounts_file(tmp_path: Path) -> tuple[Path, Any]:
    """A FileStorage of 1,500 accounts (3,002 nodes), and what an export of it holds."""
    db = tmp_path / "Data.fs"
    with snaptree.open(str(db)) as store:
        store.run(_accounts)
        info = store.export(tmp_path / "file.pickle", fragments=None)
    return db, snaptree.load_source(info.path)


@pytest.mark.parametrize("fmt", ["pickle", "json", "zodb"])
def test_a_cold_export_through_snaptree_serve_asks_for_many_objects_at_once(
    accounts_file, tmp_path, monkeypatch, fmt
):
    db, from_file = accounts_file
    with _snaptree_server(db) as uri, snaptree.open(uri) as store:
        assert serves_load_many(store.db.storage)
        calls = _ZeoCalls(store, monkeypatch)
        info = store.export(tmp_path / f"cold{SUFFIX[fmt]}", fragments=None)
    assert info.objects > 3000
    # The root, the accounts mapping and its interior nodes are loaded one at a time (they
    # name the first batch); every other object came in a LOAD_MANY answer, none through
    # ZEO's prefetch.
    assert calls.loads <= ONE_AT_A_TIME
    assert calls.prefetches == 0
    assert snaptree.load_source(info.path) == from_file


def test_answers_are_the_snapshots_while_writers_commit(accounts_file, tmp_path, monkeypatch):
    """Every balance is doubled and committed after the export took its snapshot and before
    it asked for any account: the answers, asked for after that commit, are still the
    snapshot's."""
    db, from_file = accounts_file
    real_prefetch = _load_many._ManyLoads.prefetch
    committed = threading.Event()

    with _snaptree_server(db) as uri, snaptree.open(uri) as store, snaptree.open(uri) as writer:

        def commit_then_prefetch(loads: Any, oids: Any) -> None:
            if not committed.is_set():
                thread = threading.Thread(target=writer.run, args=(_double_balances,))
                thread.start()
                thread.join(30)
                assert not thread.is_alive()
                committed.set()
            real_prefetch(loads, oids)

        monkeypatch.setattr(_load_many._ManyLoads, "prefetch", commit_then_prefetch)
        calls = _ZeoCalls(store, monkeypatch)
        during = store.export(tmp_path / "during.pickle", fragments=None)
        assert committed.is_set() and calls.loads <= ONE_AT_A_TIME
        after = store.export(tmp_path / "after.pickle", fragments=None)
    assert during.tid < after.tid
    assert snaptree.load_source(during.path) == from_file
    doubled = snaptree.load_source(after.path)
    assert {a["balance"] for a in doubled["accounts"].values()} == {200}


def test_a_past_state_exported_through_snaptree_serve_is_that_state(
    accounts_file, tmp_path, monkeypatch
):
    db, from_file = accounts_file
    with _snaptree_server(db) as uri, snaptree.open(uri) as store:
        before_doubling = _double_after_now(store)
        calls = _ZeoCalls(store, monkeypatch)
        info = store.export(tmp_path / "past.pickle", at=before_doubling, fragments=None)
    assert calls.loads <= ONE_AT_A_TIME
    assert snaptree.load_source(info.path) == from_file


@pytest.mark.parametrize(
    ("oids", "before", "refused"),
    [
        ("not a list", b"\0" * 8, "oids must be a list"),
        ([b"\0" * 8] * (MOST_PER_REQUEST + 1), b"\0" * 8, "oids must be a list of at most"),
        ([b"short"], b"\0" * 8, "every oid must be 8 bytes"),
        ([b"\0" * 8], "not a tid", "before must be 8 bytes"),
    ],
)
def test_the_server_refuses_a_malformed_request_and_goes_on_serving(
    accounts_file, oids, before, refused
):
    db, _ = accounts_file
    with _snaptree_server(db) as uri, snaptree.open(uri) as store:
        with pytest.raises(ServerException, match=refused):
            store.db.storage._server.call(LOAD_MANY, oids, before)
        # An oid the storage never had is answered None (the client loads it alone).
        missing = (2**60).to_bytes(8, "big")
        assert store.db.storage._server.call(LOAD_MANY, [missing], b"\xff" * 8) == [None]
        assert store.run(lambda root: len(root["accounts"])) == 1500


@pytest.mark.parametrize("past", [False, True], ids=["now", "a past state"])
def test_a_stock_zeo_server_is_never_asked(accounts_file, tmp_path, monkeypatch, caplog, past):
    """ZEO drops a client that calls a method it does not list: only ZEO's prefetch here
    (none for a past state: ZODB's historical connections do not prefetch)."""
    db, from_file = accounts_file
    with _stock_zeo_server(db) as uri, snaptree.open(uri) as store:
        assert not serves_load_many(store.db.storage)
        at = _double_after_now(store) if past else None
        calls = _ZeoCalls(store, monkeypatch)
        info = store.export(tmp_path / "stock.pickle", at=at, fragments=None)
        assert store.run(lambda root: len(root["accounts"])) == 1500
    assert calls.loads > info.objects / 2
    assert calls.prefetches > 0 or past
    assert "Invalid method" not in caplog.text
    assert snaptree.load_source(info.path) == from_file


def test_a_node_in_two_places_is_asked_for_once(tmp_path, monkeypatch):
    db = tmp_path / "Data.fs"
    with snaptree.open(str(db)) as store:
        store.run(lambda root: root.update(pair=[{"x": 1}]))
        store.run(lambda root: root["pair"].append(root["pair"][0]))
    with _snaptree_server(db) as uri, snaptree.open(uri) as store:
        for fmt in SUFFIX:
            info = store.export(tmp_path / f"pair{SUFFIX[fmt]}", fragments=None)
            assert snaptree.load_source(info.path)["pair"] == [{"x": 1}, {"x": 1}]


def test_answers_stop_at_a_size_and_the_rest_is_asked_for_again(
    accounts_file, tmp_path, monkeypatch
):
    """ZEO's client joins one message's pieces at a cost that grows with the square of its
    size: an answer stops at MOST_BYTES_PER_ANSWER (here a few kB) and the client asks again."""
    db, from_file = accounts_file
    monkeypatch.setattr(_zeo_storage, "MOST_BYTES_PER_ANSWER", 3000)
    answers: list[tuple[int, int]] = []  # (objects asked for, bytes answered)
    real = _zeo_storage._ZEOStorage.snaptree_load_before_many

    def recorded(handler: Any, oids: Any, before: Any) -> list[Any]:
        states = real(handler, oids, before)
        answers.append((len(oids), sum(len(state[0]) for state in states if state)))
        return states

    monkeypatch.setattr(_zeo_storage._ZEOStorage, "snaptree_load_before_many", recorded)
    with _snaptree_server(db) as uri, snaptree.open(uri) as store:
        calls = _ZeoCalls(store, monkeypatch)
        info = store.export(tmp_path / "small-answers.pickle", fragments=None)
    assert snaptree.load_source(info.path) == from_file
    assert len(answers) > info.objects * 100 // 3000  # no answer much over 3,000 bytes
    assert max(size for _, size in answers) < 3000 + 1000
    assert calls.loads <= ONE_AT_A_TIME


def test_a_client_that_reconnects_to_a_stock_zeo_server_stops_asking(
    accounts_file, tmp_path, caplog
):
    """ZEO's client keeps what each server said at connection merged with what the servers
    before it said: the flag of a snaptree server outlived a reconnection to a stock one, which
    then dropped the client at each export."""
    db, from_file = accounts_file
    server = Server(str(db), "127.0.0.1:0")
    server.start()
    try:
        store = snaptree.open(server.uri)
        assert serves_load_many(store.db.storage)
    finally:
        server.stop()
    try:
        with _stock_zeo_server(db, port=server.address[1]):
            assert store.run(lambda root: len(root["accounts"])) == 1500  # reconnected
            assert not serves_load_many(store.db.storage)
            info = store.export(tmp_path / "after.pickle", fragments=None)
    finally:
        store.close()
    assert "Invalid method" not in caplog.text
    assert snaptree.load_source(info.path) == from_file
