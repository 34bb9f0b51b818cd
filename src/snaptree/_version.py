"""snaptree's version, read from the installed package's metadata when first asked for.

Lazily, because ``importlib.metadata`` costs about 45 ms to import (the
``email`` package behind it), which every command-line start would pay.
"""

from __future__ import annotations

import functools


@functools.cache
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("snaptree")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
