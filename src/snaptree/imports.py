"""Importing an existing model into the store: JSON and pickle sources, and ``import_tree``.

Two jobs live here, each with its own half of the module:

* **Reading a source** (:func:`load_source`). JSON is parsed with the
  standard library and its errors are reported with file, line and column.
  Pickles are read with the allow-list unpickler of :mod:`snaptree._unpickler`:
  a pickle is a program, and the standard unpickler runs whatever callable
  the file names; ours resolves only builtin containers and scalars, datetime
  and decimal types, plus the classes the caller names, and refuses every
  other global *before* anything is called. A ZODB export (``.zexp``) is read
  record by record with the same unpickler (:func:`snaptree._zexp.read_zexp`,
  never ``Connection.importFile``) and rebuilt as the plain tree it holds.

* **Storing a plain tree** (:func:`import_tree`). The tree is converted by the
  conversion every assignment uses (:mod:`snaptree._convert`): the same
  rules, the same errors, and the same sharing (an object the data reaches
  twice becomes one node reached twice). The conversion is bottom-up, so
  every few thousand nodes the finished subtrees are written to a ZODB
  savepoint and can leave memory, while the whole import still commits as
  one transaction. Before anything is built, the data is counted: what it
  would expand to when written out in full is capped, so that a few hundred
  bytes of pickle cannot become a dump of a billion objects.
"""

from __future__ import annotations

import codecs
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

from . import paths
from ._convert import Converter
from ._unpickler import load_pickle
from ._values import SCALAR_TYPES
from ._zexp import ZEXP_HEADER, read_zexp
from .errors import ArgumentError, Error, InputError, UnstorableValueError
from .tree import NODES, FlatMapping, List, Mapping

#: Nodes made between two savepoints of a large import.
DEFAULT_SAVEPOINT_EVERY = 10_000

#: Without ``max_objects``, the data may expand to this many objects (dicts,
#: lists, tuples, sets, each counted at every place the data reaches it)
#: however few distinct ones it holds ...
EXPANSION_FLOOR = 100_000
#: ... or to this many times the number of distinct ones, whichever is more.
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
    #: Nodes created: one per distinct dict, list and set in the data.
    objects: int
    #: Savepoints taken by the attempt that committed.
    savepoints: int
    #: Attempts made (more than one when a conflict with other writers forced a retry).
    attempts: int
    #: Wall-clock seconds, conversion and commit included, source loading excluded.
    seconds: float


_CONTAINERS = (Mapping, FlatMapping, List)


def _locate(root: Mapping, segments: tuple[str, ...]) -> tuple[Any, Any]:
    """The container the data goes into and its key there; missing mappings on the way are made."""
    node: Any = root
    for depth in range(len(segments) - 1):
        key = _key_in(node, segments, depth)
        child = node[key] if isinstance(node, List) else node.get(key, _MISSING)
        if child is _MISSING:
            child = Mapping()
            node[key] = child
        node = child
    return node, _key_in(node, segments, len(segments) - 1)


def _key_in(node: Any, segments: tuple[str, ...], depth: int) -> Any:
    where = paths.join(segments[:depth])
    if not isinstance(node, _CONTAINERS):
        raise ArgumentError(
            f"{where}: is a {type(node).__name__}, not a mapping or a list; nothing can be "
            "imported into it"
        )
    return paths.key_in(node, segments[depth], where=where, creating=True)


@dataclass(frozen=True)
class _Census:
    """What the data holds, counted before anything is built."""

    #: Dicts, lists, tuples and sets, each counted at every place it is reached.
    places: int
    #: The distinct ones.
    distinct: int
    #: The distinct dicts, lists and sets: the nodes an import makes.
    nodes: int
    #: The ids of those reached from more than one place (the conversion shares them).
    shared: set[int]


def _census(data: Any) -> _Census:
    """Count what *data* holds without building anything.

    One object can be reached from many places (a pickle's memo makes
    ``[x] * 10`` nested nine deep a 225-byte file of a billion places), so
    this counts each distinct object once and adds up its children's totals:
    time linear in the distinct objects, however large the totals. A cycle
    is left for the conversion to report.
    """
    if not _expands(data):
        return _Census(0, 0, 0, set())
    totals: dict[int, int] = {}
    shared: set[int] = set()
    nodes = 0
    on_path = {id(data)}
    stack: list[list[Any]] = [[data, _children(data), 1]]
    scalars = SCALAR_TYPES
    while stack:
        frame = stack[-1]
        for child in frame[1]:
            kind = type(child)
            if kind in scalars or not (kind is dict or kind is list or _expands(child)):
                continue
            ident = id(child)
            counted = totals.get(ident)
            if counted is not None:
                frame[2] += counted
                shared.add(ident)
            elif ident not in on_path:
                on_path.add(ident)
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
    return _Census(totals[id(data)], len(totals), nodes, shared)


def _expands(value: Any) -> bool:
    """Whether *value* is written out in full wherever it is reached (it, and what it holds)."""
    return isinstance(value, dict | list | tuple | set | frozenset) and not isinstance(
        value, Persistent
    )


def _children(value: Any) -> Iterator[Any]:
    return iter(value.values() if isinstance(value, dict) else value)


def _check_expansion(census: _Census, max_objects: int | None) -> None:
    """Refuse data that expands to more objects than allowed when written out in full."""
    limit = max_objects
    if limit is None:
        limit = max(EXPANSION_FLOOR, EXPANSION_FACTOR * census.distinct)
    if census.places > limit:
        raise InputError(
            f"the data expands to {census.places:,} objects from {census.distinct:,} distinct "
            "dicts, lists and tuples: the same one is reached from many places (a pickle can "
            "do that in a few bytes). The tree would store each once, but every pickle or "
            "JSON dump writes it out at each place; nothing was imported. The limit is "
            f"{limit:,}: if the sharing is intended, raise it with --max-objects N "
            "(max_objects=N)"
        )


