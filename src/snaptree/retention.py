"""Which complete dumps a schedule directory keeps, and deleting the others.

The policy is a pure function of the list of dumps (:func:`dumps_to_delete`:
today the newest ``keep``), so it is tested without files. Whatever the
policy, :func:`retain` deletes only complete dumps of the format it is
given: named like snaptree's dumps and vouched for by a manifest that reads
as snaptree's; never the one ``latest`` points at, nor anything else in
the directory. It runs under the directory's lock (see
:func:`snaptree.dump_directory.lock_directory`), so no other writer races it.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import _atomic
from .dump_directory import complete_dumps, is_dump_of, latest_link
from .errors import ArgumentError, VerifyError
from .manifest import MANIFEST_SUFFIX, manifest_path, read_manifest

#: Most dumps ``keep`` may retain per format.
MAX_KEEP = 100_000


def check_keep(keep: int | None) -> int | None:
    """How many complete dumps to retain per format: 1 up to 100,000, or None (all)."""
    if keep is None:
        return None
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ArgumentError(f"keep must be a whole number of dumps, not {keep!r}")
    if not 1 <= keep <= MAX_KEEP:
        raise ArgumentError(f"keep must be between 1 and {MAX_KEEP}, not {keep}")
    return keep


def dumps_to_delete(dumps: list[Path], keep: int | None) -> list[Path]:
    """The oldest of *dumps* (sorted oldest first) beyond the newest *keep*."""
    if keep is None or len(dumps) <= keep:
        return []
    return dumps[: len(dumps) - keep]


def retain(directory: Path, format: str, keep: int | None) -> list[Path]:  # noqa: A002
    """Delete the complete dumps of *format* beyond the newest *keep*; return those deleted.

    Also removes manifests left without their dump (a crash between the two
    renames of an export, or between the two deletions here).
    """
    protected = set()
    link = latest_link(directory, format)
    if link.is_symlink():
        protected.add(directory / os.readlink(link))
    deleted = []
    for dump in dumps_to_delete(complete_dumps(directory, format), keep):
        if dump in protected or not _vouched_for(dump):
            continue
        # The dump first: a crash in between leaves a manifest without a dump,
        # which is never mistaken for a complete dump and is removed below.
        _atomic.discard(dump)
        _atomic.discard(manifest_path(dump))
        deleted.append(dump)
    for entry in directory.iterdir():
        if not entry.name.endswith(MANIFEST_SUFFIX):
            continue
        dump = entry.with_name(entry.name[: -len(MANIFEST_SUFFIX)])
        if is_dump_of(dump.name, format) and not dump.exists() and _vouched_for(dump):
            _atomic.discard(entry)
    return deleted


def _vouched_for(dump: Path) -> bool:
    """Whether *dump*'s manifest reads as one snaptree wrote (whether or not the dump exists)."""
    try:
        read_manifest(dump)
    except VerifyError:
        return False
    return True
