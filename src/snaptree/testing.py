"""Conflict-retry tests for applications: force conflicts, check retry safety, race operations.

A function given to ``store.run`` runs again whenever its commit conflicts.
Application authors need to prove two things: *my functions are safe to run
again*, and *my invariants hold when my operations race*. This module gives
them the tools snaptree's own suite uses (docs/testing.md):

- :func:`force_conflicts`: the next commits of ``store.run`` calls fail with a
  genuine ``ZODB.POSException.ConflictError`` at commit, so the store's own
  retry path runs, exactly as under a real conflict.
- :func:`assert_retry_safe`: one run without a conflict and one with forced
  conflicts, from the same starting state, must agree: committed tree,
  return value, arguments, and state outside the tree.
- :func:`interleave`: a deterministic race of two functions (both read,
  ``first`` commits, then ``second``), to show write skew and its cure.
- :func:`race`: worker threads run randomly chosen operations while the
  caller checks an invariant on snapshots (ZODB's racetest, for applications).
- :class:`Chaos`: every retried call's first commit conflicts with a given
  probability, in every store opened meanwhile (the pytest plugin's
  ``--snaptree-chaos``).

How a conflict is forced: the kit registers a synchronizer with the store
(``Store.register_synchronizer``), which hands it to each write call's
transaction manager; it joins a data manager to the call's transaction, and
that data manager votes no at ``tpc_vote`` with a ``ConflictError``. Nothing
the application calls is replaced. The store tells it which function and
which attempt a commit belongs to (``snaptree.store.CallAttempt``), so
conflicts can be aimed at one function, and chaos can leave a call alone
when its policy allows no retry.

Nothing here imports pytest: failures are ``AssertionError`` with a message
meant to be read, so the kit works under any test runner.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import dataclasses
import functools
import inspect
import io
import itertools
import os
import random
import reprlib
import site
import sys
import sysconfig
import threading
import time
import types
import weakref
from collections import Counter as _Tally
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persistent import Persistent
from ZODB.POSException import ConflictError

from .errors import ArgumentError, StoreClosedError
from .store import ROOT_KEY, CallAttempt, Store, add_open_hook, remove_open_hook
from .store import open as open_store
from .tree import to_plain

__all__ = [
    "Chaos",
    "ForcedConflicts",
    "Interleaving",
    "RaceReport",
    "assert_retry_safe",
    "force_conflicts",
    "interleave",
    "race",
]

#: Seconds any helper here waits for a thread or an event before it fails.
WAIT_TIMEOUT = 60.0

#: Differences one assertion lists at most; the rest are counted.
MAX_DIFFERENCES = 20

#: Values looked at, at most, to fingerprint the state a function can reach.
FINGERPRINT_LIMIT = 200_000


# -- forcing conflicts at commit --------------------------------------------------


class _NoState:
    """A savepoint of a data manager that holds nothing to roll back."""

    def rollback(self) -> None:
        pass


class _VoteNo:
    """A data manager that makes the commit fail with a ConflictError when ``decide`` says so.

    It votes last (its sort key), after the storages voted, so a commit it
    fails has been checked for real conflicts first. It keeps no data, so
    joining it changes nothing else about the transaction, savepoints included.
    """

    transaction_manager = None

    def __init__(self, decide: Callable[[CallAttempt], str | None]) -> None:
        self._decide = decide

    def tpc_vote(self, txn: Any) -> None:
        try:
            attempt = txn.data(CallAttempt)
        except KeyError:  # a store.transaction() block: never retried, never forced
            return
        reason = self._decide(attempt)
        if reason is not None:
            raise ConflictError(message=f"database conflict error ({reason})")

    def abort(self, txn: Any) -> None:
        pass

    tpc_begin = commit = tpc_finish = tpc_abort = abort

    def savepoint(self) -> _NoState:
        return _NoState()

    def sortKey(self) -> str:  # noqa: N802 - IDataManager
        return "~snaptree.testing"


class _JoinEachTransaction:
    """The synchronizer a helper registers with a store: joins a ``_VoteNo`` to each write call."""

    def __init__(self, store: Store, decide: Callable[[Store, CallAttempt], str | None]) -> None:
        self._store = weakref.ref(store)
        self._decide = decide

    def newTransaction(self, txn: Any) -> None:  # noqa: N802 - ISynchronizer
        store = self._store()
        if store is not None:
            txn.join(_VoteNo(functools.partial(self._decide, store)))

    def beforeCompletion(self, txn: Any) -> None:  # noqa: N802
        pass

    def afterCompletion(self, txn: Any) -> None:  # noqa: N802
        pass


# Stores whose calls a helper of this module controls exactly (interleave, the
# copies assert_retry_safe makes, force_conflicts): chaos stands down there, so
# that "forced twice" means twice. Counted, since helpers may nest.
_controlled: weakref.WeakKeyDictionary[Store, int] = weakref.WeakKeyDictionary()
_controlled_lock = threading.Lock()


@contextmanager
def _in_control(store: Store) -> Iterator[None]:
    with _controlled_lock:
        _controlled[store] = _controlled.get(store, 0) + 1
    try:
        yield
    finally:
        with _controlled_lock:
            _controlled[store] -= 1
            if not _controlled[store]:
                del _controlled[store]


def _is_controlled(store: Store) -> bool:
    with _controlled_lock:
        return store in _controlled


def _unwrapped(fn: Any) -> Any:
    """The function behind decorators (``__wrapped__``) and ``functools.partial``."""
    for _ in range(100):  # a wrapper chain that loops must not hang us
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif getattr(fn, "__wrapped__", None) is not None:
            fn = fn.__wrapped__
        else:
            break
    return fn


class ForcedConflicts:
    """What :func:`force_conflicts` did: read it inside the block or after it.

    ``conflicts`` is how many commits it failed; ``retries`` and
    ``exhausted`` are the store's own counts (``store.stats()``) since the
    block began: the attempts that followed a conflict, forced or real, and
    the calls that gave up.
    """

    def __init__(self, store: Store, times: int, where: Callable[..., Any] | None) -> None:
        self.times = times
        self.where = where
        self._store = store
        self._lock = threading.Lock()
        self._forced = 0
        self._before = store.stats()
        self._after: dict[str, Any] | None = None

    def _take(self, store: Store, attempt: CallAttempt) -> str | None:
        if self.where is not None and _unwrapped(attempt.function) != _unwrapped(self.where):
            return None
        with self._lock:
            if self._forced >= self.times:
                return None
            self._forced += 1
            number = self._forced
        return f"forced by snaptree.testing.force_conflicts, {number} of {self.times}"

    def _since(self, what: str) -> int:
        now = self._after if self._after is not None else self._store.stats()
        return now[what] - self._before[what]

    @property
    def conflicts(self) -> int:
        with self._lock:
            return self._forced

    @property
    def retries(self) -> int:
        return self._since("retries")

    @property
    def exhausted(self) -> int:
        return self._since("exhausted")

    def __repr__(self) -> str:
        return (
            f"<ForcedConflicts {self.conflicts} of {self.times} forced, "
            f"{self.retries} retries, {self.exhausted} exhausted>"
        )


@contextmanager
def force_conflicts(
    store: Store, times: int = 1, where: Callable[..., Any] | None = None
) -> Iterator[ForcedConflicts]:
    """Make the next *times* commits of ``store.run`` calls in the block fail with a conflict.

    Each such commit fails at ``tpc_vote`` with a genuine
    ``ZODB.POSException.ConflictError``; the store aborts, backs off and runs
    the function again, and counts it in ``store.stats()``, as it does for a
    conflict between two threads. ``times`` may exceed what the store's
    retry policy allows: the call then ends in ``RetriesExhausted``, as it
    would in production.

    ``where`` aims the conflicts at one function: only commits of calls that
    run it count (``store.run(where, ...)``, or a ``@store.transactional``
    function; compared after unwrapping decorators and ``functools.partial``,
    and bound methods by equality). A function is what a test has in hand
    and is exact; which *objects* a commit changes, ZODB keeps to itself.
    Calls of other functions commit normally, and so do ``store.transaction()``
    blocks (never retried) and snapshots (never commit). Conflicts are forced
    in calls from any thread. Chaos (``--snaptree-chaos``) leaves the store
    alone while the block runs, so the counts are exactly the ones asked for.

    Example::

        with force_conflicts(store, times=2, where=transfer) as forced:
            store.run(transfer, "a1", "a2", 5)
        assert forced.conflicts == 2 and forced.retries == 2
    """
    if isinstance(times, bool) or not isinstance(times, int) or times < 0:
        raise ArgumentError(f"times must be an int of 0 or more, not {times!r}")
    if where is not None and not callable(where):
        raise ArgumentError(f"where must be the function whose calls conflict, not {where!r}")
    report = ForcedConflicts(store, times, where)
    synchronizer = _JoinEachTransaction(store, report._take)
    with _in_control(store):
        store.register_synchronizer(synchronizer)
        try:
            yield report
        finally:
            store.unregister_synchronizer(synchronizer)
            with contextlib.suppress(StoreClosedError):  # the block closed it: counts are gone
                report._after = store.stats()


# -- chaos: a whole suite with its retries exercised -------------------------------


class Chaos:
    """While on, every retried call's first commit conflicts with probability *probability*.

    It reaches every store :func:`snaptree.open` opens while it is on
    (through ``snaptree.store.add_open_hook``), including the ones an
    application opens itself; :meth:`attach` adds a store opened before.
    Only calls that may retry are touched: the first attempt of a
    ``store.run``/``@store.transactional`` call whose policy allows a
    second. ``store.transaction()`` blocks, snapshots, and stores under
    another helper of this module are left alone.

    The draws come from ``random.Random(f"{seed}/{label}")``, where the
    label is set by :meth:`reseed` (the pytest plugin uses each test's id):
    a test run alone with the same seed gets the same conflicts as in the
    whole suite, as long as it makes its calls from one thread.
    """

    def __init__(self, probability: float, seed: int | None = None) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ArgumentError(f"probability must be between 0 and 1, not {probability!r}")
        self.probability = probability
        self.seed = int.from_bytes(os.urandom(4), "big") if seed is None else seed
        self.forced = 0  # conflicts forced
        self.calls = 0  # first commits of retried calls seen
        self._lock = threading.Lock()
        self._on = False
        self._rng = random.Random(f"{self.seed}/")

    def reseed(self, label: str) -> None:
        """Draw from ``Random(f"{seed}/{label}")`` from now on."""
        with self._lock:
            self._rng = random.Random(f"{self.seed}/{label}")

    def attach(self, store: Store) -> None:
        """Force conflicts in *store* too (stores opened while chaos is on get this already)."""
        store.register_synchronizer(_JoinEachTransaction(store, self._decide))

    def _decide(self, store: Store, attempt: CallAttempt) -> str | None:
        if attempt.number != 1 or attempt.attempts < 2 or _is_controlled(store):
            return None
        with self._lock:
            if not self._on:
                return None
            self.calls += 1
            if self._rng.random() >= self.probability:
                return None
            self.forced += 1
        return f"forced by snaptree chaos, probability {self.probability:g}, seed {self.seed}"

    def start(self) -> None:
        with self._lock:
            if self._on:
                return
            self._on = True
        add_open_hook(self.attach)

    def stop(self) -> None:
        with self._lock:
            if not self._on:
                return
            self._on = False
        remove_open_hook(self.attach)

    def __enter__(self) -> Chaos:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def summary(self) -> str:
        return (
            f"snaptree chaos: forced {self.forced} conflict(s) in {self.calls} retried "
            f"call(s) (probability {self.probability:g}, seed {self.seed}; repeat with "
            f"--snaptree-chaos={self.probability:g} --snaptree-seed={self.seed})"
        )


# -- assert_retry_safe --------------------------------------------------------------


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
    name = getattr(fn, "__qualname__", None) or repr(fn)
    module = getattr(_unwrapped(fn), "__module__", None) or ""
    application = _application.set(module.partition(".")[0])
    try:
        return _check_retry_safety(store, fn, args, kwargs, conflicts, policy, name)
    finally:
        _application.reset(application)


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
    watched = _watched(fn)
    with store.snapshot() as snap:
        image = io.BytesIO()
        snap.connection.exportFile(snap.root._p_oid, image)
    runs = []
    before = _look(watched)
    for forced, (run_args, run_kwargs) in zip((0, conflicts), arguments, strict=True):
        with _copy_of(image, policy) as replica:
            outcome = _Outcome.of(replica, fn, run_args, run_kwargs, forced)
            outcome.tree = _tree_of(replica)
            outcome.outside = _look(watched)
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
        with _in_control(replica):
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
        return f"raised {self.error}" if self.error is not None else f"returned {_show(self.value)}"


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
        if _fingerprint(a, copies=True) != _fingerprint(b, copies=True):
            problems.append(
                f"argument {index + 1} after the run: {_show(a)} without conflicts, "
                f"{_show(b)} {with_n} (the function changes what it was passed)"
            )
    for key in kwargs_a:
        if _fingerprint(kwargs_a[key], copies=True) != _fingerprint(kwargs_b[key], copies=True):
            problems.append(
                f"argument {key}= after the run: {_show(kwargs_a[key])} without conflicts, "
                f"{_show(kwargs_b[key])} {with_n} (the function changes what it was passed)"
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


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 8


def _show(value: Any) -> str:
    if isinstance(value, random.Random):  # its repr is its address: show what changes
        return f"a generator in state #{hash(value.getstate()) & 0xFFFF:04x}"
    return _repr.repr(value)


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
                    yield sub, _show(x[key]), "absent"
                elif key not in x:
                    yield sub, "absent", _show(y[key])
                else:
                    stack.append((x[key], y[key], sub))
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i in range(len(x) - 1, -1, -1):
                stack.append((x[i], y[i], f"{where}/{i}" if where else str(i)))
        elif type(x) is not type(y) or not (x == y or (x != x and y != y)):  # NaN equals NaN
            yield where, _show(x), _show(y)


# What the function can reach outside the tree. Only code outside the
# interpreter's library directories (and outside snaptree) is followed: the
# state of libraries (logging's caches, the import system) changes for
# reasons of its own, and is not the application's to keep retry-safe.
_LIBRARY_DIRS = (
    *{
        os.path.realpath(path) + os.sep
        for path in [
            *(sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")),
            site.getusersitepackages(),
        ]
    },
    str(Path(__file__).resolve().parent) + os.sep,
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

    def add(self, label: str, getter: Callable[[], Any]) -> None:
        self.places.setdefault(label, getter)

    def callable(self, fn: Any, names: set[str]) -> None:
        if id(fn) in self._seen or len(self._seen) > 1000:
            return
        self._seen.add(id(fn))
        self._kept.append(fn)
        if isinstance(fn, functools.partial):
            self.add(
                f"the arguments functools.partial binds to {_name(fn.func)}",
                lambda fn=fn: (fn.args, fn.keywords),
            )
            self.callable(fn.func, names)
        elif isinstance(fn, types.MethodType):
            self.value(f"the object of {_name(fn)}", lambda fn=fn: fn.__self__, names)
            self.callable(fn.__func__, names)
        elif isinstance(fn, types.FunctionType):
            if _is_user_code(fn):
                self.function(fn)
        elif getattr(fn, "__wrapped__", None) is not None:  # lru_cache and the like
            self.callable(fn.__wrapped__, names)
        elif callable(fn) and _is_user_code(type(fn)):  # an object with __call__
            self.value(f"the callable {_name(type(fn))} object", lambda fn=fn: fn, names)
            self.callable(type(fn).__call__, names)

    def function(self, fn: types.FunctionType) -> None:
        code, name = fn.__code__, _name(fn)
        names = _names(code)
        for var, cell in zip(code.co_freevars, fn.__closure__ or (), strict=True):
            self.value(f"{var} (a variable {name} closes over)", lambda c=cell: _cell(c), names)
        for i, default in enumerate(fn.__defaults__ or ()):
            if not isinstance(default, _IMMUTABLE):
                self.add(f"default {i + 1} of {name}", lambda d=default: d)
        for key, default in (fn.__kwdefaults__ or {}).items():
            if not isinstance(default, _IMMUTABLE):
                self.add(f"default {key}= of {name}", lambda d=default: d)
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
        if isinstance(value, types.ModuleType | type):
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
        """The attributes of a module or class that the code names."""
        if id(owner) in self._seen:
            return
        self._seen.add(id(owner))
        self._kept.append(owner)
        user = _is_user_code(owner)
        for attribute in sorted(names):
            try:
                value = inspect.getattr_static(owner, attribute)
            except AttributeError:
                continue
            if isinstance(value, staticmethod | classmethod):
                value = value.__func__
            label = f"{getattr(owner, '__name__', owner)}.{attribute}"
            if user:
                self.value(label, lambda o=owner, a=attribute: getattr(o, a), names)
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


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)


_EMPTY_CELL = object()


def _cell(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY_CELL


def _watched(fn: Callable[..., Any]) -> dict[str, Callable[[], Any]]:
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


def _look(watched: dict[str, Callable[[], Any]]) -> dict[str, tuple[Any, str]]:
    """Each watched place's fingerprint (to compare) and its value shown (to report)."""
    seen = {}
    for label, getter in watched.items():
        try:
            value = getter()
        except Exception:  # a global deleted, say
            seen[label] = (("missing",), "missing")
        else:
            seen[label] = (_fingerprint(value), _show(value))
    return seen


def _fingerprint(value: Any, *, copies: bool = False) -> Any:
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


# -- interleave ---------------------------------------------------------------------


@dataclass(frozen=True)
class Interleaving:
    """What :func:`interleave` ran: how often each function ran and what it returned.

    ``second_runs`` is 1 when ``second`` committed without meeting a
    conflict (its changes did not overlap ``first``'s, or the storage merged
    them), 2 when ``first``'s commit made it conflict and run again.
    """

    first_runs: int
    second_runs: int
    first_result: Any
    second_result: Any

    @property
    def conflicted(self) -> bool:
        return self.second_runs > 1


def interleave(
    store: Store,
    first: Callable[[Any], Any],
    second: Callable[[Any], Any],
    *,
    timeout: float = WAIT_TIMEOUT,
) -> Interleaving:
    """Race two functions deterministically: both read, ``first`` commits, then ``second``.

    ``second`` runs first in a thread of its own, up to its commit, and
    waits there; ``first`` then runs and commits in the calling thread;
    then ``second`` commits, and meets a conflict if ``first`` changed what
    it changed or read with ``snaptree.read_current`` (unless the storage
    merges the two changes: different keys of a mapping, a ``Counter``). A
    conflict re-runs ``second`` on the new state, as ``store.run`` always
    does. Both see the state as it was before either commits: the
    interleaving that turns a check-then-write into write skew. Each takes
    the root, like a function given to ``store.run``. Chaos stands down
    for the store meanwhile. Every wait is bounded by *timeout* seconds.

    Example::

        result = interleave(store, lambda r: go_off(r, "alice"), lambda r: go_off(r, "bob"))
        assert result.conflicted  # go_off reads the other doctor with read_current
    """
    runs = {"first": 0, "second": 0}
    second_waits, first_done = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def second_body(root: Any) -> Any:
        runs["second"] += 1
        result = second(root)
        if runs["second"] == 1:
            second_waits.set()
            if not first_done.wait(timeout):
                raise TimeoutError(f"interleave: first did not commit within {timeout:g} s")
        return result

    def first_body(root: Any) -> Any:
        runs["first"] += 1
        return first(root)

    def run_second() -> None:
        try:
            outcome["second"] = store.run(second_body)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            second_waits.set()

    thread = threading.Thread(target=run_second, name="snaptree-interleave-second", daemon=True)
    with _in_control(store):
        thread.start()
        try:
            if not second_waits.wait(timeout):
                raise AssertionError(
                    f"interleave: second did not reach its commit in {timeout:g} s"
                )
            if "error" not in outcome:
                outcome["first"] = store.run(first_body)
        finally:
            first_done.set()
            thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"interleave: second still running after {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return Interleaving(runs["first"], runs["second"], outcome["first"], outcome["second"])


# -- race -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RaceReport:
    """What :func:`race` did: the seed, the operations run, the snapshots checked."""

    seed: int
    operations: dict[str, int]
    snapshots_checked: int
    conflicts: int


def _with_rng(root: Any, operation: Callable[[Any, random.Random], Any], seed: int) -> Any:
    """Run *operation* with a generator that starts afresh on every attempt of the call."""
    return operation(root, random.Random(seed))


def race(
    store: Store,
    operations: Sequence[Callable[[Any, random.Random], Any]],
    invariant: Callable[[Any], Any],
    *,
    threads: int = 4,
    seconds: float = 2.0,
    seed: int | None = None,
) -> RaceReport:
    """Run random operations from *threads* threads while checking *invariant* on snapshots.

    ZODB's racetest, for applications: each worker thread repeatedly picks
    one of *operations* and runs it with ``store.run(op, rng)``, while the
    calling thread opens snapshot after snapshot and calls
    ``invariant(root)`` on each, and once more on the final state. The
    invariant reports a violation by raising ``AssertionError`` (an
    ``assert``). The first violation, or the first error of an operation,
    stops the race and fails it with the snapshot's tid, the message and
    the seed.

    ``rng`` is a ``random.Random`` that gives the same numbers on every
    attempt of one call, so an operation may draw its arguments from it and
    stay retry-safe. The seed (printed, and random unless given) fixes what
    each worker does: which operations, in which order, with which numbers;
    the threads' schedule is the operating system's. The race stops after
    *seconds* (each worker runs at least one operation); every thread is
    joined with a timeout.

    Example::

        race(store, [transfer, deposit_and_withdraw], total_is_constant, seed=7)
    """
    if not operations:
        raise ArgumentError("race needs at least one operation")
    if threads < 1 or seconds <= 0:
        raise ArgumentError(
            f"threads must be at least 1 and seconds positive, not {threads!r} and {seconds!r}"
        )
    seed = int.from_bytes(os.urandom(4), "big") if seed is None else seed
    print(f"snaptree.testing.race: seed {seed} (repeat with seed={seed})")
    failed = threading.Event()
    failures: list[str] = []
    done = _Tally[str]()
    lock = threading.Lock()
    conflicts_before = store.stats()["conflicts"]
    deadline = time.monotonic() + seconds

    def fail(message: str) -> None:
        with lock:
            failures.append(message)
        failed.set()

    def worker(number: int) -> None:
        rng = random.Random(f"{seed}/{number}")
        ran = 0  # at least one operation each, however late the thread got to run
        while not failed.is_set() and (not ran or time.monotonic() < deadline):
            ran += 1
            operation = rng.choice(operations)
            call_seed = rng.getrandbits(64)
            try:
                store.run(_with_rng, operation, call_seed)
            except Exception as exc:
                fail(
                    f"operation {_name(operation)} failed in worker {number}: "
                    f"{type(exc).__name__}: {exc}"
                )
                return
            with lock:
                done[_name(operation)] += 1

    def check(when: str) -> bool:
        with store.snapshot() as snap:
            try:
                invariant(snap.root)
            except Exception as exc:
                kind = "" if isinstance(exc, AssertionError) else f"{type(exc).__name__}: "
                fail(
                    f"invariant {_name(invariant)} violated {when} at tid {snap.tid} "
                    f"({snap.committed_at.isoformat()}): {kind}{exc}"
                )
                return False
        return True

    checked = 1
    workers = [
        threading.Thread(target=worker, args=(i,), name=f"snaptree-race-{i}", daemon=True)
        for i in range(threads)
    ]
    if check("before any operation ran"):
        for thread in workers:
            thread.start()
        while not failed.is_set() and time.monotonic() < deadline:
            checked += 1
            if not check("while the operations ran"):
                break
        for thread in workers:
            thread.join(WAIT_TIMEOUT)
        stuck = [thread.name for thread in workers if thread.is_alive()]
        if stuck:
            fail(f"threads still running {WAIT_TIMEOUT:g} s after the race ended: {stuck}")
        elif not failures:
            checked += 1
            check("after the race")
    if failures:
        raise AssertionError(f"{failures[0]} [seed {seed}: repeat with race(..., seed={seed})]")
    return RaceReport(
        seed=seed,
        operations=dict(done),
        snapshots_checked=checked,
        conflicts=store.stats()["conflicts"] - conflicts_before,
    )
