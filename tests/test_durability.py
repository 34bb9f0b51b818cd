"""Durability modes: when a call returns, what one fsync covers, and what a failed fsync does.

The data file's fsync is observed (and held, or failed) through snaptree's
own reference to ``os.fsync`` in ``snaptree._durable_file``; ZODB's code is
untouched. Interleavings are forced with events; every wait has a timeout.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ZODB.FileStorage import FileStorage
from ZODB.FileStorage.FileStorage import read_index
from ZODB.fsIndex import fsIndex

import snaptree
from _threads import run_threads
from snaptree import ArgumentError, DurabilityError, OpenError, _durable_file

WAIT = 30.0


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Return once *predicate* holds (checked every millisecond); fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        pause.wait(0.001)


class Fsyncs:
    """Stands in for os.fsync in snaptree._durable_file: records all, holds or fails the data's."""

    def __init__(self, data_file: Path) -> None:
        self.data_file = data_file
        self.calls: list[tuple[str, int]] = []  # (path, inode) of every fsync, in order
        self.hold = threading.Event()
        self.hold.set()  # set: fsyncs pass
        self.entered = threading.Event()
        self.fail_next = False
        self._real = os.fsync

    def __call__(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        inode = os.fstat(fd).st_ino
        if path == str(self.data_file):
            self.entered.set()
            assert self.hold.wait(WAIT), "a held fsync was never released"
            if self.fail_next:
                self.fail_next = False
                raise OSError(errno.EIO, "Input/output error (forced by the test)")
        self.calls.append((path, inode))
        self._real(fd)

    def of_data_file(self) -> int:
        return sum(1 for path, _ in self.calls if path == str(self.data_file))


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return tmp_path / "Data.fs"


@pytest.fixture
def fsyncs(data_file: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fsyncs]:
    fake = Fsyncs(data_file)
    monkeypatch.setattr(_durable_file.os, "fsync", fake)
    yield fake
    fake.hold.set()


def bump(root: Any, key: str = "n") -> int:
    root[key] = root.get(key, 0) + 1
    return root[key]


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# -- group ------------------------------------------------------------------------------


def test_group_commit_returns_only_after_an_fsync_that_covers_it(data_file, fsyncs):
    with snaptree.open(str(data_file), durability="group") as store:
        storage = store.db.storage
        fsyncs.hold.clear()
        fsyncs.entered.clear()
        thread, outcome = in_thread(lambda: store.run(bump))
        assert fsyncs.entered.wait(WAIT)
        # The commit is written and visible, but not on disk: the call has not returned.
        assert storage.synced_position < os.path.getsize(data_file)
        assert outcome == {}
        with store.snapshot() as snap:
            assert snap.root["n"] == 1  # visible before it is durable (docs/store.md)
        fsyncs.hold.set()
        thread.join(WAIT)
        assert outcome == {"result": 1}
        assert storage.synced_position == os.path.getsize(data_file)


def test_commits_flushed_during_an_fsync_share_the_next_one(data_file, fsyncs):
    with snaptree.open(str(data_file), durability="group") as store:
        storage = store.db.storage
        store.run(lambda root: root.update(a=0, b=0, c=0, d=0))
        before = fsyncs.of_data_file()
        fsyncs.hold.clear()
        fsyncs.entered.clear()
        leader, _ = in_thread(lambda: store.run(bump, "a"))
        assert fsyncs.entered.wait(WAIT)  # the leader's fsync is under way, held
        flushed = storage.flushed
        followers = [in_thread(lambda key=key: store.run(bump, key)) for key in "bcd"]
        wait_until(lambda: storage.flushed == flushed + 3, "the three followers committed")
        fsyncs.hold.set()
        for thread, _ in [(leader, None), *followers]:
            thread.join(WAIT)
        assert [outcome for _, outcome in followers] == [{"result": 1}] * 3
        assert fsyncs.of_data_file() - before == 2  # the leader's, and one for all three


def test_a_failed_fsync_fails_every_waiting_commit_and_refuses_new_ones(data_file, fsyncs, caplog):
    store = snaptree.open(str(data_file), durability="group")
    try:
        store.run(lambda root: root.update(a=0, b=0))
        fsyncs.hold.clear()
        fsyncs.entered.clear()
        fsyncs.fail_next = True
        first, first_outcome = in_thread(lambda: store.run(bump, "a"))
        assert fsyncs.entered.wait(WAIT)
        flushed = store.db.storage.flushed
        second, second_outcome = in_thread(lambda: store.run(bump, "b"))
        wait_until(lambda: store.db.storage.flushed == flushed + 1, "the second committed")
        with caplog.at_level(logging.CRITICAL, logger="snaptree"):
            fsyncs.hold.set()
            first.join(WAIT)
            second.join(WAIT)
        for outcome in (first_outcome, second_outcome):
            assert isinstance(outcome.get("error"), DurabilityError)
            assert "may be lost" in str(outcome["error"]) and str(data_file) in str(
                outcome["error"]
            )
        assert "fsync of" in caplog.text
        with pytest.raises(DurabilityError):
            store.run(bump, "a")  # refused before anything is written
        with pytest.raises(DurabilityError):
            store.run_batched(bump, "a")
    finally:
        store.close()


def test_commit_mode_reports_a_failed_fsync_to_its_call_and_refuses_the_next(data_file, fsyncs):
    with snaptree.open(str(data_file), durability="commit") as store:
        size = os.path.getsize(data_file)
        fsyncs.fail_next = True
        with pytest.raises(DurabilityError):
            store.run(bump)
        with pytest.raises(DurabilityError):
            store.run(bump)
        assert os.path.getsize(data_file) > size  # the first was written, never acknowledged


# -- relaxed ------------------------------------------------------------------------------


def test_relaxed_calls_never_wait_for_the_disk(data_file, fsyncs):
    with snaptree.open(str(data_file), durability="relaxed", sync_every=0.001) as store:
        fsyncs.hold.clear()
        fsyncs.entered.clear()
        store.run(bump)
        assert fsyncs.entered.wait(WAIT)  # the background fsync is under way, held
        assert [store.run(bump) for _ in range(5)] == [2, 3, 4, 5, 6]
        fsyncs.hold.set()


def test_relaxed_syncs_in_the_background_and_close_makes_the_rest_durable(data_file, fsyncs):
    store = snaptree.open(str(data_file), durability="relaxed", sync_every=3600)
    storage = store.db.storage
    before = fsyncs.of_data_file()
    for _ in range(20):
        store.run(bump)
    assert fsyncs.of_data_file() == before  # the window has not passed: nothing fsynced
    assert storage.synced_position < os.path.getsize(data_file)
    store.close()
    assert fsyncs.of_data_file() == before + 1
    assert storage.synced_position == os.path.getsize(data_file)


def test_relaxed_store_sync_makes_every_commit_so_far_durable(data_file, fsyncs):
    with snaptree.open(str(data_file), durability="relaxed", sync_every=3600) as store:
        store.run(bump)
        store.sync()
        assert store.db.storage.synced_position == os.path.getsize(data_file)


def test_beginning_a_transaction_never_fsyncs(data_file, fsyncs):
    """ZODB calls a storage's sync() at every begin: that must not be an fsync."""
    with snaptree.open(str(data_file), durability="relaxed", sync_every=3600) as store:
        store.run(bump)
        before = fsyncs.of_data_file()
        for _ in range(30):
            store.run(lambda root: root["n"])
            with store.snapshot():
                pass
        assert fsyncs.of_data_file() == before


def test_a_background_fsync_failure_refuses_the_next_commit(data_file, fsyncs, caplog):
    with caplog.at_level(logging.CRITICAL, logger="snaptree"):
        store = snaptree.open(str(data_file), durability="relaxed", sync_every=0.001)
        try:
            fsyncs.fail_next = True
            store.run(bump)  # acknowledged: in the operating system, fsynced later
            wait_until(lambda: store.db.storage._failure is not None, "the fsync failed")
            with pytest.raises(DurabilityError):
                store.run(bump)
        finally:
            store.close()
    assert "refuses every further commit" in caplog.text


def test_a_relaxed_export_fsyncs_the_commits_of_the_window_before_publishing(
    data_file, fsyncs, tmp_path
):
    """A dump may hold a commit the background fsync has not reached: the export fsyncs it."""
    with snaptree.open(str(data_file), durability="relaxed", sync_every=3600) as store:
        store.run(bump)
        assert store.db.storage.synced_position < os.path.getsize(data_file)
        before = fsyncs.of_data_file()
        info = store.export(tmp_path / "dump.json")
        assert fsyncs.of_data_file() == before + 1
        assert info.tid == store.last_tid()
    assert json.loads(info.path.read_text()) == {"n": 1}


# -- pack ------------------------------------------------------------------------------------


def _inode(path: Path) -> int | None:
    """The inode of *path*; None between a pack's two renames (old file out, new one in)."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("durability", ["commit", "group", "relaxed"])
def test_pack_fsyncs_the_packed_file_before_it_is_renamed_and_the_directory_after(
    data_file, fsyncs, durability
):
    with snaptree.open(str(data_file), durability=durability) as store:
        for i in range(5):
            store.run(lambda root, i=i: root.update(n=i))
        old = _inode(data_file)
        store.db.pack()
        new = _inode(data_file)
        assert new != old
        fsynced = [(path, inode) for path, inode in fsyncs.calls]
        packed = fsynced.index((f"{data_file}.pack", new))  # by its name, before the rename
        directory = fsynced.index((str(data_file.parent), _inode(data_file.parent)), packed)
        assert directory > packed
        store.run(lambda root: root.update(after=1))
    with snaptree.open(str(data_file)) as reopened:
        assert reopened.run(lambda root: (root["n"], root["after"])) == (4, 1)


def test_a_pack_during_a_leaders_fsync_makes_the_new_file_and_its_name_durable(data_file, fsyncs):
    """The leader fsyncs a descriptor of the old file; the pack renames a new one in meanwhile."""
    with snaptree.open(str(data_file), durability="group") as store:
        for i in range(5):
            store.run(lambda root, i=i: root.update(n=i))
        old = _inode(data_file)
        fsyncs.hold.clear()
        fsyncs.entered.clear()
        writer, outcome = in_thread(lambda: store.run(bump, "m"))
        assert fsyncs.entered.wait(WAIT)  # the leader's fsync of the old file is held
        packer, packed = in_thread(store.db.pack)
        wait_until(lambda: _inode(data_file) not in (old, None), "the pack renamed the new file in")
        new = _inode(data_file)
        fsyncs.hold.set()
        writer.join(WAIT)
        packer.join(WAIT)
        assert outcome == {"result": 1} and packed == {"result": None}
        calls = fsyncs.calls
        renamed = calls.index((f"{data_file}.pack", new))
        again = calls.index((str(data_file), new), renamed)  # the leader, once more, on the new
        assert (str(data_file.parent), _inode(data_file.parent)) in calls[renamed:]
        assert again > renamed
    with snaptree.open(str(data_file)) as reopened:
        assert reopened.run(lambda root: (root["n"], root["m"])) == (4, 1)


# -- choosing a mode ------------------------------------------------------------------------


def test_the_default_is_group_and_a_uri_can_choose_another_mode(data_file):
    with snaptree.open(str(data_file)) as store:
        assert store.durability == "group"
    with snaptree.open(f"file://{data_file}?durability=relaxed&sync_every=0.5") as store:
        assert (store.durability, store.db.storage.sync_every) == ("relaxed", 0.5)
    with snaptree.open(f"{data_file}?durability=relaxed", durability="commit") as store:
        assert store.durability == "commit"  # the argument wins over the URI
    with snaptree.open(str(data_file), read_only=True) as store:
        assert store.durability is None  # nothing to make durable


def test_bad_durability_settings_are_refused_with_what_to_do(data_file):
    with pytest.raises(ArgumentError, match="durability must be one of 'commit', 'group'"):
        snaptree.open(str(data_file), durability="fast")
    with pytest.raises(ArgumentError, match="sync_every must be a positive number"):
        snaptree.open(str(data_file), durability="relaxed", sync_every=0)
    with pytest.raises(OpenError, match=r"cannot open .*durability must be one of"):
        snaptree.open(f"file://{data_file}?durability=sometimes")
    with pytest.raises(OpenError, match=r"sync_every='soon' is not a number"):
        snaptree.open(f"file://{data_file}?durability=relaxed&sync_every=soon")
    with pytest.raises(OpenError, match=r"unknown option 'durabilty'.*durability, sync_every"):
        snaptree.open(f"file://{data_file}?durabilty=relaxed")
    assert not data_file.exists()


@pytest.mark.parametrize("uri", ["zeo://127.0.0.1:1", "postgresql://nobody@127.0.0.1:1/none"])
def test_servers_choose_their_own_durability(uri):
    """Asked of a client, a durability setting would silently do nothing: refused, at once."""
    with pytest.raises(ArgumentError, match="snaptree serve --durability"):
        snaptree.open(uri, durability="relaxed")


def test_memory_has_nothing_to_make_durable_and_accepts_any_mode():
    with snaptree.open("memory://", durability="relaxed") as store:
        assert store.durability is None
        store.run(bump)
        store.sync()  # nothing to do


# -- the index file -------------------------------------------------------------------------


def test_an_index_saved_while_commits_go_on_describes_exactly_one_position(data_file):
    """The copy taken a bucket at a time, plus the commits made meanwhile, equals a full scan."""
    store = snaptree.open(str(data_file), durability="relaxed", save_index_every=0)
    storage = store.db.storage
    stop = threading.Event()

    def commit_meanwhile(k: int) -> None:
        i = 0
        while not stop.is_set():
            store.run(lambda root, i=i: root.update({f"k{k}-{i % 300}": {"i": i}}))
            i += 1

    def save_repeatedly() -> None:
        try:
            for _ in range(15):
                assert storage.save_index()
        finally:
            stop.set()

    try:
        run_threads([lambda: commit_meanwhile(1), lambda: commit_meanwhile(2), save_repeatedly])
        saved = fsIndex.load(f"{data_file}.index")
    finally:
        store.close()
    # The truth: ZODB's own scan of the file up to the saved position.
    cut = data_file.with_name("cut.fs")
    cut.write_bytes(data_file.read_bytes()[: saved["pos"]])
    scanned = fsIndex()
    with open(cut, "rb") as f:
        end, _, _ = read_index(f, str(cut), scanned, {}, read_only=True)
    assert end == saved["pos"]
    assert dict(saved["index"].items()) == dict(scanned.items())


def test_a_read_only_open_reads_the_saved_index_not_the_whole_file(data_file):
    """The writer saves its index as it goes: a reader opening the live file scans only the tail."""
    store = snaptree.open(str(data_file), durability="relaxed", save_index_every=16 * 1024)
    try:
        for i in range(400):
            store.run(lambda root, i=i: root.update({f"k{i % 200}": {"v": i}}))
        storage = store.db.storage
        size = os.path.getsize(data_file)
        assert size > 4 * 16 * 1024
        wait_until(
            lambda: size - storage._index_pos < 16 * 1024 + 4096, "the writer saved its index"
        )
        reader = FileStorage(str(data_file), read_only=True)
        try:
            assert reader._used_index == 1  # ZODB's own marker: it started from the saved index
        finally:
            reader.close()
        with snaptree.open(str(data_file), read_only=True) as snapshot_store:
            assert snapshot_store.run(lambda root: root["k199"]["v"]) == 399
    finally:
        store.close()


def test_the_index_is_not_saved_more_often_than_its_own_size_in_commits(data_file):
    """Saving costs about the index's size: it waits for at least that many bytes of commits."""
    with snaptree.open(str(data_file), save_index_every=1) as store:
        store.run(lambda root: root.update({f"k{i}": {"v": i} for i in range(2000)}))
        storage = store.db.storage
        size = os.path.getsize(data_file)
        wait_until(lambda: storage._index_pos == size, "the index was saved")
        assert storage._index_threshold >= 8 * len(storage._index) > 8 * 2000
        store.run(lambda root: root.update(small=1))  # far fewer bytes than the index holds
        assert not storage._index_wanted


def test_saving_the_index_can_be_left_to_close(data_file):
    with snaptree.open(str(data_file), durability="relaxed", save_index_every=0) as store:
        position = store.db.storage._index_pos
        for i in range(200):
            store.run(lambda root, i=i: root.update(n=i))
        assert store.db.storage._index_pos == position
    assert fsIndex.load(f"{data_file}.index")["pos"] == os.path.getsize(data_file)


@pytest.mark.parametrize("mode", ["commit", "group", "relaxed"])
def test_opening_a_file_fsyncs_what_an_earlier_process_may_have_left_unsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A process killed between a commit and its fsync: the next open must not count it durable."""
    path = tmp_path / "left.fs"
    with snaptree.open(str(path), durability="relaxed") as store:
        store.run(lambda root: root.update(n=1))
    synced: list[str] = []
    fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    with snaptree.open(str(path), durability=mode):
        assert str(path) in synced
