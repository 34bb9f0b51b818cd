"""Several processes sharing one tree through a real ZEO server (``snaptree serve``)."""

from __future__ import annotations

import errno
import os
import signal
import socket
from pathlib import Path

import pytest

import snaptree
from _cli import error_line
from _cli import snaptree as run_snaptree
from _servers import ZeoProcess, check_books, open_bank, run_bank_workload, transfer, zeo_server
from snaptree.server import Server


@pytest.mark.slow
def test_writer_processes_and_an_exporter_share_one_zeo_server(tmp_path: Path) -> None:
    """Two writer processes and an exporter process: no lost transfer, every dump balances."""
    with zeo_server(tmp_path) as server:
        result = run_bank_workload(server.uri, tmp_path, writers=2)
        assert server.log_path.exists()
    assert len(result.logged) >= 2 * 30
    assert result.exporter["dumps"] >= 2


@pytest.mark.slow
def test_zeo_server_restart_mid_workload_loses_no_acknowledged_transfer(tmp_path: Path) -> None:
    """The server stops and starts again while writers commit: they retry or wait, then resume.

    Writers log a transfer only after its commit returned; afterwards every
    logged transfer is in the tree exactly once and the books balance. The
    exporter's rounds cut short by the restart are retried, and no partial
    dump is left behind.
    """
    with zeo_server(tmp_path) as server:
        restarted = []

        def restart() -> None:
            restarted.append(server.restart())

        result = run_bank_workload(server.uri, tmp_path, writers=2, while_running=restart)
        assert restarted == [server.uri]
    assert len(result.logged) >= 2 * 30


@pytest.mark.slow  # seconds of work: with the torture tests in .ci/run
def test_a_store_opened_before_a_restart_keeps_working_with_oids_unique(tmp_path: Path) -> None:
    """One client across a server restart: its next call waits for the server and commits.

    Client *a* fetched a batch of oids from the first server process and
    keeps the unused ones; client *b* gets its oids from the restarted one.
    Without the server skipping ahead, *b*'s new objects and *a*'s next ones
    share oids, and *a*'s commit fails with "A different object already has
    the same oid".
    """
    with zeo_server(tmp_path) as server, snaptree.open(server.uri) as a:
        open_bank(a)
        a.run(transfer, "before", "acct-0", "acct-1", 5)
        a.run(lambda root: root.__setitem__("from_a", {"n": 1}))
        server.restart()
        with snaptree.open(server.uri) as b:
            b.run(lambda root: root.__setitem__("from_b", {str(i): {"n": i} for i in range(40)}))

            def read_b_then_add(root: snaptree.Mapping) -> int:
                total = sum(node["n"] for node in root["from_b"].values())
                root["from_a_again"] = {str(i): {"n": i} for i in range(40)}
                return total

            assert a.run(read_b_then_add) == sum(range(40))
            a.run(transfer, "after", "acct-1", "acct-2", 7)
            with b.snapshot() as snap:
                assert len(snap.root["from_a_again"]) == len(snap.root["from_b"]) == 40
                assert check_books(snap.root) == (2, [])


@pytest.mark.slow
def test_history_survives_in_the_served_file_storage(tmp_path: Path) -> None:
    """Through ZEO, snapshot(at=) sees the tree as it was (the FileStorage keeps history)."""
    with zeo_server(tmp_path) as server, snaptree.open(server.uri) as store:
        store.run(lambda root: root.__setitem__("n", 1))
        then = store.last_tid()
        store.run(lambda root: root.__setitem__("n", 2))
        with store.snapshot(at=then) as past, store.snapshot() as now:
            assert (past.root["n"], now.root["n"]) == (1, 2)


@pytest.mark.slow
def test_serve_stops_cleanly_on_sigint_and_logs_where_it_listens(tmp_path: Path) -> None:
    """Ctrl-C: exit code 0, the file closed (another server can open it), the address logged."""
    server = ZeoProcess(tmp_path / "Data.fs", tmp_path / "serve.log")
    uri = server.start()
    assert server.stop(signal.SIGINT) == 0
    log = server.log()
    assert f"at {uri}" in log and "received SIGINT" in log
    assert server.start() != ""  # the lock on Data.fs was released
    assert server.stop() == 0


@pytest.mark.slow
def test_serve_refuses_a_file_another_server_holds(tmp_path: Path) -> None:
    """A second server on the same file: one line, and exit code 4 (the store is locked)."""
    with zeo_server(tmp_path) as server:
        second = run_snaptree("serve", "--db", server.db_path, "--listen", "127.0.0.1:0")
    assert second.returncode == 4
    line = error_line(second)
    assert line.startswith("snaptree: error: cannot serve")
    assert "another process has it open" in line


