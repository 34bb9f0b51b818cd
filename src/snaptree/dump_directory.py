"""A directory of dumps: how they are named, which are complete, ``latest``, and its one writer.

A directory holds, per format:

- ``snaptree-<UTC time of the snapshot>-<tid>.<ext>`` and its
  ``.manifest.json``: one complete dump. Names sort in commit order. A
  compressed dump adds ``.zst`` (``….pickle.zst``); both kinds are dumps of
  their format, for "nothing new", ``latest`` and retention alike.
- ``latest.<ext>``: a relative symlink to the newest complete dump,
  replaced atomically (a new link renamed over the old one), so
  ``pickle.load(open("dumps/latest.pickle", "rb"))`` always reads a whole
  dump. A symlink rather than a pointer file, because every program can
  open it without knowing about snaptree. When the newest dump is
  compressed the link is ``latest.<ext>.zst``, and the other one is
  removed: a ``latest.pickle`` left pointing at an older dump would be
  read as the newest.
- ``.<name>.<pid>.<random>.tmp``: a dump being written. A temporary left by
  a killed exporter is removed by the next run in that directory.
- ``.snaptree-export-<format>.lock``: held by the one writer of that
  format's dumps (:func:`lock_directory`).

What goes into it and when is :func:`snaptree.export_run.export_into`'s
business; which dumps leave it, :mod:`snaptree.retention`'s.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from pathlib import Path

from . import _atomic
from ._compression import ZSTD_SUFFIX, compression_of
from ._directory_lock import DirectoryLock
from .errors import VerifyError
from .manifest import SUFFIXES, ExportInfo, manifest_path, read_manifest

log = logging.getLogger(__name__)

DUMP_NAME = re.compile(
    r"^snaptree-(?P<time>\d{8}T\d{6}\.\d{6}Z)-(?P<tid>[0-9a-f]{16})"
    r"(?P<suffix>\.pickle|\.json|\.zexp)(?P<zst>\.zst)?$"
)
#: The names a schedule writes: dumps, manifests and latest links; their
#: temporaries are the ones a run removes once their writer is gone.
OWNED = re.compile(
    DUMP_NAME.pattern[:-1] + r"(?:\.manifest\.json)?$|^latest\.(pickle|json|zexp)(\.zst)?$"
)


def dump_name(
    format: str,  # noqa: A002
    committed_at: datetime.datetime,
    tid: str,
    compression: str | None = None,
) -> str:
    """``snaptree-20261125T171200.123456Z-<tid>.pickle``: sorts in commit order."""
    stamp = _stamp(committed_at)
    zst = ZSTD_SUFFIX if compression else ""
    return f"snaptree-{stamp}-{tid}{SUFFIXES[format]}{zst}"


def _stamp(committed_at: datetime.datetime) -> str:
    """A commit time as a dump's name carries it: UTC, to the microsecond."""
    return committed_at.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def is_dump_of(name: str, format: str) -> bool:  # noqa: A002
    """Whether *name* is named like a dump of *format* (complete or not)."""
    match = DUMP_NAME.match(name)
    return match is not None and match["suffix"] == SUFFIXES[format]


def read_dump_manifest(dump: Path) -> ExportInfo:
    """:func:`read_manifest` of a dump in a directory, checked against the dump's name.

    The name carries the commit time, tid, format and compression the export
    wrote into the manifest: a manifest that says otherwise was not written
    with this dump, and status (which takes the newest by name) and
    retention (by the manifest's time) would disagree on which dump is the
    newest, or count a dump in another format's history.
    """
    info = read_manifest(dump)
    match = DUMP_NAME.match(dump.name)
    if match is None:
        return info
    named = (match["tid"], match["time"], match["suffix"], bool(match["zst"]))
    recorded = (info.tid, _stamp(info.committed_at), SUFFIXES[info.format], bool(info.compression))
    if named != recorded:
        raise VerifyError(
            f"{manifest_path(dump)}: damaged manifest: it says tid {info.tid} committed "
            f"{info.committed_at.isoformat()}, format {info.format}"
            f"{', ' + info.compression if info.compression else ''}; the dump's name says "
            "otherwise; export the dump again, or restore the manifest that was written with it"
        )
    return info


