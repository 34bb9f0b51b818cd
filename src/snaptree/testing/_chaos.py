"""Chaos: a whole test suite with its retries exercised (the pytest plugin's --snaptree-chaos)."""

from __future__ import annotations

import os
import random
import threading

from ..errors import ArgumentError
from ..store import CallAttempt, Store, add_open_hook, remove_open_hook
from ._conflicts import JoinEachTransaction, is_controlled


class Chaos:
    """While on, every retried call's first commit conflicts with probability *probability*.

    It reaches every store :func:`snaptree.open` opens while it is on
    (through ``snaptree.store.add_open_hook``), including the ones an
    application opens itself; :meth:`attach` adds a store opened before.
    Only calls that may retry are touched: the first attempt of a
    ``store.run``/``@store.transactional`` call whose policy allows a
    second. ``store.transaction()`` blocks, snapshots, and stores under
    another helper of this module are left alone.

    The draws come from ``random.Random(f"{seed}/{label}")``, where the
    label is set by :meth:`reseed` (the pytest plugin uses each test's id):
    a test run alone with the same seed gets the same conflicts as in the
    whole suite, as long as it makes its calls from one thread.
    """

    def __init__(self, probability: float, seed: int | None = None) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ArgumentError(f"probability must be between 0 and 1, not {probability!r}")
        self.probability = probability
        self.seed = int.from_bytes(os.urandom(4), "big") if seed is None else seed
        self.forced = 0  # conflicts forced
        self.calls = 0  # first commits of retried calls seen
        self._lock = threading.Lock()
        self._on = False
        self._rng = random.Random(f"{self.seed}/")

    def reseed(self, label: str) -> None:
        """Draw from ``Random(f"{seed}/{label}")`` from now on."""
        with self._lock:
            self._rng = random.Random(f"{self.seed}/{label}")

    def attach(self, store: Store) -> None:
        """Force conflicts in *store* too (stores opened while chaos is on get this already)."""
        store.register_synchronizer(JoinEachTransaction(store, self._decide))

    def _decide(self, store: Store, attempt: CallAttempt) -> str | None:
        if attempt.number != 1 or attempt.attempts < 2 or is_controlled(store):
            return None
        with self._lock:
            if not self._on:
                return None
            self.calls += 1
            if self._rng.random() >= self.probability:
                return None
            self.forced += 1
        return f"forced by snaptree chaos, probability {self.probability:g}, seed {self.seed}"

    def start(self) -> None:
        with self._lock:
            if self._on:
                return
            self._on = True
        add_open_hook(self.attach)

    def stop(self) -> None:
        with self._lock:
            if not self._on:
                return
            self._on = False
        remove_open_hook(self.attach)

    def __enter__(self) -> Chaos:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def summary(self) -> str:
        return (
            f"snaptree chaos: forced {self.forced} conflict(s) in {self.calls} retried "
            f"call(s) (probability {self.probability:g}, seed {self.seed}; repeat with "
            f"--snaptree-chaos={self.probability:g} --snaptree-seed={self.seed})"
        )
