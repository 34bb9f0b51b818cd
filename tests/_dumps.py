"""Dumps made up for tests of what reads a directory of them: retention, status.

A real export's commit time is now; weeks of scheduled exports are
fabricated instead: a small dump file and a manifest that vouches for it
(size, sha256) with a chosen commit time and the tid of that time, named
as a schedule names its dumps.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

from persistent.timestamp import TimeStamp

from snaptree.dump_directory import dump_name
from snaptree.manifest import ExportInfo, manifest_bytes, manifest_path


def fabricate(
    directory: Path,
    when: datetime.datetime,
    compressed: bool = False,
    fmt: str = "pickle",
    *,
    source: str = "",
    subtree: str = "/",
) -> Path:
    """A complete dump of *fmt* committed at *when* (aware), as a schedule would have named it;
    its manifest names the store (*source*) and the *subtree* it was exported from."""
    utc = when.astimezone(datetime.UTC)
    tid = TimeStamp(*utc.timetuple()[:5], utc.second + utc.microsecond / 1e6).raw().hex()
    path = directory / dump_name(fmt, when, tid, "zstd" if compressed else None)
    data = f"dump at {when.isoformat()}".encode()
    path.write_bytes(data)
    info = ExportInfo(
        path=path,
        format=fmt,
        tid=tid,
        committed_at=when,
        objects=1,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        compression="zstd" if compressed else None,
        source=source,
        subtree=subtree,
    )
    manifest_path(path).write_bytes(manifest_bytes(info))
    return path
