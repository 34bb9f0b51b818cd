"""snaptree: a shared object tree in ZODB that many threads change while it is dumped safely.

The public API, and nothing else. The errors are imported at once (every
caller catches them, and they cost nothing); every other name is imported
from its module the first time it is used, so that ``import snaptree``, the
command line's start (``snaptree --help``) and the pytest plugin pay only
for what they use: ZODB, BTrees and the export machinery are a few hundred
milliseconds an interpreter would otherwise spend on every start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ArgumentError,
    DurabilityError,
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

if TYPE_CHECKING:  # what the names below are, for type checkers and readers
    from .export_run import RunResult
    from .imports import ImportResult, load_source
    from .manifest import ExportInfo, verify
    from .monitoring import DumpStatus, dump_status
    from .retention import Retention, prune
    from .retry import RetryPolicy
    from .schedule import Exporter
    from .store import Snapshot, Store, open, read_current
    from .tree import Counter, FlatMapping, List, Mapping, Set, to_persistent, to_plain

#: The module each name is imported from when first used.
_LAZY = {
    "RunResult": "export_run",
    "ImportResult": "imports",
    "load_source": "imports",
    "ExportInfo": "manifest",
    "verify": "manifest",
    "DumpStatus": "monitoring",
    "dump_status": "monitoring",
    "Retention": "retention",
    "prune": "retention",
    "RetryPolicy": "retry",
    "Exporter": "schedule",
    "Snapshot": "store",
    "Store": "store",
    "open": "store",
    "read_current": "store",
    "Counter": "tree",
    "FlatMapping": "tree",
    "List": "tree",
    "Mapping": "tree",
    "Set": "tree",
    "to_persistent": "tree",
    "to_plain": "tree",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":  # read from the installed metadata: see _version.py
        from ._version import version

        return version()
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'snaptree' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup finds it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "ArgumentError",
    "Counter",
    "DumpStatus",
    "DurabilityError",
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
    "Retention",
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
    "dump_status",
    "load_source",
    "open",
    "prune",
    "read_current",
    "to_persistent",
    "to_plain",
    "verify",
]
