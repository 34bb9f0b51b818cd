"""Benchmark: writes that scale with threads, in each durability mode (issue 14).

Every cell is measured in a fresh child process: N writer threads commit
small transfers (two balances of 1,000 accounts change) back to back for a
fixed time after a warm-up, and the child reports commits per second,
latencies, CPU per commit and fsyncs. Rounds alternate the order of the
cells (forward, then backward), so drift on a shared machine hits them
alike; each figure is the median over rounds, and each ratio the median of
the ratios taken within one round.

Cells (variant x storage x threads):

- variants: ``run`` (``store.run``), ``apart`` (``store.run`` on a store
  opened with ``take_turns=False``: threads' calls run alongside, each on
  its own connection, as every call did before calls took turns),
  ``batched`` (``store.run_batched``),
  ``hand`` (a hand-written ZODB loop: plain ``ZODB.DB``, one connection and
  explicit transaction manager kept per thread, ``tm.attempts()``), and
  ``today`` (``store.run`` of snaptree before this work, commit
  BASELINE_COMMIT, extracted with ``git archive`` and run from there);
- storages: ``commit``, ``group``, ``relaxed`` (FileStorage in each mode;
  ``hand`` and ``today`` on stock FileStorage, which is ``commit``),
  ``off`` (``relaxed`` with ``os.fsync`` made a no-op in that process: the
  same work with no fsync at all) and ``memory`` (memory://).

The layer's cost is then measured a second way, which this machine's
noise cannot hide: in one process, on one store, each writer thread
alternates call by call between ``store.run`` and the hand-written loop
on the very connection ``store.run`` keeps for that thread (lent by the
store's pool; only the loop's own work is timed), the order rotating at
every call. Both then read and write the same objects in the same memory:
across processes, where each variant opens its own database, the layout
of the objects alone moved the rate by up to a tenth.

The layer's own cost is also counted in instructions (valgrind's
cachegrind, when installed): ``hand`` and ``run`` on memory:// and
``off``, one thread, each call counted as the difference between a child
that makes INSTRUCTION_CALLS[1] calls and one that makes
INSTRUCTION_CALLS[0] (start-up cancels out), with a fixed hash seed.
Instructions hardly depend on what else the machine runs (three counts
of one cell stayed within 1%); on this shared machine the same cell's
wall-clock rate moves by up to a fifth from one minute to the next, more
than the difference being measured.

Then, in the same run: writer processes through ``snaptree serve`` in each
mode it offers; two writer threads during back-to-back exports in each mode
(the writers/exporter scenario of bench_export.py); and the cost of keeping
the index file fresh (how long a read-only open of a live file takes, and
how long commits stall while a 10-million-object index is saved).

Example:

    .venv/bin/python scripts/bench/bench_writes.py --quick --json /tmp/writes.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import ROOT, command_line, facts_markdown, write_result
from _serving import snaptree_serve

HERE = Path(__file__).resolve()

#: snaptree before issue 14: what "today" means in the tables.
BASELINE_COMMIT = "d4ac152"

ACCOUNTS = 1_000
MODES = ("commit", "group", "relaxed")

#: The tree exported while the writers work (as in bench_export.py's smallest size).
EXPORT_OBJECTS = 10_000

#: The two call counts whose instruction counts are subtracted (after a warm-up of 300).
INSTRUCTION_CALLS = (500, 1500)

#: save_index_every for the index measurement: small, so that the run stays short.
INDEX_EVERY = 2**20


# -- the child: one cell ------------------------------------------------------------------


def transfer(root: Any, source: str, target: str) -> None:
    accounts = root["accounts"]
    accounts[source]["balance"] -= 1
    accounts[target]["balance"] += 1


def make_accounts(root: Any) -> None:
    root["accounts"] = {
        f"{i:08d}": {"balance": 1_000, "owner": f"owner {i}", "open": True} for i in range(ACCOUNTS)
    }


def _switch_fsync_off() -> None:
    """The "off" storage: no fsync at all in this process (the ceiling, unsafe on a crash)."""
    import ZODB.FileStorage  # noqa: F401 - loads the module patched below

    os.fsync = lambda fd: None
    # ZODB keeps its own reference, in the module (the package exports the class).
    sys.modules["ZODB.FileStorage.FileStorage"].fsync = None


def _opener(variant: str, storage: str, path: str) -> tuple[Callable[[], Callable], Callable]:
    """(per_thread, close): per_thread() gives a thread its call(source, target)."""
    import snaptree

    if variant == "hand":
        import transaction
        from ZODB import DB
        from ZODB.FileStorage import FileStorage

        from snaptree._memory import ResolvingMappingStorage

        zodb_storage = (
            ResolvingMappingStorage("bench") if storage == "memory" else FileStorage(path)
        )
        db = DB(zodb_storage, pool_size=32, cache_size=10_000)
        if storage == "memory":
            with db.transaction() as conn:
                conn.root()["snaptree"] = snaptree.Mapping()
                make_accounts(conn.root()["snaptree"])

        connections = []

        def hand_thread() -> Callable:
            tm = transaction.TransactionManager(explicit=True)
            conn = db.open(transaction_manager=tm)
            connections.append(conn)

            def call(a: str, b: str) -> None:
                for attempt in tm.attempts(20):
                    with attempt:
                        transfer(conn.root()["snaptree"], a, b)

            return call

        def close() -> None:
            for conn in connections:
                conn.close()
            db.close()

        return hand_thread, close
    uri = "memory://" if storage == "memory" else path
    options: dict[str, Any] = {"take_turns": False} if variant == "apart" else {}
    if variant != "today" and storage != "memory":
        options["durability"] = "relaxed" if storage == "off" else storage
    store = snaptree.open(uri, **options)
    if storage == "memory":
        store.run(make_accounts)
    run = store.run_batched if variant == "batched" else store.run

    def store_thread() -> Callable:
        return lambda a, b: run(transfer, a, b)

    return store_thread, store.close


def child_cell(variant: str, storage: str, threads: int, seconds: float, path: str) -> None:
    if storage == "off":
        _switch_fsync_off()
    per_thread, close = _opener(variant, storage, path)
    counts = [0] * threads
    latencies: list[list[float]] = [[] for _ in range(threads)]

    def work(i: int, ready: Callable[[], None], stop: threading.Event) -> None:
        rng = random.Random(i)
        call = per_thread()
        for _ in range(20):  # warm this thread's cache before the clock starts
            a, b = rng.sample(range(ACCOUNTS), 2)
            call(f"{a:08d}", f"{b:08d}")
        ready()
        clock, mine = time.perf_counter, latencies[i]
        while not stop.is_set():
            a, b = rng.sample(range(ACCOUNTS), 2)
            began = clock()
            call(f"{a:08d}", f"{b:08d}")
            mine.append(clock() - began)
        counts[i] = len(mine)

    elapsed, cpu, fsyncs = _drive(threads, seconds, work)
    close()
    total = sum(counts)
    every = sorted(x for mine in latencies for x in mine)
    print(
        json.dumps(
            {
                "per_s": total / elapsed,
                "p50_ms": every[len(every) // 2] * 1e3,
                "p99_ms": every[int(len(every) * 0.99)] * 1e3,
                "cpu_us": cpu / max(total, 1) * 1e6,
                "commits_per_fsync": total / fsyncs if fsyncs > 0 else None,
                "pressure": cpu_pressure(),
            }
        )
    )


def _drive(
    threads: int,
    seconds: float,
    work: Callable[[int, Callable[[], None], threading.Event], None],
) -> tuple[float, float, int]:
    """Run ``work(i, ready, stop)`` on *threads* threads, timed from all ready for *seconds*.

    Each thread warms up, calls ``ready()``, and works until ``stop`` is set.
    Returns the elapsed seconds, the process's CPU seconds and the fsyncs
    of the timed span; a thread's failure is raised here.
    """
    barrier = threading.Barrier(threads + 1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i, lambda: barrier.wait(120), stop)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait(300)
    fsyncs_before = _fsyncs()
    cpu_before, began = os.times(), time.perf_counter()
    stop.wait(seconds)
    stop.set()
    elapsed = time.perf_counter() - began
    cpu_after = os.times()
    for thread in pool:
        thread.join(120)
    if errors:
        raise errors[0]
    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    return elapsed, cpu, _fsyncs() - fsyncs_before


_storages: list[Any] = []


def child_count(variant: str, storage: str, calls: int, path: str) -> None:
    """Make exactly *calls* calls after a warm-up, on one thread: counted under valgrind."""
    if storage == "off":
        _switch_fsync_off()
    per_thread, close = _opener(variant, storage, path)
    call = per_thread()
    rng = random.Random(0)
    for _ in range(300 + calls):
        a, b = rng.sample(range(ACCOUNTS), 2)
        call(f"{a:08d}", f"{b:08d}")
    close()


def child_layer(storage: str, threads: int, seconds: float, path: str) -> None:
    """store.run and the hand-written loop, interleaved on each thread's own connection.

    With several threads, store.run's calls would take turns where the hand-written
    loop's run alongside: both run alongside there (``take_turns=False``), which is
    the layer's own cost; the cells measure what taking turns gives.
    """
    import snaptree

    if storage == "off":
        _switch_fsync_off()
    turns = threads == 1
    if storage == "memory":
        store = snaptree.open("memory://", take_turns=turns)
        store.run(make_accounts)
    else:
        durability = "relaxed" if storage == "off" else storage
        store = snaptree.open(path, durability=durability, take_turns=turns)
    pool = store._pool  # the hand-written loop borrows the connection store.run keeps
    clock = time.perf_counter
    spent = [[0.0, 0.0] for _ in range(threads)]  # per thread: hand, store.run
    made = [[0, 0] for _ in range(threads)]

    def hand(a: str, b: str) -> float:
        pair = pool.acquire()
        conn, tm = pair.conn, pair.tm
        conn.snaptree_committing = True  # the one commit snaptree's connection allows
        try:
            began = clock()
            for attempt in tm.attempts(20):
                with attempt:
                    transfer(conn.root()["snaptree"], a, b)
            return clock() - began
        finally:
            conn.snaptree_committing = False
            pool.release(pair)

    def mine(a: str, b: str) -> float:
        began = clock()
        store.run(transfer, a, b)
        return clock() - began

    def work(i: int, ready: Callable[[], None], stop: threading.Event) -> None:
        rng = random.Random(i)
        variants = (hand, mine)
        for _ in range(20):
            for variant in variants:
                a, b = rng.sample(range(ACCOUNTS), 2)
                variant(f"{a:08d}", f"{b:08d}")
        ready()
        turn = 0
        while not stop.is_set():
            a, b = rng.sample(range(ACCOUNTS), 2)
            a, b = f"{a:08d}", f"{b:08d}"
            for k in (turn, 1 - turn):  # the order rotates: the first of two pays more
                spent[i][k] += variants[k](a, b)
                made[i][k] += 1
            turn = 1 - turn

    _drive(threads, seconds, work)
    store.close()
    hand_us = sum(t[0] for t in spent) / sum(m[0] for m in made) * 1e6
    run_us = sum(t[1] for t in spent) / sum(m[1] for m in made) * 1e6
    print(json.dumps({"hand_us": hand_us, "run_us": run_us, "ratio": hand_us / run_us}))


def measure_layer(storage: str, threads: int, seconds: float, work: Path, template: Path) -> dict:
    path = _copy_template(template, work / "layer.fs")
    return _child(["--layer", storage, str(threads), str(seconds), str(path)], dict(os.environ))


def measure_instructions(variant: str, storage: str, work: Path, template: Path) -> float | None:
    """Instructions per call of *variant* on *storage*; None without valgrind."""
    if shutil.which("valgrind") is None:
        return None
    counts = []
    for calls in INSTRUCTION_CALLS:
        path = _copy_template(template, work / f"count-{variant}-{storage}.fs")
        out = subprocess.run(
            [
                "valgrind",
                "--tool=cachegrind",
                "--cache-sim=no",
                "--cachegrind-out-file=/dev/null",
                sys.executable,
                str(HERE),
                "--count",
                variant,
                storage,
                str(calls),
                str(path),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            timeout=900,
            check=False,
        )
        _remove_store(path)
        found = re.findall(r"I\s+refs:\s+([\d,]+)", out.stderr)
        if out.returncode != 0 or not found:
            raise RuntimeError(
                f"counting {variant} on {storage} failed (exit {out.returncode}):\n"
                f"{out.stderr[-2000:]}"
            )
        counts.append(int(found[-1].replace(",", "")))
    return (counts[1] - counts[0]) / (INSTRUCTION_CALLS[1] - INSTRUCTION_CALLS[0])


def _fsyncs() -> int:
    """Fsyncs of the data file so far (DurableFileStorage counts them)."""
    import gc

    try:
        from snaptree._durable_file import DurableFileStorage
    except ImportError:  # snaptree before this work
        return 0
    if not _storages:
        _storages.extend(o for o in gc.get_objects() if isinstance(o, DurableFileStorage))
    return sum(storage.fsyncs for storage in _storages)


def cpu_pressure() -> float:
    """/proc/pressure/cpu "some avg10": the share of time a task waited for a core."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return float("nan")


