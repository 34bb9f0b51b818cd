"""What a store call returns: its value read to the end inside the transaction.

A call's function may return anything, and it is returned after the
transaction ended and the connection went back to the pool. Whatever in it
still reads the tree (a node, a view or an iterator over one, a lazy BTree
sequence) would then show the state of whichever call uses that connection
next. So :func:`detach` reads the result to the end inside the transaction:
nodes become plain copies, views become the same kind of view over a plain
copy, iterators become iterators over plain copies, and what cannot be read
in advance (a generator, a coroutine) is refused. The walk keeps its own
stack: a tree may be nested deeper than Python's recursion limit.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import datetime
import gc
import inspect
import io
import itertools
import types
from collections.abc import (
    Callable,
    Generator,
    ItemsView,
    Iterable,
    Iterator,
    MappingView,
    ValuesView,
)
from typing import Any

from BTrees.OOBTree import TreeItems, TreeItemsPy
from persistent import Persistent

from . import paths
from ._values import rebuilt_tuple
from .errors import MisuseError
from .tree import Mapping, to_plain

#: Items a returned iterator may yield; each is read inside the transaction.
MAX_RETURNED_ITEMS = 1_000_000

_ATOMS: frozenset[type] = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        range,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
    }
)
_SEQUENCES = (list, tuple, set, frozenset, collections.deque)
_DICTS = (dict, types.MappingProxyType)
_BTREE_SEQUENCES = (TreeItems, TreeItemsPy)


def _is_node(value: Any) -> bool:
    """A snaptree container (their class paths are fixed: they are in every database)."""
    return isinstance(value, Persistent) and type(value).__module__ == "snaptree.tree"


def _view_mapping(view: MappingView) -> Any:
    """The mapping behind a view: ``_mapping`` (collections.abc views), ``mapping`` (dict's)."""
    mapping = getattr(view, "_mapping", None)
    return getattr(view, "mapping", None) if mapping is None else mapping


def _is_lazy(value: Any) -> bool:
    """Whether *value* reads its data only when iterated (so after the transaction)."""
    if (
        isinstance(value, _BTREE_SEQUENCES)
        or inspect.iscoroutine(value)
        or inspect.isasyncgen(value)
    ):
        return True
    return isinstance(value, Iterator) and not isinstance(value, io.IOBase)


def _needs_copy(value: Any, *, inside_objects: bool = True) -> bool:
    """Whether *value* holds anything :func:`detach` must copy, read ahead or refuse.

    With *inside_objects*, the objects of other types met on the way are
    looked into one level (what they refer to directly: a SimpleNamespace's
    attributes, a partial's arguments), not further: an object that holds the
    store or a service holding it is not a node returned.
    """
    stack, seen = [(value, inside_objects)], set()
    while stack:
        item, look_inside = stack.pop()
        if type(item) in _ATOMS or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Persistent) or _is_lazy(item):
            return True
        if isinstance(item, _DICTS):
            stack.extend((part, look_inside) for part in item)
            stack.extend((part, look_inside) for part in item.values())
        elif isinstance(item, _SEQUENCES):
            stack.extend((part, look_inside) for part in item)
        elif isinstance(item, MappingView):
            mapping = _view_mapping(item)
            if mapping is None:
                return True
            stack.append((mapping, look_inside))
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend((getattr(item, f.name), look_inside) for f in dataclasses.fields(item))
        elif look_inside:
            stack.extend((part, False) for part in _referents(item))
    return False


#: What an object of another type may refer to that is never data of the tree.
_NOT_DATA = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.CodeType,
)


def _referents(item: Any) -> list[Any]:
    """What *item* refers to directly, its class and code left out."""
    return [part for part in gc.get_referents(item) if not isinstance(part, _NOT_DATA)]


def detach_error(error: BaseException) -> None:
    """Replace the tree nodes an exception carries (its args, its attributes) by plain copies.

    ``raise InsufficientFunds(account)`` hands the caller the node, which
    would show whatever later calls of this thread load into it. Done before
    the call's transaction is aborted, so the copies hold what the function
    saw. Best effort: a value that cannot be copied is left as it is.
    """
    try:
        if _needs_copy(error.args, inside_objects=False):
            error.args = detach(error.args)
        for name, value in list(getattr(error, "__dict__", {}).items()):
            if type(value) not in _ATOMS and _needs_copy(value, inside_objects=False):
                setattr(error, name, detach(value))
    except Exception:  # the error the caller gets matters more than its copies
        pass


