"""Running a ZEO server for a FileStorage, so that several processes share one tree.

A FileStorage allows one writing process. To let writers and exporters in
several processes (or on several machines) use the same tree, one process
serves the file with ZEO and every other one opens ``zeo://host:port``;
their code does not change, only the URI.

The server listens on the loopback interface unless told otherwise: ZEO
has no user accounts, so anyone who can reach the port can read and change
the whole tree. Binding another address is an explicit choice, and should
come with TLS (ZEO's server TLS requires client certificates, so TLS is
also the access control); :class:`TLSOptions` is passed through to ZEO.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import zc.lockfile
from ZODB.FileStorage.FileStorage import FileStorageFormatError

from . import uris
from ._database import created_by_opening, not_a_filestorage, remove_created
from ._signals import stop_on_signals
from .errors import ArgumentError, Error, OpenError, StoreUnavailableError

log = logging.getLogger(__name__)

#: Where ``snaptree serve`` listens unless told otherwise.
DEFAULT_LISTEN = "127.0.0.1:8100"

#: The storage name ZEO clients ask for by default (``ClientStorage(storage='1')``).
STORAGE_NAME = "1"

#: The durability modes ``snaptree serve`` offers; the first is its default.
SERVE_DURABILITY = ("commit", "relaxed")

#: How far past the highest stored oid a starting server moves its oid counter
#: (see :func:`_skip_oids_handed_out_before`).
OID_SKIP = 1 << 24


@dataclass(frozen=True)
class TLSOptions:
    """The server side of ZEO's TLS, as ZEO's own ``<ssl>`` configuration section has it.

    ``certificate`` (and ``key``, unless the certificate file holds it) is
    the server's identity. ``authenticate`` is a CA file, or a directory of
    certificates, that every *client* certificate must verify against: ZEO
    requires client certificates, so only holders of one can connect.
    ``password_function`` is the dotted name of a function returning the
    key's passphrase, if it has one.
    """

    certificate: Path
    authenticate: Path
    key: Path | None = None
    password_function: str | None = None

    def context(self) -> ssl.SSLContext:
        """The server SSL context, built by ZEO's own ``server_ssl`` (ZEO 6.2)."""
        from ZEO.zconfig import server_ssl

        for what, path in (("certificate", self.certificate), ("authenticate", self.authenticate)):
            if not Path(path).exists():
                raise ArgumentError(f"TLS {what} {path} does not exist")
        section = SimpleNamespace(
            certificate=str(self.certificate),
            key=str(self.key) if self.key else None,
            authenticate=str(self.authenticate),
            password_function=self.password_function,
        )
        try:
            return server_ssl(section)
        except (OSError, ssl.SSLError) as exc:
            raise ArgumentError(f"cannot set up TLS from {self.certificate}: {exc}") from None


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8100"`` -> ``("127.0.0.1", 8100)``; ``[::1]:8100`` for IPv6; port 0 = any."""
    host, colon, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ArgumentError(
            f"listen address {text!r}: expected HOST:PORT such as 127.0.0.1:8100 "
            "(port 0 picks a free port; 0.0.0.0:PORT listens on every interface)"
        )
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True if *host* names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    """A ZEO server for one FileStorage, running on its own thread from start() to stop().

    ``listen`` port 0 picks a free port; :attr:`address` and :attr:`uri` say
    which once :meth:`start` returns. ``durability`` is ``"commit"`` (an
    fsync per commit, before the client hears it committed) or
    ``"relaxed"`` (fsynced every ``sync_every`` seconds: a machine crash may
    lose that window, a killed server nothing); ``"group"`` is refused, see
    :data:`SERVE_DURABILITY`.
    """

    def __init__(
        self,
        db: str | None,
        listen: str | tuple[str, int] = DEFAULT_LISTEN,
        *,
        tls: TLSOptions | None = None,
        read_only: bool = False,
        durability: str | None = None,
        sync_every: float | None = None,
    ) -> None:
        if durability is not None and durability not in SERVE_DURABILITY:
            raise ArgumentError(
                f"snaptree serve offers durability {' or '.join(SERVE_DURABILITY)}, not "
                f"{durability!r}: ZEO runs every commit on one thread and answers the "
                "client when the storage returns, so there is no fsync to share between "
                "commits (group commit would need ZEO to hold answers and invalidations "
                "back until the fsync); relaxed gives the throughput, commit the guarantee"
            )
        self._durability = uris.Durability(durability or "commit", sync_every)
        resolved = uris.resolve(db)
        if resolved.scheme != "file" or resolved.file_path is None:
            raise ArgumentError(
                f"cannot serve {resolved.display}: snaptree serve serves a FileStorage; "
                "give a file path (PostgreSQL needs no server of ours: open postgresql:// "
                "from every process)"
            )
        self.path = resolved.file_path
        self._resolved = resolved
        self._listen = parse_listen(listen) if isinstance(listen, str) else listen
        self._tls = tls
        self._read_only = read_only
        self._zeo: Any = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    @property
    def uri(self) -> str:
        """The ``zeo://host:port`` URI clients open (valid after :meth:`start`)."""
        if self.address is None:
            raise Error("the server has not started")
        host, port = self.address
        return f"zeo://[{host}]:{port}" if ":" in host else f"zeo://{host}:{port}"

    def start(self) -> tuple[str, int]:
        """Open the FileStorage, bind, and serve on a new thread; return the bound address."""
        from ._zeo_storage import SnaptreeStorageServer

        host, port = self._listen
        context = self._tls.context() if self._tls else None
        if not is_loopback(host) and context is None:
            log.warning(
                "listening on %s without TLS: anyone who can reach port %d can read and "
                "change the whole tree; use --tls-* options or a private network",
                host,
                port,
            )
        # A server that cannot start leaves no new store behind for the next open to find.
        created = created_by_opening(self.path)
        storage = self._open_storage(created)
        try:
            self._zeo = SnaptreeStorageServer(
                (host, port), {STORAGE_NAME: storage}, read_only=self._read_only, ssl=context
            )
        except OSError as exc:
            storage.close()
            remove_created(created)
            raise OpenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        except BaseException:
            storage.close()
            remove_created(created)
            raise
        # ZEO 6.2 reports the bound port in .addr when the host is not empty.
        self.address = (self._zeo.addr[0], self._zeo.addr[1])
        self._thread = threading.Thread(
            target=self._zeo.loop, name=f"snaptree ZEO server {self.uri}", daemon=True
        )
        self._thread.start()
        log.info(
            "serving %s at %s%s%s",
            self.path,
            self.uri,
            " with TLS" if context else "",
            " (read-only)" if self._read_only else f", durability {storage.durability}",
        )
        return self.address

    def _open_storage(self, created: list[Path]) -> Any:
        try:
            storage = uris.resolve(
                self.path, read_only=self._read_only, durability=self._durability
            ).factory()
            if not self._read_only:
                _skip_oids_handed_out_before(storage)
            return storage
        except FileStorageFormatError:
            remove_created(created)
            raise not_a_filestorage(str(self.path)) from None
        except zc.lockfile.LockError:
            raise StoreUnavailableError(
                f"cannot serve {self.path}: another process has it open (a FileStorage "
                "allows one); stop that process, or connect to its server with zeo://"
            ) from None
        except FileNotFoundError as exc:
            raise OpenError(f"cannot serve {self.path}: {exc.strerror}: {exc.filename}") from None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect clients, then close the storage and stop; wait up to *timeout* s.

        ZEO's ``StorageServer.close()`` closes the storage first and the
        client connections after, from the calling thread: a client between
        its vote and its ``tpc_finish`` then gets a non-retryable
        ``ValueError('closed')`` from the server, and a commit being
        written could be cut in two. So the whole stop runs *on* the
        server's event loop, between two requests: first every client
        connection is closed (the server aborts their unfinished
        transactions; the clients see a disconnect, which is retryable,
        and nothing they were not told was committed is committed), and
        only then does ``StorageServer.close()`` close the storage.
        """
        zeo, self._zeo = self._zeo, None
        if zeo is None:
            return
        # ZEO 6.2: the event loop StorageServer.loop() runs, and the per-storage
        # lists of client handlers whose .connection is the ServerProtocol.
        loop = zeo.acceptor.event_loop

        def disconnect_then_close() -> None:
            for handlers in zeo.zeo_storages_by_storage_id.values():
                for handler in list(handlers):
                    handler.connection.close()
            loop.call_soon(zeo.close)  # after the connection_lost callbacks just queued

        try:
            loop.call_soon_threadsafe(disconnect_then_close)
        except RuntimeError:  # the loop has already stopped
            zeo.close()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the ZEO server thread did not stop within %g s", timeout)
        log.info("stopped serving %s", self.path)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _skip_oids_handed_out_before(storage: Any) -> None:
    """Move the oid counter past every oid a previous server process may have handed out.

    A FileStorage reopened starts allocating after the highest oid it
    *stores*; oids the previous process handed out for objects not yet
    committed are forgotten. ZEO clients (6.2) fetch oids in batches of 100
    and keep the unused ones across a reconnection, so after a server
    restart the new process would hand the same oids to other clients: the
    first client to commit wins, and the other fails with the non-retryable
    "A different object already has the same oid" (found by
    tests/test_zeo.py's restart test). Skipping OID_SKIP oids at every start
    costs nothing (oids are 64-bit) and leaves no overlap unless some client
    held 16 million unused oids. ``new_oid`` and ``set_max_oid`` are
    BaseStorage's public methods.
    """
    from ZODB.utils import p64, u64

    storage.set_max_oid(p64(u64(storage.new_oid()) + OID_SKIP))


def serve(
    db: str | None,
    listen: str = DEFAULT_LISTEN,
    *,
    tls: TLSOptions | None = None,
    read_only: bool = False,
    on_listening: Callable[[Server], None] | None = None,
    durability: str | None = None,
    sync_every: float | None = None,
) -> None:
    """Serve *db* over ZEO until SIGINT or SIGTERM, then stop cleanly. Main thread only.

    ``on_listening`` is called once the server accepts connections (with
    port 0 that is when the port is known).
    """
    with stop_on_signals() as stop:
        server = Server(
            db, listen, tls=tls, read_only=read_only, durability=durability, sync_every=sync_every
        )
        server.start()
        try:
            if on_listening is not None:
                on_listening(server)
            # A bounded wait, so that a server thread that died is noticed too.
            while not stop.wait(1.0) and server.running:
                pass
            if stop.received:
                log.info("received %s, stopping", stop.received)
            elif not server.running:
                raise Error(f"the ZEO server for {server.path} stopped unexpectedly")
        finally:
            server.stop()
