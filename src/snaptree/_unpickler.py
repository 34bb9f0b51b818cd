"""The allow-list unpickler: reading a pickle without letting it run code.

A pickle is a program: the standard unpickler calls whatever the file names.
Every way a pickle can reach a callable (GLOBAL, STACK_GLOBAL, INST and the
extension registry) goes through ``find_class``, in the C implementation
too; REDUCE, NEWOBJ, OBJ and BUILD can only call what an earlier
``find_class`` returned. So :class:`AllowListUnpickler` refuses every global
but builtin containers and scalars, datetime and decimal types and the
classes the caller names, *before* anything is called. Shared by imports
(pickle and zodb sources) and by ``verify``.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import copyreg
import functools
import importlib
import pickle
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ._pickle_scan import MAX_HASH_DEPTH, ScanningReader, max_hash_size, too_large
from .errors import Error, InputError


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


class _TupleDepths:
    """How deeply the tuples a pickle makes by *calling* ``tuple`` nest: bounded, as the scan
    bounds the ones it sees built.

    The scan (:mod:`snaptree._pickle_scan`) counts the tuples that TUPLE
    opcodes build, but ``tuple(a_list)`` or ``copyreg._reconstructor(tuple,
    tuple, a_list)``, called by REDUCE, OBJ or INST, wrap what a list held,
    which the scan does not follow. So these calls are measured here, as
    they return: each tuple is walked once (its depth and size are kept), so
    a file that calls them a million times costs what its tuples do.

    The scan goes on from the size it saw the call's arguments have, where a
    list, a dict or a set counts as one value: a tuple made of what a list
    held (``tuple([t, t])``), larger than its arguments, would let tuples
    built on it later double in size out of the scan's sight. No pickler
    writes one, so it is refused; a tuple class called with its fields (a
    namedtuple) is as large as they are, and loads.
    """

    def __init__(self, source: str, offset: Callable[[], int]) -> None:
        self._source = source
        self._offset = offset  # bytes of the file scanned so far
        #: id: (the tuple, its depth, its size)
        self._known: dict[int, tuple[tuple[Any, ...], int, int]] = {}

    def checked(self, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """*value*, which a call with *args* and *kwargs* returned, once it is measured."""
        if not isinstance(value, tuple):
            return value
        depth, size = self.measure(value)
        # Keyword arguments arrive in a dict (NEWOBJ_EX), which the scan counts as one value.
        seen = 1 + len(kwargs) + sum(self.measure(a)[1] if type(a) is tuple else 1 for a in args)
        if size > seen:
            raise InputError(
                f"{self._source}: the pickle makes a tuple of {size:,} values out of "
                f"arguments of {seen:,} (what a list or a dict of keyword arguments held, "
                "by calling tuple() or a tuple class): no pickler writes one, and tuples "
                "built on it could grow out of the checks' sight; nothing was loaded"
            )
        if depth > MAX_HASH_DEPTH:
            raise InputError(
                f"{self._source}: the pickle makes tuples nested more than "
                f"{MAX_HASH_DEPTH:,} levels deep, which hashing as a dict key or set element "
                "would follow in C until the process crashed; nothing was loaded"
            )
        if size > max_hash_size(self._offset()):
            raise InputError(
                f"{self._source}: the pickle makes {too_large(size)}; nothing was loaded"
            )
        return value

    def measure(self, root: tuple[Any, ...]) -> tuple[int, int]:
        """*root*'s nesting through tuples, and its size (only tuples: a hash stops at the rest)."""
        known = self._known
        if id(root) in known:
            return known[id(root)][1:]
        stack: list[list[Any]] = [[root, iter(root), 0, 1]]  # tuple, items, depth, size
        while stack:
            frame = stack[-1]
            for item in frame[1]:
                if isinstance(item, tuple):
                    found = known.get(id(item))
                    if found is None:
                        if len(stack) > MAX_HASH_DEPTH:
                            return len(stack) + 1, 0  # deep enough to refuse: no need to go on
                        stack.append([item, iter(item), 0, 1])
                        break
                    frame[2] = max(frame[2], found[1])
                    frame[3] += found[2]
                else:
                    frame[3] += 1
            else:
                stack.pop()
                depth = frame[2] + 1
                known[id(frame[0])] = (frame[0], depth, frame[3])
                if stack:
                    stack[-1][2] = max(stack[-1][2], depth)
                    stack[-1][3] += frame[3]
        return known[id(root)][1:]


