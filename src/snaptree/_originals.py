"""The commit check for plain objects changed after they were converted into the tree.

After ``d[k] = c`` the tree holds a node converted from ``c``, not ``c``
itself; a change made later through ``c`` (``c["orders"].append(1)``) would
not reach the tree, and would be lost without a word. So inside a store call
every plain container converted is remembered with a shallow copy of its
contents and a weak reference to its node, and a before-commit hook compares
each original whose node still exists with its copy: a difference fails the
commit with the node's path. A node that no longer exists was never stored.

The comparison is by identity first, so an unchanged tree costs one C-level
pass over each container; then equality with each value's type (and a
float's or Decimal's text) the same, keys, set elements and tuple items
included: an equal value assigned again loses nothing, but ``1`` changed
to ``True``, which compares equal, is a change.

The same record lets a later conversion in the transaction reuse the node of
an original that is still unchanged: ``d["a"] = x; d["b"] = x`` then shares
one node where Python shares one object.
"""

from __future__ import annotations

import decimal
import operator
import reprlib
import weakref
from typing import Any

from transaction.interfaces import NoTransaction

from ._held import current_connection
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
    """Whether *original* still holds what its copy *shadow* holds: the same values.

    First the same objects, in one C-level pass (the common case). Otherwise
    the same keys and values, in the same order, each of the same type and,
    for floats and Decimals, the same text, down through tuples, frozensets
    and containers put in place of the copied ones: ``1`` replaced by
    ``True`` (as a value, a key, a set element or inside a tuple), ``0.0``
    by ``-0.0`` or ``Decimal("1.0")`` by ``Decimal("1.00")`` compare equal,
    but the tree would keep the old one and the dump would say so.
    """
    try:
        if isinstance(original, dict):
            if (
                len(original) == len(shadow)
                and all(map(operator.is_, original.keys(), shadow.keys()))
                and all(map(operator.is_, original.values(), shadow.values()))
            ):
                return True
        elif (
            isinstance(original, list)
            and len(original) == len(shadow)
            and all(map(operator.is_, original, shadow))
        ):
            return True
        # The original may be a dict subclass (an OrderedDict) where its copy is a dict.
        return _same_contents(original, shadow)
    except Exception:  # a value whose == fails cannot be shown unchanged
        return False


def _same_value(a: Any, b: Any) -> bool:
    """*a* and *b* the same object, or equal with the same types all the way down.

    A container held by both (the common case) is the same object, checked as
    an original of its own; one put in place of another is compared here.
    """
    if a is b:
        return True
    kind = type(a)
    if kind is not type(b):
        return False
    if kind in _TEXT_MATTERS:
        return repr(a) == repr(b)
    if isinstance(a, tuple | list | dict | set | frozenset):
        return _same_contents(a, b)
    return bool(a == b)


def _same_contents(a: Any, b: Any) -> bool:
    """Containers of the same kind holding the same values (see _same_value), in order.

    Sets have no order: each element of *a* has an equal one in *b* that is
    the same value.
    """
    if len(a) != len(b):
        return False
    if isinstance(a, dict):
        return all(map(_same_value, a.items(), b.items()))
    if isinstance(a, set | frozenset):
        held = {element: element for element in b}
        return all(element in held and _same_value(element, held[element]) for element in a)
    return all(map(_same_value, a, b))


#: Types whose equal values can still differ in what a dump holds.
_TEXT_MATTERS = frozenset({float, decimal.Decimal, complex})


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
