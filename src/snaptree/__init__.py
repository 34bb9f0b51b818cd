"""snaptree: a shared object tree in ZODB that many threads change while it is dumped safely."""

from importlib.metadata import PackageNotFoundError, version

from .errors import (
    Error,
    MisuseError,
    OpenError,
    RetriesExhausted,
    UnstorableValueError,
    WrongThreadError,
)
from .retry import RetryPolicy
from .store import Snapshot, Store, open, read_current
from .tree import Counter, FlatMapping, List, Mapping, to_persistent, to_plain

try:
    __version__ = version("snaptree")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Counter",
    "Error",
    "FlatMapping",
    "List",
    "Mapping",
    "MisuseError",
    "OpenError",
    "RetriesExhausted",
    "RetryPolicy",
    "Snapshot",
    "Store",
    "UnstorableValueError",
    "WrongThreadError",
    "__version__",
    "open",
    "read_current",
    "to_persistent",
    "to_plain",
]
