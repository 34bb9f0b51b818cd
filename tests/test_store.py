"""The store's guarantees: snapshots, connection hygiene, misuse that must not lose data."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import functools
import gc
import importlib
import inspect
import logging
import pickle
import pkgutil
import subprocess
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, ItemsView, Iterator, KeysView, ValuesView
from typing import Any, NamedTuple

import pytest
import transaction
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConnectionStateError

import snaptree
from _threads import run_threads
from snaptree import (
    MisuseError,
    OpenError,
    StoreClosedError,
    UnstorableValueError,
    WrongThreadError,
)

BARRIER_TIMEOUT = 30


def make_accounts(root: Any, n: int = 20, balance: int = 100) -> None:
    root["accounts"] = {f"a{i:03}": {"balance": balance, "entries": []} for i in range(n)}


def transfer(root: Any, src: str, dst: str, amount: int) -> None:
    accounts = root["accounts"]
    accounts[src]["balance"] -= amount
    accounts[src]["entries"].append(-amount)
    accounts[dst]["balance"] += amount
    accounts[dst]["entries"].append(amount)


def total(root: Any) -> int:
    return sum(account["balance"] for account in root["accounts"].values())


# -- snapshots ---------------------------------------------------------------


def test_snapshot_held_across_many_commits_keeps_its_own_state(store):
    """Objects first loaded after other threads committed still show the snapshot's state."""
    store.run(make_accounts)
    with store.snapshot() as snap:
        tid = snap.tid
        assert total(snap.root) == 2000  # loads only the balances' mappings
        for i in range(30):
            store.run(transfer, f"a{i % 20:03}", f"a{(i + 1) % 20:03}", 7)
            store.run(lambda root, i=i: root.__setitem__(f"k{i}", i))
        # entries lists were never loaded before the commits: they must be the old ones
        assert all(len(a["entries"]) == 0 for a in snap.root["accounts"].values())
        assert "k0" not in snap.root
        assert total(snap.root) == 2000
        assert snap.tid == tid
    with store.snapshot() as later:
        assert later.tid > tid
        assert "k29" in later.root
        assert total(later.root) == 2000


def test_snapshot_reports_tid_and_commit_time(store):
    before = datetime.datetime.now(datetime.UTC)
    store.run(lambda root: root.update(x=1))
    with store.snapshot() as snap:
        assert snap.tid == store.last_tid()
        assert len(snap.tid) == 16
        assert snap.committed_at.tzinfo is datetime.UTC
        assert before - datetime.timedelta(seconds=5) <= snap.committed_at
        assert snap.committed_at <= datetime.datetime.now(datetime.UTC)


def test_snapshot_never_sees_half_a_transfer(store):
    """Readers racing writers only ever see totals that really were committed."""
    store.run(make_accounts)
    stop = threading.Event()
    seen: list[int] = []
    one_commit = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            store.run(transfer, f"a{i % 20:03}", f"a{(i * 7 + 3) % 20:03}", i % 13 + 1)
            one_commit.set()
            i += 1

    def reader() -> None:
        assert one_commit.wait(BARRIER_TIMEOUT)
        try:
            for _ in range(30):
                with store.snapshot() as snap:
                    seen.append(total(snap.root))
        finally:
            stop.set()

    run_threads([writer, writer, reader])
    assert seen == [2000] * 30


def test_snapshot_at_a_past_tid_or_time_shows_that_state(store):
    store.run(lambda root: root.update(version=1))
    with store.snapshot() as first:
        tid, when = first.tid, first.committed_at
    store.run(lambda root: root.update(version=2))
    with store.snapshot(at=tid) as old:
        assert old.root["version"] == 1
    with store.snapshot(at=when) as old:
        assert old.root["version"] == 1
    with store.snapshot() as now:
        assert now.root["version"] == 2


def test_at_each_commit_time_shows_that_commit_and_a_microsecond_before_the_one_before(store):
    """Commit times are truncated to the microsecond, as `at` reads them: none is off by one."""
    commits = []
    for n in range(40):
        store.run(lambda root, n=n: root.update(n=n))
        with store.snapshot() as snap:
            commits.append((snap.committed_at, n))
    for when, n in commits[1:]:
        with store.snapshot(at=when) as at:
            assert at.root["n"] == n
        with store.snapshot(at=when - datetime.timedelta(microseconds=1)) as before:
            assert before.root["n"] == n - 1


@pytest.mark.parametrize("text", ["2026-11-30T10:30", "2026-11-30", "2026-11-30 10:30:00.5"])
def test_a_time_without_a_timezone_is_refused_not_read_as_utc(store, text):
    store.run(lambda root: root.update(n=1))
    with pytest.raises(snaptree.ArgumentError, match=r"give a timezone, such as .*Z for UTC"):
        store.snapshot(at=text).__enter__()


def test_a_past_moment_after_the_newest_commit_is_the_newest_state_and_a_future_one_refused(
    store,
):
    store.run(lambda root: root.update(n=1))
    with store.snapshot() as now:
        tid, when = now.tid, now.committed_at
    later = when + datetime.timedelta(milliseconds=1)
    while datetime.datetime.now(datetime.UTC) <= later:  # that moment has passed
        time.sleep(0.001)
    with store.snapshot(at=later) as then:
        assert (then.tid, then.root["n"]) == (tid, 1)
    future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    with pytest.raises(snaptree.ArgumentError, match="ask for a time up to"):
        store.snapshot(at=future).__enter__()


def test_snapshots_at_many_moments_do_not_keep_a_connection_each(store):
    """ZODB would keep an idle historical connection per moment for 300 s (PostgreSQL: a
    server connection each); the store drops them at the next open."""
    tids = []
    for n in range(20):
        store.run(lambda root, n=n: root.update(n=n))
        tids.append(store.last_tid())
    for n, tid in enumerate(tids):
        with store.snapshot(at=tid) as then:
            assert then.root["n"] == n
    assert sum(1 for _ in store.db.historical_pool) <= 2


def test_snapshot_is_read_only(store):
    store.run(lambda root: root.update(box={"n": 1}))
    with pytest.raises(MisuseError, match="read-only"), store.snapshot() as snap:
        snap.root["box"]["n"] = 2
    assert store.run(lambda root: root["box"]["n"]) == 1


