"""The demo: threads transfer money while a background exporter dumps consistent snapshots.

This is the program snaptree replaces: shared accounts changed by several
threads, and a thread that periodically pickles the whole tree. Here the
dumps come from committed snapshots, so every one of them must hold the
invariant (the total of all balances never changes).
"""

from __future__ import annotations

import pickle
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schedule import Exporter
from .store import Store

START_BALANCE = 100


@dataclass
class DemoResult:
    """What the demo measured, for the summary and for tests."""

    transfers: int = 0
    seconds: float = 0.0
    exports: list[Path] = field(default_factory=list)
    consistent_exports: int = 0
    expected_total: int = 0
    final_total: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.final_total == self.expected_total
            and self.consistent_exports == len(self.exports)
            and len(self.exports) > 0
        )


def _setup(root: Any, accounts: int) -> int:
    demo = root.setdefault("demo", {})
    have = demo.setdefault("accounts", {})
    for i in range(len(have), accounts):
        have[f"acct{i:05}"] = {"balance": START_BALANCE, "history": []}
    return sum(account["balance"] for account in have.values())


def _transfer(root: Any, src: str, dst: str, amount: int, seq: int) -> None:
    accounts = root["demo"]["accounts"]
    accounts[src]["balance"] -= amount
    accounts[src]["history"].append(("to", dst, amount, seq))
    accounts[dst]["balance"] += amount
    accounts[dst]["history"].append(("from", src, amount, seq))


def _total_of_dump(path: Path) -> int:
    with path.open("rb") as f:
        tree = pickle.load(f)  # plain dicts and lists: no snaptree needed to read it
    return sum(a["balance"] for a in tree["demo"]["accounts"].values())


def run_demo(
    store: Store,
    export_dir: Path,
    *,
    seconds: float = 5.0,
    accounts: int = 1000,
    writers: int = 4,
    every: float = 0.5,
    keep: int = 5,
    seed: int | None = None,
) -> DemoResult:
    """Run writers for *seconds* while an Exporter dumps every *every* seconds."""
    result = DemoResult()
    export_dir.mkdir(parents=True, exist_ok=True)
    result.expected_total = store.run(_setup, accounts)
    names = [f"acct{i:05}" for i in range(accounts)]
    stop = threading.Event()
    counts = [0] * writers
    failures: list[BaseException] = []

    def writer(index: int) -> None:
        rng = random.Random(None if seed is None else seed + index)
        try:
            while not stop.is_set():
                src, dst = rng.sample(names, 2)
                store.run(_transfer, src, dst, rng.randint(1, 20), counts[index])
                counts[index] += 1
        except BaseException as exc:
            failures.append(exc)
            stop.set()

    exporter = Exporter(store, export_dir, every=every, keep=keep, format="pickle")
    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(writers)]
    started = time.monotonic()
    exporter.start()
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    exporter.stop()
    result.seconds = time.monotonic() - started
    if failures:
        raise failures[0]
    if exporter.last_error is not None:
        raise exporter.last_error

    result.transfers = sum(counts)
    result.exports = sorted(
        p for p in export_dir.glob("*.pickle") if p.is_file() and not p.is_symlink()
    )
    result.consistent_exports = sum(
        1 for p in result.exports if _total_of_dump(p) == result.expected_total
    )
    with store.snapshot() as snap:
        result.final_total = sum(a["balance"] for a in snap.root["demo"]["accounts"].values())
    result.stats = store.stats()
    return result


def summary(result: DemoResult, writers: int) -> str:
    stats = result.stats
    rate = result.transfers / result.seconds if result.seconds else 0.0
    verdict = "OK" if result.ok else "FAILED"
    lines = [
        f"{writers} writer threads made {result.transfers} transfers in {result.seconds:.1f} s "
        f"({rate:.0f}/s); {stats['conflicts']} conflicts were retried, "
        f"{stats['exhausted']} gave up",
        f"exports kept: {len(result.exports)}, consistent: {result.consistent_exports} "
        f"(each loaded with plain pickle.load; total {result.expected_total} expected)",
        f"final total of balances: {result.final_total} (expected {result.expected_total})",
        f"result: {verdict}",
    ]
    return "\n".join(lines)
