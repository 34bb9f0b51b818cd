"""Which values the tree stores as they are, which keys it can order, and why others are refused.

Every rule here is about what survives storage unchanged. A stored value is
pickled into its node's record and comes back as a copy, so it must be a
value (equal to the copy), and a key must also keep its place in a sorted
mapping. The messages say what to store instead; the conversion
(:mod:`snaptree._convert`) and the nodes (:mod:`snaptree.tree`) add the path.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import fractions
import uuid
import zoneinfo
from typing import Any

from persistent import Persistent

#: Immutable values stored exactly as they are.
SCALAR_TYPES: frozenset[type] = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        decimal.Decimal,
        fractions.Fraction,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
        uuid.UUID,
    }
)

#: Scalars that may carry a timezone or a fold ZODB cannot pickle: looked at before they are stored.
CLOCK_TYPES: frozenset[type] = frozenset({datetime.datetime, datetime.time})

#: Scalars stored as they are without a look (the fast paths of the conversion and the nodes).
STORED_AS_IS: frozenset[type] = SCALAR_TYPES - CLOCK_TYPES

#: Key types a Mapping can keep in order (besides tuples of them): the scalars
#: but complex numbers and timezones, which do not order. BTrees order None first.
_ORDERED_KEY_TYPES = SCALAR_TYPES - {complex, datetime.timezone}

#: How deep tuples and frozensets may nest inside one another. They are
#: stored inside their node's record, which ZODB pickles recursively (and
#: BTrees compare tuple keys recursively), so nesting past Python's recursion
#: limit would fail at commit; nothing real nests values this deep.
MAX_VALUE_DEPTH = 100

NAN_KEY = (
    "NaN cannot be a key: it is not equal to itself, so it could never be found "
    "again, and in a sorted mapping it hides other keys; use None or a string "
    "such as 'nan' instead"
)

TOO_DEEP = (
    f"tuples and frozensets nested more than {MAX_VALUE_DEPTH} deep cannot be stored: "
    "they are pickled inside their node's record, recursively; use lists (which become "
    "nodes) for deep structures"
)


def clock_problem(value: datetime.datetime | datetime.time) -> str | None:
    """Why the datetime or time *value* cannot be stored as it is, or None if it can.

    ZODB pickles records with protocol 3, which loses two things silently or
    loudly: it cannot name the class method a ``zoneinfo.ZoneInfo`` pickles
    itself with (the commit would fail with a bare PicklingError, far from
    the value), and it drops ``fold``. A ``fold=1`` that picks an instant
    (a naive datetime, the second 01:30 of the night local clocks go back,
    or a timezone whose offset depends on it) would come back as the other
    instant, silently; where fold changes nothing (UTC, a fixed offset, a
    time) it is stored, and comes back equal, with ``fold=0``. Fixed
    offsets (``datetime.timezone``), UTC and other tzinfo classes pickle fine.
    """
    zone = value.tzinfo
    if isinstance(zone, zoneinfo.ZoneInfo):
        return (
            f"a {type(value).__name__} with the timezone ZoneInfo({zone.key!r}) cannot be stored: "
            "ZODB pickles records with protocol 3, which cannot pickle a zoneinfo.ZoneInfo; "
            "store it in UTC (value.astimezone(datetime.UTC)) or with a fixed "
            "datetime.timezone offset, and the zone's name beside it if you need it"
        )
    if value.fold and _fold_picks_the_instant(value):
        return (
            f"a {type(value).__name__} with fold=1 cannot be stored: ZODB pickles records "
            "with protocol 3, which drops fold, so it would come back as the other of the two "
            "equal wall times; store it in UTC or with a fixed datetime.timezone offset, "
            "which need no fold"
        )
    return None


def _fold_picks_the_instant(value: datetime.datetime | datetime.time) -> bool:
    """Whether *value* (with fold=1) means another instant than with fold=0."""
    if not isinstance(value, datetime.datetime):
        return False  # a time's offset is its tzinfo's utcoffset(None): fold is not read
    if value.tzinfo is None:
        return True  # timestamp() and astimezone() read it against local time
    return value.utcoffset() != value.replace(fold=0).utcoffset()


def type_name(value: Any) -> str:
    """The name of *value*'s type as a user would write it: ``dict``, ``myapp.Thing``."""
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _is_nan(key: Any) -> bool:
    if isinstance(key, float):
        return key != key
    if isinstance(key, decimal.Decimal):
        return key.is_nan()  # quiet and signalling NaN alike
    return False


