"""The persistent node types of a snaptree tree: the dicts, lists and sets it stores.

Code written for an in-memory tree assigns plain dicts, lists and sets and then
changes them in place. ZODB only sees changes to persistent objects, so
snaptree's containers convert what is assigned into them (the one
conversion, :mod:`snaptree._convert`, which an import uses too): dicts become
:class:`Mapping` (or :class:`FlatMapping` when their keys cannot be
ordered), lists :class:`List`, sets :class:`Set`. What ZODB could not keep
current is refused with an error naming its path (:mod:`snaptree._values`).

The nodes behave like the dict, list and set they replace: CPython's own
protocol suites run against them (tests/test_conformance.py). Where storage
makes that impossible the difference is an error, never a silent one; the
differences that remain are listed in docs/coming-from-dicts.md. Three
mechanisms keep it that way:

- A Mapping iterates under a guard (:mod:`snaptree._views`): changing its
  keys while iterating it raises RuntimeError, as a dict does (a BTree would
  skip keys silently).
- Assignment converts, where Python would store the object itself; what
  the conversion copied is checked at commit (:mod:`snaptree._originals`),
  so a change made afterwards through the original object fails the commit
  with the path instead of being lost.
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
import itertools
import reprlib
from collections.abc import Iterable, Iterator
from typing import Any

from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping

from ._connection import check_writable
from ._convert import Converter, NodeTypes
from ._values import SCALAR_TYPES, hashable_problem, mapping_key_problem, type_name
from ._views import (
    FlatItems,
    FlatKeys,
    FlatValues,
    GuardedIteration,
    MappingItems,
    MappingKeys,
    MappingValues,
    keys_changed,
    reversed_keys,
    watches,
)
from .errors import UnstorableValueError
from .paths import ROOT_KEY, join, path_of

__all__ = [
    "NODES",
    "ROOT_KEY",
    "SCALAR_TYPES",
    "Counter",
    "FlatMapping",
    "List",
    "Mapping",
    "Set",
    "dict_node",
    "to_persistent",
    "to_plain",
]

_LEAF_SIZE = OOBTree.max_leaf_size
_chain = itertools.chain.from_iterable
_MISSING: Any = object()

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


def _path_to(node: Any, key: Any) -> str:
    """The path of *key* in *node*, for an error (the key alone if the node is not found)."""
    base = path_of(node)
    return join([base, key] if base else [key])


def _check_flat_key(node: Any, key: Any) -> None:
    problem = hashable_problem(key, nan=False)
    if problem is not None:
        raise UnstorableValueError(_path_to(node, key), problem)


def _convert_into(anchor: Any, value: Any, key: Any) -> Any:
    """*value* converted for storing under *key* of the node *anchor*."""
    return Converter(NODES, anchor).convert(value, key)


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


class _DictOperators:
    """What both mapping nodes take from dict: ``fromkeys``, ``|``, ``|=`` and ``!=``.

    Placed before their storage class, whose own versions these replace: a
    BTree's ``|`` is a union of key sets, and UserDict's ``|=`` would change
    the data unchecked and unseen by ZODB.
    """

    __slots__ = ()

    @classmethod
    def fromkeys(cls, iterable: Iterable[Any], value: Any = None) -> Any:
        node = cls()
        keys = list(iterable)
        if keys:
            value = to_persistent(value)  # one node under every key, as dict.fromkeys shares
            for key in keys:
                node[key] = value  # type: ignore[index]
        return node

    def __or__(self, other: Any) -> Any:
        if not isinstance(other, abc.Mapping):
            return NotImplemented
        node = self.copy()  # type: ignore[attr-defined]
        node.update(other)
        return node

    def __ror__(self, other: Any) -> Any:
        if not isinstance(other, abc.Mapping):
            return NotImplemented
        node = type(self)(other)  # type: ignore[call-arg]
        node.update(self)  # type: ignore[attr-defined]
        return node

    def __ior__(self, other: Any) -> Any:
        self.update(other)  # type: ignore[attr-defined]
        return self

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal


class Mapping(GuardedIteration, _DictOperators, OOBTree):
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
        return self._iterate(_bt_keys)

    def __reversed__(self) -> Iterator[Any]:
        return self._iterate(reversed_keys)

    def keys(self) -> MappingKeys:  # type: ignore[override]
        return MappingKeys(self)

    def values(self) -> MappingValues:  # type: ignore[override]
        return MappingValues(self)

    def items(self) -> MappingItems:  # type: ignore[override]
        return MappingItems(self)

    def iterkeys(self, *bounds: Any) -> Iterator[Any]:
        """Keys from BTree's ranged iteration (``min``, ``max``), under the same guard."""
        return self._iterate(lambda node: OOBTree.iterkeys(node, *bounds))

    def itervalues(self, *bounds: Any) -> Iterator[Any]:
        return self._iterate(lambda node: OOBTree.itervalues(node, *bounds))

    def iteritems(self, *bounds: Any) -> Iterator[Any]:
        return self._iterate(lambda node: OOBTree.iteritems(node, *bounds))

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

    @reprlib.recursive_repr("{...}")
    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in _bt_items(self)) + "}"

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (dict, (), None, None, iter(_bt_items(self)))

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
        if watches and id(self) in watches and not self.__contains__(key):
            self._insert(key, value)
            keys_changed(self)
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
        if watches:
            keys_changed(self)

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
        if watches:
            keys_changed(self)
        return value

    def popitem(self) -> tuple[Any, Any]:
        """Remove and return the item with the smallest key (a dict removes its newest)."""
        check_writable(self)
        item = OOBTree.popitem(self)
        if watches:
            keys_changed(self)
        return item

    def clear(self) -> None:
        check_writable(self)
        if OOBTree.__bool__(self):
            OOBTree.clear(self)
            if watches:
                keys_changed(self)

    def update(self, *args: Any, **kwargs: Any) -> None:
        check_writable(self)
        self._put_all(_pairs(args, kwargs, "update"))

    def _put_all(self, pairs: list[tuple[Any, Any]]) -> None:
        """Store *pairs*, all or none of them: a refused key leaves the mapping as it was."""
        for key, _ in pairs:
            if type(key) is not str and type(key) is not int:
                self._check_key(key)
        converter = Converter(NODES, self)
        pairs = [(k, v if type(v) in SCALAR_TYPES else converter.convert(v, k)) for k, v in pairs]
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
        if watches and any(old is _MISSING for old in previous):
            keys_changed(self)

    def _fails(self, key: Any) -> bool:
        try:
            _bt_contains(self, key)
        except TypeError:
            return True
        return False

    def _check_key(self, key: Any) -> None:
        problem = mapping_key_problem(key)
        if problem is not None:
            raise UnstorableValueError(_path_to(self, key), problem)

    def _unorderable(self, key: Any, exc: TypeError) -> UnstorableValueError:
        try:
            held = f" ({type_name(OOBTree.minKey(self))} keys)"
        except (ValueError, TypeError):
            held = ""
        return UnstorableValueError(
            _path_to(self, key),
            f"the key {key!r} ({type_name(key)}) cannot be ordered against the keys "
            f"already in this mapping{held}: {exc}. A snaptree Mapping keeps its keys "
            "sorted, so they must be comparable with each other (all str, or all "
            "numbers, all timezone-aware datetimes ...): convert the key (str(key), "
            "dt.replace(tzinfo=...)), or keep such keys in a mapping of their own",
        )


