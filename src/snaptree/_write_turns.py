"""Write calls take turns: one transaction at a time, on one connection, where that is faster.

On memory:// and a FileStorage every commit is made by this process, on
the interpreter lock that all its threads share. Write transactions that
run side by side there gain nothing (two cores, one interpreter lock) and
pay three ways: each commit hands the interpreter lock between threads a
dozen times; each thread's connection loads again what the others committed
(ZODB invalidated it there); and they conflict. Measured on two cores with
small transfers among 1,000 accounts (docs/benchmarks.md), four threads
committed 0.44x what one thread does on memory://, 0.41x in ``relaxed``.
Taking turns, on the connection the previous turn used (its cache holds what
that turn committed), four threads commit 0.84x and 0.88x.

Taking turns never decides what is correct: every call still runs in its
own transaction, with its own retries, and a call that runs alongside
another (the turns below) is what every call was before. So a call does not
wait for its turn without bound: when the turn has not changed hands for
``PATIENCE`` seconds (the call holding it waits for the disk, for another
thread, or simply runs long), or after ``LONGEST_WAIT`` in all, the call
runs alongside on its thread's own connection. A function that waits for
another thread's write call (which waits for the turn that function holds)
therefore costs that call PATIENCE, not a deadlock.

Through a server (ZEO, PostgreSQL) a commit waits on the network with the
interpreter lock released, which other threads' transactions use; there
calls do not take turns.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._pool import Pair

#: Seconds a call waits for the turn to change hands before it runs alongside.
#: Shorter waits ran alongside more often (measured once, four threads in
#: ``relaxed``: 0.92x the commits with 5 ms, 0.86x with 1 ms, against 20 ms);
#: 100 ms gained nothing more.
PATIENCE = 0.02

#: Seconds a call waits for its turn in all, however often it changes hands.
LONGEST_WAIT = 0.2

#: Seconds a call competes for its turn before it queues to be handed it. Eight
#: threads in ``relaxed`` (measured once): 2 ms gave a 99th percentile of 3.6 ms
#: and 0.74x the commits of no queue; 5 ms, 6.9 ms and 0.92x; 10 ms, 11 ms and 0.91x.
STARVING = 0.005


class Turns:
    """Who may run a write transaction now (see the module docstring).

    A call takes the turn with ``lock.acquire(False) or wait()``, counts it
    in ``taken`` and gives it back with ``lock.release()`` (``give_back()``
    when a call is ``starving``), written out in the call itself: as
    methods they were 0.4% of a small call's instructions.

    Python's lock is not fair: a thread woken to take it often finds it
    taken again, and waits again at the back. Eight threads in ``relaxed``
    waited 26 ms at the 99th percentile and 176 ms at worst, while the median
    was 0.09 ms. So a call that has waited STARVING seconds queues, and the
    call that holds the turn hands it straight to the longest queued one
    (the lock stays taken): 7 ms at the 99th percentile. A fair lock for
    every call was no answer: a hand-over at every call cost a quarter to
    a third of the commits.
    """

    __slots__ = ("lock", "pair", "starving", "taken")

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held by the call whose turn it is
        self.taken = 0  # turns taken so far: a waiter tells from it that the turn moves
        # The pair the last turn ran on: the next turn prefers it (a warm cache).
        self.pair: Pair | None = None
        # Calls that waited STARVING, oldest first, each waiting on a lock of its own.
        self.starving: deque[threading.Lock] = deque()

    def wait(self) -> bool:
        """Wait for the turn (see the class docstring); True once it is held, False when
        the caller should run alongside instead."""
        lock = self.lock
        began = time.monotonic()
        seen = self.taken
        if lock.acquire(timeout=STARVING):
            return True
        mine = threading.Lock()
        mine.acquire()
        self.starving.append(mine)
        try:
            while True:
                if lock.acquire(False):  # free, and nobody to hand it over: take it
                    self.starving.remove(mine)  # only a holder of the lock removes others
                    return True
                remaining = began + LONGEST_WAIT - time.monotonic()
                if remaining > 0 and mine.acquire(timeout=min(PATIENCE, remaining)):
                    return True  # handed over
                if remaining <= 0 or self.taken == seen:  # one call has held it all along
                    return self._leave(mine)
                seen = self.taken
        except BaseException:
            if self._leave(mine):
                self.give_back()  # handed over meanwhile: pass it on
            raise

    def _leave(self, mine: threading.Lock) -> bool:
        """Stop waiting; True if the turn was handed over meanwhile (then it is held)."""
        try:
            self.starving.remove(mine)
        except ValueError:  # popped by a hand-over: the turn is this caller's
            return True
        return False

    def give_back(self) -> None:
        """Hand the turn to the longest starving call, or release it."""
        try:
            waiter = self.starving.popleft()
        except IndexError:
            self.lock.release()
        else:
            waiter.release()
