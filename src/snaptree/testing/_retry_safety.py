"""assert_retry_safe: one run without a conflict and one with forced conflicts must agree."""

from __future__ import annotations

import copy
import dataclasses
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from persistent import Persistent

from ..errors import ArgumentError
from ..store import Store, transactional_function
from ..store import open as open_store
from ..tree import ROOT_KEY, to_plain
from ._conflicts import force_conflicts, in_control, unwrapped
from ._reach import fingerprint, look, show, watched, watching_application

#: Differences one assertion lists at most; the rest are counted.
MAX_DIFFERENCES = 20


def assert_retry_safe(
    store: Store, fn: Callable[..., Any], /, *args: Any, conflicts: int = 2, **kwargs: Any
) -> Any:
    """Fail unless ``fn`` does the same with *conflicts* forced conflicts as without any.

    ``fn(root, *args, **kwargs)`` runs twice, each time in a fresh
    ``memory://`` copy of the store's current tree (the tree's records
    copied exactly through ZODB's export format, so node types and your own
    persistent classes come back as they were) and on its own deep copy of
    the arguments: once with no conflict, then once with *conflicts*
    conflicts forced at commit (so it executes ``conflicts + 1`` times).
    The store itself is not changed. It fails with an ``AssertionError``
    listing what differs:

    - the committed tree (paths and both values): reading the clock or an
      unseeded random number, a counter kept outside the tree, an argument
      consumed by the first execution, all end up here;
    - the return value, or one run raising where the other did not;
    - the arguments after each run (``fn`` mutated what it was passed);
    - state outside the tree that ``fn`` can reach and that the run with
      conflicts changed *again* after the run without had changed it:
      module globals and class attributes its code names (following the
      functions it calls, in your code, not in libraries), variables it
      closes over, mutable defaults, a bound method's object, and the
      random generator behind ``random.*``. Your code is anything outside
      the interpreter's library directories, and the package ``fn`` is in.
      An append to a module-level list, an e-mail recorded in an outbox, a
      closure counter show up here. A change that a second execution repeats identically (filling
      a cache) is retry-safe and passes.

    Effects it cannot see (files, sockets, other processes) and libraries'
    internal state are not compared. Returns what ``fn`` returned in the run
    without conflicts. The copies use the store's retry policy without its
    sleeps; *conflicts* must leave it a retry.

    Example::

        assert_retry_safe(store, transfer, "a1", "a2", 5)
    """
    if isinstance(conflicts, bool) or not isinstance(conflicts, int) or conflicts < 1:
        raise ArgumentError(f"conflicts must be an int of at least 1, not {conflicts!r}")
    policy = dataclasses.replace(
        store.retry_policy, sleep=lambda seconds: None, rand=lambda: 0.0, deadline=None
    )
    if conflicts >= policy.attempts:
        raise ArgumentError(
            f"conflicts={conflicts} would exhaust the store's retry policy "
            f"({policy.attempts} attempts): ask for at most {policy.attempts - 1}"
        )
    fn = transactional_function(fn) or fn  # run on the copies, not in the wrapper's store
    name = getattr(fn, "__qualname__", None) or repr(fn)
    with watching_application(unwrapped(fn)):
        return _check_retry_safety(store, fn, args, kwargs, conflicts, policy, name)


def _check_retry_safety(
    store: Store,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    conflicts: int,
    policy: Any,
    name: str,
) -> Any:
    arguments = [_copied(args, kwargs, name) for _ in range(2)]
    places = watched(fn)
    with store.snapshot() as snap:
        image = io.BytesIO()
        snap.connection.exportFile(snap.root._p_oid, image)
    runs = []
    before = look(places)
    for forced, (run_args, run_kwargs) in zip((0, conflicts), arguments, strict=True):
        with _copy_of(image, policy) as replica:
            outcome = _Outcome.of(replica, fn, run_args, run_kwargs, forced)
            outcome.tree = _tree_of(replica)
            outcome.outside = look(places)
            runs.append(outcome)
    clean, retried = runs
    if clean.exception is not None:
        raise AssertionError(
            f"{name} raised {clean.error} when run once without a conflict; "
            "assert_retry_safe needs a call that succeeds"
        ) from clean.exception
    problems = _problems(clean, retried, before, arguments, conflicts)
    if problems:
        shown = problems[:MAX_DIFFERENCES]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise AssertionError(
            f"{name} is not retry-safe: with {conflicts} forced conflict(s) ({conflicts + 1} "
            "executions) it does not do what one execution without a conflict does, from "
            "the same starting state:\n  - "
            + "\n  - ".join(shown)
            + "\nA function given to store.run may run several times: derive what it "
            "writes from the tree and its arguments only, and do anything outside the "
            "tree after store.run returns (docs/testing.md)."
        )
    return clean.value


def _copied(args: tuple, kwargs: dict, name: str) -> tuple[tuple, dict]:
    try:
        return copy.deepcopy((args, kwargs))
    except Exception as exc:
        raise ArgumentError(
            f"assert_retry_safe gives each run of {name} its own deep copy of the arguments, "
            f"and they cannot be copied ({type(exc).__name__}: {exc}); pass copyable "
            "stand-ins (a fake mailer that records what it sends, say)"
        ) from exc


