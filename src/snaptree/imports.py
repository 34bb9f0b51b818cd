"""Importing an existing model into the store: JSON and pickle sources, and ``import_tree``.

Two jobs live here, each with its own half of the module:

* **Reading a source** (:func:`load_source`). JSON is parsed with the
  standard library and its errors are reported with file, line and column.
  Pickles are read with an allow-list unpickler: a pickle is a program, and
  the standard unpickler runs whatever callable the file names. Ours resolves
  only builtin containers and scalars, datetime and decimal types, plus the
  classes the caller names, and refuses every other global *before* anything
  is called, so a hostile file cannot run code. A ZODB export (``.zexp``) is
  a sequence of such pickles, two per record; it is read record by record
  with the same unpickler (never with ``Connection.importFile``, which
  unpickles with no allow-list) and rebuilt as the plain tree it holds.

* **Storing a plain tree** (:func:`import_tree`). The tree is converted with
  the same rules as an assignment into the tree (:func:`snaptree.to_persistent`)
  but iteratively and bottom-up, so that a large import can be written to a
  ZODB savepoint every few thousand objects and the finished parts dropped
  from memory, while the whole import still commits as one transaction.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import copyreg
import importlib
import io
import itertools
import json
import os
import pickle
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from BTrees.Length import Length
from BTrees.OOBTree import OOBTree, OOBucket
from persistent import Persistent
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping

from .errors import ArgumentError, Error, InputError, UnstorableValueError
from .tree import (
    SCALAR_TYPES,
    Counter,
    FlatMapping,
    List,
    Mapping,
    Set,
    dict_node,
    to_persistent,
)

#: Persistent containers written between two savepoints of a large import.
DEFAULT_SAVEPOINT_EVERY = 10_000

#: Without ``max_objects``, an import may create this many objects (dicts,
#: lists, tuples) however few distinct ones the data holds ...
EXPANSION_FLOOR = 100_000
#: ... or this many times the number of distinct ones, whichever is more.
EXPANSION_FACTOR = 10

FORMATS = ("json", "pickle", "zodb")

_MISSING = object()


# ---------------------------------------------------------------------------
# Reading sources
# ---------------------------------------------------------------------------


def _bytes_from_pickle(*args: Any) -> bytes:
    """``bytes(...)`` as a pickle may call it: never ``bytes(n)``, which allocates n bytes.

    Protocols 0-2 write ``bytes(b"")`` and bytes subclasses through this
    callable; a hostile file could instead ask for ``bytes(10**11)``.
    """
    if args and isinstance(args[0], int):
        raise InputError("the pickle calls bytes(n) to allocate memory; refused")
    return bytes(*args)


def _bytearray_from_pickle(*args: Any) -> bytearray:
    """``bytearray(...)`` as a pickle may call it: never ``bytearray(n)``."""
    if args and isinstance(args[0], int):
        raise InputError("the pickle calls bytearray(n) to allocate memory; refused")
    return bytearray(*args)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocols 0-2 use it for bytes: latin-1 only.

    Other codecs (zlib, bz2...) would let a small file expand into a huge one.
    """
    if codecs.lookup(encoding).name != "iso8859-1":
        raise InputError(f"the pickle calls _codecs.encode with codec {encoding!r}; refused")
    return text.encode("latin1")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocols 0 and 1) restricted to allowed classes.

    Both classes reach here only through ``find_class``; checking them again
    keeps a value that is not a class (or a refused one) from being called.
    """
    if not isinstance(cls, type) or not isinstance(base, type):
        raise InputError("the pickle calls copyreg._reconstructor with a non-class; refused")
    return copyreg._reconstructor(cls, base, state)


_BUILTIN_NAMES = (
    "bool",
    "complex",
    "dict",
    "float",
    "frozenset",
    "int",
    "list",
    "set",
    "str",
    "tuple",
)

#: (module, name) -> what a pickle gets when it names that global.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", "bytes"): _bytes_from_pickle,
    ("builtins", "bytearray"): _bytearray_from_pickle,
    ("_codecs", "encode"): _latin1_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,  # only as the base of _reconstructor
    ("collections", "OrderedDict"): None,
    ("collections", "defaultdict"): None,
    ("datetime", "date"): None,
    ("datetime", "datetime"): None,
    ("datetime", "time"): None,
    ("datetime", "timedelta"): None,
    ("datetime", "timezone"): None,
    ("decimal", "Decimal"): None,
}
for _name in _BUILTIN_NAMES:
    _SAFE_GLOBALS["builtins", _name] = None


def _resolve(module: str, qualname: str) -> Any:
    value: Any = importlib.import_module(module)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


def _parse_allow(allow: Iterable[str | type]) -> set[tuple[str, str]]:
    """Turn ``"module:Class"`` strings and classes into (module, qualname) pairs."""
    pairs = set()
    for entry in allow:
        if isinstance(entry, type):
            pairs.add((entry.__module__, entry.__qualname__))
            continue
        module, sep, name = str(entry).partition(":")
        if not sep or not module or not name:
            raise InputError(
                f"--allow {entry!r}: write it as module:Class, for example myapp.model:Account"
            )
        pairs.add((module.strip(), name.strip()))
    return pairs


class AllowListUnpickler(pickle.Unpickler):
    """An unpickler that loads only allow-listed globals and refuses the rest by name.

    Every way a pickle can reach a callable (GLOBAL, STACK_GLOBAL, INST and
    the extension registry) goes through :meth:`find_class`, in the C
    implementation too; REDUCE, NEWOBJ, OBJ and BUILD can only call what an
    earlier find_class returned, or objects built from those. So refusing
    here, before anything is called, is what keeps a file's code from
    running. Allowed builtins whose constructor could be abused (``bytes(n)``
    allocating n bytes, ``_codecs.encode`` with a decompressing codec) are
    replaced by guarded functions. Persistent ids are refused (the default).
    """

    def __init__(self, file: Any, *, allow: Iterable[str | type] = (), source: str = "") -> None:
        super().__init__(file)
        self._allowed = _parse_allow(allow)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (__builtin__, copy_reg) as pickle's fix_imports maps them.
        mapped = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        )
        if mapped in self._allowed:
            try:
                return _resolve(*mapped)
            except (ImportError, AttributeError) as exc:
                raise InputError(
                    f"{self._source}: cannot load {module}.{name}, allowed with --allow: {exc}"
                ) from None
        if mapped in _SAFE_GLOBALS:
            safe = _SAFE_GLOBALS[mapped]
            return safe if safe is not None else _resolve(*mapped)
        raise InputError(
            f"{self._source}: refused global {module}.{name}: only builtin containers and "
            "scalars, datetime and decimal types are loaded from a pickle, plus classes "
            "you trust and name with --allow module:Class; no code from the file was run"
        )


@contextmanager
def _unpickling_errors(source: str) -> Iterator[None]:
    """Turn whatever unpickling an untrusted file raises into one InputError naming *source*."""
    try:
        yield
    except Error:
        raise
    except EOFError:
        raise InputError(
            f"{source}: the pickle is empty or truncated (the file ended before its STOP opcode)"
        ) from None
    except MemoryError:
        raise InputError(f"{source}: the pickle needs more memory than is available") from None
    except RecursionError:
        raise InputError(f"{source}: the pickle is nested too deeply to load") from None
    except Exception as exc:  # untrusted input: any failure is a bad file, reported as one
        detail = str(exc) or type(exc).__name__
        if "truncated" in detail:
            raise InputError(
                f"{source}: the pickle is truncated (the file ends in the middle of its data)"
            ) from None
        raise InputError(f"{source}: not a valid pickle: {detail}") from None


def _load_pickle(file: Any, source: str, allow: Iterable[str | type]) -> Any:
    with _unpickling_errors(source):
        value = AllowListUnpickler(file, allow=allow, source=source).load()
    if file.read(1):
        # A second pickle, or garbage: loading only the first would drop the rest silently.
        raise InputError(
            f"{source}: bytes after the end of the pickle (a second pickle in the same "
            "file?); only a file holding exactly one pickle is read"
        )
    return value


def _long_int_position(raw: bytes, digits: int) -> str:
    """Where the first integer of more than *digits* digits is in JSON text: "line L, column C"."""
    found = re.search(rb"(?<![\w.\"\\-])-?\d{%d,}" % (digits + 1), raw)
    if found is None:
        return ""
    start = found.start()
    line = raw.count(b"\n", 0, start) + 1
    column = len(raw[raw.rfind(b"\n", 0, start) + 1 : start].decode("utf-8", "replace")) + 1
    return f" at line {line}, column {column}"


def _load_json(raw: bytes, source: str) -> Any:
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{source}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{source}: not UTF-8 text (byte {exc.start}: {exc.reason}); JSON must be UTF-8"
        ) from None
    except RecursionError:
        raise InputError(
            f"{source}: the JSON is nested too deeply for Python's JSON parser"
        ) from None
    except ValueError:
        # int() refusing a number longer than sys.get_int_max_str_digits(), the
        # one ValueError json.loads lets through without a position.
        limit = sys.get_int_max_str_digits()
        raise InputError(
            f"{source}: an integer of more than {limit} digits"
            f"{_long_int_position(raw, limit)}; Python reads longer ones only after "
            "sys.set_int_max_str_digits() is raised: store it as a string, or raise that limit"
        ) from None


def _guess_format(path: str, head: bytes) -> str:
    lowered = path.lower()
    if lowered.endswith(".json"):
        return "json"
    if lowered.endswith((".pickle", ".pkl", ".pck")):
        return "pickle"
    if lowered.endswith(".zexp") or head.startswith(ZEXP_HEADER):
        return "zodb"
    start = head.lstrip()[:1]
    if head[:1] == b"\x80" or start in (b"(", b"]", b"}", b"c", b"N"):
        return "pickle"
    if start in (b"{", b"[", b'"') or head.startswith(codecs.BOM_UTF8):
        return "json"
    raise InputError(
        f"{path}: cannot tell whether this is JSON, a pickle or a ZODB export; pass "
        "--format json, pickle or zodb"
    )


def load_source(
    path: str | os.PathLike[str],
    format: str | None = None,  # noqa: A002 - the name users know from the CLI
    allow: Iterable[str | type] = (),
) -> Any:
    """Read a JSON file, a pickle or a ZODB export into plain data, refusing anything hostile.

    ``format`` is ``"json"``, ``"pickle"``, ``"zodb"`` or None to decide from
    the file name (``.json``, ``.pickle``/``.pkl``, ``.zexp``) or, failing
    that, from its first bytes. ``allow`` names extra classes a pickle may
    contain, as ``"module:Class"`` strings or as the classes themselves;
    nothing else beyond builtin containers and scalars, datetime and decimal
    is loaded (and, in a ZODB export, snaptree's own nodes and the BTrees
    and persistent containers they are made of).

    Raises :class:`snaptree.InputError` naming the file and, for JSON, the
    line and column of the first error.
    """
    name = os.fspath(path)
    if format is not None and format not in FORMATS:
        raise InputError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    try:
        with open(name, "rb") as file:
            if format is None:
                format = _guess_format(name, file.read(64))  # noqa: A001
                file.seek(0)
            if format == "pickle":
                return _load_pickle(file, name, allow)
            if format == "zodb":
                return read_zexp(file, name, allow)[0]
            raw = file.read()
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror or exc}") from None
    return _load_json(raw, name)


# ---------------------------------------------------------------------------
# ZODB exports, read without running them
# ---------------------------------------------------------------------------
#
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


class _RecordUnpickler(AllowListUnpickler):
    """The allow-list unpickler with ZODB's persistent references read as :class:`_Ref`."""

    def __init__(self, file: Any, *, allow: Any, source: str, refs: list[bytes]) -> None:
        super().__init__(file, allow=allow, source=source)
        self._refs = refs

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
    size = os.fstat(file.fileno()).st_size
    records: dict[bytes, _Record] = {}
    references: list[tuple[bytes, list[bytes]]] = []
    root = None
    while True:
        header = file.read(16)
        if header == _ZEXP_END:
            break
        oid, length = header[:8], int.from_bytes(header[8:], "big")
        if len(header) != 16 or length > size - file.tell():
            raise InputError(
                f"{source}: ends in the middle of record {len(records) + 1} (truncated)"
            )
        where = f"{source}: record 0x{oid.hex()}"
        if oid in records:
            raise InputError(f"{where} appears twice; the export is damaged")
        refs: list[bytes] = []
        unpickler = _RecordUnpickler(
            io.BytesIO(file.read(length)), allow=allowed, source=where, refs=refs
        )
        with _unpickling_errors(where):
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


