"""snaptree: a shared object tree in ZODB that many threads change while it is dumped safely."""

from importlib.metadata import PackageNotFoundError, version

from .errors import (
    ArgumentError,
    Error,
    ExportError,
    InputError,
    MisuseError,
    OpenError,
    RetriesExhausted,
    StoreClosedError,
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

try:
    __version__ = version("snaptree")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

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