def complete_dumps(directory: Path, format: str) -> list[Path]:  # noqa: A002
    """The complete dumps of *format* in *directory* (named ours, with a manifest), oldest first."""
    return sorted(
        (
            entry
            for entry in directory.iterdir()
            # (a directory named like a dump is nobody's dump, and retention must not try it)
            if is_dump_of(entry.name, format)
            and manifest_path(entry).is_file()
            and not entry.is_dir()
        ),
        key=lambda p: p.name,
    )


def latest_link(directory: Path, format: str, compression: str | None = None) -> Path:  # noqa: A002
    """``latest.<ext>``, or ``latest.<ext>.zst`` for the link to a compressed dump."""
    return directory / f"latest{SUFFIXES[format]}{ZSTD_SUFFIX if compression else ''}"


def _links(directory: Path, format: str, dump: Path) -> tuple[Path, Path]:  # noqa: A002
    """The ``latest`` link of *dump*'s kind (compressed or not), and the other one."""
    compressed = compression_of(dump)
    return (
        latest_link(directory, format, compressed),
        latest_link(directory, format, None if compressed else "zstd"),
    )


def point_latest(directory: Path, format: str, dump: Path) -> None:  # noqa: A002
    """Point ``latest.<ext>`` (``.zst`` for a compressed *dump*) at *dump*, atomically.

    The link of the other kind goes: it points at an older dump.
    """
    link, other = _links(directory, format, dump)
    _atomic.replace_symlink(link, dump.name)
    if other.is_symlink():
        _atomic.discard(other)
        _atomic.fsync_directory(directory)


def latest_points_at(directory: Path, format: str, dump: Path) -> bool:  # noqa: A002
    """Whether the ``latest`` link of *dump*'s kind points at it, and no other link exists."""
    link, other = _links(directory, format, dump)
    try:
        return os.readlink(link) == dump.name and not other.is_symlink()
    except OSError:
        return False


def latest_targets(directory: Path, format: str) -> set[Path]:  # noqa: A002
    """The dumps the ``latest`` links of *format* point at (one, or none)."""
    return {
        directory / os.readlink(link)
        for link in (latest_link(directory, format), latest_link(directory, format, "zstd"))
        if link.is_symlink()
    }


def lock_directory(
    directory: str | os.PathLike[str],
    format: str,  # noqa: A002
    *,
    verb: str = "export",
) -> DirectoryLock:
    """Become the one writer of *format*'s dumps in *directory* (see DirectoryLock).

    Raises ExportError naming the holder when another writer is (*verb*:
    what the lock is for, in that message). Says once per writer which
    dumps retention will never delete.
    """
    lock = DirectoryLock.acquire(directory, format, verb=verb)
    _warn_about_dumps_without_manifest(lock.directory, format)
    return lock


def _warn_about_dumps_without_manifest(folder: Path, format: str) -> None:  # noqa: A002
    """Name the dumps of *format* in *folder* that have no manifest, which retention keeps.

    A writer renames the manifest before the dump and retention deletes the
    dump before its manifest, so neither a crash nor (with the lock) a second
    writer leaves a dump without its manifest. One without is a copy someone
    made, or a leftover of snaptree versions before the lock, when two
    schedules could share a directory; nothing tells it from a file put there
    on purpose, so it is reported, not deleted.
    """
    strays = sorted(
        entry.name
        for entry in folder.iterdir()
        if is_dump_of(entry.name, format) and not manifest_path(entry).exists()
    )
    if strays:
        log.warning(
            "%s holds %d %s dump(s) without a manifest (%s%s): retention never deletes "
            "them, since they cannot be verified; delete them, or move them out with their "
            "manifests if you have them",
            folder,
            len(strays),
            format,
            ", ".join(strays[:3]),
            ", ..." if len(strays) > 3 else "",
        )
