"""The retry policy: which errors are retried, how long it waits, and what it reports."""

from __future__ import annotations

import pickle

import pytest
from ZODB.POSException import ConflictError

import snaptree
from snaptree import ArgumentError, RetriesExhausted, RetryPolicy
from snaptree.retry import ConflictStats, Retry, run_with_retries


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def policy(fake: FakeTime, **kw: object) -> RetryPolicy:
    return RetryPolicy(sleep=fake.sleep, clock=fake.clock, rand=lambda: 1.0, **kw)


def always_conflicting() -> None:
    raise Retry(ConflictError(oid=b"\0" * 7 + b"\x2a", message="boom"))


def test_backoff_is_exponential_with_a_cap_and_full_jitter():
    """Attempt n waits up to base*2**(n-1), never more than max_delay, scaled by a uniform draw."""
    top = RetryPolicy(base_delay=0.01, max_delay=0.05, rand=lambda: 1.0)
    assert [top.backoff(n) for n in (1, 2, 3, 4, 5)] == pytest.approx(
        [0.01, 0.02, 0.04, 0.05, 0.05]
    )
    half = RetryPolicy(base_delay=0.01, max_delay=0.05, rand=lambda: 0.5)
    assert half.backoff(2) == pytest.approx(0.01)
    assert RetryPolicy(rand=lambda: 0.0).backoff(7) == 0.0
    assert top.backoff(1025) == top.backoff(10_000) == pytest.approx(0.05)  # no OverflowError


def test_attempts_are_bounded_and_exhaustion_names_the_conflict():
    """After `attempts` transient failures the error says how many and on which object."""
    fake = FakeTime()
    stats = ConflictStats()
    with pytest.raises(RetriesExhausted) as info:
        run_with_retries(always_conflicting, policy(fake, attempts=4), stats)
    err = info.value
    assert err.attempts == 4
    assert err.oid == "0x2a"
    assert isinstance(err.__cause__, ConflictError)
    assert len(fake.sleeps) == 3  # no sleep after the last attempt
    counts = stats.snapshot()
    assert (counts["conflicts"], counts["retries"], counts["exhausted"]) == (4, 3, 1)


def test_deadline_stops_retrying_before_it_would_be_passed():
    """No sleep extends past the deadline, whatever attempts remain."""
    fake = FakeTime()
    with pytest.raises(RetriesExhausted) as info:
        run_with_retries(
            always_conflicting,
            policy(fake, attempts=1000, base_delay=0.1, max_delay=0.1, deadline=1.0),
            ConflictStats(),
        )
    assert "deadline" in str(info.value)
    assert fake.now <= 1.0
    assert info.value.attempts == len(fake.sleeps) + 1


def test_success_after_transient_failures_returns_the_value():
    fake = FakeTime()
    outcomes = iter([Retry(ConflictError()), Retry(ConflictError()), None])

    def attempt() -> str:
        failure = next(outcomes)
        if failure:
            raise failure
        return "done"

    stats = ConflictStats()
    assert run_with_retries(attempt, policy(fake), stats) == "done"
    assert stats.snapshot()["retries"] == 2


def test_other_errors_propagate_on_the_first_attempt():
    calls = []

    def attempt() -> None:
        calls.append(1)
        raise KeyError("not transient")

    with pytest.raises(KeyError):
        run_with_retries(attempt, RetryPolicy(), ConflictStats())
    assert calls == [1]


@pytest.mark.parametrize(
    "bad", [{"attempts": 0}, {"attempts": 2.5}, {"base_delay": -1}, {"deadline": 0}]
)
def test_nonsense_policies_are_argument_errors_naming_the_argument(bad):
    """ArgumentError is also a ValueError, which these were before."""
    (name,) = bad
    with pytest.raises(ArgumentError, match=name):
        RetryPolicy(**bad)


def test_attempts_count_the_first_one_and_retries_the_rest():
    assert RetryPolicy().attempts == 20
    assert RetryPolicy().retries == 19
    assert RetryPolicy(attempts=1).retries == 0


def test_the_path_of_the_conflict_is_looked_up_only_when_giving_up():
    """Finding a path reads the tree: a call that succeeds after retries must not pay it."""
    asked: list[bytes] = []

    def locate(oid: bytes) -> str:
        asked.append(oid)
        return "accounts/a1"

    outcomes = iter([Retry(ConflictError(oid=b"\0" * 7 + b"\x2a")), None])

    def attempt() -> str:
        failure = next(outcomes)
        if failure:
            raise failure
        return "done"

    fake = FakeTime()
    assert run_with_retries(attempt, policy(fake), ConflictStats(), locate) == "done"
    assert asked == []
    with pytest.raises(RetriesExhausted) as info:
        run_with_retries(always_conflicting, policy(fake, attempts=2), ConflictStats(), locate)
    assert asked == [b"\0" * 7 + b"\x2a"]
    assert info.value.path == "accounts/a1"
    assert "2 attempt(s) allowed: the first and 1 retry)" in str(info.value)
    assert "the last conflict was at accounts/a1 on" in str(info.value)


def test_retries_exhausted_survives_pickling():
    """Errors cross process boundaries (exporter processes, ZEO), so they must unpickle."""
    err = RetriesExhausted(3, "0x2a", "snaptree.tree.Mapping", "3 attempts allowed", "a/b")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.attempts, copy.oid, copy.class_name, copy.path) == (
        3,
        "0x2a",
        "snaptree.tree.Mapping",
        "a/b",
    )
    assert str(copy) == str(err)


def test_exhaustion_by_a_conflict_that_names_no_object_still_reads_as_a_sentence():
    """Forced conflicts (snaptree.testing) carry no oid."""
    message = str(snaptree.RetriesExhausted(3, None, None))
    assert "gave up after 3 attempt(s): the last conflict named no object;" in message
