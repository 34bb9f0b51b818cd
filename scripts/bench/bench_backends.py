"""Benchmark: commit throughput and export time on FileStorage, ZEO and RelStorage/PostgreSQL.

The same tree (N accounts, each a small mapping) on each backend; writers
commit small transfers (two balances change) back to back for a fixed time:
on FileStorage as threads of one process (a FileStorage allows one process),
through ZEO and PostgreSQL as separate processes (what those backends are
for). Then the whole tree is exported to a pickle from each backend. One
run measures everything, so the ratios compare like with like.

The ZEO server is ``snaptree serve`` on 127.0.0.1 with a port chosen at run
time; the PostgreSQL database is created for the run and dropped after it
(user postgres on 127.0.0.1:5432; the backend is reported as skipped if it
is not reachable).

Example:

    .venv/bin/python scripts/bench/bench_backends.py --quick --json /tmp/backends.json
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import command_line, write_result
from _serving import snaptree_serve

import snaptree

WRITER_COUNTS = (1, 2, 4)


# -- the workload -----------------------------------------------------------------


def build_tree(store: snaptree.Store, accounts: int) -> None:
    """N accounts under /accounts, imported in batches (each account is a snaptree Mapping)."""
    batch = 2_000

    def add(root: Any, start: int, stop: int) -> None:
        if "accounts" not in root:
            root["accounts"] = {}
        target = root["accounts"]
        for i in range(start, stop):
            target[f"{i:08d}"] = {"balance": 1_000, "owner": f"owner {i}", "open": True}

    for start in range(0, accounts, batch):
        store.run(add, start, min(start + batch, accounts))


def transfer(root: Any, source: str, target: str) -> None:
    accounts = root["accounts"]
    accounts[source]["balance"] -= 1
    accounts[target]["balance"] += 1


def write_for(store: snaptree.Store, accounts: int, seconds: float, seed: int) -> int:
    """Commit transfers back to back for *seconds*; return how many committed."""
    rng = random.Random(seed)
    deadline = time.perf_counter() + seconds
    commits = 0
    while time.perf_counter() < deadline:
        a, b = rng.sample(range(accounts), 2)
        store.run(transfer, f"{a:08d}", f"{b:08d}")
        commits += 1
    return commits


def _writer_process(
    uri: str, accounts: int, seconds: float, seed: int, start: Any, out: Any
) -> None:
    store = snaptree.open(uri)
    try:
        with store.snapshot():  # connect and warm up before the clock starts
            pass
        start.wait()
        out.put((write_for(store, accounts, seconds, seed), store.stats()["conflicts"]))
    finally:
        store.close()


def measure_processes(uri: str, writers: int, accounts: int, seconds: float) -> dict[str, Any]:
    """Run *writers* writer processes at once; commits per second over all of them."""
    context = multiprocessing.get_context("spawn")
    start, out = context.Barrier(writers + 1), context.Queue()
    processes = [
        context.Process(target=_writer_process, args=(uri, accounts, seconds, i, start, out))
        for i in range(writers)
    ]
    for process in processes:
        process.start()
    start.wait(120)
    began = time.perf_counter()
    results = [out.get(timeout=seconds + 120) for _ in processes]
    elapsed = time.perf_counter() - began
    for process in processes:
        process.join(60)
    commits = sum(r[0] for r in results)
    return {"commits": commits, "per_s": commits / elapsed, "conflicts": sum(r[1] for r in results)}


def measure_threads(uri: str, writers: int, accounts: int, seconds: float) -> dict[str, Any]:
    """Run *writers* writer threads sharing one store (the only way to share a FileStorage)."""
    store = snaptree.open(uri)
    try:
        counts = [0] * writers
        barrier = threading.Barrier(writers + 1)

        def run(i: int) -> None:
            barrier.wait()
            counts[i] = write_for(store, accounts, seconds, i)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        barrier.wait(60)
        began = time.perf_counter()
        for thread in threads:
            thread.join(seconds + 120)
        elapsed = time.perf_counter() - began
        commits = sum(counts)
        return {
            "commits": commits,
            "per_s": commits / elapsed,
            "conflicts": store.stats()["conflicts"],
        }
    finally:
        store.close()


def measure_export(uri: str, work: Path, repeats: int) -> dict[str, Any]:
    """Median seconds of a whole-tree pickle export, from a freshly opened store each time."""
    times = []
    objects = 0
    for i in range(repeats):
        with snaptree.open(uri) as store:
            started = time.perf_counter()
            info = store.export(work / f"export-{i}.pickle")
            times.append(time.perf_counter() - started)
            objects = info.objects
    return {"seconds": statistics.median(times), "objects": objects}


# -- the backends ---------------------------------------------------------------------


def zeo_backend(work: Path) -> contextlib.AbstractContextManager[str]:
    """``snaptree serve`` on a port chosen at run time; stopped when the block ends."""
    return snaptree_serve(work / "zeo.fs", work / "zeo.log")


@contextlib.contextmanager
def postgres_backend() -> Iterator[str]:
    """A database created for this run and dropped after it."""
    import psycopg2

    admin = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}
    name = f"snaptree_bench_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(connect_timeout=5, **admin)
    conn.autocommit = True
    try:
        conn.cursor().execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def run_backend(
    name: str, uri: str, accounts: int, seconds: float, repeats: int, work: Path
) -> dict[str, Any]:
    print(f"{name}: building {accounts} accounts", file=sys.stderr, flush=True)
    with snaptree.open(uri) as store:
        build_tree(store, accounts)
    measure = measure_threads if name == "file" else measure_processes
    rows = {}
    for writers in WRITER_COUNTS:
        print(f"{name}: {writers} writer(s)", file=sys.stderr, flush=True)
        rows[writers] = measure(uri, writers, accounts, seconds)
    print(f"{name}: export", file=sys.stderr, flush=True)
    return {"writers": rows, "export": measure_export(uri, work, repeats)}


# -- the report -------------------------------------------------------------------------

LABELS = {
    "file": "FileStorage, in-process (threads)",
    "zeo": "ZEO (`snaptree serve`), processes",
    "postgresql": "RelStorage/PostgreSQL (history-preserving), processes",
}


def markdown(results: dict[str, Any], accounts: int, seconds: float, repeats: int, cmd: str) -> str:
    base = results.get("file", {}).get("writers", {}).get(1, {}).get("per_s")
    base_export = results.get("file", {}).get("export", {}).get("seconds")
    lines = [
        "## Backends: commit throughput and export time (FileStorage, ZEO, PostgreSQL)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Workload: {accounts:,} accounts (one snaptree Mapping each) on every backend; each "
        "writer commits transfers (two balances change, one small transaction) back to back "
        f"for {seconds:g} s; all writers start together. Export: the whole tree to a pickle, "
        f"median of {repeats} from a freshly opened store. The ZEO server and PostgreSQL run "
        "on the same machine as the writers, so they compete with them for its cores.",
        "",
        "| backend | writers | commits/s | vs FileStorage, 1 writer | conflicts retried |",
        "|---|---|---|---|---|",
    ]
    for name, label in LABELS.items():
        result = results.get(name)
        if result is None:
            continue
        if "skipped" in result:
            lines.append(f"| {label} | - | skipped: {result['skipped']} | | |")
            continue
        for writers, row in result["writers"].items():
            ratio = f"{row['per_s'] / base:.2f}x" if base else ""
            lines.append(
                f"| {label} | {writers} | {row['per_s']:,.0f} | {ratio} | {row['conflicts']} |"
            )
    lines += ["", "| backend | objects exported | export s | vs FileStorage |", "|---|---|---|---|"]
    for name, label in LABELS.items():
        result = results.get(name)
        if result is None or "skipped" in result:
            continue
        export = result["export"]
        ratio = f"{export['seconds'] / base_export:.2f}x" if base_export else ""
        lines.append(f"| {label} | {export['objects']:,} | {export['seconds']:.3f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small tree, short runs")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    accounts, seconds, repeats = (2_000, 2.0, 1) if args.quick else (10_000, 5.0, 3)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="snaptree-bench-backends-") as tmp:
        work = Path(tmp)
        results["file"] = run_backend(
            "file", str(work / "file.fs"), accounts, seconds, repeats, work
        )
        with zeo_backend(work) as uri:
            results["zeo"] = run_backend("zeo", uri, accounts, seconds, repeats, work)
        try:
            with postgres_backend() as uri:
                results["postgresql"] = run_backend(
                    "postgresql", uri, accounts, seconds, repeats, work
                )
        except ImportError as exc:
            results["postgresql"] = {"skipped": f"psycopg2 missing ({exc})"}
        except Exception as exc:
            if type(exc).__module__.startswith("psycopg2"):
                results["postgresql"] = {"skipped": str(exc).strip().splitlines()[0]}
            else:
                raise

    cmd = command_line(__file__, argv)
    text = markdown(results, accounts, seconds, repeats, cmd)
    print(text)
    if args.json:
        write_result(
            args.json,
            name="backends",
            title="Backends: commit throughput and export time",
            command=cmd,
            markdown=text,
            results=results,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
