"""The persistent node types of a snaptree tree, and conversion to and from plain data.

Code written for an in-memory tree assigns plain dicts, lists and sets and then
changes them in place. ZODB only sees changes to persistent objects, so
snaptree's containers convert what is assigned into them, recursively: dicts
become :class:`Mapping` (or :class:`FlatMapping` when their keys cannot be
ordered), lists :class:`List`, sets :class:`Set`. What ZODB could not keep
current is refused with an error naming its path: plain class instances,
bytearrays, dicts with a default factory.

The nodes behave like the dict, list and set they replace: CPython's own
protocol suites run against them (tests/test_conformance.py). Where storage
makes that impossible the difference is an error, never a silent one; the
differences that remain are listed in docs/coming-from-dicts.md. Three
mechanisms keep it that way:

- A node iterates under a guard: changing a Mapping's keys while iterating
  it raises RuntimeError, as a dict does (a BTree would skip keys silently).
- Assignment copies, where Python would share the object. Inside a store
  call every plain container converted is remembered with a shallow copy of
  its contents; before the transaction commits, each one that is still part
  of the tree is compared with that copy, and a change made through the
  original object (``c = {"orders": []}; d[k] = c; c["orders"].append(1)``)
  fails the commit with the path, instead of being lost. The same original
  assigned twice in one transaction becomes one shared node, as it would be
  one shared dict.
- Every way into a node (constructors, operators, ``update`` ...) converts,
  and every change is refused *before* the node is touched when it comes
  from the wrong thread, after the transaction, or inside a snapshot.

Pickling (``pickle.dump``, ``copy.copy``, ``copy.deepcopy``) gives plain dicts,
lists, sets and ints through ``__reduce_ex__``, so a dump loads where snaptree
is not installed. ZODB is not affected: its ObjectWriter stores
``type(obj)`` and ``obj.__getstate__()`` and refers to persistent children by
oid (ZODB/serialize.py, checked with ZODB 6.4), and BTrees resolve conflicts
on those states, never through ``__reduce__``.

Nodes are unhashable, like dicts and lists. ZODB does not need persistent
objects to be hashable: its connection, pickle cache and transaction keep
them in lists and in dicts keyed by oid (checked with ZODB 6.4, persistent
6.9, transaction 5.1, BTrees 6.5), and PersistentMapping and PersistentList
have always been unhashable.

The class paths below (``snaptree.tree.Mapping`` ...) are written into every
database; they are part of the storage format and must not move.
"""

from __future__ import annotations

import collections.abc as abc
import datetime
import decimal
import enum
import fractions
import itertools
import reprlib
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from persistent.interfaces import GHOST
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from transaction.interfaces import NoTransaction

from ._connection import check_writable, current_connection
from .errors import MisuseError, UnstorableValueError

#: The key of the ZODB root under which the tree's root mapping lives.
ROOT_KEY = "snaptree"

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

#: Key types a Mapping can keep in order (besides tuples of them).
_ORDERED_KEY_TYPES = frozenset(
    {
        type(None),  # BTrees order None before everything else
        bool,
        int,
        float,
        str,
        bytes,
        decimal.Decimal,
        fractions.Fraction,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        uuid.UUID,
    }
)

_LEAF_SIZE = OOBTree.max_leaf_size
_chain = itertools.chain.from_iterable
_MISSING: Any = object()
_IN_PROGRESS: Any = object()

# BTree's own methods, in C: a Mapping's Python methods use them for what is
# already checked and converted, so nothing is converted twice.
_bt_get = OOBTree.get
_bt_getitem = OOBTree.__getitem__
_bt_setitem = OOBTree.__setitem__
_bt_delitem = OOBTree.__delitem__
_bt_contains = OOBTree.__contains__
# BTree's iterators, faster than iterating its keys()/values()/items() sequences
_bt_keys = OOBTree.iterkeys
_bt_values = OOBTree.itervalues
_bt_items = OOBTree.iteritems

_NAN_KEY = (
    "NaN cannot be a key: it is not equal to itself, so it could never be found "
    "again, and in a sorted mapping it hides other keys; use None or a string "
    "such as 'nan' instead"
)


def _join(path: str, key: object) -> str:
    return f"{path}/{key}" if path else str(key)


def _where(where: Any) -> str:
    """The path a chain of ``(parent, key)`` pairs stands for ("a/b/0")."""
    keys = []
    while where is not None:
        where, key = where
        keys.append(str(key))
    return "/".join(reversed(keys))


# -- keys ----------------------------------------------------------------------------


def _is_nan(key: Any) -> bool:
    if isinstance(key, float):
        return key != key
    if isinstance(key, decimal.Decimal):
        return key.is_nan()  # quiet and signalling NaN alike
    return False


def _mapping_key_problem(key: Any) -> str | None:
    """Why *key* cannot be a key of a Mapping, or None if it can."""
    kind = type(key)
    if kind is str or kind is int:
        return None
    if isinstance(key, tuple):
        for item in key:
            problem = _mapping_key_problem(item)
            if problem is not None:
                return problem
        return None
    if _is_nan(key):
        return _NAN_KEY
    if kind in _ORDERED_KEY_TYPES or isinstance(key, str | int | float | bytes):
        return None  # subclasses too: IntEnum, StrEnum
    return (
        f"a {_type_name(key)} cannot be a key of a snaptree Mapping: its keys are kept "
        "sorted and this type has no order; use str, int, float, bytes, date/time or "
        "Decimal keys (or tuples of them), or assign the whole dict at once: a dict "
        "whose keys cannot be ordered is stored as a FlatMapping"
    )


def _hashable_problem(value: Any, *, nan: bool) -> str | None:
    """Why *value* cannot be stored as a dict key or set element (None if it can).

    Stored keys are pickled and come back as copies, so they must be values:
    scalars, enums, tuples and frozensets of them, or persistent objects (one
    object per database record). A plain object would come back as a copy
    equal to nothing it was equal to before.
    """
    kind = type(value)
    if kind in SCALAR_TYPES or isinstance(value, enum.Enum | str | int | float | bytes):
        return _NAN_KEY if not nan and _is_nan(value) else None
    if isinstance(value, tuple | frozenset):
        for item in value:
            problem = _hashable_problem(item, nan=nan)
            if problem is not None:
                return problem
        return None
    if isinstance(value, Persistent):
        return None
    return (
        f"a {_type_name(value)} cannot be stored as a key or set element: it would be "
        "stored as a copy, equal to nothing it is equal to now; use a str, int, tuple "
        "or other value instead"
    )


