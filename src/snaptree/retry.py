"""The retry policy for conflicting transactions, and the accounting of conflicts.

Only errors that ZODB and the transaction package mark as transient
(``transaction.interfaces.TransientError``: ConflictError, ReadConflictError,
ZEO disconnects...) or that a data manager declares retryable are retried;
anything else is a bug or bad input and propagates at once.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter as _Tally
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transaction.interfaces import NoTransaction, TransientError
from ZODB.utils import oid_repr

from .errors import ArgumentError, Error, RetriesExhausted


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How many times, and how patiently, to retry a conflicting transaction.

    Attempt *n* (n >= 1) that fails is followed by a sleep drawn uniformly from
    ``[0, min(max_delay, base_delay * 2 ** (n - 1))]``: binary exponential
    backoff with *full jitter*. The randomness matters more than the
    exponent: threads that collided once pick different delays, so the next
    round usually has a winner instead of the same collision again.

    ``attempts`` bounds the total number of attempts, the first included:
    the default 20 is the first attempt and up to 19 retries (``retries``;
    ``store.transactional(retries=N)`` allows N + 1 attempts).
    ``deadline`` (seconds, optional) bounds the total time: no new attempt
    starts, and no sleep extends, past it. ``sleep``, ``clock`` and ``rand``
    are the policy's sense of time and chance; replace them to test code
    that retries without really waiting.
    """

    attempts: int = 20
    base_delay: float = 0.002
    max_delay: float = 0.25
    deadline: float | None = None
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)
    rand: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ArgumentError(
                f"attempts must be an int of at least 1 (the first attempt), not {self.attempts!r}"
            )
        if self.base_delay < 0 or self.max_delay < 0:
            raise ArgumentError(
                f"base_delay and max_delay must not be negative, not {self.base_delay!r} "
                f"and {self.max_delay!r}"
            )
        if self.deadline is not None and self.deadline <= 0:
            raise ArgumentError(f"deadline must be positive seconds, not {self.deadline!r}")

    @property
    def retries(self) -> int:
        """How many times a conflicting call is tried again after its first attempt."""
        return self.attempts - 1

    def backoff(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number *attempt* (1-based)."""
        # The exponent is capped: 2.0 ** 1024 overflows a float, and past 2 ** 64
        # every delay is max_delay anyway.
        cap = min(self.max_delay, self.base_delay * 2.0 ** min(attempt - 1, 64))
        return cap * self.rand()


def describe_conflict(exc: BaseException) -> tuple[str | None, str | None]:
    """Return (oid as hex, class name) of the object a ZODB conflict names, if any."""
    oid = getattr(exc, "oid", None)
    class_name = None
    get_class_name = getattr(exc, "get_class_name", None)
    if get_class_name is not None:
        class_name = get_class_name()
    return (oid_repr(oid) if oid is not None else None), class_name


def is_transient(exc: Exception, tm: Any, txn: Any) -> bool:
    """Whether *exc*, raised in transaction *txn* of manager *tm*, means "try again".

    Decided before the transaction is aborted: afterwards the manager can no
    longer ask its data managers. snaptree's own errors are never transient.
    ``txn`` is None when the transaction could not even begin; a transaction
    that already ended (the function ended it itself) cannot be asked either.
    """
    if isinstance(exc, Error):
        return False
    if isinstance(exc, TransientError):
        return True
    try:
        current = tm.get()
    except NoTransaction:
        return False
    return txn is not None and current is txn and txn.isRetryableError(exc)


class ConflictStats:
    """Thread-safe counters of conflicts, retries, exhausted calls, batches and hot classes.

    Commits are counted by the store's connections (one call at a time
    each, so without a lock): they are counted on every call.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = _Tally[str]()
        self._hot = _Tally[str]()

    def count(self, what: str, class_name: str | None = None) -> None:
        with self._lock:
            self._counts[what] += 1
            if class_name:
                self._hot[class_name] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "conflicts": self._counts["conflicts"],
                "retries": self._counts["retries"],
                "exhausted": self._counts["exhausted"],
                "batches": self._counts["batches"],
                "hot_classes": self._hot.most_common(),
            }


class Retry(Exception):
    """Raised by one attempt to say: this failure is transient, try again.

    Classification must happen inside the attempt, before its transaction is
    aborted: afterwards the transaction manager can no longer tell.
    """

    def __init__(self, cause: BaseException):
        super().__init__(cause)
        self.cause = cause


def give_up_reason(policy: RetryPolicy, number: int, started: float, delay: float) -> str:
    """Why a call whose attempt *number* just conflicted must stop now ("" if it may go on)."""
    if number >= policy.attempts:
        retries = f"{policy.retries} {'retry' if policy.retries == 1 else 'retries'}"
        return f"{policy.attempts} attempt(s) allowed: the first and {retries}"
    if policy.deadline is not None:
        remaining = policy.deadline - (policy.clock() - started)
        if remaining <= delay:
            return f"deadline of {policy.deadline:g} s reached"
    return ""


def exhausted(
    number: int, cause: BaseException, reason: str, locate: Callable[[bytes], str | None] | None
) -> RetriesExhausted:
    """The RetriesExhausted a call raises when it gives up after *number* attempts."""
    oid, class_name = describe_conflict(cause)
    raw_oid = getattr(cause, "oid", None)
    path = locate(raw_oid) if locate is not None and raw_oid is not None else None
    error = RetriesExhausted(number, oid, class_name, reason, path)
    error.__cause__ = cause
    return error


def run_with_retries(
    attempt: Callable[[], Any],
    policy: RetryPolicy,
    stats: ConflictStats,
    locate: Callable[[bytes], str | None] | None = None,
    *,
    failed: Retry | None = None,
    started: float | None = None,
) -> Any:
    """Call *attempt* until it returns, raises a non-transient error, or the policy gives up.

    ``locate`` turns the oid of the object that conflicted last into its
    path in the tree for :class:`RetriesExhausted`; it is asked only when
    giving up, since finding a path means reading the tree. ``failed``
    says the first attempt was already made (by a caller keeping the
    common case short) and failed with it; ``started`` is when the call
    began, if the caller noted it.
    """
    if started is None:
        started = policy.clock()
    number = 0
    while True:
        number += 1
        if failed is not None:
            cause, failed = failed.cause, None
        else:
            try:
                return attempt()
            except Retry as retry:
                cause = retry.cause
        stats.count("conflicts", describe_conflict(cause)[1])
        delay = policy.backoff(number)
        reason = give_up_reason(policy, number, started, delay)
        if reason:
            stats.count("exhausted")
            raise exhausted(number, cause, reason, locate)
        stats.count("retries")
        policy.sleep(delay)
