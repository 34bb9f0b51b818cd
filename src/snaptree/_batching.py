"""Batched write calls: one thread commits the work of every caller waiting, in one transaction.

On two cores under the interpreter lock, separate commits do not scale:
each one releases and retakes the lock a dozen times, and more threads
only add hand-offs between the cores. ``store.run_batched`` turns the
callers that arrive while a commit is under way into one transaction
instead ("flat combining", no thread of its own):

1. A caller queues its call. If no caller is combining, it becomes the
   combiner; otherwise it sleeps on a lock of its own.
2. The combiner lets the callers the last batch finished queue their next
   calls (waiting at most :data:`GATHER`), takes the queued calls (its own
   first, at most :data:`MAX_BATCH`), runs their functions one after another
   in one transaction, commits once, and waits for the commit to be
   durable as the store's mode says, still holding the role: calls arriving
   meanwhile queue up, so the next batch is bigger.
3. It hands the role to exactly one waiting caller (the first queued) and
   wakes exactly the callers it finished: no herd of threads woken at once.

What each caller gets is what :meth:`Store.run` gives: its own return
value (read inside the transaction, right after its function ran), its own
exception, its own retry budget. How one call's failure touches the others
of its batch (docs/store.md, "Batched calls"):

- a function raising a non-transient exception fails only its own call:
  the transaction is aborted and the batch runs again without it (the
  other functions run once more, as a retry would run them);
- a conflict (in a function, or at commit) aborts the batch and retries it
  with the store's back-off; every call in it spends one attempt of its
  own budget, and a call whose budget runs out fails alone with
  RetriesExhausted;
- any other failure at commit cannot be blamed on one function: each call
  of the batch then runs in a transaction of its own.
"""

from __future__ import annotations

import collections
import contextvars
import threading
from collections.abc import Callable
from typing import Any

from .errors import DurabilityError, Error
from .retry import ConflictStats, Retry, RetryPolicy, describe_conflict, exhausted, give_up_reason

#: Calls one transaction takes at most: a batch is one commit, and one
#: slow batch holds up every call in it.
MAX_BATCH = 64

#: Seconds between two looks of a waiting caller (the combiner always wakes it).
_WAIT_STEP = 60.0

#: Seconds a combiner waits, before taking its batch, for the callers the
#: last batch finished to queue their next calls. Woken, such a caller needs
#: a turn of the interpreter lock to return and call again, and the thread
#: that finished the batch holds that lock: without the wait, it comes back
#: first and commits alone, the others queue behind it, and batches alternate
#: between one call and the rest. That cost more commits than batching saved
#: when a commit has no fsync to wait for (``relaxed``: 4 threads committed
#: less than 1). The bound is what a caller that does not come back (its
#: thread has other work) costs the next batch; a returning caller takes tens
#: of microseconds (measured with scripts/bench/bench_writes.py).
GATHER = 0.0003


