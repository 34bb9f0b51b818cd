"""Benchmark: every path at 1M and 10M objects on one FileStorage, for the slope.

For each size, on a fresh FileStorage, each step in a fresh process (so
that its peak RSS, VmHWM, is its own):

1. **import**: a JSON file of accounts (five objects each: the account, its
   list of entries and three entries), written before the clock starts,
   imported with ``store.import_tree(Path(...))`` as ``snaptree import``
   does: streamed, committed in batches. Time, peak RSS, file sizes.
2. **open**: ``snaptree.open`` of the closed file, for writing and read-only.
3. **a live file after 100,000 commits**: a writer process commits 100,000
   small transfers and keeps the file open. Then, while it still has it
   open: the **exporter's start-up** (opening the file read-only in a fresh
   process, what the exporter process and ``snaptree export --db`` do
   first), with the writer saving its index every 16 MiB of commits
   (snaptree's default) and with ZODB's own behaviour (``save_index_every=0``:
   only at close, so a reader scans every commit since); and the exporter
   process's own code (:class:`snaptree._following_reader.FollowingReader`
   and ``export_into`` into a schedule directory) exporting **cold**, then
   **warm after 0.1% of the objects changed**, with its RSS while it keeps
   its fragments: once with the Exporter's default cache (200,000 objects)
   and once with a cache that holds the whole tree.
4. **pack**: ``db.pack()`` of the file as it is then.

Then, to calibrate the cost model of docs/scale-out.md per backend, the
import and the cold export of ``--backend-objects`` (100,000) objects on
FileStorage, through ZEO (``snaptree serve`` on this machine) and on
RelStorage/PostgreSQL (a database made for the run and dropped after it;
skipped when PostgreSQL is not reachable on 127.0.0.1:5432).

The 10M run needs about 15 GB of disk and most of an hour on two cores;
``--import-only`` runs steps 1 and 2 alone.

Example:

    .venv/bin/python scripts/bench/bench_scale.py --sizes 100000 --commits 2000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import command_line, facts_markdown, peak_rss_mib, write_result

HERE = Path(__file__).resolve()
OBJECTS_PER_ACCOUNT = 5
EXPORTER_CACHE = 200_000  # snaptree.Exporter's default cache_size
STARTUP_REPEATS = 3
WAIT = 7200.0  # seconds any child step may take


def _account(i: int) -> dict[str, Any]:
    return {
        "owner": f"c{i % 997:04}",
        "balance": 1_000,
        "entries": [{"amount": j * 100 - 50, "memo": "card payment"} for j in range(3)],
    }


def write_json(objects: int, path: Path) -> int:
    """The accounts as one JSON object, a line each; returns how many accounts."""
    accounts = max(objects // OBJECTS_PER_ACCOUNT, 1)
    with open(path, "w") as file:
        file.write("{\n")
        for i in range(accounts):
            file.write(f'{"," if i else ""}"a{i:07}": {json.dumps(_account(i))}\n')
        file.write("}\n")
    return accounts


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _say(value: Any) -> None:
    print(json.dumps(value), flush=True)


def _wait_for(line: str) -> None:
    got = sys.stdin.readline().strip()
    if got != line:
        raise SystemExit(f"expected {line!r} on stdin, got {got!r}")


# -- the children -------------------------------------------------------------------


def child_import(db: str, source: str) -> None:
    import snaptree

    started = time.perf_counter()
    with snaptree.open(db) as store:
        result = store.import_tree(Path(source), path="accounts")
    _say(
        {
            "seconds": time.perf_counter() - started,
            "objects": result.objects,
            "batches": result.batches,
            "peak_mib": peak_rss_mib(),
        }
    )


def child_open(db: str, read_only: str) -> None:
    import snaptree

    started = time.perf_counter()
    store = snaptree.open(db, read_only=read_only == "1")
    seconds = time.perf_counter() - started
    store.close()
    _say({"seconds": seconds, "peak_mib": peak_rss_mib()})


def child_cold_export(db: str, out: str) -> None:
    import snaptree

    store = snaptree.open(db, read_only=True, cache_size=EXPORTER_CACHE)
    started = time.perf_counter()
    info = store.export(Path(out) / "cold.pickle")
    seconds = time.perf_counter() - started
    store.close()
    size = os.path.getsize(info.path)
    os.unlink(info.path)
    _say({"seconds": seconds, "peak_mib": peak_rss_mib(), "dump_bytes": size})


def child_writer(uri: str, commits: str, accounts: str) -> None:
    """Commit small transfers, say so, then change what it is told to until told to close."""
    import snaptree

    count, size = int(commits), int(accounts)
    rng = random.Random(5)

    def transfer(root: Any, a: str, b: str) -> None:
        table = root["accounts"]
        table[a]["balance"] -= 1
        table[b]["balance"] += 1

    store = snaptree.open(uri)
    started = time.perf_counter()
    for _ in range(count):
        a, b = rng.sample(range(size), 2)
        store.run(transfer, f"a{a:07}", f"a{b:07}")
    _say({"commits_per_s": count / (time.perf_counter() - started)})
    while True:
        command = sys.stdin.readline().split()
        if not command or command[0] == "close":
            break
        changed = rng.sample(range(size), int(command[1]))  # "change K"

        def change(root: Any, keys: list[int]) -> None:
            table = root["accounts"]
            for key in keys:
                table[f"a{key:07}"]["balance"] += 1

        for start in range(0, len(changed), 1000):
            store.run(change, changed[start : start + 1000])
        _say({"changed": len(changed)})
    started = time.perf_counter()
    store.close()
    _say({"close_s": time.perf_counter() - started})


def child_startup(db: str) -> None:
    """What an exporter does first: load the store's code, then open the live file read-only."""
    started = time.perf_counter()
    from snaptree.store import open as open_store

    imported = time.perf_counter()
    store = open_store(db, read_only=True, cache_size=EXPORTER_CACHE, pool_size=2)
    opened = time.perf_counter()
    store.close()
    _say({"import_s": imported - started, "open_s": opened - imported})


