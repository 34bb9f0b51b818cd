"""Writing one committed snapshot of the tree to a file, with its manifest.

Three formats, one module each:

``pickle`` (:mod:`snaptree._pickle_writer`, :mod:`snaptree._pickle_fragments`)
    ``pickle.load`` gives the tree as plain Python data: snaptree mappings
    become dicts, lists lists, counters ints; the user's own classes stay
    themselves. Repeated exports pass *fragments* and reuse what the last one
    wrote for every node that did not change.
``json`` (:mod:`snaptree._json_writer`)
    The same tree as JSON, streamed the same way. A value JSON cannot hold
    (bytes, a datetime, NaN, a tuple key ...) is an error naming its path.
``zodb`` (:mod:`snaptree._zexp`)
    ZODB's own export format (what ``Connection.exportFile`` writes), copied
    record by record from the storage; nothing is unpickled.

An export, read top to bottom in :func:`export_snapshot`: take a snapshot
(a read-only connection that never syncs, so writers carry on committing
and the dump still shows exactly one committed state), find the subtree,
check the file name (:mod:`snaptree._store_files`), stream the dump into a
temporary file beside it, fsync it, write the manifest
(:mod:`snaptree.manifest`) the same way, then rename the manifest and the
dump into place (:mod:`snaptree._atomic`). A file under a dump's final name
is always whole and vouched for by its manifest.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ZODB.Connection import Connection

from . import _atomic, paths
from ._compression import CompressingWriter
from ._json_writer import write_json
from ._load_many import loading_many
from ._pickle_fragments import FragmentCaches, TooDeepForFragments, write_pickle_with_fragments
from ._pickle_writer import MemoNeeded, write_pickle
from ._store_files import StoreFiles
from ._version import version
from ._zexp import write_zexp
from .errors import ArgumentError, ExportError
from .manifest import (
    ExportInfo,
    check_compression,
    check_format,
    manifest_bytes,
    manifest_path,
    resolve_compression,
    resolve_format,
)

if TYPE_CHECKING:
    from .store import Snapshot, Store

__all__ = ["FragmentCaches", "export", "export_snapshot"]


def export(
    store: Store,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,  # noqa: A002 - the name users know from the CLI
    at: datetime.datetime | str | bytes | None = None,
    subtree: str = "/",
    compress: str | None = None,
    fragments: FragmentCaches | None = None,
    snapshot: Callable[..., AbstractContextManager[Snapshot]] | None = None,
) -> ExportInfo:
    """Write one committed snapshot of the tree (or of *subtree*) to *path*, atomically.

    The snapshot is a read-only connection that never syncs until the dump
    is written, so writers carry on committing while it runs and the dump
    still shows exactly one committed state. ``at`` (an aware datetime or a
    hex tid) exports the tree as it was then, where the storage keeps
    history. ``format`` defaults to the one the name's suffix says
    (:func:`snaptree.manifest.resolve_format`). ``subtree`` is a path in the
    tree (``accounts/a1``; see :mod:`snaptree.paths`). ``compress="zstd"``
    compresses the dump as it is written (a name ending in ``.zst``, which
    also implies it: ``dump.pickle.zst``; see :mod:`snaptree._compression`).

    *path* must be a path, not an open file: the dump is written to a
    temporary file beside it, renamed over it once complete and vouched for
    by a manifest beside it, none of which a file object allows (a failed
    export would leave half a dump in it). The dump is never more readable
    than the store it copies, and never replaces the store's own files.

    *fragments*, kept by the caller from one export to the next, lets a
    pickle export reuse what the last one wrote for every node that did not
    change (see :mod:`snaptree._pickle_fragments`); it costs about twice the
    dump's size in memory, so a one-off export goes without.

    *snapshot* takes the snapshot (``store.snapshot`` if None);
    ``store.export()`` passes one that borrows the calling thread's kept
    connection, whose cache holds what its calls committed.

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
        store,
        lambda snap: Path(path),
        format=format,
        at=at,
        subtree=subtree,
        compress=compress,
        unless_tid=None,
        fragments=fragments,
        snapshot=snapshot,
    )
    assert info is not None
    return info


