"""ZODB's export format (``.zexp``): written record by record, and read without running it.

What ``Connection.exportFile`` writes, and snaptree's zodb format
(:func:`write_zexp`): the records of a subtree copied as they are stored,
nothing unpickled, so sharing and cycles survive and no class needs to be
importable. It is read record by record with the allow-list unpickler
(:func:`read_zexp`), never with ``Connection.importFile`` (which unpickles
every record with a plain unpickler: a forged file would run code), and
rebuilt as the plain tree it holds, for ``snaptree import`` and
``snaptree verify``.
"""

from __future__ import annotations

import collections
import io
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from BTrees.Length import Length
from BTrees.OOBTree import OOBTree, OOBucket
from persistent import Persistent
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from ZODB.Connection import Connection
from ZODB.serialize import referencesf
from ZODB.utils import p64

from ._atomic import HashingWriter
from ._plain_nodes import Prefetcher
from ._storage_facts import snapshot_load
from ._unpickler import AllowListUnpickler, unpickling_errors
from ._values import rebuilt_tuple
from .errors import Error, ExportError, InputError
from .tree import SCALAR_TYPES, Counter, FlatMapping, List, Mapping, Set

# A .zexp file (what Connection.exportFile and snaptree's zodb format write;
# checked against ZODB 6.4's ExportImport) is b"ZEXP", then per record its
# oid (8 bytes), the length of its data (8 bytes, big-endian) and the data,
# then 16 bytes of 0xff. The first record is the exported object. A record's
# data is two pickles: the class (a class, or (class, args) for classes
# with __getnewargs__), then the state, in which a reference to another
# record is a persistent id: (oid, class) or a bare oid. How ZODB's
# ObjectReader reads them: ZODB/serialize.py.

ZEXP_HEADER = b"ZEXP"
_ZEXP_END = b"\xff" * 16  # ZODB.ExportImport.export_end_marker
#: Records asked for at once ahead of the walk, through a server.
_PREFETCH_BATCH = 1000


def write_zexp(node: Any, out: HashingWriter, connection: Connection, where: str) -> int:
    """Copy the records reachable from *node* in ``Connection.exportFile``'s format.

    Returns the number of records. exportFile itself keeps its queue in a
    list it pops from the front, which is quadratic for large trees; this
    loop is the same walk with a deque. Records are read through the
    snapshot's connection, so they are the snapshot's versions.
    """
    oid = getattr(node, "_p_oid", None)
    if oid is None:
        raise ExportError(
            f"the zodb format exports a persistent object; {where} is a "
            f"{type(node).__name__}; export it as pickle or json, or export its parent"
        )
    load = snapshot_load(connection)
    # Through a server, each load is a round trip: ask for the records next
    # in the queue in batches ahead of the walk (see _plain_nodes.Prefetcher).
    prefetch = connection.prefetch if Prefetcher(connection).enabled else None
    out.write(ZEXP_HEADER)
    queue: collections.deque[bytes] = collections.deque([oid])
    seen = {oid}
    count = 0
    asked = 0  # records at the head of the queue already asked for
    references: list[bytes] = []
    while queue:
        # A full batch once one is known, or what is known once all asked was read.
        if prefetch is not None and (
            len(queue) - asked >= _PREFETCH_BATCH or (not asked and len(queue) > 1)
        ):
            batch = list(itertools.islice(queue, asked, asked + _PREFETCH_BATCH))
            prefetch(batch)
            asked += len(batch)
        oid = queue.popleft()
        asked = max(asked - 1, 0)
        data, _serial = load(oid)
        references.clear()
        referencesf(data, references)
        for ref in references:
            if ref not in seen:
                seen.add(ref)
                queue.append(ref)
        out.write(oid + p64(len(data)) + data)
        count += 1
    out.write(_ZEXP_END)
    return count


#: Classes a record may name without ``allow``: snaptree's nodes and what they are built of.
_RECORD_CLASSES = (
    Mapping,
    FlatMapping,
    List,
    Set,
    Counter,
    OOBTree,
    OOBucket,
    Length,
    PersistentMapping,
    PersistentList,
)


class _Ref:
    """A reference to another record, left in a record's state until every record is read."""

    __slots__ = ("oid",)

    def __init__(self, oid: bytes) -> None:
        self.oid = oid


class _Record:
    __slots__ = ("args", "cls", "state")

    def __init__(self, cls: type, args: tuple[Any, ...], state: Any) -> None:
        self.cls = cls
        self.args = args
        self.state = state


