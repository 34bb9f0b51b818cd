"""What a function can reach outside the tree, and fingerprints of it to compare.

:func:`snaptree.testing.assert_retry_safe` compares the state outside the
tree that the function under test can change (module globals and class
attributes its code names, the variables it closes over, mutable defaults,
a bound method's object, the random generators it uses) before and after
each run. Only code outside the interpreter's library directories (and
outside snaptree) is followed: the state of libraries (logging's caches, the
import system) changes for reasons of its own, and is not the application's
to keep retry-safe.
"""

from __future__ import annotations

import array
import collections
import contextvars
import functools
import inspect
import io
import itertools
import os
import queue
import random
import reprlib
import site
import sys
import sysconfig
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from persistent import Persistent

from ._conflicts import name_of

#: Values looked at, at most, to fingerprint the state a function can reach.
FINGERPRINT_LIMIT = 200_000

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 8


def show(value: Any) -> str:
    """*value* as a message shows it: shortened, and a random generator by its state."""
    if isinstance(value, random.Random):  # its repr is its address: show what changes
        return f"a generator in state #{hash(value.getstate()) & 0xFFFF:04x}"
    contents = _buffered(value)
    if contents is not None:  # its repr is its address too
        return f"a {type(value).__name__} holding {_repr.repr(contents)}"
    return _repr.repr(value)


