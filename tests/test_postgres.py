"""Several processes sharing one tree through RelStorage on a real PostgreSQL.

Each test creates its own database and drops it. They skip when PostgreSQL
is not reachable at 127.0.0.1:5432, and fail instead under --require-postgres.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import snaptree
from _servers import (
    check_books,
    open_bank,
    postgres_database,
    postgres_uri,
    require_postgres,
    run_bank_workload,
)

pytestmark = pytest.mark.postgres


@pytest.fixture
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    with postgres_database(request) as name:
        yield name


def _newest_tid_in_database(name: str, history_free: bool) -> str:
    import psycopg2

    table = "object_state" if history_free else "transaction"
    with (
        contextlib.closing(
            psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=name)
        ) as conn,
        conn.cursor() as cursor,
    ):
        cursor.execute(f"SELECT max(tid) FROM {table}")
        return f"{cursor.fetchone()[0]:016x}"


@pytest.mark.slow
@pytest.mark.parametrize("options", ["", "keep_history=false"], ids=["history", "history-free"])
def test_writer_processes_and_an_exporter_share_one_postgresql(
    database: str, tmp_path: Path, options: str
) -> None:
    """Two writer processes and an exporter process: no lost transfer, every dump balances."""
    result = run_bank_workload(postgres_uri(database, options), tmp_path, writers=2)
    assert len(result.logged) >= 2 * 30
    assert result.exporter["dumps"] >= 2


def test_history_preserving_is_the_default_so_past_snapshots_work(database: str) -> None:
    """snapshot(at=) sees the past; the snapshot's tid is the newest tid in the database.

    Opened as postgresql://user@host/db, no port, no password: RelStorage 4.3's
    own resolver put 'None' in the DSN for them.
    """
    with snaptree.open(f"postgresql://postgres@127.0.0.1/{database}") as store:
        assert store.db.storage.keep_history
        store.run(lambda root: root.__setitem__("n", 1))
        with store.snapshot() as snap:
            then = snap.tid
            assert then == _newest_tid_in_database(database, history_free=False)
        store.run(lambda root: root.__setitem__("n", 2))
        with store.snapshot(at=then) as past, store.snapshot() as now:
            assert (past.root["n"], now.root["n"]) == (1, 2)
            assert now.tid == _newest_tid_in_database(database, history_free=False)


def test_history_free_snapshots_have_the_right_tid_and_refuse_the_past(database: str) -> None:
    """History-free: a snapshot names the tid it reads, stays put, and at= is a clear error."""
    with snaptree.open(postgres_uri(database, "keep_history=false")) as store:
        assert not store.db.storage.keep_history
        open_bank(store)
        with store.snapshot() as snap:
            tid = snap.tid
            assert tid == _newest_tid_in_database(database, history_free=True)
            with snaptree.open(postgres_uri(database, "keep_history=false")) as other:
                from _servers import transfer

                other.run(transfer, "t1", "acct-0", "acct-1", 10)
            assert snap.tid == tid and check_books(snap.root) == (0, [])
        with store.snapshot() as later:
            assert later.tid == _newest_tid_in_database(database, history_free=True) != tid
            assert check_books(later.root) == (1, [])
        with pytest.raises(snaptree.Error, match="keeps no history"), store.snapshot(at=tid):
            pass


@pytest.mark.parametrize("created", ["keep_history=false", ""], ids=["free", "preserving"])
def test_opening_with_the_other_history_mode_is_a_clear_error(database: str, created: str) -> None:
    """The wrong keep_history is an OpenError saying what to write, and damages nothing."""
    with snaptree.open(postgres_uri(database, created)) as store:
        store.run(lambda root: root.__setitem__("n", 1))
    other = "" if created else "keep_history=false"
    with pytest.raises(snaptree.OpenError, match="was not created history-"):
        snaptree.open(postgres_uri(database, other))
    with snaptree.open(postgres_uri(database, created)) as store, store.snapshot() as snap:
        assert snap.root["n"] == 1


def test_zconfig_form_opens_the_same_postgresql_store(database: str, tmp_path: Path) -> None:
    """The ZConfig form (RelStorage's <relstorage> section) reaches the same tree."""
    config = tmp_path / "store.conf"
    config.write_text(
        "%import relstorage\n"
        "<relstorage>\n"
        "  keep-history false\n"
        "  <postgresql>\n"
        f"    dsn host=127.0.0.1 port=5432 user=postgres dbname={database}\n"
        "  </postgresql>\n"
        "</relstorage>\n"
    )
    with snaptree.open(postgres_uri(database, "keep_history=false")) as store:
        store.run(lambda root: root.__setitem__("via", "uri"))
    with snaptree.open(f"zconfig://{config}") as store, store.snapshot() as snap:
        assert snap.root["via"] == "uri"


def test_password_in_a_postgresql_uri_is_never_shown(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With a password (ignored by trust auth): not in the store's name, repr, logs or errors."""
    secret = "s3cret-canary-pw"
    uri = f"postgresql://postgres:{secret}@127.0.0.1:5432/{database}"
    caplog.set_level("DEBUG")
    with snaptree.open(uri) as store:
        store.run(lambda root: root.__setitem__("n", 1))
        shown = [store.source, repr(store), str(store.db.storage), repr(store.db.storage)]
    with pytest.raises(snaptree.OpenError) as failure:
        snaptree.open(f"postgresql://postgres:{secret}@127.0.0.1:5432/{database}?bogus=1")
    shown.append(str(failure.value))
    shown.append(caplog.text)
    assert all(secret not in text for text in shown), [t for t in shown if secret in t]
    assert "postgres:***@" in store.source


def test_a_database_name_with_a_typo_is_a_usage_error_not_unavailable(
    request: pytest.FixtureRequest,
) -> None:
    """The server answers that the database does not exist: exit 2, not 4 (try later)."""
    require_postgres(request)
    uri = postgres_uri("snaptree_no_such_database_typo")
    with pytest.raises(snaptree.OpenError, match="does not exist") as caught:
        snaptree.open(uri)
    assert not isinstance(caught.value, snaptree.StoreUnavailableError)
