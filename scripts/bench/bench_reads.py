"""Benchmark: reading a tree from a warm cache, memory:// against FileStorage.

Every store holds the same tree: a mapping of N small mappings (N + 1
snaptree nodes). One call reads every node (``store.run`` summing a value
of each, and the same inside ``store.snapshot()``); it is timed after a
warm-up call, so every object the connection's cache can hold is loaded
already. Stores:

* FileStorage with snaptree's defaults: the baseline;
* ``memory://`` with snaptree's defaults;
* ``memory://`` with ``cache_size=400``, ZODB's own default, which is what
  ``memory://`` had before snaptree set a default for every URI: a tree
  larger than the cache is read again from the storage in every call.

The rounds alternate between the stores, so a noisy spell on the shared
machine hurts them alike; each figure is the median over the rounds, and
each ratio compares medians of the same run.

Example:

    .venv/bin/python scripts/bench/bench_reads.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import command_line, facts_markdown, write_result

import snaptree

HERE = Path(__file__).resolve()
ZODB_DEFAULT_CACHE = 400


def read_all(root: Any) -> int:
    return sum(item["n"] for item in root["items"].values())


def seconds_per_read(store: snaptree.Store, how: str) -> float:
    started = time.perf_counter()
    if how == "run":
        store.run(read_all)
    else:
        with store.snapshot() as snap:
            read_all(snap.root)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--objects", type=int, default=4_000, help="nodes read per call")
    parser.add_argument("--rounds", type=int, help="timed reads per store and kind (default 51)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (11 if args.quick else 51)

    with tempfile.TemporaryDirectory(prefix="bench-reads-") as directory:
        stores = {
            "FileStorage": snaptree.open(str(Path(directory) / "Data.fs")),
            "memory://": snaptree.open("memory://"),
            f"memory://, cache_size={ZODB_DEFAULT_CACHE} (ZODB's default)": snaptree.open(
                "memory://", cache_size=ZODB_DEFAULT_CACHE
            ),
        }
        try:
            items = {f"k{i:07}": {"n": i} for i in range(args.objects)}
            for store in stores.values():
                store.run(lambda root: root.update(items=items))
                for how in ("run", "snapshot"):
                    seconds_per_read(store, how)  # warm the cache of the connection reused next
            timings: dict[tuple[str, str], list[float]] = {}
            for _ in range(rounds):
                for name, store in stores.items():
                    for how in ("run", "snapshot"):
                        timings.setdefault((name, how), []).append(seconds_per_read(store, how))
            cache_sizes = {name: store.db.getCacheSize() for name, store in stores.items()}
        finally:
            for store in stores.values():
                store.close()

    medians = {key: statistics.median(values) for key, values in timings.items()}
    rows = [
        "| store | cache size (objects per connection) | read | ms per read (median) | "
        "objects/s | vs FileStorage (time) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for how, label in (("run", "`store.run`"), ("snapshot", "`store.snapshot()`")):
        base = medians["FileStorage", how]
        for name in stores:
            median = medians[name, how]
            rows.append(
                f"| {name} | {cache_sizes[name]:,} | {label} | {median * 1000:.2f} | "
                f"{(args.objects + 1) / median:,.0f} | {median / base:.2f}x |"
            )
    command = command_line(HERE, argv)
    markdown = "\n\n".join(
        [
            "## Reads from a warm cache: memory:// against FileStorage",
            f"Each call reads {args.objects + 1:,} snaptree nodes (a mapping of "
            f"{args.objects:,} small mappings) through a connection whose cache is warm; "
            f"median of {rounds} rounds that alternate between the stores. A ratio above "
            "1.00x is slower than FileStorage. The last store shows why memory:// was slow "
            "before snaptree gave every URI the same default cache: with ZODB's default of "
            "400 objects per connection, a larger tree is read again from the storage in "
            "every call.",
            facts_markdown(),
            f"Command:\n\n    {command}",
            "\n".join(rows),
        ]
    )
    print(markdown)
    if args.json:
        write_result(
            args.json,
            name="reads",
            title="Reads",
            command=command,
            markdown=markdown,
            results=[
                {"store": name, "read": how, "median_seconds": medians[name, how]}
                for name, how in medians
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