def test_a_node_read_in_a_snapshot_stays_out_of_the_threads_later_calls(store):
    """A snapshot's objects belong to the snapshot: assigned in a later call, a node must
    be refused, not linked under a second key (it was, while snapshots borrowed the
    connection the thread's calls keep)."""
    store.run(lambda root: root.update(template={"limit": 10}, users={}))
    with store.snapshot() as snap:
        template = snap.root["template"]
    with pytest.raises(UnstorableValueError, match="another transaction"):
        store.run(lambda root: root["users"].update(alice=template))
    with pytest.raises((snaptree.Error, ConnectionStateError)):  # the snapshot's has closed
        store.run(lambda root: template.update(limit=99))
    assert store.run(lambda root: (dict(root["template"]), dict(root["users"]))) == (
        {"limit": 10},
        {},
    )


def test_an_export_after_a_call_runs_on_the_connection_the_call_kept(store, tmp_path):
    """Its cache holds what the call committed, which any other connection would load
    again: exports between calls open no connection of their own, and are exact."""
    for n in range(3):
        store.run(lambda root, n=n: root.update(box={"n": n}))
        info = store.export(tmp_path / f"{n}.pickle")
        assert snaptree.load_source(info.path) == {"box": {"n": n}}
    assert len(store.db.pool.all) == 1
    with store.snapshot() as snap:  # a snapshot, whose objects outlive its block, does
        assert snap.root["box"]["n"] == 2
    assert len(store.db.pool.all) == 2


def test_a_call_inside_a_snapshot_commits_without_changing_what_the_snapshot_shows(store):
    store.run(lambda root: root.update(n=1))
    with store.snapshot() as snap:
        store.run(lambda root: root.update(n=2))
        assert snap.root["n"] == 1
        with store.snapshot() as inner:
            assert inner.root["n"] == 2
        assert snap.root["n"] == 1
    with store.snapshot() as snap:
        assert snap.root["n"] == 2
    assert store.stats()["connections_open"] == 0


def test_a_change_refused_in_a_snapshot_is_not_committed_by_the_threads_next_call(store):
    """The refused snapshot borrowed the thread's kept connection; the change it
    refused must not ride along with the next call committed on that thread."""
    store.run(lambda root: root.update(box={"n": 1}, other=0))
    with pytest.raises(MisuseError, match="read-only"), store.snapshot() as snap:
        snap.root["box"]["n"] = 2
    store.run(lambda root: root.update(other=1))
    seen: list[Any] = []
    thread = threading.Thread(target=lambda: seen.append(store.run(lambda r: r["box"]["n"])))
    thread.start()
    thread.join(BARRIER_TIMEOUT)
    assert seen == [1]


def test_an_export_between_calls_is_not_shown_to_the_stores_synchronizers(store, tmp_path):
    """Synchronizers (the testing kit's conflict forcing) watch write calls: an export
    on the connection the calls kept must not look like one of their transactions."""
    events: list[str] = []

    class Recorder:
        def newTransaction(self, txn: Any) -> None:
            events.append("begin")

        def beforeCompletion(self, txn: Any) -> None:
            events.append("before")

        def afterCompletion(self, txn: Any) -> None:
            events.append("after")

    recorder = Recorder()
    store.register_synchronizer(recorder)
    store.run(lambda root: root.update(n=1))
    seen = len(events)
    assert seen > 0
    store.export(tmp_path / "between.pickle")
    assert len(events) == seen
    store.run(lambda root: root.update(n=2))
    assert len(events) > seen
    store.unregister_synchronizer(recorder)


# -- connections ---------------------------------------------------------------


def test_32_threads_at_once_trigger_no_pool_warning_and_leak_nothing(store, caplog):
    """All 32 threads hold a connection at the same moment; none is left open afterwards."""
    store.run(lambda root: root.update(slots={}))
    barrier = threading.Barrier(32, timeout=BARRIER_TIMEOUT)

    def work(root: Any, i: int) -> None:
        root["slots"][i] = i
        barrier.wait()

    with caplog.at_level(logging.WARNING, logger="ZODB"):
        run_threads([lambda i=i: store.run(work, i) for i in range(32)])
    assert store.run(lambda root: len(root["slots"])) == 32
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert store.stats()["connections_open"] == 0


@pytest.mark.parametrize("take_turns", [False, True])
def test_more_threads_than_connections_wait_instead_of_warning(tmp_path, caplog, take_turns):
    s = snaptree.open(str(tmp_path / "Data.fs"), pool_size=3, take_turns=take_turns)
    try:
        s.run(lambda root: root.update(hits=snaptree.Counter()))
        with caplog.at_level(logging.WARNING, logger="ZODB"):
            run_threads([lambda: [s.run(lambda r: r["hits"].add(1)) for _ in range(5)]] * 12)
        assert s.run(lambda root: root["hits"].value) == 60
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert s.stats()["connections_open"] == 0
    finally:
        s.close()


def test_errors_inside_calls_return_their_connection(store):
    for _ in range(50):
        with pytest.raises(KeyError):
            store.run(lambda root: root["missing"])
        with pytest.raises(ZeroDivisionError), store.transaction():
            1 / 0  # noqa: B018
    assert store.stats()["connections_open"] == 0


def test_an_interrupt_inside_a_call_gives_its_connection_back(store):
    """SystemExit or KeyboardInterrupt in the function: not retried, nothing kept, no leak."""

    def interrupted(root: Any) -> None:
        root["half"] = 1
        raise SystemExit(3)

    for call in (store.run, store.run_batched):
        with pytest.raises(SystemExit):
            call(interrupted)
    with pytest.raises(SystemExit), store.transaction() as root:
        interrupted(root)
    assert store.stats()["connections_open"] == 0
    assert store.run(lambda root: "half" in root) is False


def _jar(root: Any) -> int:
    return id(root._p_jar)


def test_a_thread_keeps_its_connection_between_calls(store):
    """No pool lease per call: the thread's next call runs on the same connection, warm."""
    jars = {store.run(_jar) for _ in range(5)} | {store.run_batched(_jar)}
    with store.transaction() as root:
        jars.add(id(root._p_jar))
    assert len(jars) == 1
    stats = store.stats()
    assert (stats["connections_open"], stats["connections_kept"]) == (0, 1)


def _replace_tree(store: snaptree.Store, tree: dict, *, elsewhere: bool = True) -> None:
    """Put a new root node under ZODB's root (as snaptree.testing's replicas do), on
    another thread's connection or on the calling thread's own."""

    def replace() -> None:
        with store.transaction() as root:
            root._p_jar.root()["snaptree"] = snaptree.Mapping(tree)

    if elsewhere:
        run_threads([replace])
    else:
        replace()


