"""Points in a store's history: tids, the times they encode, and the moments users name.

A snapshot may be asked for "as of" a moment: an aware datetime, an ISO 8601
text, a tid in hex or its 8 bytes. They all become the tid of that moment
here, and the errors for a moment out of reach (before the tree existed, or
packed away) are worded here, saying how far back the history goes.
"""

from __future__ import annotations

import datetime

from persistent.timestamp import TimeStamp
from ZODB.utils import p64, u64

from .errors import ArgumentError

#: What a snapshot's ``at`` may be.
Point = datetime.datetime | str | bytes


#: A tid's low 32 bits count the seconds of its minute in steps of 60 / 2**32 s.
_TICKS_PER_MINUTE = 1 << 32
_MICROSECONDS_PER_MINUTE = 60_000_000


def tid_time(tid: bytes) -> datetime.datetime:
    """The commit time a tid encodes, as an aware UTC datetime, truncated to the microsecond.

    Computed in integers, not through ``TimeStamp.timeTime()``'s float, which
    rounds: a time a microsecond late would make ``at=committed_at - 1 µs``
    still include that commit.
    """
    stamp = TimeStamp(tid)
    micro = (u64(tid) & (_TICKS_PER_MINUTE - 1)) * _MICROSECONDS_PER_MINUTE // _TICKS_PER_MINUTE
    second, micro = divmod(micro, 1_000_000)
    return datetime.datetime(
        stamp.year(),
        stamp.month(),
        stamp.day(),
        stamp.hour(),
        stamp.minute(),
        second,
        micro,
        tzinfo=datetime.UTC,
    )


def parse_point(at: Point) -> bytes:
    """Turn a datetime, a hex tid or an 8-byte tid into the tid of that moment."""
    if isinstance(at, bytes) and len(at) == 8:
        return at
    if isinstance(at, datetime.datetime):
        if at.tzinfo is None:
            raise ArgumentError(
                f"{at.isoformat()}: give a timezone (for example {at.isoformat()}+00:00)"
            )
        # A datetime has microseconds, a tid finer steps: "at" a datetime means
        # up to the end of that microsecond, so a commit time read back from a
        # tid (truncated, by tid_time) still includes that commit. In integers:
        # the first tick of the next microsecond, less one.
        end = at.astimezone(datetime.UTC) + datetime.timedelta(microseconds=1)
        minute = TimeStamp(end.year, end.month, end.day, end.hour, end.minute, 0.0).raw()
        micro = end.second * 1_000_000 + end.microsecond
        ticks = -(-micro * _TICKS_PER_MINUTE // _MICROSECONDS_PER_MINUTE)  # rounded up
        return p64((u64(minute) & ~(_TICKS_PER_MINUTE - 1)) + ticks - 1)
    if isinstance(at, str):
        text = at.strip()
        if len(text) == 16:
            try:
                return bytes.fromhex(text)
            except ValueError:
                pass
        try:
            when = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise ArgumentError(
                f"{at!r} is neither a tid (16 hex digits) nor an ISO 8601 time "
                "such as 2026-11-25T17:00:00+00:00"
            ) from None
        if when.tzinfo is None:  # read as UTC, it would silently be another moment
            raise ArgumentError(
                f"{at!r}: give a timezone, such as {text}+00:00 or {text}Z for UTC "
                "(a time without one would be read in some zone without saying which)"
            )
        return parse_point(when)
    raise ArgumentError(f"{at!r}: expected a datetime, a hex tid or 8 tid bytes")


def describe_point(at: Point, point: bytes) -> str:
    """The moment as the user named it, with its tid."""
    asked = at.isoformat() if isinstance(at, datetime.datetime) else at
    if isinstance(asked, bytes):
        return f"tid {point.hex()}"
    return f"{asked} (tid {point.hex()})"


def no_tree_at(source: str, at: Point, point: bytes, oldest: bytes | None) -> ArgumentError:
    """The error for a moment at which *source* holds no tree; *oldest* is its oldest state."""
    asked = describe_point(at, point)
    if oldest is None:
        return ArgumentError(
            f"there is no tree in {source} at {asked}: it did not exist yet, or "
            "the history of that time was packed away; ask for a later time "
            "(store.last_tid() is the newest)"
        )
    return ArgumentError(
        f"there is no tree in {source} at {asked}: the oldest state of the "
        f"tree it keeps is from {tid_time(oldest).isoformat()} (tid {oldest.hex()}); "
        "the tree did not exist yet at the time asked, or the history before it was "
        "packed away: ask for that time or later"
    )


def packed_away(source: str, at: Point, point: bytes, missing: Exception) -> ArgumentError:
    """The error for a snapshot that met a record its storage no longer keeps for that moment."""
    return ArgumentError(
        f"part of the tree as of {describe_point(at, point)} is no longer "
        f"kept in {source} ({missing!r} could not be read): its history "
        "was packed away after that time; ask for a later time"
    )
