"""The pickle format, written by the C pickler: ``pickle.load`` gives the tree as plain data.

snaptree mappings become dicts, lists lists, sets sets, counters ints; the
user's own classes stay themselves. The pickler converts the persistent
containers *while* it writes (``reducer_override``), so no plain copy of
the tree is ever built, and its :class:`NodeCount` trims the ZODB cache as
it goes, so a tree far larger than the cache is written in bounded memory.

This is the writer of one-off exports. Repeated exports (the exporter
process) use :mod:`snaptree._pickle_fragments`, which reuses what the last
export wrote for every node that did not change and falls back to this one
for trees nested too deeply for it.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterator
from typing import Any

from persistent import Persistent
from ZODB.broken import Broken
from ZODB.Connection import Connection

from ._atomic import HashingWriter
from ._plain_nodes import NodeCount, Prefetcher, broken_object_error
from .errors import ExportError
from .tree import Counter, FlatMapping, List, Mapping, Set

#: Pickle protocol: 4 or more frames the output, which lets the C pickler
#: hand each 64 KiB frame to the file as it goes instead of buffering it all.
PROTOCOL = 5


class PlainPickler(pickle.Pickler):
    """Writes snaptree nodes as dicts, lists, sets and ints while it pickles.

    ``reducer_override`` is only consulted for objects the C pickler has no
    fast path for (never for str, int, dict, list, tuple ...), so plain
    values inside the tree cost what they cost in ``pickle.dump``. A Mapping's
    items are handed over as an iterator: its BTree buckets are loaded one
    at a time, and *count* trims the cache every few thousand nodes.
    """

    def __init__(
        self,
        file: Any,
        count: NodeCount,
        prefetcher: Prefetcher | None = None,
        *,
        memo: bool = False,
    ) -> None:
        super().__init__(file, protocol=PROTOCOL)
        # No memo: with one, the pickler would hold every container and string
        # it wrote until the end (with protocol 4+ it cannot be cleared midway
        # without corrupting the stream), and memory would grow with the tree:
        # measured at about 570 bytes per object. Without it, an object
        # reachable twice is written twice (NodeCount bounds how often), and it
        # cannot write a cycle. *memo* is for the trees it fails on (MemoNeeded).
        self.fast = not memo
        self._add = count.add
        self._reducers = MEMO_REDUCERS if memo else PLAIN_REDUCERS
        if prefetcher is not None and prefetcher.enabled:  # (items follow their container)
            self._reducers = prefetching_reducers(prefetcher)

    def reducer_override(self, obj: Any) -> Any:
        # Exact-type dispatch first: isinstance() against these ABC-backed
        # classes costs more than the rest of this method together.
        kind = type(obj)
        reduce = self._reducers.get(kind)
        if reduce is None:
            if kind is type:  # dict and list, named by every node's reduction: one call in two
                return NotImplemented
            reduce = subclass_reducer(obj)
            if reduce is None:
                return NotImplemented
        self._add(obj._p_oid)
        return reduce(obj)


def reduce_mapping(obj: Any) -> Any:
    return (dict, (), None, None, iter(obj.items()))


def _reduce_flat(obj: Any) -> Any:
    return (dict, (obj.data,))


def _reduce_list(obj: Any) -> Any:
    return (list, (obj.data,))


def _reduce_counter(obj: Any) -> Any:
    return (int, (obj.value,))


def _reduce_set(obj: Any) -> Any:
    return (set, (list(obj.data),))


def reduce_own_class(obj: Any) -> Any:
    return NotImplemented  # the user's own persistent class, pickled as itself


#: How each snaptree node is written: the plain type it becomes, and its items.
PLAIN_REDUCERS: dict[type, Callable[[Any], Any]] = {
    Mapping: reduce_mapping,
    FlatMapping: _reduce_flat,
    List: _reduce_list,
    Set: _reduce_set,
    Counter: _reduce_counter,
}


#: PLAIN_REDUCERS for a pickler with a memo, which may meet a node again inside itself
#: (a cycle through your own objects): a list's or flat mapping's items follow the
#: container, which the pickler memoizes first. Given whole as the argument, the items
#: were pickled before it: met again inside them, the node was written from its data
#: list as far as that had been written (nothing), and loaded back empty.
MEMO_REDUCERS: dict[type, Callable[[Any], Any]] = {
    **PLAIN_REDUCERS,
    FlatMapping: lambda obj: (dict, (), None, None, iter(obj.data.items())),
    List: lambda obj: (list, (), None, iter(obj.data)),
}


def prefetching_reducers(prefetcher: Prefetcher) -> dict[type, Callable[[Any], Any]]:
    """PLAIN_REDUCERS whose containers hand their items over as the prefetcher loads them.

    The same plain values, pickled with other opcodes (a list's items appended
    to an empty list rather than given whole): what loads is equal.
    """

    def mapping(obj: Any) -> Any:
        return (dict, (), None, None, prefetcher.items(obj))

    def flat(obj: Any) -> Any:
        values = prefetcher.values(list(obj.data.values()))
        return (dict, (), None, None, zip(obj.data, values, strict=True))

    def plain_list(obj: Any) -> Any:
        return (list, (), None, prefetcher.values(obj.data))

    return {**PLAIN_REDUCERS, Mapping: mapping, FlatMapping: flat, List: plain_list}


def subclass_reducer(obj: Any) -> Callable[[Any], Any] | None:
    """The reducer of an object whose exact type is not a snaptree node; None: not persistent."""
    for base, reduce in PLAIN_REDUCERS.items():
        if isinstance(obj, base):
            return reduce
    if isinstance(obj, Broken):
        raise broken_object_error(obj)
    if isinstance(obj, Persistent):
        return reduce_own_class
    return None


class MemoNeeded(Exception):
    """The memo-less pickler cannot write this tree: write it again with a memo.

    A cycle (through your own persistent objects) needs the memo, as it does
    in ``pickle.dump``. And CPython's C pickler (3.11 at least, gh-146059)
    never leaves a frozenset in its memo-less mode: past 50 frozensets it
    loses count of what it is inside and raises KeyError as it leaves a
    container, or reports a cycle when it meets one of those frozensets
    again. With a memo it writes the tree, at the memo's cost in memory.
    """


@contextlib.contextmanager
def pickling_errors(where: str, too_deep: Exception, *, memo: bool = False) -> Iterator[None]:
    """Turn what a pickler raises on a bad tree into one clear ExportError (or *too_deep*,
    or MemoNeeded from a memo-less pickler)."""
    try:
        yield
    except RecursionError:
        raise too_deep from None
    except KeyError as exc:
        if memo:
            raise ExportError(f"cannot pickle the tree at {where}: {exc!r}") from exc
        raise MemoNeeded() from exc
    except ValueError as exc:
        if "cyclic" not in str(exc) or memo:
            raise
        raise MemoNeeded() from exc
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ExportError(f"cannot pickle the tree at {where}: {exc}") from exc


def write_pickle(
    node: Any, out: HashingWriter, connection: Connection, where: str, *, memo: bool = False
) -> int:
    """Write *node* (the subtree *where*) to *out* as one pickle; return the nodes written.

    One C frame a level of the tree, so it writes trees too deep for the
    fragment writer. *memo*: with the pickler's memo (see MemoNeeded).
    """
    count = NodeCount(connection, where, "pickle")
    prefetcher = Prefetcher(connection)
    # Without the memo, a cycle through your own persistent objects recurses without
    # end, as a tree nested too deeply does: both are written again with the memo, which
    # writes the cycle; a tree still too deep then is the error.
    too_deep: Exception = MemoNeeded()
    if memo:
        too_deep = ExportError(
            f"{where} is nested too deeply for the pickle writer; export it in the zodb format"
        )
    with pickling_errors(where, too_deep, memo=memo):
        PlainPickler(out, count, prefetcher, memo=memo).dump(node)
    return count.nodes
