"""Benchmark: zstd-compressed dumps against uncompressed ones: size, export time, verify time.

The tree of ``bench_export.build`` (accounts with a history list), exported
in each format with and without ``compress="zstd"`` (zstd's default level),
from a store whose cache holds the tree (so the figures are the writer's
and the compressor's, not the disk reads'); then ``snaptree.verify`` of each
dump (checksum, then loading it as import does). Medians; one run, so the
ratios compare like with like. At the largest size, the peak memory of a
compressed and an uncompressed export in fresh processes: compression is
streamed, so the two should be close.

Example:

    .venv/bin/python scripts/bench/bench_compression.py --quick --json /tmp/zstd.json
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
from bench_export import build

import snaptree

HERE = Path(__file__).resolve()
SUFFIX = {"pickle": ".pickle", "json": ".json", "zodb": ".zexp"}


def _median(fn: Any, repeat: int) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), value


def measure(db: Path, out: Path, formats: list[str], repeat: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    with snaptree.open(str(db), read_only=True, cache_size=10_000_000) as store:
        store.export(out / "warmup.pickle", fragments=None)  # the whole tree in the cache
        for fmt in formats:
            for compress in (None, "zstd"):
                name = out / f"d{SUFFIX[fmt]}{'.zst' if compress else ''}"
                seconds, info = _median(
                    lambda name=name: store.export(name, fragments=None), repeat
                )
                verify_seconds, _ = _median(lambda info=info: snaptree.verify(info.path), repeat)
                rows[f"{fmt} {compress or 'none'}"] = {
                    "bytes": info.bytes,
                    "export_s": seconds,
                    "verify_s": verify_seconds,
                    "objects": info.objects,
                }
    return rows


def _child(db: str, out: str, name: str) -> None:
    with snaptree.open(db, read_only=True, cache_size=200_000) as store:
        store.export(Path(out) / name, fragments=None)
    print(json.dumps({"peak_mib": peak_rss_mib()}))


def peak(db: Path, out: Path, name: str) -> float:
    proc = subprocess.run(
        [sys.executable, str(HERE), "--child", str(db), str(out), name],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k objects, fewer repetitions")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    parser.add_argument("--sizes", help="comma-separated object counts, e.g. 10000,100000")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    sizes = [10_000] if args.quick else [10_000, 100_000, 1_000_000]
    if args.sizes:
        sizes = [int(n) for n in args.sizes.split(",")]
    results: dict[int, Any] = {}
    memory: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-zstd-") as tmp:
        work = Path(tmp)
        for size in sizes:
            db = work / f"tree-{size}.fs"
            print(f"building {size} objects", file=sys.stderr, flush=True)
            build(db, size)
            out = work / f"out-{size}"
            out.mkdir()
            formats = ["pickle"] if size >= 1_000_000 else list(SUFFIX)
            repeat = 1 if size >= 1_000_000 else 3 if size >= 100_000 or args.quick else 7
            print(f"measuring {size}", file=sys.stderr, flush=True)
            results[size] = measure(db, out, formats, repeat)
            if size == sizes[-1]:
                memory = {
                    "objects": size,
                    "none": peak(db, out, "rss.pickle"),
                    "zstd": peak(db, out, "rss.pickle.zst"),
                }

    cmd = command_line(HERE, sys.argv[1:])
    lines = [
        "## Compressed dumps (zstd)",
        "",
        facts_markdown(),
        "",
        f"Command: `{cmd}`",
        "",
        'Each format with and without `compress="zstd"` (zstd\'s default level), exported '
        "from a store whose cache holds the tree, then checked by `snaptree.verify` (checksum, "
        "then loading it as `snaptree import` does). Medians.",
        "",
        "| objects | format | bytes | zstd bytes | size | export | zstd export | time | "
        "verify | zstd verify |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rows in results.values():
        for fmt in SUFFIX:
            plain, packed = rows.get(f"{fmt} none"), rows.get(f"{fmt} zstd")
            if plain is None or packed is None:
                continue
            lines.append(
                f"| {plain['objects']:,} | {fmt} | {plain['bytes']:,} | {packed['bytes']:,} | "
                f"{packed['bytes'] / plain['bytes']:.2f}x | {plain['export_s'] * 1000:.0f} ms | "
                f"{packed['export_s'] * 1000:.0f} ms | "
                f"{packed['export_s'] / plain['export_s']:.2f}x | "
                f"{plain['verify_s'] * 1000:.0f} ms | {packed['verify_s'] * 1000:.0f} ms |"
            )
    lines += [
        "",
        f"Peak RSS of a one-off pickle export of {memory['objects']:,} objects in a fresh "
        f"process (ZODB cache 200,000 objects): {memory['none']:.0f} MiB uncompressed, "
        f"{memory['zstd']:.0f} MiB with zstd (compression is streamed: its window, a few "
        "MiB, not the dump).",
        "",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    if args.json:
        write_result(
            args.json,
            name="compression",
            title="Compressed dumps (zstd)",
            command=cmd,
            markdown=markdown,
            data={str(k): v for k, v in results.items()},
            memory=memory,
        )


if __name__ == "__main__":
    main()
