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
