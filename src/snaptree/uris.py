"""Turning a URI or a path into a ZODB storage, and printing URIs without passwords.

zodburi already resolves ``file://``, ``memory://``, ``zeo://`` and
``zconfig://``, and RelStorage registers ``postgres://``; snaptree reuses
them and adds what users expect on top: a bare path means a FileStorage,
``postgresql://`` is accepted as an alias, and every error names the URI
with its password masked (zodburi's own errors print the raw URI).

Two resolvers needed more than an alias:

* ``zeo://``: ClientStorage waits 30 s for a server that is not there and
  then raises a bare "timed out waiting for connection". snaptree waits
  :data:`ZEO_WAIT_TIMEOUT` seconds unless the URI says ``?wait_timeout=``,
  and says which address did not answer and what to do. The same timeout
  bounds how long a call blocks while a running server restarts before it
  fails with the (retried) ``ClientDisconnected``. And snaptree turns on
  ClientStorage's ``server_sync`` (``?server_sync=0`` turns it off, which
  zodburi's resolver cannot even express): without it a transaction may
  begin before the invalidations of a commit another process has already
  finished arrive, and not see that commit; threads in one process always
  see each other's finished commits, and so do snaptree's ZEO clients, for
  one round trip per transaction.
* ``postgresql://``: RelStorage's resolver (4.3) writes every URI part into
  the libpq DSN, absent ones as the string ``'None'``, so
  ``postgresql://user@host/db`` fails with 'invalid integer value "None"
  for connection option "port"' and a URI without a password sends the
  password "None" instead of using ``~/.pgpass``. snaptree builds the DSN
  from the parts that are present (with psycopg2's quoting) and keeps
  RelStorage's own handling of every storage option (``keep_history``,
  ``cache_local_mb``, ...).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import zodburi
from zodburi.datatypes import convert_bytesize

from .errors import ArgumentError, OpenError, StoreUnavailableError

DEFAULT_PATH = Path("data") / "snaptree.fs"
ENV_VAR = "SNAPTREE_DB"

_ALIASES = {"postgresql": "postgres"}

#: Seconds a ``zeo://`` store waits for its server (at open, and during a
#: reconnection) unless the URI sets ``?wait_timeout=``. ZEO's own default is 30.
ZEO_WAIT_TIMEOUT = 10

#: Seconds libpq waits to connect unless the URI sets ``?connect_timeout=``
#: (libpq's own default is to wait as long as TCP does).
POSTGRES_CONNECT_TIMEOUT = 10

#: The schemes snaptree opens (after aliases); ``demo`` is zodburi's DemoStorage.
_SCHEMES = frozenset({"file", "memory", "zeo", "postgres", "zconfig", "demo"})
_SUPPORTED = (
    "use a file path, file://, memory://, zeo://host:port, postgresql://user@host/db or zconfig://"
)

#: Query options that carry secrets (ZEO accepts ``password=`` for old configs).
_SECRET_OPTIONS = frozenset({"password", "passwd"})


def _misplaced_userinfo(uri: str) -> str | None:
    """The user part of *uri* when a URI parser would split it wrongly, else None.

    A password with an unencoded ``#``, ``/``, ``?`` or ``@`` (or ``[``) makes
    ``urlsplit`` end the authority inside it: ``app:se#cret@host`` becomes
    the host ``app``, the port ``se`` and the fragment ``cret@host``, and
    every later message quotes a piece of the password. The tell is an
    ``@`` after the authority the parser found (or a parse that fails
    outright): everything between ``//`` and the last ``@`` is then taken
    as the user part, which over-masks rather than shows a secret.
    """
    _, sep, rest = uri.partition("://")
    if not sep or rest.startswith("/") or "@" not in rest:
        return None  # no authority (file:///path), or no user part in it
    try:
        netloc = urlsplit(uri).netloc
    except ValueError:
        return rest.rpartition("@")[0]
    if "@" in rest[len(netloc) :]:
        return rest.rpartition("@")[0]
    return None


def redact(uri: str) -> str:
    """Return *uri* with any password (in the user part or the query) replaced by ``***``.

    When the user part cannot be told apart (see :func:`_misplaced_userinfo`),
    all of it is masked; a URI that does not parse at all is masked after
    its scheme.
    """
    if "://" not in uri:
        return uri
    userinfo = _misplaced_userinfo(uri)
    if userinfo is not None:
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://***{rest[len(userinfo) :]}"
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return uri.split("://", 1)[0] + "://***"
    secret_query = any(name.lower() in _SECRET_OPTIONS for name, _ in parse_qsl(parts.query, True))
    if not password and not secret_query:
        return uri  # as written: urlunsplit would turn sqlite:///x into sqlite:/x
    if password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{password}@", ":***@", 1))
    if secret_query:
        query = [
            (name, "***" if name.lower() in _SECRET_OPTIONS else value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        # An unencoded '#' in a password option starts a fragment: mask that too.
        parts = parts._replace(
            query=urlencode(query, safe="*"), fragment="***" if parts.fragment else ""
        )
    return urlunsplit(parts)


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
    """The file:// URI of a path, percent-encoded as ``Path.as_uri()`` has it."""
    return "file://" + quote(os.path.abspath(os.path.expanduser(path)))


