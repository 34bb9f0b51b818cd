"""The json format: the tree as JSON, streamed, naming the path of any value JSON cannot hold.

Mappings become objects, lists and tuples arrays, counters numbers. A value
JSON cannot hold (bytes, a datetime, NaN, a tuple key, a lone surrogate, an
int too long to turn into text) is an :class:`UnstorableValueError` naming
its path, and nothing is written under the dump's name. The writer recurses,
one Python frame a level of the tree.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from persistent import Persistent
from ZODB.broken import Broken
from ZODB.Connection import Connection

from ._atomic import HashingWriter
from ._plain_nodes import NodeCount, Prefetcher, broken_object_error
from .errors import ExportError, UnstorableValueError
from .tree import Counter, FlatMapping, List, Mapping

_JSON_SCALARS = (str, int, float, bool, type(None))
_JSON_KEYS = (str, int)
#: Characters gathered before they are handed to the file.
_WRITE_EVERY = 1 << 16


def write_json(node: Any, out: HashingWriter, connection: Connection, where: str) -> int:
    """Write *node* (the subtree *where*) to *out* as one JSON document; return nodes written."""
    writer = _JsonWriter(out, NodeCount(connection, where, "json"), Prefetcher(connection))
    try:
        writer.write(node, where.rstrip("/"))
    except RecursionError:
        raise ExportError(
            f"{where} is nested too deeply for the json writer "
            f"(about {sys.getrecursionlimit() // 2} levels); export it as pickle or zodb"
        ) from None
    writer.finish()
    return writer.count.nodes


class _JsonWriter:
    """Streams a tree as JSON; *path* arguments are where a value is, for error messages."""

    def __init__(self, out: HashingWriter, count: NodeCount, prefetcher: Prefetcher) -> None:
        self._out = out
        self._prefetcher = prefetcher if prefetcher.enabled else None
        self._parts: list[str] = []
        self._size = 0
        self.count = count
        self._encode = json.JSONEncoder(
            ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False
        ).encode

    def _emit(self, text: str) -> None:
        self._parts.append(text)
        self._size += len(text)
        if self._size > _WRITE_EVERY:
            self._flush()

    def _flush(self) -> None:
        if self._parts:
            self._out.write("".join(self._parts).encode())
            self._parts = []
            self._size = 0

    def finish(self) -> None:
        self._emit("\n")
        self._flush()

    def _scalar(self, value: Any, path: str) -> str:
        if type(value) is float and not math.isfinite(value):
            raise UnstorableValueError(path, f"JSON cannot hold the float {value!r}")
        if isinstance(value, _JSON_SCALARS) and not isinstance(value, Persistent):
            try:
                return _utf8_safe(self._encode(value), path)
            except ValueError:  # int() -> str past sys.get_int_max_str_digits()
                raise UnstorableValueError(path, _long_int_detail()) from None
        if isinstance(value, Broken):
            raise broken_object_error(value, path)
        raise UnstorableValueError(
            path,
            f"JSON cannot hold a {type(value).__module__}.{type(value).__qualname__}; "
            "export this tree as pickle or zodb, or store it as str/int/float",
        )

    def _key(self, key: Any, path: str) -> str:
        if not isinstance(key, _JSON_KEYS) or isinstance(key, bool):
            raise UnstorableValueError(
                f"{path}/{key!r}",
                f"JSON object keys are strings; cannot write the {type(key).__name__} key {key!r}",
            )
        try:
            # As json.dumps writes a key: a str subclass's text and an int subclass's digits,
            # not their str() (a mixed-in Enum's is "Color.RED", where its value is "red").
            text = str.__str__(key) if isinstance(key, str) else int.__repr__(key)
            return _utf8_safe(self._encode(text), f"{path}/{key!r}")
        except ValueError:  # an int key past sys.get_int_max_str_digits()
            raise UnstorableValueError(f"{path}/<int key>", _long_int_detail()) from None

    def write(self, value: Any, path: str) -> None:
        if isinstance(value, Mapping | FlatMapping | dict):
            if isinstance(value, Persistent):
                self.count.add(value._p_oid)
            items = value.items()
            if isinstance(value, Mapping):
                if self._prefetcher is not None:
                    items = self._prefetcher.items(value)
                # Small leaf mappings (the common case: a record, one bucket held
                # inline) go through the C encoder in one call; others item by item.
                items = list(items) if _one_bucket(value) else items
                if isinstance(items, list) and all(
                    type(v) in _JSON_SCALARS and type(k) in _JSON_KEYS for k, v in items
                ):
                    try:
                        text = self._encode(dict(items))
                        if text.isascii() or _encodes(text):
                            self._emit(text)
                            return
                    except (TypeError, ValueError):
                        pass  # find and name the offending value below
            self._emit("{")
            first = True
            # A BTree's keys are all str or all int; other mappings may hold 1 and "1",
            # which JSON would write as one key twice: json.load keeps only the last.
            written: set[str] | None = None if isinstance(value, Mapping) else set()
            for key, item in items:
                key_text = self._key(key, path)
                child = f"{path}/{key}"
                if written is not None:
                    if key_text in written:
                        raise UnstorableValueError(
                            f"{path}/{key!r}",
                            f"JSON object keys are strings: the key {key!r} is written as "
                            f"{key_text}, as another key of this mapping is, and loading "
                            "would keep one of them; export this tree as pickle or zodb",
                        )
                    written.add(key_text)
                self._emit(("" if first else ",") + key_text + ":")
                first = False
                # inline rather than a helper: one Python frame per level of the tree
                if type(item) in _JSON_SCALARS:
                    self._emit(self._scalar(item, child))
                else:
                    self.write(item, child)
            self._emit("}")
        elif isinstance(value, List | list | tuple):
            if isinstance(value, Persistent):
                self.count.add(value._p_oid)
            self._emit("[")
            if self._prefetcher is not None and isinstance(value, List):
                value = self._prefetcher.values(value.data)
            for index, item in enumerate(value):
                if index:
                    self._emit(",")
                if type(item) in _JSON_SCALARS:
                    self._emit(self._scalar(item, f"{path}/{index}"))
                else:
                    self.write(item, f"{path}/{index}")
            self._emit("]")
        elif isinstance(value, Counter):
            self.count.add(value._p_oid)
            self._emit(self._scalar(value.value, path))
        else:
            self._emit(self._scalar(value, path))


def _one_bucket(mapping: Mapping) -> bool:
    """Whether *mapping* (a BTree) is small: empty, or one bucket held in its own record."""
    state = mapping.__getstate__()
    return state is None or len(state) == 1


def _encodes(text: str) -> bool:
    """Whether *text* is valid UTF-8 once encoded: no lone surrogates (``"\\ud800"``)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _utf8_safe(text: str, path: str) -> str:
    if text.isascii() or _encodes(text):
        return text
    raise UnstorableValueError(
        path,
        "a string holding a lone surrogate (such as '\\ud800'), which UTF-8, and so a "
        "JSON file, cannot hold; export this tree as pickle or zodb, or store the text "
        "without it",
    )


def _long_int_detail() -> str:
    return (
        f"an int of more than {sys.get_int_max_str_digits()} digits, which Python will "
        "not turn into JSON text (nor read back); export this tree as pickle or zodb, "
        "or store it as a string"
    )
