"""Stopping a foreground loop (``export --every``, ``serve``) on SIGINT or SIGTERM.

Why not a :class:`threading.Event` set by the handler: Python runs a signal
handler in the main thread between two bytecodes, wherever that thread is.
If it is inside ``Event.wait``, it may hold the event's internal lock, and
``Event.set`` in the handler then waits for that lock forever: the process
hangs on SIGTERM until it is killed. In a loop that waits between exports,
113 of 200 SIGTERMs hung it (CPython 3.11). :class:`SignalStop` takes no
lock: setting it writes one byte into a pipe, and waiting is a ``select``
that the byte wakes. The pipe is also the process's wakeup descriptor
(:func:`signal.set_wakeup_fd`), where the interpreter writes as the signal
arrives: a signal that lands after the last check before ``select``
blocks, when the Python handler has not run yet, still wakes the wait
instead of leaving SIGTERM unheard for the rest of a long interval.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalStop:
    """A stop flag that a signal handler may set while the main thread waits on it."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        #: The name of the first signal received (``"SIGTERM"``), or None.
        self.received: str | None = None
        self._set = False

    def set(self, received: str | None = None) -> None:
        if self.received is None:
            self.received = received
        self._set = True
        try:
            os.write(self._write, b"x")
        except BlockingIOError:
            pass  # full: readable already

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until set or *timeout* seconds passed; return whether it is set.

        A byte without the flag (the interpreter's, before the handler ran,
        or another handled signal's) is drained and the wait goes on: the
        handler's own byte follows when it runs.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            ready, _, _ = select.select([self._read], [], [], remaining)
            if ready:
                try:
                    os.read(self._read, 512)
                except BlockingIOError:
                    pass
        return self._set

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


def _say(text: str) -> None:
    """One line on stderr from a signal handler: straight to the descriptor.

    Through ``sys.stderr`` it could re-enter the buffered writer the main
    thread was in the middle of (a log line), which raises RuntimeError.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return  # no descriptor (an in-process runner): nothing to say it on
    try:
        os.write(fd, text.encode("utf-8", "replace") + b"\n")
    except OSError:
        pass  # stderr closed: the stop itself matters, not the line


@contextmanager
def stop_on_signals(
    message: Callable[[str], str] | None = None, *, abandon_on_second: bool = False
) -> Iterator[SignalStop]:
    """SIGINT or SIGTERM sets the yielded stop; the previous handlers come back after.

    *message* makes the line said on stderr for the first signal (given its
    name). With *abandon_on_second*, a second signal raises
    KeyboardInterrupt in the main thread, to abandon the work in progress.
    """
    stop = SignalStop()

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set() and abandon_on_second:
            raise KeyboardInterrupt
        stop.set(name)
        if message is not None:
            _say(message(name))

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    previous_wakeup = signal.set_wakeup_fd(stop._write, warn_on_full_buffer=False)
    try:
        yield stop
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for sig, old in previous.items():
            signal.signal(sig, old)
        stop.close()