def _file_parts(uri: str) -> tuple[str, str]:
    """The path (percent-decoded) and the query of a file:// URI.

    ``Path("my store.fs").as_uri()`` writes the space as %20: read without
    decoding, that URI would name another, new file beside the store.
    """
    path, _, query = uri[len("file://") :].partition("?")
    return unquote(path), query


@dataclass(frozen=True)
class Durability:
    """How a writable FileStorage makes commits durable (see snaptree._durable_file).

    ``None`` leaves a setting to the URI's query, else to the default.
    """

    durability: str | None = None
    sync_every: float | None = None
    save_index_every: int | None = None

    def given(self) -> bool:
        return any(value is not None for value in dataclasses.astuple(self))


def resolve(
    uri: str | os.PathLike[str] | None,
    *,
    create_default_dir: bool = True,
    read_only: bool = False,
    durability: Durability | None = None,
) -> Resolved:
    """Resolve *uri* (or the default) to a storage factory, checking what can be checked early.

    *read_only* and *durability* (the caller's own settings, which win over
    the URI's) apply to FileStorage; a memory:// store has nothing to make
    durable and ignores them, and servers (zeo://, postgresql://) decide
    durability themselves, so asking them for one is an ArgumentError.
    """
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
    if scheme not in _SCHEMES:
        # zodburi also resolves RelStorage's mysql://, sqlite:// and oracle://,
        # which fail later with a list of drivers or a missing option.
        kind = "unsupported" if scheme in ("mysql", "sqlite", "oracle") else "unknown"
        raise OpenError(f"cannot open {display}: {kind} URI scheme {scheme!r}; {_SUPPORTED}")
    if _misplaced_userinfo(uri) is not None or (scheme in ("zeo", "postgres") and "#" in uri):
        raise OpenError(
            f"cannot open {display}: a '#', or an '@' after the host part, means a user "
            "name, password or option holds a character URIs reserve; percent-encode it "
            "(@ as %40, # as %23, / as %2F, ? as %3F, % as %25)"
        )

    durability = durability or Durability()
    file_path = None
    if scheme == "memory":
        return Resolved(_memory_factory(uri), {}, display, scheme)
    if durability.given() and scheme != "file":
        raise ArgumentError(
            f"durability settings apply to a FileStorage, not to {display}: a ZEO server "
            "chooses its own (`snaptree serve --durability`), PostgreSQL has "
            "synchronous_commit"
        )
    if scheme == "file":
        file_path = Path(_file_parts(uri)[0])
        if not file_path.parent.is_dir():
            raise OpenError(
                f"cannot open {display}: directory {file_path.parent} does not exist; "
                "create it first, or choose another path"
            )
        if file_path.is_dir():
            raise OpenError(f"cannot open {display}: it is a directory; name a file inside it")
    try:
        if scheme == "file":
            factory, db_kwargs = _resolve_file(uri, display, read_only, durability)
        elif scheme == "postgres":
            factory, db_kwargs = _resolve_postgres(uri, display)
        else:
            factory, db_kwargs = (
                _resolve_zeo(uri, display) if scheme == "zeo" else zodburi.resolve_uri(uri)
            )
    except (OpenError, ArgumentError):
        raise
    except Exception as exc:  # zodburi and RelStorage raise all sorts, with the raw URI in them
        raise OpenError(f"cannot open {display}: {scrub(str(exc), uri)}") from None
    return Resolved(factory, db_kwargs, display, scheme, file_path)


