"""Conflict-retry tests: concurrent writers through store.run lose nothing.

Two-transaction races use snaptree.testing (interleave, force_conflicts), the
kit applications use; wider ones force their interleaving with barriers and
events, never with sleeps; every thread is joined with a timeout.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import pytest
from persistent import Persistent
from ZODB.POSException import ConflictError
from ZODB.utils import oid_repr

import snaptree
from _threads import run_threads
from snaptree import RetriesExhausted, RetryPolicy
from snaptree.testing import force_conflicts, interleave

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

    def bump(root: Any) -> None:
        root["box"]["n"] += 1

    result = interleave(patient_store, bump, bump)  # both read 0 before either commits

    assert patient_store.run(lambda root: root["box"]["n"]) == 2
    assert (result.first_runs, result.second_runs) == (1, 2)
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
        assert err.path == "box"
        assert "the last conflict was at box on snaptree.tree.Mapping" in str(err)
        assert isinstance(err.__cause__, ConflictError)
        assert s.run(lambda root: root["box"]["n"]) == 300  # only the rival's commits
        assert s.stats()["exhausted"] == 1
    finally:
        s.close()


@pytest.mark.parametrize("retries", [0, 1, 2])
def test_transactional_retries_means_tries_after_the_first_attempt(store_uri, retries):
    """retries=N: the first attempt and N more; retries=0 tries once."""
    s = snaptree.open(store_uri, retry=RetryPolicy(attempts=50, sleep=lambda s: None))
    try:
        s.run(lambda root: root.update(box={"n": 0}))
        calls = []

        @s.transactional(retries=retries)
        def doomed(root: Any) -> None:
            calls.append(1)
            root["box"]["n"] += 1

        with force_conflicts(s, times=retries + 5), pytest.raises(RetriesExhausted) as info:
            doomed()
        assert len(calls) == info.value.attempts == retries + 1
        assert f"the first and {retries} retr" in str(info.value)
        assert isinstance(info.value.__cause__, ConflictError)
        assert s.run(lambda root: root["box"]["n"]) == 0
    finally:
        s.close()


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_transactional_refuses_a_retries_count_that_is_not_a_natural_number(store, bad):
    with pytest.raises(snaptree.ArgumentError, match="retries must be an int of 0 or more"):
        store.transactional(retries=bad)


def test_retries_exhausted_on_a_bucket_names_the_mapping_it_belongs_to(store_uri):
    """A big mapping keeps its keys in buckets: the conflict is on one, the path its mapping's."""
    s = snaptree.open(store_uri, retry=RetryPolicy(attempts=2, sleep=lambda s: None))
    try:
        s.run(
            lambda root: root.update(
                teams={"red": {"scores": {f"p{i:04}": 0 for i in range(2000)}}}
            )
        )
        steps = itertools.count(1)

        def rival() -> None:
            s.run(lambda root: root["teams"]["red"]["scores"].__setitem__("p1500", -next(steps)))

        def doomed(root: Any) -> None:
            root["teams"]["red"]["scores"]["p1500"] = 1  # the rival's values are all different
            run_threads([rival])

        with pytest.raises(RetriesExhausted) as info:
            s.run(doomed)
        assert info.value.class_name == "BTrees.OOBTree.OOBucket"
        assert info.value.path == "teams/red/scores"
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
    """Two doctors each go off call if the *other* one is still on call (write skew).

    Forced order: both read, then alice commits, then bob commits.
    """
    store.run(lambda root: root.update(doctors={"alice": {"on": True}, "bob": {"on": True}}))

    def go_off(root: Any, me: str, other: str) -> None:
        doctors = root["doctors"]
        if guard:
            snaptree.read_current(doctors[other])
        if doctors[other]["on"]:
            doctors[me]["on"] = False

    result = interleave(
        store, lambda root: go_off(root, "alice", "bob"), lambda root: go_off(root, "bob", "alice")
    )
    assert result.first_runs == 1
    return store.run(lambda root: {k: v["on"] for k, v in root["doctors"].items()})


def test_write_skew_happens_without_read_current(patient_store):
    """The anomaly: each transaction read what the other wrote, and both committed."""
    assert _on_call_scenario(patient_store, guard=False) == {"alice": False, "bob": False}
    assert patient_store.stats()["retries"] == 0


def test_read_current_prevents_write_skew(patient_store):
    """bob read alice's record current; alice's commit makes bob's conflict and retry."""
    assert _on_call_scenario(patient_store, guard=True) == {"alice": False, "bob": True}
    assert patient_store.stats()["retries"] == 1


def test_read_current_guards_a_node_that_is_not_loaded_yet(patient_store):
    """A ghost has no serial yet; ZODB's readCurrent alone would record nothing for it."""
    patient_store.run(
        lambda root: root.update(doctors={"alice": {"on": True}, "bob": {"on": True}})
    )
    patient_store.db.cacheMinimize()  # every connection's objects become ghosts
    ghost_states: list[object] = []

    def alice_goes_off(root: Any) -> None:
        bob = root["doctors"]["bob"]
        ghost_states.append(bob._p_changed)
        snaptree.read_current(bob)
        if bob["on"]:
            root["doctors"]["alice"]["on"] = False

    def bob_goes_off(root: Any) -> None:
        root["doctors"]["bob"]["on"] = False

    # alice guards bob's record and waits; bob goes off call and commits; alice commits.
    interleave(patient_store, bob_goes_off, alice_goes_off)
    assert ghost_states[0] is None  # the node was a ghost when read_current was called
    assert len(ghost_states) == 2  # the conflict was detected and alice's call ran again
    state = patient_store.run(lambda root: {k: v["on"] for k, v in root["doctors"].items()})
    assert state == {"alice": True, "bob": False}


