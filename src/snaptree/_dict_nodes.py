"""How the mapping nodes behave: :class:`snaptree.tree.Mapping` and ``FlatMapping``.

Both take dict's arguments and operators (read up front, so that a refused
change leaves no trace), convert what is stored into them, and refuse a
change before they touch their data. Mapping keeps its items in a BTree
(sorted keys, concurrent inserts of different keys merged); FlatMapping in
one dict, for keys that cannot be ordered.
"""

from __future__ import annotations

import collections.abc as abc
import itertools
import reprlib
from collections.abc import Iterable, Iterator
from threading import get_ident
from typing import Any

from BTrees.OOBTree import OOBTree

from ._connection import OwnedConnection, check_readable, check_writable
from ._convert import Converter
from ._node_base import MISSING, CheckedAttribute, NodeBase
from ._values import STORED_AS_IS, mapping_key_problem, type_name
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

_LEAF_SIZE = OOBTree.max_leaf_size
_chain = itertools.chain.from_iterable

# BTree's own methods, in C: a Mapping's Python methods use them for what is
# already checked and converted, so nothing is converted twice.
_bt_get = OOBTree.get
_bt_getitem = OOBTree.__getitem__
_bt_setitem = OOBTree.__setitem__
_bt_delitem = OOBTree.__delitem__
_bt_contains = OOBTree.__contains__
_bt_len = OOBTree.__len__
_bt_bool = OOBTree.__bool__
# BTree's iterators, faster than iterating its keys()/values()/items() sequences
_bt_keys = OOBTree.iterkeys
_bt_values = OOBTree.itervalues
_bt_items = OOBTree.iteritems


