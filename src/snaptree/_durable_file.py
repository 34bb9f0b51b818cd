"""A FileStorage whose commits reach the disk in one of three ways, and whose index stays fresh.

ZODB's FileStorage fsyncs every commit in ``tpc_finish``, holding the
storage's commit lock: no other thread can commit, begin a transaction or
load an object while the disk works, and two commits never share an fsync.
:class:`DurableFileStorage` keeps ZODB's write path (every commit is
written and flushed to the operating system under the lock, exactly as
before) and chooses when the fsync happens:

``commit``
    ZODB's own behaviour: the fsync inside ``tpc_finish``, one per commit.
``group``
    The fsync runs after the lock is released. The first caller that needs
    one (``wait_durable``) leads: it notes how many commits are flushed,
    fsyncs, and wakes every caller those commits cover; commits flushed
    while it worked wait for the next leader. A caller returns only once
    its commit is on disk, and commits that arrive during an fsync share
    the next one.
``relaxed``
    Nobody waits: a background thread fsyncs at most every ``sync_every``
    seconds. A killed process loses nothing (every commit is in the
    operating system when ``tpc_finish`` returns); a machine crash loses at
    most the commits of the last window.

Why one fsync covers every earlier commit, and a crash leaves a prefix of
whole transactions: between packs the file is append-only, and the only
write to an earlier offset is the status byte of the transaction being
committed, written before its flush (ZODB 6.4, ``FileStorage._finish``);
``fsync`` writes back all of a file's data, whoever wrote it. A torn last
transaction is cut off by ZODB's ``read_index`` when the file is next
opened for writing (a read-only open stops before it). A pack replaces the
file: the packed file is fsynced before ZODB renames it into place, and the
directory after, before any later commit is acknowledged.

A failed fsync is not retried (Linux may report a write-back error once and
then call the pages clean): every caller waiting for it, and every later
commit, gets :class:`~snaptree.errors.DurabilityError`; in ``commit`` mode
``tpc_finish`` itself raises it, so that a ZEO server never answers "committed".

The same background thread saves the FileStorage index (``Data.fs.index``)
whenever the file has grown by ``save_index_every`` bytes since the last
save (or by the size of the index itself, if that is larger, so that saving
never writes more than the commits did). ZODB saves it only on close and
pack; a process that opens the file read-only while this one writes (an
exporter, ``snaptree export --db``) then scans every transaction since,
which grows without bound. The copy is taken one bucket at a time under the
storage's lock (each hold well under a millisecond at 10 million objects)
and written outside it.

ZODB has no public API for any of this. The private names used, here and
nowhere else (checked against ZODB 6.4): ``FileStorage._finish_finish``
(replaced, as ZODB keeps it separate for), ``_restore_index`` and
``_save_index`` (extended), ``_file``, ``_file_name``, ``_pos``,
``_nextpos``, ``_index``, ``_tindex``, ``_ltid``, ``_lock``,
``_blob_tpc_finish``, ``_is_read_only``, the static ``packer``,
``fsIndex._data`` with its buckets' ``toString``/``fromString``, and the
layout of the ``.index`` file (``fsIndex.save``: the position, then
``(prefix, bucket bytes)`` pairs, then ``None``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any

from BTrees.fsBTree import fsBucket
from ZODB._compat import Pickler, _protocol
from ZODB.FileStorage import FileStorage
from ZODB.fsIndex import num2str

from ._atomic import fsync_path
from .errors import ArgumentError, DurabilityError

log = logging.getLogger("snaptree.store")

#: The ways a commit can reach the disk, and the default (docs/store.md says why).
DURABILITY_MODES = ("commit", "group", "relaxed")
DEFAULT_DURABILITY = "group"

#: Seconds between two background fsyncs in ``relaxed`` mode, unless told otherwise.
DEFAULT_SYNC_EVERY = 0.05

#: Bytes of new commits after which the index is saved again, unless told otherwise.
DEFAULT_SAVE_INDEX_EVERY = 16 * 2**20

#: Bytes one object takes in a saved index (a 2-byte key and a 6-byte position).
_INDEX_BYTES_PER_OBJECT = 8

#: Seconds between two looks of the background thread when nothing wakes it.
_IDLE_WAIT = 1.0

#: Seconds ``close`` waits for the background thread to finish what it is doing.
_CLOSE_WAIT = 30.0


def check_durability(durability: str, sync_every: float, save_index_every: int) -> None:
    """Raise ArgumentError unless the three durability settings make sense together."""
    if durability not in DURABILITY_MODES:
        raise ArgumentError(
            f"durability must be one of {', '.join(map(repr, DURABILITY_MODES))}, "
            f"not {durability!r}"
        )
    if isinstance(sync_every, bool) or not isinstance(sync_every, int | float) or sync_every <= 0:
        raise ArgumentError(f"sync_every must be a positive number of seconds, not {sync_every!r}")
    if (
        isinstance(save_index_every, bool)
        or not isinstance(save_index_every, int)
        or save_index_every < 0
    ):
        raise ArgumentError(
            "save_index_every must be a number of bytes of 0 or more (0: only when the "
            f"file is closed or packed), not {save_index_every!r}"
        )


class DurableFileStorage(FileStorage):
    """A writable FileStorage with a durability mode (see the module docstring)."""

    def __init__(
        self,
        file_name: str,
        *,
        durability: str = DEFAULT_DURABILITY,
        sync_every: float = DEFAULT_SYNC_EVERY,
        save_index_every: int = DEFAULT_SAVE_INDEX_EVERY,
        **options: Any,
    ) -> None:
        check_durability(durability, sync_every, save_index_every)
        if options.get("read_only"):
            raise ArgumentError("a read-only FileStorage has nothing to make durable")
        self.durability = durability
        self.sync_every = float(sync_every)
        self.save_index_every = save_index_every
        # Durability accounting: commits are numbered in the order they are
        # flushed; every commit up to _synced is on disk.
        self._durable = threading.Condition(threading.Lock())
        self._flushed = 0
        self._synced = 0
        self._syncing = False  # a leader's fsync is under way
        self._failure: OSError | None = None
        self.fsyncs = 0  # completed fsyncs of the data file, for benchmarks and tests
        # The index file: where the last save stopped, and the commits'
        # index changes while a background save copies the index.
        self._index_pos = 0
        self._index_generation = 0
        self._index_changes: list[dict[bytes, int]] | None = None
        self._index_threshold = 0
        self._stopping = False
        self._wake = threading.Condition(threading.Lock())
        self._index_wanted = False
        created = not os.path.exists(file_name)
        super().__init__(file_name, **options)
        # What the file holds may not be on disk yet: the last process to write
        # it may have been killed between a commit and its fsync (group and
        # relaxed). Everything counts as synced from here on, so fsync it now.
        try:
            os.fsync(self._file.fileno())
            if created:
                fsync_path(os.path.dirname(os.path.abspath(file_name)))
        except OSError as exc:
            self.close()
            raise DurabilityError(
                f"cannot make {file_name} durable when opening it: fsync failed "
                f"({exc.strerror or exc}); check the disk"
            ) from exc
        self._synced_file = self._file  # the file object the last fsync covered
        #: Bytes at the start of the data file known to be on disk (the last fsync's reach).
        self.synced_position = self._pos
        self._update_index_threshold()
        self._housekeeper = threading.Thread(
            target=self._housekeep, name=f"snaptree fsync {file_name}", daemon=True
        )
        self._housekeeper.start()

    # -- committing ----------------------------------------------------------------

    def tpc_begin(self, transaction: Any, tid: bytes | None = None, status: str = " ") -> Any:
        if self._failure is not None:
            raise self._durability_error()
        return super().tpc_begin(transaction, tid, status)

    def tpc_finish(self, transaction: Any, f: Any = None) -> Any:
        # In ``commit`` mode a failed fsync must fail the commit itself, as
        # it does in ZODB: whoever calls tpc_finish (a ZEO server answering
        # its client) would otherwise report the commit as done. The store
        # would raise DurabilityError anyway, once it waits for the disk.
        tid = super().tpc_finish(transaction, f)
        if self.durability == "commit" and self._synced < self._flushed:
            raise self._durability_error()
        return tid

    def _finish_finish(self, tid: bytes) -> None:
        # ZODB 6.4's body, with the fsync left to the mode; runs in
        # tpc_finish under the commit lock and the storage lock, after the
        # transaction's status byte was written.
        self._file.flush()
        if self.durability == "commit" and self._failure is None:
            self._fsync_in_commit(self._nextpos)
        self._pos = self._nextpos
        self._index.update(self._tindex)
        changes = self._index_changes
        if changes is not None:  # a background save is copying the index
            changes.append(dict(self._tindex))
        self._ltid = tid
        self._blob_tpc_finish()
        self._flushed += 1
        if self.durability == "commit" and self._failure is None:
            self._synced = self._flushed
        due = self._index_threshold and self._pos - self._index_pos >= self._index_threshold
        if due and not self._index_wanted:
            self._want_index()

    def _fsync_in_commit(self, reach: int) -> None:
        """``commit`` mode: fsync under the storage lock, as ZODB does; a failure is recorded."""
        try:
            os.fsync(self._file.fileno())
            self._sync_directory_after_a_swap(self._file)
        except OSError as exc:
            self._fail(exc)
        else:
            self.fsyncs += 1
            self.synced_position = reach

    # -- waiting for the disk -----------------------------------------------------

    @property
    def flushed(self) -> int:
        """How many commits this storage has written to the operating system."""
        return self._flushed

    def wait_durable(self, upto: int) -> None:
        """Return once the first *upto* commits are on disk; lead the fsync if none is under way.

        Raises DurabilityError if an fsync failed before they got there.
        """
        if self._synced >= upto and self._file is self._synced_file:
            return
        with self._durable:
            while self._synced < upto or self._file is not self._synced_file:
                if self._failure is not None:
                    raise self._durability_error()
                if self._syncing:
                    self._durable.wait(_IDLE_WAIT)
                else:
                    self._lead_fsync()

    def make_durable(self) -> None:
        """Make every commit so far durable (a no-op when they are).

        Not ``sync``: ZODB calls a storage's ``sync`` at every transaction's
        begin (for storages that poll a server).
        """
        self.wait_durable(self._flushed)

    def _lead_fsync(self) -> None:
        """Fsync for everyone flushed so far. Called, and returns, with ``_durable`` held."""
        self._syncing = True
        target = self._flushed
        self._durable.release()
        failure = None
        succeeded = False
        try:
            while True:
                # A pack may replace the file meanwhile: fsync our own
                # descriptor of the current one, then check it still is.
                with self._lock:
                    current = self._file
                    fd = os.dup(current.fileno())
                    reach = self._pos  # every commit up to target ends before it
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._sync_directory_after_a_swap(current)
                with self._lock:
                    if current is self._file:
                        break
            self.fsyncs += 1
            succeeded = True
        except OSError as exc:
            failure = exc
        finally:
            self._durable.acquire()
            self._syncing = False
            if succeeded:
                self._synced = max(self._synced, target)
                self.synced_position = reach
            elif failure is not None and self._failure is None:
                self._fail(failure)
            self._durable.notify_all()

    def _sync_directory_after_a_swap(self, current: Any) -> None:
        """After a pack renamed a new file into place, make the rename durable before using it."""
        if current is not self._synced_file:
            fsync_path(os.path.dirname(self._file_name))
            self._synced_file = current

    def _fail(self, exc: OSError) -> None:
        self._failure = exc
        log.critical(
            "fsync of %s failed (%s): commits after the last one on disk may be lost; "
            "this store refuses every further commit",
            self._file_name,
            exc,
        )

    def _durability_error(self) -> DurabilityError:
        return DurabilityError(
            f"an fsync of {self._file_name} failed ({self._failure}): commits after the last "
            "one that reached the disk may be lost on a crash, and this store refuses further "
            "commits; stop the process, check the disk, and open the file again"
        )

    # -- packing --------------------------------------------------------------------

    @staticmethod
    def packer(storage: Any, referencesf: Any, stop: Any, gc: Any) -> Any:
        """ZODB's packer, then an fsync of the packed file before ZODB renames it into place.

        ZODB 6.4 only flushes ``Data.fs.pack`` before the rename: a machine
        crash soon after could leave the name pointing at a file whose data
        never reached the disk.
        """
        result = FileStorage.packer(storage, referencesf, stop, gc)
        if result is not None:
            fsync_path(storage._file_name + ".pack")
        return result

    def pack(self, t: float, referencesf: Any, gc: bool | None = None) -> None:
        super().pack(t, referencesf, gc)
        # The rename itself must reach the disk before a later commit is acknowledged.
        if self.durability == "commit":
            with self._lock:
                if self._failure is None and self._file is not self._synced_file:
                    self._fsync_in_commit(self._pos)
        else:
            self.make_durable()

    # -- the index file -------------------------------------------------------------

    def _restore_index(self) -> Any:
        restored = super()._restore_index()
        if restored is not None:
            self._index_pos = restored[1]
        return restored

    def _save_index(self) -> None:
        """ZODB's own saves (a new file, close, pack): the whole index at once, as ZODB does."""
        if self._is_read_only or self._failure is not None:
            return  # never an index that claims commits which may not be on disk
        try:  # ZODB saves after a pack or a rescan at open, commits it did not fsync
            os.fsync(self._file.fileno())
        except ValueError:
            pass  # the file is closed: close() made every commit durable before
        except OSError:
            return  # no index beats one that points past what is on disk
        state = [(prefix, bucket.toString()) for prefix, bucket in self._index._data.items()]
        self._write_index(self._pos, state, self.__name__ + ".index_tmp")
        self._index_generation += 1
        self._index_pos = self._pos
        self._update_index_threshold()

    def _update_index_threshold(self) -> None:
        every = self.save_index_every
        self._index_threshold = every and max(every, _INDEX_BYTES_PER_OBJECT * len(self._index))

    def _want_index(self) -> None:
        self._index_wanted = True
        with self._wake:
            self._wake.notify()

    def save_index(self) -> bool:
        """Save the index for the commits so far without holding up commits; False if a pack won.

        The copy is taken one bucket at a time under the storage lock; the
        commits finished meanwhile are recorded and applied to the copy, so
        the file written describes exactly the commits up to one position.
        """
        with self._lock:
            index = self._index
            prefixes = list(index._data.keys())
            self._index_changes = []
        copied: dict[bytes, bytes] = {}
        changes: list[dict[bytes, int]] = []
        try:
            for prefix in prefixes:
                with self._lock:
                    if self._index is not index:
                        return False  # packed: the pack saved an index of its own
                    bucket = index._data.get(prefix)
                    if bucket is not None:
                        copied[prefix] = bucket.toString()
                # A thread waiting for the lock gets it now: released and taken
                # again at once, it would wait for the whole copy.
                time.sleep(0)
            with self._lock:
                if self._index is not index:
                    return False
                changes = self._index_changes or []
                pos, upto, generation = self._pos, self._flushed, self._index_generation
        finally:
            with self._lock:
                self._index_changes = None
        by_prefix: defaultdict[bytes, dict[bytes, bytes]] = defaultdict(dict)
        for tindex in changes:  # in commit order: the last position of each oid wins
            for oid, opos in tindex.items():
                by_prefix[oid[:6]][oid[6:]] = num2str(opos)  # fsIndex's own encoding
        for prefix, positions in by_prefix.items():
            bucket = fsBucket()
            if prefix in copied:
                bucket.fromString(copied[prefix])
            bucket.update(positions)
            copied[prefix] = bucket.toString()
        # An index never points past what is on disk: a crash that cut the
        # file below it would otherwise leave it pointing at lost records.
        self.wait_durable(upto)
        temporary = self.__name__ + ".index_saving"
        self._write_index(pos, sorted(copied.items()), temporary, replace=False)
        with self._lock:
            if self._index is not index or self._index_generation != generation:
                os.unlink(temporary)
                return False
            os.replace(temporary, self.__name__ + ".index")
            self._index_generation += 1
            self._index_pos = pos
            self._update_index_threshold()
        return True

    def _write_index(
        self, pos: int, state: list[tuple[bytes, bytes]], temporary: str, replace: bool = True
    ) -> None:
        """Write an index in fsIndex.save's layout, fsynced, to *temporary* (then in place)."""
        with open(temporary, "wb") as f:
            pickler = Pickler(f, _protocol)
            pickler.fast = True
            pickler.dump(pos)
            for item in state:
                pickler.dump(item)
            pickler.dump(None)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(temporary, self.__name__ + ".index")

    # -- the background thread ------------------------------------------------------

    def _housekeep(self) -> None:
        """Relaxed fsyncs every ``sync_every`` seconds, and index saves when due, until close."""
        relaxed = self.durability == "relaxed"
        while True:
            with self._wake:
                if not self._stopping and not self._index_wanted:
                    self._wake.wait(self.sync_every if relaxed else _IDLE_WAIT)
                if self._stopping:
                    return
            try:
                if relaxed and self._flushed > self._synced:
                    self.make_durable()
                if self._index_wanted:
                    self._index_wanted = False
                    self.save_index()
            except DurabilityError:
                pass  # logged once by _fail; commits are refused from now on
            except Exception:  # a save failing must not stop the fsyncs
                log.exception("saving the index of %s failed", self._file_name)

    def close(self) -> None:
        """Stop the background thread, make every commit durable, then close as ZODB does."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._housekeeper is not threading.current_thread():
            # Bounded: ZODB closes the storage from inside a failed tpc_finish,
            # holding the lock the thread may be waiting for.
            self._housekeeper.join(_CLOSE_WAIT)
        if self._failure is None:
            try:
                self.make_durable()
            except DurabilityError:
                pass  # logged; the index is then not saved either
        super().close()