def _first_visit(seen: dict[int, int], item: tuple[Any, ...] | frozenset[Any], depth: int) -> bool:
    """Whether a walk must look inside *item* at *depth*: not if it did already, as deep.

    A tuple may hold the same tuple twice, and that one the next twice: a
    walk that did not remember them would visit 2**K tuples for K of them
    (a few hundred bytes of pickle). Looked at again at the same depth or
    nearer the top, what it holds has nothing new to say; deeper, it may be
    too deep, so it is looked at again. *seen* keeps ids: the walked value
    holds every tuple alive until the walk ends.
    """
    if seen.get(id(item), -1) >= depth:
        return False
    seen[id(item)] = depth
    return True


def mapping_key_problem(key: Any) -> str | None:
    """Why *key* cannot be a key of a Mapping, or None if it can."""
    kind = type(key)
    if kind is str or kind is int:
        return None
    stack = [(key, 0)]
    seen: dict[int, int] = {}
    while stack:
        item, depth = stack.pop()
        if isinstance(item, tuple):
            if depth >= MAX_VALUE_DEPTH:
                return TOO_DEEP
            if not _first_visit(seen, item, depth):
                continue
            stack.extend((part, depth + 1) for part in reversed(item))  # first problem first
        elif _is_nan(item):
            return NAN_KEY
        elif type(item) in CLOCK_TYPES and (problem := clock_problem(item)):
            return problem
        elif not (type(item) in _ORDERED_KEY_TYPES or isinstance(item, str | int | float | bytes)):
            # subclasses (IntEnum, StrEnum) order as their base type
            return (
                f"a {type_name(item)} cannot be a key of a snaptree Mapping: its keys are "
                "kept sorted and this type has no order; use str, int, float, bytes, "
                "date/time or Decimal keys (or tuples of them), or assign the whole dict "
                "at once: a dict whose keys cannot be ordered is stored as a FlatMapping"
            )
    return None


def hashable_problem(value: Any, *, nan: bool) -> str | None:
    """Why *value* cannot be stored as a dict key or set element (None if it can).

    Stored keys are pickled and come back as copies, so they must be values:
    scalars, enums, tuples and frozensets of them, or persistent objects (one
    object per database record). A plain object would come back as a copy
    equal to nothing it was equal to before. ``nan`` says whether NaN is
    acceptable (as a set element it is, as a key it is not).
    """
    stack = [(value, 0)]
    seen: dict[int, int] = {}
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind in SCALAR_TYPES or isinstance(item, enum.Enum | str | int | float | bytes):
            if not nan and _is_nan(item):
                return NAN_KEY
            if kind in CLOCK_TYPES and (problem := clock_problem(item)):
                return problem
        elif isinstance(item, tuple | frozenset):
            if depth >= MAX_VALUE_DEPTH:
                return TOO_DEEP
            if _first_visit(seen, item, depth):
                stack.extend((part, depth + 1) for part in item)
        elif not isinstance(item, Persistent):
            return (
                f"a {type_name(item)} cannot be stored as a key or set element: it would "
                "be stored as a copy, equal to nothing it is equal to now; use a str, int, "
                "tuple or other value instead"
            )
    return None


def unstorable_detail(value: Any) -> str:
    """Why *value*, which is neither a container, a scalar nor persistent, is refused."""
    if isinstance(value, bytearray):
        return (
            "cannot store a bytearray: it would be stored as a copy, and changes made "
            "to it in place would be lost; store bytes(value), and assign new bytes "
            "to change it"
        )
    return (
        f"cannot store a {type_name(value)}: ZODB would not see changes made to it in "
        "place; store a dict, list, set or scalar, or make the class a "
        "persistent.Persistent subclass"
    )


def default_factory_detail(value: Any) -> str:
    """Why a dict with a default for missing keys (defaultdict, Counter) is refused."""
    return (
        f"a {type_name(value)} cannot be stored: its default for missing keys "
        "would be lost (a stored dict raises KeyError instead); store "
        "dict(value) and use node.setdefault(key, default) where you relied "
        "on the default"
    )


def rebuilt_tuple(value: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    """*value*, a tuple or one of its subclasses, holding *items* instead (converted,
    or plain copies).

    A namedtuple takes its fields one by one; any other subclass takes one
    iterable, as ``tuple`` does (``T(*items)`` split a one-string ``T`` into letters).
    """
    kind = type(value)
    if kind is tuple:
        return tuple(items)
    if hasattr(kind, "_make"):  # a namedtuple
        return kind._make(items)  # type: ignore[no-any-return]
    return kind(items)