#: The FileStorage options a file:// URI may carry besides the durability settings.
_FILE_OPTIONS = "read_only, quota, blobstorage_dir, blobstorage_layout"
_FLAGS = {"1": True, "on": True, "true": True, "yes": True, "0": False, "off": False}
_FLAGS.update({"false": False, "no": False, "": False})


def _resolve_file(
    uri: str, display: str, read_only: bool, given: Durability
) -> tuple[Callable[[], Any], dict[str, Any]]:
    """A FileStorage factory: read-only as ZODB has it, writable with a durability mode.

    Not zodburi's resolver: it builds a plain FileStorage, and knows
    nothing of durability (``?durability=relaxed&sync_every=0.05``; the
    caller's own settings win over the URI's).
    """
    from ._durable_file import (
        DEFAULT_DURABILITY,
        DEFAULT_SAVE_INDEX_EVERY,
        DEFAULT_SYNC_EVERY,
        check_durability,
    )

    path, query = _file_parts(uri)
    options = dict(parse_qsl(query, keep_blank_values=True))

    def flag(name: str) -> bool:
        value = options.pop(name, "0").strip().lower()
        if value not in _FLAGS:
            raise OpenError(f"cannot open {display}: {name} must be 0 or 1, not {value!r}")
        return _FLAGS[value]

    def number(name: str, convert: Callable[[str], Any], default: Any) -> Any:
        value = options.pop(name, None)
        if value is None:
            return default
        try:
            return convert(value)
        except ValueError:
            raise OpenError(f"cannot open {display}: {name}={value!r} is not a number") from None

    read_only = flag("read_only") or read_only
    if flag("create"):
        raise OpenError(
            f"cannot open {display}: create=1 empties the file if it holds a store (ZODB's "
            "meaning); snaptree creates a missing store by itself: leave the option out"
        )
    storage_kw: dict[str, Any] = {}
    quota = number("quota", convert_bytesize, None)
    if quota is not None:
        storage_kw["quota"] = quota
    blob_dir = options.pop("blobstorage_dir", None)
    blob_layout = options.pop("blobstorage_layout", "automatic")
    if options.pop("demostorage", None) is not None:
        raise OpenError(f"cannot open {display}: demostorage is not supported; use demo://")
    in_uri = {
        "durability": options.pop("durability", DEFAULT_DURABILITY),
        "sync_every": number("sync_every", float, DEFAULT_SYNC_EVERY),
        "save_index_every": number("save_index_every", convert_bytesize, DEFAULT_SAVE_INDEX_EVERY),
    }
    try:
        check_durability(**in_uri)
    except ArgumentError as exc:
        raise OpenError(f"cannot open {display}: {exc}") from None
    settings = {
        name: in_uri[name] if value is None else value
        for name, value in dataclasses.asdict(given).items()
    }
    check_durability(**settings)
    db_kwargs = _db_kwargs(
        options,
        display,
        f"FileStorage options ({_FILE_OPTIONS}, durability, sync_every, save_index_every)",
    )

    def factory() -> Any:
        from ZODB.FileStorage import FileStorage

        from ._durable_file import DurableFileStorage

        if read_only:
            storage = FileStorage(path, read_only=True)
        else:
            storage = DurableFileStorage(path, **storage_kw, **settings)
        if blob_dir is None:
            return storage
        from ZODB.blob import BlobStorage

        return BlobStorage(blob_dir, storage, layout=blob_layout)

    return factory, db_kwargs