def _type_name(value: Any) -> str:
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


# -- iteration ---------------------------------------------------------------------
#
# A BTree iterated while its keys change skips or repeats keys without a word
# (deleting every key of 10 while iterating keys() deleted 5). A Mapping's
# iterators therefore register a watch, and every change to the key set
# marks the watches of that mapping; the next step of a marked iterator
# raises, as a dict's does. The watches live here, keyed by the mapping's id,
# not on the mapping: ZODB may turn a mapping into a ghost (savepoints run
# the cache's GC) and a ghost loses its instance state. An entry exists only
# while an iterator holding the mapping runs, so the id cannot be reused.


class _Watch:
    __slots__ = ("changed",)

    def __init__(self) -> None:
        self.changed = False


_watches: dict[int, list[_Watch]] = {}
_watches_lock = threading.Lock()


def _guarded(node: Any, source: Callable[[Any], Iterable[Any]]) -> Iterator[Any]:
    """Iterate ``source(node)``; RuntimeError at the first step after node's keys changed.

    The source is made at the first step, not before: an iterator made
    earlier would hold bucket positions that a change in between makes stale.
    """
    watch = _Watch()
    ident = id(node)
    with _watches_lock:
        _watches.setdefault(ident, []).append(watch)
    try:
        for item in source(node):
            yield item
            if watch.changed:
                raise RuntimeError("dictionary changed size during iteration")
    finally:
        with _watches_lock:
            watches = _watches[ident]
            watches.remove(watch)
            if not watches:
                del _watches[ident]


def _iterate(node: Any, source: Callable[[Any], Iterable[Any]]) -> Iterator[Any]:
    """Iterate ``source(node)``, guarded unless *node* cannot change.

    A snapshot's nodes refuse every change (the connection is read-only), so
    their iteration, which exports run over the whole tree, needs no guard.
    """
    if getattr(node._p_jar, "_snaptree_read_only", False):
        return iter(source(node))
    return _guarded(node, source)


def _keys_changed(node: Any) -> None:
    for watch in _watches.get(id(node), ()):
        watch.changed = True


