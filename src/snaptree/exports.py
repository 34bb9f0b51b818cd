"""Writing one committed snapshot of the tree to a file, with its manifest, and checking it back.

Three formats:

``pickle``
    ``pickle.load`` gives the tree as plain Python data: snaptree mappings
    become dicts, lists lists, counters ints; the user's own classes stay
    themselves. The pickler converts the persistent containers *while* it
    writes (``reducer_override``), so no plain copy of the tree is ever
    built, and it trims the ZODB cache as it goes, so a tree far larger
    than the cache is exported in bounded memory.
``json``
    The same tree as JSON, streamed the same way. A value JSON cannot hold
    (bytes, a datetime, NaN, a tuple key ...) is an error naming its path.
``zodb``
    ZODB's own export format (what ``Connection.exportFile`` writes). It is
    copied record by record from the storage; nothing is unpickled. snaptree
    reads it back (verify, import) record by record with the allow-list
    unpickler, never with ``Connection.importFile``, which runs any pickle.

Every dump is written atomically (see :mod:`snaptree._atomic`) and followed
by a manifest ``<dump>.manifest.json``: format, tid, commit time, object
count, size, sha256, snaptree version and the source with its password
masked. Both are complete and fsynced before the manifest and then the dump
are renamed into place, so a file under a dump's final name is always whole.
Neither is ever more readable than the store, nor written over one of the
store's own files (:class:`StoreFiles`).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import contextvars
import datetime
import hashlib
import io
import itertools
import json
import logging
import math
import operator
import os
import pickle
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from BTrees.OOBTree import OOBTree, OOBucket
from persistent import Persistent
from ZODB.broken import Broken
from ZODB.ExportImport import export_end_marker
from ZODB.FileStorage import packed_version
from ZODB.serialize import referencesf
from ZODB.utils import p64

from . import _atomic
from ._version import version
from .errors import (
    ArgumentError,
    Error,
    ExportError,
    UnstorableValueError,
    VerifyError,
)
from .tree import Counter, FlatMapping, List, Mapping, Set

log = logging.getLogger(__name__)

FORMATS = ("pickle", "json", "zodb")
#: File name suffix of each format.
SUFFIXES = {"pickle": ".pickle", "json": ".json", "zodb": ".zexp"}
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1

#: How many tree nodes are written between two trims of the ZODB cache.
_GC_EVERY = 2000
#: Pickle protocol: 4 or more frames the output, which lets the C pickler
#: hand each 64 KiB frame to the file as it goes instead of buffering it all.
_PICKLE_PROTOCOL = 5


@dataclass(frozen=True)
class ExportInfo:
    """What an export wrote (or what :func:`verify` found): one dump and its manifest."""

    path: Path
    format: str
    tid: str
    committed_at: datetime.datetime
    objects: int
    bytes: int
    sha256: str
    subtree: str = "/"
    source: str = ""
    seconds: float = 0.0
    snaptree_version: str = ""
    #: Seconds spent waiting for the disk to make the dump and its manifest
    #: durable (fsyncs): the share of the disk an export takes from writers'
    #: commits, which the schedule uses to pace back-to-back exports. Not
    #: kept in the manifest.
    flush_seconds: float = field(default=0.0, compare=False)
    #: Filled in by :func:`verify`: a short description of what the dump holds.
    summary: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def manifest_path(self) -> Path:
        return manifest_path(self.path)

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-ready values (the ``--json`` output and the manifest)."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["committed_at"] = self.committed_at.isoformat()
        return data


def manifest_path(dump: Path | str) -> Path:
    dump = Path(dump)
    return dump.with_name(dump.name + MANIFEST_SUFFIX)


def check_format(format: str) -> str:  # noqa: A002
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    return format


#: The format each file name suffix means (case-insensitive).
_SUFFIX_FORMATS = {".json": "json", ".pickle": "pickle", ".pkl": "pickle", ".zexp": "zodb"}


def resolve_format(path: str | os.PathLike[str], format: str | None) -> str:  # noqa: A002
    """The format of a dump at *path*: *format*, or the one its suffix names.

    A suffix of another format contradicts *format* (``x.json`` written as a
    pickle would mislead every reader that trusts the name), and without
    *format* the suffix must name one: both are ArgumentErrors. A suffix
    no format claims (``app.dump``) is fine with an explicit *format*.
    """
    if format is not None:
        check_format(format)
    suffix = Path(path).suffix.lower()
    implied = _SUFFIX_FORMATS.get(suffix)
    if format is None:
        if implied is None:
            raise ArgumentError(
                f"cannot tell the export format of {os.fspath(path)} from its name: end it "
                "in .pickle (or .pkl), .json or .zexp, or pass the format (format= / "
                f"--format {'|'.join(FORMATS)})"
            )
        return implied
    if implied is not None and implied != format:
        raise ArgumentError(
            f"{os.fspath(path)}: the name says {implied}, but the format asked for is "
            f"{format}; name the file {Path(path).stem}{SUFFIXES[format]}, or ask for {implied}"
        )
    return format


# -- the public entry point ----------------------------------------------------


def export(
    store: Any,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,  # noqa: A002 - the name users know from the CLI
    at: datetime.datetime | str | bytes | None = None,
    subtree: str = "/",
) -> ExportInfo:
    """Write one committed snapshot of the tree (or of *subtree*) to *path*, atomically.

    The snapshot is a read-only connection that never syncs until the dump
    is written, so writers carry on committing while it runs and the dump
    still shows exactly one committed state. ``at`` (an aware datetime or a
    hex tid) exports the tree as it was then, where the storage keeps
    history. ``format`` defaults to the one the name's suffix says
    (:func:`resolve_format`).

    *path* must be a path, not an open file: the dump is written to a
    temporary file beside it, renamed over it once complete and vouched for
    by a manifest beside it, none of which a file object allows (a failed
    export would leave half a dump in it). The dump is never more readable
    than the store it copies, and never replaces the store's own files.

    This runs in the calling process. For repeated exports from an
    application whose threads write to the store, use
    :class:`snaptree.Exporter`: it runs them in a separate process, because
    a CPU-bound export sharing the writers' interpreter lock slows every
    writer down (see docs/export.md).
    """
    if not isinstance(path, str | os.PathLike):
        raise ArgumentError(
            f"export() writes to a path, not to a {type(path).__name__}: it writes a temporary "
            "file beside the final name, renames it into place once complete and writes a "
            "manifest beside it; pass the file's path (for an open file, its .name)"
        )
    info = export_snapshot(
        store, lambda snap: Path(path), format=format, at=at, subtree=subtree, unless_tid=None
    )
    assert info is not None
    return info


def export_snapshot(
    store: Any,
    target: Callable[[Any], Path],
    *,
    format: str | None,  # noqa: A002
    at: datetime.datetime | str | bytes | None,
    subtree: str,
    unless_tid: str | None,
) -> ExportInfo | None:
    """Take one snapshot, name the dump with ``target(snapshot)`` and write it.

    Returns None, writing nothing, when the snapshot's tid is *unless_tid*
    (nothing was committed since that export). Shared by :func:`export` and
    the schedule, whose file names depend on the snapshot taken. A *format*
    of None is taken from the final name (:func:`resolve_format`).
    """
    if format is not None:
        check_format(format)
    started = time.perf_counter()
    protected = StoreFiles.of(store)
    mode = protected.dump_mode()
    with store.snapshot(at=at) as snap:
        if unless_tid is not None and snap.tid == unless_tid:
            return None
        node = resolve_subtree(snap.root, subtree)
        final = Path(target(snap))
        protected.refuse(final)
        protected.refuse(manifest_path(final))
        format = resolve_format(final, format)  # noqa: A001
        if final.is_dir():
            raise ExportError(f"cannot write {final}: it is a directory; name a file inside it")
        if not final.parent.is_dir():
            if final.parent.exists():
                raise ExportError(
                    f"cannot write {final}: {final.parent} is a file, not a directory"
                )
            raise ExportError(
                f"cannot write {final}: directory {final.parent} does not exist; create it first"
            )
        try:
            with _atomic.staged_file(final, mode=mode) as (writer, temp):
                objects = _WRITERS[format](node, writer, snap.connection, subtree)
        except _TooDeepForFragments:
            # The fragment writer recurses in Python, a few frames a level; the
            # plain writer's C pickler takes one a level. Same file, written anew.
            with _atomic.staged_file(final, mode=mode) as (writer, temp):
                objects = _write_pickle_plain(node, writer, snap.connection, subtree)
        tid, committed_at = snap.tid, snap.committed_at
    # The snapshot's connection is back in the pool; what is left is renames.
    manifest_temp = None
    try:
        info = ExportInfo(
            path=final,
            format=format,
            tid=tid,
            committed_at=committed_at,
            objects=objects,
            bytes=writer.bytes,
            sha256=writer.sha256,
            subtree=normalize_subtree(subtree),
            source=store.source,
            seconds=round(time.perf_counter() - started, 6),
            snaptree_version=version(),
        )
        # Both files are complete and fsynced before either is renamed. The
        # manifest is renamed first: a crash between the two renames leaves a
        # manifest without its dump, which no reader takes for a dump and
        # retention removes, rather than a dump no manifest vouches for.
        with _atomic.staged_file(manifest_path(final), mode=mode) as (mwriter, manifest_temp):
            mwriter.write(_manifest_bytes(info))
        flushed = writer.flush_seconds + mwriter.flush_seconds
        flushed += _atomic.commit(manifest_temp, manifest_path(final))
        flushed += _atomic.commit(temp, final)
    except BaseException:
        _atomic.discard(temp)
        if manifest_temp is not None:
            _atomic.discard(manifest_temp)
        raise
    return replace(info, flush_seconds=round(flushed, 6))


# -- the store's own files --------------------------------------------------------


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

    @classmethod
    def of(cls, store: Any) -> StoreFiles:
        from ZODB.interfaces import IBlobStorage

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
        return cls(data_file, files, blob_dirs)

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

    def refuse(self, target: Path) -> None:
        """Raise ExportError if writing *target* would replace one of these files.

        Checked by resolved path (relative names, symlinked directories, a
        symlink as the target) and by inode (a hard link, another mount of
        the same file), and any existing FileStorage, which is never a dump
        to replace: another store's, or the file a ZEO server serves.
        """
        real = Path(os.path.realpath(target))
        where = f"cannot write {target}"
        for path in self.files:
            if real == Path(os.path.realpath(path)) or _same_file(target, path):
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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist
        return False


def _manifest_bytes(info: ExportInfo) -> bytes:
    data = info.to_json()
    del data["summary"], data["flush_seconds"]
    data["path"] = info.path.name  # relative: the pair can be moved together
    data = {"snaptree_manifest": MANIFEST_VERSION, **data}
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


# -- subtrees --------------------------------------------------------------------


def normalize_subtree(subtree: str) -> str:
    parts = [p for p in subtree.split("/") if p]
    return "/" + "/".join(parts)


def resolve_subtree(root: Any, subtree: str) -> Any:
    """The value at *subtree* (``/accounts/42``); integer keys and list indexes are accepted."""
    node = root
    walked = ""
    for part in [p for p in subtree.split("/") if p]:
        candidates: list[Any] = [part]
        if part.lstrip("-").isdigit():
            candidates.append(int(part))
        for key in candidates:
            try:
                if isinstance(node, List | list | tuple):
                    if not isinstance(key, int):
                        continue
                    node = node[key]
                elif isinstance(node, Mapping | FlatMapping | dict):
                    node = node[key]
                else:
                    raise ExportError(
                        f"subtree {subtree}: {walked or '/'} is a {type(node).__name__}, "
                        "not a mapping or list"
                    )
                break
            except (KeyError, IndexError, TypeError):
                continue
        else:
            raise ExportError(f"subtree {subtree}: {walked or '/'} has no key {part!r}")
        walked += "/" + part
    return node


# -- pickle -----------------------------------------------------------------------


class _PlainPickler(pickle.Pickler):
    """Writes snaptree nodes as dicts, lists and ints while it pickles.

    ``reducer_override`` is only consulted for objects the C pickler has no
    fast path for (never for str, int, dict, list, tuple ...), so plain
    values inside the tree cost what they cost in ``pickle.dump``. A Mapping's
    items are handed over as an iterator: its BTree buckets are loaded one
    at a time and the cache is trimmed every few thousand nodes.
    """

    def __init__(self, file: Any, connection: Any) -> None:
        super().__init__(file, protocol=_PICKLE_PROTOCOL)
        # No memo: with one, the pickler would hold every container and string
        # it wrote until the end (with protocol 4+ it cannot be cleared midway
        # without corrupting the stream), and memory would grow with the tree:
        # measured at about 570 bytes per object. Without it, an object
        # reachable twice is written twice, and a cycle is an error.
        self.fast = True
        self.nodes = 0
        self._connection = connection

    def reducer_override(self, obj: Any) -> Any:
        # Exact-type dispatch first: isinstance() against these ABC-backed
        # classes costs more than the rest of this method together.
        kind = type(obj)
        reduce = _PLAIN_REDUCERS.get(kind)
        if reduce is None:
            if kind is type:  # dict and list, named by every node's reduction: one call in two
                return NotImplemented
            reduce = _subclass_reducer(obj)
            if reduce is None:
                return NotImplemented
        self.nodes += 1
        if self.nodes % _GC_EVERY == 0 and self._connection is not None:
            self._connection.cacheGC()
        return reduce(obj)


def _reduce_mapping(obj: Any) -> Any:
    return (dict, (), None, None, iter(obj.items()))


def _reduce_flat(obj: Any) -> Any:
    return (dict, (obj.data,))


def _reduce_list(obj: Any) -> Any:
    return (list, (obj.data,))


def _reduce_counter(obj: Any) -> Any:
    return (int, (obj.value,))


def _reduce_set(obj: Any) -> Any:
    return (set, (list(obj.data),))


def _reduce_own_class(obj: Any) -> Any:
    return NotImplemented  # the user's own persistent class, pickled as itself


_PLAIN_REDUCERS: dict[type, Callable[[Any], Any]] = {
    Mapping: _reduce_mapping,
    FlatMapping: _reduce_flat,
    List: _reduce_list,
    Set: _reduce_set,
    Counter: _reduce_counter,
}


def _subclass_reducer(obj: Any) -> Callable[[Any], Any] | None:
    for base, reduce in _PLAIN_REDUCERS.items():
        if isinstance(obj, base):
            return reduce
    if isinstance(obj, Broken):
        raise broken_object_error(obj)
    if isinstance(obj, Persistent):
        return _reduce_own_class
    return None


def broken_object_error(obj: Any, path: str = "") -> ExportError:
    """Why an object ZODB could not load (a ``ZODB.broken.Broken``) stops an export.

    ZODB gives an object whose class this process cannot import as a broken
    stand-in that holds the state but not the class; a dump of it would load
    as that stand-in, not as the user's object. The usual cause is a class
    defined in the application's ``__main__``, which the exporter process
    (another program) cannot import.
    """
    kind = type(obj)
    name = f"{kind.__module__}.{kind.__name__}"
    oid = getattr(obj, "_p_oid", None)
    where = f"{path}: " if path else ""
    which = f" (oid 0x{oid.hex()})" if isinstance(oid, bytes) else ""
    return ExportError(
        f"{where}cannot export a {name}{which}: this process cannot import the class "
        f"{name}, so ZODB gives the object as a broken stand-in, and a dump would hold "
        "that instead of your object. A class defined in the application's __main__ (its "
        "script) cannot be imported by another process such as the exporter: define it "
        "in an importable module (myapp/models.py), or export in the application's own "
        "process (Exporter(..., process=False))"
    )


# -- pickle, reusing the serialized form of unchanged nodes ---------------------------
#
# A warm export spends almost all of its time turning small persistent nodes
# into pickle opcodes, and between two scheduled exports almost none of them
# changed. So the pickle writer keeps, per persistent node, the pickle
# *fragment* it wrote for it, and the serials it was written from.
#
# Why fragments can be concatenated: the dump is written without a memo, so
# the opcodes for a value refer to nothing outside themselves, and a dict is
# just EMPTY_DICT followed by any number of (MARK, keys and values, SETITEMS)
# batches; a list the same with EMPTY_LIST and APPENDS. The stream is PROTO 5,
# the fragments, STOP, and has no FRAME opcodes (framing is optional in a
# pickle; the writer hands large blocks to the file itself). Fragments are
# cut out of what a memo-less C pickler writes, so each value is written
# exactly as that pickler writes it.
#
# Why a fragment is known to be current: the snapshot's connection loads
# every object as of the snapshot's tid, and an object's ``_p_serial`` is
# the tid of the revision loaded. The same serial means the same state, so
# a node whose serial, and whose every persistent descendant's serial, is
# what its fragment was written from, has the same fragment. A change deep
# in the tree does not change its ancestors' serials: that is why every
# persistent node under a cached fragment is checked (its serial compared,
# cheap when it is in the ZODB cache) and only the nodes on the way to a
# change are pickled again. Nothing relies on invalidation bookkeeping.
#
# Entries, keyed by oid, are ``(serials, fragment, descendants, layout)``:
#
# sealed ``(serials, fragment, descendants, layout)``
#     a small subtree (at most _SEAL_NODES persistent nodes; a value node or
#     a BTree bucket with its values), written as one block. ``serials`` is
#     its own serial followed by those of ``descendants`` (every persistent
#     object the pickler met inside, in that order), or None when the
#     subtree holds something serials do not determine (the user's own
#     persistent classes, whose pickled form is their code's business): it
#     is then pickled again on every export. A bucket's ``layout`` keeps its
#     fragment in pieces, one per value, so that when a value changes and the
#     bucket itself did not, only that value is pickled again (the check of
#     the bucket's serials already says which: see ``_patch_bucket``); None
#     for other nodes. Measured at 10k objects with 100 accounts changed
#     between exports, the pickling took 4 ms instead of 11.5 ms.
# open ``(serial, pieces, None, None)``
#     a large node: a mapping spread over several buckets and its interior
#     BTree nodes, a large list. ``pieces`` are bytes, child value nodes and
#     ``(child,)`` for a BTree's own interior nodes and buckets; each child
#     has an entry of its own, checked as it is written. So a change in one
#     account pickles that account again, not its bucket or the mapping.
#     ``serial`` is None when the node's own items hold a user object.
#
# The table costs about twice the size of the dump (the fragments, and the
# buckets' layouts) plus about 100-150 bytes per persistent node (entry,
# serials, a reference to the node, which keeps its ghost alive), and holds
# only what the last export reached: each export builds a new table from
# the entries it used.

_PROTO = b"\x80\x05"
_FRAME = 0x95
_STOP = b"."
_MARK = b"("
_EMPTY_DICT = b"}"
_EMPTY_LIST = b"]"
_SETITEMS = b"u"
_APPENDS = b"e"
_EMPTY_SET = b"\x8f"
_ADDITEMS = b"\x90"
#: Most values in one MARK ... SETITEMS/APPENDS batch (pickle's own batch size).
_BATCH = 1000
#: A subtree with more persistent objects than this is cached in parts, so
#: that a change inside it pickles a part of it again, not all of it.
_SEAL_NODES = 100
#: Bytes gathered before they are handed to the file.
_WRITE_EVERY = 1 << 18

#: ``(serials, body, descendants, layout)``: see the comment above.
_Entry = tuple[Any, Any, Any, Any]
_Table = dict[bytes, _Entry]

_activate = Persistent._p_activate
_serial_of = operator.attrgetter("_p_serial")
_consume = collections.deque(maxlen=0).extend


class FragmentCaches:
    """Fragment tables that outlive one export: one per snapshot connection.

    The exporter process owns one and installs it with
    :func:`keeping_fragments` around each request. Tables are keyed by
    connection because their entries hold that connection's objects; a
    connection that goes away takes its table with it. Historical snapshots
    (``at=``) never use them.
    """

    def __init__(self) -> None:
        self._tables: weakref.WeakKeyDictionary[Any, _Table] = weakref.WeakKeyDictionary()

    def table(self, connection: Any) -> _Table:
        return self._tables.get(connection, {})

    def keep(self, connection: Any, table: _Table) -> None:
        self._tables[connection] = table

    def entries(self) -> int:
        return sum(len(table) for table in self._tables.values())


_fragment_caches: contextvars.ContextVar[FragmentCaches | None] = contextvars.ContextVar(
    "snaptree_fragment_caches", default=None
)


@contextlib.contextmanager
def keeping_fragments(caches: FragmentCaches) -> Iterator[None]:
    """Let pickle exports inside this block reuse, and keep, the fragments in *caches*."""
    token = _fragment_caches.set(caches)
    try:
        yield
    finally:
        _fragment_caches.reset(token)


class _Unsealable(Exception):
    """Raised by the sealing pickler: this subtree is to be cached in parts."""


class _FragmentPickler(_PlainPickler):
    """The memo-less plain pickler, recording every persistent object it writes.

    ``found`` lists them in the order met; ``volatile`` is set when one of
    them is not a snaptree node, or a mapping whose buckets it did not
    record. With ``limit``, it raises :class:`_Unsealable` past that many
    objects or at a mapping spread over several buckets.
    """

    def __init__(self, file: Any, writer: _IncrementalPickleWriter) -> None:
        super().__init__(file, None)
        self._writer = writer
        self.found: list[Any] = []
        self.serials: list[bytes] = []
        self.volatile = False
        self.limit: int | None = None

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        reduce = _PLAIN_REDUCERS.get(kind)
        if reduce is None:
            if kind is type:
                return NotImplemented
            reduce = _subclass_reducer(obj)
            if reduce is None:
                return NotImplemented
            if reduce is _reduce_own_class:
                self.volatile = True
        if self.limit is not None and len(self.found) >= self.limit:
            raise _Unsealable
        obj._p_activate()  # its serial is the snapshot's only once it is loaded
        self.found.append(obj)
        self.serials.append(obj._p_serial)
        self._writer.count_node()
        if reduce is _reduce_mapping:
            state = obj.__getstate__()
            if state is None:
                return (dict, ())
            if len(state) == 1:  # one bucket, held inline: all of it is in this record
                flat = iter(state[0][0][0])
                return (dict, (), None, None, zip(flat, flat, strict=True))
            if self.limit is not None:
                raise _Unsealable
            self.volatile = True  # its buckets' serials are not recorded
        return reduce(obj)


def _strip(data: bytes) -> bytes:
    """The opcodes of one pickle without PROTO, FRAME and STOP: a fragment to concatenate."""
    if len(data) > 11 and data[2] == _FRAME:
        if 11 + int.from_bytes(data[3:11], "little") == len(data):
            return data[11:-1]  # the usual case: one frame holding everything
    elif len(data) < 64:
        return data[2:-1]  # too small to be framed
    import pickletools

    # Several frames, or a large str/bytes written outside any frame: keep
    # every opcode but PROTO, FRAME and STOP.
    ops = [(op.name, pos) for op, _arg, pos in pickletools.genops(data)]
    return b"".join(
        data[pos:end]
        for (name, pos), (_, end) in itertools.pairwise(ops)
        if name not in ("PROTO", "FRAME")
    )


class _IncrementalPickleWriter:
    """Writes the plain pickle of a tree, reusing the fragments of unchanged nodes."""

    def __init__(self, out: Any, connection: Any, table: _Table) -> None:
        self._out = out
        self._connection = connection
        self._old = table
        #: The entries this export used: the table to keep for the next one.
        self.table: _Table = {}
        self._parts: list[bytes] = []
        self._size = 0
        self.nodes = 0
        self._next_gc = _GC_EVERY
        self._buffer = io.BytesIO()
        self._pickler = _FragmentPickler(self._buffer, self)

    def count_node(self, n: int = 1) -> None:
        self.nodes += n
        if self.nodes >= self._next_gc:
            self._next_gc = self.nodes + _GC_EVERY
            if self._connection is not None:
                self._connection.cacheGC()

    def _emit(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size > _WRITE_EVERY:
            self._flush()

    def _flush(self) -> None:
        if self._parts:
            self._out.write(b"".join(self._parts))
            self._parts = []
            self._size = 0

    def dump(self, node: Any) -> None:
        self._emit(_PROTO)
        if _is_node(node):
            self._write(node, False)
        else:  # a scalar or a user object at the subtree's root: nothing to reuse
            self._emit(self._pickle(node, None)[0])
        self._emit(_STOP)
        self._flush()

    def _write(self, node: Any, internal: bool) -> None:
        """Write *node* (a value node, or with *internal* a BTree's interior node or bucket)."""
        node._p_activate()
        oid = node._p_oid
        entry = self.table.get(oid) or self._old.get(oid)
        if entry is not None:
            serials, body, descendants, layout = entry
            if serials is None:
                pass  # written afresh every time
            elif descendants is None:  # open
                if serials == node._p_serial:
                    self.table[oid] = entry
                    self._write_pieces(body, internal)
                    return
            else:  # sealed
                current = node._p_serial
                if descendants:
                    # In C, not a Python loop: this runs for every node of a warm export.
                    _consume(map(_activate, descendants))
                    current += b"".join(map(_serial_of, descendants))
                if current == serials:
                    self.table[oid] = entry
                    self.count_node(len(descendants) + (not internal))
                    self._emit(body)
                    return
                if layout is not None and current[:8] == serials[:8]:
                    patched = self._patch_bucket(entry, current)
                    if patched is not None:
                        self.table[oid] = patched
                        self._emit(patched[1])
                        return
        entry = self._build(node, internal)
        self.table[oid] = entry
        if entry[2] is None:
            self._write_pieces(entry[1], internal)
        else:
            self._emit(entry[1])

    def _write_pieces(self, pieces: list[Any], internal: bool) -> None:
        if not internal:
            self.count_node()
        for piece in pieces:
            kind = type(piece)
            if kind is bytes:
                self._emit(piece)
            elif kind is tuple:
                self._write(piece[0], True)
            else:
                self._write(piece, False)

    # -- new entries ---------------------------------------------------------------

    def _build(self, node: Any, internal: bool) -> _Entry:
        if not internal or isinstance(node, OOBucket):
            before = self.nodes
            try:
                return self._seal(node, internal)
            except _Unsealable:
                self.nodes = before  # counted again as its parts are written
        self._volatile = False
        pieces = self._open_pieces(node, internal)
        return (None if self._volatile else node._p_serial, pieces, None, None)

    def _seal(self, node: Any, internal: bool) -> _Entry:
        serial = node._p_serial
        if internal:  # a bucket: MARK, its keys and values, SETITEMS
            return self._seal_bucket(node)
        fragment, found, serials, volatile = self._pickle(node, _SEAL_NODES)
        found, serials = found[1:], serials[1:]  # the node itself, met first
        if volatile:
            return (None, fragment, tuple(found), None)
        return (b"".join([serial, *serials]), fragment, tuple(found), None)

    def _seal_bucket(self, bucket: Any) -> _Entry:
        """A bucket's sealed entry, pickled value by value so that its layout can be kept.

        The layout is ``(chunks, spans)``: the bucket's opcodes in pieces
        (runs of keys and scalars, and one fragment per value node), and per
        value node ``(first, end, chunk)``, its place among the entry's
        descendants and its chunk. A change inside one value then pickles
        that value again, not the whole bucket (see :meth:`_patch_bucket`).
        """
        state = bucket.__getstate__()
        flat = state[0] if state else ()
        if not flat:
            return (bucket._p_serial, b"", (), None)
        chunks: list[bytes] = []
        spans: list[tuple[int, int, int]] = []
        found: list[Any] = []
        serials = [bucket._p_serial]
        self._volatile = False
        run: list[Any] = []
        for value in flat:
            if not _is_node(value):
                run.append(value)
                continue
            if run:
                chunks.append(self._run(run))
                run = []
            fragment, met, met_serials, volatile = self._pickle(value, _SEAL_NODES - len(found))
            self._volatile |= volatile
            spans.append((len(found), len(found) + len(met), len(chunks)))
            chunks.append(fragment)
            found += met
            serials += met_serials
        if run:
            chunks.append(self._run(run))
        body = _MARK + b"".join(chunks) + _SETITEMS
        if self._volatile:
            return (None, body, tuple(found), None)
        return (b"".join(serials), body, tuple(found), (chunks, spans))

    def _patch_bucket(self, entry: _Entry, current: bytes) -> _Entry | None:
        """The entry of a bucket whose own serial is unchanged, pickling only its changed values.

        *current* is the serials of the bucket and of the entry's descendants
        as they are now (8 bytes each, in the entry's order). The values to
        pickle again are those whose span of it differs, found by XOR rather
        than a Python loop over the bucket. None when a changed value no
        longer seals the same way (it gained or lost nodes, holds a user
        object): the bucket is then built anew.
        """
        serials, _body, descendants, (chunks, spans) = entry
        units = len(current) // 8
        diff = int.from_bytes(current, "big") ^ int.from_bytes(serials, "big")
        changed = []
        while diff:
            position = units - 1 - (diff.bit_length() - 1) // 64  # the first that differs
            part = bisect.bisect_right(spans, position - 1, key=_span_first) - 1
            changed.append(spans[part])
            diff &= (1 << ((units - 1 - spans[part][1]) * 64)) - 1  # the rest of that value
        before = self.nodes
        chunks = list(chunks)
        found = list(descendants)
        repickled = 0
        for first, end, chunk in changed:
            try:
                fragment, met, met_serials, volatile = self._pickle(found[first], _SEAL_NODES)
            except _Unsealable:
                volatile = True
            if volatile or len(met) != end - first:
                self.nodes = before
                return None
            chunks[chunk] = fragment
            found[first:end] = met
            current = current[: 8 + 8 * first] + b"".join(met_serials) + current[8 + 8 * end :]
            repickled += end - first
        self.count_node(len(found) - repickled)
        body = _MARK + b"".join(chunks) + _SETITEMS
        return (current, body, tuple(found), (chunks, spans))

    def _pickle(self, value: Any, limit: int | None) -> tuple[bytes, list[Any], list[bytes], bool]:
        """Pickle *value* alone: its fragment, the persistent objects met and their serials."""
        pickler = self._pickler
        pickler.found = []
        pickler.serials = []
        pickler.volatile = False
        pickler.limit = limit
        self._buffer.seek(0)
        self._buffer.truncate()
        try:
            pickler.dump(value)
        except BaseException:
            # A pickler interrupted midway may keep fast-mode bookkeeping
            # (ids of objects it was inside); start the next one clean.
            self._pickler = _FragmentPickler(self._buffer, self)
            raise
        volatile = pickler.volatile or any(o._p_oid is None for o in pickler.found)
        return _strip(self._buffer.getvalue()), pickler.found, pickler.serials, volatile

    def _open_pieces(self, node: Any, internal: bool) -> list[Any]:
        """A large node's own opcodes, with its children left as nodes to write."""
        head = [] if internal else [_EMPTY_DICT]
        if isinstance(node, OOBucket):
            state = node.__getstate__()
            return self._item_pieces(state[0] if state else (), _SETITEMS)
        if isinstance(node, OOBTree):  # a snaptree Mapping, or one of its interior nodes
            state = node.__getstate__()
            if state is None:
                return head
            if len(state) == 1:  # one bucket, held inline
                return head + self._item_pieces(state[0][0][0], _SETITEMS)
            return head + [(child,) for child in state[0][::2]]
        if isinstance(node, FlatMapping):
            flat = [x for item in node.data.items() for x in item]
            return [_EMPTY_DICT, *self._item_pieces(flat, _SETITEMS)]
        if isinstance(node, List):
            return [_EMPTY_LIST, *self._item_pieces(node.data, _APPENDS)]
        if isinstance(node, Set):  # more than _SEAL_NODES objects of yours in it
            return [_EMPTY_SET, *self._item_pieces(list(node.data), _ADDITEMS)]
        # a Counter: always small enough to seal
        raise AssertionError(f"no open form for {type(node).__name__}")  # pragma: no cover

    def _item_pieces(self, values: Any, end: bytes) -> list[Any]:
        """MARK, the values, *end*, in batches; snaptree nodes among them stay nodes."""
        values = list(values)
        step = 2 * _BATCH if end == _SETITEMS else _BATCH
        pieces: list[Any] = []
        for start in range(0, len(values), step):
            pieces.append(_MARK)
            run: list[Any] = []
            for value in values[start : start + step]:
                if _is_node(value):
                    if run:
                        pieces.append(self._run(run))
                        run = []
                    pieces.append(value)
                else:
                    run.append(value)
            if run:
                pieces.append(self._run(run))
            pieces.append(end)
        return pieces

    def _run(self, values: list[Any]) -> bytes:
        """The opcodes that push *values*, cut out of the pickle of a list of them."""
        fragment, found, _serials, _volatile = self._pickle(values, None)
        if found:
            # A user object, or a node inside a tuple: this node's own serial
            # does not cover it, so the node is pickled again next time.
            self._volatile = True
        # ']' item 'a' for one value, ']' '(' items 'e' for several.
        return fragment[1:-1] if len(values) == 1 else fragment[2:-1]


def _span_first(span: tuple[int, int, int]) -> int:
    return span[0]


def _is_node(value: Any) -> bool:
    """A stored snaptree node (mapping, flat mapping, list, set, counter): fragments cover it."""
    kind = type(value)
    if kind in _PLAIN_REDUCERS or (
        kind not in _SCALAR_KINDS
        and isinstance(value, Mapping | FlatMapping | List | Set | Counter)
    ):
        return value._p_oid is not None
    return False


_SCALAR_KINDS = frozenset({str, int, float, bool, type(None), bytes, tuple, frozenset})


class _TooDeepForFragments(Exception):
    """The tree is nested too deeply for the fragment writer: write it with the plain one."""


@contextlib.contextmanager
def _pickling_errors(subtree: str, too_deep: Exception) -> Iterator[None]:
    """Turn what a pickler raises on a bad tree into one clear ExportError (or *too_deep*)."""
    where = normalize_subtree(subtree)
    try:
        yield
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        if "cyclic" not in str(exc):
            raise
        raise ExportError(
            f"{where} holds a reference cycle (through your own persistent objects); "
            "the pickle format writes a tree: export it in the zodb format"
        ) from None
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ExportError(f"cannot pickle the tree at {where}: {exc}") from exc


def _write_pickle_plain(node: Any, out: Any, connection: Any, subtree: str) -> int:
    """The C pickler alone, without fragments: slower when warm, but one C frame a level."""
    pickler = _PlainPickler(out, connection)
    too_deep = ExportError(
        f"{normalize_subtree(subtree)} holds a reference cycle or is nested too deeply "
        "for the pickle writer; export it in the zodb format"
    )
    with _pickling_errors(subtree, too_deep):
        pickler.dump(node)
    return pickler.nodes


def _write_pickle_incremental(node: Any, out: Any, connection: Any, subtree: str) -> int:
    """Fragments when they will be kept for the next export, else the plain C pickler.

    A one-off export (``store.export()``, a past ``at=``) gains nothing from
    fragments and would hold all of them until it ends: measured at 1M
    objects, 1.5 GiB peak against 0.2 GiB for the plain writer.
    """
    caches = _fragment_caches.get()
    if caches is None or getattr(connection, "before", None) is not None:
        return _write_pickle_plain(node, out, connection, subtree)
    writer = _IncrementalPickleWriter(out, connection, caches.table(connection))
    with _pickling_errors(subtree, _TooDeepForFragments()):
        writer.dump(node)
    caches.keep(connection, writer.table)
    return writer.nodes


# -- json ---------------------------------------------------------------------------

_JSON_SCALARS = (str, int, float, bool, type(None))
_JSON_KEYS = (str, int)


class _JsonWriter:
    """Streams a tree as JSON, naming the path of any value JSON cannot hold."""

    def __init__(self, out: Any, connection: Any) -> None:
        self._out = out
        self._parts: list[str] = []
        self._size = 0
        self._connection = connection
        self._encode = json.JSONEncoder(
            ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False
        ).encode
        self.nodes = 0

    def _emit(self, text: str) -> None:
        self._parts.append(text)
        self._size += len(text)
        if self._size > 1 << 16:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            self._out.write("".join(self._parts).encode())
            self._parts = []
            self._size = 0

    def _node(self) -> None:
        self.nodes += 1
        if self.nodes % _GC_EVERY == 0 and self._connection is not None:
            self._connection.cacheGC()

    def _scalar(self, value: Any, path: str) -> str:
        if type(value) is float and not math.isfinite(value):
            raise UnstorableValueError(path, f"JSON cannot hold the float {value!r}")
        if isinstance(value, _JSON_SCALARS) and not isinstance(value, Persistent):
            try:
                return _utf8_safe(self._encode(value), path)
            except ValueError:  # int() -> str past sys.get_int_max_str_digits()
                raise UnstorableValueError(path, _long_int_detail()) from None
        if isinstance(value, Broken):
            raise broken_object_error(value, path)
        raise UnstorableValueError(
            path,
            f"JSON cannot hold a {type(value).__module__}.{type(value).__qualname__}; "
            "export this tree as pickle or zodb, or store it as str/int/float",
        )

    def _key(self, key: Any, path: str) -> str:
        if not isinstance(key, _JSON_KEYS) or isinstance(key, bool):
            raise UnstorableValueError(
                f"{path}/{key!r}",
                f"JSON object keys are strings; cannot write the {type(key).__name__} key {key!r}",
            )
        try:
            return _utf8_safe(self._encode(str(key)), f"{path}/{key!r}")
        except ValueError:  # an int key past sys.get_int_max_str_digits()
            raise UnstorableValueError(f"{path}/<int key>", _long_int_detail()) from None

    def write(self, value: Any, path: str) -> None:
        if isinstance(value, Mapping | FlatMapping | dict):
            if isinstance(value, Persistent):
                self._node()
            items = value.items()
            if isinstance(value, Mapping):
                # Small leaf mappings (the common case: a record) go through
                # the C encoder in one call; anything else item by item.
                items = list(items) if len(value) <= 64 else items
                if isinstance(items, list) and all(
                    type(v) in _JSON_SCALARS and type(k) in _JSON_KEYS for k, v in items
                ):
                    try:
                        text = self._encode(dict(items))
                        if text.isascii() or _encodes(text):
                            self._emit(text)
                            return
                    except (TypeError, ValueError):
                        pass  # find and name the offending value below
            self._emit("{")
            first = True
            for key, item in items:
                key_text = self._key(key, path)
                child = f"{path}/{key}"
                self._emit(("" if first else ",") + key_text + ":")
                first = False
                # inline rather than a helper: one Python frame per level of the tree
                if type(item) in _JSON_SCALARS:
                    self._emit(self._scalar(item, child))
                else:
                    self.write(item, child)
            self._emit("}")
        elif isinstance(value, List | list | tuple):
            if isinstance(value, Persistent):
                self._node()
            self._emit("[")
            for index, item in enumerate(value):
                if index:
                    self._emit(",")
                if type(item) in _JSON_SCALARS:
                    self._emit(self._scalar(item, f"{path}/{index}"))
                else:
                    self.write(item, f"{path}/{index}")
            self._emit("]")
        elif isinstance(value, Counter):
            self._node()
            self._emit(self._scalar(value.value, path))
        else:
            self._emit(self._scalar(value, path))


def _encodes(text: str) -> bool:
    """Whether *text* is valid UTF-8 once encoded: no lone surrogates (``"\\ud800"``)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _utf8_safe(text: str, path: str) -> str:
    if text.isascii() or _encodes(text):
        return text
    raise UnstorableValueError(
        path,
        "a string holding a lone surrogate (such as '\\ud800'), which UTF-8, and so a "
        "JSON file, cannot hold; export this tree as pickle or zodb, or store the text "
        "without it",
    )


def _long_int_detail() -> str:
    return (
        f"an int of more than {sys.get_int_max_str_digits()} digits, which Python will "
        "not turn into JSON text (nor read back); export this tree as pickle or zodb, "
        "or store it as a string"
    )


def _write_json(node: Any, out: Any, connection: Any, subtree: str) -> int:
    writer = _JsonWriter(out, connection)
    base = normalize_subtree(subtree).rstrip("/")
    try:
        writer.write(node, base)
    except RecursionError:
        raise ExportError(
            f"{normalize_subtree(subtree)} is nested too deeply for the json writer "
            f"(about {sys.getrecursionlimit() // 2} levels); export it as pickle or zodb"
        ) from None
    writer._emit("\n")
    writer.flush()
    return writer.nodes


# -- zodb -----------------------------------------------------------------------------


def _write_zodb(node: Any, out: Any, connection: Any, subtree: str) -> int:
    """Copy the records reachable from *node* in ``Connection.exportFile``'s format.

    The format (checked against ZODB 6.4's ExportImport): ``ZEXP``, then for
    each record its oid, its length as 8 bytes and its pickle, then the end
    marker. exportFile itself keeps its queue in a list it pops from the
    front, which is quadratic for large trees; this loop is the same walk
    with a deque. Records are read through the snapshot's connection, so
    they are the snapshot's versions.
    """
    oid = getattr(node, "_p_oid", None)
    if oid is None:
        raise ExportError(
            f"the zodb format exports a persistent object; {normalize_subtree(subtree)} "
            f"is a {type(node).__name__}; export it as pickle or json, or export its parent"
        )
    load = connection._storage.load  # the snapshot's MVCC view (public since ZODB 5)
    out.write(b"ZEXP")
    queue: collections.deque[bytes] = collections.deque([oid])
    seen = {oid}
    count = 0
    references: list[bytes] = []
    while queue:
        oid = queue.popleft()
        data, _serial = load(oid)
        references.clear()
        referencesf(data, references)
        for ref in references:
            if ref not in seen:
                seen.add(ref)
                queue.append(ref)
        out.write(oid + p64(len(data)) + data)
        count += 1
    out.write(export_end_marker)
    return count


_WRITERS: dict[str, Callable[[Any, Any, Any, str], int]] = {
    "pickle": _write_pickle_incremental,
    "json": _write_json,
    "zodb": _write_zodb,
}


# -- verify ---------------------------------------------------------------------------

_HEX = frozenset("0123456789abcdef")


def read_manifest(dump: Path) -> dict[str, Any]:
    """The manifest of *dump*, with every field verify relies on checked (VerifyError if not)."""
    path = manifest_path(dump)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise VerifyError(
            f"{dump}: no manifest ({path.name}); the export did not finish, or the "
            "manifest was not copied with the dump"
        ) from None
    except (OSError, ValueError) as exc:
        raise VerifyError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(data, dict) or "snaptree_manifest" not in data:
        raise VerifyError(f"{path}: not a snaptree manifest")
    fmt = data.get("format")
    if fmt not in FORMATS:
        raise VerifyError(f"{dump}: the manifest names an unknown format {fmt!r}")
    problems = [
        f"{name} {data.get(name, '(missing)')!r} is not {what}"
        for name, what, valid in (
            ("tid", "16 hex digits", lambda v: _is_hex(v, 16)),
            ("sha256", "64 hex digits", lambda v: _is_hex(v, 64)),
            ("bytes", "a count", _is_count),
            ("objects", "a count", _is_count),
            ("committed_at", "an ISO 8601 time with its UTC offset", _is_aware_time),
        )
        if not valid(data.get(name))
    ]
    if problems:
        raise VerifyError(
            f"{path}: damaged manifest: {'; '.join(problems)}; export the dump again, or "
            "restore the manifest that was written with it"
        )
    return data


def _is_hex(value: Any, digits: int) -> bool:
    return isinstance(value, str) and len(value) == digits and set(value) <= _HEX


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_aware_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return datetime.datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def verify(path: str | os.PathLike[str], *, allow: Iterable[str | type] = ()) -> ExportInfo:
    """Check a dump against its manifest (size, sha256) and load it; return what it holds.

    The dump is read the way ``snaptree import`` reads it, so a forged dump
    with a matching manifest still cannot run code: a pickle with the
    allow-list unpickler (plain containers and scalars, datetime, decimal,
    plus the classes named in *allow*); a zodb dump record by record with
    the same unpickler, never with ZODB's importFile (see
    :func:`snaptree._zexp.read_zexp`); JSON with the standard parser.
    Raises VerifyError saying what does not match or does not load.
    """
    dump = Path(path)
    if dump.name.endswith(MANIFEST_SUFFIX):
        dump = dump.with_name(dump.name[: -len(MANIFEST_SUFFIX)])
    dump = Path(os.path.realpath(dump)) if dump.is_symlink() else dump
    manifest = read_manifest(dump)
    fmt = manifest["format"]
    try:
        size = dump.stat().st_size
    except FileNotFoundError:
        raise VerifyError(f"{dump}: the dump is missing (its manifest exists)") from None
    if size != manifest["bytes"]:
        raise VerifyError(
            f"{dump}: {size} bytes, but the manifest says {manifest['bytes']}; "
            "the file is truncated or was changed after the export"
        )
    digest = hashlib.sha256()
    with open(dump, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != manifest["sha256"]:
        raise VerifyError(
            f"{dump}: sha256 {digest.hexdigest()} does not match the manifest's "
            f"{manifest['sha256']}; the file was changed after the export"
        )
    summary = _load_dump(dump, fmt, manifest["objects"], allow)
    return ExportInfo(
        path=dump,
        format=fmt,
        tid=manifest["tid"],
        committed_at=datetime.datetime.fromisoformat(manifest["committed_at"]),
        objects=manifest["objects"],
        bytes=manifest["bytes"],
        sha256=manifest["sha256"],
        subtree=manifest.get("subtree", "/"),
        source=manifest.get("source", ""),
        seconds=manifest.get("seconds", 0.0),
        snaptree_version=manifest.get("snaptree_version", ""),
        summary=summary,
    )


def describe(value: Any) -> dict[str, Any]:
    """A short summary of a loaded plain tree: its type, size and first keys."""
    summary: dict[str, Any] = {"type": type(value).__name__}
    if isinstance(value, dict):
        keys = list(value)
        summary["keys"] = len(keys)
        summary["first_keys"] = [str(k) for k in keys[:10]]
    elif isinstance(value, list):
        summary["items"] = len(value)
    return summary


def _load_dump(dump: Path, fmt: str, objects: int, allow: Iterable[str | type]) -> dict[str, Any]:
    """Load *dump* as import would, and describe it; any failure is a VerifyError."""
    from ._zexp import read_zexp
    from .imports import load_source

    try:
        if fmt != "zodb":
            return describe(load_source(dump, format=fmt, allow=allow))
        with open(dump, "rb") as f:
            value, records = read_zexp(f, str(dump), allow)
    except Error as exc:
        raise VerifyError(f"the dump does not load: {exc}") from None
    if records != objects:
        raise VerifyError(f"{dump}: {records} records, but the manifest says {objects}")
    return {"records": records, **describe(value)}