@contextmanager
def _progress_bar(total: int | None, show: bool) -> Iterator[Callable[[int], Any]]:
    if not show:
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="obj", unit_scale=True, file=sys.stderr, leave=False) as bar:
        yield bar.update


class _Savepoints:
    """Every batch of nodes, hands the finished subtrees to ZODB and takes a savepoint.

    Only the subtrees no node holds yet (the children gathered so far by
    the containers still being converted) are added to the connection:
    one ZODB object writer then crawls each subtree, as a plain commit does.
    ``Connection.savepoint`` also runs the cache's incremental GC, which turns
    the nodes just written into ghosts once the cache is full, so memory
    holds the containers on the current path, not the whole import.

    Persistent objects that existed before (the caller's own) stop further
    savepoints: a savepoint may ghost them, and if the transaction then
    aborts ZODB disowns ghosts without their state, destroying objects the
    caller still holds. An import that carries such objects is written at
    commit instead.
    """

    def __init__(self, conn: Any, every: int, advance: Callable[[int], Any]) -> None:
        self.conn = conn
        self.every = every
        self.advance = advance
        self.reported = 0  # nodes shown on the progress bar
        self.taken = 0

    def __call__(self, converter: Converter) -> None:
        self.advance(converter.made - self.reported)
        self.reported = converter.made
        if converter.holds_persistent:
            return
        add = self.conn.add
        for node in converter.unattached():
            add(node)
        self.conn.transaction_manager.get().savepoint(optimistic=True)
        self.taken += 1


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
    becomes the value at *path* (see :mod:`snaptree.paths`); missing
    mappings on the way are created. Without ``replace``, a key that already
    exists is an error naming it; with it, the old value is replaced.

    Conversion is the one assignment uses (:func:`snaptree.to_persistent`):
    dicts become :class:`~snaptree.Mapping` (or :class:`~snaptree.FlatMapping`
    when their keys cannot be ordered), lists :class:`~snaptree.List`, sets
    set nodes; bytearrays and defaultdicts are refused; scalars, tuples,
    datetimes, Decimals and the caller's own persistent objects are stored
    as they are. An object the data reaches from several places becomes one
    node reached from each, as in the data.

    The import is one transaction: it commits entirely or not at all. Every
    ``savepoint_every`` nodes an optimistic savepoint moves the work done so
    far out of memory. A conflict with concurrent writers retries the whole
    import under the store's retry policy, which is safe because *data* is
    only read, never consumed. ``progress`` shows a tqdm bar on stderr.

    Before anything is built, the data is counted as it would be written out
    in full (each object at every place it is reached: what a pickle or JSON
    dump of the tree writes), and the import is refused with
    :class:`~snaptree.InputError` when that exceeds ``max_objects``; by
    default, the larger of ``EXPANSION_FLOOR`` and ``EXPANSION_FACTOR`` times
    the distinct dicts, lists and tuples in *data*, so that data without
    shared containers is never refused and a few hundred bytes of pickle
    cannot make a tree whose dumps hold a billion objects.
    """
    if savepoint_every < 1:
        raise ArgumentError(f"savepoint_every must be at least 1, not {savepoint_every}")
    if max_objects is not None and (type(max_objects) is not int or max_objects < 1):
        raise ArgumentError(f"max_objects must be a positive int or None, not {max_objects!r}")
    segments = paths.parse(path, what="import path")
    if not segments and not isinstance(data, dict):
        raise UnstorableValueError(
            "/",
            f"only a mapping can be imported at the root (its keys become the root's keys), "
            f"not a {type(data).__name__}; give a path such as --path model",
        )
    census = _census(data)
    _check_expansion(census, max_objects)
    attempts = 0
    started = time.perf_counter()

    def attempt(root: Mapping) -> tuple[tuple[Any, ...], tuple[Any, ...], int, int]:
        nonlocal attempts
        attempts += 1
        if segments:
            parent, key = _locate(root, segments)
            targets = [(parent, key, data, segments)]
        else:
            targets = [(root, key, value, (key,)) for key, value in data.items()]
        replaced = []
        for parent, key, _, where in targets:
            if isinstance(parent, List) or paths.contains(parent, key):
                if not replace:
                    raise Error(
                        f"{paths.join(where)}: already exists; nothing was imported. "
                        "Import elsewhere with --path, or pass --replace (replace=True) "
                        "to overwrite it"
                    )
                replaced.append(key)
        with _progress_bar(census.nodes, progress) as advance:
            savepoints = _Savepoints(root._p_jar, savepoint_every, advance)
            converter = Converter(
                NODES,
                root,
                prefix=segments[:-1],
                record=False,
                shared=census.shared,
                batch=savepoint_every,
                on_batch=savepoints,
            )
            for parent, key, value, _ in targets:
                parent[key] = converter.convert(value, key)
            advance(converter.made - savepoints.reported)
        return tuple(t[1] for t in targets), tuple(replaced), converter.made, savepoints.taken

    keys, replaced, objects, savepoints = store.run(attempt)
    return ImportResult(
        path=paths.join(segments),
        keys=keys,
        replaced=replaced,
        objects=objects,
        savepoints=savepoints,
        attempts=attempts,
        seconds=time.perf_counter() - started,
    )
