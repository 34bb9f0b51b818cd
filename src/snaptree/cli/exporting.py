"""``snaptree export`` and ``snaptree verify``: parse, call the library, print.

``--json`` is a contract: stdout carries only JSON (one object per run,
one per line), logs go to stderr, readers should ignore fields they do
not know.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import click

from .. import schedule
from .._following_reader import FollowingReader
from .._history import parse_point
from ..dump_directory import lock_directory
from ..errors import Error
from ..export_run import RunResult, describe_failure, export_file, export_into
from ..manifest import FORMATS, verify
from ..retention import check_keep
from .options import allow_option, db_option


def _checked(check: Any) -> Any:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return check(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def _checked_point(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            parse_point(value)
        except Error as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _emit(result: RunResult, as_json: bool) -> None:
    click.echo(result.log_line(), err=True)
    if as_json:
        click.echo(json.dumps(result.to_json()))


def _report_failure(exc: Exception) -> None:
    """A failed run of --every: one line, and the schedule goes on."""
    click.echo(f"snaptree: error: {describe_failure(exc)}", err=True)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the export in progress, then stop. Second: abandon it."""

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        click.echo(
            f"snaptree: {signal.Signals(signum).name}: stopping after the export in progress "
            "(send it again to abandon that export)",
            err=True,
        )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@click.command("export")
@db_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the dump to FILE.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Write time- and tid-named dumps into DIR, with latest.<ext> and retention. "
    "One writer per format in DIR: a second one is refused (DIR/.snaptree-export-<format>.lock "
    "names the holder).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Dump format. Default: with -o, the file's suffix (.pickle/.pkl, .json, .zexp); "
    "with --dir, pickle.",
)
@click.option(
    "--every",
    type=float,
    callback=_checked(schedule.check_every),
    metavar="SECONDS",
    help="Keep running and export every SECONDS (0 = back to back, paced so that fsyncs "
    "take at most 0.25% of the time); skips runs when nothing was committed. A failed run "
    "is one error line and the next starts 1 s later at the soonest. "
    "SIGINT/SIGTERM stop it after the export in progress.",
)
@click.option(
    "--keep",
    type=int,
    callback=_checked(check_keep),
    metavar="N",
    help="With --dir: keep the newest N complete dumps of this format, delete older ones.",
)
@click.option(
    "--at",
    metavar="TIME|TID",
    callback=_checked_point,
    help="Export the tree as of an ISO time or a hex tid, with -o FILE only (in --dir a past "
    "state would become latest).",
)
@click.option(
    "--subtree",
    default="/",
    show_default=True,
    help="Export only this path in the tree (accounts/a1).",
)
@click.option(
    "--cache-size",
    type=click.IntRange(min=100),
    default=200_000,
    show_default=True,
    help="Objects kept in the ZODB cache between --every runs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per run on stdout.")
def export_command(
    db: str | None,
    output: str | None,
    directory: str | None,
    fmt: str,
    every: float | None,
    keep: int | None,
    at: str | None,
    subtree: str,
    cache_size: int,
    as_json: bool,
) -> None:
    """Write a consistent snapshot of the tree to a file or a directory of dumps.

    The store is opened read-only: a FileStorage that a running application
    has open is read without its lock (or use --db zeo://host:port). Every
    dump is written atomically with a manifest beside it.

    With --dir, this command is the one writer of its format's dumps in DIR
    while it runs (an Exporter or another export of that format in DIR makes
    it exit 5 at once, naming the holder). With --every, a failed run (a
    full disk, a value the format cannot hold) is reported in one line and
    the schedule goes on.

    Example:

    \b
        snaptree export --db data/app.fs -o dump.pickle
    \b
        snaptree export --db data/app.fs -o old.json --format json --at 040d41d07e885dbb
    \b
        snaptree export --db data/app.fs --dir dumps --every 300 --keep 24 --json
    """
    if (output is None) == (directory is None):
        raise click.UsageError("give exactly one of -o FILE or --dir DIR")
    if keep is not None and directory is None:
        raise click.UsageError("--keep needs --dir (it removes old dumps in that directory)")
    if at is not None and every is not None:
        raise click.UsageError("--at exports one past state; it cannot be combined with --every")
    if at is not None and directory is not None:
        raise click.UsageError(
            "--at exports one past state: write it with -o FILE; in --dir it would become "
            "latest and count for --keep"
        )

    if directory is not None and fmt is None:
        fmt = "pickle"
    with ExitStack() as held:
        # The lock before the store, which may take long to open: a second writer is
        # refused at once.
        lock = None
        if directory is not None:
            lock = held.enter_context(lock_directory(directory, fmt))
        reader = FollowingReader(db, cache_size)
        held.callback(reader.close)

        def run_once() -> RunResult:
            reader.catch_up()
            if lock is not None:
                result = export_into(
                    reader.store,
                    lock.directory,
                    format=lock.format,
                    subtree=subtree,
                    keep=keep,
                    lock=lock,
                    fragments=reader.fragments,
                )
            else:
                assert output is not None
                result = export_file(
                    reader.store,
                    output,
                    format=fmt,
                    subtree=subtree,
                    at=at,
                    skip_unchanged=every is not None,
                    fragments=reader.fragments,
                )
            _emit(result, as_json)
            return result

        if every is None:
            run_once()
            return
        stop = threading.Event()
        with _stop_on_signals(stop):
            try:
                schedule.run_periodically(
                    run_once, every=every, stop=stop, on_error=_report_failure
                )
            except KeyboardInterrupt:
                click.echo(
                    "snaptree: export abandoned; no file written under a final name", err=True
                )


@click.command("verify")
@click.argument("dump", type=click.Path(exists=True, dir_okay=False))
@allow_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def verify_command(dump: str, allow: tuple[str, ...], as_json: bool) -> None:
    """Check a dump against its manifest (size, sha256), load it and say what it holds.

    Fails (exit 3) on a truncated or altered file, or one without a manifest.
    A pickle is loaded with an allow-list (plain data, datetime, decimal, and
    the classes named with --allow), so even a forged dump cannot run code.

    Example:

    \b
        snaptree verify dumps/latest.pickle
    """
    info = verify(dump, allow=allow)
    if as_json:
        data = info.to_json()
        data["ok"] = True
        click.echo(json.dumps(data))
        return
    holds = ", ".join(f"{k}: {v}" for k, v in info.summary.items())
    click.echo(
        f"ok: {info.path} ({info.format}, {info.bytes} bytes, sha256 {info.sha256[:12]}...)\n"
        f"  tid {info.tid} committed {info.committed_at.isoformat()}, "
        f"{info.objects} objects, subtree {info.subtree}\n"
        f"  holds {holds}"
    )


commands = [export_command, verify_command]