def child_exporter(db: str, directory: str, cache_size: str) -> None:
    """The exporter process's own code: a following reader, exports that keep their fragments."""
    from snaptree._following_reader import FollowingReader
    from snaptree.export_run import export_into

    started = time.perf_counter()
    reader = FollowingReader(db, int(cache_size))
    startup = time.perf_counter() - started

    def run() -> float:
        began = time.perf_counter()
        reader.catch_up()
        export_into(reader.store, directory, fragments=reader.fragments, keep=1)
        return time.perf_counter() - began

    cold = run()
    dump = max(Path(directory).glob("*.pickle"), key=os.path.getmtime)
    _say(
        {
            "startup_s": startup,
            "cold_s": cold,
            "cold_rss_mib": _rss_mib(),
            "dump_bytes": dump.stat().st_size,
        }
    )
    _wait_for("again")
    warm = run()
    _say({"warm_s": warm, "rss_mib": _rss_mib(), "peak_mib": peak_rss_mib()})
    _wait_for("quit")
    reader.close()


def child_pack(db: str) -> None:
    import snaptree

    before = os.path.getsize(db)
    with snaptree.open(db) as store:
        started = time.perf_counter()
        store.db.pack()
        seconds = time.perf_counter() - started
    _say({"seconds": seconds, "before_bytes": before, "after_bytes": os.path.getsize(db)})


CHILDREN = {
    "import": child_import,
    "open": child_open,
    "cold-export": child_cold_export,
    "writer": child_writer,
    "startup": child_startup,
    "exporter": child_exporter,
    "pack": child_pack,
}


# -- the parent ---------------------------------------------------------------------


class Child:
    """A child step: started with its arguments, read a JSON line at a time, told what to do."""

    def __init__(self, name: str, *args: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "--child", name, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def read(self, timeout: float = WAIT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()))
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            self.proc.kill()
            raise RuntimeError(f"child {self.name} said nothing (exit {self.proc.poll()})")
        return json.loads(box[0])

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.proc.wait(WAIT) != 0:
            raise RuntimeError(f"child {self.name} failed with exit {self.proc.returncode}")


def run(name: str, *args: str) -> dict[str, Any]:
    child = Child(name, *args)
    result = child.read()
    child.finish()
    return result


