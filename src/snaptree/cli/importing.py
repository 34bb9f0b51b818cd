"""``snaptree import``: read a JSON file, a pickle or a ZODB export and store it, atomically."""

from __future__ import annotations

import sys

import click

from ..imports import (
    DEFAULT_SAVEPOINT_EVERY,
    EXPANSION_FACTOR,
    EXPANSION_FLOOR,
    FORMATS,
    load_source,
)
from ..store import open as open_store
from .options import allow_option, db_option


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@db_option
@click.option(
    "--path",
    "path",
    default="/",
    show_default=True,
    metavar="P",
    help="Where the data goes: / merges a mapping's keys into the root; accounts/a1 makes "
    "the data the value of a1 inside accounts (missing mappings are created). An empty "
    "path is refused (an unset shell variable, most likely).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Source format (zodb: a .zexp export). Default: from the file name (.json, .pickle, "
    ".pkl, .zexp), else sniffed.",
)
@click.option("--replace", is_flag=True, help="Overwrite keys that already exist.")
@allow_option
@click.option(
    "--savepoint-every",
    type=click.IntRange(min=1),
    default=DEFAULT_SAVEPOINT_EVERY,
    show_default=True,
    metavar="N",
    help="Write a savepoint every N nodes made, to bound memory.",
)
@click.option(
    "--max-objects",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Most dicts, lists and tuples the data may expand to, each counted at every place "
    "the source names it (a pickle can name one in many places): the tree stores it once, "
    "but pickle and JSON dumps write it at each place. Default: the larger of "
    f"{EXPANSION_FLOOR:,} and {EXPANSION_FACTOR} times the distinct ones in the source.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def import_command(
    file: str,
    db: str | None,
    path: str,
    fmt: str | None,
    replace: bool,
    allow: tuple[str, ...],
    savepoint_every: int,
    max_objects: int | None,
    quiet: bool,
) -> None:
    """Import FILE (JSON, pickle or a zodb-format export) into the store in one transaction.

    Either everything is committed or nothing is: a malformed file, a key
    that already exists (without --replace) or a value that cannot be stored
    leaves the store as it was. Pickles, and the records of a ZODB export,
    are read with an allow-list: builtin containers and scalars, datetime
    and decimal (and snaptree's own nodes in an export), plus classes named
    with --allow; anything else is refused before it can run.

    Example:

    \b
        snaptree import data/sample_model.json --db data/bank.fs --path bank
    \b
        snaptree import dumps/latest.zexp --db data/copy.fs --path restored
    """
    data = load_source(file, format=fmt, allow=allow)
    with open_store(db) as store:
        result = store.import_tree(
            data,
            path=path,
            replace=replace,
            savepoint_every=savepoint_every,
            progress=not quiet and sys.stderr.isatty(),
            max_objects=max_objects,
        )
    replaced = f", replaced {len(result.replaced)} existing key(s)" if result.replaced else ""
    click.echo(
        f"imported {result.objects} objects from {file} into {result.path} "
        f"in {result.seconds:.2f} s{replaced}"
    )


commands = [import_command]