def _record(meta: Any, state: Any, unpickler: AllowListUnpickler, where: str) -> _Record:
    """A record from its class metadata (ZODB's formats: see ZODB/serialize.py) and state."""
    args: Any = ()
    if type(meta) is tuple and len(meta) == 2:
        meta, args = meta
        if type(meta) is tuple and len(meta) == 2 and all(type(n) is str for n in meta):
            meta = unpickler.find_class(*meta)  # an old (module, name) record: allow-listed too
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
        if kind in (dict, list, tuple, set, frozenset):
            return self.by_id.get(id(raw), _PENDING)
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
            value = self.by_id[id(raw)] = kind(items)
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


# ---------------------------------------------------------------------------
# Storing a tree
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportResult:
    """What an import did: where, which keys, how many objects, at what cost."""

    #: Where the data went, normalised ("/" or "accounts/a1").
    path: str
    #: The keys written at the target: the data's top-level keys for "/", else the last segment.
    keys: tuple[Any, ...]
    #: Keys whose old value was replaced (only with ``replace=True``).
    replaced: tuple[Any, ...]
    #: Persistent containers created (one per dict and list in the data).
    objects: int
    #: Savepoints taken by the attempt that committed.
    savepoints: int
    #: Attempts made (more than one when a conflict with other writers forced a retry).
    attempts: int
    #: Wall-clock seconds, conversion and commit included, source loading excluded.
    seconds: float


