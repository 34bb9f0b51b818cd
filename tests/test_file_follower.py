"""Reading a FileStorage that another store is committing to: never past what is committed.

ZODB's ``read_index`` stops before a transaction still being written (status
"c") but returns that transaction's tid. Taken as the last tid, an export
claimed a tid whose changes it did not hold, and the next one, seeing the
same tid, skipped as "nothing committed since the last export".
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import snaptree
from snaptree._following_reader import FollowingReader

WAIT = 30.0


class PauseAtVote:
    """A data manager that votes after the FileStorage and waits there for *release*.

    While it waits, the transaction is in the file with status "c": written,
    not committed.
    """

    transaction_manager: Any = None

    def __init__(self) -> None:
        self.voted = threading.Event()
        self.release = threading.Event()

    def sortKey(self) -> str:
        return "~ after every storage"

    def tpc_vote(self, txn: Any) -> None:
        self.voted.set()
        assert self.release.wait(WAIT)

    def abort(self, txn: Any) -> None: ...
    def tpc_begin(self, txn: Any) -> None: ...
    def commit(self, txn: Any) -> None: ...
    def tpc_finish(self, txn: Any) -> None: ...
    def tpc_abort(self, txn: Any) -> None: ...


@contextlib.contextmanager
def commit_in_progress(writer: snaptree.Store, value: int) -> Iterator[None]:
    """Inside the block, the commit of ``root["n"] = value`` is written but not finished."""
    pause = PauseAtVote()

    def change(root: Any) -> None:
        root["n"] = value
        pause.transaction_manager = root._p_jar.transaction_manager
        pause.transaction_manager.get().join(pause)

    thread = threading.Thread(target=writer.run, args=(change,))
    thread.start()
    try:
        assert pause.voted.wait(WAIT)
        yield
    finally:
        pause.release.set()
        thread.join(WAIT)
    assert not thread.is_alive()


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[snaptree.Store]:
    store = snaptree.open(str(tmp_path / "Data.fs"))
    store.run(lambda root: root.__setitem__("n", 1))
    yield store
    store.close()


def _seen(store: snaptree.Store) -> tuple[str, int]:
    with store.snapshot() as snap:
        return snap.tid, snap.root["n"]


def test_caught_up_during_a_commit_the_reader_stops_at_the_last_committed_tid(
    writer: snaptree.Store, caplog: pytest.LogCaptureFixture
) -> None:
    path = writer.db.storage.getName()
    reader = FollowingReader(path, cache_size=1000)
    try:
        writer.run(lambda root: root.__setitem__("n", 2))  # committed after the reader looked
        committed = writer.last_tid()
        with commit_in_progress(writer, 3):
            reader.catch_up()
            assert _seen(reader.store) == (committed, 2)
        with caplog.at_level(logging.WARNING, logger="ZODB.FileStorage"):
            reader.catch_up()
        assert _seen(reader.store) == (writer.last_tid(), 3) != (committed, 3)
        assert "time-stamp reduction" not in caplog.text
    finally:
        reader.close()


def test_opened_read_only_during_a_commit_the_store_starts_at_the_last_committed_tid(
    writer: snaptree.Store,
) -> None:
    path = writer.db.storage.getName()
    committed = writer.last_tid()
    with commit_in_progress(writer, 2):
        reader = snaptree.open(path, read_only=True)
        try:
            assert reader.last_tid() == committed
            assert _seen(reader) == (committed, 1)
        finally:
            reader.close()


def test_a_file_written_over_in_place_is_opened_again_not_followed_from_the_old_place(
    tmp_path: Path,
) -> None:
    """A backup copied onto the live file keeps its inode; the follower must notice."""
    path = tmp_path / "Data.fs"
    with snaptree.open(str(path)) as store:
        store.run(lambda root: root.__setitem__("n", 1))
    backup = path.read_bytes()
    with snaptree.open(str(path)) as store:
        for n in range(2, 6):
            store.run(lambda root, n=n: root.__setitem__("n", n))
    reader = FollowingReader(str(path), cache_size=1000)
    try:
        assert _seen(reader.store)[1] == 5
        with open(path, "r+b") as file:  # what `cp backup.fs Data.fs` does: same inode
            file.write(backup)
            file.truncate()
        with snaptree.open(str(path)) as store:  # the application restarts on the backup
            # and writes past where the reader had read, in records of other sizes
            store.run(lambda root: root.__setitem__("note", "x" * 5000))
            for n in range(100, 130):
                store.run(lambda root, n=n: root.__setitem__("n", n))
            tid = store.last_tid()
        reader.catch_up()
        assert _seen(reader.store) == (tid, 129)
        assert reader.store.run(lambda root: len(root["note"])) == 5000
    finally:
        reader.close()


def test_a_reopen_that_fails_is_tried_again_at_the_next_catch_up(tmp_path: Path) -> None:
    """The file missing for a moment (between a pack's renames, a restore) is not for good."""
    path = tmp_path / "Data.fs"
    with snaptree.open(str(path)) as store:
        store.run(lambda root: root.__setitem__("n", 1))
    reader = FollowingReader(str(path), cache_size=1000)
    try:
        aside = tmp_path / "aside.fs"
        path.rename(aside)
        with pytest.raises(snaptree.OpenError, match="No such file"):
            reader.catch_up()
        aside.rename(path)
        with snaptree.open(str(path)) as store:
            store.run(lambda root: root.__setitem__("n", 2))
            tid = store.last_tid()
        reader.catch_up()
        assert _seen(reader.store) == (tid, 2)
    finally:
        reader.close()
