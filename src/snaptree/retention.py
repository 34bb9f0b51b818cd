"""Which complete dumps a schedule directory keeps, and deleting the others.

The rules are those of restic's ``forget`` (and, but for one point, borg's
``prune``), so that operators meet what they know:

- ``last N``: the N newest dumps;
- ``hourly/daily/weekly/monthly/yearly N``: the newest dump of each of the N
  newest hours (days, ISO weeks, months, years) that have a dump. Periods
  with no dump do not count: ``daily 7`` with a dump every other day keeps
  14 days of them. As in restic, when a rule still has periods to fill once
  it reaches the oldest dump, it keeps the oldest dump too (the longest
  history the count allows);
- ``within DURATION``: every dump committed less than DURATION before the
  newest dump (restic's meaning; measured from the newest dump rather than
  from now, so that an exporter stopped for a week does not come back to
  an empty directory).

A dump is kept if any rule keeps it, and a dump kept by one rule still
counts for the others (restic; borg would let each dump count for one rule
only). Times are each dump's commit time as its manifest records it, in
UTC. Whatever the rules, the newest complete dump is never deleted, nor the
newest whose checksum holds (if newer ones are damaged), nor the one
``latest`` points at.

The policy is a pure function of the dumps' commit times (:func:`decide`),
tested without files. :func:`retain` applies it in a directory under the
directory's lock (see :func:`snaptree.dump_directory.lock_directory`): it
deletes only complete dumps of the format it is given, named like
snaptree's dumps and vouched for by a manifest that reads as snaptree's;
nothing else in the directory. :func:`prune` is the same outside a
schedule, with a dry run that says what would go and why.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

from . import _atomic
from .dump_directory import (
    complete_dumps,
    is_dump_of,
    latest_targets,
    lock_directory,
    read_dump_manifest,
)
from .errors import ArgumentError, VerifyError
from .manifest import (
    FORMATS,
    MANIFEST_SUFFIX,
    check_checksum,
    check_format,
    manifest_path,
    read_manifest,
)

#: Most dumps (or periods) one rule may keep.
MAX_KEEP = 100_000


def _hour(t: datetime.datetime) -> tuple[int, ...]:
    return (t.year, t.month, t.day, t.hour)


def _day(t: datetime.datetime) -> tuple[int, ...]:
    return (t.year, t.month, t.day)


def _week(t: datetime.datetime) -> tuple[int, ...]:
    return tuple(t.isocalendar())[:2]


def _month(t: datetime.datetime) -> tuple[int, ...]:
    return (t.year, t.month)


def _year(t: datetime.datetime) -> tuple[int, ...]:
    return (t.year,)


#: The period rules: name, period, the period of a UTC time, how a period is shown.
_PERIODS: tuple[tuple[str, str, Callable[[datetime.datetime], tuple[int, ...]], str], ...] = (
    ("hourly", "hour", _hour, "%04d-%02d-%02dT%02d"),
    ("daily", "day", _day, "%04d-%02d-%02d"),
    ("weekly", "week", _week, "%04d-W%02d"),
    ("monthly", "month", _month, "%04d-%02d"),
    ("yearly", "year", _year, "%04d"),
)
_RULES = ("last", *(name for name, *_ in _PERIODS))


def _check_count(name: str, value: int | None) -> None:
    if value is None:
        return
    what = "keep" if name == "last" else f"keep {name}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{what} must be a whole number, not {value!r}")
    if not 1 <= value <= MAX_KEEP:
        raise ArgumentError(f"{what} must be between 1 and {MAX_KEEP}, not {value}")


@dataclass(frozen=True)
class Retention:
    """Which complete dumps of a format to keep: restic's rules (see :mod:`snaptree.retention`).

    ``Retention(last=24, daily=7, weekly=4)`` keeps the 24 newest dumps, the
    newest of each of the 7 newest days and of the 4 newest ISO weeks that
    have dumps. ``within`` (a timedelta) keeps every dump committed less
    than that before the newest. Periods are UTC. At least one rule must be
    given; counts are 1 to 100,000.
    """

    last: int | None = None
    hourly: int | None = None
    daily: int | None = None
    weekly: int | None = None
    monthly: int | None = None
    yearly: int | None = None
    within: datetime.timedelta | None = None

    def __post_init__(self) -> None:
        for name in _RULES:
            _check_count(name, getattr(self, name))
        if self.within is not None and (
            not isinstance(self.within, datetime.timedelta) or self.within <= datetime.timedelta(0)
        ):
            raise ArgumentError(f"keep within must be a positive timedelta, not {self.within!r}")
        if all(getattr(self, f.name) is None for f in fields(self)):
            raise ArgumentError(
                "a retention policy needs at least one rule (last, hourly, daily, weekly, "
                "monthly, yearly or within)"
            )

    def describe(self) -> str:
        """``last 24, daily 7, within 2d``: the rules given, in order."""
        parts = [
            f"{name} {getattr(self, name)}" for name in _RULES if getattr(self, name) is not None
        ]
        if self.within is not None:
            parts.append(f"within {format_duration(self.within)}")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "within" and getattr(self, f.name) is not None
        }
        if self.within is not None:
            data["within_seconds"] = self.within.total_seconds()
        return data


def check_keep(keep: int | Retention | None) -> Retention | None:
    """A retention policy from what ``keep=`` accepts: N (the newest N), a Retention, or None."""
    if keep is None or isinstance(keep, Retention):
        return keep
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ArgumentError(
            f"keep must be a whole number of dumps or a snaptree.Retention, not {keep!r}"
        )
    if not 1 <= keep <= MAX_KEEP:
        raise ArgumentError(f"keep must be between 1 and {MAX_KEEP}, not {keep}")
    return Retention(last=keep)


#: Units a duration is written in: seconds, minutes, hours, days, weeks.
_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")


def parse_duration(text: str) -> datetime.timedelta:
    """``90s``, ``15m``, ``36h``, ``7d``, ``2w``, ``1d12h``, or plain seconds: a timedelta.

    Months and years are refused: they have no fixed length, and a retention
    or an alert threshold should not depend on which month it is.
    """
    spec = text.strip().lower()
    try:
        seconds = float(spec)
    except ValueError:
        parts = _DURATION.findall(spec)
        if not parts or "".join(n + u for n, u in parts) != spec:
            raise ArgumentError(
                f"{text!r} is not a duration; write it like 90s, 15m, 36h, 7d, 2w or 1d12h "
                "(s, m for minutes, h, d, w; no months or years: use days)"
            ) from None
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    span = datetime.timedelta(seconds=seconds)
    if not datetime.timedelta(0) < span < datetime.timedelta(days=100 * 365):
        # (compared as a timedelta: "1e-9" is above 0 but a timedelta of 0)
        raise ArgumentError(f"{text!r}: a duration must be above 0 and under 100 years")
    return span


def parse_retention_window(text: str) -> datetime.timedelta:
    """A ``--keep-within`` duration: :func:`parse_duration`, refusing ``m``.

    restic and borg, whose rules the retention follows, read ``1m`` as a
    month; snaptree's durations read it as a minute. The same words must not
    keep a month of dumps in one tool and delete all but a minute's in the
    other.
    """
    if any(unit == "m" for _, unit in _DURATION.findall(text.strip().lower())):
        raise ArgumentError(
            f"{text!r} is ambiguous here: restic and borg read m as months, snaptree as "
            "minutes; write minutes as seconds or hours (900s, 1h) and months as days (31d)"
        )
    return parse_duration(text)


def format_duration(span: datetime.timedelta) -> str:
    """A duration as :func:`parse_duration` reads it: ``3d4h``, ``15m``, ``1m30s``, ``0.25s``."""
    rest = round(span.total_seconds(), 3)
    if rest < 60:
        return f"{rest:g}s"
    parts = []
    for unit in "dhm":
        count, rest = divmod(rest, _UNITS[unit])
        if count:
            parts.append(f"{count:.0f}{unit}")
    if rest:
        parts.append(f"{rest:g}s")
    return "".join(parts)


# -- the pure policy ----------------------------------------------------------------------


class Dated(NamedTuple):
    """A dump as the policy sees it: something to name it by, and its commit time (aware)."""

    dump: Any
    committed_at: datetime.datetime


@dataclass(frozen=True)
class Decision:
    """What the policy says of one dump: kept or not, and why."""

    dump: Any
    committed_at: datetime.datetime
    keep: bool
    #: Why it is kept (each rule that keeps it), or why no rule does.
    reasons: tuple[str, ...] = field(default=())


def decide(dumps: Sequence[Dated], policy: Retention) -> list[Decision]:
    """Which of *dumps* *policy* keeps, newest first, with the reasons (restic's algorithm).

    Pure: times come from the arguments, never from a clock. Of two dumps
    with the same commit time (ZODB's tids can be closer than a microsecond
    when the clock was stepped back), the one given later is taken as the
    newer: :func:`plan` gives them oldest first, by name (time, then tid).
    """
    ordered = [
        (entry, when)
        for _, when, entry in sorted(
            (
                (index, entry.committed_at.astimezone(datetime.UTC), entry)
                for index, entry in enumerate(dumps)
            ),
            key=lambda item: (item[1], item[0]),
            reverse=True,
        )
    ]
    if not ordered:
        return []
    newest = ordered[0][1]
    # Each counting rule: name, its period of a time (None: every dump is its own), count left.
    rules: list[list[Any]] = []
    if policy.last is not None:
        rules.append(["last", None, policy.last, None, None])
    for name, unit, period_of, shown in _PERIODS:
        count = getattr(policy, name)
        if count is not None:
            rules.append([name, unit, count, period_of, shown])
    last_kept: dict[str, Any] = {}
    decisions = []
    for index, (entry, when) in enumerate(ordered):
        oldest = index == len(ordered) - 1
        kept: list[str] = []
        why_not: list[str] = []
        if index == 0:
            kept.append("newest")
        if policy.within is not None:
            age = newest - when
            if age < policy.within:
                kept.append(f"within {format_duration(policy.within)}")
            else:
                why_not.append(
                    f"{format_duration(age)} older than the newest, not within "
                    f"{format_duration(policy.within)}"
                )
        for rule in rules:
            name, unit, count, period_of, shown = rule
            if count == 0:
                why_not.append(
                    f"not among the {getattr(policy, name)} newest"
                    if unit is None
                    else f"older than the {getattr(policy, name)} {unit}s kept ({name})"
                )
                continue
            period = index if period_of is None else period_of(when)
            if period != last_kept.get(name, _NONE) or oldest:
                same = period == last_kept.get(name, _NONE)
                kept.append(f"oldest {name}" if same else name)
                last_kept[name] = period
                rule[2] -= 1
            else:
                why_not.append(f"{unit} {shown % period} has a newer dump kept ({name})")
        keep = bool(kept)
        decisions.append(
            Decision(entry.dump, entry.committed_at, keep, tuple(kept if keep else why_not))
        )
    return decisions


_NONE = object()


# -- in a directory ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pruned:
    """What retention decided for one format in a directory, and what it deleted."""

    directory: Path
    format: str
    policy: Retention
    decisions: list[Decision]
    #: Dumps whose manifest does not read as snaptree's: never deleted, never counted.
    ignored: list[tuple[Path, str]]
    deleted: list[Path]
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "format": self.format,
            "policy": self.policy.to_json(),
            "dry_run": self.dry_run,
            "dumps": [
                {
                    "path": str(d.dump.path),
                    "tid": d.dump.tid,
                    "committed_at": d.committed_at.isoformat(),
                    "keep": d.keep,
                    "reasons": list(d.reasons),
                }
                for d in self.decisions
            ],
            "ignored": [{"path": str(p), "reason": why} for p, why in self.ignored],
            "deleted": [str(p) for p in self.deleted],
        }


def plan(
    directory: Path,
    format: str,  # noqa: A002
    policy: Retention,
    *,
    intact: Path | None = None,
) -> Pruned:
    """What *policy* keeps and deletes among the complete dumps of *format* in *directory*.

    Deletes nothing. The dump ``latest`` points at is kept whatever the policy,
    and so is the newest dump whose checksum holds (*intact* names one known
    to hold: the dump a run has just written), so that a damaged newest dump
    is never the only one left.
    """
    histories: dict[tuple[str, str], list[Dated]] = {}
    ignored = []
    for dump in complete_dumps(directory, format):
        try:
            info = read_dump_manifest(dump)
        except VerifyError as exc:
            ignored.append((dump, f"{exc}; never deleted"))
            continue
        histories.setdefault((info.source, info.subtree), []).append(Dated(info, info.committed_at))
    protected = latest_targets(directory, format)
    decisions: list[Decision] = []
    # Each history (the store and subtree the manifests name) on its own, as restic groups
    # snapshots by host and paths: the dumps of another store that shares the directory
    # never count for this one's rules, and its newest is never deleted. The store is named
    # as it was written (db.fs and ./db.fs are two histories, each keeping what the rules
    # keep of it): when there are several, the newest of each says which it is.
    for (source, subtree), dated in histories.items():
        history = [
            d
            if d.keep or d.dump.path not in protected
            else Decision(d.dump, d.committed_at, True, ("latest points at it",))
            for d in decide(dated, policy)
        ]
        if not all(d.keep for d in history):
            _keep_newest_intact(history, intact)
        if len(histories) > 1:
            named = f"newest of the dumps of {source or '(no source)'}, subtree {subtree}"
            history = [
                replace(d, reasons=tuple(named if r == "newest" else r for r in d.reasons))
                for d in history
            ]
        decisions += history
    if len(histories) > 1:
        decisions.sort(key=lambda d: d.committed_at, reverse=True)
    return Pruned(directory, format, policy, decisions, ignored, deleted=[], dry_run=True)


def _keep_newest_intact(decisions: list[Decision], intact: Path | None) -> None:
    """Keep the newest dump whose size and checksum match its manifest (*decisions*: newest first).

    Usually that is the newest dump, kept anyway, and one read of it (none
    after a run, which knows what it wrote) settles it. If the newest are
    damaged, the policy alone would keep them and delete every good one.
    """
    for index, decision in enumerate(decisions):
        if decision.dump.path != intact:
            try:
                check_checksum(decision.dump)
            except VerifyError:
                continue
        if not decision.keep:
            decisions[index] = Decision(
                decision.dump,
                decision.committed_at,
                True,
                ("the newest dump whose checksum holds (newer ones are damaged)",),
            )
        return


def apply(
    directory: Path,
    format: str,  # noqa: A002
    policy: Retention,
    *,
    intact: Path | None = None,
) -> Pruned:
    """Delete the complete dumps of *format* that *policy* does not keep; say what it did.

    Runs under the directory's lock. *intact*: as for :func:`plan`.
    """
    planned = plan(directory, format, policy, intact=intact)
    deleted = []
    for decision in planned.decisions:
        if decision.keep:
            continue
        dump = decision.dump.path
        # The dump first: a crash in between leaves a manifest without a dump,
        # which is never mistaken for a complete dump and is removed by retain.
        _atomic.discard(dump)
        _atomic.discard(manifest_path(dump))
        deleted.append(dump)
    return replace(planned, deleted=deleted, dry_run=False)


def retain(
    directory: Path,
    format: str,  # noqa: A002
    keep: Retention | None,
    written: Path | None = None,
) -> list[Path]:
    """After a scheduled run that wrote *written*: apply *keep* (if any); the dumps deleted.

    With a policy, also removes the manifests left without their dump (a
    crash between the two renames of an export, or between the two
    deletions of :func:`apply`). Not without one, and not one whose dump is
    a symlink that leads nowhere (a volume not mounted): the manifest is
    the only record of what a dump held, and a run that deletes no dump
    deletes no record of one either.
    """
    if keep is None:
        return []
    deleted = apply(directory, format, keep, intact=written).deleted
    for entry in directory.iterdir():
        if not entry.name.endswith(MANIFEST_SUFFIX):
            continue
        dump = entry.with_name(entry.name[: -len(MANIFEST_SUFFIX)])
        if is_dump_of(dump.name, format) and not os.path.lexists(dump) and _vouched_for(dump):
            _atomic.discard(entry)
    return deleted


def prune(
    directory: str | os.PathLike[str],
    keep: int | Retention,
    *,
    format: str | None = None,  # noqa: A002
    dry_run: bool = False,
) -> list[Pruned]:
    """Apply a retention policy to a directory of dumps, outside any schedule.

    Every format with dumps in *directory* (or only *format*), each under its
    lock (an ExportError naming the holder if a schedule holds it). With
    *dry_run*, nothing is deleted and no lock is taken: the result says what
    would go and why.
    """
    policy = check_keep(keep)
    assert policy is not None
    folder = _atomic.existing_directory(directory, "cannot prune")
    formats = [check_format(format)] if format is not None else list(FORMATS)
    if format is None:
        formats = [fmt for fmt in formats if complete_dumps(folder, fmt)]
    if dry_run:
        return [plan(folder, fmt, policy) for fmt in formats]
    # Every lock first: a schedule holding one fails the prune before anything is
    # deleted, rather than after the formats before it were pruned (and not reported).
    with contextlib.ExitStack() as held:
        locks = [held.enter_context(lock_directory(folder, fmt, verb="prune")) for fmt in formats]
        return [apply(lock.directory, lock.format, policy) for lock in locks]


def _vouched_for(dump: Path) -> bool:
    """Whether *dump*'s manifest reads as one snaptree wrote (whether or not the dump exists)."""
    try:
        read_manifest(dump)
    except VerifyError:
        return False
    return True
