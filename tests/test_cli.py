"""The command line's face: every command is reachable and its help ends with an example."""

from __future__ import annotations

import importlib
import pkgutil

import click
import pytest

import snaptree.cli
from _cli import snaptree as run_snaptree


def _defined_commands() -> dict[str, click.Command]:
    """The commands the modules of snaptree.cli define (each lists them in ``commands``)."""
    found = {}
    for module in pkgutil.iter_modules(snaptree.cli.__path__, "snaptree.cli."):
        for command in getattr(importlib.import_module(module.name), "commands", ()):
            found[command.name] = command
    return found


def test_help_lists_every_command_the_modules_define():
    """Commands are loaded on use: each one defined must still be listed and found."""
    result = run_snaptree("--help")
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("Commands:", 1)[1].split()
    assert set(_defined_commands()) <= set(listed)
    assert set(snaptree.cli.COMMANDS) == set(_defined_commands())


@pytest.mark.parametrize("name", sorted(_defined_commands()))
def test_every_commands_help_ends_with_an_example(name):
    help_text = _defined_commands()[name].help or ""
    assert "Example:" in help_text
    assert f"snaptree {name}" in help_text.split("Example:", 1)[1]
