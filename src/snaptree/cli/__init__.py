"""The ``snaptree`` command line: parse, call the library, print.

Errors become one line on stderr and an exit code here, in one place:

====  =====================================================================
code  meaning
====  =====================================================================
0     success
1     any other failure (an unexpected exception is named by its type)
2     usage or configuration: a bad option or argument, a wrong URI
3     bad input: a malformed or hostile import file, a dump that fails verify,
      a value that cannot be stored or that the export format cannot hold
4     the store is locked by another process, or its server does not answer
5     an export failed: a full disk, an unwritable or locked directory, ...
6     ``status``: no complete dump, or the newest is older than ``--max-age``
====  =====================================================================
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from ..errors import (
    ArgumentError,
    Error,
    ExportError,
    InputError,
    OpenError,
    StoreUnavailableError,
    UnstorableValueError,
    VerifyError,
    one_line,
)

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_UNAVAILABLE = 4
EXIT_EXPORT_FAILED = 5
EXIT_STALE = 6

#: The exit code of each kind of error; the first class that matches wins.
EXIT_CODES: tuple[tuple[type[Error], int], ...] = (
    (StoreUnavailableError, EXIT_UNAVAILABLE),
    (OpenError, EXIT_USAGE),
    (ArgumentError, EXIT_USAGE),
    (InputError, EXIT_BAD_INPUT),
    (VerifyError, EXIT_BAD_INPUT),
    (UnstorableValueError, EXIT_BAD_INPUT),
    (ExportError, EXIT_EXPORT_FAILED),
)


def exit_code(exc: Error) -> int:
    """The exit code the command line gives for *exc* (see the module docstring)."""
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), EXIT_FAILURE)


def error_line(exc: BaseException) -> str:
    """The one line a failure prints on stderr."""
    if isinstance(exc, Error):
        return f"snaptree: error: {one_line(str(exc))}"
    return f"snaptree: error: unexpected {type(exc).__name__}: {one_line(str(exc))}"


#: Each command and the module under ``snaptree.cli`` that defines it. A module is
#: imported only when one of its commands runs (or ``--help`` lists them all), so a
#: command pays only for the parts of snaptree it uses.
COMMANDS = {
    "demo": "demo",
    "export": "exporting",
    "import": "importing",
    "prune": "monitoring",
    "serve": "serving",
    "status": "monitoring",
    "verify": "exporting",
}


class _Group(click.Group):
    """The ``snaptree`` group: loads a command's module on use; every failure is one line.

    Library errors and unexpected exceptions become one line on stderr and
    the exit code of :func:`exit_code`, never a traceback.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        commands = importlib.import_module(f"{__name__}.{module}").commands
        return next(command for command in commands if command.name == cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Error as exc:
            click.echo(error_line(exc), err=True)
            ctx.exit(exit_code(exc))
        except Exception as exc:  # a bug or an unexpected storage error: still one line
            logging.getLogger("snaptree").debug("unexpected error", exc_info=True)
            click.echo(error_line(exc), err=True)
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
