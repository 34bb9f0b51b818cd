"""Conflict-retry tests: concurrent writers through store.run lose nothing.

Interleavings are forced with barriers and events, never with sleeps; every
thread is joined with a timeout.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from ZODB.POSException import ConflictError
from ZODB.utils import oid_repr

import snaptree
from _threads import run_threads
from snaptree import RetriesExhausted, RetryPolicy

BARRIER_TIMEOUT = 30


@pytest.fixture
def patient_store(store_uri: str):
    """A store whose retries never run out in these tests and never really sleep."""
    s = snaptree.open(store_uri, retry=RetryPolicy(attempts=1000, sleep=lambda s: None))
    yield s
    s.close()


def test_forced_conflict_is_retried_and_both_writes_land(patient_store):
    """Two transactions read the same value, both write it: one conflicts, retries, succeeds."""
    patient_store.run(lambda root: root.update(box={"n": 0}))
    barrier = threading.Barrier(2, timeout=BARRIER_TIMEOUT)
    attempts = {0: 0, 1: 0}

    def bump(root: Any, who: int) -> None:
        attempts[who] += 1
        value = root["box"]["n"]
        if attempts[who] == 1:
            barrier.wait()  # both have read the old value before either writes
        root["box"]["n"] = value + 1

    run_threads([lambda w=w: patient_store.run(bump, w) for w in (0, 1)])

    assert patient_store.run(lambda root: root["box"]["n"]) == 2
    assert sorted(attempts.values()) == [1, 2]
    stats = patient_store.stats()
    assert stats["retries"] == 1
    assert ("snaptree.tree.Mapping", 1) in stats["hot_classes"]


def test_exhausted_retries_raise_with_attempts_object_and_cause(store_uri):
    """A function that conflicts on every attempt ends in RetriesExhausted, nothing committed."""
    s = snaptree.open(store_uri, retry=RetryPolicy(attempts=3, sleep=lambda s: None))
    try:
        s.run(lambda root: root.update(box={"n": 0}))
        oid = s.run(lambda root: oid_repr(root["box"]._p_oid))

        def rival_bump() -> None:
            s.run(lambda root: root["box"].__setitem__("n", root["box"]["n"] + 100))

        def doomed(root: Any) -> None:
            root["box"]["n"] += 1
            # Another thread commits a change to the same object before we commit.
            run_threads([rival_bump])

        with pytest.raises(RetriesExhausted) as info:
            s.run(doomed)
        err = info.value
        assert err.attempts == 3
        assert err.class_name == "snaptree.tree.Mapping"
        assert err.oid == oid
        assert isinstance(err.__cause__, ConflictError)
        assert s.run(lambda root: root["box"]["n"]) == 300  # only the rival's commits
        assert s.stats()["exhausted"] == 1
    finally:
        s.close()


def test_transactional_decorator_uses_its_own_attempt_limit(store_uri):
    s = snaptree.open(store_uri, retry=RetryPolicy(attempts=50, sleep=lambda s: None))
    try:
        s.run(lambda root: root.update(box={"n": 0}))
        calls = []

        @s.transactional(retries=2)
        def doomed(root: Any) -> None:
            calls.append(1)
            root["box"]["n"] += 1
            run_threads([lambda: s.run(lambda r: r["box"].__setitem__("n", r["box"]["n"] - 1))])

        with pytest.raises(RetriesExhausted):
            doomed()
        assert len(calls) == 2
    finally:
        s.close()


def test_non_transient_error_is_not_retried_and_commits_nothing(store):
    store.run(lambda root: root.update(box={"n": 0}))
    calls = []

    def broken(root: Any) -> None:
        calls.append(1)
        root["box"]["n"] = 99
        root["extra"] = "half a change"
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        store.run(broken)
    assert calls == [1]
    assert store.run(lambda root: (root["box"]["n"], "extra" in root)) == (0, False)
    assert store.stats()["retries"] == 0


def test_threads_times_increments_lose_no_update(patient_store):
    """N threads x M increments of one hot value: every increment is there at the end."""
    threads, increments = 6, 40
    patient_store.run(lambda root: root.update(box={"n": 0}))
    commits_before = patient_store.stats()["commits"]
    start = threading.Barrier(threads, timeout=BARRIER_TIMEOUT)

    def bump(root: Any) -> None:
        root["box"]["n"] += 1

    def worker() -> None:
        start.wait()
        for _ in range(increments):
            patient_store.run(bump)

    run_threads([worker] * threads)
    assert patient_store.stats()["commits"] - commits_before == threads * increments
    assert patient_store.run(lambda root: root["box"]["n"]) == threads * increments


def test_counter_merges_concurrent_bumps_without_conflicts(patient_store):
    patient_store.run(lambda root: root.update(hits=snaptree.Counter()))
    barrier = threading.Barrier(4, timeout=BARRIER_TIMEOUT)

    def bump(root: Any) -> None:
        root["hits"].add(5)
        barrier.wait()  # all four have changed the counter before any commits

    run_threads([lambda: patient_store.run(bump)] * 4)
    assert patient_store.run(lambda root: root["hits"].value) == 20
    assert patient_store.stats()["conflicts"] == 0


def test_concurrent_inserts_of_different_keys_commit_without_retries(patient_store):
    """BTree conflict resolution merges inserts and deletes of different keys."""
    patient_store.run(lambda root: root.update(users={f"u{i:03}": i for i in range(10)}))
    barrier = threading.Barrier(4, timeout=BARRIER_TIMEOUT)

    def insert(root: Any, i: int) -> None:
        users = root["users"]
        users[f"new{i}"] = {"name": f"user {i}"}
        del users[f"u{i:03}"]
        barrier.wait()  # all have changed the mapping before any commits

    run_threads([lambda i=i: patient_store.run(insert, i) for i in range(4)])
    keys = patient_store.run(lambda root: list(root["users"].keys()))
    assert {f"new{i}" for i in range(4)} <= set(keys)
    assert not {f"u{i:03}" for i in range(4)} & set(keys)
    assert len(keys) == 10
    assert patient_store.stats()["conflicts"] == 0


def test_root_tolerates_concurrent_inserts_of_different_keys(patient_store):
    barrier = threading.Barrier(3, timeout=BARRIER_TIMEOUT)

    def insert(root: Any, i: int) -> None:
        root[f"section{i}"] = {"items": []}
        barrier.wait()

    patient_store.run(lambda root: root.update(existing=1))
    run_threads([lambda i=i: patient_store.run(insert, i) for i in range(3)])
    assert patient_store.stats()["conflicts"] == 0
    assert patient_store.run(lambda root: sorted(root.keys())) == [
        "existing",
        "section0",
        "section1",
        "section2",
    ]


def _on_call_scenario(store: snaptree.Store, guard: bool) -> dict[str, bool]:
    """Two doctors each go off call if the *other* one is still on call (write skew)."""
    store.run(lambda root: root.update(doctors={"alice": {"on": True}, "bob": {"on": True}}))
    barrier = threading.Barrier(2, timeout=BARRIER_TIMEOUT)
    first = {"alice": True, "bob": True}

    def go_off(root: Any, me: str, other: str) -> None:
        doctors = root["doctors"]
        if guard:
            snaptree.read_current(doctors[other])
        other_on = doctors[other]["on"]
        if first[me]:
            first[me] = False
            barrier.wait()  # both have checked the other before either writes
        if other_on:
            doctors[me]["on"] = False

    run_threads(
        [
            lambda: store.run(go_off, "alice", "bob"),
            lambda: store.run(go_off, "bob", "alice"),
        ]
    )
    return store.run(lambda root: {k: v["on"] for k, v in root["doctors"].items()})


def test_write_skew_happens_without_read_current(patient_store):
    """The anomaly: each transaction read what the other wrote, and both committed."""
    assert _on_call_scenario(patient_store, guard=False) == {"alice": False, "bob": False}


def test_read_current_prevents_write_skew(patient_store):
    state = _on_call_scenario(patient_store, guard=True)
    assert sorted(state.values()) == [False, True]  # exactly one doctor still on call
    assert patient_store.stats()["retries"] == 1
