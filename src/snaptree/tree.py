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
database; they are part of the storage format and must not move. So the
classes are declared here, and what they do lives in one module per kind:
:mod:`snaptree._dict_nodes`, :mod:`snaptree._list_node`,
:mod:`snaptree._set_node`; reading a tree back as plain data in
:mod:`snaptree._plain`.
"""

from __future__ import annotations

import collections.abc as abc
import datetime
import decimal
from typing import Any

from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping

from ._convert import Converter, NodeTypes
from ._dict_nodes import FlatMappingMethods, MappingMethods, fill
from ._list_node import ListMethods
from ._node_base import CheckedAttribute, NodeBase
from ._plain import PlainCopier
from ._set_node import SetMethods
from ._values import SCALAR_TYPES, hashable_problem, mapping_key_problem
from .errors import UnstorableValueError
from .paths import ROOT_KEY, join

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


# -- nodes (the behaviour is in the modules named above) --------------------------------


class Mapping(MappingMethods, OOBTree):
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


class FlatMapping(FlatMappingMethods, PersistentMapping):
    """A dict node for keys that cannot be ordered (mixed key types): a dict in one record.

    Concurrent changes to it conflict and are retried; prefer keys of one type
    where you can (they make a :class:`Mapping`). Keeps insertion order, like a dict.
    """

    __hash__ = None  # type: ignore[assignment]


class List(ListMethods, PersistentList):
    """A list node: a persistent list whose new items are converted like assignments."""

    __hash__ = None  # type: ignore[assignment]


class Set(SetMethods, abc.MutableSet, Persistent):
    """A set node: a persistent set whose changes are tracked, as List is for lists.

    A set assigned into the tree becomes one, so ``tags.add(x)`` keeps working
    and is stored. It is one record, like FlatMapping, but concurrent changes
    to it are merged at commit (elements added and removed by one transaction
    are added to and removed from what the other committed), so threads adding
    to one set do not conflict.
    """

    __hash__ = None  # type: ignore[assignment]


class Counter(Length):
    """A total that many threads bump at once without conflicts.

    Concurrent ``add`` calls are merged by conflict resolution (new = a + b -
    old), so the value is right but a transaction cannot rely on reading an
    exact value while others add. Read it with ``counter.value`` or ``int(counter)``.
    """

    value = CheckedAttribute(0)  # Length's class default, for copy.deepcopy

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
    node = Mapping.__new__(Mapping)  # what __init__ adds (argument handling) is not needed
    fill(node, keys, values)
    return node


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
        if orderable and tuple in types:
            # Tuples sort by their items, which may sort without an error and
            # still not order (frozensets compare as subsets): the BTree would
            # then miss keys it holds. Each tuple's items must be of key types.
            orderable = not any(mapping_key_problem(key) for key in keys)
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


#: Key types that need no check: hashable values that cannot be NaN and that protocol 3
#: pickles whole (not datetimes and times: a ZoneInfo or a fold=1 must be refused).
_SIMPLE_KEY_TYPES = frozenset({str, int, bytes, bool, type(None), datetime.date})
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
# The nodes' behaviours convert what is stored into them into these nodes.
NodeBase._node_types = NODES


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
    copier = PlainCopier(Counter)
    result = copier.shell(value)
    copier.fill()
    return result