def detach(result: Any) -> Any:
    """*result* as data that no longer reads the tree; unchanged if it never did."""
    if type(result) in _ATOMS or not _needs_copy(result):
        return result
    memo: dict[int, Any] = {}
    stack = [_copy(result, memo)]
    sent = None
    while True:
        try:
            part = stack[-1].send(sent)
        except StopIteration as done:
            stack.pop()
            if not stack:
                return done.value
            sent = done.value
        else:
            stack.append(_copy(part, memo))
            sent = None


_IN_PROGRESS = object()


def _copy(value: Any, memo: dict[int, Any]) -> Generator[Any, Any, Any]:
    """One value of :func:`detach`: yields its parts, is sent their copies, returns its copy.

    ``memo`` maps what was already copied to its copy, so shared parts stay
    shared and lists or dicts that contain themselves are copied as such.
    """
    if type(value) in _ATOMS:
        return value
    key = id(value)
    if key in memo:
        if memo[key] is _IN_PROGRESS:
            raise MisuseError(
                "the returned value contains itself through a tuple or a set; "
                "return it without that cycle"
            )
        return memo[key]
    if _is_node(value):
        memo[key] = out = _plain_node(value)
        return out
    if isinstance(value, Persistent):
        raise _foreign_persistent(value, None)
    if isinstance(value, _DICTS):
        out = {} if type(value) in _DICTS else copy.copy(value)  # keeps a defaultdict's factory
        memo[key] = out
        for k, v in value.items():
            if isinstance(k, Persistent):
                raise MisuseError(
                    "the returned value uses a tree node as a dictionary key; nodes come "
                    "back as plain dicts and lists, which cannot be keys: use its key instead"
                )
            out[k] = v if type(v) in _ATOMS else (yield v)
        return out
    if isinstance(value, list | collections.deque):
        out = [] if type(value) is list else copy.copy(value)  # keeps a deque's maxlen
        out.clear()
        memo[key] = out
        for item in value:
            out.append(item if type(item) in _ATOMS else (yield item))
        return out
    if isinstance(value, tuple | set | frozenset):
        memo[key] = _IN_PROGRESS
        items = []
        for item in value:
            items.append(item if type(item) in _ATOMS else (yield item))
        memo[key] = out = _rebuild(value, items)
        return out
    if isinstance(value, MappingView):
        mapping = _view_mapping(value)
        if mapping is None:
            return (yield list(value))
        if isinstance(mapping, types.MappingProxyType):
            mapping = dict(mapping)  # a dict view: copy the dict it shows
        plain = yield mapping
        if isinstance(value, ItemsView):
            return plain.items()
        return plain.values() if isinstance(value, ValuesView) else plain.keys()
    if inspect.isgenerator(value) and not _iterates_a_node(value):
        value.close()
        raise MisuseError(
            "the function returned a generator; it would run after the transaction "
            "ended and read whatever the store holds then: return list(...) of it instead"
        )
    if inspect.iscoroutine(value) or inspect.isasyncgen(value):
        kind = "coroutine" if inspect.iscoroutine(value) else "async generator"
        if inspect.iscoroutine(value):
            value.close()  # never started: closing it only silences "never awaited"
        raise MisuseError(
            f"the function returned a {kind} (from an async def?); it cannot run inside "
            "the store's transaction: make it a plain function"
        )
    if _is_lazy(value):
        items = list(itertools.islice(value, MAX_RETURNED_ITEMS + 1))
        if len(items) > MAX_RETURNED_ITEMS:
            raise MisuseError(
                f"the function returned an iterator of more than {MAX_RETURNED_ITEMS:,} "
                "items; an iterator is read to its end inside the transaction, so it "
                "must end: return a list (or a slice) of what you need"
            )
        out = yield items
        return out if isinstance(value, _BTREE_SEQUENCES) else iter(out)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            if _needs_copy(getattr(value, field.name)):
                raise MisuseError(
                    f"the function returned a {type(value).__qualname__} whose field "
                    f"{field.name!r} holds a tree node, or a view or iterator over one; it "
                    "would outlive its transaction: put snaptree.to_plain(...) or "
                    "list(...) of it in the field instead"
                )
    elif any(_needs_copy(part, inside_objects=False) for part in _referents(value)):
        raise MisuseError(
            f"the function returned a {type(value).__qualname__} that holds a tree node, "
            "or a view or iterator over one; snaptree copies nodes only inside dicts, "
            "lists, tuples, sets and dataclasses, and this one would outlive its "
            "transaction and show later changes: put snaptree.to_plain(...) of it there"
        )
    return value