@pytest.mark.parametrize(
    "meanwhile", ["nothing", "an export", "a second replacement", "a replacement here"]
)
def test_a_thread_whose_tree_was_replaced_writes_to_the_new_tree(store, tmp_path, meanwhile):
    """Each call finds the tree's root node without looking it up through ZODB's root
    (the connection keeps it): a root node replaced since must still be the one the
    thread's next call reads and changes, whether ZODB's root was invalidated, loaded
    again by an export on the same connection, replaced twice, or replaced on the
    thread's own connection."""
    store.run(lambda root: root.update(old=True))
    _replace_tree(store, {"new": 1}, elsewhere=meanwhile != "a replacement here")
    if meanwhile == "an export":
        store.export(tmp_path / "between.pickle")  # loads ZODB's root on the kept connection
    elif meanwhile == "a second replacement":
        store.run(lambda root: root.update(older=True))
        _replace_tree(store, {"new": 2})
    assert store.run(lambda root: sorted(root)) == ["new"]
    store.run(lambda root: root.update(written=True))
    with store.snapshot() as snap:
        assert sorted(snap.root) == ["new", "written"]
    store.close()
    if store.source != "memory://":
        with snaptree.open(store.source) as again:
            assert again.run(lambda root: sorted(root)) == ["new", "written"]


@pytest.mark.slow
@pytest.mark.parametrize("take_turns", [False, True])
def test_forty_threads_never_open_more_connections_than_the_pool_and_never_warn(
    store_uri, caplog, take_turns
):
    """40 writers and 4 snapshot readers at pool_size 32: kept connections change hands."""
    s = snaptree.open(store_uri, pool_size=32, take_turns=take_turns)
    try:
        s.run(lambda root: root.update(hits=snaptree.Counter()))
        start = threading.Barrier(44, timeout=BARRIER_TIMEOUT)
        most = [0]

        def count_connections() -> None:
            most[0] = max(most[0], len(s.db.pool.all) + len(s.db.historical_pool.all))

        def writer() -> None:
            start.wait()
            for _ in range(20):
                s.run(lambda root: root["hits"].add(1))
                count_connections()

        def reader() -> None:
            start.wait()
            for _ in range(20):
                with s.snapshot() as snap:
                    assert snap.root["hits"].value >= 0
                count_connections()

        with caplog.at_level(logging.WARNING, logger="ZODB"):
            run_threads([writer] * 40 + [reader] * 4)
        assert s.run(lambda root: root["hits"].value) == 800
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        assert most[0] <= 32
        assert s.stats()["connections_open"] == 0
    finally:
        s.close()


def test_a_thread_that_ends_gives_its_connection_to_the_next_thread(store_uri):
    """The ended thread's connection is reused (warm) before a new one is opened."""
    with snaptree.open(store_uri, pool_size=4, take_turns=False) as s:
        first = run_threads([lambda: s.run(_jar)])[0]
        assert run_threads([lambda: s.run(_jar)])[0] == first
        # The main thread's (it created the tree) and the one passed on: no third.
        assert s.stats()["connections_kept"] == len(s.db.pool.all) == 2


def test_an_idle_threads_connection_serves_a_thread_that_needs_one(store_uri):
    """pool_size=1: the main thread keeps the only connection, idle; another thread takes it."""
    with snaptree.open(store_uri, pool_size=1, pool_timeout=BARRIER_TIMEOUT, take_turns=False) as s:
        kept = s.run(_jar)
        assert run_threads([lambda: s.run(_jar)])[0] == kept
        assert s.run(_jar) == kept  # and back
        with s.snapshot() as snap:  # a snapshot takes the idle connection's slot
            assert "hits" not in snap.root
        s.run(lambda root: root.update(after=1))
        assert s.stats()["connections_open"] == 0


def test_a_call_waits_for_a_connection_held_by_a_call_in_another_thread(store_uri):
    """pool_size=1 and the one connection busy: the other call waits for it, then runs."""
    with snaptree.open(store_uri, pool_size=1, pool_timeout=BARRIER_TIMEOUT, take_turns=False) as s:
        inside, finish = threading.Event(), threading.Event()

        def hold(root: Any) -> None:
            inside.set()
            assert finish.wait(BARRIER_TIMEOUT)
            root["held"] = 1

        def other() -> int:
            assert inside.wait(BARRIER_TIMEOUT)
            finish.set()  # the holder can finish only after this call started waiting
            return s.run(lambda root: root["held"])

        assert run_threads([lambda: s.run(hold), other])[1] == 1


def test_store_run_after_transaction_get_in_the_same_thread_is_not_a_misuse(store):
    """The thread's global manager holding a transaction of its own is not the store's business."""
    transaction.get()  # outside any store call: the global manager has a transaction now
    try:
        store.run(lambda root: root.update(x=1))
        assert store.run(lambda root: root["x"]) == 1
    finally:
        transaction.abort()


# -- plain data that must not be silently lost --------------------------------


def test_plain_dicts_and_lists_assigned_then_mutated_in_place_are_committed(tmp_path):
    """The in-memory idiom: assign a plain structure, later mutate it in place."""
    path = str(tmp_path / "Data.fs")
    with snaptree.open(path) as s:
        s.run(lambda root: root.update(model={"users": [{"name": "ann", "tags": []}]}))

        def mutate(root: Any) -> None:
            user = root["model"]["users"][0]
            user["tags"].append("admin")
            user["email"] = "ann@example.com"
            root["model"]["users"].append({"name": "bob", "tags": ["x"]})
            root["model"]["settings"] = {}
            root["model"]["settings"].setdefault("theme", {})["dark"] = True

        s.run(mutate)
    with snaptree.open(path) as reopened:
        model = reopened.run(lambda root: root["model"])
    assert model == {
        "users": [
            {"name": "ann", "tags": ["admin"], "email": "ann@example.com"},
            {"name": "bob", "tags": ["x"]},
        ],
        "settings": {"theme": {"dark": True}},
    }


class PlainModel:
    def __init__(self) -> None:
        self.items = []


