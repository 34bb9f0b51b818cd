"""Benchmark: what exports cost the writers, how fast they are, and how much memory they take.

Three measurements, each a ratio against a baseline taken in the same run
(the machine is shared and noisy: medians of several repetitions):

1. Writers (2 threads doing transfers on a FileStorage) with no export,
   with back-to-back exports by :class:`snaptree.Exporter` (its own exporter
   process), and with back-to-back ``store.export()`` on a thread of the
   writers' process (the design the Exporter replaces): transfers/s and p99.
2. One pickle export against ``pickle.dumps`` of the same tree as plain
   dicts, with the objects already in the ZODB cache (warm); and, from a
   freshly opened database (cold), against loading every object through
   ZODB and nothing else. Repeated ``store.export()`` calls after 1% of
   the objects changed, which reuse the fragments the store keeps.
3. Peak RSS of a cold export of the largest tree in a fresh process,
   against the memory a plain copy of that tree takes; and the memory the
   fragments of repeated ``store.export()`` calls keep.

Example:

    .venv/bin/python scripts/bench/bench_export.py --quick --json /tmp/export.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import ROOT, command_line, facts_markdown, peak_rss_mib, write_result

import snaptree
from snaptree import exports, schedule, tree

HERE = Path(__file__).resolve()


# -- the tree -------------------------------------------------------------------------


def build(path: Path, objects: int) -> int:
    """A FileStorage whose tree has about *objects* persistent objects; returns the accounts.

    Each account is a mapping with a balance, an owner and a history list:
    two persistent objects, plus the buckets of the accounts mapping.
    """
    accounts = max(objects // 2, 10)
    store = snaptree.open(str(path))
    try:
        store.run(lambda root: root.__setitem__("accounts", {}))
        batch = 5000
        for start in range(0, accounts, batch):

            def add(root, start=start):
                acc = root["accounts"]
                for i in range(start, min(start + batch, accounts)):
                    acc[i] = {"balance": 100, "owner": f"owner-{i}", "history": [i % 7, 1]}

            store.run(add)
    finally:
        store.close()
    return accounts


# -- 1. writers -----------------------------------------------------------------------


def _writers(store: snaptree.Store, accounts: int, seconds: float) -> dict[str, float]:
    latencies: list[list[float]] = [[], []]
    stop = threading.Event()

    def transfer(root, a, b):
        acc = root["accounts"]
        acc[a]["balance"] -= 1
        acc[b]["balance"] += 1

    def writer(n: int) -> None:
        rng = random.Random(n)
        while not stop.is_set():
            a, b = rng.randrange(accounts), rng.randrange(accounts)
            t = time.perf_counter()
            store.run(transfer, a, b)
            latencies[n].append(time.perf_counter() - t)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    every = sorted(latencies[0] + latencies[1])
    return {
        "ops": len(every) / seconds,
        "p99_ms": every[int(len(every) * 0.99)] * 1000 if every else float("nan"),
    }


def writers_phase(db: Path, accounts: int, mode: str, seconds: float, out: Path) -> dict[str, Any]:
    store = snaptree.open(str(db))
    exports_done = [0]
    try:
        if mode == "none":
            return _writers(store, accounts, seconds)
        if mode.startswith("exporter-process"):
            first = threading.Event()

            def count(result):
                exports_done[0] += 1
                first.set()

            # every=0: back to back, paced by FLUSH_SHARE unless "unpaced"
            share = 1.0 if mode.endswith("unpaced") else schedule.FLUSH_SHARE
            exporter = snaptree.Exporter(
                store, out, every=0, keep=2, on_export=count, flush_share=share
            )
            exporter.start()
            try:
                first.wait(600)  # not measured: the exporter process starts and reads the tree once
                exports_done[0] = 0
                figures = _writers(store, accounts, seconds)
            finally:
                exporter.stop(timeout=120)
        else:  # an export thread in the writers' process, back to back
            stop = threading.Event()

            def loop():
                while not stop.is_set():
                    store.export(out / "thread.pickle")
                    exports_done[0] += 1

            thread = threading.Thread(target=loop)
            thread.start()
            try:
                figures = _writers(store, accounts, seconds)
            finally:
                stop.set()
                thread.join(600)
        figures["exports"] = exports_done[0]
        return figures
    finally:
        store.close()


# -- 2. export time -------------------------------------------------------------------


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _bare_load(db: Path) -> float:
    """Open the file afresh and activate every object: the floor of a cold export."""
    store = snaptree.open(str(db), read_only=True, cache_size=10_000_000)
    try:
        with store.snapshot() as snap:
            t = time.perf_counter()
            for account in snap.root["accounts"].values():
                account._p_activate()
                account["history"]._p_activate()
            return time.perf_counter() - t
    finally:
        store.close()


def _cold_export(db: Path, out: Path) -> float:
    store = snaptree.open(str(db), read_only=True, cache_size=10_000_000)
    try:
        t = time.perf_counter()
        store.export(out / "cold.pickle", fragments=None)
        return time.perf_counter() - t
    finally:
        store.close()


#: Accounts changed (one commit) before each warm export with kept fragments:
#: what a scheduled exporter meets between two runs of a busy application.
CHANGED_ACCOUNTS = 100


def _warm_with_fragments(store: Any, out: Path, accounts: int, repeat: int) -> dict[str, float]:
    """Median warm exports reusing the previous export's fragments, as the exporter process does.

    Before each timed export, CHANGED_ACCOUNTS random accounts get a new
    balance and a history entry in one commit (not timed), so the export
    finds its fragments mostly, not entirely, valid. "cached": the changed
    objects are loaded into the export's cache before the clock starts (the
    target's "objects already cached"); "reloading": the export loads them
    itself, as the exporter does after each commit; "unchanged": nothing
    changed since the last export (forced: a schedule would skip it).
    """
    rng = random.Random(7)
    times: dict[str, list[float]] = {"cached": [], "reloading": []}
    fragments = exports.FragmentCaches()
    store.export(out / "warm.pickle", fragments=fragments)  # builds the fragments
    for _ in range(repeat):
        for kind, found in times.items():
            changed = rng.sample(range(accounts), CHANGED_ACCOUNTS)

            def change(root, changed=changed):
                table = root["accounts"]
                for key in changed:
                    table[key]["balance"] += 1
                    table[key]["history"].append(1)

            store.run(change)
            if kind == "cached":
                with store.snapshot() as snap:  # the pool's next connection: the export's
                    table = snap.root["accounts"]
                    for key in changed:
                        table[key]._p_activate()
                        table[key]["history"]._p_activate()
            t = time.perf_counter()
            store.export(out / "warm.pickle", fragments=fragments)
            found.append(time.perf_counter() - t)
    unchanged = _median_time(lambda: store.export(out / "warm.pickle", fragments=fragments), repeat)
    return {"unchanged": unchanged, **{kind: statistics.median(f) for kind, f in times.items()}}


def _repeated_store_exports(
    store: Any,
    out: Path,
    accounts: int,
    repeat: int,
    *,
    preload: bool = False,
    flush_seconds: list[float] | None = None,
    baseline: Callable[[], Any] | None = None,
    ratios: list[tuple[float, float]] | None = None,
) -> float:
    """Median ``store.export()`` after 1% of the objects changed, as an application calls it.

    The store keeps fragments itself (the first call writes plainly, the second
    builds them); each timed call follows a commit that changes the balance of
    1% of the objects' worth of accounts (an account is two objects: its
    mapping and its history list; only the mapping changes). The timed call
    loads the changed objects again from the storage (the commit invalidated
    them), as an application's call would; *preload* loads them before the
    clock starts instead, to show what that reload costs. The median time the
    disk took for the fsyncs of each export is appended to *flush_seconds*.
    With *baseline*, it is timed right before each export, and the median of
    the export/baseline ratios (each pair taken together, so that a slow
    moment of a shared machine hits both) is appended to *ratios*, with the
    baseline's median time.
    """
    rng = random.Random(11)
    objects = 2 * accounts
    for _ in range(2):
        store.export(out / "repeated.pickle")
    times: list[float] = []
    base_times: list[float] = []
    flushes: list[float] = []
    for _ in range(repeat):
        changed = rng.sample(range(accounts), max(objects // 100, 1))

        def change(root, changed=changed):
            table = root["accounts"]
            for key in changed:
                table[key]["balance"] += 1

        store.run(change)
        if preload:
            with store.snapshot() as snap:
                table = snap.root["accounts"]
                for key in changed:
                    table[key]._p_activate()
        if baseline is not None:
            t = time.perf_counter()
            baseline()
            base_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        info = store.export(out / "repeated.pickle")
        times.append(time.perf_counter() - t)
        flushes.append(info.flush_seconds)
    if flush_seconds is not None:
        flush_seconds.append(statistics.median(flushes))
    if ratios is not None:
        pairs = zip(times, base_times, strict=True)
        ratios.append((statistics.median(a / b for a, b in pairs), statistics.median(base_times)))
    return statistics.median(times)


def _plain_tree(store: snaptree.Store) -> tuple[Any, int]:
    """The tree as plain data, and its object count.

    The snapshot loads every object: the store's cache then holds the tree.
    """
    with store.snapshot() as snap:
        return tree.to_plain(snap.root), len(snap.connection._cache)


def _dumps_baseline(store: snaptree.Store, repeat: int) -> tuple[float, int]:
    """The median time of ``pickle.dumps`` of the tree as plain data, and its object count."""
    plain, objects = _plain_tree(store)
    return _median_time(lambda: pickle.dumps(plain, protocol=5), repeat), objects


def export_times(db: Path, out: Path, accounts: int, repeat: int) -> dict[str, float]:
    store = snaptree.open(str(db), cache_size=10_000_000)
    try:
        dumps, objects = _dumps_baseline(store, repeat)
        store.export(out / "warm.pickle", fragments=None)  # fills the pooled connection's cache
        # No fragments kept from one export to the next: a one-off store.export().
        warm_cold_fragments = _median_time(
            lambda: store.export(out / "warm.pickle", fragments=None), repeat
        )
        warm_json = _median_time(lambda: store.export(out / "warm.json", format="json"), repeat)
        warm_zodb = _median_time(lambda: store.export(out / "warm.zexp", format="zodb"), repeat)
        warm = _warm_with_fragments(store, out, accounts, repeat)
    finally:
        store.close()
    store = snaptree.open(str(db), cache_size=10_000_000)
    try:
        repeated = _repeated_store_exports(store, out, accounts, repeat)
    finally:
        store.close()
    bare = statistics.median(_bare_load(db) for _ in range(repeat))
    cold = statistics.median(_cold_export(db, out) for _ in range(repeat))
    return {
        "objects": objects,
        "pickle_dumps_s": dumps,
        "warm_s": warm["cached"],
        "warm_reloading_s": warm["reloading"],
        "warm_unchanged_s": warm["unchanged"],
        "warm_no_fragments_s": warm_cold_fragments,
        "warm_json_s": warm_json,
        "warm_zodb_s": warm_zodb,
        "repeated_s": repeated,
        "bare_load_s": bare,
        "cold_s": cold,
    }


# -- 3. memory ------------------------------------------------------------------------


def _child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(HERE), "--child", *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(what: str, db: str, out: str) -> None:
    def current_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    if what == "repeated":  # what the fragments of repeated store.export() calls keep
        store = snaptree.open(db, read_only=True, cache_size=10_000_000)
        store.export(Path(out) / "rss.pickle")  # the whole tree in the cache: the baseline
        base = current_mib()
        store.export(Path(out) / "rss.pickle")  # builds and keeps the fragments
        store.export(Path(out) / "rss.pickle")
        store.close()
        print(json.dumps({"kept_mib": current_mib() - base, "cached_mib": base}))
        return
    store = snaptree.open(db, read_only=True, cache_size=200_000)
    base = current_mib()
    if what == "export":
        store.export(Path(out) / "rss.pickle", fragments=None)
        result = {"peak_mib": peak_rss_mib(), "base_mib": base}
    else:  # the plain copy a dumping thread would need
        with store.snapshot() as snap:
            accounts = snap.root["accounts"]
            plain = {}
            for key, value in accounts.items():
                plain[key] = tree.to_plain(value)
                if len(plain) % 20_000 == 0:
                    snap.connection.cacheGC()
            snap.connection.cacheMinimize()
        result = {"plain_mib": current_mib() - base, "items": len(plain)}
    store.close()
    print(json.dumps(result))


# -- report ---------------------------------------------------------------------------


def one_off_times(db: Path, out: Path, accounts: int, repeat: int) -> dict[str, Any]:
    """pickle.dumps of the plain tree, and repeated store.export() after 1% changed."""
    store = snaptree.open(str(db), cache_size=10_000_000)
    try:
        plain, objects = _plain_tree(store)

        def dumps() -> None:
            pickle.dumps(plain, protocol=5)

        base = _median_time(dumps, repeat)
        one_off = _median_time(lambda: store.export(out / "plain.pickle", fragments=None), repeat)
        flushed: list[float] = []
        ratios: list[tuple[float, float]] = []
        repeated = _repeated_store_exports(
            store, out, accounts, repeat, flush_seconds=flushed, baseline=dumps, ratios=ratios
        )
        preloaded = _repeated_store_exports(
            store, out, accounts, repeat, preload=True, baseline=dumps, ratios=ratios
        )
    finally:
        store.close()
    return {
        "objects": objects,
        "pickle_dumps_s": base,
        "warm_no_fragments_s": one_off,
        "repeated_s": repeated,
        "repeated_ratio": ratios[0][0],
        "pickle_dumps_paired_s": ratios[0][1],
        "repeated_preloaded_s": preloaded,
        "repeated_preloaded_ratio": ratios[1][0],
        "repeated_fsync_s": flushed[0],
    }


def one_off_main(args: argparse.Namespace) -> None:
    """``--one-off``: the warm one-off figures only, at 10k and 100k (or --sizes)."""
    sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else [10_000, 100_000]
    repeat = 5 if args.quick else 21
    cmd = command_line(HERE, sys.argv[1:])
    lines = [
        "## Repeated `store.export()` after 1% of the objects changed",
        "",
        facts_markdown(),
        "",
        f"Command: `{cmd}`",
        "",
        "The application's own calls in its process, no Exporter. Each timed call follows "
        "a commit changing 1% of the objects and reloads them (they were invalidated); "
        "*preloaded* loads them before the clock starts. *No fragments* is a warm "
        f"`store.export(fragments=None)`. *fsyncs* is the part of each repeated export spent "
        "waiting for the disk (the dump, its manifest, the directory; pickle.dumps writes no "
        f"file). Medians of {repeat}. Each repeated export is timed right after a "
        "pickle.dumps of the plain tree (*paired*), and its ratio is the median of those "
        "pairs' ratios: both then run after the same other work, with the same caches, and a "
        "slow moment of the shared machine hits both. *Back to back* is pickle.dumps in a "
        "loop of its own, its data hot in the CPU's caches; the *no fragments* ratio is to "
        "it. Target: <= 2x pickle.dumps.",
        "",
        "| objects | pickle.dumps back to back | paired | store.export() again | ratio "
        "| of which fsyncs | preloaded | ratio | no fragments | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-oneoff-") as tmp:
        for size in sizes:
            db = Path(tmp) / f"d{size}.fs"
            print(f"building {size} objects", file=sys.stderr, flush=True)
            accounts = build(db, size)
            out = Path(tmp) / f"out{size}"
            out.mkdir()
            t = figures[size] = one_off_times(db, out, accounts, repeat)
            base = t["pickle_dumps_s"]
            lines.append(
                f"| {t['objects']:,} | {base * 1000:.1f} ms | "
                f"{t['pickle_dumps_paired_s'] * 1000:.1f} ms | {t['repeated_s'] * 1000:.1f} ms | "
                f"{t['repeated_ratio']:.2f}x | {t['repeated_fsync_s'] * 1000:.1f} ms | "
                f"{t['repeated_preloaded_s'] * 1000:.1f} ms | "
                f"{t['repeated_preloaded_ratio']:.2f}x | "
                f"{t['warm_no_fragments_s'] * 1000:.1f} ms | "
                f"{t['warm_no_fragments_s'] / base:.2f}x |"
            )
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if args.json:
        write_result(
            args.json,
            name="export_one_off",
            title="Repeated store.export()",
            command=cmd,
            markdown=markdown,
            data={str(k): v for k, v in figures.items()},
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    parser.add_argument(
        "--sizes", help="comma-separated object counts instead of the defaults, e.g. 100000"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--one-off",
        action="store_true",
        help="only repeated store.export() after 1%% changed against pickle.dumps",
    )
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        return
    if args.one_off:
        one_off_main(args)
        return

    sizes = [10_000] if args.quick else [10_000, 100_000, 1_000_000]
    writer_sizes = [10_000] if args.quick else [10_000, 100_000]
    if args.sizes:
        sizes = [int(n) for n in args.sizes.split(",")]
        writer_sizes = [n for n in sizes if n <= 100_000]
    seconds = 3.0 if args.quick else 6.0
    rounds = 2 if args.quick else 3
    repeat = 3 if args.quick else 5
    lines = [
        "## Exports",
        "",
        facts_markdown(),
        "",
        f"Command: `{command_line(HERE, sys.argv[1:])}`",
        "",
    ]
    figures: dict[str, Any] = {"writers": {}, "times": {}, "memory": {}, "kept": {}}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        tmpdir = Path(tmp)
        for size in sizes:
            db = tmpdir / f"tree-{size}.fs"
            print(f"building {size} objects", file=sys.stderr)
            accounts = build(db, size)
            out = tmpdir / f"out-{size}"
            out.mkdir()
            print(f"export times at {size}", file=sys.stderr)
            # One repetition at 1M objects: a cold pass takes minutes. More at
            # 10k, where one export takes milliseconds and the noise is larger.
            times_repeat = 1 if size >= 1_000_000 else 3 * repeat if size <= 10_000 else repeat
            figures["times"][size] = export_times(db, out, accounts, times_repeat)
            if size <= 100_000:
                print(f"memory kept by repeated store.export() at {size}", file=sys.stderr)
                figures["kept"][size] = _child(["repeated", str(db), str(out)])
            if size in writer_sizes:
                runs: dict[str, list[dict[str, Any]]] = {
                    "none": [],
                    "exporter-process": [],
                    "exporter-process unpaced": [],
                    "thread": [],
                }
                for r in range(rounds):
                    for mode in runs:
                        print(f"writers {size} {mode} round {r}", file=sys.stderr)
                        runs[mode].append(writers_phase(db, accounts, mode, seconds, out))
                figures["writers"][size] = {
                    mode: {
                        key: statistics.median(run[key] for run in results) for key in results[0]
                    }
                    for mode, results in runs.items()
                }
            if size == sizes[-1]:
                print(f"memory at {size}", file=sys.stderr)
                exported = _child(["export", str(db), str(out)])
                plain = _child(["plain", str(db), str(out)])
                figures["memory"] = {"objects": size, **exported, **plain}

    lines += [
        "### Writers during back-to-back exports (2 writer threads, FileStorage)",
        "",
        "| objects | exports run by | transfers/s | vs none | p99 ms | vs none | exports |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for size, modes in figures["writers"].items():
        base = modes["none"]
        for mode, row in modes.items():
            lines.append(
                f"| {size:,} | {mode} | {row['ops']:.0f} | {row['ops'] / base['ops']:.2f}x | "
                f"{row['p99_ms']:.1f} | {row['p99_ms'] / base['p99_ms']:.2f}x | "
                f"{int(row.get('exports', 0))} |"
            )
    lines += [
        "",
        "Targets: throughput >= 0.90x, p99 <= 1.5x of no export. The Exporter runs "
        "`every=0`: back to back, paced so that its fsyncs take at most "
        f"{schedule.FLUSH_SHARE:.2%} of the time (`unpaced`: `flush_share=1.0`).",
        "",
        "### One pickle export (medians)",
        "",
        "Warm exports reuse the last export's fragments, as the exporter process does, after "
        f"{CHANGED_ACCOUNTS} accounts changed (*cached*: their objects loaded before the clock "
        "starts; *reloading*: the export loads them) or with nothing changed. *One-off* is a "
        "single `store.export()` of a cached tree, without fragments.",
        "",
        "| objects | pickle.dumps plain | warm, cached | ratio | warm, reloading | ratio | "
        "warm, unchanged | ratio | one-off | ratio | bare load (cold) | cold export | ratio | "
        "warm json | warm zodb |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in figures["times"].values():
        dumps = t["pickle_dumps_s"]
        warm = [
            f"{t[key] * 1000:.1f} ms | {t[key] / dumps:.2f}x"
            for key in ("warm_s", "warm_reloading_s", "warm_unchanged_s", "warm_no_fragments_s")
        ]
        lines.append(
            f"| {t['objects']:,} | {dumps * 1000:.1f} ms | {' | '.join(warm)} | "
            f"{t['bare_load_s'] * 1000:.0f} ms | {t['cold_s'] * 1000:.0f} ms | "
            f"{t['cold_s'] / t['bare_load_s']:.2f}x | {t['warm_json_s'] * 1000:.0f} ms | "
            f"{t['warm_zodb_s'] * 1000:.0f} ms |"
        )
    lines += [
        "",
        "### Repeated `store.export()` after 1% of the objects changed (medians)",
        "",
        "The application's own calls, no Exporter: the store keeps the fragments itself "
        "(the first call writes plainly, the second builds them). *Kept* is the memory the "
        "fragments add once the tree is in the cache (RSS after the third export minus RSS "
        "after the first, in a fresh process).",
        "",
        "| objects | pickle.dumps plain | store.export() again | ratio | kept |",
        "|---:|---:|---:|---:|---:|",
    ]
    for size, t in figures["times"].items():
        kept = figures["kept"].get(size)
        kept_text = f"{kept['kept_mib']:.0f} MiB" if kept else "-"
        lines.append(
            f"| {t['objects']:,} | {t['pickle_dumps_s'] * 1000:.1f} ms | "
            f"{t['repeated_s'] * 1000:.1f} ms | {t['repeated_s'] / t['pickle_dumps_s']:.2f}x | "
            f"{kept_text} |"
        )
    m = figures["memory"]
    lines += [
        "",
        "Targets: warm <= 2x pickle.dumps; repeated store.export() <= 2x pickle.dumps at 10k "
        "and 100k; cold <= 1.3x bare load.",
        "",
        "### Memory of a cold export in a fresh process (ZODB cache 200,000 objects)",
        "",
        f"{m['objects']:,} objects: peak RSS {m['peak_mib']:.0f} MiB (of which "
        f"{m['base_mib']:.0f} MiB before the export began); a plain copy of the same tree "
        f"takes {m['plain_mib']:.0f} MiB on its own. Ratio peak/plain: "
        f"{m['peak_mib'] / m['plain_mib']:.2f}.",
        "",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    if args.json:
        write_result(
            args.json,
            name="export",
            title="Exports",
            command=command_line(HERE, sys.argv[1:]),
            markdown=markdown,
            data=figures,
        )


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