class BatchCommitFailed(Exception):
    """A batch's commit failed with an error no single call can be blamed for."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class BatchedCall:
    """One caller's call: what to run, and what it came to."""

    __slots__ = (
        "args",
        "context",
        "done",
        "error",
        "fn",
        "handed",
        "kwargs",
        "number",
        "policy",
        "result",
        "started",
        "thread",
        "wake",
    )

    def __init__(
        self, fn: Callable[..., Any], args: tuple, kwargs: dict, policy: RetryPolicy
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.policy = policy
        self.context = contextvars.copy_context()
        self.thread = threading.get_ident()
        self.number = 1  # the attempt under way
        self.started = policy.clock() if policy.deadline is not None else 0.0
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.handed = False  # woken to combine next, not done
        self.wake = threading.Lock()  # released by a combiner: done, or the next combiner
        self.wake.acquire()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done = True


class Combiner:
    """Runs batched calls through *attempt* (one transaction per batch); see the module docstring.

    ``attempt(batch)`` is the store's: it returns the storage's flushed
    count once the batch committed, None when one call's function failed
    (that call is done), raises Retry on a conflict, and BatchCommitFailed
    for any other failure at commit. ``wait_durable(flushed)``, if given, is
    called before the callers are woken.
    """

    def __init__(
        self,
        attempt: Callable[[list[BatchedCall]], int | None],
        wait_durable: Callable[[int], None] | None,
        stats: ConflictStats,
        locate: Callable[[bytes], str | None],
    ) -> None:
        self._attempt = attempt
        self._wait_durable = wait_durable
        self._stats = stats
        self._locate = locate
        self._lock = threading.Lock()
        self._queue: collections.deque[BatchedCall] = collections.deque()
        self._combining = False
        #: The threads of the calls the last batch finished for others, not queued again since.
        self._returning: set[int] = set()
        self._returned = threading.Condition(self._lock)  # notified when it empties

    def call(self, fn: Callable[..., Any], args: tuple, kwargs: dict, policy: RetryPolicy) -> Any:
        """Queue one call, combine or wait, and return its own result (or raise its own error)."""
        call = BatchedCall(fn, args, kwargs, policy)
        with self._lock:
            self._queue.append(call)
            lead = not self._combining
            self._combining = True
            if self._returning:
                self._returning.discard(call.thread)
                if not self._returning:
                    self._returned.notify()
        if not lead:
            try:
                while not call.wake.acquire(timeout=_WAIT_STEP):
                    pass  # the combiner always releases it: when done, or when handing over
            except BaseException:  # an interrupt: leave the queue without stalling it
                self._abandon(call)
                raise
            lead = not call.done
        if lead:
            self._combine(call)
        if call.error is not None:
            raise call.error
        return call.result

    def _combine(self, mine: BatchedCall) -> None:
        """Gather, take the queue (*mine* first), commit it, wait for the disk, hand over, wake."""
        batch: list[BatchedCall] = []
        try:
            with self._lock:
                try:
                    if self._returning:  # see GATHER
                        self._returned.wait_for(lambda: not self._returning, GATHER)
                finally:  # even if interrupted: the queue must not keep calls no one takes
                    self._returning.clear()
                    batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
            flushed = self._run(batch)
            if flushed is not None and self._wait_durable is not None:
                try:
                    self._wait_durable(flushed)
                except BaseException as exc:  # never acknowledge a commit that is not on disk
                    failure = exc
                    if not isinstance(exc, Error):  # an interrupt: the others hear why
                        failure = DurabilityError(
                            f"the wait for this batch's commit to reach the disk was "
                            f"interrupted ({type(exc).__name__}): it may not be durable"
                        )
                    for call in batch:
                        if call.error is None:
                            call.result = None
                            call.fail(failure)
                    if failure is not exc:
                        raise
        except BaseException as exc:  # a bug, or an interrupt: every caller must hear of it
            for call in batch:
                if not call.done:
                    call.fail(exc)
            if not isinstance(exc, Exception):
                raise  # an interrupt goes on in the thread it arrived in
        finally:
            successor = None
            with self._lock:
                if self._queue:
                    successor = self._queue[0]  # not done: woken, it combines
                    successor.handed = True
                else:
                    self._combining = False
                self._returning = {call.thread for call in batch if call is not mine}
            if successor is not None:
                successor.wake.release()
            for call in batch:
                if call is not mine:
                    call.wake.release()

    def _abandon(self, call: BatchedCall) -> None:
        """*call*'s thread was interrupted while waiting: take it out of the queue.

        If a combiner took it into a batch already, that batch goes on (as a
        ``run`` interrupted during its commit may still commit); if it was
        handed the next turn to combine, the turn passes to the next call, so
        that no call waits for a combiner that will never come.
        """
        successor = None
        with self._lock:
            if call not in self._queue:
                return
            self._queue.remove(call)
            if call.handed:
                if self._queue:
                    successor = self._queue[0]
                    successor.handed = True
                else:
                    self._combining = False
        if successor is not None:
            successor.wake.release()

    def _run(self, batch: list[BatchedCall]) -> int | None:
        """Commit *batch*, retrying conflicts, until each call is done; the flushed count."""
        pending = batch
        flushed = None
        while pending:
            try:
                committed = self._attempt(pending)
            except Retry as retry:
                pending = self._after_conflict(pending, retry.cause)
                continue
            except BatchCommitFailed as failure:
                if len(pending) == 1:
                    pending[0].fail(failure.error)
                    break
                for call in pending:  # one transaction each: each gets its own outcome
                    alone = self._run([call])
                    flushed = alone if alone is not None else flushed
                break
            if committed is None:  # a function failed: the others again, without it
                pending = [call for call in pending if not call.done]
                continue
            for call in pending:
                call.done = True
            flushed = committed
            break
        return flushed

    def _after_conflict(
        self, pending: list[BatchedCall], cause: BaseException
    ) -> list[BatchedCall]:
        """Each call spent one attempt: the ones with attempts left, after the back-off.

        The batch sleeps the longest back-off its calls drew, so a call whose
        deadline that sleep would pass gives up now, as :meth:`Store.run`
        would rather than sleep past it (its own, shorter draw may have fit).
        """
        self._stats.count("conflicts", describe_conflict(cause)[1])
        waits = [call.policy.backoff(call.number) for call in pending]
        delay = max(  # of the calls that go on by their own draw
            (
                wait
                for call, wait in zip(pending, waits, strict=True)
                if not give_up_reason(call.policy, call.number, call.started, wait)
            ),
            default=0.0,
        )
        again = []
        for call in pending:
            reason = give_up_reason(call.policy, call.number, call.started, delay)
            if reason:
                self._stats.count("exhausted")
                call.fail(exhausted(call.number, cause, reason, self._locate))
            else:
                self._stats.count("retries")
                call.number += 1
                again.append(call)
        if again:
            again[0].policy.sleep(delay)
        return again
