"""Iterating a mapping node while it changes raises, as a dict does; the nodes' key/value views.

A BTree iterated while its keys change skips or repeats keys without a word
(deleting every key of 10 while iterating keys() deleted 5). A Mapping's
iterators therefore register a watch, and every change to its key set marks
the watches of that mapping (:func:`keys_changed`); the next step of a
marked iterator raises RuntimeError, as a dict's does. The watches live
here, keyed by the mapping's id, not on the mapping: ZODB may turn a mapping
into a ghost (savepoints run the cache's GC) and a ghost loses its instance
state. An entry exists only while an iterator holding the mapping runs, so
the id cannot be reused meanwhile.

The guarded iteration is a method the Mapping inherits
(:class:`GuardedIteration`), so the generators it makes are the node's own
iteration: a store call may return them (they are read to the end inside the
transaction), unlike a generator of the caller's.
"""

from __future__ import annotations

import collections.abc as abc
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from BTrees.OOBTree import OOBTree

from ._connection import check_readable
from ._node_base import MISSING

# BTree's iterators, faster than iterating its keys()/values()/items() sequences
bt_keys = OOBTree.iterkeys
bt_values = OOBTree.itervalues
bt_items = OOBTree.iteritems


class _Watch:
    __slots__ = ("changed",)

    def __init__(self) -> None:
        self.changed = False


#: The watches of the mappings being iterated, by the mapping's id. Nodes
#: test it before anything else (``if watches and ...``): empty, it costs
#: nothing.
watches: dict[int, list[_Watch]] = {}
_watches_lock = threading.Lock()


def keys_changed(node: Any) -> None:
    """Mark every running iteration of *node*: its next step raises."""
    for watch in watches.get(id(node), ()):
        watch.changed = True


class GuardedIteration:
    """Iteration that raises at the first step after the keys changed (mixed into Mapping)."""

    __slots__ = ()

    def _iterate(self, source: Callable[[Any], Iterable[Any]]) -> Iterator[Any]:
        """Iterate ``source(self)``, guarded unless the node cannot change.

        A snapshot's nodes refuse every change (the connection is read-only),
        so their iteration, which exports run over the whole tree, needs no
        guard.
        """
        check_readable(self)
        if getattr(self._p_jar, "_snaptree_read_only", False):  # type: ignore[attr-defined]
            return iter(source(self))
        return self._guarded(source)

    def _guarded(self, source: Callable[[Any], Iterable[Any]]) -> Iterator[Any]:
        """The source is made at the first step, not before: an iterator made
        earlier would hold bucket positions that a change in between makes stale.
        """
        watch = _Watch()
        ident = id(self)
        with _watches_lock:
            watches.setdefault(ident, []).append(watch)
        try:
            for item in source(self):
                yield item
                if watch.changed:
                    raise RuntimeError("dictionary changed size during iteration")
        finally:
            with _watches_lock:
                running = watches[ident]
                running.remove(watch)
                if not running:
                    del watches[ident]


def reversed_keys(node: Any) -> Iterator[Any]:
    return reversed(OOBTree.keys(node))


def _reversed_values(node: Any) -> Iterator[Any]:
    return reversed(OOBTree.values(node))


def _reversed_items(node: Any) -> Iterator[Any]:
    return reversed(OOBTree.items(node))


class MappingKeys(abc.KeysView):
    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return self._mapping._iterate(bt_keys)

    def __reversed__(self) -> Iterator[Any]:
        return self._mapping._iterate(reversed_keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


class MappingValues(abc.ValuesView):
    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return self._mapping._iterate(bt_values)

    def __reversed__(self) -> Iterator[Any]:
        return self._mapping._iterate(_reversed_values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


class MappingItems(abc.ItemsView):
    __slots__ = ()

    def __contains__(self, item: object) -> bool:
        """As a dict's items view says: only a pair can be in it (ItemsView unpacks anything)."""
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        key, value = item
        found = self._mapping.get(key, MISSING)
        return found is not MISSING and (found is value or found == value)

    def __iter__(self) -> Iterator[Any]:
        return self._mapping._iterate(bt_items)

    def __reversed__(self) -> Iterator[Any]:
        return self._mapping._iterate(_reversed_items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


class FlatKeys(abc.KeysView):
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


class FlatValues(abc.ValuesView):
    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mapping.data.values())

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self._mapping.data.values())

    def __len__(self) -> int:
        return len(self._mapping.data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


class FlatItems(abc.ItemsView):
    __slots__ = ()

    def __contains__(self, item: object) -> bool:
        return item in self._mapping.data.items()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mapping.data.items())

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self._mapping.data.items())

    def __len__(self) -> int:
        return len(self._mapping.data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"