class _MappingKeys(abc.KeysView):
    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return _iterate(self._mapping, _bt_keys)

    def __reversed__(self) -> Iterator[Any]:
        return _iterate(self._mapping, _reversed_keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


class _MappingValues(abc.ValuesView):
    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return _iterate(self._mapping, _bt_values)

    def __reversed__(self) -> Iterator[Any]:
        return _iterate(self._mapping, lambda node: reversed(OOBTree.values(node)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


class _MappingItems(abc.ItemsView):
    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return _iterate(self._mapping, _bt_items)

    def __reversed__(self) -> Iterator[Any]:
        return _iterate(self._mapping, lambda node: reversed(OOBTree.items(node)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


def _reversed_keys(node: Any) -> Iterator[Any]:
    return reversed(OOBTree.keys(node))


class _FlatKeys(abc.KeysView):
    """A FlatMapping's keys: its dict's own iteration (and RuntimeError on change)."""

    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mapping.data)

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self._mapping.data)

    def __len__(self) -> int:
        return len(self._mapping.data)

    def __contains__(self, key: object) -> bool:
        return key in self._mapping.data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


class _FlatValues(abc.ValuesView):
    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mapping.data.values())

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self._mapping.data.values())

    def __len__(self) -> int:
        return len(self._mapping.data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


class _FlatItems(abc.ItemsView):
    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mapping.data.items())

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self._mapping.data.items())

    def __len__(self) -> int:
        return len(self._mapping.data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


# -- arguments as dict methods take them --------------------------------------------


def _pairs(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> list[tuple[Any, Any]]:
    """The (key, value) pairs ``dict.update(*args, **kwargs)`` would store, read up front.

    Reading them all first lets a node check and convert every one before it
    changes anything, so a refused update leaves no trace.
    """
    if len(args) > 1:
        raise TypeError(f"{name} expected at most 1 argument, got {len(args)}")
    pairs: list[tuple[Any, Any]] = []
    if args:
        other = args[0]
        if isinstance(other, Mapping):
            pairs = list(_bt_items(other))
        elif isinstance(other, FlatMapping):
            pairs = list(other.data.items())
        elif isinstance(other, dict):
            pairs = list(other.items())
        elif hasattr(other, "keys"):
            pairs = [(key, other[key]) for key in other.keys()]  # noqa: SIM118 - dict's protocol
        else:
            for i, item in enumerate(other):
                try:
                    key, value = item
                except TypeError:
                    raise TypeError(
                        f"cannot convert dictionary update sequence element #{i} to a sequence"
                    ) from None
                except ValueError:
                    raise ValueError(
                        f"dictionary update sequence element #{i} has length "
                        f"{len(item)}; 2 is required"
                    ) from None
                pairs.append((key, value))
    if kwargs:
        pairs.extend(kwargs.items())
    return pairs


def _plain_dict(other: Any) -> dict[Any, Any] | None:
    """*other* as a dict to compare with, or None if it is not a mapping."""
    if type(other) is dict:
        return other
    if isinstance(other, Mapping):
        return dict(_bt_items(other))
    if isinstance(other, FlatMapping):
        return other.data
    if isinstance(other, abc.Mapping):
        return dict(other.items())
    return None


# -- nodes -----------------------------------------------------------------------------


class Mapping(OOBTree):
    """A dict-like node backed by a BTree.

    BTrees resolve concurrent inserts and deletes of *different* keys without a
    conflict, which is what lets many threads add to one mapping at once. Keys
    are kept sorted, so they must be mutually orderable (all str, or all
    numbers, ...); a key that is not is refused before anything changes.
    Iteration is in key order.
    """

    # No __dict__: a BTree's state is its items only, so an attribute set on
    # a Mapping would be lost at commit. Like a dict, it has none.
    __slots__ = ("__weakref__",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_writable(self)  # __init__ again on a stored mapping updates it, as dict's does
        super().__init__()
        if args or kwargs:
            self._put_all(_pairs(args, kwargs, "Mapping"))

    @classmethod
    def fromkeys(cls, iterable: Iterable[Any], value: Any = None) -> Any:
        node = cls()
        keys = list(iterable)
        if keys:
            value = to_persistent(value)  # one node under every key, as dict.fromkeys shares
            for key in keys:
                node[key] = value
        return node

    # -- reading

    def __getitem__(self, key: Any) -> Any:
        try:
            return _bt_getitem(self, key)
        except TypeError:  # a key of another type: not here, as a dict would say
            raise KeyError(key) from None

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return _bt_get(self, key, default)
        except TypeError:
            return default

    def __contains__(self, key: Any) -> bool:
        try:
            return _bt_contains(self, key)
        except TypeError:
            return False

    def __iter__(self) -> Iterator[Any]:
        return _iterate(self, _bt_keys)

    def __reversed__(self) -> Iterator[Any]:
        return _iterate(self, _reversed_keys)

    def keys(self) -> _MappingKeys:  # type: ignore[override]
        return _MappingKeys(self)

    def values(self) -> _MappingValues:  # type: ignore[override]
        return _MappingValues(self)

    def items(self) -> _MappingItems:  # type: ignore[override]
        return _MappingItems(self)

    def iterkeys(self, *bounds: Any) -> Iterator[Any]:
        """Keys from BTree's ranged iteration (``min``, ``max``), under the same guard."""
        return _iterate(self, lambda node: OOBTree.iterkeys(node, *bounds))

    def itervalues(self, *bounds: Any) -> Iterator[Any]:
        return _iterate(self, lambda node: OOBTree.itervalues(node, *bounds))

    def iteritems(self, *bounds: Any) -> Iterator[Any]:
        return _iterate(self, lambda node: OOBTree.iteritems(node, *bounds))

    def copy(self) -> Any:
        """A new, free-standing node with the same items (shared, as dict.copy shares them)."""
        node = type(self)()
        _fill(node, list(_bt_keys(self)), list(_bt_values(self)))
        return node

    def __eq__(self, other: object) -> bool:
        plain = _plain_dict(other)
        if plain is None:
            return NotImplemented
        return dict(_bt_items(self)) == plain

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    @reprlib.recursive_repr("{...}")
    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in _bt_items(self)) + "}"

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (dict, (), None, None, iter(_bt_items(self)))

    # -- operators

    def __or__(self, other: Any) -> Any:
        if not isinstance(other, abc.Mapping):
            return NotImplemented
        node = self.copy()
        node.update(other)
        return node

    def __ror__(self, other: Any) -> Any:
        if not isinstance(other, abc.Mapping):
            return NotImplemented
        node = type(self)(other)
        node.update(self)
        return node

    def __ior__(self, other: Any) -> Any:
        self.update(other)
        return self

    # A BTree's &, - and | work on key sets; a dict has none of them (| is above).
    def __and__(self, other: Any) -> Any:
        return NotImplemented

    __rand__ = __sub__ = __rsub__ = __and__

    # -- changing

    def __setitem__(self, key: Any, value: Any) -> None:
        check_writable(self)
        if type(key) is not str and type(key) is not int:
            self._check_key(key)
        if type(value) not in SCALAR_TYPES:
            value = _convert_into(self, value, key)
        if _watches and id(self) in _watches and not self.__contains__(key):
            self._insert(key, value)
            _keys_changed(self)
        else:
            self._insert(key, value)

    def _insert(self, key: Any, value: Any) -> None:
        try:
            _bt_setitem(self, key, value)
        except TypeError as exc:  # the key does not compare with the keys already here
            raise self._unorderable(key, exc) from None

    def __delitem__(self, key: Any) -> None:
        check_writable(self)
        try:
            _bt_delitem(self, key)
        except TypeError:
            raise KeyError(key) from None
        if _watches:
            _keys_changed(self)

    def insert(self, key: Any, value: Any) -> int:
        """BTree's insert: set *key* only if it is missing; 1 if it was."""
        check_writable(self)
        if self.__contains__(key):
            return 0
        self[key] = value
        return 1

    def setdefault(self, key: Any, default: Any = None) -> Any:
        check_writable(self)
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        self[key] = default
        return _bt_getitem(self, key)

    def pop(self, key: Any, *default: Any) -> Any:
        check_writable(self)
        if len(default) > 1:
            raise TypeError(f"pop expected at most 2 arguments, got {1 + len(default)}")
        value = self.get(key, _MISSING)
        if value is _MISSING:
            if default:
                return default[0]
            raise KeyError(key)
        _bt_delitem(self, key)
        if _watches:
            _keys_changed(self)
        return value

    def popitem(self) -> tuple[Any, Any]:
        """Remove and return the item with the smallest key (a dict removes its newest)."""
        check_writable(self)
        item = OOBTree.popitem(self)
        if _watches:
            _keys_changed(self)
        return item

    def clear(self) -> None:
        check_writable(self)
        if OOBTree.__bool__(self):
            OOBTree.clear(self)
            if _watches:
                _keys_changed(self)

    def update(self, *args: Any, **kwargs: Any) -> None:
        check_writable(self)
        self._put_all(_pairs(args, kwargs, "update"))

    def _put_all(self, pairs: list[tuple[Any, Any]]) -> None:
        """Store *pairs*, all or none of them: a refused key leaves the mapping as it was."""
        for key, _ in pairs:
            if type(key) is not str and type(key) is not int:
                self._check_key(key)
        converter = _Converter(self)
        pairs = [
            (k, v if type(v) in SCALAR_TYPES else converter.convert(v, (None, k))) for k, v in pairs
        ]
        # A key that does not compare with the keys here fails in the lookup,
        # before anything changed; one that does not compare with another new
        # key fails while inserting, and what was inserted is undone.
        try:
            previous = [_bt_get(self, key, _MISSING) for key, _ in pairs]
        except TypeError as exc:
            raise self._unorderable(next(k for k, _ in pairs if self._fails(k)), exc) from None
        done = 0
        try:
            for key, value in pairs:
                _bt_setitem(self, key, value)
                done += 1
        except TypeError as exc:
            # Undone newest first, so a key given twice ends with its first old value.
            for (key, _), old in reversed(list(zip(pairs[:done], previous, strict=False))):
                if old is _MISSING:
                    OOBTree.pop(self, key, None)
                else:
                    _bt_setitem(self, key, old)
            raise self._unorderable(pairs[done][0], exc) from None
        if _watches and any(old is _MISSING for old in previous):
            _keys_changed(self)

    def _fails(self, key: Any) -> bool:
        try:
            _bt_contains(self, key)
        except TypeError:
            return True
        return False

    def _check_key(self, key: Any) -> None:
        problem = _mapping_key_problem(key)
        if problem is not None:
            raise UnstorableValueError(_join(_path_or_empty(self), key), problem)

    def _unorderable(self, key: Any, exc: TypeError) -> UnstorableValueError:
        try:
            held = f" ({_type_name(OOBTree.minKey(self))} keys)"
        except (ValueError, TypeError):
            held = ""
        return UnstorableValueError(
            _join(_path_or_empty(self), key),
            f"the key {key!r} ({_type_name(key)}) cannot be ordered against the keys "
            f"already in this mapping{held}: {exc}. A snaptree Mapping keeps its keys "
            "sorted, so they must be comparable with each other (all str, or all "
            "numbers, all timezone-aware datetimes ...): convert the key (str(key), "
            "dt.replace(tzinfo=...)), or keep such keys in a mapping of their own",
        )


class FlatMapping(PersistentMapping):
    """A dict node for keys that cannot be ordered (mixed key types): a dict in one record.

    Concurrent changes to it conflict and are retried; prefer keys of one type
    where you can (they make a :class:`Mapping`). Keeps insertion order, like a dict.
    """

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_writable(self)
        pairs = self._incoming(_pairs(args, kwargs, "FlatMapping")) if args or kwargs else ()
        self.data = dict(pairs)

    @classmethod
    def fromkeys(cls, iterable: Iterable[Any], value: Any = None) -> Any:
        node = cls()
        keys = list(iterable)
        if keys:
            value = to_persistent(value)  # one node under every key, as dict.fromkeys shares
            for key in keys:
                node[key] = value
        return node

    def _incoming(self, pairs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        for key, _ in pairs:
            if type(key) is not str and type(key) is not int:
                _check_flat_key(self, key)
        converter = _Converter(self)
        return [
            (k, v if type(v) in SCALAR_TYPES else converter.convert(v, (None, k))) for k, v in pairs
        ]

    def __setitem__(self, key: Any, value: Any) -> None:
        check_writable(self)
        if type(key) is not str and type(key) is not int:
            _check_flat_key(self, key)
        if type(value) not in SCALAR_TYPES:
            value = _convert_into(self, value, key)
        self.data[key] = value
        self._p_changed = True

    def __delitem__(self, key: Any) -> None:
        check_writable(self)
        del self.data[key]
        self._p_changed = True

    def pop(self, key: Any, *default: Any) -> Any:
        check_writable(self)
        if len(default) > 1:
            raise TypeError(f"pop expected at most 2 arguments, got {1 + len(default)}")
        data = self.data
        if key not in data:
            if default:
                return default[0]
            raise KeyError(key)
        self._p_changed = True
        return data.pop(key)

    def popitem(self) -> tuple[Any, Any]:
        check_writable(self)
        item = self.data.popitem()
        self._p_changed = True
        return item

    def clear(self) -> None:
        check_writable(self)
        if self.data:
            self.data.clear()
            self._p_changed = True

    def update(self, *args: Any, **kwargs: Any) -> None:
        check_writable(self)
        pairs = self._incoming(_pairs(args, kwargs, "update"))
        if pairs:
            self.data.update(pairs)
            self._p_changed = True

    def setdefault(self, key: Any, default: Any = None) -> Any:
        check_writable(self)
        data = self.data
        if key in data:
            return data[key]
        self[key] = default
        return data[key]

    def keys(self) -> _FlatKeys:  # type: ignore[override]
        return _FlatKeys(self)

    def values(self) -> _FlatValues:  # type: ignore[override]
        return _FlatValues(self)

    def items(self) -> _FlatItems:  # type: ignore[override]
        return _FlatItems(self)

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self.data)

    def copy(self) -> Any:
        """A new, free-standing node with the same items (shared, as dict.copy shares them)."""
        node = type(self)()
        node.data = dict(self.data)
        return node

    def __or__(self, other: Any) -> Any:
        if not isinstance(other, abc.Mapping):
            return NotImplemented
        node = self.copy()
        node.update(other)
        return node

    def __ror__(self, other: Any) -> Any:
        if not isinstance(other, abc.Mapping):
            return NotImplemented
        node = type(self)(other)
        node.update(self)
        return node

    def __ior__(self, other: Any) -> Any:  # UserDict's would change self.data unchecked, unseen
        self.update(other)
        return self

    def __eq__(self, other: object) -> bool:
        plain = _plain_dict(other)
        if plain is None:
            return NotImplemented
        return self.data == plain

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __copy__(self) -> dict[Any, Any]:
        return dict(self.data)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (dict, (), None, None, iter(self.data.items()))


class List(PersistentList):
    """A list node: a persistent list whose new items are converted like assignments."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, initlist: Iterable[Any] | None = None) -> None:
        check_writable(self)
        self.data = [] if initlist is None else self._incoming(initlist, 0)

    def _incoming(self, values: Iterable[Any], start: int) -> list[Any]:
        # Through chain(): list() would trust the iterable's length hint and
        # allocate for it; list.extend, which this replaces, ignores a wrong one.
        values = list(values) if type(values) in (list, tuple) else list(itertools.chain(values))
        converter = None
        for i, value in enumerate(values):
            if type(value) not in SCALAR_TYPES:
                if converter is None:
                    converter = _Converter(self)
                values[i] = converter.convert(value, (None, start + i))
        return values

    def __iter__(self) -> Iterator[Any]:
        return _holding(self, iter(self.data))

    def __reversed__(self) -> Iterator[Any]:
        return _holding(self, reversed(self.data))

    def __setitem__(self, index: Any, value: Any) -> None:
        check_writable(self)
        if isinstance(index, slice):
            value = self._incoming(value, index.start or 0)
        elif type(value) not in SCALAR_TYPES:
            value = _convert_into(self, value, index)
        self.data[index] = value
        self._p_changed = True

    def __delitem__(self, index: Any) -> None:
        check_writable(self)
        data = self.data
        before = len(data)
        del data[index]
        if len(data) != before:
            self._p_changed = True

    def append(self, value: Any) -> None:
        check_writable(self)
        data = self.data
        if type(value) not in SCALAR_TYPES:
            value = _convert_into(self, value, len(data))
        data.append(value)
        self._p_changed = True

    def insert(self, index: int, value: Any) -> None:
        check_writable(self)
        if type(value) not in SCALAR_TYPES:
            value = _convert_into(self, value, index)
        self.data.insert(index, value)
        self._p_changed = True

    def extend(self, values: Iterable[Any]) -> None:
        check_writable(self)
        data = self.data
        values = self._incoming(values, len(data))
        if values:
            data.extend(values)
            self._p_changed = True

    def __iadd__(self, values: Iterable[Any]) -> Any:
        self.extend(values)
        return self

    def __imul__(self, n: int) -> Any:
        check_writable(self)
        data = self.data
        before = len(data)
        data *= n
        if len(data) != before:
            self._p_changed = True
        return self

    def pop(self, index: int = -1) -> Any:
        check_writable(self)
        value = self.data.pop(index)
        self._p_changed = True
        return value

    def remove(self, value: Any) -> None:
        check_writable(self)
        self.data.remove(value)
        self._p_changed = True

    def reverse(self) -> None:
        check_writable(self)
        self.data.reverse()
        self._p_changed = True

    def sort(self, *args: Any, **kwargs: Any) -> None:
        check_writable(self)
        self.data.sort(*args, **kwargs)
        self._p_changed = True

    def clear(self) -> None:
        check_writable(self)
        if self.data:
            self.data.clear()
            self._p_changed = True

    def __repr__(self) -> str:
        return repr(self.data)

    def __copy__(self) -> list[Any]:  # UserList's would copy the node
        return list(self.data)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (list, (), None, iter(self.data))


def _holding(owner: Any, iterator: Iterator[Any]) -> Iterator[Any]:
    """*iterator*, keeping *owner* alive until it ends, as a list's iterator keeps its list.

    The empty ``islice`` that holds *owner* is dropped by ``chain`` when the
    iteration ends; each step costs a C call, not a generator's frame.
    """
    return itertools.chain(iterator, itertools.islice((owner,), 0))


def _set_data(other: Any) -> Any:
    """The elements of *other* to operate with, or None if it is not a set."""
    if isinstance(other, Set):
        return other.data
    if isinstance(other, set | frozenset):
        return other
    if isinstance(other, abc.Set):
        return set(other)
    return None


def _iterable_data(other: Any) -> Any:
    return other.data if isinstance(other, Set) else other


class Set(abc.MutableSet, Persistent):
    """A set node: a persistent set whose changes are tracked, as List is for lists.

    A set assigned into the tree becomes one, so ``tags.add(x)`` keeps working
    and is stored. It is one record, like FlatMapping, but concurrent changes
    to it are merged at commit (elements added and removed by one transaction
    are added to and removed from what the other committed), so threads adding
    to one set do not conflict.
    """

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, iterable: Iterable[Any] = ()) -> None:
        check_writable(self)
        self.data = self._incoming(iterable)

    def _incoming(self, elements: Iterable[Any]) -> set[Any]:
        converter = None
        out = set()
        for element in _iterable_data(elements):
            if type(element) not in SCALAR_TYPES:
                if converter is None:
                    converter = _Converter(self)
                element = converter.element(element, None)
            out.add(element)
        return out

    def __contains__(self, element: object) -> bool:
        return element in self.data

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return repr(self.data)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (set, (list(self.data),))

    def _changed(self, before: int) -> None:
        if len(self.data) != before:
            self._p_changed = True

    # -- changing

    def add(self, element: Any) -> None:
        check_writable(self)
        if type(element) not in SCALAR_TYPES:
            element = _Converter(self).element(element, None)
        data = self.data
        if element not in data:
            data.add(element)
            self._p_changed = True

    def discard(self, element: Any) -> None:
        check_writable(self)
        data = self.data
        if element in data:
            data.discard(element)
            self._p_changed = True

    def remove(self, element: Any) -> None:
        check_writable(self)
        self.data.remove(element)
        self._p_changed = True

    def pop(self) -> Any:
        check_writable(self)
        element = self.data.pop()
        self._p_changed = True
        return element

    def clear(self) -> None:
        check_writable(self)
        if self.data:
            self.data.clear()
            self._p_changed = True

    def update(self, *others: Iterable[Any]) -> None:
        check_writable(self)
        incoming = [self._incoming(other) for other in others]
        data = self.data
        before = len(data)
        data.update(*incoming)
        self._changed(before)

    def difference_update(self, *others: Iterable[Any]) -> None:
        check_writable(self)
        data = self.data
        before = len(data)
        data.difference_update(*map(_iterable_data, others))
        self._changed(before)

    def intersection_update(self, *others: Iterable[Any]) -> None:
        check_writable(self)
        data = self.data
        before = len(data)
        data.intersection_update(*map(_iterable_data, others))
        self._changed(before)

    def symmetric_difference_update(self, other: Iterable[Any]) -> None:
        check_writable(self)
        incoming = self._incoming(other)
        if incoming:
            self.data.symmetric_difference_update(incoming)
            self._p_changed = True

    def __ior__(self, other: Any) -> Any:
        if _set_data(other) is None:
            return NotImplemented
        self.update(other)
        return self

    def __iand__(self, other: Any) -> Any:
        if _set_data(other) is None:
            return NotImplemented
        self.intersection_update(other)
        return self

    def __isub__(self, other: Any) -> Any:
        if _set_data(other) is None:
            return NotImplemented
        self.difference_update(other)
        return self

    def __ixor__(self, other: Any) -> Any:
        if _set_data(other) is None:
            return NotImplemented
        self.symmetric_difference_update(other)
        return self

    # -- new sets (free-standing nodes, as set's methods return new sets)

    def _new(self, data: set[Any]) -> Any:
        node = type(self)()
        node.data = data
        return node

    def copy(self) -> Any:
        return self._new(set(self.data))

    def union(self, *others: Iterable[Any]) -> Any:
        return self._new(self.data.union(*(self._incoming(o) for o in others)))

    def intersection(self, *others: Iterable[Any]) -> Any:
        return self._new(self.data.intersection(*map(_iterable_data, others)))

    def difference(self, *others: Iterable[Any]) -> Any:
        return self._new(self.data.difference(*map(_iterable_data, others)))

    def symmetric_difference(self, other: Iterable[Any]) -> Any:
        return self._new(self.data.symmetric_difference(self._incoming(other)))

    def issubset(self, other: Iterable[Any]) -> bool:
        return self.data.issubset(_iterable_data(other))

    def issuperset(self, other: Iterable[Any]) -> bool:
        return self.data.issuperset(_iterable_data(other))

    def isdisjoint(self, other: Iterable[Any]) -> bool:
        return self.data.isdisjoint(_iterable_data(other))

    def __or__(self, other: Any) -> Any:
        return self.union(other) if _set_data(other) is not None else NotImplemented

    __ror__ = __or__

    def __and__(self, other: Any) -> Any:
        return self.intersection(other) if _set_data(other) is not None else NotImplemented

    __rand__ = __and__

    def __sub__(self, other: Any) -> Any:
        return self.difference(other) if _set_data(other) is not None else NotImplemented

    def __rsub__(self, other: Any) -> Any:
        data = _set_data(other)
        return NotImplemented if data is None else self._new(self._incoming(data) - self.data)

    def __xor__(self, other: Any) -> Any:
        if _set_data(other) is None:
            return NotImplemented
        return self.symmetric_difference(other)

    __rxor__ = __xor__

    def __eq__(self, other: object) -> bool:
        data = _set_data(other)
        return NotImplemented if data is None else self.data == data

    def __ne__(self, other: object) -> bool:
        data = _set_data(other)
        return NotImplemented if data is None else self.data != data

    def __le__(self, other: Any) -> bool:
        data = _set_data(other)
        return NotImplemented if data is None else self.data <= data

    def __lt__(self, other: Any) -> bool:
        data = _set_data(other)
        return NotImplemented if data is None else self.data < data

    def __ge__(self, other: Any) -> bool:
        data = _set_data(other)
        return NotImplemented if data is None else self.data >= data

    def __gt__(self, other: Any) -> bool:
        data = _set_data(other)
        return NotImplemented if data is None else self.data > data

    def _p_resolveConflict(self, old: Any, committed: Any, new: Any) -> Any:  # noqa: N802
        """Merge two transactions' changes: the elements each added, minus those each removed."""
        before, theirs, ours = (state["data"] for state in (old, committed, new))
        merged = dict(committed)
        merged["data"] = (theirs - (before - ours)) | (ours - before)
        return merged


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

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (int, (self.value,))


# -- conversion ------------------------------------------------------------------------


def _check_flat_key(node: Any, key: Any) -> None:
    problem = _hashable_problem(key, nan=False)
    if problem is not None:
        raise UnstorableValueError(_join(_path_or_empty(node), key), problem)


def _convert_into(anchor: Any, value: Any, key: Any) -> Any:
    """*value* converted for storing under *key* of the node *anchor*."""
    return _Converter(anchor).convert(value, (None, key))


class _Converter:
    """Converts plain values going into one node, in one call.

    ``memo`` maps each plain container met to its node, so a container reached
    twice (``[d, d]``) becomes one shared node, as it is one shared object,
    and one that contains itself is refused. Inside a store call the
    conversions are recorded in the transaction's :class:`_Originals`.
    """

    __slots__ = ("_originals", "anchor", "memo")

    def __init__(self, anchor: Any) -> None:
        self.anchor = anchor
        self.memo: dict[int, Any] = {}
        self._originals: Any = _MISSING

    @property
    def originals(self) -> _Originals | None:
        """Looked up at the first container: most values converted are scalars or nodes."""
        if self._originals is _MISSING:
            self._originals = _originals_for(self.anchor)
        return self._originals

    def convert(self, value: Any, where: Any) -> Any:
        try:
            return self._convert(value, where)
        except RecursionError:
            raise UnstorableValueError(
                self._path(where),
                "nested too deeply to store (past Python's recursion limit); flatten it",
            ) from None
        except _Refused as refused:
            raise UnstorableValueError(self._path(refused.where), refused.detail) from None

    def element(self, value: Any, where: Any) -> Any:
        """*value* converted as a set element: a hashable value."""
        try:
            return self._element(value, where)
        except _Refused as refused:
            raise UnstorableValueError(self._path(refused.where), refused.detail) from None

    def _path(self, where: Any) -> str:
        anchor = "" if self.anchor is None else _path_or_empty(self.anchor)
        return _join(anchor, _where(where)) if where is not None else anchor

    def _element(self, value: Any, where: Any) -> Any:
        problem = _hashable_problem(value, nan=True)
        if problem is not None:
            raise _Refused(where, problem)
        if isinstance(value, frozenset):
            return self._frozenset(value, where)
        if isinstance(value, tuple):
            return self._tuple(value, where)
        return value

    def _convert(self, value: Any, where: Any) -> Any:
        kind = type(value)
        if kind in SCALAR_TYPES:
            return value
        if isinstance(value, Persistent):
            self._check_jar(value, where)
            return value
        ident = id(value)
        done = self.memo.get(ident)
        if done is not None:
            if done is _IN_PROGRESS:
                raise _Refused(
                    where,
                    "contains itself (a cycle of plain containers); only persistent "
                    "objects may refer back to each other",
                )
            return done
        if isinstance(value, dict | list | set):
            originals = self.originals
            if originals is not None:
                node = originals.reuse(value)
                if node is not None:
                    self.memo[ident] = node
                    return node
            self.memo[ident] = _IN_PROGRESS
            node = self._container(value, where)
            self.memo[ident] = node
            if originals is not None:
                originals.add(value, node, self.anchor, where)
            return node
        if isinstance(value, tuple):
            self.memo[ident] = _IN_PROGRESS
            converted = self._tuple(value, where)
            del self.memo[ident]
            return converted
        if isinstance(value, frozenset):
            return self._frozenset(value, where)
        if isinstance(value, enum.Enum | str | int | float | bytes):
            return value
        raise _Refused(where, _unstorable_detail(value))

    def _container(self, value: Any, where: Any) -> Any:
        convert = self._convert
        if isinstance(value, dict):
            if hasattr(type(value), "__missing__"):
                raise _Refused(
                    where,
                    f"a {_type_name(value)} cannot be stored: its default for missing keys "
                    "would be lost (a stored dict raises KeyError instead); store "
                    "dict(value) and use node.setdefault(key, default) where you relied "
                    "on the default",
                )
            keys = list(value)
            values = [
                v if type(v) in SCALAR_TYPES else convert(v, (where, k)) for k, v in value.items()
            ]
            try:
                return dict_node(keys, values)
            except UnstorableValueError as exc:  # a key: its path is the key
                raise _Refused((where, exc.path), exc.detail) from None
        if isinstance(value, list):
            node = List.__new__(List)
            node.data = [
                v if type(v) in SCALAR_TYPES else convert(v, (where, i))
                for i, v in enumerate(value)
            ]
            return node
        node = Set.__new__(Set)
        node.data = {e if type(e) in SCALAR_TYPES else self._element(e, where) for e in value}
        return node

    def _tuple(self, value: tuple[Any, ...], where: Any) -> tuple[Any, ...]:
        convert = self._convert
        converted = [
            v if type(v) in SCALAR_TYPES else convert(v, (where, i)) for i, v in enumerate(value)
        ]
        return tuple(converted) if type(value) is tuple else type(value)(*converted)

    def _frozenset(self, value: frozenset[Any], where: Any) -> frozenset[Any]:
        if all(type(e) in SCALAR_TYPES for e in value):
            return value
        return frozenset(self._element(e, where) for e in value)

    def _check_jar(self, value: Any, where: Any) -> None:
        jar = value._p_jar
        if jar is None:
            return
        target = getattr(self.anchor, "_p_jar", None) or current_connection()
        if target is not None and jar is not target:
            raise _Refused(
                where,
                f"this {type(value).__name__} belongs to another transaction (a snapshot, "
                "or another store call); store a copy made with snaptree.to_plain() "
                "instead",
            )


class _Refused(Exception):
    """Inside conversion: the value at ``where`` cannot be stored, for ``detail``."""

    def __init__(self, where: Any, detail: str) -> None:
        super().__init__(where, detail)
        self.where = where
        self.detail = detail


def _unstorable_detail(value: Any) -> str:
    if isinstance(value, bytearray):
        return (
            "cannot store a bytearray: it would be stored as a copy, and changes made "
            "to it in place would be lost; store bytes(value), and assign new bytes "
            "to change it"
        )
    return (
        f"cannot store a {_type_name(value)}: ZODB would not see changes made to it in "
        "place; store a dict, list, set or scalar, or make the class a "
        "persistent.Persistent subclass"
    )


def to_persistent(value: Any, path: str = "") -> Any:
    """Return *value* in the form the tree stores: persistent containers, immutable leaves.

    Raises UnstorableValueError naming the path of the first value that cannot
    be stored safely, including plain containers that contain themselves and
    nesting deeper than Python's recursion limit. Inside a store call, the
    plain containers converted are checked again at commit (see the module
    docstring).
    """
    if type(value) in SCALAR_TYPES:
        return value
    converter = _Converter(None)
    return converter.convert(value, (None, path) if path else None)


def mapping_of(keys: Any, values: list[Any]) -> Mapping:
    """A Mapping of *keys* to *values*, which are already converted and checked."""
    node = Mapping.__new__(Mapping)  # what __init__ adds (argument handling) is not needed
    _fill(node, keys, values)
    return node


def _fill(node: Mapping, keys: Any, values: list[Any]) -> None:
    """Give the empty *node* the given items, built in C.

    Mapping's own ``update`` would run its Python checks again for every key.
    A dict small enough for one BTree bucket is instead given its state
    directly, in the format BTrees pickle buckets in (and so part of every
    database's format: checked against BTrees 6.x); a larger one is filled as
    a plain OOBTree in C and its state handed over while that state holds
    only buckets; deeper trees take BTree's own insert, key by key.
    """
    if not values:
        return
    if len(values) <= _LEAF_SIZE:
        node.__setstate__((((tuple(_chain(sorted(zip(keys, values, strict=True)))),),),))
        return
    filled = OOBTree(list(zip(keys, values, strict=True)))
    state = filled.__getstate__()
    if not isinstance(state[0][0], OOBTree):
        node.__setstate__(state)
        return
    for key, value in zip(keys, values, strict=True):
        _bt_setitem(node, key, value)


def dict_node(keys: Any, values: list[Any], path: str = "") -> Mapping | FlatMapping:
    """The node a dict of *keys* to converted *values* becomes: a Mapping if its keys order.

    Keys are checked first: NaN and plain objects are refused with their path
    (``path`` is the dict's own path). Keys of one type that orders become a
    Mapping; others, and keys that turn out not to order (naive with aware
    datetimes), a FlatMapping, which keeps them as a dict would.
    """
    types = {type(k) for k in keys}
    if not types <= _SIMPLE_KEY_TYPES:
        for key in keys:
            problem = _hashable_problem(key, nan=False)
            if problem is not None:
                raise UnstorableValueError(_join(path, key), problem)
    if len(types) == 1:
        orderable = types <= _MAPPING_KEY_TYPES
    else:
        # BTrees cannot order str against int; bool keys collide with 0 and 1.
        orderable = not types or types <= _NUMBER_KEY_TYPES
    if orderable:
        try:
            return mapping_of(keys, values)
        except TypeError:  # naive with aware datetimes, tuples of mixed types
            pass
    flat = FlatMapping.__new__(FlatMapping)
    flat.data = dict(zip(keys, values, strict=True))
    return flat


#: Key types that need no check: hashable values that cannot be NaN.
_SIMPLE_KEY_TYPES = frozenset(
    {str, int, bytes, bool, type(None), datetime.date, datetime.datetime, datetime.time}
)
#: A dict whose keys are all of one of these types becomes a Mapping.
_MAPPING_KEY_TYPES = frozenset(
    {str, int, float, bytes, tuple, datetime.date, datetime.datetime, decimal.Decimal}
)
_NUMBER_KEY_TYPES = frozenset({int, float})


# -- commit check of the plain objects converted ----------------------------------------


_ORIGINALS_KEY = object()  # the transaction's data slot (transaction keys it by id)


class _Originals:
    """The plain containers converted during one transaction, checked before it commits.

    After ``d[k] = c`` the tree holds a converted copy of ``c``; a change made
    later through ``c`` itself would not reach the tree, silently. Each
    container converted is kept with a shallow copy of its contents and a
    weak reference to its node; the check, a before-commit hook, compares
    every original whose node still exists with its copy. A node that no
    longer exists was never stored. The comparison is ``==``: an equal
    value assigned again loses nothing, and nested containers, being
    shallow-copied, compare by identity first, so an unchanged tree costs one
    C-level pass over each container.

    ``latest`` finds the last conversion of an original, so that assigning
    the same unchanged object again reuses its node: the tree then shares
    one node where Python would share one object.
    """

    __slots__ = ("latest", "records")

    def __init__(self) -> None:
        self.records: list[tuple[Any, Any, Any, Any, Any]] = []
        self.latest: dict[int, tuple[Any, Any, Any, Any, Any]] = {}

    def add(self, original: Any, node: Any, anchor: Any, where: Any) -> None:
        if isinstance(original, dict):
            shadow: Any = dict(original)
        else:
            shadow = list(original) if isinstance(original, list) else set(original)
        record = (
            original,
            shadow,
            weakref.ref(node),
            None if anchor is None else weakref.ref(anchor),
            where,
        )
        self.records.append(record)
        self.latest[id(original)] = record

    def reuse(self, original: Any) -> Any:
        record = self.latest.get(id(original))
        if record is None or record[0] is not original:
            return None
        node = record[2]()
        if node is None or not _unchanged(original, record[1]):
            return None
        return node

    def check(self) -> None:
        for original, shadow, node_ref, anchor_ref, where in self.records:
            if node_ref() is None or _unchanged(original, shadow):
                continue
            anchor = None if anchor_ref is None else anchor_ref()
            base = "" if anchor is None else path_of(anchor)
            path = _join(base or "", _where(where))
            raise MisuseError(
                f"{path or '/'}: the {_type_name(original)} stored there was changed "
                f"afterwards through the original object (it holds {reprlib.repr(original)}, "
                f"the tree {reprlib.repr(shadow)}); the tree holds a copy made at the "
                "assignment, so the change would be lost, and nothing was committed. "
                "Change the tree instead (read node[key] back after assigning it and "
                "change that), or finish the object before assigning it"
            )


def _unchanged(original: Any, shadow: Any) -> bool:
    try:
        return bool(original == shadow)
    except Exception:  # a value whose == fails cannot be shown unchanged
        return False


def _originals_for(anchor: Any) -> _Originals | None:
    """The conversions record of the transaction a value going into *anchor* joins, if any."""
    jar = getattr(anchor, "_p_jar", None)
    if jar is None:
        jar = current_connection()
        if jar is None:
            return None  # outside any store call: nothing will commit
    try:
        txn = jar.transaction_manager.get()
    except NoTransaction:
        return None
    try:
        return txn.data(_ORIGINALS_KEY)
    except KeyError:
        originals = _Originals()
        txn.set_data(_ORIGINALS_KEY, originals)
        txn.addBeforeCommitHook(originals.check)
        return originals


# -- reading back ------------------------------------------------------------------------


def to_plain(value: Any) -> Any:
    """Return a plain copy of *value*: nodes become dicts, lists, sets and ints.

    Works at any depth (it keeps its own stack, not Python's). A node reached
    twice is copied once, so what the tree shares stays shared, and a node
    that contains itself becomes a dict that contains itself. Plain dicts,
    lists and tuples are copied when they hold nodes; views of a node become
    views of its copy. Persistent objects of the user's own classes are
    returned as they are.
    """
    if type(value) in SCALAR_TYPES:
        return value
    copier = _PlainCopier()
    result = copier.shell(value)
    copier.fill()
    return result


class _PlainCopier:
    """Copies a tree without recursion: ``shell`` makes an empty copy, ``fill`` fills them all."""

    __slots__ = ("made", "pending")

    def __init__(self) -> None:
        self.made: dict[int, Any] = {}
        self.pending: list[tuple[Any, Any]] = []

    def shell(self, value: Any) -> Any:
        kind = type(value)
        if kind in SCALAR_TYPES:
            return value
        made = self.made.get(id(value))
        if made is not None:
            return made
        if isinstance(value, Mapping | FlatMapping | List) or kind is dict or kind is list:
            out: Any = {} if isinstance(value, Mapping | FlatMapping | dict) else []
            self.made[id(value)] = out
            self.pending.append((value, out))
            return out
        if isinstance(value, Set):
            out = set(value.data)
        elif kind is set:
            out = set(value)
        elif isinstance(value, Counter):
            out = value.value
        elif isinstance(value, tuple):
            items = [self.shell(v) for v in value]
            out = tuple(items) if kind is tuple else type(value)(*items)
        elif isinstance(value, _MappingKeys | _FlatKeys):
            return self.shell(value._mapping).keys()
        elif isinstance(value, _MappingValues | _FlatValues):
            return self.shell(value._mapping).values()
        elif isinstance(value, _MappingItems | _FlatItems):
            return self.shell(value._mapping).items()
        else:
            return value
        self.made[id(value)] = out
        return out

    def fill(self) -> None:
        pending = self.pending
        scalars = SCALAR_TYPES
        shell = self.shell
        while pending:
            source, out = pending.pop()
            if type(out) is dict:
                if isinstance(source, Mapping):
                    items: Any = _bt_items(source)
                elif isinstance(source, FlatMapping):
                    items = source.data.items()
                else:
                    items = source.items()
                for k, v in items:
                    out[k] = v if type(v) in scalars else shell(v)
            else:
                data = source.data if isinstance(source, List) else source
                append = out.append
                for v in data:
                    append(v if type(v) in scalars else shell(v))


# -- paths -----------------------------------------------------------------------------------

#: How many values :func:`path_of` looks at before it gives up.
_PATH_SEARCH_LIMIT = 200_000


def path_of(node: Any) -> str | None:
    """Where *node* is in its tree ("" for the root, "a/b/0"), or None if it cannot be found.

    Nodes do not know their parents, so this searches the tree breadth-first
    from the root, through loaded nodes only (a node the caller reached has
    loaded ancestors) and at most ``_PATH_SEARCH_LIMIT`` values. It is for
    error messages, never on a hot path.
    """
    jar = getattr(node, "_p_jar", None) or current_connection()
    if jar is None:
        return None
    try:
        root = jar.root().get(ROOT_KEY)
    except Exception:  # a closed or broken connection: no path to give
        return None
    if node is root:
        return ""
    seen = {id(root)}
    level: list[tuple[Any, str]] = [(root, "")]
    budget = _PATH_SEARCH_LIMIT
    while level and budget > 0:
        next_level = []
        for container, path in level:
            for key, child in _children(container):
                budget -= 1
                if budget < 0:
                    return None
                if child is node:
                    return _join(path, key)
                if id(child) not in seen and _loaded_container(child):
                    seen.add(id(child))
                    next_level.append((child, _join(path, key)))
        level = next_level
    return None


def _path_or_empty(node: Any) -> str:
    return path_of(node) or ""


def _loaded_container(value: Any) -> bool:
    if isinstance(value, tuple):
        return True
    return isinstance(value, Mapping | FlatMapping | List) and value._p_state != GHOST


def _children(container: Any) -> Iterable[tuple[Any, Any]]:
    if isinstance(container, Mapping):
        return _bt_items(container)
    if isinstance(container, FlatMapping):
        return container.data.items()
    if isinstance(container, List):
        return enumerate(container.data)
    return enumerate(container)