def index_option_supported() -> bool:
    """Whether this snaptree's FileStorage saves its index periodically (save_index_every)."""
    try:
        from snaptree import uris

        uris.resolve("file:///tmp/probe.fs?save_index_every=0")
    except Exception:
        return False
    return True


def measure_backends(objects: int, work: Path) -> list[dict[str, Any]]:
    """Import and cold export of *objects* on each backend (see the docstring)."""
    from bench_backends import postgres_backend, zeo_backend

    source = work / "accounts.json"
    write_json(objects, source)
    backends = [
        ("FileStorage", contextlib.nullcontext(str(work / "file.fs"))),
        ("ZEO (`snaptree serve`, same machine)", zeo_backend(work)),
        ("RelStorage/PostgreSQL 15 (same machine)", postgres_backend()),
    ]
    rows = []
    for label, backend in backends:
        print(f"[backends] {label}", file=sys.stderr, flush=True)
        try:
            with backend as uri:
                imported = run("import", uri, str(source))
                stored = _stored_bytes(uri, work)
                out = work / f"dumps-{len(rows)}"
                out.mkdir()
                exported = run("cold-export", uri, str(out))
        except ImportError as exc:  # psycopg2 missing
            rows.append({"backend": label, "skipped": str(exc)})
            continue
        except Exception as exc:
            if not type(exc).__module__.startswith("psycopg2"):
                raise
            rows.append({"backend": label, "skipped": str(exc).strip().splitlines()[0]})
            continue
        rows.append(
            {"backend": label, "import": imported, "cold_export": exported, "bytes": stored}
        )
    return rows


def _stored_bytes(uri: str, work: Path) -> int:
    """What the backend stores for the tree: the data file, or PostgreSQL's database size."""
    if uri.startswith("postgresql://"):
        import psycopg2

        name = uri.rsplit("/", 1)[1]
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=name)
        try:
            cursor = conn.cursor()
            cursor.execute("SELECT pg_database_size(current_database())")
            return int(cursor.fetchone()[0])
        finally:
            conn.close()
    path = work / ("zeo.fs" if uri.startswith("zeo://") else "file.fs")
    return path.stat().st_size


def measure_import(objects: int, work: Path, open_too: bool = False) -> dict[str, Any]:
    """Step 1 (write the JSON, import it streamed, the file sizes); with *open_too*, step 2."""
    figures: dict[str, Any] = {"objects": objects}
    db = work / "Data.fs"
    source = work / "accounts.json"
    figures["accounts"] = write_json(objects, source)
    figures["json_bytes"] = source.stat().st_size
    print(f"[{objects:,}] import", file=sys.stderr, flush=True)
    figures["import"] = run("import", str(db), str(source))
    source.unlink()
    figures["file_bytes_after_import"] = db.stat().st_size
    index = Path(f"{db}.index")
    figures["index_bytes"] = index.stat().st_size if index.exists() else 0
    if open_too:
        print(f"[{objects:,}] open", file=sys.stderr, flush=True)
        figures["open_write"] = run("open", str(db), "0")
        figures["open_read_only"] = run("open", str(db), "1")
    return figures