_LIBRARY_DIRS = (
    *{
        os.path.realpath(path) + os.sep
        for path in [
            *(sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")),
            site.getusersitepackages(),
        ]
    },
    str(Path(__file__).resolve().parents[1]) + os.sep,  # snaptree itself
)


@functools.lru_cache(maxsize=4096)
def _is_user_module(name: str | None) -> bool:
    if name == "__main__":  # a script, or an interactive session without a file
        return True
    module = sys.modules.get(name or "")
    path = getattr(module, "__file__", None)
    if not path:
        return False
    return not os.path.realpath(path).startswith(_LIBRARY_DIRS)


# The top-level package of the function assert_retry_safe checks: its code is
# the application's even when it is installed among the libraries.
_application: contextvars.ContextVar[str] = contextvars.ContextVar("_application", default="")


@contextmanager
def watching_application(fn: Any) -> Iterator[None]:
    """Count the code of *fn*'s top-level package as the application's while the block runs."""
    module = getattr(fn, "__module__", None) or ""
    token = _application.set(module.partition(".")[0])
    try:
        yield
    finally:
        _application.reset(token)


def _is_user_code(obj: Any) -> bool:
    name = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
    package = (name or "").partition(".")[0]
    return (bool(package) and package == _application.get()) or _is_user_module(name)


def _names(code: types.CodeType) -> set[str]:
    """Global and attribute names a code object and the code nested in it use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


class _Reach:
    """Collects (label, getter) for each place outside the tree a function can change."""

    def __init__(self) -> None:
        self.places: dict[str, Callable[[], Any]] = {}
        self._seen: set[int] = set()
        self._kept: list[Any] = []  # what _seen names stays alive, so no id is reused
        #: Per module or class, the attribute names looked at so far: code met
        #: later (a helper, a method) may name others of the same namespace.
        self._looked_at: dict[int, set[str]] = {}

    def add(self, label: str, getter: Callable[[], Any]) -> None:
        self.places.setdefault(label, getter)

    def callable(self, fn: Any, names: set[str]) -> None:
        if id(fn) in self._seen or len(self._seen) > 1000:
            return
        self._seen.add(id(fn))
        self._kept.append(fn)
        if isinstance(fn, functools.partial):
            self.add(
                f"the arguments functools.partial binds to {name_of(fn.func)}",
                lambda fn=fn: (fn.args, fn.keywords),
            )
            self.callable(fn.func, names)
        elif isinstance(fn, types.MethodType):
            self.value(f"the object of {name_of(fn)}", lambda fn=fn: fn.__self__, names)
            self.callable(fn.__func__, names)
        elif isinstance(fn, types.FunctionType):
            if _is_user_code(fn):
                self.function(fn)
        elif isinstance(fn, types.BuiltinMethodType) and not isinstance(
            fn.__self__, types.ModuleType | type(None)
        ):  # outbox.append: what it changes is its object
            self.value(f"the object of {name_of(fn)}", lambda fn=fn: fn.__self__, names)
        elif getattr(fn, "__wrapped__", None) is not None:  # lru_cache and the like
            self.callable(fn.__wrapped__, names)
        elif callable(fn) and _is_user_code(type(fn)):  # an object with __call__
            self.value(f"the callable {name_of(type(fn))} object", lambda fn=fn: fn, names)
            self.callable(type(fn).__call__, names)

    def function(self, fn: types.FunctionType) -> None:
        code, name = fn.__code__, name_of(fn)
        names = _names(code)
        # Attributes set on the function (send.calls += 1), even before it sets the first.
        self.add(f"the attributes of {name}", lambda fn=fn: fn.__dict__)
        for var, cell in zip(code.co_freevars, fn.__closure__ or (), strict=True):
            self.value(f"{var} (a variable {name} closes over)", lambda c=cell: _cell(c), names)
        # Defaults: data is watched, code (send=mailer.send) is followed.
        for i, default in enumerate(fn.__defaults__ or ()):
            if not isinstance(default, _IMMUTABLE):
                self.value(f"default {i + 1} of {name}", lambda d=default: d, names)
        for key, default in (fn.__kwdefaults__ or {}).items():
            if not isinstance(default, _IMMUTABLE):
                self.value(f"default {key}= of {name}", lambda d=default: d, names)
        namespace = fn.__globals__
        for global_name in sorted(names & namespace.keys()):
            self.value(
                f"{global_name} (a global of {namespace.get('__name__')})",
                lambda g=namespace, n=global_name: g.get(n),
                names,
            )

    def value(self, label: str, getter: Callable[[], Any], names: set[str]) -> None:
        """A place that holds *getter()*: watched if it is data, followed if it is code."""
        try:
            value = getter()
        except Exception:
            return
        if _mock_calls(value) is not None:  # a test double: data (its calls), not code
            self.add(label, getter)
        elif isinstance(value, types.ModuleType | type):
            self.namespace(value, names)
        elif callable(value) and not _is_user_code(type(value)):
            self.callable(value, names)  # a function, a method, a partial, a builtin
        else:
            self.add(label, getter)
            if _is_user_code(type(value)):
                self.namespace(type(value), names)  # the methods the code calls on it
                if callable(value):
                    self.callable(value, names)

    def namespace(self, owner: types.ModuleType | type, names: set[str]) -> None:
        """The attributes of a module or class that the code names (those not looked at yet)."""
        looked_at = self._looked_at.get(id(owner))
        if looked_at is None:
            if len(self._looked_at) > 1000:
                return
            looked_at = self._looked_at[id(owner)] = set()
            self._kept.append(owner)
        new = names - looked_at
        looked_at |= new
        user = _is_user_code(owner)
        for attribute in sorted(new):
            try:
                value = inspect.getattr_static(owner, attribute)
            except AttributeError:
                continue
            if isinstance(value, staticmethod | classmethod):
                value = value.__func__
            label = f"{getattr(owner, '__name__', owner)}.{attribute}"
            if user:
                self.value(label, lambda o=owner, a=attribute: getattr(o, a), names)
                if isinstance(owner, type) and isinstance(value, types.FunctionType):
                    # A method reaches its class's attributes through self or cls.
                    self.namespace(owner, _names(value.__code__))
            else:
                self.generator_behind(label, getattr(owner, attribute, None))

    def generator_behind(self, label: str, value: Any) -> None:
        """``random.random`` and friends are methods of a hidden generator: watch its state."""
        owner = getattr(value, "__self__", None)
        if owner is random.random.__self__:
            self.add(
                "the random module's shared generator (random.random() and the like)",
                lambda o=owner: o,
            )
        elif isinstance(owner, random.Random):
            self.add(f"the random generator behind {label}", lambda o=owner: o)


_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, tuple, frozenset, range)


def _mock_calls(value: Any) -> int | None:
    """How many calls a ``unittest.mock`` double has recorded; None for anything else.

    A Mock is callable, so it would be taken for code and followed (there is
    nothing to follow); what a retry repeats is in the calls it records.
    """
    mock = sys.modules.get("unittest.mock")
    if mock is not None and isinstance(value, mock.NonCallableMock):
        return len(value.mock_calls)
    return None


def _buffered(value: Any) -> Any:
    """What a standard-library queue or in-memory file holds; None for anything else.

    These are library objects, compared by identity like the rest, but what
    they hold is the application's: a message put in a ``queue.Queue`` or a
    line written to a ``StringIO`` on every attempt is a side effect a
    retry repeats, as an append to a list is.
    """
    if isinstance(value, io.StringIO | io.BytesIO):
        return value.getvalue()
    if isinstance(value, queue.Queue):
        with value.mutex:
            return list(value.queue)
    if isinstance(value, queue.SimpleQueue):
        return ("items", value.qsize())  # not readable without taking them
    if isinstance(value, array.array):
        return value.tolist()
    return None


_EMPTY_CELL = object()


def _cell(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY_CELL


def watched(fn: Callable[..., Any]) -> dict[str, Callable[[], Any]]:
    """The places outside the tree *fn* can change, each object once (under its first name)."""
    reach = _Reach()
    reach.callable(fn, set())
    places, seen = {}, set()
    for label, getter in reach.places.items():
        try:
            value = getter()
        except Exception:
            continue
        if not isinstance(value, _IMMUTABLE):  # equal ints may be one object in two places
            if id(value) in seen:
                continue
            seen.add(id(value))
        places[label] = getter
    return places


def look(watched: dict[str, Callable[[], Any]]) -> dict[str, tuple[Any, str]]:
    """Each watched place's fingerprint (to compare) and its value shown (to report)."""
    seen = {}
    for label, getter in watched.items():
        try:
            value = getter()
        except Exception:  # a global deleted, say
            seen[label] = (("missing",), "missing")
        else:
            seen[label] = (fingerprint(value), show(value))
    return seen


def fingerprint(value: Any, *, copies: bool = False) -> Any:
    """A comparable, hashable copy of *value*'s state, down to FINGERPRINT_LIMIT values.

    Containers, scalars, values of types that compare by value (dates,
    decimals, paths) and instances of the user's own classes are copied; a
    random generator is its state. Anything else (locks, library objects
    with internal caches, tree nodes) is its identity: the places a function
    reaches are compared with themselves, and a run does not change *which*
    object a place holds without it showing. ``copies=True`` is for
    comparing two deep copies, which never share an identity: library
    objects are compared by their attributes, or not at all.
    """
    budget = itertools.count()
    on_path: set[int] = set()

    def walk(item: Any) -> Any:
        if next(budget) > FINGERPRINT_LIMIT:
            return "..."
        if isinstance(item, _IMMUTABLE) and not isinstance(item, tuple | frozenset):
            return "NaN" if isinstance(item, float) and item != item else item
        if id(item) in on_path:
            return ("cycle", id(item))
        on_path.add(id(item))
        try:
            return shape(item)
        finally:
            on_path.discard(id(item))

    def shape(item: Any) -> Any:
        kind = type(item).__qualname__
        calls = _mock_calls(item)
        if calls is not None:  # deep copies of one double are equal if equally called
            return ("mock", calls) if copies else ("mock", id(item), calls)
        if isinstance(item, dict):
            return (kind, frozenset((walk(k), walk(v)) for k, v in item.items()))
        if isinstance(item, list | tuple | collections.deque):
            return (kind, tuple(walk(v) for v in item))
        if isinstance(item, set | frozenset):
            return (kind, frozenset(walk(v) for v in item))
        if isinstance(item, random.Random):
            return ("random", item.getstate())
        if isinstance(item, itertools.count):
            return ("count", repr(item))
        if isinstance(item, bytearray):
            return (kind, bytes(item))
        contents = _buffered(item)
        if contents is not None:  # an outbox or a log the standard library keeps
            return (kind, walk(contents))
        if isinstance(item, Persistent):
            return ("identity", kind, id(item))
        if not _is_user_code(type(item)):
            if type(item).__eq__ is not object.__eq__ and type(item).__hash__ is not None:
                return ("value", item)
            if not copies:
                return ("identity", kind, id(item))
            if not hasattr(item, "__dict__"):
                return ("opaque", kind)
        state = dict(getattr(item, "__dict__", {}))
        for slot in getattr(type(item), "__slots__", ()):
            state[slot] = getattr(item, slot, None)
        return (kind, walk(state))

    return walk(value)
