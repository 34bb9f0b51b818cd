"""How the list node behaves: :class:`snaptree.tree.List`.

A PersistentList that converts every new item as an assignment would, and
refuses a change before it touches its data.
"""

from __future__ import annotations

import itertools
from collections import UserList
from collections.abc import Iterable, Iterator
from typing import Any

from ._connection import check_writable
from ._node_base import CheckedAttribute, NodeBase
from ._values import STORED_AS_IS


class ListMethods(NodeBase):
    """What :class:`snaptree.tree.List` does on top of PersistentList."""

    __slots__ = ()

    data = CheckedAttribute()  # UserList's methods all read it

    def __init__(self, initlist: Iterable[Any] | None = None) -> None:
        check_writable(self)
        self.data = [] if initlist is None else self._incoming(initlist, 0)

    def _incoming(self, values: Iterable[Any], start: int) -> list[Any]:
        # Through chain(): list() would trust the iterable's length hint and
        # allocate for it; list.extend, which this replaces, ignores a wrong one.
        values = list(values) if type(values) in (list, tuple) else list(itertools.chain(values))
        converter = None
        for i, value in enumerate(values):
            if type(value) not in STORED_AS_IS:
                if converter is None:
                    converter = self._converter()
                values[i] = converter.convert(value, start + i)
        return values

    def __iter__(self) -> Iterator[Any]:
        return holding(self, iter(self.data))

    def __reversed__(self) -> Iterator[Any]:
        return holding(self, reversed(self.data))

    def __setitem__(self, index: Any, value: Any) -> None:
        check_writable(self)
        if isinstance(index, slice):
            value = self._incoming(value, index.start or 0)
        elif type(value) not in STORED_AS_IS:
            value = self._converter().convert(value, index)
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
        if type(value) not in STORED_AS_IS:
            value = self._converter().convert(value, len(data))
        data.append(value)
        self._p_changed = True

    def insert(self, index: int, value: Any) -> None:
        check_writable(self)
        if type(value) not in STORED_AS_IS:
            value = self._converter().convert(value, index)
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

    # UserList's + takes any iterable (``l + "ab"`` adds two letters); a list's takes lists.
    def __add__(self, other: Any) -> Any:
        return super().__add__(other) if isinstance(other, list | UserList) else NotImplemented

    def __radd__(self, other: Any) -> Any:
        return super().__radd__(other) if isinstance(other, list | UserList) else NotImplemented

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
        try:
            self.data.sort(*args, **kwargs)
        finally:
            # A sort that fails midway (a key that raises, values that do not
            # compare) leaves the list partly sorted, as a plain list is left:
            # marked changed all the same, so that an abort undoes it and a
            # caught error commits what plain Python would hold, never an
            # unmarked change that a later call of this thread would commit.
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


def holding(owner: Any, iterator: Iterator[Any]) -> Iterator[Any]:
    """*iterator*, keeping *owner* alive until it ends, as a list's iterator keeps its list.

    The empty ``islice`` that holds *owner* is dropped by ``chain`` when the
    iteration ends; each step costs a C call, not a generator's frame.
    """
    return itertools.chain(iterator, itertools.islice((owner,), 0))