def test_values_whose_changes_zodb_cannot_see_are_refused_with_their_path(store):
    def store_plain_object(root: Any) -> None:
        root["cfg"] = {"servers": [{"ok": 1}, {"handler": PlainModel()}]}

    with pytest.raises(UnstorableValueError, match=r"cfg/servers/1/handler: cannot store"):
        store.run(store_plain_object)
    assert store.run(lambda root: "cfg" in root) is False


# -- objects that must not escape their transaction ---------------------------


class Account(Persistent):
    def __init__(self, balance: int) -> None:
        self.balance = balance


def test_returned_nodes_are_plain_copies(store):
    store.run(make_accounts)
    accounts = store.run(lambda root: root["accounts"])
    assert type(accounts) is dict
    assert type(accounts["a000"]["entries"]) is list
    accounts["a000"]["balance"] = 0  # a copy: the store is untouched
    assert store.run(lambda root: root["accounts"]["a000"]["balance"]) == 100


def test_returning_a_persistent_model_object_is_an_error(store):
    store.run(lambda root: root.update(acct=Account(5)))
    with pytest.raises(MisuseError, match="persistent Account"):
        store.run(lambda root: root["acct"])
    assert store.run(lambda root: root["acct"].balance) == 5


def test_changing_an_object_after_its_transaction_is_refused(store):
    store.run(lambda root: root.update(box={"n": 1}, acct=Account(5)))
    kept = {}

    def keep(root: Any) -> None:
        kept["box"] = root["box"]
        kept["acct"] = root["acct"]

    store.run(keep)
    with pytest.raises(WrongThreadError, match="after its transaction ended"):
        kept["box"]["n"] = 2
    with pytest.raises(WrongThreadError):
        kept["acct"].balance = 0
    for remove in (lambda box: box.pop("n"), lambda box: box.clear(), lambda box: box.popitem()):
        with pytest.raises(WrongThreadError):
            remove(kept["box"])
    assert store.run(lambda root: (root["box"]["n"], root["acct"].balance)) == (1, 5)


def test_changing_another_threads_objects_is_refused(store):
    store.run(lambda root: root.update(box={"n": 1}))
    loaded, done = threading.Event(), threading.Event()
    shared = {}
    errors = []

    def owner(root: Any) -> None:
        shared["box"] = root["box"]
        loaded.set()
        assert done.wait(BARRIER_TIMEOUT)

    def intruder() -> None:
        assert loaded.wait(BARRIER_TIMEOUT)
        try:
            shared["box"]["n"] = 666
        except WrongThreadError as exc:
            errors.append(exc)
        finally:
            done.set()

    run_threads([lambda: store.run(owner), intruder])
    assert len(errors) == 1 and "from another thread" in str(errors[0])
    assert store.run(lambda root: root["box"]["n"]) == 1


# -- code ported from plain ZODB -----------------------------------------------


def test_global_transaction_commit_inside_run_is_an_error_not_a_no_op(store):
    def ported(root: Any) -> None:
        root["x"] = 1
        transaction.commit()

    with pytest.raises(MisuseError, match="global transaction"):
        store.run(ported)
    assert store.run(lambda root: "x" in root) is False


def test_committing_the_stores_own_transaction_is_an_error(store):
    def commits_itself(root: Any) -> None:
        root["x"] = 1
        root._p_jar.transaction_manager.commit()

    with pytest.raises(MisuseError, match=r"tried to commit the store.s transaction itself"):
        store.run(commits_itself)


def test_nested_calls_in_one_thread_are_refused(store):
    def outer(root: Any) -> None:
        store.run(lambda inner_root: inner_root.update(y=1))

    with pytest.raises(MisuseError, match="inside another"):
        store.run(outer)


def test_transaction_block_commits_once_or_not_at_all(store):
    with store.transaction() as root:
        root["settings"] = {"mode": "slow"}
    with store.transaction() as root:
        root["settings"]["mode"] = "fast"
    with pytest.raises(RuntimeError), store.transaction() as root:
        root["settings"]["mode"] = "broken"
        raise RuntimeError("abort me")
    assert store.run(lambda root: root["settings"]["mode"]) == "fast"


def test_read_current_outside_a_transaction_is_an_error():
    with pytest.raises(MisuseError):
        snaptree.read_current({"not": "persistent"})


# -- opening -----------------------------------------------------------------


def test_unknown_scheme_names_the_scheme_and_hides_the_password():
    with pytest.raises(OpenError) as info:
        snaptree.open("mongo://admin:s3cret@db.example/app")
    message = str(info.value)
    assert "'mongo'" in message and "s3cret" not in message and "***" in message


def test_missing_directory_says_what_to_do(tmp_path):
    with pytest.raises(OpenError, match="does not exist; create it"):
        snaptree.open(str(tmp_path / "nope" / "Data.fs"))


def test_a_file_with_nothing_committed_cannot_be_opened_read_only(tmp_path):
    """Not ZODB's bare ReadOnlyError from creating the root: an OpenError that says why."""
    path = tmp_path / "Data.fs"
    FileStorage(str(path)).close()  # the file header, no transaction
    with pytest.raises(OpenError, match="read-only: nothing has been committed to it yet"):
        snaptree.open(str(path), read_only=True)
    snaptree.open(str(path)).close()  # opened for writing, it gets its root


def test_filestorage_locked_by_another_process_says_what_to_do(tmp_path):
    path = tmp_path / "Data.fs"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, snaptree; s = snaptree.open(sys.argv[1]); print('ready', flush=True);"
            " sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(OpenError, match=r"another process has it open.*snaptree serve"):
            snaptree.open(str(path))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    snaptree.open(str(path)).close()  # free again once the holder exits


def test_default_is_snaptree_db_or_data_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SNAPTREE_DB", raising=False)
    with snaptree.open() as s:
        s.run(lambda root: root.update(x=1))
    assert (tmp_path / "data" / "snaptree.fs").is_file()
    monkeypatch.setenv("SNAPTREE_DB", str(tmp_path / "elsewhere.fs"))
    with snaptree.open() as s:
        assert s.run(lambda root: "x" in root) is False
    assert (tmp_path / "elsewhere.fs").is_file()


def test_file_uri_and_plain_path_open_the_same_file(tmp_path):
    path = tmp_path / "Data.fs"
    with snaptree.open(f"file://{path}") as s:
        s.run(lambda root: root.update(x=42))
    with snaptree.open(str(path)) as s:
        assert s.run(lambda root: root["x"]) == 42


