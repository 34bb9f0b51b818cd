"""How the set node behaves: :class:`snaptree.tree.Set`.

A set in one record whose changes are tracked (a plain set in the tree would
change unseen by ZODB), and whose concurrent changes are merged at commit.
"""

from __future__ import annotations

import collections.abc as abc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ZODB.POSException import ConflictError

from ._connection import check_writable
from ._node_base import CheckedAttribute, NodeBase
from ._values import STORED_AS_IS


def _set_data(other: Any) -> Any:
    """The elements of *other* to operate with, or None if it is not a set."""
    if isinstance(other, SetMethods):
        return other.data
    if isinstance(other, set | frozenset):
        return other
    if isinstance(other, abc.Set):
        return set(other)
    return None


def _iterable_data(other: Any) -> Any:
    return other.data if isinstance(other, SetMethods) else other


def _reflected(other: Any, result: Any) -> Any:
    """A reflected operation's result: with a frozenset on the left, a frozenset
    (``frozenset | set`` is one); else the new node."""
    if isinstance(other, frozenset) and result is not NotImplemented:
        return frozenset(result.data)
    return result


class SetMethods(NodeBase):
    """What :class:`snaptree.tree.Set` does on top of Persistent and MutableSet."""

    __slots__ = ()

    data = CheckedAttribute()  # every method reads it

    def __init__(self, iterable: Iterable[Any] = ()) -> None:
        check_writable(self)
        self.data = self._incoming(iterable)

    def _incoming(self, elements: Iterable[Any]) -> set[Any]:
        converter = None
        out = set()
        for element in _iterable_data(elements):
            if type(element) not in STORED_AS_IS:
                if converter is None:
                    converter = self._converter()
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

    @contextmanager
    def _changing(self) -> Iterator[set[Any]]:
        """The data, to change in place; marked changed afterwards if its size moved.

        Even when the change fails midway (``difference_update([1], 5)``
        removes 1, then finds 5 not iterable), as a plain set is left
        changed: an unmarked change would stay in the connection's cache
        after the abort, and a later call of this thread would commit it.
        """
        data = self.data
        before = len(data)
        try:
            yield data
        finally:
            if len(data) != before:
                self._p_changed = True

    # -- changing

    def add(self, element: Any) -> None:
        check_writable(self)
        if type(element) not in STORED_AS_IS:
            element = self._converter().element(element)
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
        with self._changing() as data:
            data.update(*incoming)

    def difference_update(self, *others: Iterable[Any]) -> None:
        check_writable(self)
        with self._changing() as data:
            data.difference_update(*map(_iterable_data, others))

    def intersection_update(self, *others: Iterable[Any]) -> None:
        check_writable(self)
        with self._changing() as data:
            data.intersection_update(*map(_iterable_data, others))

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

    def __ror__(self, other: Any) -> Any:
        return _reflected(other, self.__or__(other))

    def __and__(self, other: Any) -> Any:
        return self.intersection(other) if _set_data(other) is not None else NotImplemented

    def __rand__(self, other: Any) -> Any:
        return _reflected(other, self.__and__(other))

    def __sub__(self, other: Any) -> Any:
        return self.difference(other) if _set_data(other) is not None else NotImplemented

    def __rsub__(self, other: Any) -> Any:
        data = _set_data(other)
        if data is None:
            return NotImplemented
        return _reflected(other, self._new(self._incoming(data) - self.data))

    def __xor__(self, other: Any) -> Any:
        if _set_data(other) is None:
            return NotImplemented
        return self.symmetric_difference(other)

    def __rxor__(self, other: Any) -> Any:
        return _reflected(other, self.__xor__(other))

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
        """Merge two transactions' changes: the elements each added, minus those each removed.

        Only when they touched different elements, as BTrees merge changes to
        different keys. Two removals of one element (two ``pop()`` calls
        handing out the same job) or two additions of one (two callers that
        each found it absent and claimed it) conflict, so that the later
        call is tried again and sees the other's change, as under a lock.
        """
        before, theirs, ours = (state["data"] for state in (old, committed, new))
        if (before - theirs) & (before - ours) or (theirs - before) & (ours - before):
            raise ConflictError("both transactions removed, or both added, the same element")
        merged = dict(committed)
        merged["data"] = (theirs - (before - ours)) | (ours - before)
        return merged
