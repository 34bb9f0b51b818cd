"""The one conversion of plain data into the tree's persistent form: assignment and import use it.

Dicts become mapping nodes, lists List nodes, sets Set nodes; tuples and
frozensets are rebuilt around what they hold (and kept as they are when
nothing in them changes); scalars, enums and persistent objects are kept.
What ZODB could not keep current is refused with an
:class:`~snaptree.UnstorableValueError` naming its path: plain class
instances, bytearrays, dicts with a default factory, keys that are not
values (see :mod:`snaptree._values`).

**Sharing follows Python's aliasing.** An object reached twice in one
conversion (``[d, d]``, or the same dict under two keys of a pickle) becomes
one node, reached twice, so a change through one place shows through the
other, as it would in the plain data. A plain container that contains
itself (a cycle) is refused: a conversion makes each node from finished
children. Inside a store call the conversions are also recorded for the
commit check of :mod:`snaptree._originals`, through which assigning the same
unchanged object again later in the transaction reuses its node.

**Iterative and bottom-up.** The conversion keeps its own stack, so any depth
converts (only tuples and frozensets, stored inside their node's record, are
limited to :data:`~snaptree._values.MAX_VALUE_DEPTH`). A node is made once
all its children exist, which is what lets an import commit finished
subtrees in batches while it goes (:meth:`Converter.pending`). One exception
keeps an import's memory flat: a dict with more than :data:`WIDE` children
whose keys are all str (or all int) gets its Mapping node early, at a
batch, and later children go straight into it, so the thousands of finished
children of a wide mapping are not all held until it ends.

An import counts its data first (:func:`census`): which objects are reached
twice (the only ones the converter must remember), and how many objects a
dump would write, which is what a pickle bomb inflates.

The converter knows no node class: :mod:`snaptree.tree` gives it the
functions that make nodes (:class:`NodeTypes`), so that the nodes can
convert what is assigned into them without an import circle.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from BTrees.OOBTree import OOBTree
from persistent import Persistent

from ._held import current_connection
from ._originals import originals_for
from ._values import (
    CLOCK_TYPES,
    MAX_VALUE_DEPTH,
    SCALAR_TYPES,
    STORED_AS_IS,
    TOO_DEEP,
    clock_problem,
    default_factory_detail,
    hashable_problem,
    rebuilt_tuple,
    unstorable_detail,
)
from .errors import UnstorableValueError
from .paths import join, path_of


class NodeTypes(NamedTuple):
    """How the conversion makes the tree's nodes from converted contents."""

    #: ``mapping(keys, values)``: a dict's node; UnstorableValueError(key, why) for a bad key
    mapping: Callable[[Any, list[Any]], Any]
    #: ``list(values)``: a list's node
    list: Callable[[list[Any]], Any]
    #: ``set(elements)``: a set's node
    set: Callable[[set[Any]], Any]


_DICT, _LIST, _SET, _TUPLE, _FROZENSET = range(5)
_SETS = (_SET, _FROZENSET)  # their elements have no key of their own in a path
_NO_KEY: Any = object()
_PUSHED: Any = object()  # _enter made a frame: its value is converted when the frame finishes
_UNKNOWN: Any = object()  # the transaction's Originals, not looked up yet
_CYCLE = (
    "contains itself (a cycle of plain containers); only persistent objects may refer "
    "back to each other"
)

#: A tuple (or frozenset) whose size, the values a full write of it visits counting repeats,
#: is above both of these is refused. A tuple that holds the same tuple twice, over and
#: over, doubles its size at every level for two values of conversion work: ZODB pickles
#: it small (its memo keeps one copy), but every pickle or JSON export writes it out in
#: full, so 40 levels would be terabytes, filling the disk at each scheduled export. The
#: same bounds as the pickle scan's (_pickle_scan.MIN_HASH_SIZE, HASH_SIZE_PER_BYTE), with
#: the values the conversion looked at in tuples (repeats of a tuple it converted once not
#: counted) in place of the bytes read: data that repeats a tuple of a thousand pairs two
#: thousand times (6 million values) is stored, a 16-million-value expansion is not.
MIN_REPEATED_SIZE = 1 << 24
REPEATED_SIZE_PER_VALUE = 1024

#: Children a dict being converted holds, at a batch, before its Mapping node is made
#: early and filled as it goes (see :meth:`Converter.pending`).
WIDE = 1_000