def dict_pairs(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> list[tuple[Any, Any]]:
    """The (key, value) pairs ``dict.update(*args, **kwargs)`` would store, read up front.

    Reading them all first lets a node check and convert every one before it
    changes anything, so a refused update leaves no trace.
    """
    if len(args) > 1:
        raise TypeError(f"{name} expected at most 1 argument, got {len(args)}")
    pairs: list[tuple[Any, Any]] = []
    if args:
        other = args[0]
        if isinstance(other, MappingMethods):
            check_readable(other)
            pairs = list(_bt_items(other))
        elif isinstance(other, FlatMappingMethods):
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


def plain_dict(other: Any) -> dict[Any, Any] | None:
    """*other* as a dict to compare with, or None if it is not a mapping."""
    if type(other) is dict:
        return other
    if isinstance(other, MappingMethods):
        check_readable(other)
        return dict(_bt_items(other))
    if isinstance(other, FlatMappingMethods):
        return other.data
    if isinstance(other, abc.Mapping):
        return dict(other.items())
    return None


class DictOperators(NodeBase):
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
            if type(value) not in STORED_AS_IS:  # one node under every key, as dict.fromkeys shares
                value = Converter(cls._node_types).convert(value)
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


class MappingMethods(GuardedIteration, DictOperators):
    """What :class:`snaptree.tree.Mapping` does on top of its BTree."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_writable(self)  # __init__ again on a stored mapping updates it, as dict's does
        super().__init__()
        if args or kwargs:
            self._put_all(dict_pairs(args, kwargs, "Mapping"))

    # -- reading: each read is checked first (check_readable); BTree's own
    # read methods, in C, are replaced for that

    def __getitem__(self, key: Any) -> Any:
        jar = self._p_jar  # check_readable's test, inline: the commonest reads
        if type(jar) is OwnedConnection and jar._snaptree_owner != get_ident():
            check_readable(self)
        try:
            return _bt_getitem(self, key)
        except TypeError:  # a key of another type: not here, as a dict would say
            value = self._get_equal(key)
        except KeyError:
            hash(key)  # an unhashable key is a TypeError, as a dict says, on an empty one too
            raise
        if value is MISSING:
            raise KeyError(key)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        jar = self._p_jar  # check_readable's test, inline: the commonest reads
        if type(jar) is OwnedConnection and jar._snaptree_owner != get_ident():
            check_readable(self)
        try:
            value = _bt_get(self, key, MISSING)
        except TypeError:
            value = self._get_equal(key)
        if value is MISSING:
            hash(key)
            return default
        return value

    def __contains__(self, key: Any) -> bool:
        jar = self._p_jar  # check_readable's test, inline: the commonest reads
        if type(jar) is OwnedConnection and jar._snaptree_owner != get_ident():
            check_readable(self)
        try:
            if _bt_contains(self, key):
                return True
        except TypeError:
            return self._get_equal(key) is not MISSING
        hash(key)
        return False

    def _get_equal(self, key: Any) -> Any:
        """The value of a key equal to *key*, which does not compare with the keys here; MISSING.

        A dict finds ``1+0j`` among int keys (equal, and hashed alike); a
        BTree compares keys, and a complex compares with nothing, so it is
        looked up by its real part. Any other key that does not compare is
        of a type no key here equals; an unhashable one is a TypeError, as
        a dict says.
        """
        hash(key)
        if not isinstance(key, complex) or key.imag:
            return MISSING
        try:
            return _bt_get(self, key.real, MISSING)
        except TypeError:
            return MISSING

    has_key = __contains__

    def __len__(self) -> int:
        check_readable(self)
        return _bt_len(self)

    def __bool__(self) -> bool:
        check_readable(self)
        return _bt_bool(self)

    def minKey(self, *bound: Any) -> Any:  # noqa: N802 - BTree's name
        check_readable(self)
        return OOBTree.minKey(self, *bound)

    def maxKey(self, *bound: Any) -> Any:  # noqa: N802 - BTree's name
        check_readable(self)
        return OOBTree.maxKey(self, *bound)

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
        check_readable(self)
        node = type(self)()
        fill(node, list(_bt_keys(self)), list(_bt_values(self)))
        return node

    def __eq__(self, other: object) -> bool:
        check_readable(self)
        plain = plain_dict(other)
        if plain is None:
            return NotImplemented
        return dict(_bt_items(self)) == plain

    @reprlib.recursive_repr("{...}")
    def __repr__(self) -> str:
        check_readable(self)
        return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in _bt_items(self)) + "}"

    def __reduce_ex__(self, protocol: Any) -> Any:
        check_readable(self)
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
        if type(value) not in STORED_AS_IS:
            value = self._converter().convert(value, key)
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
        self._delete(key)
        if watches:
            keys_changed(self)

    def _delete(self, key: Any) -> None:
        """Delete *key*, or the key equal to it that ``_get_equal`` finds; else KeyError."""
        try:
            _bt_delitem(self, key)
        except TypeError:
            if self._get_equal(key) is MISSING:
                raise KeyError(key) from None
            _bt_delitem(self, key.real)
        except KeyError:
            hash(key)
            raise

    def insert(self, key: Any, value: Any) -> int:
        """BTree's insert: set *key* only if it is missing; 1 if it was."""
        check_writable(self)
        if self.__contains__(key):
            return 0
        self[key] = value
        return 1

    def setdefault(self, key: Any, default: Any = None) -> Any:
        check_writable(self)
        value = self.get(key, MISSING)
        if value is not MISSING:
            return value
        self[key] = default
        return _bt_getitem(self, key)

    def pop(self, key: Any, *default: Any) -> Any:
        check_writable(self)
        if len(default) > 1:
            raise TypeError(f"pop expected at most 2 arguments, got {1 + len(default)}")
        if default and not _bt_bool(self):
            return default[0]  # without a look at the key, as a dict's pop does
        value = self.get(key, MISSING)
        if value is MISSING:
            if default:
                return default[0]
            raise KeyError(key)
        self._delete(key)
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
        self._put_all(dict_pairs(args, kwargs, "update"))

    def _put_all(self, pairs: list[tuple[Any, Any]]) -> None:
        """Store *pairs*, all or none of them: a refused key leaves the mapping as it was."""
        for key, _ in pairs:
            if type(key) is not str and type(key) is not int:
                self._check_key(key)
        converter = self._converter()
        pairs = [(k, v if type(v) in STORED_AS_IS else converter.convert(v, k)) for k, v in pairs]
        # A key that does not compare with the keys here fails in the lookup,
        # before anything changed; one that does not compare with another new
        # key fails while inserting, and what was inserted is undone.
        try:
            previous = [_bt_get(self, key, MISSING) for key, _ in pairs]
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
                if old is MISSING:
                    OOBTree.pop(self, key, None)
                else:
                    _bt_setitem(self, key, old)
            raise self._unorderable(pairs[done][0], exc) from None
        if watches and any(old is MISSING for old in previous):
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
            raise UnstorableValueError(self._path_to(key), problem)

    def _unorderable(self, key: Any, exc: TypeError) -> UnstorableValueError:
        try:
            held = f" ({type_name(OOBTree.minKey(self))} keys)"
        except (ValueError, TypeError):
            held = ""
        return UnstorableValueError(
            self._path_to(key),
            f"the key {key!r} ({type_name(key)}) cannot be ordered against the keys "
            f"already in this mapping{held}: {exc}. A snaptree Mapping keeps its keys "
            "sorted, so they must be comparable with each other (all str, or all "
            "numbers, all timezone-aware datetimes ...): convert the key (str(key), "
            "dt.replace(tzinfo=...)), or keep such keys in a mapping of their own",
        )


class FlatMappingMethods(DictOperators):
    """What :class:`snaptree.tree.FlatMapping` does on top of PersistentMapping."""

    __slots__ = ()

    data = CheckedAttribute()  # UserDict's methods all read it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_writable(self)
        pairs = self._incoming(dict_pairs(args, kwargs, "FlatMapping")) if args or kwargs else ()
        self._p_activate()  # a ghost's state is loaded before its __dict__ is read
        data = self.__dict__.get("data")
        if data is None:
            self.data = dict(pairs)
            return
        if pairs:  # __init__ again on a stored mapping updates it, as dict's does
            data.update(pairs)
            self._p_changed = True

    def _incoming(self, pairs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        for key, _ in pairs:
            if type(key) is not str and type(key) is not int:
                self._check_flat_key(key)
        converter = self._converter()
        return [(k, v if type(v) in STORED_AS_IS else converter.convert(v, k)) for k, v in pairs]

    def __setitem__(self, key: Any, value: Any) -> None:
        check_writable(self)
        if type(key) is not str and type(key) is not int:
            self._check_flat_key(key)
        if type(value) not in STORED_AS_IS:
            value = self._converter().convert(value, key)
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
        pairs = self._incoming(dict_pairs(args, kwargs, "update"))
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
        plain = plain_dict(other)
        if plain is None:
            return NotImplemented
        return self.data == plain

    def __copy__(self) -> dict[Any, Any]:
        return dict(self.data)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (dict, (), None, None, iter(self.data.items()))


def fill(node: Any, keys: Any, values: list[Any]) -> None:
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
