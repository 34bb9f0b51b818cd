"""A failed run is one line and the schedule goes on; failures in the exporter process too.

A schedule runs unattended for months: one value the format cannot hold,
or a user's class that cannot be exported, must not end it. Each failed
run is reported in one line (``snaptree: error:`` on the command line, one
ERROR record from an Exporter), and once the value is fixed the next run
writes a dump.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import snaptree
from _cli import start as start_snaptree
from _trap import GATE_VARIABLE, Gate, Trap
from snaptree.dump_directory import complete_dumps, latest_link
from snaptree.export_run import describe_failure

WAIT = 60.0
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def importable_trap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exporter processes started by the test can import _trap, as the test itself can."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    )


@pytest.fixture
def gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, importable_trap: None) -> Iterator[Gate]:
    directory = tmp_path / "gate"
    directory.mkdir()
    opened = Gate(directory)
    monkeypatch.setenv(GATE_VARIABLE, str(directory))
    try:
        yield opened
    finally:
        opened.close()


class Records(logging.Handler):
    """The records of snaptree.schedule; ``failed`` is set at the first ERROR."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.failed = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if record.levelno >= logging.ERROR:
            self.failed.set()

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("snaptree.schedule")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


class Lines:
    """Lines from a child's pipe, each wait bounded."""

    def __init__(self, stream: Any) -> None:
        self.fd = stream.fileno()
        self.buffer = b""
        self.lines: list[str] = []

    def wait_for(self, wanted: Callable[[str], bool], timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if wanted(line):
                    return line
            seen = len(self.lines)
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no such line in {timeout} s; got {self.lines}"
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                chunk = os.read(self.fd, 1 << 16)
                assert chunk, f"the process exited; it wrote {self.lines}"
                self.buffer += chunk
                *complete, self.buffer = self.buffer.split(b"\n")
                self.lines.extend(line.decode() for line in complete)

    def rest(self) -> list[str]:
        while chunk := os.read(self.fd, 1 << 16):
            self.buffer += chunk
        return self.lines + [line.decode() for line in self.buffer.split(b"\n") if line]


# -- the command ------------------------------------------------------------------------


@pytest.mark.slow  # seconds of work: with the torture tests in .ci/run
def test_a_failed_run_of_the_command_is_one_line_and_the_schedule_goes_on(tmp_path):
    """--every with a value JSON cannot write: an error line per run, then, once fixed, a dump."""
    db, dumps = tmp_path / "Data.fs", tmp_path / "dumps"
    dumps.mkdir()
    writer = snaptree.open(str(db))
    writer.run(lambda root: root.__setitem__("name", "\ud800"))  # a lone surrogate
    command = start_snaptree(
        "export", "--db", db, "--dir", dumps, "--every", "0.2", "--format", "json", "--json"
    )
    try:
        stdout, stderr = Lines(command.stdout), Lines(command.stderr)
        stderr.wait_for(lambda line: line.startswith("snaptree: error: "))
        writer.run(lambda root: root.__setitem__("name", "fixed"))
        written = stdout.wait_for(lambda line: json.loads(line)["written"])
        command.send_signal(signal.SIGTERM)
        assert command.wait(WAIT) == 0
        errors = [line for line in stderr.rest() if "error" in line.lower()]
    finally:
        if command.poll() is None:
            command.kill()
            command.wait(WAIT)
        command.stdout.close()
        command.stderr.close()
        writer.close()
    assert errors and all(line.startswith("snaptree: error: ") for line in errors), errors
    assert not any("Traceback" in line for line in stderr.lines)
    assert json.loads(Path(json.loads(written)["path"]).read_text()) == {"name": "fixed"}


# -- the Exporter -----------------------------------------------------------------------


def _fails_then_succeeds(store, directory, records, fmt: str, fix: Callable[[Any], None]):
    """Start an Exporter (every=0) on a store whose export fails; fix it; wait for a dump."""
    written = threading.Event()
    exporter = snaptree.Exporter(
        store,
        directory,
        every=0,
        format=fmt,
        on_export=lambda result: None if result.skipped else written.set(),
    )
    exporter.start()
    try:
        assert records.failed.wait(WAIT), "no failed run was logged"
        failure = exporter.last_error
        store.run(fix)
        assert written.wait(WAIT), "the schedule did not go on after the failure"
    finally:
        exporter.stop(timeout=WAIT)
    errors = records.at(logging.ERROR)
    assert all("\n" not in line for line in errors)
    assert all(line.startswith(f"scheduled export into {directory} failed: ") for line in errors)
    assert not [r for r in records.records if r.exc_info and r.levelno > logging.DEBUG]
    # Each run that did not fail is logged once (not once by the run and again by the Exporter).
    runs = [line for line in records.at(logging.INFO) if line.startswith(("exported ", "nothing "))]
    assert len(runs) == exporter.runs
    assert failure is not None and errors[0].endswith(describe_failure(failure))
    return errors


@pytest.mark.slow
def test_a_value_the_format_cannot_hold_fails_one_run_of_the_exporter_not_the_schedule(
    store, tmp_path, records
):
    """In the exporter process (FileStorage) and in-process (memory): the same one line."""
    store.run(lambda root: root.__setitem__("name", "\ud800"))
    _fails_then_succeeds(
        store, tmp_path, records, "json", lambda root: root.__setitem__("name", "fixed")
    )
    with open(latest_link(tmp_path, "json")) as f:
        assert json.load(f) == {"name": "fixed"}


@pytest.mark.slow
def test_an_unexpected_exception_is_one_line_naming_its_type_and_the_schedule_goes_on(
    store, tmp_path, records, importable_trap
):
    """A user's class whose export raises ZeroDivisionError: reported, then fixed, then a dump."""
    store.run(lambda root: root.__setitem__("trap", Trap("raise")))
    errors = _fails_then_succeeds(
        store, tmp_path, records, "pickle", lambda root: setattr(root["trap"], "mode", None)
    )
    assert "unexpected ZeroDivisionError: this Trap refuses to be exported" in errors[0]


@pytest.mark.slow
def test_an_export_abandoned_at_stop_is_logged_at_info_not_as_a_failure(tmp_path, records, gate):
    store = snaptree.open(str(tmp_path / "Data.fs"))
    try:
        store.run(lambda root: root.__setitem__("trap", Trap("wait")))
        exporter = snaptree.Exporter(store, tmp_path, every=3600)
        exporter.start()
        gate.wait_entered(WAIT)  # the export is half-way and will not end by itself
        exporter.stop(timeout=0.1)  # so stop() abandons it
    finally:
        store.close()
    assert records.at(logging.ERROR) == []
    assert exporter.last_error is None
    [abandoned] = [line for line in records.at(logging.INFO) if "abandoned" in line]
    assert "nothing was written" in abandoned
    assert complete_dumps(tmp_path, "pickle") == []


# -- failures inside the exporter process ---------------------------------------------------


MAIN_CLASS = """
import sys
import persistent
import snaptree

class Account(persistent.Persistent):
    def __init__(self, balance):
        self.balance = balance

store = snaptree.open(sys.argv[1])
store.run(lambda root: root.__setitem__("account", Account(3)))
exporter = snaptree.Exporter(store, sys.argv[2], every=3600)
try:
    exporter.export_now()
except snaptree.Error as exc:
    print(type(exc).__name__, exc)
finally:
    exporter.stop()
    store.close()
"""


@pytest.mark.slow
def test_a_class_the_exporter_process_cannot_import_is_one_clear_line(tmp_path):
    """Classes defined in the application's __main__ are broken objects in the exporter."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", MAIN_CLASS, str(tmp_path / "Data.fs"), str(dumps)],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("ExportError "), done.stdout
    assert "__main__.Account" in done.stdout
    assert "Traceback" not in done.stderr
    assert complete_dumps(dumps, "pickle") == []


def test_an_exporter_process_killed_mid_export_is_one_line_and_the_next_run_works(tmp_path, gate):
    store = snaptree.open(str(tmp_path / "Data.fs"))
    exporter = snaptree.Exporter(store, tmp_path, every=3600)
    failure: list[BaseException] = []

    def export() -> None:
        try:
            exporter.export_now()
        except snaptree.Error as exc:
            failure.append(exc)

    try:
        store.run(lambda root: root.__setitem__("trap", Trap("wait")))
        thread = threading.Thread(target=export, daemon=True)
        thread.start()
        os.kill(gate.wait_entered(WAIT), signal.SIGKILL)
        thread.join(WAIT)
        assert not thread.is_alive()
        [error] = failure
        assert isinstance(error, snaptree.ExportError)
        assert str(error) == (
            "the export process was killed by SIGKILL in the middle of an export; "
            "nothing was written under a final name"
        )
        store.run(lambda root: setattr(root["trap"], "mode", None))
        assert exporter.export_now().info is not None  # a new exporter process
    finally:
        exporter.stop(timeout=WAIT)
        store.close()


def test_an_exporter_process_that_cannot_open_the_store_is_one_line(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    store = snaptree.open("memory://")
    uri = f"postgresql://app:s3cret@127.0.0.1:{closed_port}/app"
    exporter = snaptree.Exporter(store, tmp_path, every=3600, uri=uri, process=True)
    try:
        with pytest.raises(snaptree.Error) as caught:
            exporter.export_now()
    finally:
        exporter.stop(timeout=WAIT)
        store.close()
    message = str(caught.value)
    assert "\n" not in message and "s3cret" not in message
    assert f"127.0.0.1:{closed_port}" in message