class FlatMapping(_DictOperators, PersistentMapping):
    """A dict node for keys that cannot be ordered (mixed key types): a dict in one record.

    Concurrent changes to it conflict and are retried; prefer keys of one type
    where you can (they make a :class:`Mapping`). Keeps insertion order, like a dict.
    """

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_writable(self)
        pairs = self._incoming(_pairs(args, kwargs, "FlatMapping")) if args or kwargs else ()
        self.data = dict(pairs)

    def _incoming(self, pairs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        for key, _ in pairs:
            if type(key) is not str and type(key) is not int:
                _check_flat_key(self, key)
        converter = Converter(NODES, self)
        return [(k, v if type(v) in SCALAR_TYPES else converter.convert(v, k)) for k, v in pairs]

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

    def keys(self) -> FlatKeys:  # type: ignore[override]
        return FlatKeys(self)

    def values(self) -> FlatValues:  # type: ignore[override]
        return FlatValues(self)

    def items(self) -> FlatItems:  # type: ignore[override]
        return FlatItems(self)

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self.data)

    def copy(self) -> Any:
        """A new, free-standing node with the same items (shared, as dict.copy shares them)."""
        node = type(self)()
        node.data = dict(self.data)
        return node

    def __eq__(self, other: object) -> bool:
        plain = _plain_dict(other)
        if plain is None:
            return NotImplemented
        return self.data == plain

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
                    converter = Converter(NODES, self)
                values[i] = converter.convert(value, start + i)
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
                    converter = Converter(NODES, self)
                element = converter.element(element)
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
            element = Converter(NODES, self).element(element)
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


# -- making nodes from converted contents ------------------------------------------


def _mapping_of(keys: Any, values: list[Any]) -> Mapping:
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
            problem = hashable_problem(key, nan=False)
            if problem is not None:
                raise UnstorableValueError(join([path, key] if path else [key]), problem)
    if len(types) == 1:
        orderable = types <= _MAPPING_KEY_TYPES
    else:
        # BTrees cannot order str against int; bool keys collide with 0 and 1.
        orderable = not types or types <= _NUMBER_KEY_TYPES
    if orderable:
        try:
            return _mapping_of(keys, values)
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


def _list_node(values: list[Any]) -> List:
    node = List.__new__(List)  # the values are converted: __init__ would convert them again
    node.data = values
    return node


def _set_node(elements: set[Any]) -> Set:
    node = Set.__new__(Set)
    node.data = elements
    return node


#: How the conversion makes this module's nodes.
NODES = NodeTypes(mapping=dict_node, list=_list_node, set=_set_node)


def to_persistent(value: Any, path: str = "") -> Any:
    """Return *value* in the form the tree stores: persistent containers, immutable leaves.

    Any depth converts. An object reached twice becomes one node reached
    twice, as Python shares it. Raises UnstorableValueError naming the path
    (below *path*) of the first value that cannot be stored safely,
    including plain containers that contain themselves. Inside a store call,
    the plain containers converted are checked again at commit (see
    :mod:`snaptree._originals`).
    """
    if type(value) in SCALAR_TYPES:
        return value
    return Converter(NODES, prefix=(path,) if path else ()).convert(value)


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
        elif isinstance(value, MappingKeys | FlatKeys):
            return self.shell(value._mapping).keys()
        elif isinstance(value, MappingValues | FlatValues):
            return self.shell(value._mapping).values()
        elif isinstance(value, MappingItems | FlatItems):
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
