"""The four ways of sharing one tree that the comparison runs, and the workload they all run.

``naive``
    Plain dicts shared by threads; one thread calls ``pickle.dump(tree, f,
    protocol=5)`` periodically. With protocols 4 and 5 the pickler writes
    each 64 KiB frame to the file as it goes; the write releases the
    interpreter lock, the writers run, and when the pickler resumes the dict
    it was walking may have changed size (``RuntimeError: dictionary changed
    size during iteration``). A dump that does not crash still records
    transfers half applied, because a transfer is several statements.
    (Lists have no such crash: the C pickler walks a list by index, so a list
    changing under it is silently recorded torn. Sets raise the set twin.)
``global-lock``
    Writers hold one lock for each change; the dumper holds it around the
    whole dump. Dumps are correct; every writer waits for every dump.
``owner-thread``
    One thread owns the tree; writers send it their changes through a queue
    and wait for the answer, and it also takes the dumps. Dumps are correct;
    every change pays a thread hand-off and every writer waits for every dump.
``snaptree``
    The same changes through ``store.run`` on a FileStorage in a temporary
    directory; dumps through ``snaptree.Exporter.export_now``, as an
    application should run them: in the Exporter's own process, which reads
    the file and keeps its cache warm, so the export's CPU work never runs on
    the writers' interpreter.

The workload: W writer threads each loop over two operations, a transfer
(debit one account, record a history entry keyed by (writer, sequence) and
drop that writer's entry older than the history cap, credit another account:
four statements, not atomic) and a session change (add a temporary key, or
delete one the writer added earlier). The invariant is that the balances
always add up to ``accounts * INITIAL_BALANCE``; a dump that loads but breaks
it is *torn*.
"""

from __future__ import annotations

import pickle
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import snaptree

INITIAL_BALANCE = 1_000

#: Share of writer operations that are transfers; the rest are session changes.
TRANSFER_SHARE = 0.75

#: The designs, in the order they run and are reported.
DESIGNS = ("naive", "global-lock", "owner-thread", "snaptree")

#: How long any thread is waited for before the run is declared stuck.
JOIN_TIMEOUT = 120.0


# -- the workload --------------------------------------------------------------


def account_key(index: int) -> str:
    return f"acct-{index:07d}"


def initial_tree(accounts: int) -> dict[str, Any]:
    """The tree every design starts from: balances, sessions, and an empty history."""
    return {
        "accounts": {account_key(i): INITIAL_BALANCE for i in range(accounts)},
        "sessions": {f"session-{i:07d}": (-1, i) for i in range(accounts)},
        "history": {},
    }


def expected_total(accounts: int) -> int:
    return accounts * INITIAL_BALANCE


def transfer(
    tree: Any,
    writer: int,
    seq: int,
    src: str,
    dst: str,
    amount: int,
    history_cap: int,
) -> None:
    """Move *amount* from *src* to *dst*: four statements, as application code writes it."""
    accounts = tree["accounts"]
    accounts[src] -= amount
    history = tree["history"]
    history[(writer, seq)] = (src, dst, amount)
    history.pop((writer, seq - history_cap), None)
    accounts[dst] += amount


def change_session(tree: Any, add: str | None, remove: str | None, value: Any = None) -> None:
    """Add the temporary key *add* and/or delete the key *remove*."""
    sessions = tree["sessions"]
    if add is not None:
        sessions[add] = value
    if remove is not None:
        del sessions[remove]


class WriterPlan:
    """One writer's stream of operations: deterministic for a seed, the same in every design."""

    def __init__(self, writer: int, writers: int, accounts: int, seed: int) -> None:
        self.writer = writer
        self.accounts = accounts
        self.rand = random.Random(seed * 1_000_003 + writer)
        self.seq = 0
        # The initial sessions are split among the writers; each deletes only its own.
        self.mine = [f"session-{i:07d}" for i in range(writer, accounts, writers)]
        self.target = len(self.mine)

    def next(self, history_cap: int) -> tuple[Callable[..., None], tuple[Any, ...]]:
        rand = self.rand
        self.seq += 1
        if rand.random() < TRANSFER_SHARE:
            src = rand.randrange(self.accounts)
            dst = (src + 1 + rand.randrange(self.accounts - 1)) % self.accounts
            args = (
                self.writer,
                self.seq,
                account_key(src),
                account_key(dst),
                rand.randint(1, 50),
                history_cap,
            )
            return transfer, args
        # A random walk around the starting size: the dict's size keeps changing.
        if self.mine and (len(self.mine) > self.target or rand.random() < 0.5):
            index = rand.randrange(len(self.mine))
            self.mine[index], self.mine[-1] = self.mine[-1], self.mine[index]
            return change_session, (None, self.mine.pop())
        key = f"temp-{self.writer}-{self.seq}"
        self.mine.append(key)
        return change_session, (key, None, (self.writer, self.seq))


# -- dumps and their verdicts --------------------------------------------------


