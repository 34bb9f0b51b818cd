"""One writer per format in a schedule directory, and no past state in it.

Two schedules on one directory used to undo each other (retention removed
the manifest the other had just renamed, leaving dumps no run would ever
delete; ``latest`` pointed at deleted dumps), and ``--dir --at OLD`` turned
``latest`` back. Each test forces its interleaving with a gate (see
``_trap``) or with the holder's own output, never with a sleep.
"""

from __future__ import annotations

import datetime
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import snaptree
from _cli import error_line
from _cli import snaptree as run_snaptree
from _cli import start as start_snaptree
from _trap import GATE_VARIABLE, Gate, Trap
from snaptree._directory_lock import lock_path
from snaptree.dump_directory import complete_dumps, latest_link, lock_directory
from snaptree.export_run import export_into

WAIT = 60.0
TESTS = Path(__file__).resolve().parent


def _bump(store: snaptree.Store, value: Any) -> None:
    store.run(lambda root: root.__setitem__("v", value))


@pytest.fixture
def gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """A gate for Trap("wait"), seen by this process and by the exporter processes it starts."""
    directory = tmp_path / "gate"
    directory.mkdir()
    opened = Gate(directory)
    monkeypatch.setenv(GATE_VARIABLE, str(directory))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    )
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    path = tmp_path / "Data.fs"
    store = snaptree.open(str(path))
    _bump(store, 42)
    store.close()
    return path


def _read_line(stream: Any, timeout: float = WAIT) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no output in time"
    return stream.readline()


def _read_to_end(stream: Any, timeout: float = WAIT) -> bytes:
    """Everything until every writer of *stream* has closed it (or exited)."""
    data = b""
    while True:
        ready, _, _ = select.select([stream], [], [], timeout)
        assert ready, "the writers of the pipe are still alive"
        chunk = os.read(stream.fileno(), 1 << 16)
        if not chunk:
            return data
        data += chunk


# -- a second writer is refused at once -----------------------------------------------


@pytest.mark.slow
def test_a_second_schedule_on_a_directory_is_refused_at_once_naming_its_holder(store, tmp_path):
    """While one Exporter runs, another Exporter, its export_now and a one-off run are refused."""
    _bump(store, 1)
    first = snaptree.Exporter(store, tmp_path, every=3600)
    second = snaptree.Exporter(store, tmp_path, every=3600)
    first.start()
    try:
        refused = [second.start, second.export_now, lambda: export_into(store, tmp_path)]
        for attempt in refused:
            with pytest.raises(snaptree.ExportError) as caught:
                attempt()
            message = str(caught.value)
            assert "\n" not in message
            assert f".snaptree-export-pickle.lock is held by pid {os.getpid()} " in message
            assert f"on host {socket.gethostname()} since " in message
            assert "(command: " in message and "stop that schedule" in message
    finally:
        first.stop(timeout=WAIT)
    second.start()  # the first has let go
    second.stop(timeout=WAIT)
    assert len(complete_dumps(tmp_path, "pickle")) == 1
    assert lock_path(tmp_path, "pickle").read_text() == ""  # released cleanly


@pytest.mark.slow
def test_schedules_of_different_formats_may_share_a_directory(store, tmp_path):
    """Each format has its own names, latest, retention and lock."""
    _bump(store, 1)
    exporters = [snaptree.Exporter(store, tmp_path, format=f) for f in ("pickle", "json")]
    try:
        for exporter in exporters:
            assert exporter.export_now().info is not None  # and holds its lock until stop()
        for fmt in ("pickle", "json"):
            assert json.loads(lock_path(tmp_path, fmt).read_text())["pid"] == os.getpid()
            assert len(complete_dumps(tmp_path, fmt)) == 1
    finally:
        for exporter in exporters:
            exporter.stop(timeout=WAIT)