# -- the parent ---------------------------------------------------------------------------


def build_template(work: Path) -> Path:
    import snaptree

    path = work / "template.fs"
    with snaptree.open(str(path)) as store:
        store.run(make_accounts)
    return path


@contextlib.contextmanager
def baseline_source(work: Path) -> Iterator[Path | None]:
    """snaptree at BASELINE_COMMIT, extracted from git; None if that is not possible here."""
    target = work / "baseline"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BASELINE_COMMIT, "src"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        print(f"no baseline: {archive.stderr.decode().strip()}", file=sys.stderr)
        yield None
        return
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    yield target / "src"


def _remove_store(path: Path) -> None:
    """Remove the FileStorage at *path* and the files ZODB keeps beside it."""
    for suffix in ("", ".index", ".lock", ".tmp"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _copy_template(template: Path, path: Path) -> Path:
    """A fresh copy of the template store at *path*, its index with it."""
    _remove_store(path)
    shutil.copyfile(template, path)
    shutil.copyfile(f"{template}.index", f"{path}.index")
    return path


def _child(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run this script as a child with *argv*; the JSON of its last line of output."""
    out = subprocess.run(
        [sys.executable, str(HERE), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def measure_cell(
    cell: tuple[str, str, int], seconds: float, work: Path, template: Path, baseline: Path | None
) -> dict[str, Any]:
    variant, storage, threads = cell
    path = _copy_template(template, work / "cell.fs")
    env = dict(os.environ)
    if variant == "today":
        env["PYTHONPATH"] = str(baseline)
    return _child(["--cell", variant, storage, str(threads), str(seconds), str(path)], env)


def run_cells(
    cells: list[tuple[str, str, int]],
    rounds: int,
    seconds: float,
    work: Path,
    baseline: Path | None,
) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    template = build_template(work)
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {cell: [] for cell in cells}
    for r in range(rounds):
        order = cells if r % 2 == 0 else cells[::-1]
        for cell in order:
            result = measure_cell(cell, seconds, work, template, baseline)
            results[cell].append(result)
            print(
                f"round {r} {cell}: {result['per_s']:.0f}/s p99 {result['p99_ms']:.1f} ms "
                f"cpu {result['cpu_us']:.0f} us pressure {result['pressure']:.0f}",
                file=sys.stderr,
                flush=True,
            )
    return results


def median(runs: list[dict[str, Any]], key: str) -> float:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def ratio(runs: list[dict[str, Any]], base: list[dict[str, Any]], key: str = "per_s") -> float:
    """The median of the ratios taken round by round (each within one round)."""
    return statistics.median(a[key] / b[key] for a, b in zip(runs, base, strict=True))


# -- serve: writer processes through ZEO ---------------------------------------------------


def child_zeo_writer(uri: str, seconds: float, seed: int) -> None:
    import snaptree

    with snaptree.open(uri) as store:
        rng = random.Random(seed)
        for _ in range(20):
            a, b = rng.sample(range(ACCOUNTS), 2)
            store.run(transfer, f"{a:08d}", f"{b:08d}")
        print("ready", flush=True)
        sys.stdin.readline()  # the go
        latencies = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            a, b = rng.sample(range(ACCOUNTS), 2)
            began = time.perf_counter()
            store.run(transfer, f"{a:08d}", f"{b:08d}")
            latencies.append(time.perf_counter() - began)
    print(json.dumps({"commits": len(latencies), "latencies": latencies}))


def measure_serve(mode: str, writers: int, seconds: float, work: Path, template: Path) -> dict:
    path = work / "served.fs"
    for suffix in ("", ".index", ".lock", ".tmp"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(template, path)
    with snaptree_serve(path, work / "serve.log", "--durability", mode) as uri:
        procs = [
            subprocess.Popen(
                [sys.executable, str(HERE), "--zeo-writer", uri, str(seconds), str(i)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(writers)
        ]
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [json.loads(proc.communicate(timeout=seconds + 120)[0]) for proc in procs]
    every = sorted(x for result in results for x in result["latencies"])
    return {
        "per_s": sum(result["commits"] for result in results) / seconds,
        "p99_ms": every[int(len(every) * 0.99)] * 1e3,
    }


# -- writers during back-to-back exports ---------------------------------------------------


def measure_exports(mode: str, kind: str, seconds: float, work: Path) -> dict[str, Any]:
    """bench_export.py's writers/exporter scenario, the store opened in *mode*."""
    import bench_export

    db = work / f"exports-{mode}.fs"
    if not db.exists():
        bench_export.build(db, EXPORT_OBJECTS)
    out = work / f"exports-{mode}-{kind}"
    out.mkdir(exist_ok=True)
    accounts = EXPORT_OBJECTS // 2  # what bench_export.build makes of them
    return bench_export.writers_phase(
        f"file://{db}?durability={mode}", accounts, kind, seconds, out
    )


# -- the index file ------------------------------------------------------------------------


def measure_index(work: Path, commits: int) -> dict[str, Any]:
    """A read-only open of a live file, with and without periodic index saves; save stalls."""
    import snaptree
    from snaptree._durable_file import DurableFileStorage

    figures: dict[str, Any] = {}
    for label, every in ((f"saved every {INDEX_EVERY // 2**20} MiB", INDEX_EVERY), ("at close", 0)):
        path = work / f"index-{every}.fs"
        store = snaptree.open(str(path), durability="relaxed", save_index_every=every)
        try:
            store.run(make_accounts)
            for i in range(commits):
                store.run(lambda root, i=i: root["accounts"][f"{i % ACCOUNTS:08d}"].update(n=i))
            store.sync()
            began = time.perf_counter()
            with snaptree.open(str(path), read_only=True) as reader:
                reader.last_tid()
            figures[label] = {
                "open_s": time.perf_counter() - began,
                "file_mb": path.stat().st_size / 2**20,
            }
        finally:
            store.close()
    # Commits while a 10-million-object index is saved in the background.
    from ZODB.fsIndex import fsIndex
    from ZODB.utils import p64

    store = snaptree.open(str(work / "big-index.fs"), durability="relaxed", save_index_every=0)
    try:
        storage = store.db.storage
        assert isinstance(storage, DurableFileStorage)
        big = fsIndex()
        for oid in range(10_000_000):
            big[p64(oid + 1_000_000_000)] = 4
        big.update(storage._index)
        # Stand-in entries, never read (the copy's cost is what is measured), installed
        # the way FileStorage installs an index (ZODB 6.4's _initIndex).
        storage._initIndex(big, storage._tindex)
        stalls: list[float] = []
        done = threading.Event()

        def commit_meanwhile() -> None:
            while not done.is_set():
                began = time.perf_counter()
                store.run(lambda root: root.update(n=root.get("n", 0) + 1))
                stalls.append(time.perf_counter() - began)

        for _ in range(200):
            store.run(lambda root: root.update(n=root.get("n", 0) + 1))
        writer = threading.Thread(target=commit_meanwhile)
        quiet: list[float] = []
        for _ in range(500):
            began = time.perf_counter()
            store.run(lambda root: root.update(n=root.get("n", 0) + 1))
            quiet.append(time.perf_counter() - began)
        writer.start()
        began = time.perf_counter()
        storage.save_index()
        save_s = time.perf_counter() - began
        done.set()
        writer.join(60)
        began = time.perf_counter()
        big.save(storage._pos, str(work / "whole.index"))
        whole_s = time.perf_counter() - began
    finally:
        store.close()
    figures["big"] = {
        "save_s": save_s,
        "zodb_save_s": whole_s,
        "commits_during": len(stalls),
        "max_commit_ms": max(stalls) * 1e3 if stalls else float("nan"),
        "quiet_max_ms": max(quiet) * 1e3,
        "quiet_p99_ms": sorted(quiet)[int(len(quiet) * 0.99)] * 1e3,
    }
    return figures


# -- the report ----------------------------------------------------------------------------


def report(args: argparse.Namespace, figures: dict[str, Any], cmd: str) -> str:
    lines = [
        "## Writes: durability modes and threads",
        "",
        facts_markdown(),
        "",
        f"Command: `{cmd}`",
        "",
    ]
    if figures.get("cells"):
        lines += _cells_section(args, figures)
    lines += _layer_measures(args, figures)
    if figures.get("serve"):
        lines += _serve_section(figures["serve"])
    if figures.get("exports"):
        lines += _exports_section(figures["exports"])
    if figures.get("index"):
        lines += _index_section(figures["index"], args.index_commits)
    return "\n".join(lines) + "\n"


def _cells_section(args: argparse.Namespace, figures: dict[str, Any]) -> list[str]:
    cells, threads = figures["cells"], figures["threads"]

    def runs(variant: str, storage: str, n: int) -> list[dict[str, Any]]:
        return cells.get(f"{variant}:{storage}:{n}", [])

    lines = [
        f"{ACCOUNTS:,} accounts (a snaptree Mapping each); every call moves one unit between "
        f"two random accounts. Each cell runs in a fresh process for {args.seconds:g} s after a "
        f"warm-up; {args.rounds} rounds in alternating order; figures are medians over the "
        "rounds, ratios medians of the ratios within a round. `today`: `store.run` of snaptree "
        f"at {BASELINE_COMMIT} (before this work), on stock FileStorage. `off`: `relaxed` with "
        "fsync made a no-op (the ceiling). CPU pressure (share of time a task of the machine "
        f"waited for a core) during the cells: median {figures['pressure']:.0f}%.",
        "",
        "### Commits per second, by mode and writer threads (FileStorage)",
        "",
        "| "
        + " | ".join(
            ["calls", "storage"]
            + [f"{n} thr" for n in threads]
            + [f"{n}t/1t" for n in threads[1:]]
            + [f"p99 ms at {threads[0]}", f"p99 ms at {threads[-1]}"]
            + [f"commits per fsync at {threads[-1]}"]
        )
        + " |",
        "|---|---|" + "---:|" * (2 * len(threads) + 2),
    ]
    rows = [("today", "commit")] + [
        (variant, storage)
        for variant in ("run", "apart", "batched")
        for storage in ("commit", "group", "relaxed", "off", "memory")
    ]
    label = {
        "today": "store.run today",
        "run": "store.run",
        "apart": "store.run, take_turns=False",
        "batched": "run_batched",
    }
    for variant, storage in rows:
        if not runs(variant, storage, threads[0]):
            continue
        rates = [f"{median(runs(variant, storage, n), 'per_s'):,.0f}" for n in threads]
        scale = [
            f"{ratio(runs(variant, storage, n), runs(variant, storage, threads[0])):.2f}"
            for n in threads[1:]
        ]
        last = runs(variant, storage, threads[-1])
        per_fsync = median(last, "commits_per_fsync")
        lines.append(
            f"| {label[variant]} | {storage} | "
            + " | ".join(rates + scale)
            + f" | {median(runs(variant, storage, threads[0]), 'p99_ms'):.1f}"
            + f" | {median(last, 'p99_ms'):.1f} | "
            + ("-" if per_fsync != per_fsync else f"{per_fsync:.1f}")
            + " |"
        )
    four = 4 if 4 in threads else threads[-1]
    many = [n for n in threads[1:] if n >= 4]
    lines += [
        "",
        f"### Against the targets (ratios within rounds; {four} threads unless said)",
        "",
        "| target | calls, mode | measured | |",
        "|---|---|---:|---|",
    ]
    today = runs("today", "commit", four)
    for variant in ("run", "batched"):
        for storage in ("commit", "group"):
            if today:
                value = ratio(runs(variant, storage, four), today)
                lines.append(
                    f"| durable >= 1.5x today's rate | {label[variant]}, {storage} | "
                    f"{value:.2f}x | {'met' if value >= 1.5 else 'missed'} |"
                )
    for variant in ("run", "apart", "batched"):
        for storage in MODES:
            if not many:
                continue
            worst = min(
                ratio(runs(variant, storage, n), runs(variant, storage, threads[0])) for n in many
            )
            lines.append(
                f"| {', '.join(map(str, many))} threads >= 1.0x of 1 | "
                f"{label[variant]}, {storage} | {worst:.2f}x (lowest) | "
                f"{'met' if worst >= 1.0 else 'missed'} |"
            )
    for variant in ("run", "batched"):
        if not runs(variant, "off", threads[0]):
            continue
        lowest = min(ratio(runs(variant, "relaxed", n), runs(variant, "off", n)) for n in threads)
        lines.append(
            f"| relaxed >= 0.9x of fsync off, every thread count | {label[variant]} | "
            f"{lowest:.2f}x (lowest) | {'met' if lowest >= 0.9 else 'missed'} |"
        )
    lines += [
        "",
        "### The layer: store.run against a hand-written ZODB loop",
        "",
        "The loop keeps one connection and explicit transaction manager per thread and "
        "commits with `tm.attempts()`: what snaptree does, without its guards. Same storage: "
        'memory://; stock FileStorage against `durability="commit"`; `off` both with fsync '
        "made a no-op. With several threads `store.run`'s calls take turns and the loop's "
        "run alongside: that row compares the two ways, the layer's own cost is measured "
        "below with both alongside.",
        "",
        "| storage | threads | hand-written/s | store.run/s | ratio | CPU us per call, hand | "
        "store.run | target >= 0.95x |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for storage in ("memory", "commit", "off"):
        for n in sorted({1, four}):
            hand, mine = runs("hand", storage, n), runs("run", storage, n)
            if not hand or not mine:
                continue
            value = ratio(mine, hand)
            lines.append(
                f"| {storage} | {n} | {median(hand, 'per_s'):,.0f} | {median(mine, 'per_s'):,.0f}"
                f" | {value:.2f}x | {median(hand, 'cpu_us'):.0f} | {median(mine, 'cpu_us'):.0f} | "
                f"{'met' if value >= 0.95 else 'missed'} |"
            )
    return lines


def _layer_measures(args: argparse.Namespace, figures: dict[str, Any]) -> list[str]:
    """The layer's cost measured on one store, and counted in instructions."""
    lines: list[str] = []
    layer = figures.get("layer") or {}
    if layer:
        lines += [
            "",
            "Measured the second way (one store, each thread alternating call by call between "
            "the two on the connection store.run keeps; "
            f"{len(next(iter(layer.values())))} runs of {args.seconds * 2:g} s, medians):",
            "",
            "| storage | threads | hand-written, us per call | store.run | ratio | "
            "target >= 0.95x |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for key, rows in layer.items():
            storage, n = key.split(":")
            value = statistics.median(row["ratio"] for row in rows)
            lines.append(
                f"| {storage} | {n} | {statistics.median(row['hand_us'] for row in rows):.0f} | "
                f"{statistics.median(row['run_us'] for row in rows):.0f} | {value:.3f}x | "
                f"{'met' if value >= 0.95 else 'missed'} |"
            )
    counted = figures.get("instructions") or {}
    if any(value is not None for value in counted.values()):
        lines += [
            "",
            "Instructions per call, one thread (valgrind's cachegrind: the count hardly depends "
            "on what else the machine does: three runs of a cell stayed within 1%):",
            "",
            "| storage | hand-written | store.run | ratio (hand / store.run) | target >= 0.95x |",
            "|---|---:|---:|---:|---|",
        ]
        for storage in ("memory", "off"):
            hand, mine = counted.get(f"hand:{storage}"), counted.get(f"run:{storage}")
            if hand is None or mine is None:
                continue
            value = hand / mine
            lines.append(
                f"| {storage} | {hand:,.0f} | {mine:,.0f} | {value:.3f}x | "
                f"{'met' if value >= 0.95 else 'missed'} |"
            )
    return lines


def _serve_section(serve: dict[str, Any]) -> list[str]:
    writers = serve["writers"]
    lines = [
        "",
        "### Through `snaptree serve` (ZEO), writer processes",
        "",
        "Each writer process runs `store.run` over zeo:// (server and writers share the two "
        "cores); commits per second over all writers, and the ratio to one writer.",
        "",
        "| serve --durability | " + " | ".join(f"{n} writers" for n in writers) + " | p99 ms |",
        "|---|" + "---:|" * (len(writers) + 1),
    ]
    for mode, by_writers in serve["modes"].items():
        base = by_writers[str(writers[0])]
        cells = [
            f"{median(by_writers[str(n)], 'per_s'):,.0f} ({ratio(by_writers[str(n)], base):.2f}x)"
            for n in writers
        ]
        p99 = median(by_writers[str(writers[-1])], "p99_ms")
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {p99:.1f} |")
    return lines


def _exports_section(exports: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"### Two writer threads during back-to-back exports ({EXPORT_OBJECTS:,} objects)",
        "",
        "bench_export.py's scenario (the Exporter's own process, paced) with the store opened "
        "in each mode.",
        "",
        "| mode | transfers/s, no export | with exports | ratio | p99 ms, no export | "
        "with exports | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, kinds in exports.items():
        none, busy = kinds["none"], kinds["exporter-process"]
        lines.append(
            f"| {mode} | {median(none, 'ops'):,.0f} | {median(busy, 'ops'):,.0f} | "
            f"{ratio(busy, none, 'ops'):.2f}x | {median(none, 'p99_ms'):.1f} | "
            f"{median(busy, 'p99_ms'):.1f} | {ratio(busy, none, 'p99_ms'):.2f}x |"
        )
    return lines


def _index_section(index: dict[str, Any], commits: int) -> list[str]:
    big = index["big"]
    lines = [
        "",
        "### Keeping the index file fresh",
        "",
        f"A read-only open (what an exporter does) of a file after {commits:,} commits, while "
        "the writer still has it open:",
        "",
        "| the writer's index file | data file | read-only open |",
        "|---|---:|---:|",
    ]
    for label, row in index.items():
        if label != "big":
            lines.append(f"| {label} | {row['file_mb']:.1f} MiB | {row['open_s'] * 1e3:.0f} ms |")
    lines += [
        "",
        f"Saving a 10,000,000-object index in the background took {big['save_s']:.2f} s "
        f"(ZODB's own save of it, all under the storage's lock: {big['zodb_save_s']:.2f} s). "
        f"A thread committing meanwhile made {big['commits_during']} commits, the slowest in "
        f"{big['max_commit_ms']:.1f} ms (without a save: p99 {big['quiet_p99_ms']:.1f} ms, "
        f"slowest {big['quiet_max_ms']:.1f} ms).",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cells, rounds and seconds")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    parser.add_argument("--threads", default=None, help="writer threads, e.g. 1,2,4,8")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument(
        "--only", default="cells,layer,instructions,serve,exports,index", help=argparse.SUPPRESS
    )
    parser.add_argument("--cell", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--zeo-writer", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--count", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--layer", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layer:
        storage, threads, seconds, path = args.layer
        child_layer(storage, int(threads), float(seconds), path)
        return
    if args.count:
        variant, storage, calls, path = args.count
        child_count(variant, storage, int(calls), path)
        return
    if args.cell:
        variant, storage, threads, seconds, path = args.cell
        child_cell(variant, storage, int(threads), float(seconds), path)
        return
    if args.zeo_writer:
        uri, seconds, seed = args.zeo_writer
        child_zeo_writer(uri, float(seconds), int(seed))
        return
    threads = [int(n) for n in (args.threads or ("1,4" if args.quick else "1,2,4,8")).split(",")]
    # The full run takes about ten minutes on two cores.
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.seconds = args.seconds or (1.0 if args.quick else 1.5)
    args.index_commits = 10_000 if args.quick else 20_000
    parts = set(args.only.split(","))
    cells = [("today", "commit", n) for n in threads]
    cells += [
        (v, s, n) for v in ("run", "apart") for s in (*MODES, "off", "memory") for n in threads
    ]
    cells += [("batched", s, n) for s in MODES for n in threads]
    four = 4 if 4 in threads else threads[-1]
    cells += [("hand", s, n) for s in ("memory", "commit", "off") for n in sorted({1, four})]
    figures: dict[str, Any] = {"threads": threads}
    with tempfile.TemporaryDirectory(prefix="bench-writes-") as tmp:
        work = Path(tmp)
        with baseline_source(work) as baseline:
            if baseline is None:
                cells = [cell for cell in cells if cell[0] != "today"]
            if "cells" in parts:
                results = run_cells(cells, args.rounds, args.seconds, work, baseline)
                figures["cells"] = {f"{v}:{s}:{n}": r for (v, s, n), r in results.items()}
                figures["pressure"] = statistics.median(
                    run["pressure"] for r in results.values() for run in r
                )
            template = work / "template.fs"
            if not template.exists():
                build_template(work)
            if "layer" in parts:
                layer: dict[str, list[dict[str, Any]]] = {}
                four = 4 if 4 in threads else threads[-1]
                for _ in range(args.rounds):
                    for storage in ("memory", "commit", "off"):
                        for n in sorted({1, four}):
                            row = measure_layer(storage, n, args.seconds * 2, work, template)
                            layer.setdefault(f"{storage}:{n}", []).append(row)
                            print(f"layer {storage} {n}: {row}", file=sys.stderr, flush=True)
                figures["layer"] = layer
            if "instructions" in parts:
                counted = {}
                for storage in ("memory", "off"):
                    for variant in ("hand", "run"):
                        counted[f"{variant}:{storage}"] = measure_instructions(
                            variant, storage, work, template
                        )
                        print(
                            f"instructions {variant} {storage}: {counted[f'{variant}:{storage}']}",
                            file=sys.stderr,
                            flush=True,
                        )
                figures["instructions"] = counted
            if "serve" in parts:
                writers = [1, 2] if args.quick else [1, 2, 4]
                serve: dict[str, Any] = {"writers": writers, "modes": {}}
                for mode in ("commit", "relaxed"):
                    serve["modes"][mode] = {str(n): [] for n in writers}
                for r in range(max(2, args.rounds - 2)):
                    for mode in ("commit", "relaxed") if r % 2 == 0 else ("relaxed", "commit"):
                        for n in writers:
                            row = measure_serve(mode, n, args.seconds * 2, work, template)
                            serve["modes"][mode][str(n)].append(row)
                            print(f"serve {mode} {n}: {row}", file=sys.stderr, flush=True)
                figures["serve"] = serve
            if "exports" in parts:
                exports: dict[str, Any] = {m: {"none": [], "exporter-process": []} for m in MODES}
                for r in range(2):
                    for mode in MODES if r % 2 == 0 else MODES[::-1]:
                        for kind in ("none", "exporter-process"):
                            row = measure_exports(mode, kind, args.seconds * 3, work)
                            exports[mode][kind].append(row)
                            print(f"exports {mode} {kind}: {row}", file=sys.stderr, flush=True)
                figures["exports"] = exports
            if "index" in parts:
                figures["index"] = measure_index(work, args.index_commits)
    figures.setdefault("cells", {})
    figures.setdefault("pressure", float("nan"))
    cmd = command_line(HERE, sys.argv[1:])
    markdown = report(args, figures, cmd)
    print(markdown)
    if args.json:
        write_result(
            args.json,
            name="writes",
            title="Writes: durability modes and threads",
            command=cmd,
            markdown=markdown,
            data=figures,
        )


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
