"""Importing an existing model into the store: JSON and pickle sources, and ``import_tree``.

Two jobs live here, each with its own half of the module:

* **Reading a source** (:func:`load_source`). JSON is parsed with the
  standard library and its errors are reported with file, line and column.
  Pickles are read with an allow-list unpickler: a pickle is a program, and
  the standard unpickler runs whatever callable the file names. Ours resolves
  only builtin containers and scalars, datetime and decimal types, plus the
  classes the caller names, and refuses every other global *before* anything
  is called, so a hostile file cannot run code.

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
import itertools
import json
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from persistent import Persistent

from .errors import Error, InputError, UnstorableValueError
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

FORMATS = ("json", "pickle")

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


def _load_pickle(file: Any, source: str, allow: Iterable[str | type]) -> Any:
    try:
        return AllowListUnpickler(file, allow=allow, source=source).load()
    except InputError:
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


def _guess_format(path: str, head: bytes) -> str:
    lowered = path.lower()
    if lowered.endswith(".json"):
        return "json"
    if lowered.endswith((".pickle", ".pkl", ".pck")):
        return "pickle"
    start = head.lstrip()[:1]
    if head[:1] == b"\x80" or start in (b"(", b"]", b"}", b"c", b"N"):
        return "pickle"
    if start in (b"{", b"[", b'"') or head.startswith(codecs.BOM_UTF8):
        return "json"
    raise InputError(
        f"{path}: cannot tell whether this is JSON or a pickle; pass --format json or "
        "--format pickle"
    )


def load_source(
    path: str | os.PathLike[str],
    format: str | None = None,  # noqa: A002 - the name users know from the CLI
    allow: Iterable[str | type] = (),
) -> Any:
    """Read a JSON file or a pickle into plain Python data, refusing anything hostile.

    ``format`` is ``"json"``, ``"pickle"`` or None to decide from the file
    name (``.json``, ``.pickle``/``.pkl``) or, failing that, from its first
    bytes. ``allow`` names extra classes a pickle may contain, as
    ``"module:Class"`` strings or as the classes themselves; nothing else
    beyond builtin containers and scalars, datetime and decimal is loaded.

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
    if text in ("", "/"):
        return []
    segments = text.strip("/").split("/")
    if any(not s for s in segments):
        raise Error(f"{path!r}: empty segment in the path; write it like accounts/a1")
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
                    on_path.add(id(child))
                    stack.append(_Frame(child, len(out)))
                    break
                else:
                    append(self._leaf(child, self._keys(prefix, stack, len(out))))
            else:
                stack.pop()
                on_path.discard(id(frame.source))
                node = self._finish(frame, stack)
                if not stack:
                    return node
                stack[-1].out.append(node)

    def _finish(self, frame: _Frame, stack: list[_Frame]) -> Any:
        node: Any
        source = frame.source
        if frame.is_dict:
            node = dict_node(source, frame.out)
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


def _count_containers(value: Any) -> int:
    """How many dicts and lists *value* holds (for the progress bar's total)."""
    if not isinstance(value, dict | list) or isinstance(value, Persistent):
        return 0
    count = 0
    stack = [(value, iter(value.values() if isinstance(value, dict) else value))]
    on_path = {id(value)}
    while stack:
        source, children = stack[-1]
        for child in children:
            if isinstance(child, dict | list) and not isinstance(child, Persistent):
                if id(child) in on_path:
                    return count  # a cycle: the import itself reports it
                on_path.add(id(child))
                stack.append((child, iter(child.values() if isinstance(child, dict) else child)))
                break
        else:
            stack.pop()
            on_path.discard(id(source))
            count += 1
    return count


@contextmanager
def _progress_bar(total: int | None, show: bool) -> Iterator[Callable[[int], Any]]:
    if not show:
        yield lambda n: None
        return
    import sys

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
) -> ImportResult:
    """Store the plain tree *data* at *path*, converted to the tree's persistent form, atomically.

    At ``"/"`` *data* must be a mapping and each of its keys becomes a key of
    the root (other keys of the root are left alone). Elsewhere *data*
    becomes the value at *path*; missing mappings on the way are created.
    Without ``replace``, a key that already exists is an error naming it;
    with it, the old value is replaced.

    Conversion follows :func:`snaptree.to_persistent`: dicts become
    :class:`~snaptree.Mapping` (or :class:`~snaptree.FlatMapping` when their
    keys cannot be ordered), lists :class:`~snaptree.List`, sets frozensets,
    bytearrays bytes; scalars, tuples, datetimes, Decimals and the caller's
    own persistent objects are stored as they are.

    The import is one transaction: it commits entirely or not at all. Every
    ``savepoint_every`` containers an optimistic savepoint moves the work
    done so far out of memory. A conflict with concurrent writers retries
    the whole import under the store's retry policy, which is safe because
    *data* is only read, never consumed. ``progress`` shows a tqdm bar on
    stderr.
    """
    if savepoint_every < 1:
        raise ValueError(f"savepoint_every must be at least 1, not {savepoint_every}")
    segments = _split(path)
    if not segments and not isinstance(data, dict):
        raise UnstorableValueError(
            "/",
            f"only a mapping can be imported at the root (its keys become the root's keys), "
            f"not a {type(data).__name__}; give a path such as --path model",
        )
    total = _count_containers(data) if progress else None
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
