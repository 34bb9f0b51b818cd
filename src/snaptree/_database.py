"""From a URI to an open ZODB database: the storage, its failures as one-line errors, the DB.

Storages fail to open in many ways (a file that is no FileStorage, a lock
held by another process, a server that does not answer, a driver's
multi-line message with the password in it); each becomes one
:class:`~snaptree.OpenError` (or :class:`~snaptree.StoreUnavailableError`,
which may go away by itself) naming the URI with its password masked, and a
failed open leaves the directory as it found it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple

import zc.lockfile
from ZODB import DB
from ZODB.FileStorage.FileStorage import FileStorageFormatError
from ZODB.POSException import ReadOnlyError

from . import _file_follower, uris
from ._connection import OwnedConnection
from ._storage_facts import is_client_of_a_server
from .errors import OpenError, StoreUnavailableError, one_line


class _DB(DB):
    klass = OwnedConnection  # ZODB's documented hook for the connection class


class Database(NamedTuple):
    """An open database and how to name it."""

    db: DB
    source: str  # the URI with its password masked: for people
    shareable_uri: str | None  # what another process opens, password included (ZEO, RelStorage)


def open_database(
    uri: str | os.PathLike[str] | None,
    *,
    read_only: bool,
    pool_size: int,
    cache_size: int | None,
    default_cache_size: int,
    durability: uris.Durability | None = None,
) -> Database:
    """Open the storage *uri* names and a DB over it with snaptree's connection class.

    ``cache_size`` is each connection's object cache: the argument if given,
    else what the URI says, else *default_cache_size*. *durability* applies
    to a FileStorage opened for writing (see :func:`snaptree.uris.resolve`).
    """
    resolved = uris.resolve(uri, read_only=read_only, durability=durability or uris.Durability())
    factory = resolved.factory
    created = created_by_opening(resolved.file_path)
    try:
        # A live file's index is stale on every read-only open (docs/export.md).
        quiet = _file_follower.expected_stale_index() if read_only else contextlib.nullcontext()
        with quiet:
            storage = factory()
    except FileStorageFormatError:
        remove_created(created)
        raise not_a_filestorage(resolved.display) from None
    except zc.lockfile.LockError:
        raise StoreUnavailableError(
            f"cannot open {resolved.display}: another process has it open (FileStorage "
            "allows one writer); stop that process, or serve the file with "
            "`snaptree serve` and connect to it with zeo://"
        ) from None
    except FileNotFoundError as exc:
        raise OpenError(f"cannot open {resolved.display}: {exc.strerror}: {exc.filename}") from None
    except OpenError as exc:  # the resolver's own clear line (a ZEO server not answering)
        raise type(exc)(f"cannot open {resolved.display}: {exc}") from None
    except Exception as exc:
        # Scrubbed before it is made one line: joining strips the lines, and a
        # password at a line's edge would no longer match.
        reason = one_line(uris.scrub(str(exc), str(uri)))
        unreachable = (
            isinstance(exc, ConnectionError) or _is_driver_connection_error(exc)
        ) and not any(wrong in reason for wrong in _WRONG_URI)
        kind = StoreUnavailableError if unreachable else OpenError
        raise kind(f"cannot open {resolved.display}: {reason}") from exc
    db_kwargs = dict(resolved.db_kwargs)
    # ZODB bounds historical connections per moment asked for, and keeps an idle
    # one 300 s: each snapshot at another moment would hold a connection (on
    # PostgreSQL a server connection) for that long. Dropped at the next open.
    db_kwargs.update(pool_size=pool_size, historical_pool_size=pool_size, historical_timeout=0)
    if cache_size is not None:
        db_kwargs["cache_size"] = cache_size
    db_kwargs.setdefault("cache_size", default_cache_size)
    try:
        _file_follower.settle(storage)
        db = _DB(storage, **db_kwargs)
    except ReadOnlyError:
        storage.close()
        raise OpenError(
            f"cannot open {resolved.display} read-only: nothing has been committed to it yet "
            "(ZODB would have to create the root object)"
        ) from None
    except _file_follower.FileReplaced:
        storage.close()
        raise OpenError(
            f"cannot open {resolved.display}: the file was replaced (packed?) while it was "
            "being opened; open it again"
        ) from None
    except Exception:
        storage.close()
        raise
    shareable = str(uri) if is_client_of_a_server(storage) else None
    return Database(db, resolved.display, shareable)


#: What PostgreSQL answers when the URI itself is wrong (a database or user name with a
#: typo, a bad password): trying again later will not help, so not "unavailable".
_WRONG_URI = ("does not exist", "authentication failed", "no pg_hba.conf entry")


def _is_driver_connection_error(exc: BaseException) -> bool:
    """psycopg2's OperationalError: the server refused or did not answer (PEP 249's name)."""
    return type(exc).__name__ == "OperationalError" and type(exc).__module__.startswith("psycopg")


def created_by_opening(path: Path | None) -> list[Path]:
    """The files opening the FileStorage *path* would create: it and its companions, if absent."""
    if path is None:
        return []
    files = [path, *(path.with_name(path.name + ext) for ext in (".lock", ".tmp", ".index"))]
    return [file for file in files if not file.exists()]


def remove_created(paths: list[Path]) -> None:
    """Remove files a failed open created, so that it leaves the directory as it was."""
    for path in paths:
        path.unlink(missing_ok=True)


def not_a_filestorage(display: str) -> OpenError:
    return OpenError(
        f"cannot open {display}: it is not a FileStorage file (ZODB's header is missing); "
        "name a Data.fs written by ZODB, or a new file"
    )
