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


class Turns:
    """Who may run a write transaction now (see the module docstring).

    A call takes the turn with ``lock.acquire(False) or wait()``, counts it
    in ``taken`` and gives it back with ``lock.release()``, written out in
    the call itself: as methods they were 0.4% of a small call's instructions.
    """

    __slots__ = ("lock", "pair", "taken")

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held by the call whose turn it is
        self.taken = 0  # turns taken so far: a waiter tells from it that the turn moves
        # The pair the last turn ran on: the next turn prefers it (a warm cache).
        self.pair: Pair | None = None

    def wait(self) -> bool:
        """Wait for the turn while it changes hands, up to LONGEST_WAIT in all; True once
        the lock is held, False when the caller should run alongside instead."""
        lock = self.lock
        give_up = time.monotonic() + LONGEST_WAIT
        seen = self.taken
        while True:
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                return False
            if lock.acquire(timeout=min(PATIENCE, remaining)):
                return True
            if self.taken == seen:  # one call has held it all along
                return False
            seen = self.taken
