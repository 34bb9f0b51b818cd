"""Building the tree's nodes from a JSON file's parser events, as the file is read.

The events come from :func:`snaptree._json_events.events`, a block of the
file at a time; they build the nodes bottom-up, as
:class:`snaptree._convert.Converter` does for plain data: a node is made
when its JSON object or array ends. What stays in memory is the containers
still open and their finished children since the last batch. The result is
the tree ``json.load`` would give; nesting is limited to :data:`MAX_DEPTH`
levels, about where Python's parser stops (its recursion limit), so every
file ``json.load`` read imports.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from persistent import Persistent

from ._convert import WIDE, NodeTypes, extend_mapping
from ._json_events import BLOCK, open_json, position
from .errors import InputError, UnstorableValueError

_MISSING: Any = object()


#: Deepest nesting of objects and arrays a streamed file may have: what
#: ``json.load`` read before (it stops at 995 levels, Python's recursion
#: limit), so a file imported then imports now, and a tree that deep can
#: still be exported (the json and pickle writers stop sooner: see docs/import.md).
MAX_DEPTH = 1_000


def _not_a_mapping(name: str, what: str) -> UnstorableValueError:
    return UnstorableValueError(
        "/",
        f"{name} holds {what}: only a mapping can be imported at the root (its keys become "
        "the root's keys); give a path such as --path model",
    )


def _too_deep(path: str, name: str) -> InputError:
    """The InputError for nesting beyond MAX_DEPTH, with the place it goes past it."""
    return InputError(
        f"{name}: the JSON is nested too deeply (more than {MAX_DEPTH:,} levels of objects "
        f"and arrays) at {position(path, _deep_offset(path))}; nothing was imported"
    )


def _deep_offset(path: str) -> int:
    """The offset of the bracket that opens level MAX_DEPTH + 1 (brackets in strings skipped)."""
    depth, offset = 0, 0
    in_string = escaped = False
    with open_json(path) as stream:
        for block in iter(lambda: stream.read(BLOCK), b""):
            for index, byte in enumerate(block):
                if in_string:
                    if escaped:
                        escaped = False
                    elif byte == 0x5C:  # backslash
                        escaped = True
                    elif byte == 0x22:
                        in_string = False
                elif byte == 0x22:
                    in_string = True
                elif byte in b"[{":
                    depth += 1
                    if depth > MAX_DEPTH:
                        return offset + index
                elif byte in b"]}":
                    depth -= 1
            offset += len(block)
    return offset


class _Frame:
    """A JSON object or array being read: its finished children so far."""

    __slots__ = ("added", "items", "key", "mapping", "node")

    def __init__(self, mapping: bool) -> None:
        self.mapping = mapping
        self.items: Any = {} if mapping else []  # key -> value, or values
        self.key: Any = None  # an object's key whose value comes next
        self.node: Any = None  # a wide object's Mapping, made early (see Converter.pending)
        self.added = 0  # children handed out already


class JsonBuilder:
    """Makes the tree's nodes from parser events: a Mapping per object, a List per array.

    The batch protocol is :class:`snaptree._convert.Converter`'s: every
    ``batch`` nodes made, ``on_batch(self)`` runs, and :meth:`pending` /
    :meth:`settled` hand out what a batch commit must make reachable. JSON
    has no sharing and no value the tree cannot store, so nothing here
    checks or remembers; duplicate keys keep their last value, as in
    ``json.load``. ``max_objects`` caps the nodes made (an InputError);
    ``root_only`` refuses a file whose value is not an object (an import at
    the root takes a mapping's keys), at its first event.
    """

    def __init__(
        self,
        nodes: NodeTypes,
        *,
        batch: int,
        on_batch: Callable[[JsonBuilder], None],
        max_objects: int | None = None,
        name: str = "",
        root_only: bool = False,
    ) -> None:
        self._nodes = nodes
        self._stack: list[_Frame] = []
        self._batch = batch
        self._next_batch = batch
        self._on_batch = on_batch
        self._limit = max_objects
        self._name = name
        self._root_only = root_only
        self._top_checked = 0
        #: Nodes made so far.
        self.made = 0
        #: The value of the whole file, once it is read.
        self.result: Any = _MISSING

    def feed(self, events: list[tuple[str, Any]]) -> None:
        """Build from the next *events*."""
        stack = self._stack
        frame = stack[-1] if stack else None
        for event, value in events:
            if event == "map_key":
                frame.key = value  # type: ignore[union-attr]
                continue
            if event == "start_map" or event == "start_array":
                if frame is None and self._root_only and event != "start_map":
                    raise _not_a_mapping(self._name, "an array")
                if len(stack) >= MAX_DEPTH:
                    raise _too_deep(self._name, self._name)
                frame = _Frame(event == "start_map")
                stack.append(frame)
                continue
            if event == "end_map" or event == "end_array":
                if frame.node is not None:  # type: ignore[union-attr]
                    self._on_batch(self)  # the rest joins its early node in a transaction
                value = self._finish(stack.pop())
                frame = stack[-1] if stack else None
                if frame is None:
                    self.result = value
                elif frame.mapping:
                    frame.items[frame.key] = value
                else:
                    frame.items.append(value)
                if self.made >= self._next_batch:
                    self._next_batch += self._batch
                    self._on_batch(self)
                continue
            if event == "number" and type(value) is not int:
                value = float(value)  # a Decimal: the float json.loads would make
            if frame is None:
                if self._root_only:
                    raise _not_a_mapping(self._name, f"a {type(value).__name__}")
                self.result = value
            elif frame.mapping:
                frame.items[frame.key] = value
            else:
                frame.items.append(value)

    def _finish(self, frame: _Frame) -> Any:
        """The node of a JSON object or array whose children are all read."""
        self.made += 1
        if self._limit is not None and self.made > self._limit:
            raise InputError(
                f"{self._name}: more than {self._limit:,} objects (max_objects, "
                "--max-objects); nothing was imported"
            )
        items = frame.items
        if frame.node is not None:  # a wide object's Mapping, made early and filled by now
            return frame.node
        if frame.mapping:
            return self._nodes.mapping(items.keys(), list(items.values()))
        return self._nodes.list(items)

    def pending(self) -> list[Any]:
        """The new nodes no node holds yet (see :meth:`snaptree._convert.Converter.pending`)."""
        found = []
        for frame in self._stack:
            items = frame.items
            if frame.mapping and (frame.node is not None or len(items) >= WIDE):
                keys, values = items.keys(), list(items.values())
                if frame.node is None:
                    frame.node = self._nodes.mapping(keys, values)
                else:
                    extend_mapping(frame.node, keys, values)
                if frame.node._p_jar is None:
                    found.append(frame.node)
                continue
            values = items.values() if frame.mapping else items
            found.extend(
                value
                for value in itertools.islice(values, frame.added, None)
                if isinstance(value, Persistent) and value._p_jar is None
            )
        return found

    def settled(self) -> None:
        """The nodes of the last :meth:`pending` are committed."""
        for frame in self._stack:
            if frame.node is not None:
                if self._stack[0] is frame:
                    self._top_checked = 0
                frame.items.clear()
            frame.added = len(frame.items)

    def new_top_keys(self) -> list[Any]:
        """The keys of the outermost object read since the last call (to check they are new)."""
        if not self._stack or not self._stack[0].mapping:
            return []
        items = self._stack[0].items
        keys = list(itertools.islice(items.keys(), self._top_checked, None))
        self._top_checked = len(items)
        return keys
