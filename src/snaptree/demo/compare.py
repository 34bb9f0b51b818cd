"""The original design side by side with its two usual workarounds and with snaptree.

Four designs run the same workload, one after the other, for a bounded time
each, and are measured in the same run:

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

Run it with ``python scripts/compare_designs.py`` or ``snaptree demo --compare``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import queue
import random
import shutil
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter as _Tally
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Balance every account starts with; the invariant is that the total never changes.
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


class _WriterPlan:
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


class _Design:
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


class NaiveDesign(_Design):
    """Plain dicts shared by threads, dumped with no coordination at all."""

    name = "naive"
    note = "plain dicts, pickle.dump(protocol=5) from a thread"

    def __init__(self, tree: dict[str, Any]) -> None:
        self.tree = tree

    def apply(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        fn(self.tree, *args)

    def dump(self, path: Path) -> None:
        write_pickle(self.tree, path)


class GlobalLockDesign(_Design):
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


class OwnerThreadDesign(_Design):
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


class SnaptreeDesign(_Design):
    """The same changes through ``store.run``; dumps of one committed snapshot by an Exporter."""

    name = "snaptree"
    note = "store.run on FileStorage; dumps by Exporter.export_now (its own process)"

    def __init__(self, tree: dict[str, Any], directory: Path) -> None:
        import snaptree

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


# -- running one design ------------------------------------------------------------


@dataclass
class DesignResult:
    """What one design did during its run."""

    name: str
    note: str
    seconds: float
    writers: int
    ops: int
    transfers: int
    latencies: array = field(repr=False)  # seconds, one per writer operation
    op_times: array = field(repr=False)  # start of each operation, seconds since the run began
    dumps: list[DumpAttempt] = field(repr=False)
    verdicts: _Tally[str] = field(default_factory=_Tally)
    crash_messages: _Tally[str] = field(default_factory=_Tally)
    writer_errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dumps_attempted(self) -> int:
        return len(self.dumps)

    @property
    def dumps_crashed(self) -> int:
        return sum(1 for d in self.dumps if d.crashed)

    @property
    def dumps_torn(self) -> int:
        return self.verdicts["torn"]

    @property
    def dumps_unreadable(self) -> int:
        return self.verdicts["unreadable"]

    @property
    def dumps_consistent(self) -> int:
        return self.verdicts["consistent"]

    @property
    def throughput(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    def latency_percentiles(self) -> dict[str, float]:
        ordered = sorted(self.latencies)
        if not ordered:
            return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}

        def pick(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return {"p50": pick(0.50), "p99": pick(0.99), "max": ordered[-1]}

    def dump_durations(self) -> list[float]:
        return [d.finished - d.started for d in self.dumps if not d.crashed]

    def summary(self) -> dict[str, Any]:
        lat = self.latency_percentiles()
        durations = sorted(self.dump_durations())
        return {
            "design": self.name,
            "note": self.note,
            "seconds": round(self.seconds, 3),
            "writers": self.writers,
            "dumps_attempted": self.dumps_attempted,
            "dumps_crashed": self.dumps_crashed,
            "dumps_unreadable": self.dumps_unreadable,
            "dumps_torn": self.dumps_torn,
            "dumps_consistent": self.dumps_consistent,
            "crash_messages": dict(self.crash_messages),
            "dump_ms_p50": round(durations[len(durations) // 2] * 1e3, 2) if durations else None,
            "writer_ops": self.ops,
            "writer_transfers": self.transfers,
            "writer_ops_per_s": round(self.throughput, 1),
            "latency_ms_p50": round(lat["p50"] * 1e3, 4),
            "latency_ms_p99": round(lat["p99"] * 1e3, 4),
            "latency_ms_max": round(lat["max"] * 1e3, 4),
            "writer_errors": self.writer_errors,
            **self.extra,
        }


@dataclass(frozen=True, kw_only=True)
class Workload:
    """The size and length of one comparison."""

    seconds: float = 5.0
    accounts: int = 10_000
    writers: int = 2
    dump_interval: float = 0.1
    history_cap: int = 2_000
    seed: int = 1
    #: False runs the writers alone: the baseline a design's dumps are measured against.
    dumps: bool = True

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ValueError(f"seconds must be positive, not {self.seconds}")
        if self.accounts < 2:
            raise ValueError(f"accounts must be at least 2, not {self.accounts}")
        if self.writers < 1:
            raise ValueError(f"writers must be at least 1, not {self.writers}")
        if self.dump_interval < 0:
            raise ValueError(f"dump_interval must not be negative, not {self.dump_interval}")


def make_design(name: str, workload: Workload, directory: Path) -> _Design:
    tree = initial_tree(workload.accounts)
    if name == "naive":
        return NaiveDesign(tree)
    if name == "global-lock":
        return GlobalLockDesign(tree)
    if name == "owner-thread":
        return OwnerThreadDesign(tree)
    if name == "snaptree":
        return SnaptreeDesign(tree, directory)
    raise ValueError(f"unknown design {name!r}; choose from {', '.join(DESIGNS)}")


def run_design(name: str, workload: Workload) -> DesignResult:
    """Run one design for ``workload.seconds``: W writers and one dumper, then check every dump."""
    directory = Path(tempfile.mkdtemp(prefix=f"snaptree-compare-{name}-"))
    try:
        design = make_design(name, workload, directory)
        try:
            return _measure(design, workload, directory)
        finally:
            design.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _measure(design: _Design, workload: Workload, directory: Path) -> DesignResult:
    clock = time.perf_counter
    stop = threading.Event()
    go = threading.Barrier(workload.writers + 2, timeout=JOIN_TIMEOUT)
    failures: list[str] = []
    per_writer: list[tuple[array, array, int, int]] = [None] * workload.writers  # type: ignore[list-item]
    dumps: list[DumpAttempt] = []
    origin = 0.0

    def writer(index: int) -> None:
        plan = _WriterPlan(index, workload.writers, workload.accounts, workload.seed)
        latencies, starts = array("d"), array("d")
        ops = transfers = 0
        apply, cap = design.apply, workload.history_cap
        try:
            go.wait()
            while not stop.is_set():
                fn, args = plan.next(cap)
                started = clock()
                apply(fn, args)
                latencies.append(clock() - started)
                starts.append(started - origin)
                ops += 1
                transfers += fn is transfer
        except Exception as exc:  # reported with the results; the run goes on without it
            failures.append(f"writer {index}: {type(exc).__name__}: {exc}")
        per_writer[index] = (latencies, starts, ops, transfers)

    def dumper() -> None:
        number = 0
        go.wait()
        while workload.dumps and not stop.is_set():
            number += 1
            dumps.append(attempt_dump(design.dump, directory / f"dump-{number:05d}.pickle", clock))
            stop.wait(workload.dump_interval)

    threads = [
        threading.Thread(target=writer, args=(i,), name=f"writer-{i}", daemon=True)
        for i in range(workload.writers)
    ]
    threads.append(threading.Thread(target=dumper, name="dumper", daemon=True))
    for thread in threads:
        thread.start()
    origin = clock()
    go.wait()
    time.sleep(workload.seconds)  # the measured window itself, not a synchronisation
    stop.set()
    elapsed = clock() - origin
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"{thread.name} of the {design.name} design did not stop")

    latencies, op_times = array("d"), array("d")
    ops = transfers = 0
    for lat, starts, n, t in per_writer:
        latencies.extend(lat)
        op_times.extend(starts)
        ops += n
        transfers += t
    for attempt in dumps:
        attempt.started -= origin
        attempt.finished -= origin
    result = DesignResult(
        name=design.name,
        note="",
        seconds=elapsed,
        writers=workload.writers,
        ops=ops,
        transfers=transfers,
        latencies=latencies,
        op_times=op_times,
        dumps=dumps,
        writer_errors=failures,
    )
    for attempt in dumps:
        if attempt.crashed:
            message = attempt.error or ""
            result.crash_messages[message.split(":", 2)[-1].strip() or message] += 1
        else:
            result.verdicts[check_dump(attempt.path, workload.accounts)] += 1
        attempt.path.unlink(missing_ok=True)
    result.note = design.note
    result.extra = design.extra()
    return result


# -- the whole comparison ---------------------------------------------------------------


@dataclass
class Comparison:
    workload: Workload
    results: list[DesignResult]

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": {
                "seconds_per_design": self.workload.seconds,
                "accounts": self.workload.accounts,
                "writers": self.workload.writers,
                "dump_interval_s": self.workload.dump_interval,
                "history_cap": self.workload.history_cap,
                "invariant": f"sum of balances == {expected_total(self.workload.accounts)}",
            },
            "python": sys.version.split()[0],
            "designs": [r.summary() for r in self.results],
        }

    def to_markdown(self) -> str:
        """The results as a Markdown table (readable as plain text too)."""
        header = (
            "| design | dumps | crashed | unreadable | torn | consistent | dump ms p50 "
            "| writer ops/s | latency ms p50 | p99 | max |"
        )
        lines = [header, "|" + "---|" * (header.count("|") - 1)]
        for r in self.results:
            s = r.summary()
            dump_ms = "-" if s["dump_ms_p50"] is None else f"{s['dump_ms_p50']:.1f}"
            lines.append(
                f"| {r.name} | {s['dumps_attempted']} | {s['dumps_crashed']} "
                f"| {s['dumps_unreadable']} | {s['dumps_torn']} | {s['dumps_consistent']} "
                f"| {dump_ms} | {s['writer_ops_per_s']:,.0f} | {s['latency_ms_p50']:.3f} "
                f"| {s['latency_ms_p99']:.3f} | {s['latency_ms_max']:.1f} |"
            )
        notes = [f"- **{r.name}**: {r.note}" for r in self.results]
        crashes = [
            f"- {r.name} crash: {count} x `{message}`"
            for r in self.results
            for message, count in r.crash_messages.most_common()
        ]
        errors = [f"- {r.name} writer error: {e}" for r in self.results for e in r.writer_errors]
        return "\n".join([*lines, "", *notes, *crashes, *errors])


def run_comparison(
    workload: Workload,
    designs: Sequence[str] = DESIGNS,
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Run each design in turn on the same workload; nothing is carried over between them."""
    results = []
    for name in designs:
        if progress:
            progress(f"running {name} for {workload.seconds:g} s ...")
        result = run_design(name, workload)
        if progress and name == "snaptree":
            progress(f"snaptree dumps went through {result.extra.get('dump_path')}")
        results.append(result)
    return Comparison(workload, results)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare_designs",
        description=(
            "Run the original design (plain dicts + pickle.dump from a thread), a global "
            "lock, a single owner thread and snaptree on the same workload, and report "
            "crashed and torn dumps, writer throughput and latency."
        ),
        epilog="Example: python scripts/compare_designs.py --seconds 3 --accounts 10000",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="run time of each design")
    parser.add_argument("--accounts", type=int, default=10_000, help="accounts in the tree")
    parser.add_argument("--writers", type=int, default=2, help="writer threads")
    parser.add_argument(
        "--dump-interval", type=float, default=0.1, help="pause between dumps, seconds"
    )
    parser.add_argument(
        "--design",
        action="append",
        choices=DESIGNS,
        help="run only this design (repeatable); default: all four",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON on stdout (logs on stderr)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point shared by ``scripts/compare_designs.py`` and ``snaptree demo``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        workload = Workload(
            seconds=args.seconds,
            accounts=args.accounts,
            writers=args.writers,
            dump_interval=args.dump_interval,
        )
    except ValueError as exc:
        parser.error(str(exc))
    comparison = run_comparison(
        workload,
        args.design or DESIGNS,
        progress=lambda text: print(text, file=sys.stderr, flush=True),
    )
    if args.json:
        json.dump(comparison.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        w = workload
        print(
            f"\n{w.accounts} accounts, {w.writers} writer threads, {w.seconds:g} s per design, "
            f"a dump every {w.dump_interval:g} s; invariant: balances sum to "
            f"{expected_total(w.accounts)}\n"
        )
        print(comparison.to_markdown())
    failed = any(r.writer_errors for r in comparison.results)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