def test_a_one_off_run_holds_the_directory_for_its_whole_run(tmp_path, gate):
    """An export_into stopped half-way (at the gate) still keeps a schedule out of its directory."""
    store = snaptree.open("memory://")
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    store.run(lambda root: root.__setitem__("trap", Trap("wait")))
    outcome: dict[str, Any] = {}

    def one_off() -> None:
        outcome["result"] = export_into(store, dumps)

    thread = threading.Thread(target=one_off, daemon=True)
    thread.start()
    exporter = snaptree.Exporter(store, dumps, every=3600)
    try:
        assert gate.wait_entered(WAIT) == os.getpid()
        with pytest.raises(snaptree.ExportError, match=f"is held by pid {os.getpid()} "):
            exporter.start()
        with pytest.raises(snaptree.ExportError, match="is held by pid"):
            export_into(store, dumps)
    finally:
        gate.release()
        thread.join(WAIT)
    assert not thread.is_alive()
    assert outcome["result"].info is not None
    store.run(lambda root: setattr(root["trap"], "mode", None))
    exporter.start()
    exporter.stop(timeout=WAIT)
    assert [p.name for p in complete_dumps(dumps, "pickle")][-1:] == [
        os.readlink(latest_link(dumps, "pickle"))
    ]
    store.close()


APPLICATION = """
import sys
import snaptree
from _trap import Trap

store = snaptree.open(sys.argv[1])
store.run(lambda root: root.__setitem__("trap", Trap("wait")))
snaptree.Exporter(store, sys.argv[2], every=3600).export_now()
"""