class _DefaultDict(collections.defaultdict):  # type: ignore[type-arg]
    """A defaultdict freed through the trashcan: a Python subclass's dealloc has one.

    collections.defaultdict's own dealloc calls dict's with the trashcan off (it is on only
    for dict itself), so a chain of a million nested ones crashes the process when freed.
    """

    __slots__ = ()


_DefaultDict.__module__ = "collections"
_DefaultDict.__name__ = _DefaultDict.__qualname__ = "defaultdict"  # its repr and messages


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

#: What a pickle gets for a global that can wrap a list's items in a new tuple: the
#: unpickler's own version, which measures the tuple's nesting (see _TupleDepths).
_MEASURED = object()

#: Classes whose construction hashes what it is given (elements, or the keys of pairs):
#: a pickle gets a stand-in that charges that work to the scan's budget first (see
#: AllowListUnpickler._hashing). Each maps to how many leading arguments to skip.
_HASHING_CLASSES: dict[type, int] = {
    set: 0,
    frozenset: 0,
    dict: 0,
    collections.OrderedDict: 0,
    _DefaultDict: 1,
}

#: (module, name) -> what a pickle gets when it names that global.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", "bytes"): _bytes_from_pickle,
    ("builtins", "bytearray"): _bytearray_from_pickle,
    ("_codecs", "encode"): _latin1_encode,
    ("copyreg", "_reconstructor"): _MEASURED,
    ("builtins", "object"): object,  # only as the base of _reconstructor
    ("collections", "OrderedDict"): None,
    ("collections", "defaultdict"): _DefaultDict,
    ("datetime", "date"): None,
    ("datetime", "datetime"): None,
    ("datetime", "time"): None,
    ("datetime", "timedelta"): None,
    ("datetime", "timezone"): None,
    ("decimal", "Decimal"): None,
}
for _name in _BUILTIN_NAMES:
    _SAFE_GLOBALS["builtins", _name] = None
_SAFE_GLOBALS["builtins", "tuple"] = _MEASURED


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