def _split(path: str) -> list[str]:
    text = path.strip()
    if not text:
        # Almost always an unset shell variable (--path "$TARGET"): importing
        # into the root instead would merge the data over the whole tree.
        raise ArgumentError(
            f"the import path {path!r} is empty; give the path to import into, "
            "or / to merge the data's keys into the root"
        )
    if text == "/":
        return []
    segments = text.strip("/").split("/")
    if any(not s for s in segments):
        raise ArgumentError(f"{path!r}: empty segment in the path; write it like accounts/a1")
    return segments


def _contains(node: Any, key: Any) -> bool:
    try:
        return key in node
    except TypeError:  # a BTree of int keys asked about a str key
        return False


def _key_in(node: Any, segment: str) -> Any:
    """The key *segment* names in *node*: the str, or the int it spells if only that exists."""
    if _contains(node, segment):
        return segment
    try:
        number = int(segment)
    except ValueError:
        return segment
    if _contains(node, number):
        return number
    if isinstance(node, Mapping) and len(node) and isinstance(node.minKey(), int):
        return number
    return segment


def _index_in(node: List, segment: str, where: str) -> int:
    try:
        index = int(segment)
    except ValueError:
        raise Error(f"{where}: a list index must be a number, not {segment!r}") from None
    if not -len(node) <= index < len(node):
        raise Error(f"{where}: no item {index} in a list of {len(node)}; import into a mapping")
    return index


