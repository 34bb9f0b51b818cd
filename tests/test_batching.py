"""Batched calls (store.run_batched): one transaction for many callers, each with its own outcome.

A batch is formed deterministically: the first caller's function (run by
that caller, the combiner) waits on an event until the other callers have
queued their calls; releasing it lets the next batch take all of them.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any

import pytest
from ZODB.POSException import ConflictError

import snaptree
from _threads import run_threads
from snaptree import MisuseError, RetriesExhausted, RetryPolicy
from snaptree.testing import force_conflicts

WAIT = 30.0


@pytest.fixture
def patient(store_uri: str):
    s = snaptree.open(store_uri, retry=RetryPolicy(attempts=5, sleep=lambda seconds: None))
    s.run(lambda root: root.update(log=[], counts={}))
    yield s
    s.close()


def queued(store: snaptree.Store) -> int:
    """Calls waiting in the store's batch queue."""
    return len(store._writes._combiner._queue)


def wait_until(predicate: Callable[[], bool]) -> None:
    pause = threading.Event()
    for _ in range(int(WAIT * 1000)):
        if predicate():
            return
        pause.wait(0.001)
    raise AssertionError("timed out")


def one_batch(
    store: snaptree.Store, calls: list[Callable[[], Any]], *, in_order: bool = False
) -> list[Any]:
    """Run *calls* (each a run_batched call) so that all of them land in one batch.

    A first call holds the combiner role until the others are queued; the
    next batch takes them all, in the order they were queued (*in_order*:
    the order of *calls*). Returns each call's result, or the exception it
    raised.
    """
    entered, release = threading.Event(), threading.Event()

    def hold(root: Any) -> None:
        entered.set()
        assert release.wait(WAIT)

    def outcome(place: int, call: Callable[[], Any]) -> Any:
        if in_order:
            wait_until(lambda: queued(store) == place)  # the calls before it are queued
        try:
            return call()
        except Exception as exc:
            return exc

    def release_when_queued() -> None:
        wait_until(lambda: queued(store) == len(calls))
        release.set()

    holder = threading.Thread(target=store.run_batched, args=(hold,), daemon=True)
    holder.start()
    assert entered.wait(WAIT)  # the holder is the combiner, inside its own batch
    results = run_threads(
        [release_when_queued, *[lambda i=i, c=c: outcome(i, c) for i, c in enumerate(calls)]]
    )
    holder.join(WAIT)
    assert not holder.is_alive()
    return results[1:]


def note(root: Any, who: str, fail: bool = False) -> str:
    root["log"].append(who)
    root["counts"][who] = root["counts"].get(who, 0) + 1
    if fail:
        raise ValueError(f"{who} refuses")
    return f"{who} ok"


def test_each_batched_caller_gets_its_own_result(patient):
    def own(root: Any, i: int) -> int:
        counts = root["counts"]
        counts[f"t{i}"] = counts.get(f"t{i}", 0) + 1
        return counts[f"t{i}"]

    results = run_threads(
        [lambda i=i: [patient.run_batched(own, i) for _ in range(30)] for i in range(6)]
    )
    assert results == [list(range(1, 31))] * 6
    stats = patient.stats()
    assert stats["commits"] >= 6 * 30 and stats["batches"] <= 6 * 30


def test_calls_queued_while_one_commits_are_committed_together(patient):
    results = one_batch(patient, [lambda w=w: patient.run_batched(note, w) for w in "abcd"])
    assert sorted(results) == ["a ok", "b ok", "c ok", "d ok"]
    assert patient.stats()["batches"] == 2  # the holder's, then the four together
    assert sorted(patient.run(lambda root: list(root["log"]))) == ["a", "b", "c", "d"]


def test_an_exception_in_one_batched_call_commits_the_others_and_nothing_of_its_own(patient):
    """The failing caller gets its own exception; the batch runs again without it."""
    calls = [lambda w=w: patient.run_batched(note, w, fail=(w == "b")) for w in "abc"]
    results = one_batch(patient, calls)
    assert results[0] == "a ok" and results[2] == "c ok"
    assert isinstance(results[1], ValueError) and str(results[1]) == "b refuses"
    assert results[1].__traceback__ is not None
    log, counts = patient.run(lambda root: (list(root["log"]), dict(root["counts"])))
    assert sorted(log) == ["a", "c"] and counts == {"a": 1, "c": 1}
    assert patient.stats()["retries"] == 0  # not a conflict: nothing retried, only run again


def test_a_conflicting_batch_is_retried_and_every_call_applies_once(patient):
    with force_conflicts(patient, times=1, where=note) as forced:
        results = one_batch(patient, [lambda w=w: patient.run_batched(note, w) for w in "abc"])
    assert sorted(results) == ["a ok", "b ok", "c ok"]
    assert forced.conflicts == 1
    counts = patient.run(lambda root: dict(root["counts"]))
    assert counts == {"a": 1, "b": 1, "c": 1}


