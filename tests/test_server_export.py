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

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ZODB.Connection import Connection

import snaptree
from _servers import postgres_database, postgres_uri, zeo_server
from snaptree import _pickle_fragments, _plain_nodes, _zexp
from snaptree.exports import FragmentCaches

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