def _locate(root: Mapping, segments: list[str]) -> tuple[Any, Any]:
    """Walk to the parent of the last segment, creating missing mappings on the way."""
    node: Any = root
    for depth, segment in enumerate(segments[:-1]):
        where = "/".join(segments[: depth + 1])
        if isinstance(node, List):
            child = node[_index_in(node, segment, where)]
        elif isinstance(node, Mapping | FlatMapping):
            key = _key_in(node, segment)
            child = node.get(key, _MISSING)
            if child is _MISSING:
                child = Mapping()
                _assign(node, key, child, where)
        else:
            raise Error(f"{where}: is not a mapping or list, so nothing can be imported below it")
        node = child
    last = segments[-1]
    where = "/".join(segments)
    if isinstance(node, List):
        return node, _index_in(node, last, where)
    if isinstance(node, Mapping | FlatMapping):
        return node, _key_in(node, last)
    parent = "/".join(segments[:-1]) or "/"
    raise Error(f"{parent}: is a {type(node).__name__}, not a mapping; cannot import into it")


def _assign(parent: Any, key: Any, value: Any, where: str) -> None:
    try:
        parent[key] = value
    except TypeError as exc:
        if isinstance(exc, UnstorableValueError):
            raise
        raise UnstorableValueError(
            where, f"key {key!r} cannot be ordered with the keys already there ({exc})"
        ) from None