_MISSING = object()


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
    What data alone could do to the C unpickler (a huge memo, tuples nested
    deep enough to crash a hash) is refused by :mod:`snaptree._pickle_scan`
    before the unpickler reads it.
    """

    def __init__(
        self, file: Any, *, allow: Iterable[str | type] = (), source: str = "", pickles: int = 1
    ) -> None:
        # The C unpickler reads only what the scan has checked (see _pickle_scan):
        # the first *pickles* pickles of the file; what follows is the caller's.
        self.reader = ScanningReader(file, source, pickles)
        super().__init__(self.reader)
        self._allowed = _parse_allow(allow)
        self._source = source
        self._tuples = _TupleDepths(source, self.reader.offset)
        #: Classes a pickle gets a stand-in for (allowed tuple subclasses, set, dict ...).
        self._stand_ins: dict[type, type] = {}
        #: Each class or function handed to the pickle, with its attributes then.
        self._handed: dict[int, tuple[Any, dict[str, Any]]] = {}

    def load(self) -> Any:
        """Load one pickle; a class or function it changed is put back, and the file refused.

        BUILD can be applied to what GLOBAL returned, not only to instances:
        a file could set attributes of an allowed class (or of a guard
        below) for the rest of the process.
        """
        try:
            value = super().load()
        except BaseException:
            self._put_back()
            raise
        changed = self._put_back()
        if changed:
            raise InputError(
                f"{self._source}: the pickle changed {changed} itself (not an instance of "
                "it); it was put back, and the file refused"
            )
        return value

    def _put_back(self) -> str | None:
        """Undo changes to what find_class handed out; the name of the first one changed."""
        changed = None
        for handed, before in self._handed.values():
            after = vars(handed)
            if after.keys() == before.keys() and all(after[k] is v for k, v in before.items()):
                continue
            changed = changed or getattr(handed, "__qualname__", repr(handed))
            for key in after.keys() - before.keys():
                delattr(handed, key)
            for key, value in before.items():
                if after.get(key, _MISSING) is not value:
                    setattr(handed, key, value)
        return changed

    def _hand(self, found: Any) -> Any:
        if id(found) not in self._handed and hasattr(found, "__dict__"):
            self._handed[id(found)] = (found, dict(vars(found)))
        return found

    def find_class(self, module: str, name: str) -> Any:
        return self._hand(self._find_class(module, name))

    def _tuple(self, *args: Any) -> tuple[Any, ...]:
        """``tuple`` as a pickle may call it: the result's nesting measured."""
        return self._tuples.checked(tuple(*args), args, {})  # type: ignore[no-any-return]

    def _reconstructor(self, cls: Any, base: Any, state: Any) -> Any:
        # Protocols 0-1 write a tuple subclass as _reconstructor(cls, builtins.tuple, state):
        # the pickle got this unpickler's tuple() for builtins.tuple, the class is meant.
        cls, base = (self._unmeasured(c) for c in (cls, base))
        return self._tuples.checked(_reconstructor(cls, base, state), (cls, base, state), {})

    def _unmeasured(self, handed: Any) -> Any:
        """The class a pickle meant by what find_class handed it (a stand-in, this tuple())."""
        if (
            getattr(handed, "__func__", None) is AllowListUnpickler._tuple
            and handed.__self__ is self
        ):
            return tuple
        for cls, stand_in in self._stand_ins.items():
            if handed is stand_in:
                return cls
        return handed

    def _stand_in(self, cls: type, around: Callable[[Any, tuple, dict], Any]) -> type:
        """A stand-in for *cls* that a pickle gets instead of it; one per class.

        The stand-in's calls (REDUCE, OBJ, INST: the metaclass's ``__call__``)
        and its ``__new__`` (NEWOBJ, NEWOBJ_EX) go through
        ``around(make, args, kwargs)``, where *make* makes a real *cls* (by
        calling it, or its ``__new__``): nothing of the stand-in's own is
        left in what is loaded. :meth:`_unmeasured` maps it back to *cls*.
        """
        stand_in = self._stand_ins.get(cls)
        if stand_in is None:

            class _Calls(type(cls)):  # type: ignore[misc]
                def __call__(self, *args: Any, **kwargs: Any) -> Any:
                    return around(cls, args, kwargs)

            def new(kind: type, *args: Any, **kwargs: Any) -> Any:
                return around(functools.partial(cls.__new__, cls), args, kwargs)

            stand_in = _Calls(cls.__name__, (cls,), {"__slots__": (), "__new__": new})
            stand_in.__module__, stand_in.__qualname__ = cls.__module__, cls.__qualname__
            self._stand_ins[cls] = stand_in
        return stand_in

    def _measuring(self, cls: type) -> type:
        """An allowed tuple subclass as a pickle may call it: what it makes is measured.

        ``Point(x=chain)`` (NEWOBJ_EX, its fields in a dict) or ``Path.__new__(Path, a_list)``
        (NEWOBJ) nest tuples out of the scan's sight, as ``tuple(a_list)`` does: the
        stand-in measures the real *cls* each of them makes.
        """
        checked = self._tuples.checked
        return self._stand_in(cls, lambda make, args, kw: checked(make(*args, **kw), args, kw))

    def _hashing(self, cls: type, skip: int) -> type:
        """*cls* (set, dict ...) as a pickle may call it: what it will hash is charged first.

        The scan charges the keys and elements that opcodes store (SETITEMS,
        ADDITEMS ...), but ``set(a_list)`` or ``dict(pairs)``, called by
        REDUCE, hash what a list holds, which the scan does not follow: the
        same large tuple a thousand times in a list is a thousand hashes of
        it. So the stand-in measures the argument's elements (or its pairs'
        keys; each tuple walked once, see _TupleDepths) and charges them to
        the scan's budget before the real *cls* is made (frozenset hashes in
        ``__new__`` already). *skip*: leading arguments that are not the
        contents (a defaultdict's factory).
        """
        charge = self._charge_contents
        pairs = issubclass(cls, dict)
        return self._stand_in(
            cls, lambda make, args, kw: make(*charge(args, skip, pairs, len(kw)), **kw)
        )

    def _charge_contents(
        self, args: tuple[Any, ...], skip: int, pairs: bool, keywords: int
    ) -> tuple[Any, ...]:
        """Charge the hashing of what ``args[skip]`` holds (its elements, or its pairs' keys).

        Returns the arguments to call with: an iterator (a class allowed with
        ``--allow`` may be one) is read into a list first, which is passed
        on, so that measuring it does not leave the constructor nothing.
        """
        work = keywords
        if len(args) > skip:
            contents = args[skip]
            if isinstance(contents, str | bytes | bytearray):
                work += len(contents)  # one character each, a string or bytes hashed at most once
            else:
                if isinstance(contents, dict):
                    contents = contents.keys()  # a dict's keys, whether elements or keys
                else:
                    if (
                        not isinstance(contents, list | tuple | set | frozenset)
                        and iter(contents) is contents
                    ):
                        contents = list(contents)
                        args = (*args[:skip], contents, *args[skip + 1 :])
                    if pairs:
                        contents = [
                            p[0] if isinstance(p, tuple | list) and p else p for p in contents
                        ]
                if any(issubclass(kind, tuple) for kind in set(map(type, contents))):
                    measure = self._tuples.measure
                    for item in contents:
                        work += measure(item)[1] if isinstance(item, tuple) else 1
                else:  # no tuple (the common case, looked at in C): one value each
                    work += len(contents)
        self.reader.charge(work)
        return args

    def _find_class(self, module: str, name: str) -> Any:
        # Python 2 names (__builtin__, copy_reg) as pickle's fix_imports maps them.
        mapped = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        )
        if mapped in self._allowed:
            try:
                allowed = _resolve(*mapped)
            except (ImportError, AttributeError) as exc:
                raise InputError(
                    f"{self._source}: cannot load {module}.{name}, allowed with --allow: {exc}"
                ) from None
            if not isinstance(allowed, type):
                # --allow os:system would let the file call it with its own arguments.
                raise InputError(
                    f"{self._source}: {module}.{name} is allowed with --allow but is a "
                    f"{type(allowed).__name__}, not a class: only classes can be allowed; "
                    "no code from the file was run"
                )
            if issubclass(allowed, tuple):
                return self._measuring(allowed)
            return allowed
        if mapped in _SAFE_GLOBALS:
            safe = _SAFE_GLOBALS[mapped]
            if safe is _MEASURED:  # this unpickler's own, which measures what it returns
                return self._tuple if mapped == ("builtins", "tuple") else self._reconstructor
            found = safe if safe is not None else _resolve(*mapped)
            if found in _HASHING_CLASSES:
                return self._hashing(found, _HASHING_CLASSES[found])
            return found
        raise InputError(
            f"{self._source}: refused global {module}.{name}: only builtin containers and "
            "scalars, datetime and decimal types are loaded from a pickle, plus classes "
            "you trust and name with --allow module:Class; no code from the file was run"
        )


@contextmanager
def unpickling_errors(source: str) -> Iterator[None]:
    """Turn whatever unpickling an untrusted file raises into one InputError naming *source*."""
    try:
        yield
    except Error:
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


def load_pickle(file: Any, source: str, allow: Iterable[str | type] = ()) -> Any:
    """The one pickle in *file*, read with the allow-list; InputError naming *source* otherwise."""
    with unpickling_errors(source):
        unpickler = AllowListUnpickler(file, allow=allow, source=source)
        value = unpickler.load()
    if unpickler.reader.read(1):
        # A second pickle, or garbage: loading only the first would drop the rest silently.
        raise InputError(
            f"{source}: bytes after the end of the pickle (a second pickle in the same "
            "file?); only a file holding exactly one pickle is read"
        )
    return value