def export_snapshot(
    store: Store,
    target: Callable[[Snapshot], Path],
    *,
    format: str | None,  # noqa: A002
    at: datetime.datetime | str | bytes | None,
    subtree: str,
    compress: str | None,
    unless_tid: str | None,
    fragments: FragmentCaches | None,
    snapshot: Callable[..., AbstractContextManager[Snapshot]] | None = None,
) -> ExportInfo | None:
    """Take one snapshot, name the dump with ``target(snapshot)`` and write it.

    Returns None, writing nothing, when the snapshot's tid is *unless_tid*
    (nothing was committed since that export). Shared by :func:`export` and
    the schedule, whose file names depend on the snapshot taken. A *format*
    (*compress*) of None is taken from the final name.

    Before the dump is renamed into place, the store's data file is fsynced
    (:meth:`StoreFiles.make_durable`): a store that makes commits visible
    before they are durable must not have a dump published that holds a
    commit a machine crash could still take back.
    """
    if format is not None:
        check_format(format)
    check_compression(compress)
    segments = paths.parse(subtree, what="subtree")
    where = paths.absolute(segments)
    if at is not None:
        fragments = None  # a past state's fragments would serve no later export
    started = time.perf_counter()
    protected = StoreFiles.of(store)
    mode = protected.dump_mode()
    with (snapshot or store.snapshot)(at=at) as snap:
        if unless_tid is not None and snap.tid == unless_tid:
            return None
        node = paths.resolve(snap.root, segments, what="subtree")
        final = Path(target(snap))
        protected.refuse(final)
        protected.refuse(manifest_path(final))
        format = resolve_format(final, format)  # noqa: A001
        compression = resolve_compression(final, compress)
        if final.is_dir():
            raise ExportError(f"cannot write {final}: it is a directory; name a file inside it")
        _atomic.existing_directory(final.parent, f"cannot write {final}")
        temp, dump, objects = _write_dump(
            node, final, format, compression, mode, snap.connection, where, fragments
        )
        tid, committed_at = snap.tid, snap.committed_at
    # The snapshot's connection is back in the pool; what is left is the manifest and renames.
    manifest_temp = None
    try:
        info = ExportInfo(
            path=final,
            format=format,
            tid=tid,
            committed_at=committed_at,
            objects=objects,
            bytes=dump.bytes,
            sha256=dump.sha256,
            subtree=where,
            source=store.source,
            seconds=round(time.perf_counter() - started, 6),
            snaptree_version=version(),
            compression=compression,
        )
        # Both files are complete and fsynced before either is renamed. The
        # manifest is renamed first: a crash between the two renames leaves a
        # manifest without its dump, which no reader takes for a dump and
        # retention removes, rather than a dump no manifest vouches for.
        with _atomic.staged_file(manifest_path(final), mode=mode) as (manifest, manifest_temp):
            manifest.write(manifest_bytes(info))
        flushed = dump.flush_seconds + manifest.flush_seconds
        flushed += protected.make_durable()
        flushed += _atomic.commit(manifest_temp, manifest_path(final))
        flushed += _atomic.commit(temp, final)
    except BaseException:
        _atomic.discard(temp)
        if manifest_temp is not None:
            _atomic.discard(manifest_temp)
        raise
    return replace(info, flush_seconds=round(flushed, 6))


def _write_dump(
    node: Any,
    final: Path,
    format: str,  # noqa: A002
    compression: str | None,
    mode: int,
    connection: Connection,
    where: str,
    fragments: FragmentCaches | None,
) -> tuple[Path, _atomic.HashingWriter, int]:
    """Stream the dump into a fsynced temporary file beside *final*: (temporary, what was
    written, nodes or records written). Nothing is renamed yet."""
    memo = False
    with loading_many(connection):  # once for every attempt: answers not yet read serve a retry
        while True:  # at most three times: each retry gives up fragments or adds the memo
            try:
                with _atomic.staged_file(final, mode=mode) as (out, temp):
                    objects = _write_format(
                        node, out, format, compression, connection, where, fragments, memo
                    )
                return temp, out, objects
            except TooDeepForFragments:
                # The fragment writer recurses in Python, a few frames a level; the
                # plain writer's C pickler takes one a level. Same file, written anew.
                fragments = None
            except MemoNeeded:
                fragments, memo = None, True


def _write_format(
    node: Any,
    out: _atomic.HashingWriter,
    format: str,  # noqa: A002
    compression: str | None,
    connection: Connection,
    where: str,
    fragments: FragmentCaches | None,
    memo: bool,
) -> int:
    """Write *node* to *out* in *format*, through a compressor if asked; return what was written.

    *memo*: a pickle is written by the plain writer with a memo (MemoNeeded).
    """
    sink: Any = out if compression is None else CompressingWriter(out)
    if format == "json":
        objects = write_json(node, sink, connection, where)
    elif format == "zodb":
        objects = write_zexp(node, sink, connection, where)
    elif fragments is not None and fragments.wanted(connection):
        objects = write_pickle_with_fragments(node, sink, connection, where, fragments)
    else:
        objects = write_pickle(node, sink, connection, where, memo=memo)
    if fragments is not None and format == "pickle":
        fragments.written(connection, objects)
    if compression is not None:
        sink.finish()
    return objects