def measure(objects: int, commits: int, work: Path) -> dict[str, Any]:
    """Every figure for one size, in a fresh directory."""
    figures = measure_import(objects, work)
    db = work / "Data.fs"
    accounts = figures.pop("accounts")
    log = lambda what: print(f"[{objects:,}] {what}", file=sys.stderr, flush=True)  # noqa: E731

    log("open")
    figures["open_write"] = run("open", str(db), "0")
    figures["open_read_only"] = run("open", str(db), "1")

    variants = [("saved every 16 MiB", f"file://{db}")]
    if index_option_supported():
        variants.append(("saved only at close", f"file://{db}?save_index_every=0"))
    else:
        variants = [("saved only at close (this snaptree has no periodic save)", str(db))]
    figures["live"] = []
    for label, uri in variants:
        log(f"{commits:,} commits, index {label}")
        writer = Child("writer", uri, str(commits), str(accounts))
        exporter = None
        try:
            live: dict[str, Any] = {"index": label, **writer.read()}
            live["file_bytes"] = db.stat().st_size
            log("exporter start-up")
            startups = [run("startup", str(db)) for _ in range(STARTUP_REPEATS)]
            live["startup_open_s"] = statistics.median(s["open_s"] for s in startups)
            live["startup_import_s"] = statistics.median(s["import_s"] for s in startups)
            whole = max(2 * objects, 2 * EXPORTER_CACHE)
            caches = [EXPORTER_CACHE, whole] if not figures["live"] else []
            for cache in caches:  # the exporter's runs, in the first variant only
                log(f"exporter (cache {cache:,}): cold, then warm after 0.1% changed")
                scheduled = work / f"scheduled-{cache}"
                scheduled.mkdir()
                exporter = Child("exporter", str(db), str(scheduled), str(cache))
                run_figures = {"cache": cache, **exporter.read()}
                writer.tell(f"change {max(objects // 1000, 1)}")
                run_figures["changed"] = writer.read()["changed"]
                exporter.tell("again")
                run_figures |= exporter.read()
                exporter.tell("quit")
                exporter.finish()
                exporter = None
                live.setdefault("exporter", []).append(run_figures)
            writer.tell("close")
            live |= writer.read()
            writer.finish()
        finally:
            for child in (exporter, writer):
                if child is not None and child.proc.poll() is None:
                    child.proc.kill()
                    child.proc.wait(WAIT)
        figures["live"].append(live)

    log("pack")
    figures["pack"] = run("pack", str(db))
    return figures


# -- the report ---------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def report(results: list[dict[str, Any]], commits: int) -> str:
    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    sizes = [f"{r['objects']:,} objects" for r in results]
    lines = [
        row("figure", sizes),
        "|---|" + "---:|" * len(results),
        row("JSON source, MiB", [_mib(r["json_bytes"]) for r in results]),
        row("import (streamed JSON), s", [f"{r['import']['seconds']:.0f}" for r in results]),
        row(
            "import rate, objects/s",
            [f"{r['objects'] / r['import']['seconds']:,.0f}" for r in results],
        ),
        row("import peak RSS, MiB", [f"{r['import']['peak_mib']:.0f}" for r in results]),
        row("Data.fs after import, MiB", [_mib(r["file_bytes_after_import"]) for r in results]),
        row("Data.fs.index, MiB", [_mib(r["index_bytes"]) for r in results]),
        row("open for writing, s", [f"{r['open_write']['seconds']:.2f}" for r in results]),
        row("open read-only, s", [f"{r['open_read_only']['seconds']:.2f}" for r in results]),
        row(
            "cold export (pickle, exporter's default cache), s",
            [f"{r['live'][0]['exporter'][0]['cold_s']:.0f}" for r in results],
        ),
        row(
            "cold export: RSS at its end, MiB",
            [f"{r['live'][0]['exporter'][0]['cold_rss_mib']:.0f}" for r in results],
        ),
        row("pickle dump, MiB", [_mib(r["live"][0]["exporter"][0]["dump_bytes"]) for r in results]),
    ]
    for i, label in enumerate(live["index"] for live in results[0]["live"]):
        lines += [
            row(
                f"writer: {commits:,} commits, commits/s (index {label})",
                [f"{r['live'][i]['commits_per_s']:,.0f}" for r in results],
            ),
            row(
                f"exporter start-up: opening the live file, s (index {label})",
                [f"{r['live'][i]['startup_open_s']:.2f}" for r in results],
            ),
        ]
    lines.append(
        row(
            "exporter start-up: loading snaptree and ZODB, s",
            [f"{r['live'][0]['startup_import_s']:.2f}" for r in results],
        )
    )
    for i, what in enumerate(("the default cache (200,000 objects)", "a cache holding the tree")):
        runs = [r["live"][0]["exporter"][i] for r in results]
        lines += [
            row(f"exporter process, {what}: cold export, s", [f"{x['cold_s']:.0f}" for x in runs]),
            row(
                f"exporter process, {what}: warm export after 0.1% changed, s",
                [f"{x['warm_s']:.2f}" for x in runs],
            ),
            row(
                f"exporter process, {what}: RSS with its fragments kept, MiB",
                [f"{x['rss_mib']:.0f}" for x in runs],
            ),
            row(f"exporter process, {what}: peak RSS, MiB", [f"{x['peak_mib']:.0f}" for x in runs]),
        ]
    lines += [
        row("pack, s", [f"{r['pack']['seconds']:.0f}" for r in results]),
        row(
            "Data.fs before / after pack, MiB",
            [
                f"{_mib(r['pack']['before_bytes'])} / {_mib(r['pack']['after_bytes'])}"
                for r in results
            ],
        ),
    ]
    return "\n".join(lines)


