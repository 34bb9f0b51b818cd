"""Races: interleave (a deterministic one of two functions) and race (ZODB's racetest)."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter as _Tally
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ArgumentError
from ..store import Store
from ._conflicts import in_control, name_of

#: Seconds any helper here waits for a thread or an event before it fails.
WAIT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Interleaving:
    """What :func:`interleave` ran: how often each function ran and what it returned.

    ``second_runs`` is 1 when ``second`` committed without meeting a
    conflict (its changes did not overlap ``first``'s, or the storage merged
    them), 2 when ``first``'s commit made it conflict and run again.
    """

    first_runs: int
    second_runs: int
    first_result: Any
    second_result: Any

    @property
    def conflicted(self) -> bool:
        return self.second_runs > 1


def interleave(
    store: Store,
    first: Callable[[Any], Any],
    second: Callable[[Any], Any],
    *,
    timeout: float = WAIT_TIMEOUT,
) -> Interleaving:
    """Race two functions deterministically: both read, ``first`` commits, then ``second``.

    ``second`` runs first in a thread of its own, up to its commit, and
    waits there; ``first`` then runs and commits in the calling thread;
    then ``second`` commits, and meets a conflict if ``first`` changed what
    it changed or read with ``snaptree.read_current`` (unless the storage
    merges the two changes: different keys of a mapping, a ``Counter``). A
    conflict re-runs ``second`` on the new state, as ``store.run`` always
    does. Both see the state as it was before either commits: the
    interleaving that turns a check-then-write into write skew. Each takes
    the root, like a function given to ``store.run``. Chaos stands down
    for the store meanwhile. Every wait is bounded by *timeout* seconds.

    Example::

        result = interleave(store, lambda r: go_off(r, "alice"), lambda r: go_off(r, "bob"))
        assert result.conflicted  # go_off reads the other doctor with read_current
    """
    runs = {"first": 0, "second": 0}
    second_waits, first_done = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def second_body(root: Any) -> Any:
        runs["second"] += 1
        result = second(root)
        if runs["second"] == 1:
            second_waits.set()
            if not first_done.wait(timeout):
                raise TimeoutError(f"interleave: first did not commit within {timeout:g} s")
        return result

    def first_body(root: Any) -> Any:
        runs["first"] += 1
        return first(root)

    def run_second() -> None:
        try:
            outcome["second"] = store.run(second_body)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            second_waits.set()

    thread = threading.Thread(target=run_second, name="snaptree-interleave-second", daemon=True)
    with in_control(store), store.alongside():  # first must not wait for second's turn
        thread.start()
        try:
            if not second_waits.wait(timeout):
                raise AssertionError(
                    f"interleave: second did not reach its commit in {timeout:g} s"
                )
            if "error" not in outcome:
                outcome["first"] = store.run(first_body)
        finally:
            first_done.set()
            thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"interleave: second still running after {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return Interleaving(runs["first"], runs["second"], outcome["first"], outcome["second"])


# -- race -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RaceReport:
    """What :func:`race` did: the seed, the operations run, the snapshots checked."""

    seed: int
    operations: dict[str, int]
    snapshots_checked: int
    conflicts: int


def _with_rng(root: Any, operation: Callable[[Any, random.Random], Any], seed: int) -> Any:
    """Run *operation* with a generator that starts afresh on every attempt of the call."""
    return operation(root, random.Random(seed))


def race(
    store: Store,
    operations: Sequence[Callable[[Any, random.Random], Any]],
    invariant: Callable[[Any], Any],
    *,
    threads: int = 4,
    seconds: float = 2.0,
    seed: int | None = None,
) -> RaceReport:
    """Run random operations from *threads* threads while checking *invariant* on snapshots.

    ZODB's racetest, for applications: each worker thread repeatedly picks
    one of *operations* and runs it with ``store.run(op, rng)``, while the
    calling thread opens snapshot after snapshot and calls
    ``invariant(root)`` on each, and once more on the final state. The
    invariant reports a violation by raising ``AssertionError`` (an
    ``assert``) or by returning ``False``. The first violation, or the first error of an operation,
    stops the race and fails it with the snapshot's tid, the message and
    the seed.

    ``rng`` is a ``random.Random`` that gives the same numbers on every
    attempt of one call, so an operation may draw its arguments from it and
    stay retry-safe. The seed (printed, and random unless given) fixes what
    each worker does: which operations, in which order, with which numbers;
    the threads' schedule is the operating system's. The race stops after
    *seconds* (each worker runs at least one operation); every thread is
    joined with a timeout.

    Example::

        race(store, [transfer, deposit_and_withdraw], total_is_constant, seed=7)
    """
    if not operations:
        raise ArgumentError("race needs at least one operation")
    if threads < 1 or seconds <= 0:
        raise ArgumentError(
            f"threads must be at least 1 and seconds positive, not {threads!r} and {seconds!r}"
        )
    seed = int.from_bytes(os.urandom(4), "big") if seed is None else seed
    print(f"snaptree.testing.race: seed {seed} (repeat with seed={seed})")
    failed = threading.Event()
    failures: list[str] = []
    done = _Tally[str]()
    lock = threading.Lock()
    conflicts_before = store.stats()["conflicts"]
    deadline = time.monotonic() + seconds

    def fail(message: str) -> None:
        with lock:
            failures.append(message)
        failed.set()

    def worker(number: int) -> None:
        rng = random.Random(f"{seed}/{number}")
        ran = 0  # at least one operation each, however late the thread got to run
        while not failed.is_set() and (not ran or time.monotonic() < deadline):
            ran += 1
            operation = rng.choice(operations)
            call_seed = rng.getrandbits(64)
            try:
                store.run(_with_rng, operation, call_seed)
            except Exception as exc:
                fail(
                    f"operation {name_of(operation)} failed in worker {number}: "
                    f"{type(exc).__name__}: {exc}"
                )
                return
            with lock:
                done[name_of(operation)] += 1

    def check(when: str) -> bool:
        with store.snapshot() as snap:
            try:
                if invariant(snap.root) is False:
                    # A predicate written instead of an assert: False is a violation too.
                    raise AssertionError("it returned False")
            except Exception as exc:
                kind = "" if isinstance(exc, AssertionError) else f"{type(exc).__name__}: "
                fail(
                    f"invariant {name_of(invariant)} violated {when} at tid {snap.tid} "
                    f"({snap.committed_at.isoformat()}): {kind}{exc}"
                )
                return False
        return True

    checked = 1
    workers = [
        threading.Thread(target=worker, args=(i,), name=f"snaptree-race-{i}", daemon=True)
        for i in range(threads)
    ]
    # Turns would make the workers' transactions overlap rarely: interleavings are the point.
    with store.alongside():
        if check("before any operation ran"):
            for thread in workers:
                thread.start()
            while not failed.is_set() and time.monotonic() < deadline:
                checked += 1
                if not check("while the operations ran"):
                    break
            for thread in workers:
                thread.join(WAIT_TIMEOUT)
            stuck = [thread.name for thread in workers if thread.is_alive()]
            if stuck:
                fail(f"threads still running {WAIT_TIMEOUT:g} s after the race ended: {stuck}")
            elif not failures:
                checked += 1
                check("after the race")
    if failures:
        raise AssertionError(f"{failures[0]} [seed {seed}: repeat with race(..., seed={seed})]")
    return RaceReport(
        seed=seed,
        operations=dict(done),
        snapshots_checked=checked,
        conflicts=store.stats()["conflicts"] - conflicts_before,
    )