def too_repetitive(size: int) -> str:
    """Why a tuple of *size* values counting repeats is refused (see MIN_REPEATED_SIZE)."""
    return (
        f"a tuple (or frozenset) that holds {size:,} values counting repeats (the same "
        "tuple held again and again, inside tuples that are themselves held again): the "
        "store keeps one copy of each, but every export writes it out in full, as a plain "
        "json.dumps would; keep the repeated part once, under a key of its own, and refer "
        "to it by that key"
    )


def extend_mapping(node: Any, keys: Any, values: list[Any]) -> None:
    """Put converted *values* under *keys* into a Mapping node made early (a BTree underneath).

    BTree's own ``__setitem__``: the values are converted and the keys checked
    already, which Mapping's would do again (BTree's ``update`` calls it too).
    A stored node changes, so this runs inside a transaction: a batch's.
    """
    setitem = _bt_setitem
    for key, value in zip(keys, values, strict=True):
        setitem(node, key, value)


_bt_setitem = OOBTree.__setitem__


class _Frame:
    """A container being converted: its source, its converted children so far."""

    __slots__ = (
        "added",
        "base",
        "depth",
        "extra",
        "height",
        "items",
        "keys",
        "kind",
        "moving",
        "node",
        "out",
        "position",
        "source",
        "wide",
    )

    def __init__(self, source: Any, kind: int, position: int, depth: int) -> None:
        self.source = source
        self.kind = kind
        self.position = position  # its index among its parent's children
        self.depth = depth  # how many tuples and frozensets it is (inside): 0 for nodes
        self.height = 1  # a tuple's: how many levels of tuples it and what it holds span
        self.extra = 0  # a tuple's: values its tuples hold beyond one each (see _finish)
        self.items: Iterator[Any] = iter(source.values() if kind == _DICT else source)
        self.out: list[Any] = []
        self.added = 0  # how much of ``out`` :meth:`Converter.pending` has handed out
        # A wide dict's Mapping, made early; ``base`` children are in it already,
        # ``keys`` goes on from there, ``moving`` are the keys of ``out`` once taken.
        self.node: Any = None
        self.base = 0
        self.keys: Iterator[Any] | None = None
        self.moving: list[Any] | None = None
        self.wide: bool | None = None  # whether its keys allow an early Mapping; None: not known


class Converter:
    """Converts plain values going into one place, sharing what they share.

    ``anchor`` is the node the values go into (None for a free value): it
    names the connection persistent values must belong to, the transaction
    whose commit check records the conversions (when ``record``), and the
    start of the paths in errors, followed by ``prefix``. ``shared`` limits
    the memo to the ids of objects known to be reached more than once (an
    import counts them first, and keeps its memory flat without a memo of
    every node); None remembers every object. Every ``batch`` nodes made,
    ``on_batch(self)`` runs (an import's batch commits).
    """

    __slots__ = (
        "_anchor",
        "_batch",
        "_key",
        "_memo",
        "_next_batch",
        "_nodes",
        "_on_batch",
        "_on_path",
        "_originals",
        "_prefix",
        "_shared",
        "_stack",
        "_tuples",
        "_visited",
        "made",
    )

    def __init__(
        self,
        nodes: NodeTypes,
        anchor: Any = None,
        *,
        prefix: tuple[Any, ...] = (),
        record: bool = True,
        shared: set[int] | None = None,
        batch: int = 0,
        on_batch: Callable[[Converter], None] | None = None,
    ) -> None:
        self._nodes = nodes
        self._anchor = anchor
        self._prefix = prefix
        self._shared = shared
        self._memo: dict[int, Any] = {}
        #: The height and size of each tuple and frozenset in the memo. Met again deeper, it
        #: may be too deep there (a tuple that holds the same tuple at two depths); its size
        #: (values a full write of it visits, counting repeats) counts again where it is held.
        self._tuples: dict[int, tuple[int, int]] = {}
        #: Values the conversion has looked at in tuples: see too_repetitive.
        self._visited = 0
        self._on_path: set[int] = set()
        self._stack: list[_Frame] = []
        self._originals: Any = _UNKNOWN if record else None
        self._key: Any = _NO_KEY
        #: Nodes made so far.
        self.made = 0
        self._batch = batch
        self._on_batch = on_batch
        self._next_batch = batch if batch and on_batch is not None else -1

    # -- entry points

    def convert(self, value: Any, key: Any = _NO_KEY) -> Any:
        """*value* in the form the tree stores, to go under *key* of the anchor."""
        if type(value) in STORED_AS_IS:
            return value
        self._key = key
        try:
            return self._walk(value)
        finally:
            self._stack.clear()
            self._on_path.clear()

    def element(self, value: Any) -> Any:
        """*value* converted as a set element: a value, hashable and equal to its copy."""
        problem = hashable_problem(value, nan=True)
        if problem is not None:
            self._key = _NO_KEY
            raise UnstorableValueError(self._path([]), problem)
        return self.convert(value)

    def pending(self) -> list[Any]:
        """The new nodes no node made so far holds: what a batch must make reachable to commit.

        They are the open frames' children not handed out yet, and the
        Mapping of a wide dict, made here (its children so far move into it;
        later ones join it at each batch, so a batch rewrites only the
        buckets they land in). Nothing is consumed: after a failed commit
        the same call gives the same nodes again (ZODB's abort leaves new
        objects with their state and no jar); :meth:`settled` says the batch
        committed.
        """
        found = []
        for frame in self._stack:
            out = frame.out
            if frame.kind == _DICT and (frame.node is not None or self._widens(frame)):
                if frame.moving is None:
                    assert frame.keys is not None
                    frame.moving = list(itertools.islice(frame.keys, len(out)))
                if frame.node is None:
                    frame.node = self._nodes.mapping(frame.moving, out)
                else:
                    extend_mapping(frame.node, frame.moving, out)
                if frame.node._p_jar is None:
                    found.append(frame.node)
                continue
            found.extend(
                value
                for value in itertools.islice(out, frame.added, None)
                if isinstance(value, Persistent) and value._p_jar is None
            )
        return found

    def settled(self) -> None:
        """The nodes of the last :meth:`pending` are committed: stop handing them out."""
        for frame in self._stack:
            if frame.moving is not None:
                frame.base += len(frame.out)
                frame.out.clear()
                frame.moving = None
            frame.added = len(frame.out)

    def _widens(self, frame: _Frame) -> bool:
        """Whether a dict frame should get its Mapping now: wide, with keys a Mapping keeps."""
        if len(frame.out) < WIDE:
            return False
        if frame.wide is None:
            kinds = {type(key) for key in frame.source}
            frame.wide = kinds == {str} or kinds == {int}
            if frame.wide:
                frame.keys = iter(frame.source)
        return frame.wide

    # -- the walk

    def _walk(self, value: Any) -> Any:
        done = self._enter(value, None, 0)
        if done is not _PUSHED:
            return done
        scalars = STORED_AS_IS
        enter = self._enter
        stack = self._stack
        while True:
            frame = stack[-1]
            out = frame.out
            append = out.append
            base = frame.base  # children moved into an early node: positions go on from there
            for child in frame.items:
                if type(child) in scalars:
                    append(child)
                    continue
                done = enter(child, frame, base + len(out))
                if done is _PUSHED:
                    break
                append(done)
            else:
                if frame.node is not None:  # the rest joins its early node in a transaction
                    self._on_batch(self)  # type: ignore[misc]
                stack.pop()
                self._on_path.discard(id(frame.source))
                done = self._finish(frame)
                if not stack:
                    return done
                parent = stack[-1]
                if frame.depth and parent.depth:
                    parent.height = max(parent.height, frame.height + 1)
                    parent.extra += frame.extra + len(frame.out)
                parent.out.append(done)
                if self.made >= self._next_batch >= 0:
                    self._next_batch += self._batch
                    self._on_batch(self)  # type: ignore[misc]

    def _enter(self, value: Any, parent: _Frame | None, position: int) -> Any:
        """*value* converted, or _PUSHED after making the frame that will convert it."""
        kind = type(value)
        if kind in CLOCK_TYPES:
            problem = clock_problem(value)
            if problem is not None:
                raise UnstorableValueError(self._path(self._keys(parent, position)), problem)
            return value
        if kind is not dict and kind is not list:
            if parent is not None and parent.kind in _SETS:  # an element: must be a value
                problem = hashable_problem(value, nan=True)
                if problem is not None:
                    raise UnstorableValueError(self._path(self._keys(parent, position)), problem)
            if isinstance(value, Persistent):
                self._check_jar(value, parent, position)
                return value
            if isinstance(value, tuple | frozenset):
                if all(type(item) in STORED_AS_IS for item in value):
                    self._visited += len(value)
                    if parent is not None and parent.depth:  # one more level of tuples
                        if parent.depth >= MAX_VALUE_DEPTH:
                            raise UnstorableValueError(
                                self._path(self._keys(parent, position)), TOO_DEEP
                            )
                        parent.height = max(parent.height, 2)
                        parent.extra += len(value)
                    return value
            elif not isinstance(value, dict | list | set):
                if isinstance(value, enum.Enum | str | int | float | bytes):
                    return value
                raise UnstorableValueError(
                    self._path(self._keys(parent, position)), unstorable_detail(value)
                )
        ident = id(value)
        memo = self._memo
        if memo:
            done = memo.get(ident)
            if done is not None:
                held = self._tuples.get(ident)
                if held is not None and parent is not None and parent.depth:
                    height, size = held
                    if parent.depth + height > MAX_VALUE_DEPTH:
                        raise UnstorableValueError(
                            self._path(self._keys(parent, position)), TOO_DEEP
                        )
                    parent.height = max(parent.height, height + 1)
                    parent.extra += size - 1
                return done
        if ident in self._on_path:
            raise UnstorableValueError(self._path(self._keys(parent, position)), _CYCLE)
        if isinstance(value, tuple | frozenset):
            depth = 1 if parent is None else parent.depth + 1
            if depth > MAX_VALUE_DEPTH:
                raise UnstorableValueError(self._path(self._keys(parent, position)), TOO_DEEP)
            inline = _TUPLE if isinstance(value, tuple) else _FROZENSET
            frame = _Frame(value, inline, position, depth)
        else:
            originals = self._originals
            if originals is not None:
                if originals is _UNKNOWN:  # looked up at the first container only
                    originals = self._originals = originals_for(self._anchor)
                node = None if originals is None else originals.reuse(value)
                if node is not None:
                    memo[ident] = node
                    return node
            if isinstance(value, dict):
                if kind is not dict and hasattr(kind, "__missing__"):
                    raise UnstorableValueError(
                        self._path(self._keys(parent, position)), default_factory_detail(value)
                    )
                frame = _Frame(value, _DICT, position, 0)
            else:
                frame = _Frame(value, _LIST if isinstance(value, list) else _SET, position, 0)
        self._on_path.add(ident)
        self._stack.append(frame)
        return _PUSHED

    def _finish(self, frame: _Frame) -> Any:
        """The value of a frame whose children are all converted (it is off the stack)."""
        kind, source, out = frame.kind, frame.source, frame.out
        if frame.node is not None:  # a wide dict's Mapping, made early and filled by now
            done = frame.node
        elif kind == _DICT:
            try:
                done = self._nodes.mapping(source, out)
            except UnstorableValueError as exc:  # a key: its path is the key
                keys = self._keys(self._stack[-1] if self._stack else None, frame.position)
                raise UnstorableValueError(self._path([*keys, exc.path]), exc.detail) from None
        elif kind == _LIST:
            done = self._nodes.list(out)
        elif kind == _SET:
            done = self._nodes.set(set(out))
        elif all(new is old for new, old in zip(out, source, strict=True)):
            done = source  # an immutable value holding nothing converted: itself
        elif kind == _FROZENSET:
            done = frozenset(out) if type(source) is frozenset else type(source)(out)
        else:  # a tuple, a namedtuple, or another tuple subclass
            done = rebuilt_tuple(source, out)
        if frame.depth:
            self._visited += len(out)
            size = 1 + len(out) + frame.extra
            if size > MIN_REPEATED_SIZE and size > REPEATED_SIZE_PER_VALUE * self._visited:
                keys = self._keys(self._stack[-1] if self._stack else None, frame.position)
                raise UnstorableValueError(self._path(keys), too_repetitive(size))
        shared = self._shared
        if shared is None or id(source) in shared:
            self._memo[id(source)] = done
            if frame.depth:
                self._tuples[id(source)] = (frame.height, size)
        if kind <= _SET:
            self.made += 1
            originals = self._originals
            if originals is not None and originals is not _UNKNOWN:
                key = None if self._key is _NO_KEY else self._key
                originals.add(source, done, self._anchor, key)
        return done

    def _check_jar(self, value: Any, parent: _Frame | None, position: int) -> None:
        jar = value._p_jar
        if jar is None:
            return
        target = getattr(self._anchor, "_p_jar", None)
        if target is None:
            if getattr(jar, "_snaptree_read_only", False):
                # A new node holding a snapshot's nodes (``snap_list[0:2]``, ``{} | snap_map``
                # inside a store call): a read, as it is outside one. Stored in the tree, it
                # is refused when the commit meets the snapshot's node (OwnedConnection).
                return
            target = current_connection()
        if target is not None and jar is not target:
            raise UnstorableValueError(
                self._path(self._keys(parent, position)),
                f"this {type(value).__name__} already belongs to another transaction (a "
                "snapshot, another store call or another database); store a new object, or "
                "a plain copy made with snaptree.to_plain()",
            )

    # -- paths, for errors only

    def _keys(self, parent: _Frame | None, position: int) -> list[Any]:
        """The keys from the converted value to the child at *position* of *parent*, the
        innermost open frame (None: the converted value itself). Elements of a set or a
        frozenset have no key: their path stops at the set.
        """
        if parent is None:
            return []
        frames = self._stack
        positions = [*(frame.position for frame in frames[1:]), position]
        keys = []
        for frame, at in zip(frames, positions, strict=True):
            if frame.kind in _SETS:
                break
            keys.append(_key_at(frame, at))
        return keys

    def _path(self, keys: list[Any]) -> str:
        """The path of *keys* below the anchor's path, the prefix and the call's key."""
        parts: list[Any] = []
        base = None if self._anchor is None else path_of(self._anchor)
        if base:
            parts.append(base)
        parts.extend(self._prefix)
        if self._key is not _NO_KEY:
            parts.append(self._key)
        return join([*parts, *keys])


def _key_at(frame: _Frame, position: int) -> Any:
    if frame.kind == _DICT:
        return next(itertools.islice(iter(frame.source), position, None))
    return position


# ---------------------------------------------------------------------------
# Counting what data holds before converting it (an import's guard)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Census:
    """What the data holds, counted before anything is built."""

    #: Dicts, lists, tuples and sets, each counted at every place it is reached.
    places: int
    #: The distinct ones.
    distinct: int
    #: The distinct dicts, lists and sets: the nodes an import makes.
    nodes: int
    #: The ids of those reached from more than one place (the conversion shares them).
    shared: set[int]
    #: Whether the data holds persistent objects of the caller's own (see import_tree).
    persistent: bool


def census(data: Any) -> Census:
    """Count what *data* holds without building anything.

    One object can be reached from many places (a pickle's memo makes
    ``[x] * 10`` nested nine deep a 225-byte file of a billion places), so
    this counts each distinct object once and adds up its children's totals:
    time linear in the distinct objects, however large the totals. A cycle
    is left for the conversion to report.
    """
    if not _expands(data):
        return Census(0, 0, 0, set(), isinstance(data, Persistent))
    totals: dict[int, int] = {}
    shared: set[int] = set()
    nodes = 0
    persistent = type(data) is dict and _persistent_key(data)
    on_path = {id(data)}
    stack: list[list[Any]] = [[data, _children(data), 1]]
    scalars = SCALAR_TYPES
    while stack:
        frame = stack[-1]
        for child in frame[1]:
            kind = type(child)
            if kind in scalars:
                continue
            if not (kind is dict or kind is list or _expands(child)):
                persistent = persistent or isinstance(child, Persistent)
                continue
            ident = id(child)
            counted = totals.get(ident)
            if counted is not None:
                frame[2] += counted
                shared.add(ident)
            elif ident not in on_path:
                on_path.add(ident)
                if kind is dict:
                    persistent = persistent or _persistent_key(child)
                stack.append([child, iter(child.values()) if kind is dict else _children(child), 1])
                break
        else:
            stack.pop()
            source = frame[0]
            on_path.discard(id(source))
            totals[id(source)] = frame[2]
            nodes += isinstance(source, dict | list | set)
            if stack:
                stack[-1][2] += frame[2]
    return Census(totals[id(data)], len(totals), nodes, shared, persistent)


def _persistent_key(mapping: dict[Any, Any]) -> bool:
    """Whether a key of *mapping* is, or holds in a tuple, a persistent object.

    The census walks values; a key is stored as it is, so a persistent key
    (hashable by identity) must send the import to one transaction as much
    as a persistent value does.
    """
    scalars = SCALAR_TYPES
    pending = [key for key in mapping if type(key) not in scalars]
    seen: set[int] = set()  # a tuple holding the same tuple twice is looked into once
    while pending:
        key = pending.pop()
        if isinstance(key, Persistent):
            return True
        if isinstance(key, tuple | frozenset) and id(key) not in seen:
            seen.add(id(key))
            pending.extend(part for part in key if type(part) not in scalars)
    return False


def _expands(value: Any) -> bool:
    """Whether *value* is written out in full wherever it is reached (it, and what it holds)."""
    return isinstance(value, dict | list | tuple | set | frozenset) and not isinstance(
        value, Persistent
    )


def _children(value: Any) -> Iterator[Any]:
    return iter(value.values() if isinstance(value, dict) else value)
