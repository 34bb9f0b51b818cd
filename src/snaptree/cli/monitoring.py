"""``snaptree status`` and ``snaptree prune``: watching and trimming a directory of dumps.

Both are thin: :func:`snaptree.monitoring.dump_status` and
:func:`snaptree.retention.prune` do the work. ``--json`` prints one JSON
object on stdout whatever the outcome (logs and the error line go to
stderr).
"""

from __future__ import annotations

import json
from typing import Any

import click

from ..manifest import FORMATS
from ..monitoring import dump_status
from ..retention import prune
from . import EXIT_BAD_INPUT, EXIT_STALE
from .exporting import Duration, retention_from, retention_options


@click.command("status")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Look at this format's dumps only (default: the newest dump of any format).",
)
@click.option(
    "--max-age",
    type=Duration(),
    default=None,
    help="Fail (exit 6) when the newest dump's state was committed longer ago than DURATION "
    "(90s, 15m, 36h, 7d).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON on stdout.")
def status_command(directory: str, fmt: str | None, max_age: Any, as_json: bool) -> None:
    """Say how old and how whole the newest complete dump in DIRECTORY is: a healthcheck.

    Finds the newest complete dump, checks its size and sha256 against its
    manifest, and prints its tid, commit time and age. Exits 0 when it is
    whole (and younger than --max-age), 3 when it is broken (damaged
    manifest, checksum mismatch), 6 when there is no complete dump or the
    newest is older than --max-age. The age is that of the state a restore
    would give back: on a store nobody writes to it grows, since no new
    dump is needed (the --metrics file of the exporter says it still runs).

    Example:

    \b
        snaptree status dumps --max-age 15m
    \b
        snaptree status /srv/app/dumps --format pickle --max-age 2h --json
    """
    status = dump_status(directory, format=fmt, max_age=max_age)
    if as_json:
        click.echo(json.dumps(status.to_json()))
    else:
        click.echo(status.report())
    if status.broken:
        click.echo(f"snaptree: error: {status.problem}", err=True)
        raise click.exceptions.Exit(EXIT_BAD_INPUT)
    if status.stale:
        what = (
            f"no complete dump in {status.directory}"
            if status.path is None
            else f"the newest dump is older than the --max-age {max_age}"
        )
        click.echo(f"snaptree: error: {what}", err=True)
        raise click.exceptions.Exit(EXIT_STALE)


@click.command("prune")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@retention_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Prune this format's dumps only (default: every format with dumps in DIRECTORY).",
)
@click.option(
    "--dry-run",
    "-n",
    is_flag=True,
    help="Delete nothing: list what would be deleted and kept, and why.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON on stdout.")
def prune_command(
    directory: str, fmt: str | None, dry_run: bool, as_json: bool, **keep_options: Any
) -> None:
    """Delete the dumps in DIRECTORY that no --keep-* rule keeps (restic's forget rules).

    Periods are UTC days, hours, ISO weeks, months and years of each dump's
    commit time as its manifest records it. The newest complete dump, and
    the one latest points at, are never deleted; neither is anything that is
    not a complete snaptree dump. Each format is pruned under the directory's
    lock for that format: a schedule writing it makes prune exit 5.

    Example:

    \b
        snaptree prune dumps --keep-last 24 --keep-daily 7 --keep-weekly 4 --dry-run
    """
    keep = retention_from(keep_options)
    if keep is None:
        raise click.UsageError(
            "say what to keep: --keep-last, --keep-hourly, --keep-daily, --keep-weekly, "
            "--keep-monthly, --keep-yearly or --keep-within (prune deletes every dump no "
            "rule keeps)"
        )
    results = prune(directory, keep, format=fmt, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "formats": [r.to_json() for r in results]}))
        return
    verb = "would delete" if dry_run else "deleted"
    if not results:
        click.echo(f"no complete dumps in {directory}; nothing to prune")
    for result in results:
        gone = [d for d in result.decisions if not d.keep]
        click.echo(
            f"{result.format} dumps in {result.directory} ({keep.describe()}): "
            f"{len(result.decisions) - len(gone)} kept, {len(gone)} {verb}"
        )
        for decision in result.decisions:
            mark = "keep  " if decision.keep else ("delete" if dry_run else "gone  ")
            click.echo(
                f"  {mark} {decision.dump.path.name}  {decision.committed_at.isoformat()}  "
                f"{'; '.join(decision.reasons)}"
            )
        for path, why in result.ignored:
            click.echo(f"  skip   {path.name}  {why}")


commands = [status_command, prune_command]
