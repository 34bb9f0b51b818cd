"""Turning a URI or a path into a ZODB storage, and printing URIs without passwords.

zodburi already resolves ``file://``, ``memory://``, ``zeo://`` and
``zconfig://``, and RelStorage registers ``postgres://``; snaptree reuses
them and adds what users expect on top: a bare path means a FileStorage,
``postgresql://`` is accepted as an alias, and every error names the URI
with its password masked (zodburi's own errors print the raw URI).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import zodburi

from .errors import OpenError

DEFAULT_PATH = Path("data") / "snaptree.fs"
ENV_VAR = "SNAPTREE_DB"

_ALIASES = {"postgresql": "postgres"}


def redact(uri: str) -> str:
    """Return *uri* with any password replaced by ``***``."""
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return uri.split("://", 1)[0] + "://***"
    if not password:
        return uri
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def default_uri() -> str:
    """``$SNAPTREE_DB`` if set, else ``./data/snaptree.fs``."""
    return os.environ.get(ENV_VAR) or str(DEFAULT_PATH)


@dataclass(frozen=True)
class Resolved:
    """What :func:`resolve` found: a storage factory and how to name it."""

    factory: Callable[[], Any]
    db_kwargs: dict[str, Any]
    display: str
    scheme: str
    file_path: Path | None = None


def _file_uri(path: str) -> str:
    return "file://" + os.path.abspath(os.path.expanduser(path))


def resolve(uri: str | os.PathLike[str] | None, *, create_default_dir: bool = True) -> Resolved:
    """Resolve *uri* (or the default) to a storage factory, checking what can be checked early."""
    if uri is None:
        uri = default_uri()
        if create_default_dir and "://" not in uri:
            Path(uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
    uri = os.fspath(uri)
    display = redact(uri)
    if "://" not in uri:
        uri = _file_uri(uri)
    scheme = uri.split("://", 1)[0].lower()
    uri = _ALIASES.get(scheme, scheme) + uri[len(scheme) :]
    scheme = _ALIASES.get(scheme, scheme)

    file_path = None
    if scheme == "memory":
        return Resolved(_memory_factory(uri), {}, display, scheme)
    if scheme == "file":
        file_path = Path(uri[len("file://") :].split("?", 1)[0])
        if not file_path.parent.is_dir():
            raise OpenError(
                f"cannot open {display}: directory {file_path.parent} does not exist; "
                "create it first, or choose another path"
            )
        if file_path.is_dir():
            raise OpenError(f"cannot open {display}: it is a directory; name a file inside it")
    try:
        factory, db_kwargs = zodburi.resolve_uri(uri)
    except zodburi.NoResolverForScheme:
        raise OpenError(
            f"cannot open {display}: unknown URI scheme {scheme!r}; use a file path, "
            "file://, memory://, zeo://host:port, postgresql://user@host/db or zconfig://"
        ) from None
    except Exception as exc:  # zodburi and RelStorage raise all sorts, with the raw URI in them
        raise OpenError(f"cannot open {display}: {scrub(str(exc), uri)}") from None
    return Resolved(factory, db_kwargs, display, scheme, file_path)


def _memory_factory(uri: str) -> Callable[[], Any]:
    from ._memory import ResolvingMappingStorage

    name = uri[len("memory://") :].split("?", 1)[0]
    return lambda: ResolvingMappingStorage(name or "memory")


def scrub(text: str, uri: str) -> str:
    """Remove *uri*'s password from a message that may quote it."""
    try:
        password = urlsplit(uri).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text
