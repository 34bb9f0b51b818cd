"""Real servers for the scale-out tests, and the multi-process workload run against them.

* :class:`ZeoProcess`: ``snaptree serve`` in a subprocess, on 127.0.0.1 with a
  port chosen at run time, stopped (and restartable on the same port) by the
  test that started it.
* :func:`postgres_database`: a uniquely named PostgreSQL database created for
  one test and dropped after it (user ``postgres``, trust auth,
  127.0.0.1:5432). Skips with the reason when PostgreSQL is unreachable, and
  fails instead under ``--require-postgres``.
* :func:`run_bank_workload`: transfer writers in separate processes plus an
  exporter process checking every snapshot, then a final check that every
  acknowledged transfer is in the tree exactly once and the books balance.

Every wait here has a timeout; processes synchronise with events, never sleeps.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import select
import signal
import subprocess
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _cli import start as start_snaptree

STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
WORKLOAD_TIMEOUT = 90.0

# -- ZEO -----------------------------------------------------------------------


class ZeoProcess:
    """``snaptree serve`` for one FileStorage in a subprocess, owned by one test."""

    def __init__(self, db_path: Path, log_path: Path) -> None:
        self.db_path = db_path
        self.log_path = log_path
        self.process: subprocess.Popen[str] | None = None
        self.uri: str | None = None
        self.port = 0

    def start(self, port: int = 0, *extra_args: str) -> str:
        """Start the server (port 0: any free one) and return its zeo:// URI once it listens."""
        assert self.process is None, "already running"
        with self.log_path.open("a") as log:
            self.process = start_snaptree(
                *("-v", "serve", "--db", self.db_path, "--listen", f"127.0.0.1:{port}"),
                *extra_args,
                stderr=log,
            )
        line = _read_line(self.process, STARTUP_TIMEOUT)
        if not line.startswith("zeo://127.0.0.1:"):
            self.stop()
            raise AssertionError(f"snaptree serve did not start: {line!r}\n{self.log()}")
        self.uri = line.strip()
        self.port = int(self.uri.rsplit(":", 1)[1])
        return self.uri

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the server with *sig* and return its exit code (killing it if it hangs)."""
        process, self.process = self.process, None
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(sig)
        try:
            code = process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
            raise AssertionError(f"snaptree serve ignored {sig!r}\n{self.log()}") from None
        finally:
            if process.stdout is not None:
                process.stdout.close()
        return code

    def restart(self) -> str:
        """Stop the server cleanly and start it again on the same port."""
        assert self.stop() == 0, self.log()
        return self.start(self.port)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The first line *process* prints, or "" if it exits or says nothing within *timeout*."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline() if ready else ""


@contextlib.contextmanager
def zeo_server(tmp_path: Path, name: str = "Data.fs") -> Iterator[ZeoProcess]:
    """A running ZEO server for ``tmp_path/name``, stopped when the block ends."""
    server = ZeoProcess(tmp_path / name, tmp_path / f"{name}.server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- PostgreSQL ---------------------------------------------------------------

PG_ADMIN = {
    "host": "127.0.0.1",
    "port": 5432,
    "user": "postgres",
    "dbname": "postgres",
    "connect_timeout": 5,
}


def _admin_connection() -> Any:
    import psycopg2

    conn = psycopg2.connect(**PG_ADMIN)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    return conn


def require_postgres(request: pytest.FixtureRequest) -> None:
    """Skip (or fail under --require-postgres) unless PostgreSQL answers at 127.0.0.1:5432."""
    import psycopg2

    try:
        _admin_connection().close()
    except psycopg2.Error as exc:
        reason = (
            f"PostgreSQL is not reachable as user {PG_ADMIN['user']} at "
            f"{PG_ADMIN['host']}:{PG_ADMIN['port']} "
            f"({str(exc).strip().splitlines()[0]})"
        )
        if request.config.getoption("--require-postgres"):
            pytest.fail(f"{reason}; --require-postgres makes that a failure")
        pytest.skip(reason)


@contextlib.contextmanager
def postgres_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """Create a uniquely named database for one test, yield its name, then drop it."""
    require_postgres(request)
    name = f"snaptree_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with contextlib.closing(_admin_connection()) as admin:
        admin.cursor().execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with contextlib.closing(_admin_connection()) as admin:
            # FORCE (PostgreSQL 13+) ends the connections a failed test left behind.
            admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_uri(name: str, options: str = "") -> str:
    """The URI of database *name* as the tests reach it (no password: trust auth)."""
    return f"postgresql://postgres@127.0.0.1:5432/{name}" + (f"?{options}" if options else "")


# -- the bank workload -----------------------------------------------------------

ACCOUNTS = 8
OPENING_BALANCE = 1_000


def open_bank(store: Any) -> None:
    """Create the accounts and the transfer journal, once."""

    def create(root: Any) -> None:
        if "accounts" not in root:
            root["accounts"] = {f"acct-{i}": OPENING_BALANCE for i in range(ACCOUNTS)}
            root["transfers"] = {}

    store.run(create)


def transfer(root: Any, transfer_id: str, source: str, target: str, amount: int) -> bool:
    """Move *amount*, recording it under *transfer_id*; a transfer already recorded is skipped.

    Idempotence is what lets a writer retry a commit whose acknowledgement
    was lost with the server: the retry finds the transfer and does nothing.
    """
    journal = root["transfers"]
    if transfer_id in journal:
        return False
    accounts = root["accounts"]
    accounts[source] -= amount
    accounts[target] += amount
    journal[transfer_id] = f"{source} {target} {amount}"
    return True


def check_books(root: Any) -> tuple[int, list[str]]:
    """Return (number of transfers, problems) for one consistent state of the bank."""
    balances = {f"acct-{i}": OPENING_BALANCE for i in range(ACCOUNTS)}
    count = 0
    for entry in root["transfers"].values():
        source, target, amount = entry.split()
        balances[source] -= int(amount)
        balances[target] += int(amount)
        count += 1
    actual = dict(root["accounts"].items())
    problems = []
    if sum(actual.values()) != ACCOUNTS * OPENING_BALANCE:
        problems.append(f"total is {sum(actual.values())}, not {ACCOUNTS * OPENING_BALANCE}")
    if actual != balances:
        problems.append(f"balances {actual} do not match the journal's {balances}")
    return count, problems


@dataclass
class WorkloadResult:
    logged: set[str]
    recorded: int
    exporter: dict[str, Any]


def _writer_main(
    uri: str,
    name: str,
    log_path: str,
    first: int,
    after: int,
    halfway: Any,
    proceed: Any,
    start: Any,
) -> None:
    """Commit transfers: *first*, signal *halfway*, keep going until *proceed*, then *after* more.

    Each transfer is logged only after ``store.run`` returned, i.e. after
    the commit was acknowledged.
    """
    import snaptree

    try:
        rng = random.Random(name)
        store = snaptree.open(uri, retry=snaptree.RetryPolicy(attempts=200, max_delay=0.1))
        start.wait(WORKLOAD_TIMEOUT)
        done = 0
        remaining_after: int | None = None
        with store, open(log_path, "a") as log:
            while remaining_after is None or remaining_after > 0:
                source, target = rng.sample(range(ACCOUNTS), 2)
                transfer_id = f"{name}-{done:05d}"
                store.run(
                    transfer, transfer_id, f"acct-{source}", f"acct-{target}", rng.randint(1, 50)
                )
                log.write(transfer_id + "\n")
                log.flush()
                done += 1
                if done == first:
                    halfway.set()
                if remaining_after is None and done >= first and proceed.is_set():
                    remaining_after = after
                elif remaining_after is not None:
                    remaining_after -= 1
    except BaseException:
        Path(log_path + ".error").write_text(traceback.format_exc())
        raise


def _exporter_main(
    uri: str, result_path: str, dumps_dir: str, stop: Any, dumped: Any, start: Any
) -> None:
    """Check the books in snapshot after snapshot until *stop*; write a JSON summary.

    Each round checks one snapshot in place and, once ``store.export`` is
    implemented, exports another state to a file (checked at the end by
    :func:`check_dumps`). A round cut short by a lost server (a transient
    error) is counted and taken again; the file it was writing must not appear.
    """
    from transaction.interfaces import TransientError

    import snaptree

    summary: dict[str, Any] = {"dumps": 0, "interrupted": 0, "problems": [], "exports": 0}
    try:
        store = snaptree.open(uri)
        start.wait(WORKLOAD_TIMEOUT)
        can_export = True
        with store:
            while not stop.is_set():
                try:
                    with store.snapshot() as snap:
                        count, problems = check_books(snap.root)
                    if can_export:
                        target = Path(dumps_dir) / f"dump-{summary['dumps']:04d}.pickle"
                        try:
                            store.export(target)
                        except NotImplementedError:
                            can_export = False
                        else:
                            summary["exports"] += 1
                except TransientError:
                    summary["interrupted"] += 1
                    continue
                summary["dumps"] += 1
                summary["problems"] += [f"snapshot with {count} transfers: {p}" for p in problems]
                dumped.set()
    except BaseException:
        summary["problems"].append(traceback.format_exc())
        raise
    finally:
        Path(result_path).write_text(json.dumps(summary))


def check_dumps(dumps_dir: Path) -> list[str]:
    """Every file in *dumps_dir* is a complete, verified export whose books balance."""
    import pickle

    import snaptree

    problems = []
    for path in sorted(dumps_dir.iterdir()):
        if path.name.endswith(".manifest.json"):
            continue
        if path.suffix != ".pickle":
            problems.append(f"{path.name}: left behind (a partial export?)")
            continue
        try:
            snaptree.verify(path)
        except snaptree.Error as exc:
            problems.append(str(exc))
            continue
        tree = pickle.loads(path.read_bytes())
        problems += [f"{path.name}: {p}" for p in check_books(tree)[1]]
    return problems


def run_bank_workload(
    uri: str,
    work_dir: Path,
    *,
    writers: int = 2,
    first: int = 15,
    after: int = 15,
    while_running: Callable[[], None] | None = None,
) -> WorkloadResult:
    """Run *writers* writer processes and one exporter process against *uri*.

    Every writer commits *first* transfers; then, while all of them keep
    committing, ``while_running()`` runs (a server restart, say) and the
    exporter completes two more snapshots; then each writer commits *after*
    more and stops. Raises AssertionError on any failure of any process.
    """
    import snaptree

    with snaptree.open(uri) as store:  # schema and bank exist before processes race
        open_bank(store)
    context = multiprocessing.get_context("spawn")  # no fork: ZEO and RelStorage run threads
    halfway = [context.Event() for _ in range(writers)]
    proceed, stop, dumped = context.Event(), context.Event(), context.Event()
    start = context.Event()
    logs = [work_dir / f"writer-{i}.log" for i in range(writers)]
    result_path = work_dir / "exporter.json"
    dumps_dir = work_dir / "dumps"
    dumps_dir.mkdir(exist_ok=True)
    processes = [
        context.Process(
            target=_writer_main,
            args=(uri, f"w{i}", str(logs[i]), first, after, halfway[i], proceed, start),
            name=f"writer-{i}",
        )
        for i in range(writers)
    ]
    exporter = context.Process(
        target=_exporter_main,
        args=(uri, str(result_path), str(dumps_dir), stop, dumped, start),
        name="exporter",
    )
    everyone = [*processes, exporter]
    for process in everyone:
        process.start()
    try:
        start.set()
        for i, event in enumerate(halfway):
            assert event.wait(WORKLOAD_TIMEOUT), _failure(f"writer {i} never got halfway", logs)
        if while_running is not None:
            while_running()
        for _ in range(2):  # the second snapshot began after the writers were halfway
            dumped.clear()
            assert dumped.wait(WORKLOAD_TIMEOUT), _failure("the exporter made no snapshot", logs)
        proceed.set()
        for process in processes:
            process.join(WORKLOAD_TIMEOUT)
            assert process.exitcode == 0, _failure(f"{process.name}: {process.exitcode}", logs)
        stop.set()
        exporter.join(WORKLOAD_TIMEOUT)
        assert exporter.exitcode == 0, _failure(f"exporter exit code {exporter.exitcode}", logs)
    finally:
        stop.set()
        proceed.set()
        for process in everyone:
            process.join(STOP_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join(STOP_TIMEOUT)
    logged = {line for log in logs for line in log.read_text().split()}
    with snaptree.open(uri) as store, store.snapshot() as snap:
        recorded = set(snap.root["transfers"].keys())
        _, problems = check_books(snap.root)
    assert not problems, problems
    assert logged <= recorded, f"acknowledged but lost: {sorted(logged - recorded)[:10]}"
    assert recorded == logged, f"recorded but never acknowledged: {sorted(recorded - logged)[:10]}"
    exporter_summary = json.loads(result_path.read_text())
    assert not exporter_summary["problems"], exporter_summary["problems"]
    assert exporter_summary["dumps"] >= 2, exporter_summary
    dump_problems = check_dumps(dumps_dir)
    assert not dump_problems, dump_problems
    return WorkloadResult(logged, len(recorded), exporter_summary)


def _failure(what: str, logs: list[Path]) -> str:
    errors = [p.with_name(p.name + ".error") for p in logs]
    details = "\n".join(p.read_text() for p in errors if p.exists())
    return f"{what}\n{details}"
