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

import codecs
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from persistent import Persistent

from ._unpickler import load_pickle
from ._zexp import ZEXP_HEADER, read_zexp
from .errors import ArgumentError, Error, InputError, UnstorableValueError
from .tree import (
    SCALAR_TYPES,
    FlatMapping,
    List,
    Mapping,
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
                return load_pickle(file, name, allow)
            if format == "zodb":
                return read_zexp(file, name, allow)[0]
            raw = file.read()
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror or exc}") from None
    return _load_json(raw, name)


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
