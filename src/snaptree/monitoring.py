"""Watching exports: the status of a directory of dumps, and a Prometheus textfile of runs.

Two questions an operator asks of a job that runs unattended for years,
answered the way the tools they already run answer them:

- *Is the newest dump recent and whole?* :func:`dump_status` (``snaptree
  status DIR --max-age 1h``, exit 0 or not, for a healthcheck) finds the
  newest complete dump, checks its size and sha256 against its manifest,
  and says how old the state it holds is.
- *Are the runs succeeding?* :class:`MetricsFile` (``--metrics FILE``,
  ``Exporter(metrics=...)``) rewrites a Prometheus textfile after every
  run, for node_exporter's textfile collector: when the last run
  succeeded, how long it took, how large the dump was, how many runs
  failed.

The age is that of the state a restore would give back: now minus the
commit time the manifest records. On a store nobody writes to, no new dump
is needed and the age grows; the metrics file's
``snaptree_export_last_success_timestamp_seconds``, which a run that finds
nothing new also sets, tells that the schedule is alive.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from persistent.timestamp import TimeStamp

from . import _atomic
from .dump_directory import DUMP_NAME, complete_dumps, read_dump_manifest
from .errors import ExportError, VerifyError, one_line
from .export_run import RunResult
from .manifest import FORMATS, ExportInfo, check_checksum, check_format
from .retention import format_duration

log = logging.getLogger(__name__)

# -- the newest dump ----------------------------------------------------------------------


@dataclass(frozen=True)
class DumpStatus:
    """The newest complete dump in a directory: what it holds, how old, and whether it is whole."""

    directory: Path
    #: The newest complete dump (its manifest as read), None if there is none or it is broken.
    newest: ExportInfo | None
    #: The newest dump's path, even when its manifest cannot be read.
    path: Path | None
    #: Now minus the newest dump's commit time.
    age: datetime.timedelta | None
    max_age: datetime.timedelta | None
    #: Why the newest dump cannot be trusted (damaged manifest, checksum mismatch), if so.
    problem: str | None
    checked_at: datetime.datetime

    @property
    def broken(self) -> bool:
        return self.problem is not None

    @property
    def stale(self) -> bool:
        """No complete dump at all, or the newest is older than *max_age*."""
        if self.path is None:
            return True
        return self.max_age is not None and self.age is not None and self.age > self.max_age

    @property
    def ok(self) -> bool:
        return not self.broken and not self.stale

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "ok": self.ok,
            "directory": str(self.directory),
            "path": None if self.path is None else str(self.path),
            "broken": self.broken,
            "stale": self.stale,
            "problem": self.problem,
            "age_seconds": None if self.age is None else round(self.age.total_seconds(), 6),
            "max_age_seconds": None if self.max_age is None else self.max_age.total_seconds(),
            "checked_at": self.checked_at.isoformat(),
        }
        if self.newest is not None:
            info = self.newest.to_json()
            del info["summary"], info["flush_seconds"]
            data["dump"] = info
        return data

    def report(self) -> str:
        """What ``snaptree status`` prints: a verdict, then the facts, a few lines."""
        if self.path is None:
            return f"stale: no complete dump in {self.directory}"
        if self.problem is not None:
            return f"broken: {self.problem}"
        assert self.newest is not None and self.age is not None
        info = self.newest
        limit = "" if self.max_age is None else f", max age {format_duration(self.max_age)}"
        verdict = "stale" if self.stale else "ok"
        kind = info.format + (f", {info.compression}" if info.compression else "")
        return (
            f"{verdict}: {info.path} ({kind}, {info.bytes} bytes, checksum ok)\n"
            f"  tid {info.tid} committed {info.committed_at.isoformat()}, "
            f"{format_duration(self.age)} ago{limit}"
        )


#: How far in the future a dump's commit time may be (clocks of two machines) and count as now.
CLOCK_SKEW = datetime.timedelta(minutes=1)


def dump_status(
    directory: str | os.PathLike[str],
    *,
    format: str | None = None,  # noqa: A002
    max_age: datetime.timedelta | None = None,
    now: datetime.datetime | None = None,
) -> DumpStatus:
    """The newest complete dump in *directory* (of *format*, or of any): age, tid, checksum.

    The newest is the one with the latest commit time in its name, as
    every dump name carries it; it is never passed over for an older one
    because its manifest is damaged or its checksum does not match: that
    is reported as broken. Nothing is loaded (``verify`` does that).
    """
    folder = _atomic.existing_directory(directory, "cannot check the dumps")
    now = now or datetime.datetime.now(datetime.UTC)
    formats = [check_format(format)] if format is not None else list(FORMATS)
    dumps = [dump for fmt in formats for dump in complete_dumps(folder, fmt)]
    status = DumpStatus(folder, None, None, None, max_age, None, now)
    if not dumps:
        return status
    newest = max(dumps, key=_name_time)
    status = replace(status, path=newest)
    try:
        info = read_dump_manifest(newest)
        check_checksum(info)
    except VerifyError as exc:
        return replace(status, problem=one_line(str(exc)))
    age = now - info.committed_at
    if age < -CLOCK_SKEW:  # fresh for as long as the clocks disagree: a stopped exporter hides
        return replace(
            status,
            problem=(
                f"{newest}: committed {info.committed_at.isoformat()}, "
                f"{format_duration(-age)} after this machine's time {now.isoformat()}; the "
                "exporter's clock or this one is wrong, and the dump's age cannot be told"
            ),
        )
    return replace(status, newest=info, age=age)


def _name_time(dump: Path) -> tuple[str, str]:
    match = DUMP_NAME.match(dump.name)
    assert match is not None
    return match["time"], match["tid"]


# -- the Prometheus textfile ------------------------------------------------------------

_PREFIX = "snaptree_export_"
#: name, type, help: what the textfile holds, in this order.
_METRICS = (
    (
        "last_success_timestamp_seconds",
        "gauge",
        "When the last run that succeeded ended (a "
        "dump written, or nothing new to write), in Unix time.",
    ),
    (
        "last_failure_timestamp_seconds",
        "gauge",
        "When the last run that failed ended, in Unix time; 0 if none has.",
    ),
    (
        "last_commit_timestamp_seconds",
        "gauge",
        "Commit time of the newest dump's state, in Unix time.",
    ),
    ("last_duration_seconds", "gauge", "Seconds the last run took."),
    ("last_bytes", "gauge", "Size of the last dump written, in bytes (compressed if it is)."),
    ("last_objects", "gauge", "Objects in the last dump written."),
    ("runs_total", "counter", "Runs, failed ones included."),
    ("failures_total", "counter", "Runs that failed."),
)
_SAMPLE = re.compile(r"^snaptree_export_(\w+)\{[^}]*\} (\S+)$")


class MetricsFile:
    """A Prometheus textfile rewritten after every run of one schedule (node_exporter reads it).

    Written to a temporary name and renamed over *path*, so a reader never
    sees half of it; not fsynced, since it is rewritten on every run and a
    fsync would take the writers' disk time (see the pacing in
    :mod:`snaptree.schedule`). The counters carry on from the file found at
    start, so that runs from cron, one process each, still add up. Name it
    ``*.prom`` in node_exporter's ``--collector.textfile.directory``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        target: str | os.PathLike[str],
        format: str | None,  # noqa: A002
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        labels = {"target": os.path.abspath(target), "format": format or ""}
        self._labels = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        self.values: dict[str, float] = dict.fromkeys((name for name, *_ in _METRICS), 0.0)
        self.values.update(self._previous())
        self.write()  # a path that cannot be written is an error now, not after the first run

    def _previous(self) -> dict[str, float]:
        """The values of the file a previous process left, if it is one of ours."""
        try:
            text = self.path.read_text()
        except (OSError, ValueError):
            return {}
        found = {}
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match and match[1] in self.values:
                try:
                    found[match[1]] = float(match[2])
                except ValueError:
                    continue
        return found

    def succeeded(self, result: RunResult, seconds: float) -> None:
        """Record a run that wrote a dump or found nothing new, and rewrite the file."""
        values = self.values
        values["runs_total"] += 1
        values["last_success_timestamp_seconds"] = self._clock()
        values["last_duration_seconds"] = seconds
        if result.info is not None:
            values["last_bytes"] = result.info.bytes
            values["last_objects"] = result.info.objects
            values["last_commit_timestamp_seconds"] = result.info.committed_at.timestamp()
        elif result.skipped_tid is not None:
            values["last_commit_timestamp_seconds"] = TimeStamp(
                bytes.fromhex(result.skipped_tid)
            ).timeTime()
        self._rewrite()

    def failed(self, seconds: float) -> None:
        """Record a run that failed, and rewrite the file."""
        self.values["runs_total"] += 1
        self.values["failures_total"] += 1
        self.values["last_failure_timestamp_seconds"] = self._clock()
        self.values["last_duration_seconds"] = seconds
        self._rewrite()

    def text(self) -> str:
        lines = []
        for name, kind, help_text in _METRICS:
            lines += [
                f"# HELP {_PREFIX}{name} {help_text}",
                f"# TYPE {_PREFIX}{name} {kind}",
                f"{_PREFIX}{name}{{{self._labels}}} {self.values[name]:.17g}",
            ]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        """Rewrite the file; ExportError if it cannot be written."""
        _atomic.replace_file(self.path, self.text().encode())

    def _rewrite(self) -> None:
        """After a run: a metrics file that cannot be written is logged, never fails the run."""
        try:
            self.write()
        except ExportError as exc:
            log.warning("%s", exc)


def _escape(value: str) -> str:
    """A label value as the text format wants it: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
