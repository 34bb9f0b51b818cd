"""The persistent node types of a snaptree tree, and conversion to and from plain data.

Code written for an in-memory tree assigns plain dicts and lists and then
mutates them in place. ZODB only sees changes to persistent objects, so a
plain dict stored inside the tree would lose every later in-place change
silently. snaptree's containers therefore convert what is assigned into them,
recursively: dicts become :class:`Mapping` (or :class:`FlatMapping`), lists
become :class:`List`, sets become frozensets and bytearrays bytes. Values
whose in-place changes ZODB could not see at all (plain class instances) are
refused with an error naming their path, instead of being stored and then
silently going stale.

The class paths below (``snaptree.tree.Mapping`` ...) are written into every
database; they are part of the storage format and must not move.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import fractions
import itertools
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping

from ._connection import check_writable
from .errors import UnstorableValueError

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
        frozenset,
    }
)


_LEAF_SIZE = OOBTree.max_leaf_size
_chain = itertools.chain.from_iterable


def _join(path: str, key: object) -> str:
    return f"{path}/{key}" if path else str(key)


class _GuardedRemovals:
    """Removals shared by both mapping nodes: refuse them outside the owner's transaction."""

    __slots__ = ()  # a mixin for C-level bases (OOBTree) must add no instance layout

    def __delitem__(self, key: Any) -> None:
        check_writable(self)
        super().__delitem__(key)  # type: ignore[misc]

    def pop(self, key: Any, *default: Any) -> Any:
        check_writable(self)
        return super().pop(key, *default)  # type: ignore[misc]

    def popitem(self) -> tuple[Any, Any]:
        check_writable(self)
        return super().popitem()  # type: ignore[misc]

    def clear(self) -> None:
        check_writable(self)
        super().clear()  # type: ignore[misc]


class Mapping(_GuardedRemovals, OOBTree):
    """A dict-like node backed by a BTree.

    BTrees resolve concurrent inserts and deletes of *different* keys without a
    conflict, which is what lets many threads add to one mapping at once. Keys
    must be mutually orderable (all str, or all int, ...).
    """

    def __setitem__(self, key: Any, value: Any) -> None:
        check_writable(self)
        super().__setitem__(key, to_persistent(value, str(key)))

    def insert(self, key: Any, value: Any) -> int:
        check_writable(self)
        return super().insert(key, to_persistent(value, str(key)))

    def setdefault(self, key: Any, default: Any = None) -> Any:
        check_writable(self)
        return super().setdefault(key, to_persistent(default, str(key)))

    def update(self, *args: Any, **kwargs: Any) -> None:
        check_writable(self)
        items: dict[Any, Any] | Iterable[tuple[Any, Any]]
        insert = OOBTree.__setitem__  # BTree's own insert: our __setitem__ would convert again
        for source in (*args, kwargs):
            items = source.items() if hasattr(source, "items") else source
            for k, v in items:
                insert(self, k, to_persistent(v, str(k)))

    def __repr__(self) -> str:
        return f"<snaptree.Mapping with {len(self)} keys>"


class FlatMapping(_GuardedRemovals, PersistentMapping):
    """Fallback for a dict whose keys cannot be ordered (mixed key types).

    It is one persistent record, so concurrent changes to it conflict and are
    retried; prefer keys of one type where you can.
    """

    def __setitem__(self, key: Any, value: Any) -> None:
        check_writable(self)
        super().__setitem__(key, to_persistent(value, str(key)))

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for source in (*args, kwargs):
            items = source.items() if hasattr(source, "items") else source
            for k, v in items:
                self[k] = v


class List(PersistentList):
    """A list node: a persistent list whose new items are converted like assignments."""

    def __setitem__(self, index: Any, value: Any) -> None:
        check_writable(self)
        if isinstance(index, slice):
            value = [to_persistent(v, str(index)) for v in value]
        else:
            value = to_persistent(value, str(index))
        super().__setitem__(index, value)

    def append(self, value: Any) -> None:
        check_writable(self)
        super().append(to_persistent(value, str(len(self.data))))

    def insert(self, index: int, value: Any) -> None:
        check_writable(self)
        super().insert(index, to_persistent(value, str(index)))

    def extend(self, values: Iterable[Any]) -> None:
        check_writable(self)
        start = len(self.data)
        super().extend([to_persistent(v, str(start + i)) for i, v in enumerate(values)])

    def __iadd__(self, values: Iterable[Any]) -> List:
        self.extend(values)
        return self

    def __imul__(self, n: int) -> List:
        check_writable(self)
        return super().__imul__(n)

    def __delitem__(self, index: Any) -> None:
        check_writable(self)
        super().__delitem__(index)

    def pop(self, index: int = -1) -> Any:
        check_writable(self)
        return super().pop(index)

    def remove(self, value: Any) -> None:
        check_writable(self)
        super().remove(value)

    def reverse(self) -> None:
        check_writable(self)
        super().reverse()

    def sort(self, *args: Any, **kwargs: Any) -> None:
        check_writable(self)
        super().sort(*args, **kwargs)

    def clear(self) -> None:
        check_writable(self)
        super().clear()

    def __repr__(self) -> str:
        return f"<snaptree.List with {len(self.data)} items>"


