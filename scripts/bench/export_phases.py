"""Where the time of one warm pickle export goes, step by step (docs/export.md).

Builds the benchmark tree (``bench_export.build``), keeps fragments between
exports as the exporter process does, and before each export changes
``--changed`` random accounts in one commit and loads them into the
export's snapshot. It then runs the steps of ``exports.export_snapshot``
one by one with a clock around each: writing the pickle, the dump's fsync,
building and writing the manifest, the store's data file fsynced (so that
no dump holds a commit not yet on disk), the two renames. Prints the median of
each step and ``pickle.dumps`` of the same tree as plain dicts.

Example:

    .venv/bin/python scripts/bench/export_phases.py --objects 10000
"""

from __future__ import annotations

import argparse
import pickle
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_export import build

import snaptree
from snaptree import _atomic, tree
from snaptree._pickle_fragments import FragmentCaches, write_pickle_with_fragments
from snaptree._store_files import StoreFiles
from snaptree.manifest import ExportInfo, manifest_bytes, manifest_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--changed", type=int, default=100, help="accounts changed per export")
    parser.add_argument("--repeat", type=int, default=25)
    args = parser.parse_args()
    steps: dict[str, list[float]] = {
        "write the pickle": [],
        "fsync the dump": [],
        "build and write the manifest (fsync)": [],
        "fsync the store's data file": [],
        "rename both, fsync the directory twice": [],
        "whole export": [],
    }
    with tempfile.TemporaryDirectory(prefix="export-phases-") as tmp:
        db, final = Path(tmp) / "tree.fs", Path(tmp) / "dump.pickle"
        accounts = build(db, args.objects)
        store = snaptree.open(str(db), cache_size=10_000_000)
        with store.snapshot() as snap:
            plain = tree.to_plain(snap.root)
        dumps = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            pickle.dumps(plain, protocol=5)
            dumps.append(time.perf_counter() - started)
        rng = random.Random(7)
        fragments = FragmentCaches()
        store.export(final, fragments=fragments)
        for _ in range(args.repeat):
            changed = rng.sample(range(accounts), args.changed)

            def change(root, changed=changed):
                for key in changed:
                    root["accounts"][key]["balance"] += 1
                    root["accounts"][key]["history"].append(1)

            store.run(change)
            with store.snapshot() as snap:
                for key in changed:  # cached: loaded before the clock starts
                    snap.root["accounts"][key]["history"]._p_activate()
                t0 = time.perf_counter()
                with _atomic.staged_file(final) as (writer, temp):
                    objects = write_pickle_with_fragments(
                        snap.root, writer, snap.connection, "/", fragments
                    )
                    t1 = time.perf_counter()
                t2 = time.perf_counter()
                tid, committed_at = snap.tid, snap.committed_at
            info = ExportInfo(
                path=final,
                format="pickle",
                tid=tid,
                committed_at=committed_at,
                objects=objects,
                bytes=writer.bytes,
                sha256=writer.sha256,
                source=store.source,
                snaptree_version=snaptree.__version__,
            )
            with _atomic.staged_file(manifest_path(final)) as (manifest, mtemp):
                manifest.write(manifest_bytes(info))
            t3 = time.perf_counter()
            StoreFiles.of(store).make_durable()
            t4 = time.perf_counter()
            _atomic.commit(mtemp, manifest_path(final))
            _atomic.commit(temp, final)
            t5 = time.perf_counter()
            for name, seconds in zip(
                steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0), strict=True
            ):
                steps[name].append(seconds)
        store.close()
    base = statistics.median(dumps)
    print(f"pickle.dumps of the plain tree: {base * 1000:.2f} ms")
    for name, times in steps.items():
        median = statistics.median(times)
        print(f"{name}: {median * 1000:.2f} ms ({median / base:.2f}x pickle.dumps)")


if __name__ == "__main__":
    main()
