"""A full disk and an unwritable export directory: a clear error, earlier dumps intact, writers on.

Two ways to fill the disk, each test runs with both:

``tmpfs``
    A real 1 MiB tmpfs is mounted for the dumps (needs root and the mount
    syscall; skipped with the reason otherwise) and filled up with a filler
    file, so the kernel itself refuses the write.
``simulated``
    ENOSPC is *simulated* at the lowest-level write the export makes (see
    ``tests/_full_disk.py``), in the test's process and in the commands it
    starts. It behaves as write(2) does on a disk that fills up: a short
    write of what still fits, then ENOSPC. This runs everywhere, and it lets
    the test hold the failing write until the writer thread has committed,
    to show that writers go on *during* a failing export.

An unwritable directory, for a test process running as root (which
permissions do not stop): a tmpfs remounted read-only (EROFS; needs root
and mount), and, with no privileges at all, a "directory" that is a regular
file (ENOTDIR). ``chmod 0o500`` is tested too, when not running as root.

Throughout, a writer thread keeps committing transfers to a FileStorage on
the real disk, and must go on committing during and after every failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import snaptree
from _cli import snaptree as run_snaptree
from _full_disk import FullDisk, command_env
from snaptree import _atomic
from snaptree.dump_directory import latest_link
from snaptree.errors import ExportError
from snaptree.export_run import export_into

ACCOUNTS = 1_500
INITIAL = 100
WAIT = 60.0
#: Bytes left free when the disk is "full": far less than one dump (about 150 KB).
SLACK = 32 * 1024

ENOSPC_MESSAGE = (
    r"cannot write .*: No space left on device \(ENOSPC\); free some space and run the export again"
)
EROFS_MESSAGE = (
    r"cannot write .*: Read-only file system \(EROFS\); the file system is read-only; "
    "choose another directory"
)


# -- the writer that must not notice -------------------------------------------------------


def _setup(root: Any) -> None:
    root["accounts"] = {
        f"a{i:04d}": {"balance": INITIAL, "owner": "o" * 60} for i in range(ACCOUNTS)
    }


def _transfer(root: Any, src: str, dst: str) -> None:
    accounts = root["accounts"]
    accounts[src]["balance"] -= 1
    accounts[dst]["balance"] += 1


class Writer:
    """A thread that keeps committing transfers and counts the acknowledged ones."""

    def __init__(self, store: snaptree.Store) -> None:
        self.store = store
        self.committed = 0
        self.error: BaseException | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                self.store.run(_transfer, f"a{n % ACCOUNTS:04d}", f"a{(n * 7 + 1) % ACCOUNTS:04d}")
                n += 1
                with self._changed:
                    self.committed = n
                    self._changed.notify_all()
        except BaseException as exc:
            self.error = exc
            with self._changed:
                self._changed.notify_all()

    def start(self) -> Writer:
        self._thread.start()
        return self

    def wait_for_more(self, than: int, more: int = 20) -> None:
        """Block until *more* commits after the count *than* were acknowledged (or fail)."""
        with self._changed:
            ok = self._changed.wait_for(
                lambda: self.error is not None or self.committed >= than + more, WAIT
            )
        assert self.error is None, f"the writer failed: {self.error!r}"
        assert ok, f"the writer made {self.committed - than} of {more} commits in {WAIT:g} s"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the writer did not stop"
        assert self.error is None, f"the writer failed: {self.error!r}"


def _commit_after_the_earlier_dumps(store: snaptree.Store) -> None:
    """One commit from the test itself, so no scheduled run can skip as "nothing changed"."""
    store.run(_transfer, "a0000", "a0001")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "Data.fs"


@pytest.fixture
def store(db: Path) -> Iterator[snaptree.Store]:
    s = snaptree.open(str(db), retry=snaptree.RetryPolicy(attempts=1000))
    try:
        s.run(_setup)
        yield s
    finally:
        s.close()


@pytest.fixture
def writer(store: snaptree.Store) -> Iterator[Writer]:
    w = Writer(store).start()
    try:
        w.wait_for_more(0, 1)
        yield w
    finally:
        w.stop()
    with store.snapshot() as snap:
        total = sum(a["balance"] for a in snap.root["accounts"].values())
    assert total == ACCOUNTS * INITIAL


# -- file systems ----------------------------------------------------------------------------


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=WAIT)


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A fresh tmpfs of *size* at *where*, unmounted afterwards; skips the test if impossible."""
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; this variant is skipped")
    try:
        mounted = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where))
    except FileNotFoundError:
        pytest.skip("no mount command here; this variant is skipped")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); variant skipped")
    try:
        yield where
    finally:
        if _run("umount", str(where)).returncode != 0:
            _run("umount", "-l", str(where))


def _listing(directory: Path) -> dict[str, bytes]:
    """Every entry and its content (or link target): what a failed export must leave alone."""
    entries = {}
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink():
            entries[entry.name] = os.readlink(entry).encode()
        elif entry.is_file():
            entries[entry.name] = entry.read_bytes()
    return entries


