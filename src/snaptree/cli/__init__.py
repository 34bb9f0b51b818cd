"""The ``snaptree`` command line: parse, call the library, print.

Errors are turned into one line on stderr and an exit code here, in one
place: 0 success, 1 failure, 2 usage or configuration.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from ..errors import Error, OpenError, one_line
from . import demo, exporting, importing, serving

EXIT_FAILURE = 1
EXIT_USAGE = 2


class _Group(click.Group):
    """A click group that reports snaptree errors as one line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OpenError as exc:
            click.echo(f"snaptree: error: {exc}", err=True)
            ctx.exit(EXIT_USAGE)
        except Error as exc:
            click.echo(f"snaptree: error: {exc}", err=True)
            ctx.exit(EXIT_FAILURE)


class _OneLineFormatter(logging.Formatter):
    """One line per log record: drivers' messages span lines (psycopg's hint after a tab)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return one_line(super().formatMessage(record))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="snaptree")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """snaptree: a shared object tree in ZODB, changed by many threads, dumped safely.

    Example:

    \b
        snaptree demo
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


for _module in (demo, importing, exporting, serving):
    for _command in _module.commands:
        main.add_command(_command)
