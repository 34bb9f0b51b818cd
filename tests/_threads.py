"""Small tools for concurrency tests: threads that report failures and never hang."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

JOIN_TIMEOUT = 60.0


def run_threads(targets: list[Callable[[], Any]], timeout: float = JOIN_TIMEOUT) -> list[Any]:
    """Run each target in its own thread; return their results, re-raising the first failure.

    Every thread is joined with a timeout, so a deadlock fails the test
    instead of hanging it.
    """
    results: list[Any] = [None] * len(targets)
    errors: list[BaseException] = []

    def wrap(i: int, fn: Callable[[], Any]) -> None:
        try:
            results[i] = fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=wrap, args=(i, fn), daemon=True) for i, fn in enumerate(targets)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        raise AssertionError(f"threads still running after {timeout} s: {alive}")
    if errors:
        raise errors[0]
    return results