def _persistent_inside(value: Any) -> bool:
    """Whether a tuple or set leaf holds persistent objects (of the caller's own classes)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Persistent):
            return True
        if isinstance(item, tuple | list | set | frozenset):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return False


class _Frame:
    """A dict or list being converted: its source, how far it got, its converted children."""

    __slots__ = ("added", "is_dict", "out", "position", "source", "values")

    def __init__(self, source: Any, position: int) -> None:
        self.source = source
        self.position = position  # its index among its parent's children
        self.is_dict = isinstance(source, dict)
        self.values: Iterator[Any] = iter(source.values() if self.is_dict else source)
        self.out: list[Any] = []  # converted children, in the source's order
        self.added = 0  # how much of ``out`` has been handed to the connection


def _refuse_default_factory(value: Any, path: list[Any]) -> None:
    """A defaultdict would become a plain mapping: refused, as assignment refuses it."""
    if hasattr(type(value), "__missing__"):
        raise UnstorableValueError(
            "/".join(map(str, path)),
            f"a {type(value).__module__}.{type(value).__qualname__} cannot be stored: its "
            "default for missing keys would be lost; import dict(value) and use "
            "node.setdefault(key, default) where you relied on the default",
        )


def _key_at(source: Any, position: int) -> Any:
    if isinstance(source, dict):
        return next(itertools.islice(iter(source), position, None))
    return position


class _Builder:
    """Converts plain trees bottom-up, writing finished subtrees at savepoints.

    A node is created only once all its children exist. Every ``every``
    nodes, the finished subtrees not yet reachable from the database (the
    children collected so far by the containers still being converted) are
    handed to the connection with ``add`` and an optimistic savepoint writes
    them to ZODB's temporary file, after which the pickle cache may turn them
    into ghosts. Only the containers on the current path are kept whole, so
    memory stays bounded however large the import. Adding just that frontier,
    not every node, lets one ZODB object writer crawl each subtree, as a
    plain commit does.

    Instances of the caller's own persistent classes stop further savepoints:
    a savepoint may ghost them, and if the transaction then aborts ZODB
    disowns ghosts without their state, destroying objects the caller still
    holds. An import that carries such objects is written at commit instead.
    """

    def __init__(self, conn: Any, txn: Any, every: int, advance: Callable[[int], Any]) -> None:
        self.conn = conn
        self.txn = txn
        self.every = every
        self.advance = advance
        self.objects = 0
        self.savepoints = 0
        self.pending = 0
        self.savepoints_allowed = True

    def build(self, value: Any, prefix: list[Any]) -> Any:
        """Return *value* converted; *prefix* is its path, for error messages."""
        if not isinstance(value, dict | list) or isinstance(value, Persistent):
            return self._leaf(value, prefix)
        _refuse_default_factory(value, prefix)
        # The hot loop: locals only, one type lookup per scalar.
        stack = [_Frame(value, 0)]
        on_path = {id(value)}
        scalars = SCALAR_TYPES
        while True:
            frame = stack[-1]
            out = frame.out
            append = out.append
            for child in frame.values:
                kind = type(child)
                if kind in scalars:
                    append(child)
                elif (kind is dict or kind is list) or (
                    isinstance(child, dict | list) and not isinstance(child, Persistent)
                ):
                    if id(child) in on_path:
                        raise UnstorableValueError(
                            self._path(prefix, stack, len(out)),
                            "the data refers back to one of its own containers (a cycle); "
                            "a tree cannot hold a cycle",
                        )
                    if kind is not dict and kind is not list:
                        _refuse_default_factory(child, self._keys(prefix, stack, len(out)))
                    on_path.add(id(child))
                    stack.append(_Frame(child, len(out)))
                    break
                else:
                    append(self._leaf(child, self._keys(prefix, stack, len(out))))
            else:
                stack.pop()
                on_path.discard(id(frame.source))
                node = self._finish(frame, stack, prefix)
                if not stack:
                    return node
                stack[-1].out.append(node)

    def _finish(self, frame: _Frame, stack: list[_Frame], prefix: list[Any]) -> Any:
        node: Any
        source = frame.source
        if frame.is_dict:
            try:
                node = dict_node(source, frame.out)
            except UnstorableValueError as exc:  # a key it refuses (NaN...): exc.path is the key
                where = self._keys(prefix, stack, frame.position) if stack else prefix
                raise UnstorableValueError(
                    "/".join(map(str, [*where, exc.path])), exc.detail
                ) from None
        else:
            node = List()
            node.data = frame.out
        self.objects += 1
        self.pending += 1
        if self.pending >= self.every:
            self._savepoint(stack, node)
        return node

    def _savepoint(self, stack: list[_Frame], finished: Any) -> None:
        self.advance(self.pending)
        self.pending = 0
        if not self.savepoints_allowed:
            return
        add = self.conn.add
        add(finished)  # not yet in its parent's ``out``
        for frame in stack:
            out = frame.out
            for value in out[frame.added :]:
                if isinstance(value, Persistent) and value._p_jar is None:
                    add(value)
            frame.added = len(out)
        # Connection.savepoint also runs the cache's incremental GC, which
        # turns the nodes just written into ghosts once the cache is full.
        self.txn.savepoint(optimistic=True)
        self.savepoints += 1

    def flush_progress(self) -> None:
        self.advance(self.pending)
        self.pending = 0

    def _leaf(self, value: Any, path: list[Any]) -> Any:
        if isinstance(value, Persistent):
            jar = value._p_jar
            if jar is not None and jar is not self.conn:
                raise UnstorableValueError(
                    "/".join(map(str, path)),
                    f"this {type(value).__name__} already belongs to a database connection; "
                    "store a new object or a plain copy",
                )
            self.savepoints_allowed = False
            return value
        try:
            converted = to_persistent(value, "/".join(map(str, path)))
        except RecursionError:
            raise UnstorableValueError(
                "/".join(map(str, path)), "nested too deeply inside a tuple to store"
            ) from None
        if isinstance(converted, tuple | frozenset) and _persistent_inside(value):
            self.savepoints_allowed = False
        return converted

    @staticmethod
    def _keys(prefix: list[Any], stack: list[_Frame], position: int) -> list[Any]:
        keys = list(prefix)
        for parent, frame in itertools.pairwise(stack):
            keys.append(_key_at(parent.source, frame.position))
        keys.append(_key_at(stack[-1].source, position))
        return keys

    @classmethod
    def _path(cls, prefix: list[Any], stack: list[_Frame], position: int) -> str:
        return "/".join(map(str, cls._keys(prefix, stack, position)))


def _census(data: Any) -> tuple[int, int, int]:
    """What importing *data* would create, counted without creating it.

    Returns ``(containers, objects, distinct)``: the dicts and lists the
    import turns into nodes, those plus tuples (rebuilt by the conversion),
    each counted once per place it is reached; and the distinct dicts,
    lists and tuples. One object can be reached from many places (a
    pickle's memo makes ``[x] * 10`` nested nine deep a 225-byte file of a
    billion places), so this counts each distinct object once and adds up
    its children's totals: time linear in the distinct objects, however
    large the totals. A cycle is left for the import to report.
    """
    if not _expands(data):
        return 0, 0, 0
    totals: dict[int, tuple[int, int]] = {}
    on_path = {id(data)}
    stack = [[data, _children(data), _is_container(data), 1]]
    while stack:
        frame = stack[-1]
        for child in frame[1]:
            if type(child) in SCALAR_TYPES or not _expands(child):
                continue
            counted = totals.get(id(child))
            if counted is not None:
                frame[2] += counted[0]
                frame[3] += counted[1]
            elif id(child) not in on_path:
                on_path.add(id(child))
                stack.append([child, _children(child), _is_container(child), 1])
                break
        else:
            stack.pop()
            on_path.discard(id(frame[0]))
            totals[id(frame[0])] = (frame[2], frame[3])
            if stack:
                stack[-1][2] += frame[2]
                stack[-1][3] += frame[3]
    containers, objects = totals[id(data)]
    return containers, objects, len(totals)


def _expands(value: Any) -> bool:
    """Whether converting *value* makes a new object (it, and what it holds, are copied)."""
    return isinstance(value, dict | list | tuple | set | frozenset) and not isinstance(
        value, Persistent
    )


def _is_container(value: Any) -> int:
    return 1 if isinstance(value, dict | list) else 0


def _children(value: Any) -> Iterator[Any]:
    return iter(value.values() if isinstance(value, dict) else value)


def _check_expansion(data: Any, max_objects: int | None) -> int:
    """Refuse data that would create more objects than allowed; return its container count."""
    containers, objects, distinct = _census(data)
    limit = max_objects
    if limit is None:
        limit = max(EXPANSION_FLOOR, EXPANSION_FACTOR * distinct)
    if objects > limit:
        raise InputError(
            f"the data would create {objects:,} objects from {distinct:,} distinct dicts, "
            "lists and tuples: the same one is reached from many places (a pickle can "
            "do that in a few bytes) and the tree stores a copy at each; nothing was "
            f"imported. The limit is {limit:,}: if the copies are intended, raise it "
            "with --max-objects N (max_objects=N)"
        )
    return containers


@contextmanager
def _progress_bar(total: int | None, show: bool) -> Iterator[Callable[[int], Any]]:
    if not show:
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="obj", unit_scale=True, file=sys.stderr, leave=False) as bar:
        yield bar.update


def import_tree(
    store: Any,
    data: Any,
    *,
    path: str = "/",
    replace: bool = False,
    savepoint_every: int = DEFAULT_SAVEPOINT_EVERY,
    progress: bool = False,
    max_objects: int | None = None,
) -> ImportResult:
    """Store the plain tree *data* at *path*, converted to the tree's persistent form, atomically.

    At ``"/"`` *data* must be a mapping and each of its keys becomes a key of
    the root (other keys of the root are left alone). Elsewhere *data*
    becomes the value at *path*; missing mappings on the way are created.
    Without ``replace``, a key that already exists is an error naming it;
    with it, the old value is replaced.

    Conversion follows :func:`snaptree.to_persistent`: dicts become
    :class:`~snaptree.Mapping` (or :class:`~snaptree.FlatMapping` when their
    keys cannot be ordered), lists :class:`~snaptree.List`, sets set nodes;
    bytearrays and defaultdicts are refused; scalars, tuples, datetimes,
    Decimals and the caller's own persistent objects are stored as they are.

    The import is one transaction: it commits entirely or not at all. Every
    ``savepoint_every`` containers an optimistic savepoint moves the work
    done so far out of memory. A conflict with concurrent writers retries
    the whole import under the store's retry policy, which is safe because
    *data* is only read, never consumed. ``progress`` shows a tqdm bar on
    stderr.

    A dict or list reached from several places in *data* is stored as a
    copy at each. Before anything is built, the objects that makes are
    counted (without making them) and the import is refused with
    :class:`~snaptree.InputError` when they exceed ``max_objects``; by
    default, the larger of ``EXPANSION_FLOOR`` and ``EXPANSION_FACTOR``
    times the distinct dicts, lists and tuples in *data*, so that data
    without shared containers is never refused and a few hundred bytes of
    pickle cannot ask for a billion nodes.
    """
    if savepoint_every < 1:
        raise ArgumentError(f"savepoint_every must be at least 1, not {savepoint_every}")
    if max_objects is not None and (type(max_objects) is not int or max_objects < 1):
        raise ArgumentError(f"max_objects must be a positive int or None, not {max_objects!r}")
    segments = _split(path)
    if not segments and not isinstance(data, dict):
        raise UnstorableValueError(
            "/",
            f"only a mapping can be imported at the root (its keys become the root's keys), "
            f"not a {type(data).__name__}; give a path such as --path model",
        )
    total = _check_expansion(data, max_objects)
    attempts = 0
    started = time.perf_counter()

    def attempt(root: Mapping) -> tuple[tuple[Any, ...], tuple[Any, ...], int, int]:
        nonlocal attempts
        attempts += 1
        conn = root._p_jar
        txn = conn.transaction_manager.get()
        if segments:
            parent, key = _locate(root, segments)
            targets = [(parent, key, data, segments)]
        else:
            targets = [(root, key, value, [key]) for key, value in data.items()]
        replaced = []
        for parent, key, _, where in targets:
            if isinstance(parent, List) or _contains(parent, key):
                if not replace:
                    raise Error(
                        f"{'/'.join(map(str, where))}: already exists; nothing was imported. "
                        "Import elsewhere with --path, or pass --replace (replace=True) "
                        "to overwrite it"
                    )
                replaced.append(key)
        with _progress_bar(total, progress) as advance:
            builder = _Builder(conn, txn, savepoint_every, advance)
            for parent, key, value, where in targets:
                node = builder.build(value, where)
                _assign(parent, key, node, "/".join(map(str, where)))
            builder.flush_progress()
        return tuple(t[1] for t in targets), tuple(replaced), builder.objects, builder.savepoints

    keys, replaced, objects, savepoints = store.run(attempt)
    return ImportResult(
        path="/".join(segments) or "/",
        keys=keys,
        replaced=replaced,
        objects=objects,
        savepoints=savepoints,
        attempts=attempts,
        seconds=time.perf_counter() - started,
    )
