"""A full disk and an unwritable export directory: a clear error, earlier dumps intact, writers on.

Two ways to fill the disk, each test runs with both:

``tmpfs``
    A real 1 MiB tmpfs is mounted for the dumps (needs root and the mount
    syscall; skipped with the reason otherwise) and filled up with a filler
    file, so the kernel itself refuses the write.
``simulated``
    ENOSPC is *simulated* at the lowest-level write the export makes: the
    unbuffered ``io.FileIO.write`` under the buffered file that
    ``snaptree._atomic`` opens with ``os.fdopen``. It behaves as write(2)
    does on a disk that fills up: a short write of what still fits, then
    ENOSPC. This runs everywhere, and it lets the test hold the failing
    write until the writer thread has committed, to show that writers go on
    *during* a failing export.

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
import io
import os
import re
import subprocess
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import snaptree
from snaptree import _atomic, schedule
from snaptree.cli import main
from snaptree.errors import ExportError

ROOT = Path(__file__).resolve().parents[1]
SNAPTREE = ROOT / ".venv" / "bin" / "snaptree"
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


def _cli_subprocess(args: list[str]) -> tuple[int, str]:
    proc = subprocess.run([str(SNAPTREE), *args], capture_output=True, text=True, timeout=WAIT)
    return proc.returncode, proc.stderr


def _cli_in_process(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.stderr + (
        "Traceback\n" if result.exception and not isinstance(result.exception, SystemExit) else ""
    )


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
    """ENOSPC simulated at ``io.FileIO.write`` under the files ``snaptree._atomic`` opens.

    Only ``_atomic``'s view of ``os`` is replaced (its ``fdopen``), so the
    FileStorage the writer commits to is untouched. The first refused write
    waits until the writer has committed a few more transfers, which shows
    that writers go on while an export is failing.
    """

    name = "simulated"
    in_child_processes = False  # the patch lives in this process only

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.directory = directory
        self.budget: int | None = None  # bytes that still fit; None: not full
        self.refused = 0
        self.writer: Writer | None = None
        disk = self

        class FillingFile(io.FileIO):
            def write(self, data: Any) -> int:
                view = memoryview(data).cast("B")
                if disk.budget is None:
                    return super().write(view)
                if disk.budget == 0:
                    disk.refused += 1
                    if disk.refused == 1 and disk.writer is not None:
                        disk.writer.wait_for_more(disk.writer.committed, 3)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written = super().write(view[: disk.budget])  # a short write, as write(2) does
                disk.budget -= written
                return written

        def fdopen(fd: int, mode: str = "r", buffering: int = -1, **kwargs: Any) -> Any:
            assert mode == "wb", mode
            return io.BufferedWriter(FillingFile(fd, "wb"), max(buffering, io.DEFAULT_BUFFER_SIZE))

        patched_os = types.ModuleType("os")
        patched_os.__dict__.update(os.__dict__)
        patched_os.fdopen = fdopen  # type: ignore[attr-defined]
        monkeypatch.setattr(_atomic, "os", patched_os)

    def fill(self, writer: Writer) -> None:
        self.writer = writer
        self.refused = 0
        self.budget = SLACK

    def free(self) -> None:
        self.budget = None

    def cli(self, args: list[str]) -> tuple[int, str]:
        return _cli_in_process(args)


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
    run = schedule.export_into(store, scheduled, format="pickle")
    before, before_scheduled = _listing(out), _listing(scheduled)

    full_disk.fill(writer)
    _commit_after_the_earlier_dumps(store)
    before = _listing(out)
    committed = writer.committed
    with pytest.raises((ExportError, OSError)) as failed:
        store.export(out / "dump.pickle")
    assert _is_enospc(failed.value), repr(failed.value)
    with pytest.raises((ExportError, OSError)) as failed:
        schedule.export_into(store, scheduled, format="pickle")
    assert _is_enospc(failed.value), repr(failed.value)
    if full_disk.name == "simulated":
        assert full_disk.refused >= 2  # both failed at the write call, not earlier

    assert _listing(out) == before and _listing(scheduled) == before_scheduled
    assert _temporaries(out) == [] and _temporaries(scheduled) == []
    assert snaptree.verify(first.path).sha256 == first.sha256
    assert snaptree.verify(schedule.latest_link(scheduled, "pickle")).tid == run.info.tid
    writer.wait_for_more(committed)  # commits went on during and after the failures

    full_disk.free()
    again = schedule.export_into(store, scheduled, format="pickle")
    assert again.info is not None and again.info.tid > run.info.tid
    assert snaptree.verify(schedule.latest_link(scheduled, "pickle")).tid == again.info.tid
    assert snaptree.verify(run.info.path).sha256 == run.info.sha256


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
    schedule.export_into(store, scheduled)
    full_disk.fill(writer)
    _commit_after_the_earlier_dumps(store)

    with pytest.raises(ExportError, match=ENOSPC_MESSAGE):
        store.export(out / "dump.pickle")
    with pytest.raises(ExportError, match=ENOSPC_MESSAGE):
        schedule.export_into(store, scheduled)
    code, stderr = full_disk.cli(["export", "--db", str(db), "--dir", str(scheduled)])
    assert code == 1
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


def test_read_only_filesystem_is_a_clear_error_and_changes_nothing(
    tmp_path: Path, db: Path, store: snaptree.Store, writer: Writer
) -> None:
    """A tmpfs remounted read-only (EROFS stops root too); remounted read-write, exports resume."""
    with mounted_tmpfs(tmp_path / "ro", "8m") as out:
        first = store.export(out / "dump.pickle")
        run = schedule.export_into(store, out, format="json")
        before = _listing(out)
        remounted = _run("mount", "-o", "remount,ro", str(out))
        _commit_after_the_earlier_dumps(store)
        assert remounted.returncode == 0, remounted.stderr
        try:
            committed = writer.committed
            with pytest.raises(ExportError, match=EROFS_MESSAGE):
                store.export(out / "dump.pickle")
            with pytest.raises(ExportError, match=EROFS_MESSAGE):
                schedule.export_into(store, out, format="json")
            code, stderr = _cli_subprocess(["export", "--db", str(db), "-o", str(out / "x.json")])
            assert code == 1 and "Read-only file system (EROFS)" in _one_line(stderr)
            exporter = snaptree.Exporter(store, out, every=3600, format="json")
            try:
                assert not exporter.in_process  # the error crosses the process boundary
                with pytest.raises(ExportError, match=EROFS_MESSAGE):
                    exporter.export_now()
            finally:
                exporter.stop(timeout=WAIT)
            assert _listing(out) == before
            assert snaptree.verify(first.path).sha256 == first.sha256
            assert snaptree.verify(schedule.latest_link(out, "json")).tid == run.info.tid
            writer.wait_for_more(committed)
        finally:
            _run("mount", "-o", "remount,rw", str(out))
        again = schedule.export_into(store, out, format="json")
        assert again.info is not None and again.info.tid > run.info.tid
        assert _temporaries(out) == []


def test_export_directory_that_is_a_regular_file_fails_and_changes_nothing(
    tmp_path: Path, db: Path, store: snaptree.Store, writer: Writer
) -> None:
    """Needs no privileges: nothing can be created under a regular file (ENOTDIR), even by root."""
    not_a_dir = tmp_path / "dumps"
    not_a_dir.write_text("a file, not a directory\n")
    committed = writer.committed
    with pytest.raises(ExportError, match=r"cannot write .*dumps/dump\.pickle: .*dumps is a file"):
        store.export(not_a_dir / "dump.pickle")
    with pytest.raises(ExportError, match=r"cannot export into .*dumps: it is a file"):
        schedule.export_into(store, not_a_dir)
    code, stderr = _cli_subprocess(["export", "--db", str(db), "-o", str(not_a_dir / "x.pickle")])
    assert code == 1 and "cannot write" in _one_line(stderr)
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
            schedule.export_into(store, out)
    finally:
        out.chmod(0o755)
    assert snaptree.verify(first.path).sha256 == first.sha256
    assert _temporaries(out) == []
    writer.wait_for_more(writer.committed)