class _PersistentClassName:
    """A persistent class as a record's pickles name it: what a reference or the class names.

    Not callable: ZODB writes every persistent object as a record of its own, so
    neither of a record's pickles ever builds one. Built there, a bucket or BTree
    (whose dealloc frees its children before persistent's trashcan is entered)
    chained a million deep would crash the process when freed.
    """

    __slots__ = ("cls", "source")

    def __init__(self, cls: type, source: str) -> None:
        self.cls = cls
        self.source = source

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise InputError(
            f"{self.source}: a {self.cls.__qualname__} built inside a record's state (or "
            "class) instead of referred to by its oid, which ZODB never writes; the export is "
            "forged or damaged"
        )


class _RecordUnpickler(AllowListUnpickler):
    """The allow-list unpickler with ZODB's persistent references read as :class:`_Ref`."""

    def __init__(self, file: Any, *, allow: Any, source: str, refs: list[bytes]) -> None:
        super().__init__(file, allow=allow, source=source, pickles=2)  # its class, its state
        self._refs = refs

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if isinstance(found, type) and issubclass(found, Persistent):
            return _PersistentClassName(found, self._source)  # _record takes the class back
        return found

    def persistent_load(self, pid: Any) -> Any:
        oid = pid[0] if type(pid) is tuple and len(pid) == 2 else pid
        if type(oid) is str and oid.isascii():  # ZODB writes oids below 0x80 as str in protocol 1
            oid = oid.encode("ascii")
        if type(oid) is not bytes or len(oid) != 8:
            raise InputError(
                f"{self._source}: the reference {pid!r} is not one to a record of this dump "
                "(weak and cross-database references are not supported)"
            )
        self._refs.append(oid)
        return _Ref(oid)


def read_zexp(file: Any, source: str, allow: Iterable[str | type] = ()) -> tuple[Any, int]:
    """The plain tree a ZODB export holds, and its number of records, without running it.

    Every record's class and state are read with :class:`AllowListUnpickler`
    (snaptree's node classes, BTrees' OOBTree, OOBucket and Length, and
    persistent's PersistentMapping and PersistentList are allowed besides
    *allow*), every reference must name a record of the file, and the tree
    is then rebuilt as plain data: mappings and BTrees as dicts, lists as
    lists, counters as ints (as in the pickle format), instances of allowed
    classes of your own as themselves. A record reached from several places
    is one object reached from several places, as in ``pickle.load``.
    """
    allowed = [*allow, *_RECORD_CLASSES]
    if file.read(len(ZEXP_HEADER)) != ZEXP_HEADER:
        raise InputError(f"{source}: not a ZODB export (it does not start with ZEXP)")
    records: dict[bytes, _Record] = {}
    references: list[tuple[bytes, list[bytes]]] = []
    root = None
    while True:
        header = file.read(16)
        if header == _ZEXP_END:
            break
        oid, length = header[:8], int.from_bytes(header[8:], "big")
        data = _read_exactly(file, length) if len(header) == 16 else None
        if data is None:
            raise InputError(
                f"{source}: ends in the middle of record {len(records) + 1} (truncated)"
            )
        where = f"{source}: record 0x{oid.hex()}"
        if oid in records:
            raise InputError(f"{where} appears twice; the export is damaged")
        refs: list[bytes] = []
        unpickler = _RecordUnpickler(io.BytesIO(data), allow=allowed, source=where, refs=refs)
        with unpickling_errors(where):
            meta = unpickler.load()
            state = unpickler.load()
        records[oid] = _record(meta, state, unpickler, where)
        references.append((oid, refs))
        root = root or oid
    if file.read(1):
        raise InputError(f"{source}: bytes after the export's end marker")
    if root is None:
        raise InputError(f"{source}: a ZODB export without any record")
    for referrer, refs in references:
        for oid in refs:
            if oid not in records:
                raise InputError(
                    f"{source}: record 0x{referrer.hex()} refers to record 0x{oid.hex()}, "
                    "which is not in the file (a dangling reference); the export is damaged"
                )
    try:
        return _Rebuild(records, source).value(_Ref(root)), len(records)
    except Error:
        raise
    except RecursionError:
        raise InputError(f"{source}: an object in the export is nested too deeply") from None
    except Exception as exc:  # a forged or damaged state, or an allowed class refusing it
        raise InputError(f"{source}: cannot rebuild the exported tree: {exc!r}") from None


def _read_exactly(file: Any, length: int) -> bytes | None:
    """The next *length* bytes of *file*, or None if it ends first.

    Read in blocks, so that a forged length (up to 2**64) costs no more
    memory than the file holds; *file* may be a decompressing stream, whose
    size is known only at its end.
    """
    blocks = []
    while length > 0:
        block = file.read(min(length, 1 << 20))
        if not block:
            return None
        blocks.append(block)
        length -= len(block)
    return b"".join(blocks)


