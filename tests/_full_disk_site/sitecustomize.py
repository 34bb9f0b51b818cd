"""Imported at start-up by commands that tests/_full_disk.py's command_env() starts."""

import _full_disk

_full_disk.install_from_environment()