def _memory_factory(uri: str) -> Callable[[], Any]:
    from ._memory import ResolvingMappingStorage

    name = uri[len("memory://") :].split("?", 1)[0]
    return lambda: ResolvingMappingStorage(name or "memory")


def scrub(text: str, uri: str) -> str:
    """Remove *uri*'s passwords (user part, query, percent-encoded or not) from *text*."""
    userinfo = _misplaced_userinfo(uri)
    if userinfo is not None:
        secrets = {userinfo, userinfo.partition(":")[2]} - {""}
    else:
        try:
            parts = urlsplit(uri)
            secrets = {parts.password} if parts.password else set()
            query_secrets = [  # as written (p%26w) and decoded (p&w): messages quote both
                value
                for name, raw in (part.partition("=")[::2] for part in parts.query.split("&"))
                if unquote(name).lower() in _SECRET_OPTIONS and raw
                for value in (raw, unquote(raw.replace("+", " ")))
            ]
            secrets.update(query_secrets)
            if query_secrets and parts.fragment:  # the rest of a password holding '#'
                secrets.add(parts.fragment)
        except ValueError:
            return text
    for secret in sorted(secrets | {unquote(s) for s in secrets}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _with_default(uri: str, option: str, value: object) -> str:
    """Add ``option=value`` to *uri*'s query unless it already sets it."""
    base, _, query = uri.partition("?")
    if any(name == option for name, _ in parse_qsl(query, keep_blank_values=True)):
        return uri
    return f"{base}?{query}&{option}={value}" if query else f"{base}?{option}={value}"


def _resolve_zeo(uri: str, display: str) -> tuple[Callable[[], Any], dict[str, Any]]:
    """zodburi's ClientStorage options, snaptree's defaults (see the module docstring)."""
    from zodburi.resolvers import ClientStorageURIResolver

    uri = _with_default(uri, "wait_timeout", ZEO_WAIT_TIMEOUT)
    parts = urlsplit(uri.replace("zeo://", "http://", 1))
    if parts.netloc:  # the address, as zodburi 3.0 reads it
        address: Any = (parts.hostname or "", parts.port or 9991)
    else:
        address = os.path.normpath(parts.path)
    resolver = ClientStorageURIResolver()
    # zodburi 3.0 keeps the options it converts to int in _int_args (a class
    # attribute, shadowed here on this instance only); server_sync is not one.
    resolver._int_args = (*resolver._int_args, "server_sync")
    kw, unused = resolver.interpret_kwargs(dict(parse_qsl(parts.query)))
    if kw.pop("demostorage", None):
        raise OpenError(f"cannot open {display}: demostorage is not supported; use demo://")
    if kw["wait_timeout"] < 1:  # ZEO 6.2 takes 0 for its own default: 30 s
        raise OpenError(
            f"cannot open {display}: wait_timeout must be at least 1 (seconds), "
            f"not {kw['wait_timeout']}"
        )
    server_sync = bool(kw.pop("server_sync", 1))

    def open_client() -> Any:
        from ZEO.ClientStorage import ClientStorage

        return ClientStorage(address, server_sync=server_sync, **kw)

    options = "ClientStorage options (wait_timeout, server_sync, cache_size, read_only, ...)"
    return _zeo_factory(open_client, uri), _db_kwargs(unused, display, options)


def _zeo_factory(open_client: Callable[[], Any], uri: str) -> Callable[[], Any]:
    """Wrap the ClientStorage factory so that an absent server is a clear OpenError."""
    parts = urlsplit(uri.replace("zeo://", "http://", 1))
    address = parts.netloc.rpartition("@")[2] if parts.netloc else parts.path
    wait = dict(parse_qsl(parts.query)).get("wait_timeout", ZEO_WAIT_TIMEOUT)

    def factory() -> Any:
        from ZEO.Exceptions import ClientDisconnected

        try:
            return open_client()
        except ClientDisconnected:
            raise StoreUnavailableError(
                f"no ZEO server answered at {address} within {wait} s; start one with "
                f"`snaptree serve --listen {address}` (or check the address), or wait "
                "longer with ?wait_timeout=SECONDS"
            ) from None

    return factory


def _resolve_postgres(uri: str, display: str) -> tuple[Callable[[], Any], dict[str, Any]]:
    """RelStorage on PostgreSQL: RelStorage's option handling, snaptree's DSN."""
    from relstorage.zodburi_resolver import PostgreSQLAdapterHelper, RelStorageURIResolver

    class _PostgreSQLDSN(PostgreSQLAdapterHelper):
        """Build the libpq DSN from the URI parts that are present (see the module docstring)."""

        _int_args = ("connect_timeout",)
        _string_args = ("sslmode", "ssl_mode", "sslrootcert", "sslcert", "sslkey")

        def __call__(self, parsed_uri: Any, kw: dict[str, str]) -> tuple[Any, dict[str, str]]:
            from psycopg2.extensions import make_dsn

            libpq, unused = self.interpret_kwargs(kw)
            if "ssl_mode" in libpq:  # RelStorage's spelling of libpq's sslmode
                libpq.setdefault("sslmode", libpq.pop("ssl_mode"))
            libpq.setdefault("connect_timeout", POSTGRES_CONNECT_TIMEOUT)
            parts = {
                "dbname": unquote(parsed_uri.path[1:]) or None,
                "user": unquote(parsed_uri.username) if parsed_uri.username else None,
                "password": unquote(parsed_uri.password) if parsed_uri.password else None,
                "host": parsed_uri.hostname,
                "port": parsed_uri.port,
                **libpq,
            }
            dsn = make_dsn(**{name: value for name, value in parts.items() if value is not None})

            def adapter(options: Any) -> Any:
                from relstorage.adapters.postgresql import PostgreSQLAdapter

                return PostgreSQLAdapter(dsn=dsn, options=options)

            return adapter, unused

    open_storage, unused = RelStorageURIResolver(_PostgreSQLDSN())(uri)
    history_free = dict(parse_qsl(urlsplit(uri).query)).get("keep_history", "").lower() in (
        *("0", "false", "no", "off"),
    )

    def factory() -> Any:
        """Open, turning RelStorage's two ways of reporting the wrong history mode into one."""
        try:
            return open_storage()
        except Exception as exc:
            text = str(exc)
            # RelStorage 4.3: history-free URI on a history-preserving database says
            # "Schema mismatch"; the reverse fails creating current_object's foreign key.
            if "Schema mismatch" in text or 'referenced table "object_state"' in text:
                mode, other = (
                    ("history-free", "without keep_history=false")
                    if history_free
                    else ("history-preserving", "with keep_history=false")
                )
                raise OpenError(
                    f"{display} was not created {mode}; open it {other}, or convert it "
                    "with RelStorage's zodbconvert"
                ) from None
            raise

    return factory, _db_kwargs(
        unused,
        display,
        "RelStorage options (keep_history, cache_local_mb, commit_lock_timeout, ...), "
        "libpq options (connect_timeout, sslmode, sslrootcert, sslcert, sslkey)",
    )


def _db_kwargs(unused: dict[str, str], display: str, storage_options: str) -> dict[str, Any]:
    """The ZODB.DB arguments among the URI options no storage took, as zodburi reads them."""
    # zodburi.resolve_uri's defaults, so that every scheme starts from the same DB settings.
    db_kwargs: dict[str, Any] = {"cache_size": 10000, "database_name": "unnamed"}
    for name, value in unused.items():
        if name not in zodburi.PARAMETERS:
            raise OpenError(
                f"cannot open {display}: unknown option {name!r}; {storage_options} "
                "and ZODB options (connection_cache_size, ...) are accepted"
            )
        target = zodburi.PARAMETERS[name]
        if target in zodburi.BYTES_PARAMETERS:
            db_kwargs[target] = convert_bytesize(value)
        else:
            db_kwargs[target] = value if target == "database_name" else int(value)
    return db_kwargs
