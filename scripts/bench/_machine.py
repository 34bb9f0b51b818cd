"""The facts about the machine and the software that every benchmark report states."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

#: The repository root: commands in the reports are written relative to it.
ROOT = Path(__file__).resolve().parents[2]

PACKAGES = ("snaptree", "ZODB", "persistent", "BTrees", "transaction", "ZEO", "RelStorage")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _load() -> str:
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def facts() -> dict[str, str]:
    """Cores, CPU, RAM, OS, Python and the versions of the packages measured, with the date."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": f"{usable} usable of {os.cpu_count()}",
        "cpu": _cpu_model(),
        "ram": _ram(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        # Other processes competing for the cores make figures noisier; say how busy it was.
        "load average at start (1, 5, 15 min)": _load(),
        **{package: _version(package) for package in PACKAGES},
    }


def facts_markdown(values: dict[str, str] | None = None) -> str:
    """The facts as a two-column Markdown table."""
    values = values or facts()
    rows = "\n".join(f"| {key} | {value} |" for key, value in values.items())
    return f"| fact | value |\n|---|---|\n{rows}"


def command_line(script: str | Path, argv: list[str]) -> str:
    """The command that reproduces this run, relative to the repository root.

    ``--json OUT`` is left out: it names a temporary file and changes no figure.
    """
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            kept.append(arg)
    argv = kept
    try:
        script = Path(script).resolve().relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join([".venv/bin/python", str(script), *argv])


def write_result(
    path: str | Path,
    *,
    name: str,
    title: str,
    command: str,
    markdown: str,
    figures: list[str] | None = None,
    **data: Any,
) -> None:
    """Write one benchmark's ``--json`` result in the form ``run.py`` stitches (see README)."""
    result = {
        "name": name,
        "title": title,
        "command": command,
        "markdown": markdown,
        "figures": figures or [],
        **data,
    }
    Path(path).write_text(json.dumps(result, indent=1, default=str) + "\n")


def peak_rss_mib() -> float:
    """This process's peak resident memory since its last exec, in MiB.

    Not ``getrusage().ru_maxrss``: Linux carries that across ``exec`` from
    the process before it, and a child forked by a parent holding a large
    tree then reports the parent's memory as its own peak (seen here: a
    1M-object export "peaked" at 1,484 MiB; VmHWM said 200 MiB).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")