def test_a_batched_call_exhausts_only_its_own_attempts(patient):
    """Two calls of one batch conflict together: the one allowed no retry gives up alone."""
    once = patient.transactional(retries=0, batched=True)(note)
    patiently = patient.transactional(retries=3, batched=True)(note)
    with force_conflicts(patient, times=1, where=note):
        results = one_batch(patient, [lambda: once("once"), lambda: patiently("patient")])
    assert isinstance(results[0], RetriesExhausted) and results[0].attempts == 1
    assert isinstance(results[0].__cause__, ConflictError)
    assert results[1] == "patient ok"
    assert patient.run(lambda root: dict(root["counts"])) == {"patient": 1}


def test_a_failure_at_commit_that_no_call_can_be_blamed_for_runs_each_call_alone(patient):
    """A commit of the batch fails (not a conflict): each call then commits on its own."""

    class FailVoteWith:
        """Fails tpc_vote of every transaction in which the function of *who* ran."""

        transaction_manager = None

        def __init__(self, who: str) -> None:
            self.who = who

        def newTransaction(self, txn: Any) -> None:
            txn.join(self)

        def beforeCompletion(self, txn: Any) -> None:
            pass

        def afterCompletion(self, txn: Any) -> None:
            pass

        def tpc_vote(self, txn: Any) -> None:
            if self.who in txn.extension.get("ran", ()):
                raise ValueError(f"the commit of {self.who} fails")

        def abort(self, txn: Any) -> None:
            pass

        tpc_begin = commit = tpc_finish = tpc_abort = abort

        def sortKey(self) -> str:
            return "~test"

    def marked(root: Any, who: str) -> str:
        txn = root._p_jar.transaction_manager.get()
        txn.extension["ran"] = [*txn.extension.get("ran", ()), who]
        return note(root, who)

    guard = FailVoteWith("b")
    patient.register_synchronizer(guard)
    try:
        results = one_batch(patient, [lambda w=w: patient.run_batched(marked, w) for w in "abc"])
    finally:
        patient.unregister_synchronizer(guard)
    assert results[0] == "a ok" and results[2] == "c ok"
    assert isinstance(results[1], ValueError) and "the commit of b fails" in str(results[1])
    assert patient.run(lambda root: dict(root["counts"])) == {"a": 1, "c": 1}


def test_a_batched_function_runs_in_its_callers_context(patient):
    where: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="nowhere")

    def read(root: Any) -> tuple[str, str]:
        return where.get(), threading.current_thread().name

    def caller(name: str) -> Any:
        where.set(name)
        return patient.run_batched(read)

    results = one_batch(patient, [lambda n=n: caller(n) for n in ("x", "y")])
    assert sorted(result[0] for result in results) == ["x", "y"]


def test_a_batched_call_inside_a_store_call_is_a_misuse(patient):
    with pytest.raises(MisuseError, match="inside another"):
        patient.run(lambda root: patient.run_batched(lambda inner: None))
    with pytest.raises(MisuseError, match="inside another"):
        patient.run_batched(lambda root: patient.run(lambda inner: None))


def test_a_batched_call_returns_plain_data_read_right_after_its_own_function(patient):
    """A later call of the same batch changes the node: each caller sees it as its call left it."""
    patient.run(lambda root: root.update(box={"n": 0}))

    def set_and_return(root: Any, n: int) -> dict[str, int]:
        root["box"]["n"] = n
        return root["box"]

    results = one_batch(
        patient, [lambda n=n: patient.run_batched(set_and_return, n) for n in (1, 2)]
    )
    assert sorted(result["n"] for result in results) == [1, 2]
    assert all(type(result) is dict for result in results)


def test_run_batched_refuses_generator_functions(patient):
    def gen(root: Any) -> Any:
        yield root

    with pytest.raises(MisuseError, match="generator function"):
        patient.run_batched(gen)


def test_an_interrupt_while_the_batch_waits_for_the_disk_acknowledges_no_call(tmp_path):
    """A KeyboardInterrupt in the combiner's wait for the fsync: no call may return success."""
    store = snaptree.open(str(tmp_path / "b.fs"), durability="group")
    store.run(lambda root: root.update(log=[], counts={}))
    combiner = store._writes._combiner
    real_wait = combiner._wait_durable
    waits: list[int] = []

    def interrupted_wait(flushed: int) -> None:
        waits.append(flushed)
        if len(waits) == 2:  # the batch of the callers below, not the holder's own
            raise KeyboardInterrupt
        real_wait(flushed)

    combiner._wait_durable = interrupted_wait

    def call(who: str) -> Callable[[], Any]:
        def attempt() -> Any:
            try:
                return store.run_batched(note, who)
            except BaseException as exc:  # the interrupt reaches the combiner's own thread
                return exc

        return attempt

    try:
        outcomes = one_batch(store, [call("a"), call("b")])
    finally:
        combiner._wait_durable = real_wait
        store.close()
    kinds = sorted(type(o).__name__ for o in outcomes)
    assert kinds == ["DurabilityError", "KeyboardInterrupt"], outcomes
    failed = next(o for o in outcomes if not isinstance(o, KeyboardInterrupt))
    assert "may not be durable" in str(failed)


