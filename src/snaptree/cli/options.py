"""Options shared by several commands."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

db_option = click.option(
    "--db",
    "db",
    metavar="URI",
    default=None,
    help="Store to use: a path, file://, memory://, zeo://host:port, postgresql://... "
    "Default: $SNAPTREE_DB, else ./data/snaptree.fs.",
)

allow_option = click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="MODULE:CLASS",
    help="Let a pickle (or a zodb-format export) contain this class too (repeatable). Only "
    "name classes you trust: loading one may run its code.",
)


#: The durability modes, as the library names them (snaptree._durable_file, not imported
#: here: the command line starts without ZODB).
_MODES = ("commit", "group", "relaxed")


def durability_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--durability`` and ``--sync-every``, for commands that open a store for writing.

    The command receives them as one keyword argument, ``durability``: a
    dict of the ones given, to pass on as ``snaptree.open(db, **durability)``.
    """

    @click.option(
        "--durability",
        type=click.Choice(_MODES),
        default=None,
        help="How commits reach the disk (FileStorage): commit (an fsync each), group (each "
        "still waits for the disk; concurrent ones share an fsync), relaxed (fsynced every "
        "--sync-every seconds: a machine crash may lose that window). Default: group "
        "(serve: commit). See docs/store.md.",
    )
    @click.option(
        "--sync-every",
        type=float,
        default=None,
        metavar="SECONDS",
        help="With --durability relaxed: seconds between background fsyncs (default 0.05).",
    )
    @functools.wraps(command)
    def wrapper(*args: Any, durability: str | None, sync_every: float | None, **kw: Any) -> Any:
        if sync_every is not None and durability != "relaxed":
            raise click.UsageError("--sync-every only applies with --durability relaxed")
        given = {"durability": durability, "sync_every": sync_every}
        return command(*args, durability={k: v for k, v in given.items() if v is not None}, **kw)

    return wrapper