class Counter(Length):
    """A total that many threads bump at once without conflicts.

    Concurrent ``add`` calls are merged by conflict resolution (new = a + b -
    old), so the value is right but a transaction cannot rely on reading an
    exact value while others add. Read it with ``counter.value`` or ``int(counter)``.
    """

    def add(self, delta: int = 1) -> None:
        self.change(delta)

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"<snaptree.Counter {self.value}>"


def mapping_of(keys: Any, values: list[Any]) -> Mapping:
    """A Mapping of *keys* to *values*, which are already converted.

    Mapping's own ``update`` runs its Python ``__setitem__`` (conversion and
    owner check) again for every key. A dict small enough for one BTree
    bucket is instead given its state directly, in the format BTrees pickle
    buckets in (and so part of every database's format: checked against
    BTrees 6.x); a larger one is filled as a plain OOBTree in C and its
    state handed over while that state holds only buckets; deeper trees
    take BTree's own insert, key by key.
    """
    node = Mapping()
    if not values:
        return node
    if len(values) <= _LEAF_SIZE:
        node.__setstate__((((tuple(_chain(sorted(zip(keys, values, strict=True)))),),),))
        return node
    filled = OOBTree(list(zip(keys, values, strict=True)))
    state = filled.__getstate__()
    if not isinstance(state[0][0], OOBTree):
        node.__setstate__(state)
        return node
    insert = OOBTree.__setitem__
    for key, value in zip(keys, values, strict=True):
        insert(node, key, value)
    return node


def dict_node(keys: Any, values: list[Any]) -> Mapping | FlatMapping:
    """The node a dict of *keys* to converted *values* becomes: a Mapping if its keys order."""
    if _orderable_keys(keys):
        return mapping_of(keys, values)
    flat = FlatMapping()
    flat.data.update(zip(keys, values, strict=True))
    return flat


def _orderable_keys(keys: Iterable[Any]) -> bool:
    types = {type(k) for k in keys}
    if not types:
        return True
    if len(types) > 1 or bool in types:
        # BTrees cannot order str against int; bool keys collide with 0 and 1.
        return types <= {int, float} and bool not in types
    (kind,) = types
    if kind is tuple:  # tuples order only if their items do, position by position
        try:
            sorted(keys)
        except TypeError:
            return False
        return True
    return kind in (str, int, float, bytes, datetime.date, datetime.datetime, decimal.Decimal)


def to_persistent(value: Any, path: str = "") -> Any:
    """Return *value* in the form the tree stores: persistent containers, immutable leaves.

    Raises UnstorableValueError naming the path of the first value that cannot
    be stored safely, including plain containers that contain themselves and
    nesting deeper than Python's recursion limit.
    """
    try:
        return _convert(value, path, set())
    except RecursionError:
        raise UnstorableValueError(
            path, "nested too deeply to store (past Python's recursion limit); flatten it"
        ) from None


def _convert(value: Any, path: str, active: set[int]) -> Any:
    kind = type(value)
    if kind in SCALAR_TYPES or isinstance(value, Persistent):
        return value
    if isinstance(value, dict | list | tuple):
        if id(value) in active:
            raise UnstorableValueError(
                path,
                "contains itself (a cycle of plain containers); only persistent "
                "objects may refer back to each other",
            )
        active.add(id(value))
        try:
            return _convert_container(value, path, active)
        finally:
            active.discard(id(value))
    if isinstance(value, set):
        return frozenset(value)
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, enum.Enum | str | int | float | bytes):
        return value
    raise UnstorableValueError(
        path,
        f"cannot store a {kind.__module__}.{kind.__qualname__}: ZODB would not see changes "
        "made to it in place; store a dict, list or scalar, or make the class a "
        "persistent.Persistent subclass",
    )


def _convert_container(value: dict | list | tuple, path: str, active: set[int]) -> Any:
    if isinstance(value, dict):
        return dict_node(
            value.keys(), [_convert(v, _join(path, k), active) for k, v in value.items()]
        )
    converted = [_convert(v, _join(path, i), active) for i, v in enumerate(value)]
    if isinstance(value, list):
        items = List()
        items.data[:] = converted
        return items
    return tuple(converted) if type(value) is tuple else type(value)(*converted)


def to_plain(value: Any) -> Any:
    """Return a plain copy of *value*: snaptree containers become dicts, lists and ints.

    Persistent objects of the user's own classes are returned as they are.
    """
    if isinstance(value, Mapping | FlatMapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, List):
        return [to_plain(v) for v in value]
    if isinstance(value, Counter):
        return value.value
    kind = type(value)
    if kind in SCALAR_TYPES:
        return value
    if kind is tuple:
        return tuple(to_plain(v) for v in value)
    if kind is list:
        return [to_plain(v) for v in value]
    if kind is dict:
        return {k: to_plain(v) for k, v in value.items()}
    return value


def walk(value: Any) -> Iterator[Any]:
    """Yield *value* and every value reachable from it through snaptree containers and tuples."""
    stack = [value]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, Mapping | FlatMapping):
            stack.extend(item.values())
        elif isinstance(item, List | tuple | list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
