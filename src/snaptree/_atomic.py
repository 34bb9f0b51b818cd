"""Writing files so that a reader sees the old complete file or the new complete file, never a part.

The recipe is the classic one: write a temporary file in the *same*
directory (a rename across file systems is a copy, not atomic), flush it,
fsync it, rename it over the final name, then fsync the directory so the
rename itself survives a power cut. Any failure before the rename removes
the temporary file and leaves whatever was under the final name untouched.

Temporary names start with ``.`` and end with ``.tmp``, and carry the
writer's pid, so a directory sweep can tell a stale leftover of a killed
writer (see :func:`remove_stale_temporaries`) from one still being written.
They are made here and nowhere else (:func:`temporary_path`): files and
symlinks (:func:`replace_symlink`) alike.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import ExportError

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


class HashingWriter:
    """A binary file wrapper that counts and hashes what passes through it."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self.bytes = 0
        #: Seconds the final fsync took: what making the file durable cost the disk.
        self.flush_seconds = 0.0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)
        self.bytes += len(data)
        return self._file.write(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def describe_os_error(exc: OSError, path: Path | str) -> str:
    """One line that says what went wrong with *path* and what to do about it."""
    code = errno.errorcode.get(exc.errno or 0, "")
    hint = {
        errno.ENOSPC: "free some space and run the export again",
        errno.EDQUOT: "free some space (disk quota) and run the export again",
        errno.EACCES: "make the directory writable for this user, or choose another one",
        errno.EPERM: "make the directory writable for this user, or choose another one",
        errno.EROFS: "the file system is read-only; choose another directory",
        errno.ENOENT: "create the directory first, or choose another one",
    }.get(exc.errno or 0, "check the directory and run the export again")
    what = exc.strerror or str(exc)
    return f"cannot write {path}: {what}{f' ({code})' if code else ''}; {hint}"


def temporary_path(final: Path) -> Path:
    """A fresh temporary name beside *final*: ``.<name>.<pid>.<random>.tmp``."""
    return final.with_name(f".{final.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def existing_directory(directory: str | os.PathLike[str], doing: str) -> Path:
    """*directory* as an absolute path; ExportError starting with *doing* if it is not one.

    The one check of where an export goes, so that a missing directory and a
    file in its place read the same whichever export meets them.
    """
    folder = Path(os.path.abspath(directory))
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ExportError(f"{doing}: {folder} is a file, not a directory")
    raise ExportError(f"{doing}: directory {folder} does not exist; create it first")


def fsync_path(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Fsync a file, or a directory (which makes the renames inside it durable), by name."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make a rename inside *directory* durable."""
    fsync_path(directory, directory=True)


@contextmanager
def staged_file(final: Path, *, mode: int = 0o600) -> Iterator[tuple[HashingWriter, Path]]:
    """Yield a hashing writer on a fresh temporary file beside *final*, then flush and fsync it.

    The file is created with permission bits *mode* (less whatever the
    umask removes), so it is never readable by more users than *mode*
    allows, not even for the moment between its creation and a chmod; the
    rename keeps them. The default is the owner alone.

    The file is *not* renamed here: the caller commits it with :func:`commit`
    once everything it depends on is ready (the dump waits for its manifest),
    or the temporary is removed on any exception, including KeyboardInterrupt.
    """
    temp = temporary_path(final)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise ExportError(describe_os_error(exc, final)) from exc
    try:
        # The OSError clause covers the close too: after a short write on a
        # full disk, close() flushes the rest of the buffer and fails again.
        with os.fdopen(fd, "wb", buffering=1 << 16) as raw:
            writer = HashingWriter(raw)
            yield writer, temp
            raw.flush()
            started = time.perf_counter()
            os.fsync(raw.fileno())
            writer.flush_seconds = time.perf_counter() - started
    except OSError as exc:
        discard(temp)
        raise ExportError(describe_os_error(exc, final)) from exc
    except BaseException:
        discard(temp)
        raise


def commit(temp: Path, final: Path) -> float:
    """Rename *temp* over *final* and make the rename durable; return the seconds that took."""
    started = time.perf_counter()
    try:
        os.replace(temp, final)
        fsync_directory(final.parent)
    except OSError as exc:
        discard(temp)
        raise ExportError(describe_os_error(exc, final)) from exc
    return time.perf_counter() - started


def replace_symlink(link: Path, target: str) -> None:
    """Point *link* at *target* atomically: a new link under a temporary name, renamed over it."""
    temp = temporary_path(link)
    try:
        os.symlink(target, temp)
        os.replace(temp, link)
        fsync_directory(link.parent)
    except OSError as exc:
        discard(temp)
        raise ExportError(describe_os_error(exc, link)) from exc


def replace_file(final: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write *data* under *final* atomically (a temporary file renamed over it), without fsync.

    For small files rewritten often (a metrics file): readers never see a
    part of one, and a crash may lose the newest version, which the next
    write replaces anyway. ExportError, one line, if it cannot be written.
    """
    temp = temporary_path(final)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temp, final)
    except OSError as exc:
        discard(temp)
        raise ExportError(describe_os_error(exc, final)) from exc


def discard(temp: Path) -> None:
    try:
        os.unlink(temp)
    except FileNotFoundError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: Path, *, owned: re.Pattern[str]) -> list[Path]:
    """Remove temporaries of final names matching *owned* whose writer process is gone.

    Only files this module would have created for such names are touched;
    a temporary of a live process (another exporter, this one) is left alone.
    """
    removed = []
    for entry in directory.iterdir():
        match = _TEMP.match(entry.name)
        if not match or not owned.match(match["name"]):
            continue
        if int(match["pid"]) == os.getpid() or _pid_alive(int(match["pid"])):
            continue
        discard(entry)
        removed.append(entry)
    return removed
