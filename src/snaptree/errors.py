"""snaptree's error hierarchy.

Every error derives from :class:`Error`, so a caller can catch everything
snaptree raises with one clause. Subclasses exist only where a caller would
handle them differently. All of them pickle and unpickle unchanged (their
constructors take positional arguments only), because they cross process
boundaries: exporter processes, ZEO clients, test harnesses.
"""

from __future__ import annotations


def one_line(text: str) -> str:
    """*text* on one line: its non-blank lines, stripped, joined by "; ".

    Drivers' messages span lines (psycopg: "...refused\n\tIs the server
    running..."); an error, or a log record on the command line, is one line.
    """
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


class Error(Exception):
    """Base class of every error snaptree raises on purpose."""


def raised_by_server(exc: BaseException) -> Error | None:
    """The snaptree error a ZEO server raised, if *exc* is ZEO's stand-in for it.

    ZEO (6.2) hands its client an error class it has no factory for as a
    ``ServerException`` holding the class's dotted name and its arguments,
    so a ``DurabilityError`` raised by ``snaptree serve`` would reach the
    application as a ZEO error that ``except snaptree.Error`` misses. Every
    snaptree error is made again from its positional arguments (see the
    module docstring), so the client raises the server's error as it was.
    """
    if type(exc).__name__ != "ServerException" or type(exc).__module__ != "ZEO.Exceptions":
        return None
    if len(exc.args) != 2 or not isinstance(exc.args[0], str):
        return None
    kind = _error_classes().get(exc.args[0])
    if kind is None:
        return None
    try:
        return kind(*exc.args[1])
    except Exception:  # arguments a later snaptree's class would not take
        return None


def _error_classes() -> dict[str, type[Error]]:
    """Every snaptree error class loaded, by the dotted name ZEO gives it."""
    found: dict[str, type[Error]] = {}
    pending = [Error]
    while pending:
        kind = pending.pop()
        if kind.__module__.startswith("snaptree."):
            found[f"{kind.__module__}.{kind.__name__}"] = kind
        pending.extend(kind.__subclasses__())
    return found


class ArgumentError(Error, ValueError):
    """An argument is out of range or contradicts another one; the message names it.

    Also a ValueError, so code written before snaptree had its own type for
    this still catches it.
    """


class OpenError(Error):
    """A store could not be opened: bad URI, missing directory, locked file."""


class StoreUnavailableError(OpenError):
    """The store exists but cannot be reached now: its file is locked, its server does not answer.

    Unlike a plain OpenError (a wrong URI, a missing directory), trying again
    later may work, so the command line gives it an exit code of its own.
    """


class StoreClosedError(Error):
    """The store was closed (or is closing): open it again to go on."""


class DurabilityError(Error):
    """A commit could not be made durable: an fsync of the data file failed.

    Commits after the last fsync that succeeded may be lost on a machine
    crash, so the store refuses every later commit: stop the process, check
    the disk, and open the file again.
    """


class RetriesExhausted(Error):
    """A transaction kept conflicting until its attempts or deadline ran out.

    ``attempts`` is the number of attempts made, ``oid`` (hex string or None)
    and ``class_name`` name the object that conflicted last, ``path`` its
    place in the tree (or its nearest ancestor's) when it could be found;
    the last conflict is chained as ``__cause__``.
    """

    def __init__(
        self,
        attempts: int,
        oid: str | None,
        class_name: str | None,
        reason: str = "",
        path: str | None = None,
    ):
        self.attempts = attempts
        self.oid = oid
        self.class_name = class_name
        self.reason = reason
        self.path = path
        named = " ".join(part for part in (class_name, oid and f"oid {oid}") if part)
        where = f" on {named}" if named else ""
        if path is not None:
            where = f" at {path or '/'}{where}"
        why = f" ({reason})" if reason else ""
        super().__init__(attempts, oid, class_name, reason, path)
        last = f"the last conflict was{where}" if where else "the last conflict named no object"
        self._message = (
            f"gave up after {attempts} attempt(s){why}: {last}; "
            "many threads writing the same object is a hot spot: spread the writes "
            "(snaptree mappings, Counter) or raise retries"
        )

    def __str__(self) -> str:
        return self._message


class MisuseError(Error):
    """The store was used in a way that would silently lose or corrupt data."""


class WrongThreadError(MisuseError):
    """A persistent object was changed, or a node read, outside the call that loaded it."""


class UnstorableValueError(Error, TypeError):
    """A value cannot be stored in the tree (or written in a format); ``path`` says where."""

    def __init__(self, path: str, detail: str):
        self.path = path
        self.detail = detail
        super().__init__(path, detail)

    def __str__(self) -> str:
        return f"{self.path or '/'}: {self.detail}"


class InputError(Error):
    """An import source is malformed or hostile; the message says where (line, column, path)."""


class ExportError(Error):
    """An export could not be written; earlier exports are untouched."""


class VerifyError(ExportError):
    """A dump does not match its manifest, or cannot be loaded."""
