"""The one way tests start the command line: ``python -m snaptree`` in a subprocess.

A real process, so a test sees what a user sees: the exit code, stdout and
stderr kept apart, no traceback swallowed by a test runner, signals.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Longest a command may run in a test before it counts as hung.
TIMEOUT = 120.0

COMMAND = (sys.executable, "-m", "snaptree")


def snaptree(
    *args: str | os.PathLike[str],
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    input: str | None = None,  # noqa: A002 - subprocess's name
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``snaptree ARGS`` and return its result; *env* is added to this process's environment."""
    return subprocess.run(
        [*COMMAND, *(os.fspath(a) for a in args)],
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start(*args: str | os.PathLike[str], **popen: Any) -> subprocess.Popen[str]:
    """Start ``snaptree ARGS`` without waiting (long-running commands: ``--every``, ``serve``)."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([*COMMAND, *(os.fspath(a) for a in args)], text=True, **popen)


@contextmanager
def reaped(
    proc: subprocess.Popen[str], timeout: float = TIMEOUT
) -> Iterator[subprocess.Popen[str]]:
    """*proc*, killed and waited for at the end if it is still running (a failed test)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``snaptree: error:`` line a failed command printed; fails on a traceback."""
    assert result.returncode != 0, f"expected a failure, got 0: {result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("snaptree: error:")]
    assert len(errors) == 1, f"expected one error line, got: {result.stderr!r}"
    return errors[0]


def files_under(directory: Path) -> dict[str, bytes]:
    """Every file under *directory* with its bytes: to show a failed command changed nothing."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }
