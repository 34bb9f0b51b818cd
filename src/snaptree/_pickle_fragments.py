"""The pickle format again, reusing the serialized form of every node that did not change.

A warm export spends almost all of its time turning small persistent nodes
into pickle opcodes, and between two scheduled exports almost none of them
changed. So this writer keeps, per persistent node, the pickle *fragment*
it wrote for it, and the serials it was written from; the exporter process
keeps them from one export to the next (:class:`FragmentCaches`).

Why fragments can be concatenated: the dump is written without a memo, so
the opcodes for a value refer to nothing outside themselves, and a dict is
just EMPTY_DICT followed by any number of (MARK, keys and values, SETITEMS)
batches; a list the same with EMPTY_LIST and APPENDS. The stream is PROTO 5,
the fragments, STOP, and has no FRAME opcodes (framing is optional in a
pickle; the writer hands large blocks to the file itself). Fragments are
cut out of what a memo-less C pickler writes (:class:`PlainPickler`), so
each value is written exactly as that pickler writes it.

Why a fragment is known to be current: the snapshot's connection loads
every object as of the snapshot's tid, and an object's ``_p_serial`` is
the tid of the revision loaded. The same serial means the same state, so
a node whose serial, and whose every persistent descendant's serial, is
what its fragment was written from, has the same fragment. A change deep
in the tree does not change its ancestors' serials: that is why every
persistent node under a cached fragment is checked (its serial compared,
cheap when it is in the ZODB cache) and only the nodes on the way to a
change are pickled again. Nothing relies on invalidation bookkeeping.

A table, keyed by oid, holds one entry per node the last export reached,
of one of two kinds:

:class:`Sealed`
    a small subtree (at most SEAL_NODES persistent nodes; a value node or
    a BTree bucket with its values), written as one block. A bucket's
    :class:`BucketLayout` keeps its fragment in pieces, one per value, so
    that when a value changes and the bucket itself did not, only that
    value is pickled again. Measured at 10k objects with 100 accounts
    changed between exports, the pickling took 4 ms instead of 11.5 ms.
:class:`Open`
    a large node: a mapping spread over several buckets and its interior
    BTree nodes, a large list. Its pieces are bytes, child value nodes and
    ``(child,)`` for a BTree's own interior nodes and buckets; each child
    has an entry of its own, checked as it is written. So a change in one
    account pickles that account again, not its bucket or the mapping.

The table costs about twice the size of the dump (the fragments, and the
buckets' layouts) plus about 100-150 bytes per persistent node (entry,
serials, a reference to the node, which keeps its ghost alive), and holds
only what the last export reached: each export builds a new table from
the entries it used.
"""

from __future__ import annotations

import bisect
import collections
import io
import itertools
import operator
import weakref
from typing import Any, NamedTuple

from BTrees.OOBTree import OOBTree, OOBucket
from persistent import Persistent
from ZODB.Connection import Connection

from ._atomic import HashingWriter
from ._pickle_writer import (
    PLAIN_REDUCERS,
    PlainPickler,
    pickling_errors,
    reduce_mapping,
    reduce_own_class,
    subclass_reducer,
)
from ._plain_nodes import NodeCount, Prefetcher
from .tree import Counter, FlatMapping, List, Mapping, Set

_PROTO = b"\x80\x05"
_FRAME = 0x95
_STOP = b"."
_MARK = b"("
_EMPTY_DICT = b"}"
_EMPTY_LIST = b"]"
_SETITEMS = b"u"
_APPENDS = b"e"
_EMPTY_SET = b"\x8f"
_ADDITEMS = b"\x90"
#: Most values in one MARK ... SETITEMS/APPENDS batch (pickle's own batch size).
_BATCH = 1000
#: A subtree with more persistent objects than this is cached in parts, so
#: that a change inside it pickles a part of it again, not all of it.
SEAL_NODES = 100
#: Bytes gathered before they are handed to the file.
_WRITE_EVERY = 1 << 18
#: Pieces of a large node whose nodes are loaded in one go on a cold export (see Prefetcher).
_PREFETCH_PIECES = 64
#: Below every oid: the largest oid of an entry that holds none it can vouch for.
_NO_OID = b"\0" * 8

#: ``(first, end, chunk)``: a value node of a bucket, as the places of its
#: nodes among the entry's descendants (``first:end``) and its chunk.
Span = tuple[int, int, int]


class BucketLayout(NamedTuple):
    """A sealed bucket's fragment in pieces: runs of keys and scalars, one chunk per value node."""

    chunks: list[bytes]
    spans: list[Span]


class Sealed(NamedTuple):
    """A small subtree written as one block, reused while no serial in it changed."""

    #: The node's own serial, then those of ``descendants``, 8 bytes each; None when
    #: the subtree holds something serials do not determine (the user's own
    #: persistent classes, whose pickled form is their code's business): it is then
    #: pickled again on every export.
    serials: bytes | None
    fragment: bytes
    #: Every persistent object the pickler met inside, in that order.
    descendants: tuple[Persistent, ...]
    #: For a bucket, its fragment in pieces (see :meth:`FragmentWriter._patch_bucket`).
    layout: BucketLayout | None
    #: The largest oid in the subtree: what the nodes written when reusing it count
    #: for in the bound on copies (see snaptree._plain_nodes).
    largest_oid: bytes


class Open(NamedTuple):
    """A large node's own opcodes, its children left as nodes with entries of their own."""

    #: The node's serial; None when its own items hold a user object.
    serial: bytes | None
    #: bytes, child value nodes, and ``(child,)`` for a BTree's interior nodes and buckets.
    pieces: list[Any]


Entry = Sealed | Open
Table = dict[bytes, Entry]

_activate = Persistent._p_activate
_serial_of = operator.attrgetter("_p_serial")
_oid_of = operator.attrgetter("_p_oid")
_consume = collections.deque(maxlen=0).extend


class FragmentCaches:
    """Fragment tables that outlive one export: one per snapshot connection.

    Whoever exports repeatedly (the exporter process, ``snaptree export
    --every``) keeps one and passes it to every export
    (``export(..., fragments=caches)``). Tables are keyed by connection
    because their entries hold that connection's objects; a connection that
    goes away takes its table with it.

    ``when_cached=True`` is for a store's own repeated ``store.export()``
    calls, which may be one-offs: fragments are kept only once an export has
    shown that the tree fits the connection's cache (a tree that does not is
    loaded again on every export, and checking it saves nothing), so the
    first export writes with the plain pickler and keeps nothing, the second
    builds the fragments, and the ones after reuse them.
    """

    def __init__(self, *, when_cached: bool = False) -> None:
        self._tables: weakref.WeakKeyDictionary[Connection, Table] = weakref.WeakKeyDictionary()
        self._when_cached = when_cached
        self._last_nodes: int | None = None

    def table(self, connection: Connection) -> Table:
        return self._tables.get(connection, {})

    def keep(self, connection: Connection, table: Table) -> None:
        self._tables[connection] = table

    def entries(self) -> int:
        return sum(len(table) for table in self._tables.values())

    def wanted(self, connection: Connection) -> bool:
        """Whether an export on *connection* should reuse (and keep) fragments."""
        if not self._when_cached:
            return True
        last = self._last_nodes
        return last is not None and last <= connection.db().getCacheSize()

    def written(self, connection: Connection, nodes: int) -> None:
        """An export on *connection* wrote *nodes* nodes; forget its table if it is too large."""
        self._last_nodes = nodes
        if not self.wanted(connection):
            self._tables.pop(connection, None)


class TooDeepForFragments(Exception):
    """The tree is nested too deeply for the fragment writer: write it with the plain one."""


def write_pickle_with_fragments(
    node: Any, out: HashingWriter, connection: Connection, where: str, caches: FragmentCaches
) -> int:
    """Write *node* as :func:`snaptree._pickle_writer.write_pickle` does, reusing *caches*.

    Keeps the fragments of this export in *caches* for the next one.
    Raises TooDeepForFragments for a tree nested too deeply for it (it
    recurses in Python, a few frames a level).
    """
    count = NodeCount(connection, where, "pickle")
    table = caches.table(connection)
    # Prefetching walks the tree ahead of the writer: worth it when the table
    # is empty and everything is to be loaded, not on a warm export that
    # loads only what changed (a walk would cost it more than it saves).
    prefetcher = Prefetcher(None if table else connection)
    writer = FragmentWriter(out, count, table, prefetcher)
    with pickling_errors(where, TooDeepForFragments()):
        writer.dump(node)
    caches.keep(connection, writer.table)
    return count.nodes


class _Unsealable(Exception):
    """Raised by the sealing pickler: this subtree is to be cached in parts."""


class _FragmentPickler(PlainPickler):
    """The memo-less plain pickler, recording every persistent object it writes.

    ``found`` lists them in the order met; ``volatile`` is set when one of
    them is not a snaptree node, or a mapping whose buckets it did not
    record. With ``limit``, it raises :class:`_Unsealable` past that many
    objects or at a mapping spread over several buckets.
    """

    def __init__(self, file: Any, count: NodeCount) -> None:
        super().__init__(file, count)
        self.found: list[Any] = []
        self.serials: list[bytes] = []
        self.volatile = False
        self.limit: int | None = None

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        reduce = PLAIN_REDUCERS.get(kind)
        if reduce is None:
            if kind is type:
                return NotImplemented
            reduce = subclass_reducer(obj)
            if reduce is None:
                return NotImplemented
            if reduce is reduce_own_class:
                self.volatile = True
        if self.limit is not None and len(self.found) >= self.limit:
            raise _Unsealable
        obj._p_activate()  # its serial is the snapshot's only once it is loaded
        self.found.append(obj)
        self.serials.append(obj._p_serial)
        self._add(obj._p_oid)
        if reduce is reduce_mapping:
            state = obj.__getstate__()
            if state is None:
                return (dict, ())
            if len(state) == 1:  # one bucket, held inline: all of it is in this record
                flat = iter(state[0][0][0])
                return (dict, (), None, None, zip(flat, flat, strict=True))
            if self.limit is not None:
                raise _Unsealable
            self.volatile = True  # its buckets' serials are not recorded
        return reduce(obj)


#: What :meth:`FragmentWriter._pickle` returns (a plain tuple: it runs for every value
#: pickled): ``(fragment, found, serials, volatile, largest_oid)``, the persistent objects
#: met and their serials, whether serials do not determine the fragment, and their
#: largest oid.
_Pickled = tuple[bytes, list[Any], list[bytes], bool, bytes]


def _strip(data: bytes) -> bytes:
    """The opcodes of one pickle without PROTO, FRAME and STOP: a fragment to concatenate."""
    if len(data) > 11 and data[2] == _FRAME:
        if 11 + int.from_bytes(data[3:11], "little") == len(data):
            return data[11:-1]  # the usual case: one frame holding everything
    elif len(data) < 64:
        return data[2:-1]  # too small to be framed
    import pickletools

    # Several frames, or a large str/bytes written outside any frame: keep
    # every opcode but PROTO, FRAME and STOP.
    ops = [(op.name, pos) for op, _arg, pos in pickletools.genops(data)]
    return b"".join(
        data[pos:end]
        for (name, pos), (_, end) in itertools.pairwise(ops)
        if name not in ("PROTO", "FRAME")
    )


class FragmentWriter:
    """Writes the plain pickle of a tree, reusing the fragments of unchanged nodes."""

    def __init__(
        self, out: HashingWriter, count: NodeCount, table: Table, prefetcher: Prefetcher
    ) -> None:
        self._out = out
        self._prefetcher = prefetcher if prefetcher.enabled else None
        self._count = count
        self._old = table
        #: The entries this export used: the table to keep for the next one.
        self.table: Table = {}
        self._parts: list[bytes] = []
        self._size = 0
        self._buffer = io.BytesIO()
        self._pickler = _FragmentPickler(self._buffer, count)
        self._volatile = False

    def _emit(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size > _WRITE_EVERY:
            self._flush()

    def _flush(self) -> None:
        if self._parts:
            self._out.write(b"".join(self._parts))
            self._parts = []
            self._size = 0

    def dump(self, node: Any) -> None:
        self._emit(_PROTO)
        if is_node(node):
            self._write(node, False)
        else:  # a scalar or a user object at the subtree's root: nothing to reuse
            self._emit(self._pickle(node, None)[0])
        self._emit(_STOP)
        self._flush()

    def _write(self, node: Any, internal: bool) -> None:
        """Write *node* (a value node, or with *internal* a BTree's interior node or bucket)."""
        node._p_activate()
        oid = node._p_oid
        entry = self.table.get(oid) or self._old.get(oid)
        if type(entry) is Open:
            if entry.serial is not None and entry.serial == node._p_serial:
                self.table[oid] = entry
                self._write_pieces(entry.pieces, internal, oid)
                return
        elif entry is not None and entry.serials is not None:  # Sealed, reusable
            serials, fragment, descendants, layout, largest_oid = entry
            current = node._p_serial
            if descendants:
                # In C, not a Python loop: this runs for every node of a warm export.
                _consume(map(_activate, descendants))
                current += b"".join(map(_serial_of, descendants))
            if current == serials:
                self.table[oid] = entry
                self._count.add_many(len(descendants) + (not internal), largest_oid)
                self._emit(fragment)
                return
            if layout is not None and current[:8] == serials[:8]:
                patched = self._patch_bucket(entry, current)
                if patched is not None:
                    self.table[oid] = patched
                    self._emit(patched.fragment)
                    return
        entry = self._build(node, internal)
        self.table[oid] = entry
        if type(entry) is Open:
            self._write_pieces(entry.pieces, internal, oid)
        else:
            self._emit(entry.fragment)

    def _write_pieces(self, pieces: list[Any], internal: bool, oid: bytes) -> None:
        if not internal:
            self._count.add(oid)
        if self._prefetcher is None:
            self._write_each(pieces)
            return
        for start in range(0, len(pieces), _PREFETCH_PIECES):
            window = pieces[start : start + _PREFETCH_PIECES]
            self._prefetcher.load(
                [p[0] if type(p) is tuple else p for p in window if type(p) is not bytes]
            )
            self._write_each(window)

    def _write_each(self, pieces: list[Any]) -> None:
        for piece in pieces:
            kind = type(piece)
            if kind is bytes:
                self._emit(piece)
            elif kind is tuple:
                self._write(piece[0], True)
            else:
                self._write(piece, False)

    # -- new entries ---------------------------------------------------------------

    def _build(self, node: Any, internal: bool) -> Entry:
        if not internal or isinstance(node, OOBucket):
            before = self._count.nodes
            try:
                return self._seal(node, internal)
            except _Unsealable:
                self._count.rewind(before)  # counted again as its parts are written
        self._volatile = False
        pieces = self._open_pieces(node, internal)
        return Open(None if self._volatile else node._p_serial, pieces)

    def _seal(self, node: Any, internal: bool) -> Sealed:
        if internal:  # a bucket: MARK, its keys and values, SETITEMS
            return self._seal_bucket(node)
        fragment, found, serials, volatile, largest = self._pickle(node, SEAL_NODES)
        descendants = tuple(found[1:])  # the node itself, met first
        if volatile:
            return Sealed(None, fragment, descendants, None, _NO_OID)
        return Sealed(b"".join(serials), fragment, descendants, None, largest)

    def _seal_bucket(self, bucket: Any) -> Sealed:
        """A bucket's sealed entry, pickled value by value so that its layout can be kept.

        The layout's chunks are the bucket's opcodes in pieces (runs of keys
        and scalars, and one fragment per value node), and its spans say, per
        value node, its place among the entry's descendants and its chunk. A
        change inside one value then pickles that value again, not the whole
        bucket (see :meth:`_patch_bucket`).
        """
        state = bucket.__getstate__()
        flat = state[0] if state else ()
        if not flat:
            return Sealed(bucket._p_serial, b"", (), None, bucket._p_oid)
        chunks: list[bytes] = []
        spans: list[Span] = []
        found: list[Any] = []
        serials = [bucket._p_serial]
        largest = bucket._p_oid
        self._volatile = False
        run: list[Any] = []
        for value in flat:
            if not is_node(value):
                run.append(value)
                continue
            if run:
                chunks.append(self._run(run))
                run = []
            fragment, met, met_serials, volatile, met_largest = self._pickle(
                value, SEAL_NODES - len(found)
            )
            self._volatile |= volatile
            spans.append((len(found), len(found) + len(met), len(chunks)))
            chunks.append(fragment)
            found += met
            serials += met_serials
            largest = max(largest, met_largest)
        if run:
            chunks.append(self._run(run))
        body = _MARK + b"".join(chunks) + _SETITEMS
        if self._volatile:
            return Sealed(None, body, tuple(found), None, _NO_OID)
        return Sealed(b"".join(serials), body, tuple(found), BucketLayout(chunks, spans), largest)

    def _patch_bucket(self, entry: Sealed, current: bytes) -> Sealed | None:
        """The entry of a bucket whose own serial is unchanged, pickling only its changed values.

        *current* is the serials of the bucket and of the entry's descendants
        as they are now (8 bytes each, in the entry's order). The values to
        pickle again are those whose span of it differs, found by XOR rather
        than a Python loop over the bucket. None when a changed value no
        longer seals the same way (it gained or lost nodes, holds a user
        object): the bucket is then built anew.
        """
        assert entry.serials is not None and entry.layout is not None
        chunks, spans = entry.layout
        units = len(current) // 8
        diff = int.from_bytes(current, "big") ^ int.from_bytes(entry.serials, "big")
        changed = []
        while diff:
            position = units - 1 - (diff.bit_length() - 1) // 64  # the first that differs
            part = bisect.bisect_right(spans, position - 1, key=_span_first) - 1
            changed.append(spans[part])
            diff &= (1 << ((units - 1 - spans[part][1]) * 64)) - 1  # the rest of that value
        before = self._count.nodes
        chunks = list(chunks)
        found = list(entry.descendants)
        largest = entry.largest_oid
        repickled = 0
        for first, end, chunk in changed:
            try:
                fragment, met, met_serials, volatile, met_largest = self._pickle(
                    found[first], SEAL_NODES
                )
            except _Unsealable:
                volatile = True
            if volatile or len(met) != end - first:
                self._count.rewind(before)
                return None
            chunks[chunk] = fragment
            found[first:end] = met
            current = current[: 8 + 8 * first] + b"".join(met_serials) + current[8 + 8 * end :]
            largest = max(largest, met_largest)
            repickled += end - first
        self._count.add_many(len(found) - repickled, largest)
        body = _MARK + b"".join(chunks) + _SETITEMS
        return Sealed(current, body, tuple(found), BucketLayout(chunks, spans), largest)

    def _pickle(self, value: Any, limit: int | None) -> _Pickled:
        """Pickle *value* alone, recording the persistent objects it holds."""
        pickler = self._pickler
        pickler.found = []
        pickler.serials = []
        pickler.volatile = False
        pickler.limit = limit
        self._buffer.seek(0)
        self._buffer.truncate()
        try:
            pickler.dump(value)
        except BaseException:
            # A pickler interrupted midway may keep fast-mode bookkeeping
            # (ids of objects it was inside); start the next one clean.
            self._pickler = _FragmentPickler(self._buffer, self._count)
            raise
        found = pickler.found
        oids = list(map(_oid_of, found))
        volatile = pickler.volatile or None in oids
        largest = _NO_OID if volatile or not oids else max(oids)
        return _strip(self._buffer.getvalue()), found, pickler.serials, volatile, largest

    def _open_pieces(self, node: Any, internal: bool) -> list[Any]:
        """A large node's own opcodes, with its children left as nodes to write."""
        head = [] if internal else [_EMPTY_DICT]
        if isinstance(node, OOBucket):
            state = node.__getstate__()
            return self._item_pieces(state[0] if state else (), _SETITEMS)
        if isinstance(node, OOBTree):  # a snaptree Mapping, or one of its interior nodes
            state = node.__getstate__()
            if state is None:
                return head
            if len(state) == 1:  # one bucket, held inline
                return head + self._item_pieces(state[0][0][0], _SETITEMS)
            return head + [(child,) for child in state[0][::2]]
        if isinstance(node, FlatMapping):
            flat = [x for item in node.data.items() for x in item]
            return [_EMPTY_DICT, *self._item_pieces(flat, _SETITEMS)]
        if isinstance(node, List):
            return [_EMPTY_LIST, *self._item_pieces(node.data, _APPENDS)]
        if isinstance(node, Set):  # more than SEAL_NODES objects of yours in it
            return [_EMPTY_SET, *self._item_pieces(list(node.data), _ADDITEMS)]
        # a Counter: always small enough to seal
        raise AssertionError(f"no open form for {type(node).__name__}")  # pragma: no cover

    def _item_pieces(self, values: Any, end: bytes) -> list[Any]:
        """MARK, the values, *end*, in batches; snaptree nodes among them stay nodes."""
        values = list(values)
        step = 2 * _BATCH if end == _SETITEMS else _BATCH
        pieces: list[Any] = []
        for start in range(0, len(values), step):
            pieces.append(_MARK)
            run: list[Any] = []
            for value in values[start : start + step]:
                if is_node(value):
                    if run:
                        pieces.append(self._run(run))
                        run = []
                    pieces.append(value)
                else:
                    run.append(value)
            if run:
                pieces.append(self._run(run))
            pieces.append(end)
        return pieces

    def _run(self, values: list[Any]) -> bytes:
        """The opcodes that push *values*, cut out of the pickles of lists of them.

        A list is pickled a batch of at most _BATCH items at a time: ']' item
        'a' for one value, ']' '(' items 'e' for several. A longer list would
        carry an APPENDS and a MARK between its batches, which inside a
        dict's SETITEMS would make a dump that no unpickler loads; so each
        list pickled here holds one batch at most.
        """
        pieces = []
        for start in range(0, len(values), _BATCH):
            batch = values[start : start + _BATCH]
            fragment, found, _serials, _volatile, _largest = self._pickle(batch, None)
            if found:
                # A user object, or a node inside a tuple: this node's own serial
                # does not cover it, so the node is pickled again next time.
                self._volatile = True
            pieces.append(fragment[1:-1] if len(batch) == 1 else fragment[2:-1])
        return b"".join(pieces)


def _span_first(span: Span) -> int:
    return span[0]


def is_node(value: Any) -> bool:
    """A stored snaptree node (mapping, flat mapping, list, set, counter): fragments cover it."""
    kind = type(value)
    if kind in PLAIN_REDUCERS or (
        kind not in _SCALAR_KINDS
        and isinstance(value, Mapping | FlatMapping | List | Set | Counter)
    ):
        return value._p_oid is not None
    return False


_SCALAR_KINDS = frozenset({str, int, float, bool, type(None), bytes, tuple, frozenset})