def test_the_exporter_process_keeps_the_directory_locked_until_its_export_ends(tmp_path, gate):
    """The application dies mid-export: no one else writes there until its exporter is done.

    The exporter process holds the application's lock through the descriptor
    it inherited, so a schedule started after the crash cannot race the
    export that is still finishing.
    """
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    application = subprocess.Popen(
        [sys.executable, "-c", APPLICATION, str(tmp_path / "Data.fs"), str(dumps)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,  # the exporter process inherits it: EOF once both are gone
    )
    exporter_pid = None
    try:
        exporter_pid = gate.wait_entered(WAIT)
        assert exporter_pid != application.pid
        application.kill()
        application.wait(WAIT)
        with pytest.raises(snaptree.ExportError, match=f"is held by pid {application.pid} "):
            lock_directory(dumps, "pickle")
        gate.release()
        _read_to_end(application.stderr)  # the exporter finished its export and exited
    finally:
        if application.poll() is None:
            application.kill()
            application.wait(WAIT)
        application.stderr.close()
        if exporter_pid is not None:
            try:
                os.kill(exporter_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    with lock_directory(dumps, "pickle"):
        [dump] = complete_dumps(dumps, "pickle")
        assert os.readlink(latest_link(dumps, "pickle")) == dump.name
        assert snaptree.verify(dump).objects >= 1


@pytest.mark.slow
def test_two_commands_on_one_directory_and_a_killed_holder(db_file, tmp_path):
    """A second command is refused with the first's pid and command; once that is killed, not."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    holder = start_snaptree(
        "export", "--db", db_file, "--dir", dumps, "--every", "3600", "--json",
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert json.loads(_read_line(holder.stdout))["written"]  # it holds the directory
        refused = run_snaptree("export", "--db", db_file, "--dir", dumps)
        assert refused.returncode == 5  # the export failed
        assert refused.stderr.count("\n") == 1 and error_line(refused).startswith(
            f"snaptree: error: cannot export pickle dumps in {dumps}: "
            f".snaptree-export-pickle.lock is held by pid {holder.pid} "
        )
        assert "--every 3600" in refused.stderr  # its command
        other_format = run_snaptree("export", "--db", db_file, "--dir", dumps, "--format", "json")
        assert other_format.returncode == 0, other_format.stderr
    finally:
        holder.kill()
        holder.wait(WAIT)
        holder.stdout.close()
    after = run_snaptree("export", "--db", db_file, "--dir", dumps)
    assert after.returncode == 0, after.stderr
    assert "nothing committed since the last export" in after.stderr
    assert lock_path(dumps, "pickle").read_text() == ""


def test_the_lock_file_names_its_holder_and_is_emptied_on_release(tmp_path):
    with lock_directory(tmp_path, "json") as lock:
        holder = json.loads(lock.path.read_text())
        assert lock.path == tmp_path / ".snaptree-export-json.lock"
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert datetime.datetime.fromisoformat(holder["since"]).tzinfo is not None
        assert holder["command"]
    assert lock.path.read_text() == ""


@pytest.mark.slow
def test_the_lock_file_never_holds_a_password(tmp_path):
    """The command line is recorded with the URI's password masked."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)
    port = listener.getsockname()[1]
    uri = f"postgresql://app:s3cret-pw@127.0.0.1:{port}/app"
    command = start_snaptree(
        "export",
        "--db",
        uri,
        "--dir",
        tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        connection, _ = listener.accept()  # it opens the store after taking the lock
        content = lock_path(tmp_path, "pickle").read_text()
        connection.close()
    finally:
        command.kill()
        command.wait(WAIT)
        listener.close()
    assert "s3cret-pw" not in content
    assert "postgresql://app:***@127.0.0.1" in json.loads(content)["command"]


def test_a_missing_or_unwritable_place_is_one_clear_error(tmp_path):
    with pytest.raises(
        snaptree.ExportError,
        match=r"^cannot export pickle dumps: directory .*/none does not exist; create it first$",
    ):
        lock_directory(tmp_path / "none", "pickle")
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        snaptree.ExportError,
        match=r"^cannot export pickle dumps: .*/file is a file, not a directory$",
    ):
        lock_directory(tmp_path / "file", "pickle")


# -- a past state never goes into a schedule directory ------------------------------------


@pytest.mark.slow
def test_a_past_state_is_refused_in_a_schedule_directory(db_file, tmp_path):
    """--dir with --at would make latest serve old data; it is refused, nothing is written."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    store = snaptree.open(str(db_file))
    try:
        old = store.last_tid()
        _bump(store, 43)
        with pytest.raises(snaptree.ArgumentError, match="export it to a file of its own"):
            export_into(store, dumps, at=old)
    finally:
        store.close()
    assert list(dumps.iterdir()) == []
    result = run_snaptree("export", "--db", db_file, "--dir", dumps, "--at", old)
    assert result.returncode == 2
    assert "write it with -o FILE" in result.stderr
    assert list(dumps.iterdir()) == []
    past = run_snaptree("export", "--db", db_file, "-o", tmp_path / "old.pickle", "--at", old)
    assert past.returncode == 0, past.stderr


def test_latest_is_moved_back_to_the_newest_dump_even_when_nothing_is_new(store, tmp_path):
    """A directory where latest was turned back (by an older snaptree's --at) is repaired."""
    _bump(store, 1)
    first = export_into(store, tmp_path)
    _bump(store, 2)
    second = export_into(store, tmp_path)
    link = latest_link(tmp_path, "pickle")
    os.symlink(first.info.path.name, tmp_path / "back")
    os.replace(tmp_path / "back", link)
    again = export_into(store, tmp_path, keep=1)
    assert again.skipped
    assert os.readlink(link) == second.info.path.name
    _bump(store, 3)
    third = export_into(store, tmp_path, keep=1)
    assert complete_dumps(tmp_path, "pickle") == [third.info.path]


def test_dumps_without_a_manifest_are_reported_and_kept(store, tmp_path, caplog):
    """They cannot be verified nor told from a file put there on purpose: named, not deleted."""
    stray = tmp_path / "snaptree-20000101T000000.000000Z-0000000000000001.pickle"
    stray.write_bytes(b"no manifest")
    _bump(store, 1)
    with caplog.at_level("WARNING", logger="snaptree.dump_directory"):
        export_into(store, tmp_path, keep=1)
    assert stray.exists()
    [warning] = [r.getMessage() for r in caplog.records]
    assert stray.name in warning and "without a manifest" in warning
