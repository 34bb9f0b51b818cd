"""Write calls of several threads take turns on one connection, and never wait on each other
for good (snaptree._write_turns).

Taking turns is a matter of speed only: what each call commits, raises and
retries is what it would be running alongside the others, which every test
here checks too.
"""

from __future__ import annotations

import pickle
import threading
from pathlib import Path
from typing import Any

import pytest

import snaptree
from _servers import zeo_server
from _threads import run_threads
from snaptree import _write_turns

WAIT = 30.0


def _jar_and_loads(root: Any) -> tuple[int, int]:
    """The call's connection, and the objects it has loaded since the last look."""
    return id(root._p_jar), root._p_jar.getTransferCounts(clear=True)[0]


def test_a_call_waiting_for_its_turn_runs_next_on_the_connection_the_last_turn_used(
    store, monkeypatch
):
    """Thread B's call waits for thread A's to end, then runs on A's connection, whose
    cache holds what A committed: B loads nothing again, and reads A's change."""
    monkeypatch.setattr(_write_turns, "PATIENCE", WAIT)  # B never runs alongside here
    monkeypatch.setattr(_write_turns, "LONGEST_WAIT", WAIT)
    store.run(lambda root: root.update(box={"n": 0}))
    inside, go = threading.Event(), threading.Event()

    def a_call(root: Any) -> tuple[int, int]:
        inside.set()
        assert go.wait(WAIT)
        root["box"]["n"] += 1
        return _jar_and_loads(root)

    def b_call(root: Any) -> tuple[int, int, int]:
        root["box"]["n"] *= 10
        return (*_jar_and_loads(root), root["box"]["n"])

    def thread_b() -> tuple[int, int, int]:
        assert inside.wait(WAIT)
        go.set()  # A may end before B asks for the turn, or after: B runs after A either way
        return store.run(b_call)

    (a_jar, _), (b_jar, b_loads, n) = run_threads([lambda: store.run(a_call), thread_b])
    assert b_jar == a_jar
    assert b_loads == 0
    assert n == 10
    assert store.run(lambda root: root["box"]["n"]) == 10


def test_a_call_whose_turn_does_not_come_runs_alongside(store):
    """A's function waits for B's write call while A holds the turn: B runs alongside, on a
    connection of its own, instead of waiting for A for ever; both commit."""
    store.run(lambda root: root.update(a=0, b=0))
    b_done = threading.Event()

    def b_call(root: Any) -> int:
        root["b"] += 1
        return id(root._p_jar)

    def thread_b() -> int:
        try:
            return store.run(b_call)
        finally:
            b_done.set()

    def a_call(root: Any) -> int:
        root["a"] += 1
        helper = threading.Thread(target=lambda: seen.append(thread_b()))
        helper.start()
        assert b_done.wait(WAIT), "B waited for the turn A holds"
        helper.join(WAIT)
        return id(root._p_jar)

    seen: list[int] = []
    a_jar = store.run(a_call)
    assert seen and seen[0] != a_jar
    assert store.run(lambda root: (root["a"], root["b"])) == (1, 1)


def test_calls_running_alongside_a_turn_still_lose_nothing(store):
    """B runs alongside A (A waits for it) and both add to the same counter: the conflict
    is retried (or resolved), and both additions count."""
    store.run(lambda root: root.update(n=0))
    b_done = threading.Event()
    attempts: list[str] = []

    def add(root: Any, who: str) -> None:
        attempts.append(who)
        root["n"] += 1
        if who == "a" and not b_done.is_set():
            helper = threading.Thread(
                target=lambda: (store.run(add, "b"), b_done.set()), daemon=True
            )
            helper.start()
            assert b_done.wait(WAIT)
            helper.join(WAIT)

    store.run(add, "a")
    assert store.run(lambda root: root["n"]) == 2
    assert attempts.count("a") == 2  # A's first attempt conflicted with B's commit


