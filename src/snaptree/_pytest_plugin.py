"""snaptree's pytest plugin: the ``snaptree_store`` fixture and ``--snaptree-chaos``.

Installed with snaptree through the ``pytest11`` entry point named
``snaptree`` (``-p no:snaptree`` turns it off; ``-p snaptree`` loads it where
plugin autoloading is disabled). It changes nothing for a test that does not
ask for it: without ``--snaptree-chaos`` it only adds its options and the
fixture. The helpers themselves live in :mod:`snaptree.testing`, which does
not import pytest.

Chaos must reach stores the application opens itself, wherever it does so.
The plugin does not replace ``snaptree.open``; it registers
:class:`snaptree.testing.Chaos` with ``snaptree.store.add_open_hook``, the
documented hook ``open`` calls with every store it opens. It does that while
pytest loads the initial conftest files, so a store a conftest (or the
application module it imports) opens at import time is reached too.

snaptree itself (ZODB, BTrees) is imported only when a test asks for the
fixture or chaos is on: every pytest run in an environment where snaptree is
installed loads this plugin.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .store import Store
    from .testing import Chaos

_CHAOS: pytest.StashKey[Chaos] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("snaptree", "snaptree conflict-retry testing")
    group.addoption(
        "--snaptree-backend",
        choices=("memory", "file"),
        default="memory",
        help="storage of the snaptree_store fixture: memory:// (default) or a FileStorage "
        "in the test's temporary directory",
    )
    group.addoption(
        "--snaptree-chaos",
        type=float,
        default=None,
        metavar="P",
        help="make the first commit of every retried store.run call conflict with "
        "probability P (0 to 1), in every store the session opens",
    )
    group.addoption(
        "--snaptree-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed of --snaptree-chaos (random and printed unless given)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Start chaos before any conftest is imported, so stores opened at import time get it."""
    options = early_config.known_args_namespace
    probability = getattr(options, "snaptree_chaos", None)
    if probability is None:
        return
    if not 0.0 <= probability <= 1.0:
        raise pytest.UsageError(
            f"--snaptree-chaos={probability:g}: give a probability between 0 and 1 "
            "(for example --snaptree-chaos=0.3)"
        )
    from .testing import Chaos

    chaos = Chaos(probability, getattr(options, "snaptree_seed", None))
    chaos.start()
    early_config.stash[_CHAOS] = chaos


def pytest_unconfigure(config: pytest.Config) -> None:
    chaos = config.stash.get(_CHAOS, None)
    if chaos is not None:
        chaos.stop()


def pytest_report_header(config: pytest.Config) -> str | None:
    chaos = config.stash.get(_CHAOS, None)
    if chaos is None:
        return None
    return f"snaptree chaos: probability {chaos.probability:g}, seed {chaos.seed}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Draw each test's conflicts from its own stream, so it gets them alone or in the suite."""
    chaos = item.config.stash.get(_CHAOS, None)
    if chaos is not None:
        chaos.reseed(item.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    chaos = terminalreporter.config.stash.get(_CHAOS, None)
    if chaos is not None:
        terminalreporter.write_line(chaos.summary())


@pytest.fixture
def snaptree_store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """A fresh, empty store for one test, closed after it.

    memory:// unless ``--snaptree-backend=file``, which runs the same tests
    on a FileStorage in the test's temporary directory. Opened with
    ``snaptree.open``, so chaos reaches it like any store the test opens.
    """
    from .store import open as open_store

    if request.config.getoption("snaptree_backend") == "file":
        uri = str(request.getfixturevalue("tmp_path") / "Data.fs")
    else:
        uri = "memory://"
    store = open_store(uri)
    try:
        yield store
    finally:
        store.close()