def _every_error_class() -> list[type[snaptree.Error]]:
    """snaptree.Error and all its subclasses, in every module of the package."""
    for module in pkgutil.walk_packages(snaptree.__path__, "snaptree."):
        if not module.name.endswith("__main__"):  # that one runs the command line
            importlib.import_module(module.name)
    found, pending = [], [snaptree.Error]
    while pending:
        kind = pending.pop()
        found.append(kind)
        pending.extend(kind.__subclasses__())
    return sorted(set(found), key=lambda kind: f"{kind.__module__}.{kind.__qualname__}")


def _an_instance(kind: type[snaptree.Error]) -> snaptree.Error:
    """*kind* made with a value for every parameter its constructor takes."""
    if not any("__init__" in vars(cls) for cls in kind.__mro__ if issubclass(cls, snaptree.Error)):
        return kind("what went wrong, where, and what to do")
    parameters = list(inspect.signature(kind.__init__).parameters.values())[1:]
    values = [
        3 if "int" in str(parameter.annotation) else f"{parameter.name} value"
        for parameter in parameters
    ]
    return kind(*values)


@pytest.mark.parametrize("kind", _every_error_class(), ids=lambda kind: kind.__name__)
def test_every_error_survives_pickling(kind):
    """Errors cross process boundaries (exporter processes, ZEO): each comes back whole."""
    error = _an_instance(kind)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is kind
    assert str(copy) == str(error) and copy.args == error.args
    assert vars(copy) == vars(error)


@pytest.mark.parametrize("kind", _every_error_class(), ids=lambda kind: kind.__name__)
def test_every_error_a_zeo_server_raised_is_raised_again_in_the_client(kind):
    """ZEO hands the client an error class it does not know as a ServerException naming it."""
    from ZEO.Exceptions import ServerException

    from snaptree.errors import raised_by_server

    error = _an_instance(kind)
    wrapped = ServerException(f"{kind.__module__}.{kind.__name__}", error.args)
    again = raised_by_server(wrapped)
    assert type(again) is kind and again.args == error.args


def test_a_server_error_that_is_not_snaptrees_stays_as_zeo_gave_it():
    from ZEO.Exceptions import ServerException

    from snaptree.errors import raised_by_server

    assert raised_by_server(ServerException("builtins.ValueError", ("x",))) is None
    assert raised_by_server(ServerException("elsewhere.DurabilityError", ("x",))) is None
    assert raised_by_server(snaptree.DurabilityError("x")) is None
    assert raised_by_server(ValueError("snaptree.errors.DurabilityError", ("x",))) is None


def test_every_public_name_is_importable_from_the_package():
    """``snaptree.X`` and ``from snaptree import *`` give every name of ``__all__``."""
    namespace: dict[str, Any] = {}
    exec("from snaptree import *", namespace)
    assert set(snaptree.__all__) <= namespace.keys()
    assert all(getattr(snaptree, name) is namespace[name] for name in snaptree.__all__)