def test_a_caller_interrupted_while_handed_the_next_batch_passes_the_turn_on() -> None:
    """Interrupted while woken to combine next: the next queued call gets the turn, no hang."""
    from snaptree._batching import BatchedCall, Combiner

    combiner = Combiner(lambda batch: None, None, None, lambda oid: None)  # type: ignore[arg-type]
    policy = RetryPolicy()
    first, second = (BatchedCall(lambda root: None, (), {}, policy) for _ in range(2))
    combiner._queue.extend((first, second))  # each call's wake is held until it is woken
    combiner._combining = True
    first.handed = True  # a combiner finished and woke it to combine next
    combiner._abandon(first)
    assert list(combiner._queue) == [second] and second.handed
    assert second.wake.acquire(timeout=WAIT)  # woken: it will combine
    combiner._abandon(second)  # interrupted too, with nobody left: the role ends
    assert not combiner._queue and not combiner._combining


def test_conflicts_aimed_at_one_function_reach_a_batch_that_mixes_it_with_others(patient):
    """force_conflicts(where=fn): a batch matches if any of its calls runs fn."""

    def other(root: Any) -> None:
        root["log"].append("other")

    with force_conflicts(patient, times=1, where=note) as forced:
        results = one_batch(
            patient, [lambda: patient.run_batched(note, "a"), lambda: patient.run_batched(other)]
        )
    assert results == ["a ok", None]
    assert forced.conflicts == 1
    assert patient.run(lambda root: sorted(root["log"])) == ["a", "other"]


def _jar_and_loads(root: Any) -> tuple[int, int]:
    """The call's connection, and the objects it has loaded since the last look."""
    return id(root._p_jar), root._p_jar.getTransferCounts(clear=True)[0]


def test_batches_run_on_the_connection_of_the_last_batch_whichever_thread_combines(patient):
    """Another thread's connection would load again what the last batch committed (ZODB
    invalidated it there); the connection the last batch ran on has it current."""
    patient.run(lambda root: root.update(box={"n": 0}))
    mine, _ = patient.run(_jar_and_loads)
    ready, done = threading.Event(), threading.Event()
    seen: list[Any] = []

    def other_thread() -> None:
        with patient.transaction() as root:  # this thread's own connection (runs take turns)
            seen.append(_jar_and_loads(root)[0])
        ready.set()
        assert done.wait(WAIT)

        def bump(root: Any) -> tuple[int, int]:
            root["box"]["n"] += 1
            return _jar_and_loads(root)

        seen.append(patient.run_batched(bump))

    thread = threading.Thread(target=other_thread)
    thread.start()
    assert ready.wait(WAIT)
    patient.run_batched(lambda root: root["box"].update(n=5))  # this thread combines
    done.set()
    thread.join(WAIT)
    own, (batched, loads) = seen
    assert own != mine
    assert (batched, loads) == (mine, 0)
    assert patient.run(lambda root: root["box"]["n"]) == 6


def test_a_batch_never_sleeps_past_the_deadline_of_one_of_its_calls(store_uri):
    """The batch sleeps its longest back-off: a call whose deadline that would pass gives up
    rather than sleep past it (it was retried after sleeping 1 s with 0.5 s left)."""
    draws = iter([0.1, 1.0])  # the first call queued draws 0.1 s, the second 1 s
    slept: list[float] = []
    policy = RetryPolicy(
        attempts=5,
        base_delay=1.0,
        max_delay=1.0,
        deadline=None,
        sleep=slept.append,
        clock=lambda: 0.0,  # no time passes but the sleeps
        rand=lambda: next(draws),
    )
    with snaptree.open(store_uri, retry=policy) as store:
        store.run(lambda root: root.update(log=[], counts={}))
        hurried = store.transactional(deadline=0.5, batched=True)(note)
        with force_conflicts(store, times=1, where=note):
            h, p = one_batch(
                store, [lambda: hurried("h"), lambda: store.run_batched(note, "p")], in_order=True
            )
        assert isinstance(h, RetriesExhausted), h
        assert "deadline of 0.5 s reached" in str(h)
        assert p == "p ok" and slept == [1.0]
        assert store.run(lambda root: dict(root["counts"])) == {"p": 1}