def _record(meta: Any, state: Any, unpickler: AllowListUnpickler, where: str) -> _Record:
    """A record from its class metadata (ZODB's formats: see ZODB/serialize.py) and state."""
    args: Any = ()
    if type(meta) is tuple and len(meta) == 2:
        meta, args = meta
        if type(meta) is tuple and len(meta) == 2 and all(type(n) is str for n in meta):
            meta = unpickler.find_class(*meta)  # an old (module, name) record: allow-listed too
    if type(meta) is _PersistentClassName:
        meta = meta.cls
    if not isinstance(meta, type) or not isinstance(args or (), tuple):
        raise InputError(f"{where}: not a ZODB record (no class at its start)")
    return _Record(meta, args or (), state)


def _bucket_items(state: Any, where: str) -> Any:
    """The flat (key, value, key, value...) tuple of an OOBucket's state."""
    if state is None:
        return ()
    if type(state) is not tuple or not state or type(state[0]) is not tuple:
        raise InputError(f"{where}: a BTree bucket's state is not a tuple of items")
    if len(state[0]) % 2:
        raise InputError(f"{where}: a BTree bucket holds an odd number of keys and values")
    return state[0]


_PENDING = object()
_BUILDING = object()  # a Set record being rebuilt: built at its end, so not yet known


class _Fill:
    """One container being rebuilt: the raw items left, and what to do with each result."""

    __slots__ = ("finish", "items", "put", "slot")

    def __init__(self, items: Iterator[Any], put: Callable[[Any, Any], Any], finish: Any) -> None:
        self.items = items
        self.put = put
        self.finish = finish
        self.slot: Any = None


