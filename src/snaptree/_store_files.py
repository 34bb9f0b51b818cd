"""The files of a store on this machine: what an export must never write over.

A dump written over the store's data file, its index or its blob directory
destroys the database it copies; so does one written over another
FileStorage (another store's, the one a ZEO server serves). The export
refuses them all (:meth:`StoreFiles.refuse`), and gives a dump the data
file's permission bits (:meth:`StoreFiles.dump_mode`), so that a dump is
never more readable than what it copies.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ZODB.FileStorage import packed_version
from ZODB.interfaces import IBlobStorage

from .errors import Error, ExportError, one_line

if TYPE_CHECKING:
    from .store import Store

#: What FileStorage keeps beside its data file (ZODB 6.4: FileStorage.__init__,
#: pack, cleanup; ``.index.index_tmp`` is the index being saved).
_COMPANIONS = ("", ".index", ".index.index_tmp", ".lock", ".tmp", ".old", ".pack")

#: How a FileStorage data file starts: ``FS30`` (ZODB.FileStorage.packed_version
#: under Python 3), ``FS21`` (files written under Python 2).
_FILESTORAGE_MAGIC = frozenset({packed_version, b"FS21"})


@dataclass(frozen=True)
class StoreFiles:
    """The files of a store on this machine: what an export must never replace.

    Empty for stores without a local file (memory, ZEO, PostgreSQL). For a
    FileStorage: its data file and every file FileStorage keeps beside it,
    and its blob directory with everything in it.
    """

    data_file: Path | None = None
    files: tuple[Path, ...] = ()
    blob_dirs: tuple[Path, ...] = ()
    #: The storage itself when this process writes the file and chooses its
    #: durability (``storage.durability``: commit, group, relaxed); None when
    #: it only reads a file another process writes (an exporter process).
    writer: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, store: Store) -> StoreFiles:
        storage = store.db.storage
        blob_dirs: tuple[Path, ...] = ()
        if IBlobStorage.providedBy(storage):  # a FileStorage with blobs, ZODB's BlobStorage...
            try:
                blobs = Path(os.path.abspath(storage.temporaryDirectory())).parent
            except Exception:  # declared, but no local blob directory (ZEO, RelStorage)
                pass
            else:
                blob_dirs = (blobs, blobs.with_name(blobs.name + ".old"))
        # A FileStorage's name is the file name it was opened with (ZODB 6.4),
        # also through BlobStorage, which wraps it; other storages' names are
        # not files (memory, a ZEO address, a DSN).
        name = storage.getName()
        data_file = Path(os.path.abspath(name)) if isinstance(name, str) else None
        if data_file is None or not _is_filestorage(data_file):
            return cls(blob_dirs=blob_dirs)
        files = tuple(data_file.with_name(data_file.name + ext) for ext in _COMPANIONS)
        writer = storage if getattr(storage, "durability", None) is not None else None
        return cls(data_file, files, blob_dirs, writer)

    def dump_mode(self) -> int:
        """Permission bits for a dump: the data file's, else the owner's alone.

        A dump holds everything its store holds, so it is readable by no
        one the store is not readable by: a FileStorage's dump gets the data
        file's read and write bits (plus the owner's, so that the exporter
        can read what it wrote); a store with no local file (memory, ZEO,
        PostgreSQL, whose access rules are not file bits) gets 0600.
        """
        if self.data_file is None:
            return 0o600
        try:
            return (self.data_file.stat().st_mode & 0o666) | 0o600
        except OSError:
            return 0o600

    def make_durable(self) -> float:
        """Make every commit the dump may hold durable; return the seconds it took.

        A store may make a commit visible before it is on disk (durability
        ``group`` or ``relaxed``): a dump of such a commit, published first,
        would outlive a machine crash that took the commit back. An export
        calls this after its snapshot and before it renames the dump into
        place. Where this process writes the file, the storage knows: in
        ``commit`` mode every visible commit was fsynced inside its
        ``tpc_finish``, and otherwise its own ``make_durable`` fsyncs only if
        a commit is not yet on disk. A process that only reads the file (an
        exporter process, ``snaptree export --db``) cannot know the writer's
        mode, and fsyncs the file itself: any process may fsync a file it
        can only read. Nothing to do without a local file.
        """
        if self.data_file is None:
            return 0.0
        durability = getattr(self.writer, "durability", None)
        if durability == "commit":
            return 0.0
        started = time.perf_counter()
        try:
            if durability is not None:
                self.writer.make_durable()
            else:
                fd = os.open(self.data_file, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except (OSError, Error) as exc:
            reason = exc.strerror or exc if isinstance(exc, OSError) else one_line(str(exc))
            raise ExportError(
                f"cannot make the store's data file {self.data_file} durable before publishing "
                f"the dump: {reason}; nothing was published"
            ) from exc
        return time.perf_counter() - started

    def refuse(self, target: Path) -> None:
        """Raise ExportError if writing *target* would replace one of these files.

        Checked by resolved path (relative names, symlinked directories, a
        symlink as the target) and by inode (a hard link, another mount of
        the same file), and any existing FileStorage, which is never a dump
        to replace: another store's, or the file a ZEO server serves.
        """
        real = Path(os.path.realpath(target))
        where = f"cannot write {target}"
        target_stat = _stat(target)
        # The companions (there are some only beside a data file) share its
        # directory: resolve it once, and a companion itself only where it is a
        # symlink (one lstat each).
        folder = Path(os.path.realpath(self.data_file.parent)) if self.data_file else Path()
        for path in self.files:
            real_path = Path(os.path.realpath(path)) if os.path.islink(path) else folder / path.name
            if real == real_path or _same_file(target_stat, path):
                raise ExportError(
                    f"{where}: it is one of the store's own files ({path}); a dump written "
                    "there would destroy the database. Write the dump to another name"
                )
        for blobs in self.blob_dirs:
            if real.is_relative_to(os.path.realpath(blobs)):
                raise ExportError(
                    f"{where}: it is inside the store's blob directory {blobs}; write the "
                    "dump elsewhere"
                )
        if _is_filestorage(target):
            raise ExportError(
                f"{where}: it is a ZODB FileStorage (a database, perhaps another store's or "
                "the one a ZEO server serves), which an export never replaces; write the "
                "dump to another name"
            )


def _is_filestorage(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(4) in _FILESTORAGE_MAGIC
    except OSError:  # absent, a directory, unreadable
        return False


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:  # absent, or a dangling symlink
        return None


def _same_file(target: os.stat_result | None, path: Path) -> bool:
    """Whether *path* is the file whose stat is *target* (a hard link, another mount)."""
    if target is None:
        return False
    other = _stat(path)
    return other is not None and os.path.samestat(target, other)