def test_importing_the_package_loads_no_storage_code():
    """``import snaptree`` (every command-line start) loads ZODB only when it is used."""
    code = (
        "import sys, snaptree; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ZODB', 'BTrees', 'ZEO')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_connection_is_not_reused_with_a_stray_change_from_another_thread(tmp_path):
    """After a refused change, the objects the store hands out show only committed data."""
    with snaptree.open(str(tmp_path / "Data.fs"), pool_size=1) as s:
        s.run(lambda root: root.update(box={"n": 1}))
        kept = {}
        s.run(lambda root: kept.setdefault("box", root["box"]))
        with pytest.raises(WrongThreadError):
            kept["box"]["n"] = 2
        assert s.run(lambda root: root["box"]["n"]) == 1


def test_a_plain_container_that_contains_itself_is_refused_with_its_path(store):
    loop: dict[str, Any] = {"name": "loop"}
    loop["children"] = [loop]

    with pytest.raises(UnstorableValueError, match=r"x/children/0: contains itself"):
        store.run(lambda root: root.update(x=loop))


def test_nesting_past_the_recursion_limit_is_stored_whole_or_refused_never_a_crash(store):
    """One assignment of plain lists nested twice the recursion limit deep.

    Either the whole value is stored and reads back equal, or it is an
    UnstorableValueError saying so and nothing is stored; never a
    RecursionError, never a part of it.
    """
    depth = sys.getrecursionlimit() * 2
    deep: list[Any] = []
    for _ in range(depth):
        deep = [deep]

    try:
        store.run(lambda root: root.update(deep=deep))
    except UnstorableValueError as exc:
        assert "nested too deeply" in str(exc)
        assert store.run(lambda root: "deep" in root) is False
        return
    value, levels = store.run(lambda root: root["deep"]), 0
    while value:
        (value,) = value
        levels += 1
    assert levels == depth


def test_tuple_keys_that_cannot_be_ordered_fall_back_to_a_flat_mapping(store):
    def kinds(root: Any) -> tuple[str, str]:
        root["ordered"] = {(1, "a"): 1, (2, "b"): 2}
        root["unordered"] = {(1, "a"): 1, ("b", 2): 2}
        return type(root["ordered"]).__name__, type(root["unordered"]).__name__

    assert store.run(kinds) == ("Mapping", "FlatMapping")
    assert store.run(lambda root: root["unordered"]) == {(1, "a"): 1, ("b", 2): 2}


# -- what a call returns: plain data, never live nodes -------------------------


def _seed_views(root: Any) -> None:
    root["m"] = {"a": {"n": 1}, "b": {"n": 2}}
    root["l"] = [{"n": 1}, {"n": 2}]
    root["deep"] = {"inner": [{"n": 1}]}


def _change_everything(root: Any) -> None:
    """A later, unrelated call: a live node returned earlier would show this."""
    root["m"]["a"]["n"] = 99
    root["m"]["c"] = {"n": 3}
    root["l"][0]["n"] = 99
    root["l"].append({"n": 3})


class Pair(NamedTuple):
    first: Any
    second: Any


RETURNED_LIVE = {
    # A mapping's views come back as views if the node's are views, else as lists.
    "mapping.values()": (lambda r: r["m"].values(), (ValuesView, list), [{"n": 1}, {"n": 2}]),
    "mapping.keys()": (lambda r: r["m"].keys(), (KeysView, list), ["a", "b"]),
    "mapping.items()": (
        lambda r: r["m"].items(),
        (ItemsView, list),
        [("a", {"n": 1}), ("b", {"n": 2})],
    ),
    "iter(mapping)": (lambda r: iter(r["m"]), Iterator, ["a", "b"]),
    "iter(list)": (lambda r: iter(r["l"]), Iterator, [{"n": 1}, {"n": 2}]),
    "reversed(list)": (lambda r: reversed(r["l"]), Iterator, [{"n": 2}, {"n": 1}]),
    "btree sequence": (lambda r: OOBTree.values(r["m"]), list, [{"n": 1}, {"n": 2}]),
    "btree iterator": (lambda r: OOBTree.itervalues(r["m"]), Iterator, [{"n": 1}, {"n": 2}]),
    "dict view of nodes": (
        lambda r: {"x": r["m"]["a"], "y": r["l"][0]}.values(),
        ValuesView,
        [{"n": 1}, {"n": 1}],
    ),
    "map": (lambda r: map(lambda v: v, r["m"].values()), Iterator, [{"n": 1}, {"n": 2}]),
    "filter": (lambda r: filter(None, r["l"]), Iterator, [{"n": 1}, {"n": 2}]),
    "zip": (
        lambda r: zip(r["m"].keys(), r["l"], strict=True),
        Iterator,
        [("a", {"n": 1}), ("b", {"n": 2})],
    ),
    "enumerate": (lambda r: enumerate(r["l"]), Iterator, [(0, {"n": 1}), (1, {"n": 2})]),
    "namedtuple": (lambda r: Pair(r["m"]["a"], r["l"]), Pair, [{"n": 1}, [{"n": 1}, {"n": 2}]]),
}


def _holds_no_persistent_object(value: Any) -> bool:
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if isinstance(item, Persistent):
            return False
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return True


@pytest.mark.parametrize("name", sorted(RETURNED_LIVE))
def test_returned_views_and_iterators_are_plain_and_never_show_a_later_commit(store, name):
    """pool reuse hands the same connection to the next call: a live node would change."""
    make, kind, expected = RETURNED_LIVE[name]
    store.run(_seed_views)
    returned = store.run(make)
    store.run(_change_everything)
    assert isinstance(returned, kind)
    items = list(returned)
    assert items == expected
    assert _holds_no_persistent_object(items)


@pytest.mark.parametrize("view", ["keys", "values", "items"])
def test_a_returned_view_of_a_node_is_the_same_kind_of_view_over_a_plain_copy(store, view):
    store.run(_seed_views)
    kinds = store.run(
        lambda r: [
            k for k in (KeysView, ValuesView, ItemsView) if isinstance(getattr(r["m"], view)(), k)
        ]
    )
    returned = store.run(lambda r: getattr(r["m"], view)())
    assert [k for k in (KeysView, ValuesView, ItemsView) if isinstance(returned, k)] == kinds
    if view == "keys":
        assert "a" in returned and len(returned) == 2


def test_a_generator_returned_is_refused_and_nothing_is_committed(store):
    def lazy(root: Any) -> Any:
        root["x"] = 1
        return (v for v in root.values())

    with pytest.raises(MisuseError, match=r"returned a generator.*list\(\.\.\.\)"):
        store.run(lambda root: lazy(root))
    assert store.run(lambda root: "x" in root) is False


def test_a_returned_coroutine_is_refused_and_closed(store):
    made = []

    async def later(root: Any) -> None:
        root["x"] = 1

    def returns_coroutine(root: Any) -> Any:
        made.append(later(root))
        return made[-1]

    with pytest.raises(MisuseError, match="returned a coroutine"):
        store.run(returns_coroutine)
    assert made[0].cr_frame is None  # closed: no "never awaited" warning, never runs
    assert store.run(lambda root: "x" in root) is False


def test_generator_and_async_functions_are_refused_before_anything_runs(store):
    def generator_function(root: Any) -> Any:
        root["x"] = 1
        yield root

    async def async_function(root: Any) -> None:
        root["x"] = 1

    for fn in (generator_function, async_function, functools.partial(async_function)):
        with pytest.raises(MisuseError, match=r"generator function|async function"):
            store.run(fn)
        with pytest.raises(MisuseError, match=r"generator function|async function"):
            store.transactional(fn)
    assert store.stats()["commits"] == 1  # creating the tree; nothing since
    assert store.run(lambda root: "x" in root) is False


def test_a_function_run_once_is_not_kept_alive_by_the_store(store):
    """run() remembers the last function it checked, weakly: a closure's data is freed."""

    class Big:
        pass

    data = Big()
    freed = threading.Event()
    weakref.finalize(data, freed.set)

    def uses(root: Any, data: Big = data) -> None:
        root["x"] = 1

    store.run(uses)
    del uses, data
    gc.collect()
    assert freed.is_set()
    assert store.run(lambda root: root["x"]) == 1


def test_a_callable_without_weak_references_is_checked_at_every_call(store):
    """A callable that cannot be referred to weakly still runs, and a deferred one is refused."""
    assert store.run(len) == 0  # a builtin: no weak reference to it

    class Once:
        __slots__ = ()  # no __weakref__

        def __call__(self, root: Any) -> int:
            root["y"] = 2
            return 2

    assert store.run(Once()) == 2
    assert store.run(Once()) == 2


def test_an_object_of_another_type_holding_a_node_is_refused_not_returned_live(store):
    """snaptree copies nodes inside dicts, lists, tuples, sets and dataclasses only."""
    store.run(make_accounts)
    for make in (
        lambda node: types.SimpleNamespace(accounts=node),
        lambda node: collections.ChainMap({"accounts": node}),
        lambda node: functools.partial(print, node),
    ):
        with pytest.raises(MisuseError, match=r"holds a tree node"):
            store.run(lambda root, make=make: make(root["accounts"]))
    assert store.run(lambda root: types.SimpleNamespace(n=len(root["accounts"]))).n == 20


def test_an_object_holding_the_store_is_returned_as_it_is(store):
    """Only what the object refers to directly is looked at: the store's cache is not data."""

    class Service:
        def __init__(self) -> None:
            self.store = store

    service = Service()
    store.run(make_accounts)
    assert store.run(lambda root: (root["accounts"]["a001"]["balance"], service))[1] is service


class Insufficient(Exception):
    def __init__(self, account: Any) -> None:
        super().__init__(account)
        self.account = account


def test_an_exception_raised_with_a_node_carries_a_plain_copy_of_what_the_call_saw(store):
    store.run(make_accounts)

    def withdraw(root: Any) -> None:
        account = root["accounts"]["a001"]
        account["balance"] -= 1  # seen by the exception, then aborted with the call
        raise Insufficient(account)

    with pytest.raises(Insufficient) as caught:
        store.run(withdraw)
    store.run(lambda root: root["accounts"]["a001"].update(balance=500))
    assert caught.value.account == caught.value.args[0]
    assert type(caught.value.account) is dict
    assert caught.value.account["balance"] == 99
    assert store.run(lambda root: root["accounts"]["a001"]["balance"]) == 500


@dataclasses.dataclass
class Summary:
    accounts: Any


def test_a_node_inside_a_returned_dataclass_is_refused_with_its_field(store):
    store.run(make_accounts)
    with pytest.raises(MisuseError, match=r"Summary whose field 'accounts'"):
        store.run(lambda root: Summary(root["accounts"]))
    assert store.run(lambda root: Summary(len(root["accounts"]))) == Summary(20)


def test_plain_results_come_back_as_they_are(store):
    mine = {"a": [1, 2], "b": (3, "x")}
    assert store.run(lambda root: mine) is mine


def test_a_tree_deeper_than_the_recursion_limit_reads_back_without_recursion_error():
    """Mappings nested ten times the recursion limit: the plain value, never a RecursionError.

    Mappings assigned one inside the other in store.run (tests/test_tree.py
    reads back 50,000 nested lists brought in by import_tree). Any recursion
    would fail at the limit; reading a result back is the store's walk
    whatever the storage, so memory:// shows it.
    """
    depth = sys.getrecursionlimit() * 10

    def build(root: Any) -> None:
        node = root
        for _ in range(depth):
            node["c"] = {}
            node = node["c"]

    with snaptree.open("memory://") as store:
        store.run(build)
        try:
            value = store.run(lambda root: root["c"])
        except snaptree.Error as exc:
            assert "too deeply" in str(exc)
            return
    levels = 1  # the innermost mapping is the empty one
    while value:
        value = value["c"]
        levels += 1
    assert levels == depth


# -- ending the store's transaction from inside a call -------------------------


def _abort_then_change(root: Any) -> None:
    root["box"]["n"] = 2
    root._p_jar.transaction_manager.abort()
    root["box"]["n"] = 3  # outside any transaction now


def _commit_midway(root: Any) -> None:
    root["box"]["n"] = 2
    root._p_jar.transaction_manager.commit()


def _commit_midway_and_carry_on(root: Any) -> None:
    root["box"]["n"] = 2
    with contextlib.suppress(MisuseError):
        root._p_jar.transaction_manager.commit()
    root["box"]["n"] = 3


@pytest.mark.parametrize("fn", [_abort_then_change, _commit_midway, _commit_midway_and_carry_on])
def test_ending_the_transaction_through_the_jar_is_refused_and_leaves_nothing_behind(store_uri, fn):
    """pool_size=1: the next calls reuse the very connection the misuse happened in."""
    with snaptree.open(store_uri, pool_size=1) as s:
        s.run(lambda root: root.update(box={"n": 1}, other={"n": 1}))
        with pytest.raises(MisuseError, match=r"(aborted|tried to commit) the store's transaction"):
            s.run(fn)
        assert s.run(lambda root: root["box"]["n"]) == 1
        s.run(lambda root: root["other"].__setitem__("n", 2))  # an unrelated later commit
        assert s.run(lambda root: (root["box"]["n"], root["other"]["n"])) == (1, 2)
        with s.snapshot() as snap:
            assert snap.root["box"]["n"] == 1


def test_aborting_through_the_jar_inside_a_transaction_block_is_refused(store):
    store.run(lambda root: root.update(box={"n": 1}))
    with (
        pytest.raises(MisuseError, match="aborted the store's transaction"),
        store.transaction() as root,
    ):
        _abort_then_change(root)
    assert store.run(lambda root: root["box"]["n"]) == 1


# -- a closed store --------------------------------------------------------------


CALLS_ON_A_STORE = {
    "run": lambda s, tmp: s.run(lambda root: None),
    "transactional": lambda s, tmp: s.transactional(lambda root: None)(),
    "transaction": lambda s, tmp: s.transaction().__enter__(),
    "snapshot": lambda s, tmp: s.snapshot().__enter__(),
    "snapshot at": lambda s, tmp: s.snapshot(at="0" * 15 + "1").__enter__(),
    "export": lambda s, tmp: s.export(tmp / "dump.pickle", format="pickle"),
    "import_tree": lambda s, tmp: s.import_tree({"a": 1}, path="imported"),
    "stats": lambda s, tmp: s.stats(),
    "last_tid": lambda s, tmp: s.last_tid(),
    "with": lambda s, tmp: s.__enter__(),
}


@pytest.mark.parametrize("call", sorted(CALLS_ON_A_STORE))
def test_every_call_on_a_closed_store_is_a_store_closed_error(store_uri, tmp_path, call):
    s = snaptree.open(store_uri)
    s.close()
    with pytest.raises(StoreClosedError, match=r"is closed \(store.close\(\) was called\)"):
        CALLS_ON_A_STORE[call](s, tmp_path)
    s.close()  # closing again is harmless
    assert not (tmp_path / "dump.pickle").exists()


def test_close_waits_for_calls_in_flight_and_refuses_calls_that_start_later(tmp_path, caplog):
    path = str(tmp_path / "Data.fs")
    s = snaptree.open(path)
    workers = 3
    inside = threading.Barrier(workers + 1, timeout=BARRIER_TIMEOUT)
    finish = threading.Event()

    def work(root: Any, i: int) -> None:
        root[f"w{i}"] = i
        inside.wait()
        assert finish.wait(BARRIER_TIMEOUT)

    threads = [threading.Thread(target=s.run, args=(work, i), daemon=True) for i in range(workers)]
    closer = threading.Thread(target=s.close, daemon=True)
    for t in threads:
        t.start()
    inside.wait()  # every worker is inside store.run
    with caplog.at_level(logging.WARNING, logger="snaptree"):
        closer.start()
        _wait_until_closing(s)
        with pytest.raises(StoreClosedError, match="is closing"):
            s.run(lambda root: root.update(late=1))
        late: list[BaseException] = []
        run_threads([lambda: _record_failure(late, lambda: s.run(lambda root: None))])
        assert [type(e) for e in late] == [StoreClosedError]
        finish.set()
        for t in [*threads, closer]:
            t.join(BARRIER_TIMEOUT)
        assert not any(t.is_alive() for t in [*threads, closer])
    assert [r.getMessage() for r in caplog.records] == []
    with snaptree.open(path) as reopened:
        assert reopened.run(lambda root: sorted(root.keys())) == ["w0", "w1", "w2"]


def test_close_gives_up_waiting_after_its_timeout_and_the_late_call_commits_nothing(
    tmp_path, caplog
):
    path = str(tmp_path / "Data.fs")
    s = snaptree.open(path)
    inside, finish = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def slow(root: Any) -> None:
        root["slow"] = 1
        inside.set()
        assert finish.wait(BARRIER_TIMEOUT)

    worker = threading.Thread(target=_record_failure, args=(failures, lambda: s.run(slow)))
    worker.start()
    assert inside.wait(BARRIER_TIMEOUT)
    with caplog.at_level(logging.WARNING, logger="snaptree"):
        s.close(timeout=0.01)
    assert "1 call(s) still running" in caplog.text
    finish.set()
    worker.join(BARRIER_TIMEOUT)
    assert not worker.is_alive()
    assert [type(e) for e in failures] == [StoreClosedError]
    with snaptree.open(path) as reopened:
        assert reopened.run(lambda root: "slow" in root) is False


def test_closing_while_a_call_is_between_two_transactions_closes_the_storage(store_uri):
    """ZODB's DB.close() aborts every connection's manager: one of a call that had committed
    and not yet given its connection back has no transaction, and the explicit manager's
    NoTransaction escaped store.close() (seen once in the busy-writers test below), leaving
    the storage open. The pool's own acquire() is that moment, held still."""
    store = snaptree.open(store_uri)
    store.run(lambda root: root.update(n=1))
    pair = store._pool.acquire()  # a call's connection, in use, no transaction begun
    store.close(timeout=0)  # raised NoTransaction
    pair.conn.release()  # as the call's end would (the connection stays its thread's otherwise)
    if store_uri != "memory://":
        with snaptree.open(store_uri) as again:  # the file's lock was released
            assert again.run(lambda root: root["n"]) == 1


@pytest.mark.parametrize("timeout", [0.0, 30.0])
def test_closing_under_busy_writers_never_leaves_a_thread_hanging(store_uri, timeout):
    """timeout=0 closes at once under commits in flight: they end, then the storage closes."""
    s = snaptree.open(store_uri, retry=snaptree.RetryPolicy(attempts=1000, sleep=lambda t: None))
    s.run(lambda root: root.update(n=0))
    writers = 5
    started = threading.Barrier(writers + 1, timeout=BARRIER_TIMEOUT)
    endings: list[BaseException] = []

    def bump(root: Any) -> None:
        root["n"] += 1

    def writer() -> None:
        s.run(bump)
        started.wait()
        try:
            while True:
                s.run(bump)
        except BaseException as exc:
            endings.append(exc)

    threads = [threading.Thread(target=writer, daemon=True) for _ in range(writers)]
    for t in threads:
        t.start()
    started.wait()  # every writer has committed at least once and is still writing
    s.close(timeout=timeout)
    for t in threads:
        t.join(BARRIER_TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert [type(e) for e in endings] == [StoreClosedError] * writers


def _wait_until_closing(s: snaptree.Store) -> None:
    """Return once close() has begun: from then on every new call is refused."""
    deadline = time.monotonic() + BARRIER_TIMEOUT
    while time.monotonic() < deadline:
        try:
            s.stats()
        except StoreClosedError:
            return
    raise AssertionError("close() did not begin")


def _record_failure(failures: list[BaseException], fn: Callable[[], Any]) -> None:
    try:
        fn()
    except BaseException as exc:
        failures.append(exc)


# -- snapshots at a time the storage cannot show ---------------------------------


def test_a_snapshot_before_the_tree_existed_says_how_far_back_history_goes(store_uri, tmp_path):
    with snaptree.open(store_uri) as s:
        created = s.last_tid()  # opening created the tree: nothing committed since
        s.run(lambda root: root.update(x=1))
        long_ago = datetime.datetime(2001, 2, 3, tzinfo=datetime.UTC)
        for ask in (
            lambda: s.snapshot(at=long_ago).__enter__(),
            lambda: s.snapshot(at="0000000000000001").__enter__(),
            lambda: s.export(tmp_path / "old.pickle", format="pickle", at=long_ago),
        ):
            with pytest.raises(snaptree.ArgumentError) as info:
                ask()
            message = str(info.value)
            assert "there is no tree" in message
            assert "oldest state of the tree it keeps is from" in message
            assert created in message and "ask for that time or later" in message
        assert "2001-02-03T00:00:00+00:00" in str(_error_of(lambda: s.snapshot(at=long_ago)))
    assert not (tmp_path / "old.pickle").exists()


def test_a_snapshot_before_the_history_a_pack_kept_is_an_argument_error(tmp_path):
    with snaptree.open(str(tmp_path / "Data.fs")) as s:
        s.run(lambda root: root.update(box={"n": 1}))
        first = s.last_tid()
        s.run(lambda root: root["box"].__setitem__("n", 2))
        s.run(lambda root: root["box"].__setitem__("n", 3))
        s.db.pack()
        with (
            pytest.raises(snaptree.ArgumentError, match=r"no longer kept.*ask for a later time"),
            s.snapshot(at=first) as snap,
        ):
            assert snap.root["box"]["n"] == 1  # its old version was packed away
        with s.snapshot() as snap:
            assert snap.root["box"]["n"] == 3


def _error_of(cm_factory: Callable[[], Any]) -> BaseException:
    try:
        cm_factory().__enter__()
    except BaseException as exc:
        return exc
    raise AssertionError("no error")


# -- caches ------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["memory://", "file"])
def test_every_storage_gets_the_same_default_object_cache(uri, tmp_path):
    """ZODB's own default (400 objects) made memory:// reload trees of more in every call."""
    uri = str(tmp_path / "Data.fs") if uri == "file" else uri
    with snaptree.open(uri) as s:
        assert s.db.getCacheSize() == snaptree.store.DEFAULT_CACHE_SIZE == 10_000
    with snaptree.open(uri, cache_size=123) as s:
        assert s.db.getCacheSize() == 123
