"""What every node behaviour needs: how to make nodes, and paths for its errors.

The node classes live in :mod:`snaptree.tree`, whose class paths are part of
every database's format; their behaviour lives beside it, one module per kind
(:mod:`snaptree._dict_nodes`, :mod:`snaptree._list_node`,
:mod:`snaptree._set_node`). A behaviour converts what is put into its node,
and the conversion makes nodes of tree's classes: ``tree`` hands them over by
setting :attr:`NodeBase._node_types` once, when it is imported, instead of
each behaviour importing ``tree`` back (an import circle).
"""

from __future__ import annotations

from threading import get_ident
from typing import Any, ClassVar

from ._connection import OwnedConnection, check_readable
from ._convert import Converter, NodeTypes
from ._values import hashable_problem
from .errors import UnstorableValueError
from .paths import join, path_of

#: A default that no caller can pass.
MISSING: Any = object()


class NodeBase:
    """Mixed into every node: the conversion into it, and the path of a key in it."""

    __slots__ = ()

    #: How conversions make nodes: :data:`snaptree.tree.NODES`, set by :mod:`snaptree.tree`.
    _node_types: ClassVar[NodeTypes]

    def _converter(self) -> Converter:
        """A conversion of values stored into this node (their paths start at the node's)."""
        return Converter(self._node_types, self)

    def _path_to(self, key: Any) -> str:
        """The path of *key* in this node, for an error (the key alone if the node is not found)."""
        base = path_of(self)
        return join([base, key] if base else [key])

    def _check_flat_key(self, key: Any) -> None:
        problem = hashable_problem(key, nan=False)
        if problem is not None:
            raise UnstorableValueError(self._path_to(key), problem)


class CheckedAttribute:
    """The attribute a node keeps its contents in (``data``, a Counter's ``value``), read
    only inside the call that has the node's connection (:func:`check_readable`).

    Every read method of the nodes built on UserList, UserDict, Set and
    Length goes through this attribute, their own and those inherited, so
    one check covers them all. Writes go to the instance dict as before;
    persistent has marked the node changed (and the connection checked the
    writer) before they arrive here.
    """

    def __init__(self, default: Any = MISSING) -> None:
        self._default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        jar = obj._p_jar  # check_readable's test, inline: every read of a list item pays it
        if type(jar) is OwnedConnection and jar._snaptree_owner != get_ident():
            check_readable(obj)
        try:
            return obj.__dict__[self._name]
        except KeyError:
            if self._default is MISSING:
                raise AttributeError(self._name) from None
            return self._default

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self._name] = value
