"""The original design side by side with its two usual workarounds and with snaptree.

Four designs (:mod:`snaptree.demo.designs`: ``naive``, ``global-lock``,
``owner-thread``, ``snaptree``) run the same workload, one after the other,
for a bounded time each, and are measured in the same run: dumps crashed,
unreadable, torn or consistent, and the writers' throughput and latency.

Run it with ``python scripts/compare_designs.py`` or ``snaptree demo --compare``.
"""

from __future__ import annotations

import argparse
import json
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

import snaptree

from .designs import (
    DESIGNS,
    JOIN_TIMEOUT,
    Design,
    DumpAttempt,
    WriterPlan,
    attempt_dump,
    check_dump,
    expected_total,
    make_design,
    transfer,
)

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
            raise snaptree.ArgumentError(f"seconds must be positive, not {self.seconds}")
        if self.accounts < 2:
            raise snaptree.ArgumentError(f"accounts must be at least 2, not {self.accounts}")
        if self.writers < 1:
            raise snaptree.ArgumentError(f"writers must be at least 1, not {self.writers}")
        if self.dump_interval < 0:
            raise snaptree.ArgumentError(
                f"dump_interval must not be negative, not {self.dump_interval}"
            )


def run_design(name: str, workload: Workload) -> DesignResult:
    """Run one design for ``workload.seconds``: W writers and one dumper, then check every dump."""
    directory = Path(tempfile.mkdtemp(prefix=f"snaptree-compare-{name}-"))
    try:
        design = make_design(name, workload.accounts, directory)
        try:
            return _measure(design, workload, directory)
        finally:
            design.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _measure(design: Design, workload: Workload, directory: Path) -> DesignResult:
    clock = time.perf_counter
    stop = threading.Event()
    go = threading.Barrier(workload.writers + 2, timeout=JOIN_TIMEOUT)
    failures: list[str] = []
    per_writer: list[tuple[array, array, int, int]] = [None] * workload.writers  # type: ignore[list-item]
    dumps: list[DumpAttempt] = []
    origin = 0.0

    def writer(index: int) -> None:
        plan = WriterPlan(index, workload.writers, workload.accounts, workload.seed)
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
    except snaptree.ArgumentError as exc:
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