class _Rebuild:
    """Rebuilds the plain tree from read records, iteratively (any depth, any sharing).

    Each record, and each container inside a record's state, is converted
    once: a container is created empty and remembered before its items are,
    so references that loop back find it, and sharing costs nothing here.
    (The import counts the copies sharing would make before it builds
    anything: see :func:`_census`.)
    """

    def __init__(self, records: dict[bytes, _Record], source: str) -> None:
        self.records = records
        self.source = source
        self.by_oid: dict[bytes, Any] = {}
        self.by_id: dict[int, Any] = {}  # raw containers are kept alive by the records
        #: BTree records (inner nodes, buckets) read as part of a mapping: each belongs to one.
        self.tree_parts: set[bytes] = set()

    def value(self, raw: Any) -> Any:
        value = self._known(raw)
        if value is not _PENDING:
            return value
        stack = [self._fill(raw)]
        while True:
            frame = stack[-1]
            for slot, item in frame.items:
                value = self._known(item)
                if value is _PENDING:
                    child = self._fill(item)
                    child.slot = slot
                    stack.append(child)
                    break
                frame.put(slot, value)
            else:
                stack.pop()
                value = frame.finish()
                if not stack:
                    return value
                stack[-1].put(frame.slot, value)

    def _known(self, raw: Any) -> Any:
        """*raw* converted if that takes no more work, else _PENDING."""
        kind = type(raw)
        if kind in SCALAR_TYPES and kind is not frozenset:  # a frozenset may hold references
            return raw
        if kind is _Ref:
            value = self.by_oid.get(raw.oid, _PENDING)
            if value is _PENDING and issubclass(self.records[raw.oid].cls, Length):
                value = self.by_oid[raw.oid] = self._counter(raw.oid)
            if value is _BUILDING:
                raise InputError(
                    f"{self.source}: record 0x{raw.oid.hex()}: a set containing itself"
                )
            return value
        if kind in (dict, list, tuple, set, frozenset) or isinstance(raw, tuple):
            # A namedtuple of an allowed class may hold references too.
            return self.by_id.get(id(raw), _PENDING)
        if isinstance(raw, Persistent):
            # ZODB writes every persistent object as a record of its own and refers
            # to it by oid; one built inside a state would be stored unchecked
            # (a BTree with its keys out of order, a node holding a bytearray).
            raise InputError(
                f"{self.source}: a {type(raw).__qualname__} built inside a record's state "
                "instead of referred to by its oid, which ZODB never writes; the export "
                "is forged or damaged"
            )
        return raw  # a datetime, a Decimal, an instance of an allowed class

    def _counter(self, oid: bytes) -> int:
        value = self.records[oid].state
        if type(value) is not int:
            raise InputError(
                f"{self.source}: record 0x{oid.hex()}: a counter whose state is not an int"
            )
        return value

    def _fill(self, raw: Any) -> _Fill:
        kind = type(raw)
        if kind is _Ref:
            return self._fill_record(raw.oid)
        if kind is dict:
            mapping: dict[Any, Any] = {}
            self.by_id[id(raw)] = mapping
            return _Fill(iter(raw.items()), self._setter(mapping), lambda: mapping)
        if kind is list:
            items: list[Any] = []
            self.by_id[id(raw)] = items
            return _Fill(enumerate(raw), _appender(items), lambda: items)
        items = []

        def finish() -> Any:
            value = rebuilt_tuple(raw, items) if isinstance(raw, tuple) else kind(items)
            self.by_id[id(raw)] = value
            return value

        return _Fill(enumerate(raw), _appender(items), finish)

    def _fill_record(self, oid: bytes) -> _Fill:
        record = self.records[oid]
        cls, state = record.cls, record.state
        if issubclass(cls, OOBTree | OOBucket):
            mapping: dict[Any, Any] = {}
            self.by_oid[oid] = mapping
            return _Fill(self._tree_items(oid), self._setter(mapping), lambda: mapping)
        if issubclass(cls, PersistentMapping | PersistentList | Set):
            data = state.get("data") if type(state) is dict else None
            if issubclass(cls, Set) and type(data) is set:
                self.by_oid[oid] = _BUILDING
                elements: list[Any] = []

                def built() -> set[Any]:
                    value = self.by_oid[oid] = set(elements)
                    return value

                return _Fill(enumerate(data), _appender(elements), built)
            if issubclass(cls, PersistentMapping) and type(data) is dict:
                mapping = {}
                self.by_oid[oid] = mapping
                return _Fill(iter(data.items()), self._setter(mapping), lambda: mapping)
            if issubclass(cls, PersistentList) and type(data) is list:
                items: list[Any] = []
                self.by_oid[oid] = items
                return _Fill(enumerate(data), _appender(items), lambda: items)
            raise InputError(
                f"{self.source}: record 0x{oid.hex()}: not the state of a {cls.__qualname__}"
            )
        # An instance of a class the caller allowed: created as ZODB would, then given its state.
        obj = self.by_oid[oid] = cls.__new__(cls, *record.args)
        converted: list[Any] = []

        def finish() -> Any:
            if converted[0] is not None:
                obj.__setstate__(converted[0])
            return obj

        return _Fill(iter([(None, state)]), _appender(converted), finish)

    def _setter(self, shell: dict[Any, Any]) -> Callable[[Any, Any], None]:
        def put(key: Any, value: Any) -> None:
            if type(key) not in SCALAR_TYPES and _holds_reference(key):
                raise InputError(
                    f"{self.source}: a key refers to another record (a persistent object as "
                    "a key), which a plain tree cannot hold"
                )
            shell[key] = value

        return put

    def _tree_items(self, oid: bytes) -> Iterator[tuple[Any, Any]]:
        """The items of a BTree (or bucket) record, its buckets walked in key order.

        An inner node or bucket read as part of one mapping cannot be part of
        another (or appear twice in one): ZODB's BTrees never share them, and
        a forged dump that did would have its items copied once per mapping.
        """
        stack = [iter([oid])]
        while stack:
            oid = next(stack[-1], None)
            if oid is None:
                stack.pop()
                continue
            record = self.records[oid]
            where = f"{self.source}: record 0x{oid.hex()}"
            state = record.state
            if issubclass(record.cls, OOBucket):
                flat = _bucket_items(state, where)
            elif not issubclass(record.cls, OOBTree):
                raise InputError(f"{where}: a {record.cls.__qualname__} inside a BTree")
            elif state is None:
                continue
            elif len(state) == 1 and len(state[0]) == 1 and type(state[0][0]) is tuple:
                flat = _bucket_items(state[0][0], where)  # one bucket, held inline
            else:
                children = state[0][::2]
                if not all(type(child) is _Ref for child in children):
                    raise InputError(f"{where}: not the state of a BTree")
                for child in children:
                    if child.oid in self.tree_parts:
                        raise InputError(
                            f"{where}: record 0x{child.oid.hex()} is part of this BTree twice, "
                            "or of two BTrees; the export is damaged"
                        )
                    self.tree_parts.add(child.oid)
                stack.append(iter([child.oid for child in children]))
                continue
            flat_iter = iter(flat)
            yield from zip(flat_iter, flat_iter, strict=True)


def _appender(target: list[Any]) -> Callable[[Any, Any], None]:
    append = target.append
    return lambda _slot, value: append(value)


def _holds_reference(key: Any) -> bool:
    stack = [key]
    while stack:
        item = stack.pop()
        if type(item) is _Ref:
            return True
        if isinstance(item, tuple | frozenset):
            stack.extend(item)
    return False