def is_iteration_crash(exc: BaseException) -> bool:
    """True for the errors a container raises when it changes while being walked."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "changed size during iteration" in text
        or "mutated during iteration" in text
        or "changed during iteration" in text
    )


@dataclass
class DumpAttempt:
    """One dump: when it ran, and the error that stopped it, if any."""

    path: Path
    started: float
    finished: float
    error: str | None = None
    iteration_crash: bool = False

    @property
    def crashed(self) -> bool:
        return self.error is not None


def attempt_dump(
    dump: Callable[[Path], None], path: Path, clock: Callable[[], float]
) -> DumpAttempt:
    """Run *dump(path)* and record whether it crashed, and how."""
    started = clock()
    try:
        dump(path)
    except Exception as exc:  # every failure of a dump is a finding to report, not to retry
        return DumpAttempt(
            path, started, clock(), f"{type(exc).__name__}: {exc}", is_iteration_crash(exc)
        )
    return DumpAttempt(path, started, clock())


def check_dump(path: Path, accounts: int) -> str:
    """Load a finished dump: ``"consistent"``, ``"torn"`` (invariant broken) or ``"unreadable"``."""
    try:
        with open(path, "rb") as f:
            tree = pickle.load(f)
        balances = tree["accounts"]
        total = sum(balances.values())
        count = len(balances)
    except Exception:  # a dump that does not load is a verdict, whatever the reason
        return "unreadable"
    if count != accounts or total != expected_total(accounts):
        return "torn"
    return "consistent"


def write_pickle(tree: Any, path: Path) -> None:
    """What the original design does: ``pickle.dump`` of the live tree to a real file."""
    with open(path, "wb") as f:
        pickle.dump(tree, f, protocol=5)


# -- the designs -----------------------------------------------------------------


class Design:
    """A way of sharing the tree: how a writer applies a change, and how a dump is taken."""

    name = ""
    note = ""

    def apply(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def dump(self, path: Path) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def extra(self) -> dict[str, Any]:
        return {}


class NaiveDesign(Design):
    """Plain dicts shared by threads, dumped with no coordination at all."""

    name = "naive"
    note = "plain dicts, pickle.dump(protocol=5) from a thread"

    def __init__(self, tree: dict[str, Any]) -> None:
        self.tree = tree

    def apply(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        fn(self.tree, *args)

    def dump(self, path: Path) -> None:
        write_pickle(self.tree, path)


class GlobalLockDesign(Design):
    """Every change and the whole dump under one lock."""

    name = "global-lock"
    note = "one lock around every change and the whole dump"

    def __init__(self, tree: dict[str, Any]) -> None:
        self.tree = tree
        self.lock = threading.Lock()

    def apply(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        with self.lock:
            fn(self.tree, *args)

    def dump(self, path: Path) -> None:
        with self.lock:
            write_pickle(self.tree, path)


class OwnerThreadDesign(Design):
    """One thread owns the tree and does everything; the others send it work through a queue."""

    name = "owner-thread"
    note = "one owner thread applies queued changes and dumps"

    _STOP = object()

    def __init__(self, tree: dict[str, Any]) -> None:
        self.tree = tree
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name="owner", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            request = self.requests.get()
            if request is self._STOP:
                return
            fn, args, reply = request
            try:
                fn(self.tree, *args)
            except BaseException as exc:  # handed back to the caller, who re-raises it
                reply.put(exc)
            else:
                reply.put(None)

    def _call(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        reply: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self.requests.put((fn, args, reply))
        try:
            error = reply.get(timeout=JOIN_TIMEOUT)
        except queue.Empty:
            raise TimeoutError(f"the owner thread did not answer in {JOIN_TIMEOUT:g} s") from None
        if error is not None:
            raise error

    def apply(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self._call(fn, args)

    def dump(self, path: Path) -> None:
        self._call(lambda tree: write_pickle(tree, path), ())

    def close(self) -> None:
        self.requests.put(self._STOP)
        self.thread.join(JOIN_TIMEOUT)


class SnaptreeDesign(Design):
    """The same changes through ``store.run``; dumps of one committed snapshot by an Exporter."""

    name = "snaptree"
    note = "store.run on FileStorage; dumps by Exporter.export_now (its own process)"

    def __init__(self, tree: dict[str, Any], directory: Path) -> None:
        self.store = snaptree.open(str(directory / "Data.fs"))

        def load(root: Any) -> None:
            root.update(tree)

        self.store.run(load)
        exports = directory / "exports"
        exports.mkdir()
        # Never started: the comparison's dumper thread decides when to dump.
        self.exporter = snaptree.Exporter(self.store, exports, every=3600, process=True)

    def apply(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.store.run(fn, *args)

    def dump(self, path: Path) -> None:
        result = self.exporter.export_now(force=True)
        assert result.info is not None  # forced: always written
        result.info.path.replace(path)

    def extra(self) -> dict[str, Any]:
        stats = self.store.stats()
        return {
            "dump_path": "Exporter.export_now(force=True), in the exporter process",
            "commits": stats["commits"],
            "conflicts": stats["conflicts"],
            "retries": stats["retries"],
            "exhausted": stats["exhausted"],
        }

    def close(self) -> None:
        self.exporter.stop()
        self.store.close()


def make_design(name: str, accounts: int, directory: Path) -> Design:
    """The design called *name*, holding the initial tree of *accounts* accounts."""
    tree = initial_tree(accounts)
    if name == "naive":
        return NaiveDesign(tree)
    if name == "global-lock":
        return GlobalLockDesign(tree)
    if name == "owner-thread":
        return OwnerThreadDesign(tree)
    if name == "snaptree":
        return SnaptreeDesign(tree, directory)
    raise snaptree.ArgumentError(f"unknown design {name!r}; choose from {', '.join(DESIGNS)}")
