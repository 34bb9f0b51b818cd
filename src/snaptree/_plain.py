"""Reading a tree back as plain data: the copy behind :func:`snaptree.tree.to_plain`.

Without recursion, so a tree of any depth copies; what the tree shares stays
shared in the copy, and a node that contains itself becomes a dict that
contains itself.
"""

from __future__ import annotations

from typing import Any

from BTrees.OOBTree import OOBTree

from ._connection import check_readable
from ._dict_nodes import FlatMappingMethods, MappingMethods
from ._list_node import ListMethods
from ._set_node import SetMethods
from ._values import SCALAR_TYPES, rebuilt_tuple
from ._views import FlatItems, FlatKeys, FlatValues, MappingItems, MappingKeys, MappingValues

_bt_items = OOBTree.iteritems
_DICTS = (MappingMethods, FlatMappingMethods, dict)
_CONTAINERS = (MappingMethods, FlatMappingMethods, ListMethods)


class PlainCopier:
    """Copies a tree without recursion: ``shell`` makes an empty copy, ``fill`` fills them all."""

    __slots__ = ("counter", "made", "pending")

    def __init__(self, counter: type) -> None:
        self.counter = counter  # snaptree.tree.Counter, which copies as its int
        self.made: dict[int, Any] = {}
        self.pending: list[tuple[Any, Any]] = []

    def shell(self, value: Any) -> Any:
        kind = type(value)
        if kind in SCALAR_TYPES:
            return value
        made = self.made.get(id(value))
        if made is not None:
            return made
        if (
            isinstance(value, MappingMethods | FlatMappingMethods | ListMethods)
            or kind is dict
            or kind is list
        ):
            out: Any = {} if isinstance(value, MappingMethods | FlatMappingMethods | dict) else []
            self.made[id(value)] = out
            self.pending.append((value, out))
            return out
        if isinstance(value, SetMethods):
            out = set(value.data)
        elif kind is set:
            out = set(value)
        elif isinstance(value, self.counter):
            out = value.value
        elif isinstance(value, tuple):
            items = [self.shell(v) for v in value]
            out = rebuilt_tuple(value, items)
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
                if isinstance(source, MappingMethods):
                    check_readable(source)  # BTree's own iteration, in C, is not checked
                    items: Any = _bt_items(source)
                elif isinstance(source, FlatMappingMethods):
                    items = source.data.items()
                else:
                    items = source.items()
                for k, v in items:
                    out[k] = v if type(v) in scalars else shell(v)
            else:
                data = source.data if isinstance(source, ListMethods) else source
                append = out.append
                for v in data:
                    append(v if type(v) in scalars else shell(v))
