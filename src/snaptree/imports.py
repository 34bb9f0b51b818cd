"""Importing an existing model into the store: JSON and pickle sources, and ``import_tree``.

Two jobs live here, each with its own half of the module:

* **Reading a source** (:func:`load_source`). JSON is parsed with the
  standard library and its errors are reported with file, line and column;
  an import of a JSON *file* reads it as a stream instead
  (:mod:`snaptree._json_events`, :mod:`snaptree._json_stream`), so its
  size is not bounded by memory.
  Pickles are read with the allow-list unpickler of :mod:`snaptree._unpickler`:
  a pickle is a program, and the standard unpickler runs whatever callable
  the file names; ours resolves only builtin containers and scalars, datetime
  and decimal types, plus the classes the caller names, and refuses every
  other global *before* anything is called. A ZODB export (``.zexp``) is read
  record by record with the same unpickler (:func:`snaptree._zexp.read_zexp`,
  never ``Connection.importFile``) and rebuilt as the plain tree it holds.
  A pickle cannot be read as a stream (its opcodes may refer back to any
  object built before), so pickles and exports are loaded whole; everything
  after that is bounded. Sources compressed with zstd are read through
  :func:`snaptree._compression.open_for_reading`.

* **Storing a tree** (:func:`import_tree`). The tree is converted by the
  conversion every assignment uses (:mod:`snaptree._convert`): the same
  rules, the same errors, and the same sharing (an object the data reaches
  twice becomes one node reached twice). Before anything is built, data in
  memory is counted: what it would expand to when written out in full is
  capped, so that a few hundred bytes of pickle cannot become a dump of a
  billion objects. The conversion is bottom-up, so every few thousand nodes
  the finished subtrees are committed into a staging area readers never see
  (:mod:`snaptree._staging`) and leave memory; one last commit links the
  whole value into the tree, so the import is still all or nothing.
"""

from __future__ import annotations

import codecs
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from . import paths
from ._compression import ZSTD_SUFFIX, decompressor_error, open_for_reading
from ._convert import Census, Converter, census
from ._json_events import NotStreamableError, load_json
from ._json_events import events as json_events
from ._json_stream import JsonBuilder
from ._staging import StagedImport, Staging, list_staged, remove_abandoned
from ._unpickler import load_pickle
from ._zexp import ZEXP_HEADER, read_zexp
from .errors import ArgumentError, Error, InputError, UnstorableValueError
from .tree import NODES, FlatMapping, List, Mapping

log = logging.getLogger(__name__)

#: Nodes made between two commits into the staging area of a large import.
DEFAULT_COMMIT_EVERY = 10_000

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


def _guess_format(path: str, head: bytes) -> str:
    lowered = path.lower().removesuffix(ZSTD_SUFFIX)
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


def source_format(name: str, format: str | None) -> str:  # noqa: A002
    """*format* checked, or the format of the file *name* from its name and first bytes."""
    if format is not None:
        if format not in FORMATS:
            raise ArgumentError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
        return format
    try:
        with open_for_reading(name) as file:
            return _guess_format(name, file.read(64))
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror or exc}") from None
    except decompressor_error() as exc:
        raise _damaged_zstd(name, exc) from None


