"""Options shared by several commands."""

from __future__ import annotations

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
