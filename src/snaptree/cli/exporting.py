"""``snaptree export`` and ``snaptree verify``: parse, call the library, print.

``--json`` is a contract: stdout carries only JSON (one object per run,
one per line, a failed run included), logs go to stderr, readers should
ignore fields they do not know.

The retention options (``--keep-last``, ``--keep-daily`` ...) and the
durations they take are defined here once, for ``export`` and ``prune``.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from .. import schedule
from .._following_reader import FollowingReader
from .._history import parse_point
from .._signals import stop_on_signals
from ..dump_directory import lock_directory
from ..errors import Error
from ..export_run import RunResult, describe_failure, export_file, export_into, failure_json
from ..manifest import COMPRESSIONS, FORMATS, verify
from ..monitoring import MetricsFile
from ..retention import Retention, parse_duration, parse_retention_window
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


class Duration(click.ParamType):
    """A duration on the command line: 90s, 15m, 36h, 7d, 2w, 1d12h (see parse_duration).

    *parse* reads it: parse_retention_window for --keep-within.
    """

    name = "DURATION"

    def __init__(self, parse: Callable[[str], datetime.timedelta] = parse_duration) -> None:
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _count(rule: str) -> Any:
    """A --keep-* count checked as the library checks it (one message for both)."""

    def callback(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        if value is not None:
            try:
                Retention(**{rule: value})
            except ValueError as exc:
                raise click.BadParameter(str(exc)) from None
        return value

    return callback


def retention_options(command: Any) -> Any:
    """The --keep-* options: restic's retention rules (see snaptree.retention)."""
    options = [
        click.option(
            "--keep-last",
            "--keep",
            "keep_last",
            type=int,
            callback=_count("last"),
            metavar="N",
            help="Keep the N newest dumps (--keep is the same).",
        ),
        *(
            click.option(
                f"--keep-{name}",
                f"keep_{name}",
                type=int,
                callback=_count(name),
                metavar="N",
                help=f"Keep the newest dump of each of the N newest {unit}s that have one (UTC).",
            )
            for name, unit in (
                ("hourly", "hour"),
                ("daily", "day"),
                ("weekly", "ISO week"),
                ("monthly", "month"),
                ("yearly", "year"),
            )
        ),
        click.option(
            "--keep-within",
            "keep_within",
            type=Duration(parse_retention_window),
            help="Keep every dump committed less than DURATION (900s, 36h, 7d, 2w; m, which "
            "restic reads as months, is refused) before the newest one.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def retention_from(options: dict[str, Any]) -> Retention | None:
    """The Retention the --keep-* options ask for (they are popped from *options*), or None."""
    rules = {name: options.pop(f"keep_{name}") for name in _RETENTION_RULES}
    if all(value is None for value in rules.values()):
        return None
    return Retention(**rules)


_RETENTION_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly", "within")


def _emit(result: RunResult, as_json: bool) -> None:
    click.echo(result.log_line(), err=True)
    if as_json:
        click.echo(json.dumps(result.to_json()))


def _report_failure(exc: Exception) -> None:
    """A failed run of --every: one line, and the schedule goes on."""
    click.echo(f"snaptree: error: {describe_failure(exc)}", err=True)


def _stopping_message(name: str) -> str:
    return (
        f"snaptree: {name}: stopping after the export in progress "
        "(send it again to abandon that export)"
    )


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
@retention_options
@click.option(
    "--compress",
    type=click.Choice(COMPRESSIONS),
    default=None,
    help="Compress the dump as it is written (zstd): its name ends in .zst after the format's "
    "(dump.pickle.zst; with -o, name the file so). verify and import read it as it is.",
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
@click.option(
    "--metrics",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Rewrite FILE after every run as a Prometheus textfile (last success, duration, "
    "bytes, objects, failures); name it *.prom in node_exporter's textfile directory.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object per run on stdout (a failed run too: failed true, error).",
)
def export_command(
    db: str | None,
    output: str | None,
    directory: str | None,
    fmt: str,
    every: float | None,
    compress: str | None,
    at: str | None,
    subtree: str,
    cache_size: int,
    metrics: str | None,
    as_json: bool,
    **keep_options: Any,
) -> None:
    """Write a consistent snapshot of the tree to a file or a directory of dumps.

    The store is opened read-only: a FileStorage that a running application
    has open is read without its lock (or use --db zeo://host:port). Every
    dump is written atomically with a manifest beside it.

    With --dir, this command is the one writer of its format's dumps in DIR
    while it runs (an Exporter or another export of that format in DIR makes
    it exit 5 at once, naming the holder), and the --keep-* options choose
    which dumps stay after each run, as restic's forget does (by each dump's
    commit time, UTC; the newest is never deleted). With --every, a failed
    run (a full disk, a value the format cannot hold) is reported in one line
    and the schedule goes on.

    Example:

    \b
        snaptree export --db data/app.fs -o dump.pickle
    \b
        snaptree export --db data/app.fs -o old.json --format json --at 040d41d07e885dbb
    \b
        snaptree export --db data/app.fs --dir dumps --every 300 --keep-last 24 \\
            --keep-daily 7 --compress zstd --metrics /var/lib/node_exporter/snaptree.prom --json
    """
    keep = retention_from(keep_options)
    if (output is None) == (directory is None):
        raise click.UsageError("give exactly one of -o FILE or --dir DIR")
    if keep is not None and directory is None:
        raise click.UsageError(
            "--keep needs --dir, and so does every --keep-* option: they remove old dumps "
            "in that directory"
        )
    if at is not None and every is not None:
        raise click.UsageError("--at exports one past state; it cannot be combined with --every")
    if at is not None and directory is not None:
        raise click.UsageError(
            "--at exports one past state: write it with -o FILE; in --dir it would become "
            "latest and count for retention"
        )

    if directory is not None and fmt is None:
        fmt = "pickle"
    target = Path(directory if directory is not None else output)  # type: ignore[arg-type]
    watch = None if metrics is None else MetricsFile(metrics, target=target, format=fmt)
    reported: BaseException | None = None  # the last failure a run reported itself
    try:
        with ExitStack() as held:
            # The lock before the store, which may take long to open: a second writer is
            # refused at once.
            lock = None
            if directory is not None:
                lock = held.enter_context(lock_directory(directory, fmt))
            reader = FollowingReader(db, cache_size)
            held.callback(reader.close)

            def run_once() -> RunResult:
                nonlocal reported
                started = time.monotonic()
                try:
                    reader.catch_up()
                    # Fragments pay off from the second export on; a single run keeps none
                    # (at 1M objects, holding them until its end took 1.5 GiB against 0.2).
                    fragments = reader.fragments if every is not None else None
                    if lock is not None:
                        result = export_into(
                            reader.store,
                            lock.directory,
                            format=lock.format,
                            subtree=subtree,
                            keep=keep,
                            compress=compress,
                            lock=lock,
                            fragments=fragments,
                        )
                    else:
                        assert output is not None
                        result = export_file(
                            reader.store,
                            output,
                            format=fmt,
                            subtree=subtree,
                            at=at,
                            compress=compress,
                            skip_unchanged=every is not None,
                            fragments=fragments,
                        )
                except Exception as exc:
                    if watch is not None:
                        watch.failed(time.monotonic() - started)
                    if as_json:
                        _print_failure(exc, target, directory is not None, fmt)
                    reported = exc
                    raise
                if watch is not None:
                    watch.succeeded(result, time.monotonic() - started)
                _emit(result, as_json)
                return result

            if every is None:
                run_once()
                return
            with stop_on_signals(_stopping_message, abandon_on_second=True) as stop:
                try:
                    schedule.run_periodically(
                        run_once, every=every, stop=stop, on_error=_report_failure
                    )
                except KeyboardInterrupt:
                    click.echo(
                        "snaptree: export abandoned; no file written under a final name", err=True
                    )
    except Exception as exc:
        # Failing before any run (the store, the directory, the lock): reported as a run is.
        if exc is not reported:
            if watch is not None:
                watch.failed(0.0)
            if as_json:
                _print_failure(exc, target, directory is not None, fmt)
        raise


def _print_failure(exc: BaseException, target: Path, directory: bool, fmt: str | None) -> None:
    """The ``--json`` object of a failed run, on stdout."""
    click.echo(json.dumps(failure_json(exc, target=target, directory=directory, format=fmt)))


@click.command("verify")
@click.argument("dump", type=click.Path(dir_okay=False))
@allow_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the result as one JSON object on stdout (ok false and the error if it fails).",
)
def verify_command(dump: str, allow: tuple[str, ...], as_json: bool) -> None:
    """Check a dump against its manifest (size, sha256), load it and say what it holds.

    Fails (exit 3) on a truncated or altered file, or one without a manifest.
    A pickle is loaded with an allow-list (plain data, datetime, decimal, and
    the classes named with --allow), so even a forged dump cannot run code.

    Example:

    \b
        snaptree verify dumps/latest.pickle
    """

    def failed(error: str) -> None:
        if as_json:
            click.echo(json.dumps({"ok": False, "path": dump, "error": error}))

    if not os.path.lexists(dump):  # checked here, not by click: --json reports it too
        failed(f"{dump} does not exist")
        raise click.BadParameter(f"File {dump!r} does not exist.", param_hint="'DUMP'")
    try:
        info = verify(dump, allow=allow)
    except Error as exc:
        failed(describe_failure(exc))
        raise
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
