"""The store's guarantees: snapshots, connection hygiene, misuse that must not lose data."""

from __future__ import annotations

import datetime
import logging
import pickle
import subprocess
import sys
import threading
from typing import Any

import pytest
import transaction
from persistent import Persistent
from ZODB.FileStorage import FileStorage

import snaptree
from _threads import run_threads
from snaptree import MisuseError, OpenError, UnstorableValueError, WrongThreadError

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


def test_snapshot_is_read_only(store):
    store.run(lambda root: root.update(box={"n": 1}))
    with pytest.raises(MisuseError, match="read-only"), store.snapshot() as snap:
        snap.root["box"]["n"] = 2
    assert store.run(lambda root: root["box"]["n"]) == 1


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


def test_more_threads_than_connections_wait_instead_of_warning(tmp_path, caplog):
    s = snaptree.open(str(tmp_path / "Data.fs"), pool_size=3)
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


def test_assigned_values_become_tracked_nodes(store):
    def kinds(root: Any) -> list[str]:
        root["d"] = {"nested": {"x": [1, {"y": 2}]}, "s": {1, 2}, "b": bytearray(b"ab")}
        root["mixed"] = {1: "int key", "a": "str key"}
        d = root["d"]
        return [
            type(d).__name__,
            type(d["nested"]["x"]).__name__,
            type(d["nested"]["x"][1]).__name__,
            type(d["s"]).__name__,
            type(d["b"]).__name__,
            type(root["mixed"]).__name__,
        ]

    assert store.run(kinds) == ["Mapping", "List", "Mapping", "frozenset", "bytes", "FlatMapping"]


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

    with pytest.raises(MisuseError, match="committed or aborted"):
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


@pytest.mark.parametrize(
    "error",
    [
        snaptree.Error("x"),
        OpenError("x"),
        MisuseError("x"),
        WrongThreadError("x"),
        UnstorableValueError("a/b", "no"),
        snaptree.InputError("x"),
        snaptree.ExportError("x"),
    ],
)
def test_every_error_survives_pickling(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)


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


def test_nesting_past_the_recursion_limit_is_an_unstorable_value(store):
    deep: list[Any] = []
    for _ in range(sys.getrecursionlimit() * 2):
        deep = [deep]

    with pytest.raises(UnstorableValueError, match="nested too deeply"):
        store.run(lambda root: root.update(deep=deep))
    assert store.run(lambda root: "deep" in root) is False


def test_tuple_keys_that_cannot_be_ordered_fall_back_to_a_flat_mapping(store):
    def kinds(root: Any) -> tuple[str, str]:
        root["ordered"] = {(1, "a"): 1, (2, "b"): 2}
        root["unordered"] = {(1, "a"): 1, ("b", 2): 2}
        return type(root["ordered"]).__name__, type(root["unordered"]).__name__

    assert store.run(kinds) == ("Mapping", "FlatMapping")
    assert store.run(lambda root: root["unordered"]) == {(1, "a"): 1, ("b", 2): 2}
