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

from typing import Any, ClassVar

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