def test_many_threads_taking_turns_lose_nothing(store):
    """Eight threads, 50 transfers each, between four accounts: the total stays and every
    transfer is counted (taking turns, running alongside and retrying mixed)."""
    store.run(lambda root: root.update(accounts={str(i): 100 for i in range(4)}, moves=0))
    start = threading.Barrier(8, timeout=WAIT)

    def transfer(root: Any, a: str, b: str) -> None:
        root["accounts"][a] -= 1
        root["accounts"][b] += 1
        root["moves"] += 1

    def writer(i: int) -> None:
        start.wait()
        for k in range(50):
            store.run(transfer, str((i + k) % 4), str((i + k + 1) % 4))

    run_threads([lambda i=i: writer(i) for i in range(8)])
    accounts, moves = store.run(lambda root: (dict(root["accounts"]), root["moves"]))
    assert sum(accounts.values()) == 400
    assert moves == 400


@pytest.mark.parametrize("take_turns", [True, False])
def test_one_thread_after_another_run_on_one_connection_only_when_taking_turns(
    store_uri, take_turns
):
    """Taking turns, a thread's call runs on the connection the last call used; without,
    each thread keeps its own."""
    with snaptree.open(store_uri, take_turns=take_turns) as store:
        first = store.run(_jar_and_loads)[0]
        other = run_threads([lambda: store.run(_jar_and_loads)[0]])[0]
        assert (other == first) is take_turns


def test_calls_through_a_server_do_not_take_turns(tmp_path: Path) -> None:
    """Through ZEO a commit waits on the network, which other threads' calls use: each
    thread keeps its own connection."""
    with zeo_server(tmp_path) as server, snaptree.open(server.uri) as store:
        first = store.run(_jar_and_loads)[0]
        assert run_threads([lambda: store.run(_jar_and_loads)[0]])[0] != first


def test_an_export_borrows_the_connection_the_calls_took_turns_on(store_uri, tmp_path, monkeypatch):
    """A thread whose calls ran on another thread's connection exports on that connection
    (its cache holds what they committed), not on one opened for the export."""
    with snaptree.open(store_uri, pool_size=4) as store:
        store.run(lambda root: root.update(items=list(range(100))))
        opened: list[Any] = []
        db_open = store.db.open

        def counted_open(*args: Any, **kwargs: Any) -> Any:
            opened.append(kwargs)
            return db_open(*args, **kwargs)

        def write_then_export() -> None:
            store.run(lambda root: root["items"].append(100))
            monkeypatch.setattr(store.db, "open", counted_open)
            store.export(tmp_path / "dump.pickle")

        run_threads([write_then_export])
        assert opened == []
        with (tmp_path / "dump.pickle").open("rb") as dump:
            assert pickle.load(dump)["items"][-1] == 100


def _other_threads_jar(store: snaptree.Store) -> int:
    """The connection a new thread's call runs on."""
    return run_threads([lambda: store.run(_jar_and_loads)[0]])[0]


def test_calls_run_alongside_until_the_last_alongside_block_ends(store):
    """Blocks that overlap (not nested): turns resume only when both have ended."""
    turn_jar = store.run(_jar_and_loads)[0]
    first, second = store.alongside(), store.alongside()
    first.__enter__()
    second.__enter__()
    assert _other_threads_jar(store) != turn_jar
    first.__exit__(None, None, None)
    assert _other_threads_jar(store) != turn_jar
    second.__exit__(None, None, None)
    assert _other_threads_jar(store) == turn_jar


def test_a_starving_call_is_handed_the_turn_before_newcomers(monkeypatch):
    """Python's lock lets a newcomer take the turn before a thread that has waited long;
    a call that waited STARVING is handed the turn directly, the lock never free between."""
    monkeypatch.setattr(_write_turns, "STARVING", 0.001)
    monkeypatch.setattr(_write_turns, "PATIENCE", WAIT)  # it never gives up here
    monkeypatch.setattr(_write_turns, "LONGEST_WAIT", WAIT)
    turns = _write_turns.Turns()
    assert turns.lock.acquire(False)  # this thread holds the turn
    waited: list[bool] = []
    waiter = threading.Thread(target=lambda: waited.append(turns.wait()))
    waiter.start()
    queued = threading.Event()
    for _ in range(3000):  # until the waiter has queued (bounded: 30 s)
        if turns.starving:
            queued.set()
            break
        waiter.join(0.01)
    assert queued.is_set()
    turns.give_back()
    waiter.join(WAIT)
    assert waited == [True]
    assert not turns.lock.acquire(False)  # handed over: a newcomer finds it taken
    turns.give_back()  # the waiter's call ends
    assert turns.lock.acquire(False)
