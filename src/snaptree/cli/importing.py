"""``snaptree import``: read a JSON file, a pickle or a ZODB export and store it, atomically."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..imports import (
    DEFAULT_COMMIT_EVERY,
    EXPANSION_FACTOR,
    EXPANSION_FLOOR,
    FORMATS,
    load_source,
    source_format,
)
from ..store import open as open_store
from .options import allow_option, db_option, durability_options


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
    "--commit-every",
    type=click.IntRange(min=1),
    default=DEFAULT_COMMIT_EVERY,
    show_default=True,
    metavar="N",
    help="Commit the nodes made into the import's staging area (which readers never see) "
    "every N nodes, to bound memory; one last commit links them into the tree.",
)
@click.option(
    "--savepoint-every",
    type=click.IntRange(min=1),
    default=None,
    hidden=True,
    help="The old name of --commit-every (deprecated).",
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
@durability_options
def import_command(
    file: str,
    db: str | None,
    path: str,
    fmt: str | None,
    replace: bool,
    allow: tuple[str, ...],
    commit_every: int,
    savepoint_every: int | None,
    max_objects: int | None,
    quiet: bool,
    durability: dict[str, Any],
) -> None:
    """Import FILE (JSON, pickle or a zodb-format export, optionally .zst) into the store.

    Readers see all of it or none of it: a malformed file, a key that
    already exists (without --replace), a value that cannot be stored, or a
    kill leaves the tree as it was. JSON is read as a stream, in bounded
    memory whatever its size; a pickle or an export is read whole first.
    Pickles, and the records of a ZODB export, are read with an allow-list:
    builtin containers and scalars, datetime and decimal (and snaptree's own
    nodes in an export), plus classes named with --allow; anything else is
    refused before it can run.

    Example:

    \b
        snaptree import data/sample_model.json --db data/bank.fs --path bank
    \b
        snaptree import dumps/latest.zexp --db data/copy.fs --path restored
    """
    if savepoint_every is not None:
        if commit_every != DEFAULT_COMMIT_EVERY:
            raise click.UsageError("--savepoint-every is the old name of --commit-every: give one")
        click.echo("snaptree: --savepoint-every is now --commit-every", err=True)
        commit_every = savepoint_every
    source: Any = Path(file)
    options: dict[str, Any] = {"format": fmt, "allow": allow}
    if source_format(file, fmt) != "json":
        # Read whole anyway (a pickle cannot be streamed): refuse a bad or
        # hostile one before the store is opened, let alone created.
        source, options = load_source(file, format=fmt, allow=allow), {}
    new_store = _new_file_store(db)
    size_at_failure = None
    try:
        with open_store(db, **durability) as store:
            if new_store is not None:  # and not one another process filled meanwhile
                with store.snapshot() as snap:
                    new_store = new_store if len(snap.root) == 0 else None
            try:
                result = store.import_tree(
                    source,
                    path=path,
                    replace=replace,
                    commit_every=commit_every,
                    progress=not quiet and sys.stderr.isatty(),
                    max_objects=max_objects,
                    **options,
                )
            except BaseException:
                if new_store is not None:
                    size_at_failure = new_store.stat().st_size
                raise
    except BaseException:
        # A streamed file is checked only as it is read, once the store is open:
        # a failed import must not leave behind a store that only it created.
        if new_store is not None and size_at_failure is not None:
            _remove_if_untouched(new_store, size_at_failure)
        raise
    replaced = f", replaced {len(result.replaced)} existing key(s)" if result.replaced else ""
    click.echo(
        f"imported {result.objects} objects from {file} into {result.path} "
        f"in {result.seconds:.2f} s{replaced}"
    )


def _new_file_store(db: str | None) -> Path | None:
    """The data file a FileStorage at *db* would create, if it does not exist yet."""
    from ..uris import default_uri, resolve

    try:
        data_file = resolve(db or default_uri(), create_default_dir=False).file_path
    except Exception:  # the open reports a bad URI with its own message
        return None
    return None if data_file is None or data_file.exists() else data_file


def _remove_if_untouched(data_file: Path, size: int) -> None:
    """Remove the store a failed import created, unless another process has it by now.

    Under the store's own lock file, as FileStorage takes it: a process that
    opened the file since holds it, and one that opened and closed it again
    has made it grow past *size*, its size when the import failed (a store
    only appends, and a close writes its index, not the data file).
    """
    import zc.lockfile

    try:
        lock = zc.lockfile.LockFile(str(data_file.with_name(data_file.name + ".lock")))
    except (OSError, zc.lockfile.LockError):
        return
    try:
        if data_file.stat().st_size == size:
            for name in ("", ".index", ".tmp"):
                data_file.with_name(data_file.name + name).unlink(missing_ok=True)
    except OSError:
        pass  # the import's own error is the one to report
    finally:
        # The lock file stays, as FileStorage leaves it: removing it could let
        # two processes that opened it at this moment each hold a lock.
        lock.close()


commands = [import_command]
