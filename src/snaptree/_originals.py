"""The commit check for plain objects changed after they were converted into the tree.

After ``d[k] = c`` the tree holds a node converted from ``c``, not ``c``
itself; a change made later through ``c`` (``c["orders"].append(1)``) would
not reach the tree, and would be lost without a word. So inside a store call
every plain container converted is remembered with a shallow copy of its
contents and a weak reference to its node, and a before-commit hook compares
each original whose node still exists with its copy: a difference fails the
commit with the node's path. A node that no longer exists was never stored.

The comparison is ``==``: an equal value assigned again loses nothing, and
nested containers, being shallow-copied, compare by identity first, so an
unchanged tree costs one C-level pass over each container.

The same record lets a later conversion in the transaction reuse the node of
an original that is still unchanged: ``d["a"] = x; d["b"] = x`` then shares
one node where Python shares one object.
"""

from __future__ import annotations

import reprlib
import weakref
from typing import Any

from transaction.interfaces import NoTransaction

from ._connection import current_connection
from ._values import type_name
from .errors import MisuseError
from .paths import join, path_of

_ORIGINALS_KEY = object()  # the transaction's data slot (transaction keys it by id)


class Originals:
    """The plain containers converted during one transaction, checked before it commits."""

    __slots__ = ("latest", "records")

    def __init__(self) -> None:
        #: (original, shallow copy, node, where it went: anchor and key)
        self.records: list[tuple[Any, Any, Any, Any, Any]] = []
        self.latest: dict[int, tuple[Any, Any, Any, Any, Any]] = {}

    def add(self, original: Any, node: Any, anchor: Any, key: Any) -> None:
        """Remember that *original* became *node*, converted for *key* of *anchor*."""
        if isinstance(original, dict):
            shadow: Any = dict(original)
        else:
            shadow = list(original) if isinstance(original, list) else set(original)
        record = (
            original,
            shadow,
            weakref.ref(node),
            None if anchor is None else weakref.ref(anchor),
            key,
        )
        self.records.append(record)
        self.latest[id(original)] = record

    def reuse(self, original: Any) -> Any:
        """The node *original* became earlier in the transaction, if it is unchanged since."""
        record = self.latest.get(id(original))
        if record is None or record[0] is not original:
            return None
        node = record[2]()
        if node is None or not _unchanged(original, record[1]):
            return None
        return node

    def check(self) -> None:
        for original, shadow, node_ref, anchor_ref, key in self.records:
            node = node_ref()
            if node is None or _unchanged(original, shadow):
                continue
            raise MisuseError(
                f"{_where(node, anchor_ref, key)}: the {type_name(original)} stored there was "
                f"changed afterwards through the original object (it holds "
                f"{reprlib.repr(original)}, the tree {reprlib.repr(shadow)}); the tree holds "
                "a copy made at the assignment, so the change would be lost, and nothing was "
                "committed. Change the tree instead (read node[key] back after assigning it "
                "and change that), or finish the object before assigning it"
            )


def _where(node: Any, anchor_ref: Any, key: Any) -> str:
    """The node's path; failing that, where the value holding it was assigned."""
    path = path_of(node)
    if path is None:
        anchor = None if anchor_ref is None else anchor_ref()
        base = None if anchor is None else path_of(anchor)
        keys = [] if key is None else [key]
        path = join([base, *keys] if base else keys)
    return path or "/"


def _unchanged(original: Any, shadow: Any) -> bool:
    try:
        return bool(original == shadow)
    except Exception:  # a value whose == fails cannot be shown unchanged
        return False


def originals_for(anchor: Any) -> Originals | None:
    """The record of the transaction a value going into *anchor* joins; None outside one."""
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
        originals = Originals()
        txn.set_data(_ORIGINALS_KEY, originals)
        txn.addBeforeCommitHook(originals.check)
        return originals
