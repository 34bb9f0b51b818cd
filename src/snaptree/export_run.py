"""One run of an export schedule: a dump unless nothing changed, then ``latest``, then retention.

:func:`export_into` is what every scheduled export runs, wherever it runs:
in the exporter process for an :class:`snaptree.Exporter`, in-process for
an in-memory store, in ``snaptree export --dir``. Reading it top to bottom:
hold the directory (:mod:`snaptree.dump_directory`), remove the
temporaries of killed writers, skip if the newest complete dump already
holds the snapshot's tid, write the dump and its manifest
(:func:`snaptree.exports.export_snapshot`), point ``latest`` at it, and
delete what retention no longer keeps (:mod:`snaptree.retention`).
:func:`export_file` is the same run over one fixed file (``snaptree export
-o FILE --every``).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _atomic, paths, retention
from ._directory_lock import DirectoryLock
from .dump_directory import (
    OWNED,
    complete_dumps,
    dump_name,
    latest_points_at,
    lock_directory,
    point_latest,
)
from .errors import ArgumentError, Error, VerifyError, one_line
from .exports import FragmentCaches, export_snapshot
from .manifest import (
    ExportInfo,
    check_compression,
    check_format,
    read_manifest,
    resolve_compression,
    resolve_format,
)
from .retention import Retention

if TYPE_CHECKING:
    from .store import Store


@dataclass(frozen=True)
class RunResult:
    """One scheduled run: the dump written, or why nothing was; the dumps retention removed."""

    info: ExportInfo | None
    directory: Path
    format: str
    skipped_tid: str | None = None
    deleted: list[Path] = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        return self.info is None

    @property
    def flush_seconds(self) -> float:
        return 0.0 if self.info is None else self.info.flush_seconds

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "written": self.info is not None,
            "directory": str(self.directory),
            "format": self.format,
            "deleted": [str(p) for p in self.deleted],
        }
        if self.info is not None:
            data.update(self.info.to_json())
            del data["summary"]
        else:
            data["tid"] = self.skipped_tid
            data["reason"] = "nothing committed since the last export"
        return data

    def log_line(self) -> str:
        """The one line a run logs: file, tid, objects, bytes, seconds."""
        if self.info is None:
            return (
                f"nothing committed since the last export (tid {self.skipped_tid}); "
                f"wrote nothing in {self.directory}"
            )
        i = self.info
        removed = f", removed {len(self.deleted)} old" if self.deleted else ""
        return (
            f"exported {i.path} tid {i.tid}: {i.objects} objects, {i.bytes} bytes "
            f"in {i.seconds:.3f} s{removed}"
        )


def export_into(
    store: Store,
    directory: str | os.PathLike[str],
    *,
    format: str = "pickle",  # noqa: A002
    subtree: str = "/",
    keep: int | Retention | None = None,
    compress: str | None = None,
    at: datetime.datetime | str | bytes | None = None,
    force: bool = False,
    lock: DirectoryLock | None = None,
    fragments: FragmentCaches | None = None,
) -> RunResult:
    """One scheduled run: export into *directory* unless nothing changed, point latest, retain.

    Writes nothing, and says so in the result, when the newest complete
    dump of this format (compressed or not) already holds the tid the
    snapshot would export (unless *force*); ``latest`` is then pointed at
    that dump if it was not. The run holds the directory's lock for this
    format, taken here unless the caller holds it for a whole schedule
    (*lock*). *keep*: N (the newest N) or a :class:`snaptree.Retention`.
    *compress*: ``"zstd"`` names the dump ``….pickle.zst``. *fragments*:
    see :func:`snaptree.exports.export`.

    *at* is refused: a past state in a schedule directory would become
    ``latest`` and count for retention, and the next run would skip as
    "nothing new". Export it to a file of its own.
    """
    check_format(format)
    policy = retention.check_keep(keep)
    check_compression(compress)
    if at is not None:
        raise ArgumentError(
            f"at={at!r}: a past state must not go into a schedule directory, where it would "
            "become latest and count for retention; export it to a file of its own "
            "(store.export(path, at=...), or snaptree export -o FILE --at ...)"
        )
    if lock is None:
        with lock_directory(directory, format) as held:
            return _export_held(store, held, subtree, policy, compress, force, fragments)
    lock.check_covers(directory, format)
    return _export_held(store, lock, subtree, policy, compress, force, fragments)


def _export_held(
    store: Store,
    lock: DirectoryLock,
    subtree: str,
    keep: Retention | None,
    compress: str | None,
    force: bool,
    fragments: FragmentCaches | None,
) -> RunResult:
    folder, fmt = lock.directory, lock.format
    _atomic.existing_directory(folder, f"cannot export {fmt} dumps")  # still there?
    _atomic.remove_stale_temporaries(folder, owned=OWNED)
    existing = complete_dumps(folder, fmt)
    newest_tid = _newest_tid(existing[-1], subtree, folder, fmt) if existing else None
    last_tid = None if force else newest_tid
    info = export_snapshot(
        store,
        lambda snap: folder / dump_name(fmt, snap.committed_at, snap.tid, compress),
        format=fmt,
        at=None,
        subtree=subtree,
        compress=compress,
        unless_tid=last_tid,
        fragments=fragments,
    )
    if info is None:
        # latest may lag behind (a historical export of older versions moved it back)
        if not latest_points_at(folder, fmt, existing[-1]):
            point_latest(folder, fmt, existing[-1])
        return RunResult(None, folder, fmt, skipped_tid=last_tid)
    point_latest(folder, fmt, info.path)
    return RunResult(info, folder, fmt, deleted=retention.retain(folder, fmt, keep, info.path))


def export_file(
    store: Store,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,  # noqa: A002
    subtree: str = "/",
    at: datetime.datetime | str | bytes | None = None,
    compress: str | None = None,
    skip_unchanged: bool = False,
    fragments: FragmentCaches | None = None,
) -> RunResult:
    """One run into a fixed file name; with *skip_unchanged*, nothing is written if the file's
    manifest already holds the tid the snapshot would export. ``format=None`` (``compress``):
    from the name."""
    target = Path(path)
    format = resolve_format(target, format)  # noqa: A001
    compress = resolve_compression(target, compress)
    last_tid = _unchanged_tid(target, subtree) if skip_unchanged and target.is_file() else None
    info = export_snapshot(
        store,
        lambda snap: target,
        format=format,
        at=at,
        subtree=subtree,
        compress=compress,
        unless_tid=last_tid,
        fragments=fragments,
    )
    return RunResult(info, target.parent, format, skipped_tid=None if info else last_tid)


def _newest_tid(newest: Path, subtree: str, folder: Path, fmt: str) -> str | None:
    """The tid the *newest* dump's manifest vouches for (None if it cannot be trusted);
    ArgumentError if that dump holds another subtree than *subtree*.

    A run skips when the snapshot it would write holds this tid. And a dump
    is named after its commit time and tid: a dump of another subtree at the
    same tid would take the name of the one there and replace it (nothing
    committed between two runs whose --subtree differs).
    """
    try:
        info = read_manifest(newest)
    except VerifyError:
        return None
    wanted = paths.absolute(paths.parse(subtree, what="subtree"))
    if info.subtree != wanted:
        raise ArgumentError(
            f"{folder} holds {fmt} dumps of the subtree {info.subtree} (the newest: "
            f"{newest.name}); a dump directory keeps the dumps of one subtree, so that none "
            f"replaces another of the same tid: export {wanted} into another directory"
        )
    return info.tid


def _unchanged_tid(dump: Path, subtree: str) -> str | None:
    """The tid *dump*'s manifest vouches for, if *dump* is of *subtree*; else None (export anew).

    A run skips when the snapshot it would write holds this tid: nothing
    was committed since. A dump of another part of the tree, or one whose
    manifest cannot be trusted, is not what the run would write.
    """
    try:
        info = read_manifest(dump)
    except VerifyError:
        return None
    if info.subtree != paths.absolute(paths.parse(subtree, what="subtree")):
        return None
    return info.tid


def describe_failure(exc: BaseException) -> str:
    """One line for a failed run: a snaptree error's message, else the exception's type too."""
    if isinstance(exc, Error):
        return one_line(str(exc))
    return one_line(f"unexpected {type(exc).__name__}: {exc}")


def failure_json(
    exc: BaseException,
    *,
    target: Path,
    directory: bool,
    format: str | None,  # noqa: A002
) -> dict[str, Any]:
    """The ``--json`` object of a run that failed: ``written`` false, ``failed`` true, the error."""
    return {
        "written": False,
        "failed": True,
        "error": describe_failure(exc),
        "directory" if directory else "path": str(target),
        "format": format,
    }