def report_import(results: list[dict[str, Any]]) -> str:
    lines = [
        "| objects | JSON MiB | import s | objects/s | peak RSS MiB | Data.fs MiB | index MiB "
        "| open for writing s | open read-only s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        imported = r["import"]
        lines.append(
            f"| {r['objects']:,} | {_mib(r['json_bytes'])} | {imported['seconds']:.0f} | "
            f"{r['objects'] / imported['seconds']:,.0f} | {imported['peak_mib']:.0f} | "
            f"{_mib(r['file_bytes_after_import'])} | {_mib(r['index_bytes'])} | "
            f"{r['open_write']['seconds']:.2f} | {r['open_read_only']['seconds']:.2f} |"
        )
    return "\n".join(lines)


def report_backends(rows: list[dict[str, Any]], objects: int) -> str:
    lines = [
        f"Import (streamed JSON) and cold export of {objects:,} objects per backend, each in a "
        "fresh process; the ZEO server and PostgreSQL share the machine's two cores with the "
        "client.",
        "",
        "| backend | import s | import objects/s | stored bytes per object | cold export s | "
        "export objects/s | export peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['backend']} | skipped: {row['skipped']} | | | | | |")
            continue
        imported, exported = row["import"], row["cold_export"]
        lines.append(
            f"| {row['backend']} | {imported['seconds']:.1f} | "
            f"{imported['objects'] / imported['seconds']:,.0f} | "
            f"{row['bytes'] / imported['objects']:,.0f} | {exported['seconds']:.1f} | "
            f"{imported['objects'] / exported['seconds']:,.0f} | {exported['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        CHILDREN[argv[1]](*argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k objects, 2,000 commits")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--sizes", help="comma-separated object counts (default 1M,10M)")
    parser.add_argument("--commits", type=int, help="commits before the start-up (100,000)")
    parser.add_argument("--dir", type=Path, help="work here instead of a temporary directory")
    parser.add_argument(
        "--import-only",
        action="store_true",
        help="only steps 1 and 2 (import, open) for each size",
    )
    parser.add_argument(
        "--backend-objects",
        type=int,
        help="objects for the per-backend figures (100,000; 0 leaves them out)",
    )
    args = parser.parse_args(argv)
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = [100_000] if args.quick else [1_000_000, 10_000_000]
    commits = args.commits or (2_000 if args.quick else 100_000)
    backend_objects = args.backend_objects
    if backend_objects is None:
        backend_objects = 20_000 if args.quick else 100_000
    machine = facts_markdown()
    results = []
    for objects in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.dir) as work:
            if args.import_only:
                results.append(measure_import(objects, Path(work), open_too=True))
            else:
                results.append(measure(objects, commits, Path(work)))
    backends: list[dict[str, Any]] = []
    if backend_objects and not args.import_only:
        with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.dir) as work:
            backends = measure_backends(backend_objects, Path(work))
    command = command_line(HERE, argv)
    markdown = "\n\n".join(
        [
            "## Scale: 1M and 10M objects on one FileStorage",
            "Each step runs in a fresh process on the same file (see the script's docstring); "
            "one run per size, so expect noise of a few percent. Peak RSS is the process's "
            "VmHWM. The load average in the facts says how busy the shared machine was.",
            machine,
            f"Command:\n\n    {command}",
            report_import(results) if args.import_only else report(results, commits),
            *([report_backends(backends, backend_objects)] if backends else []),
        ]
    )
    print(markdown)
    if args.json:
        write_result(
            args.json,
            name="scale",
            title="Scale",
            command=command,
            markdown=markdown,
            results=results,
            backends=backends,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
