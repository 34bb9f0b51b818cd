"""Benchmark: ``store.import_tree`` against a hand-written raw ZODB import of the same data.

Each case runs in a fresh subprocess, so its peak RSS (VmHWM) is its
own. The data (accounts, each a dict with an owner, a balance and a list of
three entry dicts: five persistent objects per account) is generated in that
process before the clock starts, and the RSS at that moment is recorded as
the *source* memory. Four ways to import it into a fresh FileStorage:

* ``raw, one commit``: the code a ZODB user writes by hand: convert dicts to
  OOBTree and lists to PersistentList recursively, assign, commit once.
  Fastest, but every object stays in memory until the commit (left out
  above 1M objects: 10M would need about 10 GiB).
* ``raw, savepoints``: the same, with an optimistic savepoint every 10,000
  objects: the hand-written way to bound memory in one transaction.
* ``snaptree``: ``store.import_tree(data, path=...)`` with its defaults.
* ``snaptree, JSON file``: ``store.import_tree(Path("data.json"), ...)``,
  the same data written as JSON before the run (not timed): the file is
  read as a stream, so parsing is inside the timed import and there is no
  source in memory. This is what ``snaptree import`` does.

Figures are medians over the repetitions; ratios compare medians of the
same run (the machine is shared and noisy). CPU seconds are reported too:
they are much less disturbed by other processes than wall-clock time.

Example:

    .venv/bin/python scripts/bench/bench_import.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import command_line, facts_markdown, peak_rss_mib, write_result

HERE = Path(__file__).resolve()
MODES = ("raw", "raw-savepoints", "snaptree", "snaptree-json")
LABELS = {
    "raw": "raw ZODB, one commit",
    "raw-savepoints": "raw ZODB, savepoints",
    "snaptree": "snaptree import_tree",
    "snaptree-json": "snaptree, JSON file (streamed)",
}
OBJECTS_PER_ACCOUNT = 5
SAVEPOINT_EVERY = 10_000
#: Above this many objects the one-commit raw import is not run (its memory).
RAW_ONE_COMMIT_LIMIT = 1_000_000


def _account(i: int) -> dict[str, Any]:
    return {
        "owner": f"c{i % 997:04}",
        "balance": i % 10_000,
        "entries": [{"amount": j * 100 - 50, "memo": "card payment"} for j in range(3)],
    }


def make_data(objects: int) -> dict[str, Any]:
    """About *objects* containers: accounts of five dicts and lists each."""
    return {f"a{i:07}": _account(i) for i in range(max(objects // OBJECTS_PER_ACCOUNT, 1))}


def write_json(objects: int, path: Path) -> None:
    """The data of :func:`make_data` as a JSON file, written a line at a time."""
    with open(path, "w") as file:
        file.write("{\n")
        for i in range(max(objects // OBJECTS_PER_ACCOUNT, 1)):
            comma = "," if i else ""
            file.write(f'{comma}"a{i:07}": {json.dumps(_account(i))}\n')
        file.write("}\n")


def _rss_now_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_case(mode: str, objects: int, source: str | None = None) -> dict[str, Any]:
    """One import in this process; returns its figures."""
    import transaction
    import ZODB
    import ZODB.FileStorage
    from BTrees.OOBTree import OOBTree
    from persistent.list import PersistentList

    import snaptree

    count = max(objects // OBJECTS_PER_ACCOUNT, 1) * OBJECTS_PER_ACCOUNT
    data = {} if mode == "snaptree-json" else make_data(objects)
    source_kib = _rss_now_kib()
    directory = tempfile.mkdtemp(prefix="bench-import-")
    path = str(Path(directory) / "Data.fs")
    made = 0

    def convert(value: Any) -> Any:
        nonlocal made
        if isinstance(value, dict):
            made += 1
            tree = OOBTree()
            tree.update({k: convert(v) for k, v in value.items()})
            return tree
        if isinstance(value, list):
            made += 1
            return PersistentList([convert(v) for v in value])
        return value

    wall, cpu = time.perf_counter(), time.process_time()
    if mode.startswith("snaptree"):
        with snaptree.open(path) as store:
            result = store.import_tree(Path(source) if source else data, path="bench")
        assert result.objects == count + 1, (result.objects, count)
    else:
        db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
        manager = transaction.TransactionManager()
        conn = db.open(manager)
        txn = manager.begin()
        conn.root()["bench"] = accounts = OOBTree()
        last = 0
        for key, value in data.items():
            accounts[key] = convert(value)
            if mode == "raw-savepoints" and made - last >= SAVEPOINT_EVERY:
                txn.savepoint(optimistic=True)
                last = made
        manager.commit()
        conn.close()
        db.close()
        assert made == count
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for leftover in Path(directory).iterdir():
        leftover.unlink()
    Path(directory).rmdir()
    return {
        "mode": mode,
        "objects": count,
        "seconds": wall,
        "cpu_seconds": cpu,
        "source_mib": source_kib / 1024,
        "peak_mib": peak_rss_mib(),
    }


def measure(mode: str, objects: int, source: Path) -> dict[str, Any]:
    """Run one case in a fresh interpreter and return its figures."""
    extra = [str(source)] if mode == "snaptree-json" else []
    out = subprocess.run(
        [sys.executable, str(HERE), "--case", mode, str(objects), *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


def report(results: dict[tuple[str, int], list[dict[str, Any]]], sizes: list[int]) -> str:
    rows = [
        "| objects | import | repeats | objects/s (wall) | CPU s | vs raw one commit (rate, "
        "wall / CPU) | vs raw savepoints (rate, wall / CPU) | source MiB | peak RSS MiB | "
        "peak - source MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        medians = {}
        modes = [mode for mode in MODES if (mode, size) in results]
        for mode in modes:
            runs = results[mode, size]
            medians[mode] = {
                key: statistics.median(run[key] for run in runs)
                for key in ("seconds", "cpu_seconds", "source_mib", "peak_mib")
            }
            medians[mode]["objects"] = runs[0]["objects"]
        for mode in modes:
            m = medians[mode]
            ratios = []
            for base in ("raw", "raw-savepoints"):
                b = medians.get(base)
                ratios.append(
                    "-"
                    if b is None
                    else f"{b['seconds'] / m['seconds']:.2f} / "
                    f"{b['cpu_seconds'] / m['cpu_seconds']:.2f}"
                )
            rows.append(
                f"| {_fmt(m['objects'])} | {LABELS[mode]} | {len(results[mode, size])} | "
                f"{_fmt(m['objects'] / m['seconds'])} | {m['cpu_seconds']:.1f} | {ratios[0]} | "
                f"{ratios[1]} | {m['source_mib']:.0f} | {m['peak_mib']:.0f} | "
                f"{m['peak_mib'] - m['source_mib']:.0f} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--sizes", help="comma-separated object counts (default 100k,1M,10M)")
    parser.add_argument("--repeats", help="comma-separated repetitions per size")
    parser.add_argument("--case", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        mode, objects, *source = args.case
        print(json.dumps(run_case(mode, int(objects), *source)))
        return 0

    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = [2_000, 20_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    if args.repeats:
        repeats = [int(r) for r in args.repeats.split(",")]
    else:
        repeats = [3, 3] if args.quick else [3, 3, 1]
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-import-json-") as work:
        for size, times in zip(sizes, repeats, strict=True):
            source = Path(work) / f"data-{size}.json"
            write_json(size, source)
            modes = [m for m in MODES if m != "raw" or size <= RAW_ONE_COMMIT_LIMIT]
            for _ in range(times):
                # Interleave the modes so that a noisy spell hurts all of them alike.
                for mode in modes:
                    figures = measure(mode, size, source)
                    results.setdefault((mode, size), []).append(figures)
                    seconds, peak = figures["seconds"], figures["peak_mib"]
                    print(f"{mode} {size}: {seconds:.2f} s, peak {peak:.0f} MiB", file=sys.stderr)
            source.unlink()

    command = command_line(HERE, argv)
    markdown = "\n\n".join(
        [
            "## Import: snaptree against raw ZODB",
            "Each figure is the median of the repetitions, each run in a fresh process on a "
            "FileStorage in a temporary directory. Ratios above 1.00 mean snaptree is faster.",
            facts_markdown(),
            f"Command:\n\n    {command}",
            report(results, sizes),
        ]
    )
    print(markdown)
    if args.json:
        write_result(
            args.json,
            name="import",
            title="Import",
            command=command,
            markdown=markdown,
            results=[r for runs in results.values() for r in runs],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
