"""Paths in the tree: the one way snaptree names a place in it, read and written.

A path is a string of keys and list indexes joined by ``/``:
``accounts/a1/entries/0``. A leading or trailing ``/`` is ignored, so
``/accounts`` and ``accounts/`` name the same place, and ``/`` alone is the
root. Everything that takes a place in the tree uses these rules: ``import
--path``, ``export --subtree``, and the paths in error messages
(``UnstorableValueError``, ``RetriesExhausted``).

A segment is matched against a mapping's keys as the string it is, or, when
the mapping has no such string key, as the integer it spells (``accounts/7``
finds the key ``7`` of an int-keyed mapping); in a list it must be an
integer index, negative ones counting from the end. A key that contains
``/`` cannot be named by a path. A bad path is an :class:`ArgumentError`
naming how far it got.

Nodes do not know their parents, so the path *of* a node (:func:`path_of`,
for error messages) is found by searching the tree from its root.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from persistent import Persistent
from persistent.interfaces import GHOST

from ._held import current_connection
from .errors import ArgumentError

ROOT = "/"

#: The key of ZODB's root under which the tree's root mapping lives.
ROOT_KEY = "snaptree"

#: How many values :func:`path_of` looks at before it gives up.
PATH_SEARCH_LIMIT = 200_000

_MISSING = object()


def parse(text: str, *, what: str = "path") -> tuple[str, ...]:
    """The segments of *text*; ``()`` for the root.

    An empty text is refused rather than taken for the root: it almost
    always comes from an unset shell variable (``--path "$TARGET"``), and
    reading it as the root would put the data over the whole tree.
    """
    stripped = text.strip()
    if not stripped:
        raise ArgumentError(
            f"the {what} {text!r} is empty; give a path such as accounts/a1, or / for the root"
        )
    if stripped == ROOT:
        return ()
    segments = tuple(stripped.strip("/").split("/"))
    if any(not segment for segment in segments):
        raise ArgumentError(f"the {what} {text!r} has an empty segment; write it like accounts/a1")
    return segments


def absolute(segments: Iterable[str]) -> str:
    """Parsed *segments* as a manifest writes a subtree: ``/`` or ``/accounts/a1``."""
    return "/" + "/".join(segments)


def join(keys: Iterable[Any]) -> str:
    """The path of *keys* (``accounts/a1/entries/0``); ``/`` for none."""
    return "/".join(str(key) for key in keys) or ROOT


def contains(node: Any, key: Any) -> bool:
    """``key in node``, False for a key the mapping cannot compare with its own (as a dict says)."""
    try:
        return key in node
    except TypeError:  # a key of a type the mapping cannot compare with its own
        return False


def _as_int(segment: str) -> int | None:
    try:
        return int(segment)
    except ValueError:
        return None


def is_sequence(node: Any) -> bool:
    """Lists and tuples are indexed by position; strings and bytes are leaves."""
    return isinstance(node, Sequence) and not isinstance(node, str | bytes | bytearray)


def is_mapping(node: Any) -> bool:
    return hasattr(node, "keys") and hasattr(node, "__getitem__") and not is_sequence(node)


def key_in(node: Any, segment: str, *, where: str = "", creating: bool = False) -> Any:
    """The key or index *segment* names in the container *node*.

    With *creating*, a segment the mapping does not hold yet is the key to
    create: the integer it spells when the mapping's keys are integers,
    else the string.
    """
    if is_sequence(node):
        index = _as_int(segment)
        if index is None:
            raise ArgumentError(f"{where or ROOT}: a list index must be a number, not {segment!r}")
        if not -len(node) <= index < len(node):
            raise ArgumentError(f"{where or ROOT}: no item {index} in a list of {len(node)}")
        return index
    if contains(node, segment):
        return segment
    number = _as_int(segment)
    if number is not None and contains(node, number):
        return number
    if creating:
        if number is not None and _int_keyed(node):
            return number
        return segment
    raise ArgumentError(f"{where or ROOT}: there is no key {segment!r} there")


def _int_keyed(node: Any) -> bool:
    for key in node:
        return isinstance(key, int) and not isinstance(key, bool)
    return False


def resolve(root: Any, path: str | Sequence[str], *, what: str = "path") -> Any:
    """The value at *path* under *root*; ArgumentError naming how far it got otherwise."""
    segments = parse(path, what=what) if isinstance(path, str) else tuple(path)
    node = root
    for depth, segment in enumerate(segments):
        where = join(segments[:depth])
        if not (is_sequence(node) or is_mapping(node)):
            raise ArgumentError(
                f"{what} {join(segments)}: the value at {where} is a "
                f"{type(node).__name__}, not a mapping or a list"
            )
        node = node[key_in(node, segment, where=where)]
    return node


def children(node: Any) -> Iterator[tuple[Any, Any]]:
    """(key or index, value) of what a mapping or a list holds; nothing for anything else."""
    if is_mapping(node):
        yield from node.items()
    elif is_sequence(node):
        yield from enumerate(node)


def find(
    root: Any,
    matches: Callable[[Any], bool],
    *,
    limit: int,
    descend: Callable[[Any], bool] = lambda value: True,
) -> str | None:
    """The path of the first value under *root* that *matches*, breadth first; None if none.

    For error messages only: nodes do not know their parents, so this looks
    at most at *limit* values (shallow places are found first) and goes only
    into containers *descend* accepts (for example, only loaded ones).
    """
    if matches(root):
        return ROOT
    queue: collections.deque[tuple[Any, tuple[Any, ...]]] = collections.deque([(root, ())])
    seen = {id(root)}
    looked = 0
    while queue:
        node, keys = queue.popleft()
        for key, child in children(node):
            looked += 1
            if looked > limit:
                return None
            if matches(child):
                return join((*keys, key))
            if id(child) not in seen and descend(child):
                seen.add(id(child))
                queue.append((child, (*keys, key)))
    return None


def path_of(node: Any) -> str | None:
    """Where *node* is in its tree ("" for the root, "a/b/0"), or None if it cannot be found.

    Searched breadth first from the root of the tree of the node's connection
    (or of the calling thread's store call, for a node not stored yet),
    through loaded containers only (a node the caller reached has loaded
    ancestors) and at most :data:`PATH_SEARCH_LIMIT` values. It is for error
    messages, never on a hot path, and never raises.
    """
    jar = getattr(node, "_p_jar", None) or current_connection()
    if jar is None:
        return None
    try:
        root = jar.root().get(ROOT_KEY)
        found = find(
            root, lambda value: value is node, limit=PATH_SEARCH_LIMIT, descend=_loaded_container
        )
    except Exception:  # a closed or broken connection, a container that fails: no path
        return None
    return None if found is None else "" if found == ROOT else found


def _loaded_container(value: Any) -> bool:
    if isinstance(value, Persistent):
        return value._p_state != GHOST and (is_mapping(value) or is_sequence(value))
    return isinstance(value, tuple)
