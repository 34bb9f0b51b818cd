"""A store's write calls: attempt, commit, retry, and wait for the disk.

A write call (``run``, ``transactional``, ``transaction``, ``run_batched``)
follows one path: the retry policy (:mod:`snaptree.retry`) decides the
attempts; each attempt takes the calling thread's kept connection and
transaction manager from the pool (:mod:`snaptree._pool`), calls the
function on the tree's root under the guards that turn silent misuse into
errors (:mod:`snaptree._guards`), reads its result to the end
(:mod:`snaptree._results`), and commits; a transient failure is aborted and
tried again. Calls of several threads may take turns
(:mod:`snaptree._write_turns`). Once committed, the call waits until its commit is as durable
as the storage's mode promises (:mod:`snaptree._durable_file`): the
storage's count of flushed commits, read right after the commit, is what it
waits for. Batched calls (:mod:`snaptree._batching`) take the same path with
several functions in one transaction.

The common case (no conflict, no misuse, no synchronizer) is kept short on
purpose: at a few thousand commits per second every attribute lookup and
lock of the layer shows against a hand-written ZODB loop.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from transaction.interfaces import TransientError

from ._batching import BatchCommitFailed, BatchedCall, Combiner
from ._guards import GlobalTransactionGuard, ThreadCalls, call_misuse, check_guards, misuse_error
from ._pool import ConnectionPool, Pair
from ._results import detach, detach_error
from ._write_turns import Turns
from .errors import ArgumentError, Error, MisuseError, StoreClosedError, raised_by_server
from .paths import ROOT_KEY
from .retry import ConflictStats, Retry, RetryPolicy, is_transient, run_with_retries

R = TypeVar("R")


@dataclass(frozen=True)
class CallAttempt:
    """One attempt of a retried write call (``run``, ``transactional``), told to synchronizers.

    The store attaches it to the attempt's transaction before calling the
    function: ``txn.data(CallAttempt)`` (``transaction``'s public per-transaction
    data; a ``store.transaction()`` block, which is never retried, has none).
    A data manager joined by a registered synchronizer reads it at commit to
    know which function the commit belongs to and whether a retry is left:
    how ``snaptree.testing`` forces conflicts on chosen calls only. For a
    batch of ``run_batched`` calls, ``function`` is the calls' function if
    they all run the same one (else None), ``functions`` every call's
    function in the batch, ``number`` the highest attempt number among them
    and ``attempts`` the fewest any of their policies allows.
    """

    function: Callable[..., Any] | None
    number: int  # 1 for the first attempt
    attempts: int  # attempts the call's retry policy allows in all
    functions: tuple[Callable[..., Any], ...] = ()  # the batch's; for one call, its own


def _batch_attempt(batch: list[BatchedCall]) -> CallAttempt:
    functions = tuple(call.fn for call in batch)
    return CallAttempt(
        functions[0] if len({id(fn) for fn in functions}) == 1 else None,
        max(call.number for call in batch),
        min(call.policy.attempts for call in batch),
        functions,
    )


def replacement_error(
    pool: ConnectionPool, exc: Exception, pair: Pair | None, txn: Any
) -> Exception | None:
    """The error a failed call should raise instead of *exc*, if any.

    When close() gave up waiting and closed the database under the call,
    whatever the call ran into (ZODB's closing aborts its transaction from
    the closing thread) is reported as the store being closed; when the
    function ended the call's transaction *txn* itself, that misuse; when
    a ZEO server raised one of snaptree's errors, that error.
    """
    if isinstance(exc, StoreClosedError):
        return None
    served = raised_by_server(exc)
    if pool.closed:
        error: Exception = pool.closed_error()
    elif served is not None:
        error = served
    elif isinstance(exc, Error):
        return None
    elif pair is not None and txn is not None and call_misuse(pair.conn, pair.tm, txn):
        error = misuse_error(pair.conn.snaptree_misuse)
    else:
        return None
    error.__cause__ = exc
    return error


class WriteCalls:
    """The write calls of one store (see the module docstring).

    *durable* is the storage a call waits on after its commit
    (``wait_durable``), or None when nothing is waited for (``relaxed``, and
    storages whose durability snaptree does not decide). *locate* finds the
    path of a conflicting object for RetriesExhausted. *turns*, if given,
    makes ``run`` and ``transactional`` calls take turns (:mod:`snaptree._write_turns`).
    """

    def __init__(
        self,
        pool: ConnectionPool,
        stats: ConflictStats,
        durable: Any,
        locate: Callable[[bytes], str | None],
        turns: Turns | None,
    ) -> None:
        self._pool = pool
        self._turns = self._own_turns = turns
        self._alongside = 0  # alongside() blocks open: no turns meanwhile
        self._alongside_lock = threading.Lock()
        self._stats = stats
        self._durable = durable
        self._locate = locate
        self._calls = ThreadCalls()
        # Replaced, never changed in place: a pair compares it by identity.
        self._synchronizers: tuple[Any, ...] = ()
        self._synchronizers_lock = threading.Lock()
        self._batch_pair: Pair | None = None  # the pair the last batch ran on
        self._combiner = Combiner(
            self._attempt_batch,
            durable.wait_durable if durable is not None else None,
            stats,
            locate,
        )

    def turns_pair(self) -> Pair | None:
        """The pair the last turn ran on, whose cache holds what the calls committed."""
        return self._own_turns.pair if self._own_turns is not None else None

    @contextmanager
    def alongside(self) -> Iterator[None]:
        """Calls run alongside, not taking turns, until every such block has ended."""
        with self._alongside_lock:
            self._alongside += 1
            self._turns = None
        try:
            yield
        finally:
            with self._alongside_lock:
                self._alongside -= 1
                if not self._alongside:
                    self._turns = self._own_turns

    def inside(self) -> bool:
        """Whether the calling thread is inside a write call."""
        return self._calls.inside()

    # -- synchronizers ---------------------------------------------------------------

    def register_synchronizer(self, synchronizer: Any) -> None:
        with self._synchronizers_lock:
            if synchronizer not in self._synchronizers:
                self._synchronizers = (*self._synchronizers, synchronizer)

    def unregister_synchronizer(self, synchronizer: Any) -> None:
        with self._synchronizers_lock:
            if synchronizer not in self._synchronizers:
                raise ArgumentError(f"{synchronizer!r} is not registered with this store")
            self._synchronizers = tuple(s for s in self._synchronizers if s is not synchronizer)

    # -- one attempt -----------------------------------------------------------------

    def _take_pair(self, prefer: Pair | None = None) -> Pair:
        """The calling thread's connection pair (or *prefer*), claimed, with the synchronizers."""
        pair = self._pool.acquire(prefer)
        if pair.synchronizers is not self._synchronizers:
            pair.use_synchronizers(self._synchronizers)
        return pair

    def _commit(self, pair: Pair) -> int:
        """Commit the call's transaction, unless the database is being closed.

        Returns how many commits the storage has flushed by then: what a
        caller waits for to be durable (everything its call could see).
        """
        self._pool.commit(pair)
        durable = self._durable
        return durable.flushed if durable is not None else 0

    def _committed(self, pair: Pair, calls: int = 1) -> None:
        """Give back the pair of an attempt that committed *calls* calls."""
        pair.commits += calls
        self._pool.release(pair)

    def _end_attempt(self, pair: Pair, exc: Exception, txn: Any) -> Exception:
        """Give a failed attempt's pair back; the exception the attempt raises instead of *exc*.

        Whether *exc* is transient is decided before the pair's transaction
        is aborted: after the abort its manager can no longer tell.
        """
        replacement = replacement_error(self._pool, exc, pair, txn)
        error: Exception = exc if replacement is None else replacement
        transient = replacement is None and is_transient(exc, pair.tm, txn)
        self._pool.release(pair, failed=True, misused=isinstance(error, MisuseError))
        if transient:
            error = Retry(exc)
            error.__cause__ = exc
        return error

    def _give_back(self, pair: Pair) -> None:
        """Give back the pair of an attempt an interrupt (a BaseException) cut short."""
        self._pool.release(pair, failed=True)

    def _attempt(
        self,
        fn: Callable[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        calls: GlobalTransactionGuard,
        number: int,
        policy: RetryPolicy,
        root_key: str | None,
    ) -> tuple[R, int]:
        """One attempt: begin, call, commit; a transient failure becomes ``Retry``.

        Returns the result and the storage's flushed count after the commit.
        ``root_key=None`` hands ``fn`` ZODB's own root (only for creating the tree).
        """
        turns = self._turns
        if turns is not None and not (turns.lock.acquire(False) or turns.wait()):
            turns = None  # this call runs alongside the one whose turn it is
        try:
            if turns is not None:  # on the pair the last turn ran on, if it is free
                turns.taken += 1
                pair = turns.pair = self._take_pair(turns.pair)
            else:
                pair = self._take_pair()
            conn, tm = pair.conn, pair.tm
            txn = None
            try:
                # Beginning can fail transiently too: with ZEO's server_sync the
                # begin pings a server that may be restarting.
                txn = tm.begin()
                if self._synchronizers:  # what they may want to know about the commit
                    txn.set_data(CallAttempt, CallAttempt(fn, number, policy.attempts, (fn,)))
                root = conn.root() if root_key is None else pair.tree_root(root_key)
                result = fn(root, *args, **kwargs)
                # tm.get() raises NoTransaction if the function aborted: a misuse, below
                if calls.used or conn.snaptree_misuse or tm.get() is not txn:
                    check_guards(calls, conn, tm, txn)
                if result is not None:
                    result = detach(result)
                    if calls.used or conn.snaptree_misuse:  # reading a returned iterator ran code
                        check_guards(calls, conn, tm, txn)
                flushed = self._commit(pair)
            except Exception as exc:
                detach_error(exc)  # before the abort: the copies hold what the function saw
                error = self._end_attempt(pair, exc, txn)
                if error is exc:
                    raise
                raise error from exc
            except BaseException:  # an interrupt: nothing to classify, the pair goes back
                self._give_back(pair)
                raise
            self._committed(pair)
            return result, flushed
        finally:
            if turns is not None:  # after the pair went back: the next turn finds it idle
                if turns.starving:
                    turns.give_back()
                else:
                    turns.lock.release()

    # -- the calls -------------------------------------------------------------------

    def run(
        self,
        fn: Callable[..., R],
        args: tuple,
        kwargs: dict,
        policy: RetryPolicy,
        root_key: str | None = ROOT_KEY,
    ) -> R:
        """Run *fn* in its own transaction, retried as *policy* says; wait for the disk."""
        if self._pool.closing:
            raise self._pool.closed_error()
        calls = self._calls.enter()
        try:
            # The first attempt is made here, the loop entered only after a
            # conflict: most calls never conflict.
            started = policy.clock() if policy.deadline is not None else None
            try:
                result, flushed = self._attempt(fn, args, kwargs, calls, 1, policy, root_key)
            except Retry as failed:
                numbers = itertools.count(2)
                result, flushed = run_with_retries(
                    lambda: self._attempt(fn, args, kwargs, calls, next(numbers), policy, root_key),
                    policy,
                    self._stats,
                    self._locate,
                    failed=failed,
                    started=started,
                )
        finally:
            calls.active = False
        if self._durable is not None:
            self._durable.wait_durable(flushed)
        return result

    def run_batched(
        self, fn: Callable[..., R], args: tuple, kwargs: dict, policy: RetryPolicy
    ) -> R:
        """Run *fn* in a transaction shared with other threads' batched calls (_batching)."""
        if self._pool.closing:
            raise self._pool.closed_error()
        calls = self._calls.enter()
        try:
            return self._combiner.call(fn, args, kwargs, policy)  # type: ignore[no-any-return]
        finally:
            calls.active = False

    def _attempt_batch(self, batch: list[BatchedCall]) -> int | None:
        """One transaction for *batch*: each call's function in turn, then one commit.

        Returns the storage's flushed count once committed (each call's
        ``result`` set), or None when a call's function failed (its
        ``error`` set; nothing committed: run the others again). A
        transient failure anywhere raises ``Retry``; any other failure at
        commit raises BatchCommitFailed, which no single call can be blamed for.
        """
        # Every batch runs on the connection the last one ran on, whichever
        # thread combines it: the objects the last batch committed are current
        # in its cache, where another thread's connection would load them
        # again (ZODB invalidated them there).
        pair = self._batch_pair = self._take_pair(self._batch_pair)
        conn, tm = pair.conn, pair.tm
        calls = self._calls.current()
        txn = None
        current = None
        try:
            txn = tm.begin()
            if self._synchronizers:
                txn.set_data(CallAttempt, _batch_attempt(batch))
            root = pair.tree_root(ROOT_KEY)
            for current in batch:
                calls.used = None
                result = current.context.run(current.fn, root, *current.args, **current.kwargs)
                check_guards(calls, conn, tm, txn)
                current.result = detach(result)
                check_guards(calls, conn, tm, txn)
            current = None
            flushed = self._commit(pair)
        except Exception as exc:
            detach_error(exc)
            error = self._end_attempt(pair, exc, txn)
            if isinstance(error, Retry):
                raise error from exc
            if current is None:  # at commit: no function to blame
                raise BatchCommitFailed(error) from exc
            current.fail(error)
            return None
        except BaseException:
            self._give_back(pair)
            raise
        self._committed(pair, len(batch))
        self._stats.count("batches")
        return flushed

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A block that runs exactly once: commit on success, abort on exception; no retry."""
        calls = self._calls.enter()
        try:
            pair = self._take_pair()
            tm = pair.tm
            txn = None
            try:
                txn = tm.begin()
                yield pair.tree_root(ROOT_KEY)
                check_guards(calls, pair.conn, tm, txn)
                flushed = self._commit(pair)
            except Exception as exc:
                if isinstance(exc, TransientError):
                    self._stats.count("conflicts", getattr(exc, "get_class_name", lambda: None)())
                error = self._end_attempt(pair, exc, txn)
                if error is exc or isinstance(error, Retry):
                    raise
                raise error from exc
            except BaseException:
                self._give_back(pair)
                raise
            self._committed(pair)
        finally:
            calls.active = False
        if self._durable is not None:
            self._durable.wait_durable(flushed)