@pytest.mark.slow
def test_serve_rejects_a_malformed_listen_address(tmp_path: Path) -> None:
    """--listen must be HOST:PORT; anything else is a usage error, not a traceback."""
    result = run_snaptree("serve", "--db", tmp_path / "Data.fs", "--listen", "8100")
    assert result.returncode == 2
    assert "HOST:PORT" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_exporter_on_a_zeo_store_exports_from_its_own_process(tmp_path: Path) -> None:
    """The Exporter reopens the store's own zeo:// URI in its exporter process."""
    with zeo_server(tmp_path) as server, snaptree.open(server.uri) as store:
        open_bank(store)
        (tmp_path / "dumps").mkdir()
        exporter = snaptree.Exporter(store, tmp_path / "dumps", every=3600, format="pickle")
        try:
            assert not exporter.in_process
            result = exporter.export_now()
        finally:
            exporter.stop()
        assert result.info is not None
        assert result.info.tid == store.last_tid()
        assert snaptree.verify(result.info.path).objects == result.info.objects


def test_serve_relaxed_keeps_every_commit_across_a_clean_stop(tmp_path: Path) -> None:
    """--durability relaxed: clients commit without waiting for the disk; nothing is lost."""
    server = ZeoProcess(tmp_path / "Data.fs", tmp_path / "serve.log")
    uri = server.start(0, "--durability", "relaxed", "--sync-every", "0.01")
    try:
        with snaptree.open(uri) as store:
            for i in range(20):
                store.run(lambda root, i=i: root.__setitem__("n", i))
    finally:
        assert server.stop() == 0, server.log()
    assert "durability relaxed" in server.log()
    with snaptree.open(str(tmp_path / "Data.fs")) as store:
        assert store.run(lambda root: root["n"]) == 19


@pytest.mark.slow
def test_serve_refuses_group_durability_and_clients_cannot_choose_one(tmp_path: Path) -> None:
    """ZEO commits on one thread: no fsync to share. Exit 2, saying what it offers instead."""
    result = run_snaptree("serve", "--db", tmp_path / "Data.fs", "--durability", "group")
    assert result.returncode == 2
    assert "offers durability commit or relaxed" in error_line(result)
    assert not (tmp_path / "Data.fs").exists()
    with zeo_server(tmp_path) as server, pytest.raises(snaptree.ArgumentError, match="serve"):
        snaptree.open(server.uri, durability="relaxed")


@pytest.mark.slow
def test_sync_every_without_relaxed_durability_is_a_usage_error(tmp_path: Path) -> None:
    """--sync-every means nothing in commit mode: refused (exit 2), not silently ignored."""
    result = run_snaptree("serve", "--db", tmp_path / "Data.fs", "--sync-every", "0.5")
    assert result.returncode == 2
    assert "--sync-every only applies with --durability relaxed" in result.stderr
    assert not (tmp_path / "Data.fs").exists()


def test_a_served_commit_whose_fsync_failed_is_never_reported_as_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve --durability commit: the client of that commit hears of the failure, not success."""
    data = tmp_path / "Data.fs"
    server = Server(str(data), "127.0.0.1:0")  # in this process, so its fsync can fail
    server.start()
    try:
        with snaptree.open(server.uri, retry=snaptree.RetryPolicy(attempts=1)) as store:
            store.run(lambda root: root.__setitem__("n", 0))
            real = os.fsync

            def failing(fd: int) -> None:
                if os.readlink(f"/proc/self/fd/{fd}") == str(data):
                    raise OSError(errno.EIO, "Input/output error (forced by the test)")
                real(fd)

            monkeypatch.setattr(os, "fsync", failing)
            for _ in range(2):  # the commit whose fsync failed, then every later one
                with pytest.raises(snaptree.DurabilityError, match="may be lost") as caught:
                    store.run(lambda root: root.__setitem__("n", 1))
                assert type(caught.value.__cause__).__name__ == "ServerException"
            monkeypatch.undo()
    finally:
        server.stop()


def test_serve_on_a_file_that_is_not_a_filestorage_is_one_line_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    data = tmp_path / "notes.fs"
    data.write_text("hello")
    result = run_snaptree("serve", "--db", data, "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "is not a FileStorage file" in error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.fs"]
    assert data.read_text() == "hello"


def test_a_server_that_cannot_listen_leaves_no_new_store_behind(tmp_path: Path) -> None:
    """The store is opened before the socket: a failed bind removes the files it made."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = Server(str(tmp_path / "new.fs"), f"127.0.0.1:{port}")
        with pytest.raises(snaptree.OpenError, match=f"cannot listen on 127.0.0.1:{port}"):
            server.start()
    assert list(tmp_path.iterdir()) == []