@contextmanager
def _copy_of(image: io.BytesIO, policy: Any) -> Iterator[Store]:
    """A fresh memory:// store holding the exported tree, exempt from chaos."""
    replica = open_store("memory://", retry=policy)
    try:
        with in_control(replica):
            with replica.transaction() as root:
                jar = root._p_jar
                image.seek(0)
                # Our own bytes, just written by exportFile: importFile's plain
                # unpickler is safe on them.
                jar.root()[ROOT_KEY] = jar.importFile(image)
            yield replica
    finally:
        replica.close()


def _tree_of(store: Store) -> Any:
    with store.snapshot() as snap:
        return _plain_state(to_plain(snap.root))


def _plain_state(value: Any) -> Any:
    """*value* (from ``to_plain``) with the user's persistent objects as (class, state).

    ``to_plain`` leaves the application's own persistent classes as they
    are; two copies of one would never compare equal, their states do.
    """
    if not any(isinstance(item, Persistent) for item in _walk(value)):
        return value
    memo: dict[int, Any] = {}

    def convert(item: Any) -> Any:
        if id(item) in memo:
            return memo[id(item)]
        if isinstance(item, Persistent):
            kind = type(item)
            memo[id(item)] = out = {"__class__": f"{kind.__module__}.{kind.__qualname__}"}
            state = item.__getstate__()
            out["__state__"] = convert(state)
            return out
        if isinstance(item, dict):
            memo[id(item)] = out = {}
            out.update((k, convert(v)) for k, v in item.items())
            return out
        if isinstance(item, list):
            memo[id(item)] = out = []
            out.extend(convert(v) for v in item)
            return out
        if isinstance(item, tuple):
            return tuple(convert(v) for v in item)
        return item

    return convert(value)


def _walk(value: Any) -> Iterator[Any]:
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)


@dataclass
class _Outcome:
    """One run of the function under test: what it returned or raised, and what it left."""

    value: Any = None
    error: str | None = None
    exception: Exception | None = None
    tree: Any = None
    outside: dict[str, tuple[Any, str]] = field(default_factory=dict)

    @classmethod
    def of(
        cls, replica: Store, fn: Callable[..., Any], args: tuple, kwargs: dict, conflicts: int
    ) -> _Outcome:
        outcome = cls()
        with force_conflicts(replica, times=conflicts):
            try:
                outcome.value = replica.run(fn, *args, **kwargs)
            except Exception as exc:
                outcome.error, outcome.exception = f"{type(exc).__name__}: {exc}", exc
        return outcome

    def describe(self) -> str:
        return f"raised {self.error}" if self.error is not None else f"returned {show(self.value)}"


def _problems(
    clean: _Outcome, retried: _Outcome, before: dict, arguments: list, conflicts: int
) -> list[str]:
    problems = []
    with_n = f"with {conflicts} conflict(s)"
    if clean.error != retried.error or (
        clean.error is None and not _same(clean.value, retried.value)
    ):
        problems.append(
            f"outcome: without conflicts it {clean.describe()}; {with_n} it {retried.describe()}"
        )
    for path, a, b in _differences(clean.tree, retried.tree, ""):
        problems.append(f"committed tree at {path or '/'}: {a} without conflicts, {b} {with_n}")
    (args_a, kwargs_a), (args_b, kwargs_b) = arguments
    for index, (a, b) in enumerate(zip(args_a, args_b, strict=True)):
        if fingerprint(a, copies=True) != fingerprint(b, copies=True):
            problems.append(
                f"argument {index + 1} after the run: {show(a)} without conflicts, "
                f"{show(b)} {with_n} (the function changes what it was passed)"
            )
    for key in kwargs_a:
        if fingerprint(kwargs_a[key], copies=True) != fingerprint(kwargs_b[key], copies=True):
            problems.append(
                f"argument {key}= after the run: {show(kwargs_a[key])} without conflicts, "
                f"{show(kwargs_b[key])} {with_n} (the function changes what it was passed)"
            )
    for label, (after_clean, shown_clean) in clean.outside.items():
        after_retried, shown_retried = retried.outside[label]
        if after_clean != after_retried:
            problems.append(
                f"outside the tree, {label} was {before[label][1]} before; the run without "
                f"conflicts left it {shown_clean}, and the run {with_n} changed it again, "
                f"to {shown_retried}"
            )
    return problems


def _same(a: Any, b: Any) -> bool:
    return not any(True for _ in _differences(a, b, ""))


def _differences(a: Any, b: Any, path: str) -> Iterator[tuple[str, str, str]]:
    """(path, value in a, value in b) where two plain trees differ, in the tree's path dialect."""
    stack, seen = [(a, b, path)], set()
    while stack:
        x, y, where = stack.pop()
        if x is y or (id(x), id(y)) in seen:
            continue
        seen.add((id(x), id(y)))
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(x.keys() | y.keys(), key=repr, reverse=True):
                sub = f"{where}/{key}" if where else str(key)
                if key not in y:
                    yield sub, show(x[key]), "absent"
                elif key not in x:
                    yield sub, "absent", show(y[key])
                else:
                    stack.append((x[key], y[key], sub))
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i in range(len(x) - 1, -1, -1):
                stack.append((x[i], y[i], f"{where}/{i}" if where else str(i)))
        elif type(x) is not type(y) or not (x == y or (x != x and y != y)):  # NaN equals NaN
            yield where, show(x), show(y)
