"""Bank torture test: writers move money while dumps are taken back to back in every format.

W writer threads transfer money between accounts with ``store.run``: each
transfer takes an amount from one account's balance, adds it to another's,
appends ``(transfer id, delta)`` to both accounts' history lists and bumps a
transfer counter. The total of the balances never changes, and each
account's balance is always its initial balance plus the deltas in its
history. A writer records a transfer as *acknowledged* only after ``run``
returned.

Meanwhile two exporting threads dump the tree back to back, rotating
through pickle, json and zodb: one through ``store.export`` (in the
writers' process), one through an :class:`snaptree.Exporter` per format
(on a FileStorage each Exporter exports from its own exporter process).
Every dump must verify against its manifest, load, hold the invariants
(total, per-account history, no half-applied transfer, counter equal to the
number of transfers) and contain every transfer acknowledged before the
export started. At the end the tree must be exactly the initial balances
plus the acknowledged transfers: none lost, none applied twice.

By default each case runs for a few seconds; ``--torture`` runs a minute.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import transaction
from ZODB import DB
from ZODB.MappingStorage import MappingStorage

import snaptree
from _threads import run_threads
from snaptree.dump_directory import complete_dumps, latest_link

ACCOUNTS = 24
INITIAL = 1_000
WRITERS = 3
FORMATS = ("pickle", "json", "zodb")
SUFFIX = {"pickle": ".pickle", "json": ".json", "zodb": ".zexp"}
SECONDS_DEFAULT = 2.5
SECONDS_TORTURE = 60.0
#: Each exporting path must finish at least this many dumps of each format per case.
MIN_DUMPS_PER_FORMAT = 2
#: A case that has not produced its minimum of dumps by then fails.
HARD_LIMIT = 90.0
KEEP = 3

NAMES = [f"a{i:02d}" for i in range(ACCOUNTS)]


# -- the workload -----------------------------------------------------------------------


def _setup(root: Any) -> None:
    root["accounts"] = {name: {"balance": INITIAL, "history": []} for name in NAMES}
    root["transfers"] = snaptree.Counter()


def _transfer(root: Any, transfer_id: str, src: str, dst: str, amount: int) -> None:
    accounts = root["accounts"]
    payer, payee = accounts[src], accounts[dst]
    payer["balance"] -= amount
    payer["history"].append((transfer_id, -amount))
    payee["balance"] += amount
    payee["history"].append((transfer_id, amount))
    root["transfers"].add(1)


# -- reading dumps back -------------------------------------------------------------------


def _load(path: Path, fmt: str) -> Any:
    """The dump at *path* as plain data, loaded the way a user would load it."""
    if fmt == "pickle":
        with open(path, "rb") as f:
            return pickle.load(f)
    if fmt == "json":
        return json.loads(path.read_text())
    db = DB(MappingStorage())
    try:
        tm = transaction.TransactionManager(explicit=True)
        conn = db.open(transaction_manager=tm)
        tm.begin()
        imported = conn.importFile(str(path))
        plain = snaptree.to_plain(imported)
        tm.abort()
        conn.close()
    finally:
        db.close()
    return plain


def _normalize(tree: Any) -> dict[str, Any]:
    """Accounts as ``{name: (balance, [(id, delta), ...])}`` plus the counter, for any format."""
    accounts = {
        name: (account["balance"], [(entry[0], entry[1]) for entry in account["history"]])
        for name, account in tree["accounts"].items()
    }
    return {"accounts": accounts, "transfers": tree["transfers"]}


def _check_invariants(tree: dict[str, Any], where: str) -> set[str]:
    """Assert every invariant of one consistent state; return the transfer ids it holds."""
    accounts = tree["accounts"]
    assert sorted(accounts) == NAMES, f"{where}: accounts missing or added"
    total = sum(balance for balance, _ in accounts.values())
    assert total == ACCOUNTS * INITIAL, f"{where}: total {total}, not {ACCOUNTS * INITIAL}"
    legs: dict[str, list[int]] = {}
    for name, (balance, history) in accounts.items():
        deltas = sum(delta for _, delta in history)
        assert balance == INITIAL + deltas, f"{where}: {name} balance does not match its history"
        ids = [transfer_id for transfer_id, _ in history]
        assert len(ids) == len(set(ids)), f"{where}: {name} has a history entry twice"
        for transfer_id, delta in history:
            legs.setdefault(transfer_id, []).append(delta)
    for transfer_id, deltas in legs.items():
        assert len(deltas) == 2 and sum(deltas) == 0, (
            f"{where}: transfer {transfer_id} is half applied or duplicated: legs {deltas}"
        )
    assert tree["transfers"] == len(legs), (
        f"{where}: the counter says {tree['transfers']}, the histories hold {len(legs)}"
    )
    return set(legs)


# -- the shared state of one run ---------------------------------------------------------


class Acknowledged:
    """What each writer recorded after ``store.run`` returned, one append-only list per writer.

    Lists are only appended to, so a reader that notes their lengths
    (:meth:`marks`) can later take exactly the transfers acknowledged before
    that moment (:meth:`ids_before`).
    """

    def __init__(self, writers: int) -> None:
        self.lists: list[list[tuple[str, str, str, int]]] = [[] for _ in range(writers)]

    def marks(self) -> list[int]:
        return [len(entries) for entries in self.lists]

    def ids_before(self, marks: list[int]) -> set[str]:
        return {
            entry[0] for entries, n in zip(self.lists, marks, strict=True) for entry in entries[:n]
        }

    def all(self) -> list[tuple[str, str, str, int]]:
        return [entry for entries in self.lists for entry in entries]


class Run:
    """Stop signal and progress counters shared by the writer and exporter threads."""

    def __init__(self, seconds: float) -> None:
        self.stop = threading.Event()
        self.seconds = seconds
        self.lock = threading.Lock()
        self.dumps: Tally[str] = Tally()  # "<path>:<format>" -> dumps checked

    def count(self, key: str) -> None:
        with self.lock:
            self.dumps[key] += 1

    def guarded(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """*fn*, but a failure stops every other thread too, so the test fails fast."""

        def run() -> Any:
            try:
                return fn()
            except BaseException:
                self.stop.set()
                raise

        return run


def _writer(store: snaptree.Store, run: Run, acked: Acknowledged, index: int, seed: int):
    def work() -> int:
        rand = random.Random(seed * 31 + index)
        done = acked.lists[index]
        n = 0
        while not run.stop.is_set():
            src, dst = rand.sample(NAMES, 2)
            amount = rand.randint(1, 50)
            transfer_id = f"w{index}-{n}"
            store.run(_transfer, transfer_id, src, dst, amount)
            done.append((transfer_id, src, dst, amount))  # acknowledged: run returned
            n += 1
        return n

    return work


def _check_dump(
    store: snaptree.Store, path: Path, fmt: str, required: set[str], where: str
) -> tuple[str, set[str]]:
    """Verify the dump against its manifest, load it, check it; return its tid and transfers.

    The dump must be exactly the committed state at the tid its manifest
    names, read back from the store's history: a dump that holds a
    committed state but names a later tid would fool "nothing new" skipping.
    """
    info = snaptree.verify(path)
    assert info.format == fmt
    tree = _normalize(_load(info.path, fmt))
    with store.snapshot(at=info.tid) as then:
        assert tree == _normalize(snaptree.to_plain(then.root)), (
            f"{where} {info.path.name} is not the committed state at its tid {info.tid}"
        )
    ids = _check_invariants(tree, f"{where} {info.path.name}")
    lost = required - ids
    assert not lost, (
        f"{where} {info.path.name}: {len(lost)} transfers acknowledged before the export "
        f"started are missing, e.g. {sorted(lost)[:5]}"
    )
    return info.tid, ids


def _store_exports(store: snaptree.Store, run: Run, acked: Acknowledged, out: Path):
    """``store.export`` back to back in every format, each dump checked then removed."""

    def work() -> None:
        last_tid = ""
        n = 0
        while not run.stop.is_set():
            fmt = FORMATS[n % len(FORMATS)]
            marks = acked.marks()
            path = out / f"dump-{n:05d}{SUFFIX[fmt]}"
            info = store.export(path, format=fmt)
            assert info.tid >= last_tid, "store.export went back in time"
            tid, _ = _check_dump(store, path, fmt, acked.ids_before(marks), "store.export")
            assert tid == info.tid
            last_tid = info.tid
            path.unlink()
            info.manifest_path.unlink()
            run.count(f"store.export:{fmt}")
            n += 1

    return work


def _exporter_exports(
    store: snaptree.Store,
    exporters: dict[str, snaptree.Exporter],
    first_tids: dict[str, str],
    run: Run,
    acked: Acknowledged,
):
    """``Exporter.export_now`` back to back, rotating formats; every written dump checked."""

    def work() -> None:
        last_tid = dict(first_tids)
        n = 0
        while not run.stop.is_set():
            fmt = FORMATS[n % len(FORMATS)]
            n += 1
            exporter = exporters[fmt]
            marks = acked.marks()
            result = exporter.export_now()
            if result.skipped:  # nothing committed since this format's last dump
                assert result.skipped_tid == last_tid[fmt]
                continue
            tid, _ = _check_dump(store, result.info.path, fmt, acked.ids_before(marks), "Exporter")
            assert tid > last_tid[fmt], "the Exporter wrote a dump older than its previous one"
            last_tid[fmt] = tid
            # latest points at this complete dump; retention keeps at most KEEP of them.
            latest = latest_link(exporter.directory, fmt)
            assert os.readlink(latest) == result.info.path.name
            complete = complete_dumps(exporter.directory, fmt)
            assert len(complete) <= KEEP and complete[-1] == result.info.path
            run.count(f"Exporter:{fmt}")

    return work


def _controller(run: Run):
    """Ends the run once its time is up and every path has dumped every format enough times."""
    keys = [f"{path}:{fmt}" for path in ("store.export", "Exporter") for fmt in FORMATS]

    def work() -> None:
        started = time.monotonic()
        while not run.stop.is_set():
            elapsed = time.monotonic() - started
            with run.lock:
                enough = all(run.dumps[k] >= MIN_DUMPS_PER_FORMAT for k in keys)
            if elapsed >= run.seconds and enough:
                break
            if elapsed > HARD_LIMIT:
                run.stop.set()
                raise AssertionError(f"too few dumps in {HARD_LIMIT:g} s: {dict(run.dumps)}")
            run.stop.wait(0.05)  # polls the progress counters; synchronises nothing
        run.stop.set()

    return work


# -- the test -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dumps_in_every_format_hold_the_invariant_and_no_transfer_is_lost_or_doubled(
    store_uri: str, tmp_path: Path, request: pytest.FixtureRequest, seed: int
) -> None:
    seconds = SECONDS_TORTURE if request.config.getoption("--torture") else SECONDS_DEFAULT
    store = snaptree.open(store_uri, retry=snaptree.RetryPolicy(attempts=10_000))
    single, scheduled = tmp_path / "single", tmp_path / "scheduled"
    single.mkdir()
    scheduled.mkdir()
    exporters: dict[str, snaptree.Exporter] = {}
    first_tids: dict[str, str] = {}
    try:
        store.run(_setup)
        for fmt in FORMATS:
            exporters[fmt] = snaptree.Exporter(store, scheduled, every=3600, keep=KEEP, format=fmt)
            # A FileStorage is exported by a separate exporter process; memory:// cannot be.
            assert exporters[fmt].in_process == store_uri.startswith("memory://")
            # Starts the exporter process before the clock runs.
            first_tids[fmt] = exporters[fmt].export_now().info.tid

        run = Run(seconds)
        acked = Acknowledged(WRITERS)
        targets = [_writer(store, run, acked, i, seed) for i in range(WRITERS)]
        targets += [
            _store_exports(store, run, acked, single),
            _exporter_exports(store, exporters, first_tids, run, acked),
            _controller(run),
        ]
        results = run_threads([run.guarded(t) for t in targets], timeout=HARD_LIMIT + 120)
        transfers = sum(results[:WRITERS])
        print(f"{transfers} transfers, dumps checked: {dict(run.dumps)}, stats {store.stats()}")
        assert transfers > 0

        # The final state is exactly the initial balances plus every acknowledged transfer.
        expected = dict.fromkeys(NAMES, INITIAL)
        for _, src, dst, amount in acked.all():
            expected[src] -= amount
            expected[dst] += amount
        with store.snapshot() as snap:
            final = _normalize(snaptree.to_plain(snap.root))
        ids = _check_invariants(final, "final state")
        assert {name: balance for name, (balance, _) in final["accounts"].items()} == expected
        acknowledged_ids = [entry[0] for entry in acked.all()]
        assert len(acknowledged_ids) == len(set(acknowledged_ids))
        assert ids == set(acknowledged_ids), "committed transfers differ from acknowledged ones"

        # Once the writers have stopped, a dump of each kind is exactly the final state.
        for fmt in FORMATS:
            info = store.export(single / f"final{SUFFIX[fmt]}", format=fmt)
            assert _normalize(_load(snaptree.verify(info.path).path, fmt)) == final
            result = exporters[fmt].export_now()
            latest = latest_link(scheduled, fmt)
            assert result.skipped or result.info.tid == info.tid
            assert snaptree.verify(latest).tid == info.tid
            assert _normalize(_load(latest, fmt)) == final
    finally:
        for exporter in exporters.values():
            exporter.stop(timeout=30)
        store.close()