def test_read_current_on_a_large_mapping_covers_every_bucket(patient_store):
    """A change to one key rewrites only its bucket; the guard must still see it."""
    patient_store.run(lambda root: root.update(rota={f"d{i:04}": True for i in range(1000)}))

    def last_one_on_call_stays(root: Any) -> None:
        rota = root["rota"]
        snaptree.read_current(rota)
        if rota["d0999"]:
            rota["d0000"] = False

    result = interleave(
        patient_store, lambda r: r["rota"].__setitem__("d0999", False), last_one_on_call_stays
    )
    assert result.second_runs == 2
    assert patient_store.run(lambda root: (root["rota"]["d0000"], root["rota"]["d0999"])) == (
        True,
        False,
    )


class _ConflictAtVote:
    """A data manager whose vote fails with a genuine ZODB ConflictError, ``times`` times."""

    def __init__(self, times: int) -> None:
        self.left = times
        self.transaction_manager = None

    def tpc_vote(self, txn: Any) -> None:
        if self.left > 0:
            self.left -= 1
            raise ConflictError(message="forced by the test")

    def abort(self, txn: Any) -> None:
        pass

    tpc_begin = commit = tpc_finish = tpc_abort = abort

    def sortKey(self) -> str:
        return "~test-conflict-at-vote"


class _JoinEveryTransaction:
    """An ISynchronizer that joins one data manager to every transaction it sees begin."""

    def __init__(self, manager: _ConflictAtVote) -> None:
        self.manager = manager
        self.begun = 0

    def newTransaction(self, txn: Any) -> None:
        self.begun += 1
        txn.join(self.manager)

    def beforeCompletion(self, txn: Any) -> None:
        pass

    def afterCompletion(self, txn: Any) -> None:
        pass


def test_a_registered_synchronizer_can_force_a_conflict_the_store_retries(patient_store):
    synchronizer = _JoinEveryTransaction(_ConflictAtVote(times=1))
    calls: list[int] = []

    def add(root: Any) -> None:
        calls.append(1)
        root["n"] = root.get("n", 0) + 1

    patient_store.register_synchronizer(synchronizer)
    with patient_store.snapshot() as snap:
        assert "n" not in snap.root
    assert synchronizer.begun == 0  # snapshots do not get it
    patient_store.run(add)
    stats = patient_store.stats()
    assert (len(calls), stats["conflicts"], stats["retries"]) == (2, 1, 1)
    patient_store.unregister_synchronizer(synchronizer)
    patient_store.run(add)
    assert synchronizer.begun == 2  # the two attempts of the first call only
    assert patient_store.run(lambda root: root["n"]) == 2
    with pytest.raises(snaptree.ArgumentError, match="not registered"):
        patient_store.unregister_synchronizer(synchronizer)


def test_a_node_assigned_again_after_a_conflict_in_store_is_written_not_lost(
    tmp_path: Path,
) -> None:
    """A conflict raised while storing the parent must not leave the new child looking stored.

    ZODB gives the child an oid while pickling the parent; FileStorage then
    refuses the parent (its serial is stale, and a FlatMapping cannot resolve
    conflicts). The retry assigns the same node object again: it must be
    written in full, not as a reference to a record that never was.
    """
    path = str(tmp_path / "retry.fs")
    node = snaptree.Mapping({"v": 1, "deep": {"w": 2}})
    read, committed = threading.Event(), threading.Event()
    attempts: list[int] = []

    def put(root: Any) -> None:
        attempts.append(1)
        flat = root["f"]
        len(flat)  # loaded at the snapshot the first attempt started from
        if len(attempts) == 1:
            read.set()
            assert committed.wait(30)
        flat["new"] = node

    with snaptree.open(path) as store:
        store.run(lambda root: root.__setitem__("f", {1: "a", "x": "b"}))  # mixed keys
        writer = threading.Thread(target=store.run, args=(put,))
        writer.start()
        assert read.wait(30)
        store.run(lambda root: root["f"].__setitem__("y", 1))
        committed.set()
        writer.join(30)
        assert not writer.is_alive()
    assert len(attempts) == 2
    with snaptree.open(path) as store:
        assert store.run(lambda root: root["f"]["new"]) == {"v": 1, "deep": {"w": 2}}


class _StoredOnTheSecondTry(Persistent):
    """A new object whose first store fails transiently while it is itself being pickled."""

    failures = 1

    def __init__(self) -> None:
        self.value = "kept"

    def __getstate__(self) -> Any:
        if type(self).failures:
            type(self).failures -= 1
            raise ConflictError("the first store of this new object fails")
        return super().__getstate__()


def test_a_new_object_whose_own_store_failed_is_written_in_full_on_the_retry(
    tmp_path: Path,
) -> None:
    """The object being stored when the store failed is new: ZODB had given it an oid and
    this connection. Left so, the retry, assigning it again, wrote only a reference to it,
    and the tree pointed at a record that was never written."""
    path = str(tmp_path / "new.fs")
    obj = _StoredOnTheSecondTry()
    attempts: list[int] = []

    def put(root: Any) -> None:
        attempts.append(1)
        root["obj"] = obj

    with snaptree.open(path) as store:
        store.run(put)
    assert len(attempts) == 2
    with snaptree.open(path) as store:
        assert store.run(lambda root: root["obj"].value) == "kept"
