"""snaptree: a shared object tree in ZODB that many threads change while it is dumped safely."""

from ._version import version
from .errors import (
    ArgumentError,
    Error,
    ExportError,
    InputError,
    MisuseError,
    OpenError,
    RetriesExhausted,
    StoreClosedError,
    StoreUnavailableError,
    UnstorableValueError,
    VerifyError,
    WrongThreadError,
)
from .exports import ExportInfo, verify
from .imports import ImportResult, load_source
from .retry import RetryPolicy
from .schedule import Exporter, RunResult
from .store import Snapshot, Store, open, read_current
from .tree import Counter, FlatMapping, List, Mapping, Set, to_persistent, to_plain


def __getattr__(name: str) -> str:
    if name == "__version__":  # read when asked for: see _version.py
        return version()
    raise AttributeError(f"module 'snaptree' has no attribute {name!r}")


__all__ = [
    "ArgumentError",
    "Counter",
    "Error",
    "ExportError",
    "ExportInfo",
    "Exporter",
    "FlatMapping",
    "ImportResult",
    "InputError",
    "List",
    "Mapping",
    "MisuseError",
    "OpenError",
    "RetriesExhausted",
    "RetryPolicy",
    "RunResult",
    "Set",
    "Snapshot",
    "Store",
    "StoreClosedError",
    "StoreUnavailableError",
    "UnstorableValueError",
    "VerifyError",
    "WrongThreadError",
    "__version__",
    "load_source",
    "open",
    "read_current",
    "to_persistent",
    "to_plain",
    "verify",
]