def _damaged_zstd(name: str, exc: Exception) -> InputError:
    return InputError(f"{name}: the zstd compression is damaged: {exc}")


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
    and persistent containers they are made of). A file compressed with
    zstd (``model.json.zst``) is decompressed as it is read.

    The whole file and the whole result are in memory: fine for a model of
    a few hundred megabytes. To import a larger JSON file, give its path to
    :func:`import_tree` (``store.import_tree(Path(...))``), which reads it as
    a stream.

    Raises :class:`snaptree.InputError` naming the file and, for JSON, the
    line and column of the first error.
    """
    name = os.fspath(path)
    format = source_format(name, format)  # noqa: A001
    try:
        with open_for_reading(name) as file:
            if format == "pickle":
                return load_pickle(file, name, allow)
            if format == "zodb":
                return read_zexp(file, name, allow)[0]
            raw = file.read()
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror or exc}") from None
    except decompressor_error() as exc:
        raise _damaged_zstd(name, exc) from None
    return load_json(raw, name)


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
    #: Nodes created: one per distinct dict, list and set in the data (per JSON object and array).
    objects: int
    #: Batches committed into the staging area before the final commit (0: one commit did all).
    batches: int
    #: Attempts of the final commit (more than one when a conflict with another writer forced one).
    attempts: int
    #: Wall-clock seconds: conversion and commits, and reading a file given as a path;
    #: loading a source with :func:`load_source` beforehand is not included.
    seconds: float

    @property
    def savepoints(self) -> int:
        """The old name of :attr:`batches` (deprecated): what moved the work out of memory."""
        warnings.warn("ImportResult.savepoints is now .batches", DeprecationWarning, stacklevel=2)
        return self.batches


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


def _refuse_existing(
    root: Mapping, segments: tuple[str, ...], keys: Iterable[Any], replace: bool
) -> None:
    """Fail early, reading only: a path that cannot be reached, or a key that exists.

    For a path, *keys* is ignored: its last segment is the key. At the root,
    *keys* are the data's keys. It runs in the first batch's store call,
    before anything is staged; the final commit checks again (another writer
    may add a key meanwhile), so this check only spares building what that
    commit would refuse. (Not in a snapshot before the import: that would
    leave an idle connection in ZODB's pool, which keeps the id of every
    object the import commits until it is used again.)
    """
    if not segments:
        if not replace:
            for key in keys:
                if paths.contains(root, key):
                    raise _exists((key,))
        return
    node: Any = root
    for depth in range(len(segments) - 1):
        key = _key_in(node, segments, depth)
        node = node[key] if isinstance(node, List) else node.get(key, _MISSING)
        if node is _MISSING:
            return  # created by the import
    key = _key_in(node, segments, len(segments) - 1)
    if not replace and (isinstance(node, List) or paths.contains(node, key)):
        raise _exists(segments)


def _exists(where: Iterable[Any]) -> Error:
    return Error(
        f"{paths.join(where)}: already exists; nothing was imported. "
        "Import elsewhere with --path, or pass --replace (replace=True) to overwrite it"
    )


def _check_expansion(census: Census, max_objects: int | None) -> None:
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


class _Import:
    """One import under way: its batches into the staging area, then the commit that links it.

    A builder (the :class:`~snaptree._convert.Converter` for plain data, the
    :class:`~snaptree._json_stream.JsonBuilder` for a JSON file) calls
    :meth:`batch` every ``commit_every`` nodes; each batch is one store call
    that commits the nodes finished so far into the staging area
    (:mod:`snaptree._staging`). :meth:`link` then puts the value into the
    tree in one store call, retried on conflicts like any other: what it
    links is committed already, or (for an import smaller than one batch)
    is new objects that ZODB's abort leaves intact for the next attempt.
    """

    def __init__(
        self,
        store: Any,
        segments: tuple[str, ...],
        replace: bool,
        source: str,
        advance: Callable[[int], Any],
    ) -> None:
        self.store = store
        self.segments = segments
        self.replace = replace
        self.staging = Staging(source, paths.join(segments))
        self.top_keys: Iterable[Any] = ()  # the data's keys, for an import at the root
        self.attempts = 0
        self._advance = advance
        self._reported = 0

    def batch(self, builder: Any) -> None:
        """Commit what *builder* finished into the staging area (the builders' ``on_batch``)."""
        self.store.run(self._add_batch, builder)
        builder.settled()
        self.staging.batch_committed()
        self._advance(builder.made - self._reported)
        self._reported = builder.made

    def _add_batch(self, root: Mapping, builder: Any) -> None:
        # First: the nodes of earlier batches belong to one connection, and
        # pending() may change one of them (a wide mapping's node).
        self.staging.own(root)
        if not self.staging.started:
            _refuse_existing(root, self.segments, self.top_keys, self.replace)
        new_top_keys = getattr(builder, "new_top_keys", None)
        if new_top_keys is not None and not self.segments:
            _refuse_existing(root, (), new_top_keys(), self.replace)
        self.staging.add_batch(root, builder.pending())

    def link(self, value: Any, made: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """Put *value* into the tree (at the root: its items), in one retried store call."""
        self._advance(made - self._reported)
        return self.store.run(self._link, value)

    def _link(self, root: Mapping, value: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        self.attempts += 1
        if self.staging.started:
            self.staging.own(root)
            self.staging.entry(root)  # still there: nobody took it for abandoned
        keys, replaced = _put(root, self.segments, value, self.replace)
        self.staging.drop(root)
        remove_abandoned(root)
        return keys, replaced

    def abandon(self) -> None:
        """After a failure: delete the staging entry now (else the next import removes it)."""
        if not self.staging.started:
            return
        try:
            self.store.run(self.staging.drop)
        except Exception:  # the failure that brought us here is the one to report
            log.warning(
                "could not remove the staging area of a failed import (%s); the next import "
                "into %s removes it once this process has ended",
                self.staging.id,
                self.store.source,
                exc_info=True,
            )


def _put(
    root: Mapping, segments: tuple[str, ...], value: Any, replace: bool
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Assign *value* at *segments* (at the root: each of its items); return keys and replaced."""
    if segments:
        parent, key = _locate(root, segments)
        targets = [(parent, key, value, segments)]
    else:
        targets = [(root, key, item, (key,)) for key, item in value.items()]
    replaced = []
    for parent, key, _, where in targets:
        if isinstance(parent, List) or paths.contains(parent, key):
            if not replace:
                raise _exists(where)
            replaced.append(key)
    for parent, key, item, _ in targets:
        parent[key] = item
    return tuple(t[1] for t in targets), tuple(replaced)


def import_tree(
    store: Any,
    data: Any,
    *,
    path: str = "/",
    replace: bool = False,
    commit_every: int = DEFAULT_COMMIT_EVERY,
    progress: bool = False,
    max_objects: int | None = None,
    format: str | None = None,  # noqa: A002 - the name users know from the CLI
    allow: Iterable[str | type] = (),
    savepoint_every: int | None = None,
) -> ImportResult:
    """Store *data* at *path*, converted to the tree's persistent form: all of it, or nothing.

    *data* is a plain tree in memory, or a file to read: any ``os.PathLike``
    (a :class:`pathlib.Path`; a ``str`` is data, never a file name). A JSON
    file is read as a stream, in bounded memory however large; a pickle or a
    ZODB export is read whole first (:func:`load_source`; ``format`` and
    ``allow`` are its arguments).

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

    Every ``commit_every`` nodes, the nodes finished so far are committed
    into a staging area that readers never see (:mod:`snaptree._staging`),
    so memory stays flat; one final commit links the whole value into the
    tree, so a reader sees all of it or none of it. That commit is retried
    on conflicts under the store's retry policy, and checks again that the
    target keys are free. A failure, a crash or a kill at any point leaves
    the tree as it was; what the batches committed is removed from the
    staging area (at the latest by the next import) and its space reclaimed
    by the next pack. Data holding persistent objects of the caller's own
    classes is imported in one transaction instead, without batches: a
    failed import must leave them unsaved, as they were.

    ``progress`` shows a tqdm bar on stderr. Before anything is built, data
    in memory is counted as it would be written out in full (each object at
    every place it is reached: what a pickle or JSON dump of the tree
    writes), and the import is refused with :class:`~snaptree.InputError`
    when that exceeds ``max_objects``; by default, the larger of
    ``EXPANSION_FLOOR`` and ``EXPANSION_FACTOR`` times the distinct dicts,
    lists and tuples in *data*, so that data without shared containers is
    never refused and a few hundred bytes of pickle cannot make a tree whose
    dumps hold a billion objects. JSON shares nothing: for a JSON file
    ``max_objects`` only caps the objects made. ``savepoint_every`` is the
    old name of ``commit_every`` (deprecated).
    """
    if savepoint_every is not None:
        warnings.warn(
            "import_tree(savepoint_every=N) is now commit_every=N: an import commits its "
            "batches into a staging area instead of taking savepoints",
            DeprecationWarning,
            stacklevel=3,  # through Store.import_tree
        )
        commit_every = savepoint_every
    if isinstance(commit_every, bool) or not isinstance(commit_every, int) or commit_every < 1:
        raise ArgumentError(f"commit_every must be an int of at least 1, not {commit_every!r}")
    if max_objects is not None and (type(max_objects) is not int or max_objects < 1):
        raise ArgumentError(f"max_objects must be a positive int or None, not {max_objects!r}")
    segments = paths.parse(path, what="import path")
    started = time.perf_counter()
    source = "data in memory"
    if isinstance(data, os.PathLike):
        source = os.fspath(data)
        format = source_format(source, format)  # noqa: A001
        if format == "json":
            try:
                return _import_json(
                    store, source, segments, replace, commit_every, progress, max_objects, started
                )
            except NotStreamableError as exc:
                log.warning("%s; reading the whole file with Python's json instead", exc)
        data = load_source(source, format, allow)
    elif format is not None or allow:
        raise ArgumentError(
            "format and allow apply to a file, and the data is not one: give the file as a "
            "pathlib.Path (a str is imported as a string)"
        )
    if not segments and not isinstance(data, dict):
        raise UnstorableValueError(
            "/",
            f"only a mapping can be imported at the root (its keys become the root's keys), "
            f"not a {type(data).__name__}; give a path such as --path model",
        )
    counted = census(data)
    _check_expansion(counted, max_objects)
    with _progress_bar(counted.nodes, progress) as advance:
        work = _Import(store, segments, replace, source, advance)
        work.top_keys = () if segments else data.keys()
        if counted.persistent:
            keys, replaced, made = _in_one_transaction(work, data, counted)
        else:
            converter = Converter(
                NODES,
                prefix=segments[:-1],
                record=False,
                shared=counted.shared,
                batch=commit_every,
                on_batch=work.batch,
            )
            try:
                value = (
                    converter.convert(data, segments[-1]) if segments else converter.convert(data)
                )
                data = None  # nothing needs it any more: a retried link reuses the nodes
                keys, replaced = work.link(value, converter.made)
            except BaseException:
                work.abandon()
                raise
            made = converter.made - (0 if segments else 1)  # at the root, the data's own
    return ImportResult(
        path=paths.join(segments),
        keys=keys,
        replaced=replaced,
        objects=made,
        batches=work.staging.batches,
        attempts=work.attempts,
        seconds=time.perf_counter() - started,
    )


def _in_one_transaction(work: _Import, data: Any, counted: Census) -> tuple[Any, Any, int]:
    """The import of data holding the caller's persistent objects: one transaction, no batches.

    A batch commit would give them an oid and a connection; if the import
    then failed, the caller would be left holding objects that belong to a
    database they are not in. In one transaction, ZODB's abort gives them
    back unsaved. Each attempt converts again from the data, which is only
    read.
    """
    segments = work.segments
    made = 0

    def attempt(root: Mapping) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        nonlocal made
        work.attempts += 1
        converter = Converter(
            NODES, root, prefix=segments[:-1], record=False, shared=counted.shared
        )
        if segments:
            value = converter.convert(data, segments[-1])
        else:
            value = {key: converter.convert(item, key) for key, item in data.items()}
        made = converter.made
        return _put(root, segments, value, work.replace)

    keys, replaced = work.store.run(attempt)
    return keys, replaced, made


def _import_json(
    store: Any,
    name: str,
    segments: tuple[str, ...],
    replace: bool,
    commit_every: int,
    progress: bool,
    max_objects: int | None,
    started: float,
) -> ImportResult:
    """Import a JSON file read as a stream (see :mod:`snaptree._json_stream`)."""
    with _progress_bar(None, progress) as advance:
        work = _Import(store, segments, replace, name, advance)
        builder = JsonBuilder(
            NODES,
            batch=commit_every,
            on_batch=work.batch,
            max_objects=max_objects,
            name=name,
            root_only=not segments,
        )
        try:
            for block in json_events(name, name):
                builder.feed(block)
            keys, replaced = work.link(builder.result, builder.made)
        except BaseException:
            work.abandon()
            raise
    return ImportResult(
        path=paths.join(segments),
        keys=keys,
        replaced=replaced,
        objects=builder.made - (0 if segments else 1),
        batches=work.staging.batches,
        attempts=work.attempts,
        seconds=time.perf_counter() - started,
    )


def staged_imports(store: Any) -> list[StagedImport]:
    """The imports under way in *store*'s staging area, and what dead ones left there.

    An entry whose ``abandoned`` is true is removed by the next import; it
    holds nothing the tree refers to.
    """
    with store.snapshot() as snap:
        return list_staged(snap.root)
