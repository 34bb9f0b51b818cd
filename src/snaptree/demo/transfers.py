"""The demo: the three uses of snaptree in one run.

1. *Application model import*: the sample model (``data/sample_model.json``:
   accounts with entries, customers with orders) is imported into the store,
   once, as an existing application would bring its model.
2. Threads transfer money between its accounts, each transfer a few
   statements (debit, credit, two ledger entries), retried on conflicts.
3. A background :class:`snaptree.Exporter` dumps consistent snapshots as
   pickles, the file the original program's ``pickle.dump`` thread wrote.

Every dump is then loaded with plain ``pickle.load`` and must hold the
invariant that the total of all balances never changes.
"""

from __future__ import annotations

import datetime
import pickle
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import snaptree

#: Where the demo keeps the model inside the tree.
MODEL_KEY = "model"
#: Balance of each account of the synthetic model used when no sample file is found.
START_BALANCE = 10_000


@dataclass
class DemoResult:
    """What the demo measured, for the summary and for tests."""

    imported: int = 0
    model_source: str = ""
    transfers: int = 0
    seconds: float = 0.0
    exports: list[Path] = field(default_factory=list)
    consistent_exports: int = 0
    #: The interval asked of the Exporter, and the dumps it wrote (before retention).
    every: float = 0.0
    written: int = 0
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


def synthetic_model(accounts: int) -> dict[str, Any]:
    """A model of the sample's shape, for when the sample file is not at hand."""
    return {
        "accounts": {
            f"A{i:04}": {"owner": f"C{i:04}", "balance": START_BALANCE, "entries": []}
            for i in range(1, accounts + 1)
        },
        "meta": {"total_balance": START_BALANCE * accounts, "amounts": "integer cents"},
    }


def _account_names(root: Any) -> list[str]:
    return list(root[MODEL_KEY]["accounts"].keys())


def _transfer(root: Any, src: str, dst: str, amount: int, entry_id: str) -> None:
    accounts = root[MODEL_KEY]["accounts"]
    today = datetime.date.today().isoformat()
    accounts[src]["balance"] -= amount
    accounts[src]["entries"].append(
        {"id": entry_id, "date": today, "amount": -amount, "memo": f"to {dst}"}
    )
    accounts[dst]["balance"] += amount
    accounts[dst]["entries"].append(
        {"id": entry_id, "date": today, "amount": amount, "memo": f"from {src}"}
    )


def total_balance(model: Any) -> int:
    return sum(account["balance"] for account in model["accounts"].values())


def _total_of_dump(path: Path) -> int:
    with path.open("rb") as f:
        tree = pickle.load(f)  # plain dicts and lists: no snaptree needed to read it
    return total_balance(tree[MODEL_KEY])


def import_model(store: snaptree.Store, sample: Path | None, accounts: int) -> tuple[int, str]:
    """Import the sample model unless the tree already holds one; (objects, where from)."""
    if store.run(lambda root: MODEL_KEY in root):
        return 0, "already in the store"
    if sample is not None and sample.is_file():
        data, source = snaptree.load_source(sample), str(sample)
    else:
        data, source = synthetic_model(accounts), f"a synthetic model of {accounts} accounts"
    result = store.import_tree(data, path=MODEL_KEY)
    return result.objects, source


def run_demo(
    store: snaptree.Store,
    export_dir: Path,
    *,
    sample: Path | None = None,
    seconds: float = 5.0,
    accounts: int = 400,
    writers: int = 4,
    every: float = 0.5,
    keep: int = 5,
    seed: int | None = None,
) -> DemoResult:
    """Import the model, run writers for *seconds* while an Exporter dumps every *every* s."""
    result = DemoResult()
    export_dir.mkdir(parents=True, exist_ok=True)
    result.imported, result.model_source = import_model(store, sample, accounts)
    result.expected_total = store.run(lambda root: root[MODEL_KEY]["meta"]["total_balance"])
    names = store.run(_account_names)
    stop = threading.Event()
    counts = [0] * writers
    failures: list[BaseException] = []
    run_id = f"{time.time_ns():x}"

    def writer(index: int) -> None:
        rng = random.Random(None if seed is None else seed + index)
        try:
            while not stop.is_set():
                src, dst = rng.sample(names, 2)
                entry_id = f"T{run_id}-{index}-{counts[index]}"
                store.run(_transfer, src, dst, rng.randint(1, 500), entry_id)
                counts[index] += 1
        except BaseException as exc:
            failures.append(exc)
            stop.set()

    written = [0]

    def count(run: Any) -> None:
        written[0] += not run.skipped

    exporter = snaptree.Exporter(
        store, export_dir, every=every, keep=keep, format="pickle", on_export=count
    )
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
    result.every, result.written = every, written[0]
    result.exports = sorted(
        p for p in export_dir.glob("*.pickle") if p.is_file() and not p.is_symlink()
    )
    result.consistent_exports = sum(
        1 for p in result.exports if _total_of_dump(p) == result.expected_total
    )
    with store.snapshot() as snap:
        result.final_total = total_balance(snap.root[MODEL_KEY])
    result.stats = store.stats()
    return result


def summary(result: DemoResult, writers: int) -> str:
    stats = result.stats
    rate = result.transfers / result.seconds if result.seconds else 0.0
    verdict = "OK" if result.ok else "FAILED"
    imported = (
        f"imported {result.imported} objects from {result.model_source}"
        if result.imported
        else "model: already in the store (imported by an earlier run)"
    )
    lines = [
        imported,
        f"{writers} writer threads made {result.transfers} transfers in {result.seconds:.1f} s "
        f"({rate:.0f}/s, each committed durably); {stats['conflicts']} conflicts were "
        f"retried, {stats['exhausted']} gave up",
        _pace(result),
        f"exports kept: {len(result.exports)}, consistent: {result.consistent_exports} "
        f"(each loaded with plain pickle.load; total {result.expected_total} expected)",
        f"final total of balances: {result.final_total} (expected {result.expected_total})",
        f"result: {verdict}",
    ]
    return "\n".join(lines)


def _pace(result: DemoResult) -> str:
    """What the exporter was asked for and what it did: pacing may stretch the interval."""
    if not result.written:
        return f"exports: asked for one every {result.every:g} s; none was written"
    got = result.seconds / result.written
    line = (
        f"exports: asked for one every {result.every:g} s, wrote {result.written} in "
        f"{result.seconds:.1f} s"
    )
    if result.written > 1:
        line += f" (one every {got:.1f} s)"
    if got > 1.5 * result.every:
        line += (
            "; pacing keeps the exporter's fsyncs to a small share of the time so that "
            "writers' commits do not queue behind them (the WARNING above says which "
            "interval it can keep)"
        )
    return line