def _temporaries(directory: Path) -> list[str]:
    """snaptree's temporary files (``.<name>.<pid>.<random>.tmp``) in *directory*."""
    return [
        e.name for e in directory.iterdir() if e.name.startswith(".") and e.name.endswith(".tmp")
    ]


def _cli_subprocess(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = run_snaptree(*args, env=env, timeout=WAIT)
    return proc.returncode, proc.stderr


class SmallFilesystem:
    """A real 1 MiB tmpfs, filled up with a filler file on request."""

    name = "tmpfs"
    in_child_processes = True  # an exporter process sees the same full disk

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.filler = directory / "filler.bin"

    def fill(self, writer: Writer) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            block = b"\0" * 4096
            while True:
                try:
                    if os.write(fd, block) < len(block):
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
            size = os.fstat(fd).st_size
            os.ftruncate(fd, max(0, size - SLACK))
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()

    def cli(self, args: list[str]) -> tuple[int, str]:
        return _cli_subprocess(args)


class SimulatedFullDisk:
    """ENOSPC simulated under the files ``snaptree._atomic`` writes (``tests/_full_disk.py``).

    The first refused write in this process waits until the writer has
    committed a few more transfers, which shows that writers go on while an
    export is failing. A command started by :meth:`cli` meets a disk full
    the same way.
    """

    name = "simulated"
    in_child_processes = False  # an exporter process started by the test writes for real

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.directory = directory
        self.disk = FullDisk()
        monkeypatch.setattr(_atomic, "os", self.disk.patched_os())

    @property
    def refused(self) -> int:
        return self.disk.refused

    def fill(self, writer: Writer) -> None:
        self.disk.refused = 0
        self.disk.budget = SLACK
        self.disk.on_first_refusal = lambda: writer.wait_for_more(writer.committed, 3)

    def free(self) -> None:
        self.disk.budget = None

    def cli(self, args: list[str]) -> tuple[int, str]:
        full = self.disk.budget is not None
        return _cli_subprocess(args, env=command_env(SLACK) if full else None)


@pytest.fixture(params=["tmpfs", "simulated"])
def full_disk(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    if request.param == "tmpfs":
        with mounted_tmpfs(tmp_path / "small", "1m") as directory:
            yield SmallFilesystem(directory)
    else:
        directory = tmp_path / "dumps"
        directory.mkdir()
        yield SimulatedFullDisk(directory, monkeypatch)


def _is_enospc(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING) [\w.]+: ")


def _one_line(stderr: str) -> str:
    """The one error line on stderr; anything else there may only be log records."""
    assert "Traceback" not in stderr, f"a traceback instead of one line:\n{stderr}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not LOG_LINE.match(line)]
    assert len(errors) == 1, f"expected one error line on stderr, got:\n{stderr}"
    assert errors[0].startswith("snaptree: error: "), errors[0]
    return errors[0]


# -- disk full -------------------------------------------------------------------------------


def test_full_disk_leaves_earlier_dumps_no_temporary_and_writers_unaffected(
    full_disk: Any, store: snaptree.Store, writer: Writer
) -> None:
    """The export fails on ENOSPC; what was there is untouched, nothing is left, writers go on.

    This test only requires the failure to be ENOSPC, whatever its type; that it
    is one clear ExportError is the next test's business.
    """
    out = full_disk.directory
    scheduled = out / "scheduled"
    scheduled.mkdir()
    first = store.export(out / "dump.pickle")
    run = export_into(store, scheduled, format="pickle")
    before, before_scheduled = _listing(out), _listing(scheduled)

    full_disk.fill(writer)
    _commit_after_the_earlier_dumps(store)
    before = _listing(out)
    committed = writer.committed
    with pytest.raises((ExportError, OSError)) as failed:
        store.export(out / "dump.pickle")
    assert _is_enospc(failed.value), repr(failed.value)
    with pytest.raises((ExportError, OSError)) as failed:
        export_into(store, scheduled, format="pickle")
    assert _is_enospc(failed.value), repr(failed.value)
    if full_disk.name == "simulated":
        assert full_disk.refused >= 2  # both failed at the write call, not earlier

    assert _listing(out) == before and _listing(scheduled) == before_scheduled
    assert _temporaries(out) == [] and _temporaries(scheduled) == []
    assert snaptree.verify(first.path).sha256 == first.sha256
    assert snaptree.verify(latest_link(scheduled, "pickle")).tid == run.info.tid
    writer.wait_for_more(committed)  # commits went on during and after the failures

    full_disk.free()
    again = export_into(store, scheduled, format="pickle")
    assert again.info is not None and again.info.tid > run.info.tid
    assert snaptree.verify(latest_link(scheduled, "pickle")).tid == again.info.tid
    assert snaptree.verify(run.info.path).sha256 == run.info.sha256


@pytest.mark.slow
def test_full_disk_is_one_clear_error_naming_the_file_and_what_to_do(
    full_disk: Any, db: Path, store: snaptree.Store, writer: Writer
) -> None:
    """ExportError with the errno and a hint, from the library, the CLI and an exporter process.

    (Found by this test: a short write followed by ENOSPC used to surface as a
    raw OSError from the buffered file's close(), and the CLI printed a traceback.)
    """
    out = full_disk.directory
    scheduled = out / "scheduled"
    scheduled.mkdir()
    store.export(out / "dump.pickle")
    export_into(store, scheduled)
    full_disk.fill(writer)
    _commit_after_the_earlier_dumps(store)

    with pytest.raises(ExportError, match=ENOSPC_MESSAGE):
        store.export(out / "dump.pickle")
    with pytest.raises(ExportError, match=ENOSPC_MESSAGE):
        export_into(store, scheduled)
    code, stderr = full_disk.cli(["export", "--db", str(db), "--dir", str(scheduled)])
    assert code == 5  # the export failed
    assert _one_line(stderr).startswith("snaptree: error: cannot write ")
    assert "No space left on device (ENOSPC)" in stderr
    if full_disk.in_child_processes:
        exporter = snaptree.Exporter(store, scheduled, every=3600)
        try:
            assert not exporter.in_process
            with pytest.raises(ExportError, match=ENOSPC_MESSAGE):
                exporter.export_now()
        finally:
            exporter.stop(timeout=WAIT)
    assert _temporaries(out) == [] and _temporaries(scheduled) == []


# -- an unwritable directory -----------------------------------------------------------------


@pytest.mark.slow
def test_read_only_filesystem_is_a_clear_error_and_changes_nothing(
    tmp_path: Path, db: Path, store: snaptree.Store, writer: Writer
) -> None:
    """A tmpfs remounted read-only (EROFS stops root too); remounted read-write, exports resume."""
    with mounted_tmpfs(tmp_path / "ro", "8m") as out:
        first = store.export(out / "dump.pickle")
        run = export_into(store, out, format="json")
        before = _listing(out)
        remounted = _run("mount", "-o", "remount,ro", str(out))
        _commit_after_the_earlier_dumps(store)
        assert remounted.returncode == 0, remounted.stderr
        try:
            committed = writer.committed
            with pytest.raises(ExportError, match=EROFS_MESSAGE):
                store.export(out / "dump.pickle")
            with pytest.raises(ExportError, match=EROFS_MESSAGE):
                export_into(store, out, format="json")
            code, stderr = _cli_subprocess(["export", "--db", str(db), "-o", str(out / "x.json")])
            assert code == 5 and "Read-only file system (EROFS)" in _one_line(stderr)
            exporter = snaptree.Exporter(store, out, every=3600, format="json")
            try:
                assert not exporter.in_process  # the error crosses the process boundary
                with pytest.raises(ExportError, match=EROFS_MESSAGE):
                    exporter.export_now()
            finally:
                exporter.stop(timeout=WAIT)
            assert _listing(out) == before
            assert snaptree.verify(first.path).sha256 == first.sha256
            assert snaptree.verify(latest_link(out, "json")).tid == run.info.tid
            writer.wait_for_more(committed)
        finally:
            _run("mount", "-o", "remount,rw", str(out))
        again = export_into(store, out, format="json")
        assert again.info is not None and again.info.tid > run.info.tid
        assert _temporaries(out) == []


@pytest.mark.slow
def test_export_directory_that_is_a_regular_file_fails_and_changes_nothing(
    tmp_path: Path, db: Path, store: snaptree.Store, writer: Writer
) -> None:
    """Needs no privileges: nothing can be created under a regular file (ENOTDIR), even by root."""
    not_a_dir = tmp_path / "dumps"
    not_a_dir.write_text("a file, not a directory\n")
    committed = writer.committed
    with pytest.raises(ExportError, match=r"cannot write .*dumps/dump\.pickle: .*dumps is a file"):
        store.export(not_a_dir / "dump.pickle")
    with pytest.raises(ExportError, match=r"cannot export pickle dumps: .*dumps is a file"):
        export_into(store, not_a_dir)
    code, stderr = _cli_subprocess(["export", "--db", str(db), "-o", str(not_a_dir / "x.pickle")])
    assert code == 5 and "cannot write" in _one_line(stderr)
    code, stderr = _cli_subprocess(["export", "--db", str(db), "--dir", str(not_a_dir)])
    assert code == 2 and "Traceback" not in stderr  # click's usage error
    assert f"Invalid value for '--dir': Directory '{not_a_dir}' is a file." in stderr
    assert not_a_dir.read_text() == "a file, not a directory\n"
    assert _temporaries(tmp_path) == []
    writer.wait_for_more(committed)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_directory_without_write_permission_is_a_clear_error(
    tmp_path: Path, store: snaptree.Store, writer: Writer
) -> None:
    out = tmp_path / "locked"
    out.mkdir()
    first = store.export(out / "dump.pickle")
    out.chmod(0o500)
    try:
        with pytest.raises(ExportError, match=r"Permission denied \(EACCES\).*writable"):
            store.export(out / "dump.pickle")
        with pytest.raises(ExportError, match=r"Permission denied \(EACCES\).*writable"):
            export_into(store, out)
    finally:
        out.chmod(0o755)
    assert snaptree.verify(first.path).sha256 == first.sha256
    assert _temporaries(out) == []
    writer.wait_for_more(writer.committed)
