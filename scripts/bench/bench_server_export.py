"""Benchmark: a cold export through a server (ZEO, PostgreSQL) against one from the file itself.

The same tree (``bench_export.build``: accounts with a history list) in a
FileStorage, served by ZEO (``snaptree serve`` on that very file) and
copied into PostgreSQL (RelStorage, history-preserving). Each export runs
from a freshly opened store (its caches empty: cold), median of several,
all in one run so that the ratios compare like with like. Through a server
each object is a round trip unless the export asks for many at once: the
exports do (``Connection.prefetch``, see ``snaptree/_plain_nodes.py``);
"without prefetch" turns that off in a child process to show what it buys.

The ZEO server and PostgreSQL run on this machine, on 127.0.0.1 with a port
chosen at run time (ZEO) and a database created for the run and dropped
after it (PostgreSQL); they compete with the exporting process for its cores.

Example:

    .venv/bin/python scripts/bench/bench_server_export.py --quick --json /tmp/servers.json
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

from _machine import command_line, facts_markdown, write_result
from bench_backends import postgres_backend, zeo_backend
from bench_export import build

import snaptree

HERE = Path(__file__).resolve()
FORMATS = {"pickle": ".pickle", "json": ".json", "zodb": ".zexp"}
#: The row of exports whose objects are all in the client's own cache already.
CACHED = "pickle, from the client's cache"
#: The row of ZEO exports that use ZEO's own prefetch, as through a stock ZEO server.
ZEO_OWN = "pickle, ZEO's own prefetch (as from a stock ZEO server)"


def cold_export(uri: str, out: Path, fmt: str, client_cache: bool = False) -> tuple[float, int]:
    """Seconds of one export from a store opened just before (connected, nothing loaded).

    With *client_cache*, an untimed export first fills the client's own
    cache (ZEO's cache file, RelStorage's local cache), and the ZODB cache
    is emptied before the timed one: every object is then unpickled again,
    but none is asked of the server. What is left is the client's floor.
    """
    read_only = uri.endswith(".fs")
    with snaptree.open(uri, read_only=read_only) as store:
        with store.snapshot():  # connect; the tree's root is all that is loaded
            pass
        if client_cache:
            store.export(out / f"fill{FORMATS[fmt]}", fragments=None)
            store.db.cacheMinimize()
        started = time.perf_counter()
        info = store.export(out / f"cold{FORMATS[fmt]}", fragments=None)
        return time.perf_counter() - started, info.objects


def _child(uri: str, out: str, fmt: str, prefetch: str) -> None:
    """One cold export in this process; with prefetch "off", exports load one object at a time.

    With prefetch "cached", the objects come from the client's own cache (see cold_export);
    with "zeo", through ZEO's own prefetch, as if ``snaptree serve`` did not answer LOAD_MANY.
    """
    if prefetch == "off":
        from snaptree import _plain_nodes

        _plain_nodes.is_client_of_a_server = lambda storage: False  # the bench's own switch
    if prefetch == "zeo":
        from snaptree import _load_many

        _load_many.serves_load_many = lambda storage: False  # the bench's own switch
    seconds, objects = cold_export(uri, Path(out), fmt, client_cache=prefetch == "cached")
    print(json.dumps({"seconds": seconds, "objects": objects}))


def one_run(uri: str, out: Path, fmt: str, prefetch: str = "on") -> dict[str, Any]:
    """One cold export in a fresh process (nothing warm is left over): seconds and objects."""
    proc = subprocess.run(
        [sys.executable, str(HERE), "--child", uri, str(out), fmt, prefetch],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(
    uris: dict[str, str], out: Path, fmt: str, repeat: int, prefetch: str = "on"
) -> dict[str, dict[str, Any]]:
    """Median of *repeat* cold exports per backend, the backends taken in turn in each round.

    Interleaved, so that the load of the machine (other processes on the same
    cores) drifts over all backends alike and the ratios stay fair.
    """
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in uris}
    for _ in range(repeat):
        for name, uri in uris.items():
            runs[name].append(one_run(uri, out, fmt, prefetch))
    return {
        name: {
            "seconds": statistics.median(r["seconds"] for r in found),
            "objects": found[0]["objects"],
        }
        for name, found in runs.items()
    }


def copy_into(uri: str, accounts: int) -> None:
    """The same tree as ``build`` makes, written into another store."""
    with snaptree.open(uri) as store:
        store.run(lambda root: root.__setitem__("accounts", {}))
        for start in range(0, accounts, 5000):

            def add(root: Any, start: int = start) -> None:
                table = root["accounts"]
                for i in range(start, min(start + 5000, accounts)):
                    table[i] = {"balance": 100, "owner": f"owner-{i}", "history": [i % 7, 1]}

            store.run(add)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k objects, fewer repetitions")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    sizes = [10_000] if args.quick else [10_000, 100_000]
    repeat = 3 if args.quick else 5
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-servers-") as tmp:
        work = Path(tmp)
        for size in sizes:
            # one file, served by ZEO: the same records through both
            db = work / f"zeo-{size}.fs"
            print(f"building {size} objects", file=sys.stderr, flush=True)
            accounts = build(db, size)
            out = work / f"out-{size}"
            out.mkdir()
            formats = list(FORMATS) if size == sizes[0] else ["pickle"]
            rows: dict[str, Any] = {}
            served = work / f"served-{size}"
            served.mkdir()
            (served / "zeo.fs").write_bytes(db.read_bytes())
            with zeo_backend(served) as zeo_uri, postgres_backend() as pg_uri:
                print(f"{size}: copying into PostgreSQL", file=sys.stderr, flush=True)
                copy_into(pg_uri, accounts)
                uris = {"file": str(db), "zeo": zeo_uri, "postgresql": pg_uri}
                for fmt in formats:
                    print(f"{size} {fmt}: file, zeo, postgresql in turn", file=sys.stderr)
                    for backend, row in measure(uris, out, fmt, repeat).items():
                        rows[(backend, fmt)] = row
                if size == sizes[0]:
                    off = "pickle, without prefetch"
                    servers = {"zeo": zeo_uri, "postgresql": pg_uri}
                    for backend, row in measure(servers, out, "pickle", 1, "off").items():
                        rows[(backend, off)] = row
                for backend, row in measure(uris, out, "pickle", repeat, "cached").items():
                    rows[(backend, CACHED)] = row
                own = {"file": str(db), "zeo": zeo_uri}
                for backend, row in measure(own, out, "pickle", repeat, "zeo").items():
                    rows[(backend, ZEO_OWN)] = row
            results[size] = rows

    cmd = command_line(HERE, sys.argv[1:])
    lines = [
        "## Cold exports through a server",
        "",
        facts_markdown(),
        "",
        f"Command: `{cmd}`",
        "",
        "The same tree in a FileStorage, through ZEO serving that file, and in PostgreSQL "
        "(RelStorage, history-preserving); each export from a store opened in a fresh process "
        f"just before (cold caches), median of {repeat}, the three backends taken in turn in "
        "each round. Target: through a server within 1.5x "
        "of the file. The last row of each size is the client's floor: every object "
        "unpickled again, but taken from the client's own cache (ZEO's cache file, "
        "RelStorage's local cache) filled by an untimed export just before, so the server "
        "is asked for nothing. The row of ZEO's own prefetch is what a cold export through "
        "a stock ZEO server (or `snaptree serve` before it answered LOAD_MANY) does, "
        "measured against the file's in turn.",
        "",
        "| objects (file / zeo / pg) | format | FileStorage | ZEO | vs file | PostgreSQL "
        "| vs file |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for rows in results.values():
        for (backend, fmt), row in rows.items():
            if backend != "file" or fmt == ZEO_OWN:
                continue  # the servers' figures go on the file's row
            zeo, pg = rows[("zeo", fmt)], rows[("postgresql", fmt)]
            base = row["seconds"]
            lines.append(
                f"| {row['objects']:,} / {zeo['objects']:,} / {pg['objects']:,} | {fmt} | "
                f"{base:.3f} s | {zeo['seconds']:.3f} s | "
                f"{zeo['seconds'] / base:.2f}x | {pg['seconds']:.3f} s | "
                f"{pg['seconds'] / base:.2f}x |"
            )
        off = "pickle, without prefetch"
        if ("zeo", off) in rows:
            base = rows[("file", "pickle")]["seconds"]
            zeo, pg = rows[("zeo", off)], rows[("postgresql", off)]
            lines.append(
                f"| {zeo['objects']:,} | {off} | | {zeo['seconds']:.3f} s | "
                f"{zeo['seconds'] / base:.2f}x | {pg['seconds']:.3f} s | "
                f"{pg['seconds'] / base:.2f}x |"
            )
        if ("zeo", ZEO_OWN) in rows:
            base, zeo = rows[("file", ZEO_OWN)], rows[("zeo", ZEO_OWN)]
            lines.append(
                f"| {base['objects']:,} / {zeo['objects']:,} | {ZEO_OWN} | "
                f"{base['seconds']:.3f} s | {zeo['seconds']:.3f} s | "
                f"{zeo['seconds'] / base['seconds']:.2f}x | | |"
            )
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if args.json:
        data = {
            str(size): {f"{b} {f}": row for (b, f), row in rows.items()}
            for size, rows in results.items()
        }
        write_result(
            args.json,
            name="server_export",
            title="Cold exports through a server",
            command=cmd,
            markdown=markdown,
            data=data,
        )


if __name__ == "__main__":
    main()