def _rebuild(value: tuple | set | frozenset, items: list[Any]) -> Any:
    if isinstance(value, tuple):
        return rebuilt_tuple(value, items)
    kind = type(value)
    try:
        return kind(items)
    except TypeError:
        raise MisuseError(
            f"the returned {kind.__name__} holds tree nodes; they come back as plain dicts "
            "and lists, which cannot be in a set: return a list instead"
        ) from None


def _iterates_a_node(generator: Generator[Any, Any, Any]) -> bool:
    """Whether *generator* is a node's own iteration (``iter(node)``), which runs no user code.

    Either snaptree's node module made it, or it is a method a node class
    inherits (``collections.abc.Sequence.__iter__``) running on a node.
    """
    frame = generator.gi_frame
    if frame is None:
        return False
    if frame.f_globals.get("__name__") == Mapping.__module__:
        return True
    owner = inspect.getgeneratorlocals(generator).get("self")
    if not _is_node(owner):
        return False
    return any(
        getattr(member, "__code__", None) is generator.gi_code
        for cls in type(owner).__mro__
        for member in vars(cls).values()
    )


def _plain_node(node: Any) -> Any:
    _check_returnable(node)
    return to_plain(node)


def _foreign_persistent(value: Any, path: str | None) -> MisuseError:
    where = f" at {path} of the returned value" if path else ""
    return MisuseError(
        f"the function returned a persistent {type(value).__qualname__}{where}; it would "
        "outlive its transaction; return plain values (its attributes) instead"
    )


# Where a value sits below the one a walk started from, as (parent's trail, key):
# joined into a path only when an error names it, so deep trees cost no long strings.
_Trail = tuple[Any, Any] | None


def _path_of(trail: _Trail) -> str:
    """*trail* in the tree's own path dialect (``accounts/a1/entries/0``)."""
    keys = []
    while trail is not None:
        trail, key = trail
        keys.append(key)
    return paths.join(reversed(keys))


def _check_returnable(node: Any) -> None:
    """Refuse a node that holds the user's own persistent objects, or itself."""
    on_path: set[int] = set()
    done: set[int] = set()
    stack: list[tuple[Any, _Trail, bool]] = [(node, None, False)]
    while stack:
        item, trail, leaving = stack.pop()
        ident = id(item)
        if leaving:
            on_path.discard(ident)
            done.add(ident)
            continue
        if ident in on_path:
            raise MisuseError(
                f"the returned node contains itself (at {_path_of(trail)} of it); a plain "
                "copy cannot be made: return the part you need"
            )
        if ident in done:
            continue
        if isinstance(item, Persistent) and not _is_node(item):
            raise _foreign_persistent(item, _path_of(trail))
        children = _children(item)
        if children is None:
            continue
        on_path.add(ident)
        stack.append((item, trail, True))
        for key, child in children:
            if type(child) not in _ATOMS:
                stack.append((child, (trail, key), False))


def _children(value: Any) -> Iterable[tuple[Any, Any]] | None:
    """(key or index, value) of what *value* holds, for nodes and plain containers."""
    if isinstance(value, _DICTS):
        return value.items()
    if isinstance(value, _SEQUENCES):
        return enumerate(value)
    if _is_node(value):
        items = getattr(value, "items", None)
        if callable(items):
            return items()
        if isinstance(value, Iterable):
            return enumerate(value)
    return None


#: Code flags of functions whose call runs none of their body.
_DEFERRED = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR | inspect.CO_COROUTINE


def refuse_deferred(fn: Callable[..., Any]) -> None:
    """Refuse a generator or async function: calling it runs none of its body."""
    if (
        type(fn) is types.FunctionType
        and not fn.__code__.co_flags & _DEFERRED
        and "_is_coroutine_marker" not in fn.__dict__  # inspect.markcoroutinefunction (3.12)
    ):
        return  # a plain function, the common case: one look at its flags
    name = getattr(fn, "__qualname__", None) or repr(fn)
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise MisuseError(
            f"{name} is a generator function: calling it only creates a generator, so "
            "nothing would run or be committed; make it a plain function (return "
            "list(...) of what it yields)"
        )
    if inspect.iscoroutinefunction(fn):
        raise MisuseError(
            f"{name} is an async function: a store call runs it synchronously in one "
            "thread, so its body would never run; make it a plain def (from async code, "
            "await asyncio.to_thread(store.run, fn))"
        )
