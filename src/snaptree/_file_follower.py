"""Keeping a read-only FileStorage up to date with what another process appends to the file.

A FileStorage opened read-only (which takes no lock, so it works while the
application has the file open for writing) reads the index once, when it
opens, and never looks at the file again: it would export the same state
forever. Reopening it before every export works but is cold every time: it
rescans the file from the last saved ``.index`` (saved only when the writer
closes or packs) and its object cache starts empty.

:func:`refresh` instead scans only the transactions appended since the last
look, with ZODB's own ``read_index``, and hands the changed oids to the
database as invalidations, exactly as a ZEO client receives them. The
exporter then keeps a warm cache across exports and pays only for what
changed.

ZODB has no public API for any of this; every private attribute used is
used here and nowhere else (checked against ZODB 6.4):
``FileStorage._file_name``, ``._file``, ``._files`` (its read-file pool),
``._index``, ``._pos``, ``._ltid``, ``._oid``, and ``DB._mvcc_storage``.
``read_index`` returns, besides the position it reached, the tid of the
transaction it stopped at, which may be one still being committed: the tid
of the last transaction followed is read from the file instead
(:func:`settle`, :func:`refresh`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ZODB.DB import DB
from ZODB.FileStorage import FileStorage
from ZODB.FileStorage.FileStorage import read_index
from ZODB.utils import u64, z64

if TYPE_CHECKING:
    from .store import Store


class _RecordingIndex(dict):
    """The per-transaction scratch index read_index fills; remembers every oid it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[bytes] = set()

    def __setitem__(self, oid: bytes, pos: int) -> None:
        self.seen.add(oid)
        super().__setitem__(oid, pos)


class FileReplaced(Exception):
    """The file was packed or replaced since it was opened; open it again."""


def _not_stale_index(record: logging.LogRecord) -> bool:
    return record.msg != "Ignoring index for %s"


@contextlib.contextmanager
def expected_stale_index() -> Iterator[None]:
    """Drop FileStorage's "Ignoring index" warning while a live file is opened read-only.

    The writer saves the ``.index`` when it creates the file, closes or
    packs it. A file created by the process that still has it open thus has
    the index of an empty file, which ZODB finds "insane", ignores with a
    warning, and replaces by a scan of the whole file: expected, and
    documented in docs/export.md, not worth a warning on every run. Other
    FileStorage warnings still show.
    """
    logger = logging.getLogger("ZODB.FileStorage")
    logger.addFilter(_not_stale_index)
    try:
        yield
    finally:
        logger.removeFilter(_not_stale_index)


def follows(storage: Any) -> bool:
    """True if *storage* is a read-only FileStorage, which needs :func:`refresh`."""
    return isinstance(storage, FileStorage) and storage.isReadOnly()


def settle(storage: Any) -> None:
    """Give a freshly opened read-only FileStorage the tid of its last complete transaction.

    Opening a file that its writer is committing to, ZODB's ``read_index``
    stops before the transaction in progress but returns that
    transaction's tid, which FileStorage takes as its last one: an export
    would then claim a tid whose changes it does not hold (and :func:`refresh`
    would later log a "time-stamp reduction" on meeting it).
    """
    if not follows(storage):
        return
    if storage._pos <= 4:  # the file header alone: no transaction complete yet
        storage._ltid = z64
        return
    # Through the storage's own descriptor: the file it indexed, even if
    # the name was packed over since.
    storage._ltid = _tid_ending_at(storage._file.fileno(), storage._pos, storage._file_name)


def refresh(db: DB) -> int:
    """Bring *db*'s read-only FileStorage up to the last transaction committed in the file.

    Returns how many objects changed. Stops before a transaction still being
    committed (its status byte is still ``c``), like ``read_index`` does when
    a read-only FileStorage opens. Raises FileReplaced after a pack.
    """
    storage = db.storage
    name = storage._file_name
    scratch = _RecordingIndex()
    # Unbuffered: a buffered reader could keep bytes of a transaction that the
    # writer then rolled back and overwrote.
    try:
        raw = open(name, "rb", buffering=0)  # noqa: SIM115 - closed below, after checks
    except FileNotFoundError:
        raise FileReplaced(name) from None
    with raw:
        # The file just opened must be the one the storage indexed: after a
        # pack, the name holds a new, shorter file.
        current = os.fstat(raw.fileno())
        opened = os.fstat(storage._file.fileno())
        if (current.st_ino, current.st_dev) != (opened.st_ino, opened.st_dev):
            raise FileReplaced(name)
        if current.st_size < storage._pos:
            raise FileReplaced(name)
        # Written over in place (a backup copied onto it: same inode, any
        # length): the last transaction followed is no longer where it was.
        if storage._pos > 4 and _tid_ending_at(raw.fileno(), storage._pos, name) != storage._ltid:
            raise FileReplaced(name)
        if current.st_size == storage._pos:
            return 0
        pos, maxoid, _ = read_index(
            raw,
            name,
            storage._index,
            scratch,
            ltid=storage._ltid,
            start=storage._pos,
            read_only=True,
        )
        if pos == storage._pos:
            return 0
        # Not read_index's tid: that is the tid of the transaction it stopped
        # at, which may be one still being committed. Followed that far, the
        # file looked committed at a tid whose changes it did not hold, and the
        # next export, seeing that tid again, would skip as "nothing new".
        ltid = _tid_ending_at(raw.fileno(), pos, name)
    # The pooled read files may hold buffered bytes past the old end of the
    # file, from a transaction that was later rolled back: drop them.
    storage._files.flush()
    storage._pos = pos
    storage._ltid = ltid
    if maxoid is not None and maxoid > storage._oid:
        storage._oid = maxoid
    changed = scratch.seen
    db._mvcc_storage.invalidate(ltid, changed)
    return len(changed)


def _tid_ending_at(fd: int, end: int, name: str) -> bytes:
    """The tid of the transaction record that ends at *end* (its length closes it)."""
    length = os.pread(fd, 8, end - 8)
    start = end - 8 - u64(length) if len(length) == 8 else -1
    tid = os.pread(fd, 8, start) if start >= 4 else b""  # 4: the file's magic number
    if len(tid) != 8:
        raise FileReplaced(name)  # not a transaction's end: the file changed under us
    return tid


def catch_up(store: Store) -> bool:
    """Refresh *store* if it is a read-only FileStorage; False if it must be opened again."""
    if not follows(store.db.storage):
        return True
    try:
        refresh(store.db)
    except FileReplaced:
        return False
    return True
