"""``snaptree serve``: a ZEO server for a FileStorage."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from ..errors import ArgumentError
from ..server import DEFAULT_LISTEN, Server, TLSOptions, parse_listen, serve
from .options import durability_options

_path = click.Path(dir_okay=False, path_type=Path)


def _listen(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        parse_listen(value)
    except ArgumentError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@click.command("serve")
@click.option(
    "--db",
    "db",
    metavar="FILE",
    default=None,
    help="FileStorage to serve. Default: $SNAPTREE_DB, else ./data/snaptree.fs.",
)
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    callback=_listen,
    help="Address to listen on. Port 0 picks a free port. Anything but loopback "
    "exposes the whole tree: use TLS.",
)
@click.option("--tls-certificate", type=_path, help="Server certificate (PEM), enables TLS.")
@click.option("--tls-key", type=_path, help="Its private key, unless the certificate holds it.")
@click.option(
    "--tls-authenticate",
    type=click.Path(path_type=Path),
    help="CA file or directory that client certificates must verify against (required "
    "with TLS: ZEO only accepts clients with a certificate).",
)
@click.option("--read-only", is_flag=True, help="Refuse every write.")
@durability_options
def serve_command(
    db: str | None,
    listen: str,
    tls_certificate: Path | None,
    tls_key: Path | None,
    tls_authenticate: Path | None,
    read_only: bool,
    durability: dict[str, Any],
) -> None:
    """Serve a FileStorage over ZEO so that several processes can share the tree.

    Prints the URI to open (zeo://HOST:PORT) on stdout once it listens, logs
    on stderr, and stops cleanly on Ctrl-C or SIGTERM. --durability is
    commit (the default: an fsync per commit) or relaxed; group is refused
    (ZEO commits on one thread: there is no fsync to share).

    Example:

    \b
        snaptree serve --db data/snaptree.fs --listen 127.0.0.1:8100
    \b
        SNAPTREE_DB=zeo://127.0.0.1:8100 python my_writer.py
    """
    tls = None
    if tls_certificate or tls_key or tls_authenticate:
        if not (tls_certificate and tls_authenticate):
            raise click.UsageError("TLS needs --tls-certificate and --tls-authenticate")
        tls = TLSOptions(certificate=tls_certificate, authenticate=tls_authenticate, key=tls_key)
    server_log = logging.getLogger("snaptree.server")
    if server_log.getEffectiveLevel() > logging.INFO:
        server_log.setLevel(logging.INFO)  # where it listens is always worth a line

    def announce(server: Server) -> None:
        click.echo(server.uri)

    serve(db, listen, tls=tls, read_only=read_only, on_listening=announce, **durability)


commands = [serve_command]
