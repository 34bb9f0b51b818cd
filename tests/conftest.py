"""Fixtures shared by the whole suite: stores on every embedded backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import snaptree


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--torture",
        action="store_true",
        default=False,
        help="run the torture tests with long settings",
    )
    parser.addoption(
        "--require-postgres",
        action="store_true",
        default=False,
        help="fail instead of skipping when PostgreSQL is not reachable (CI sets this)",
    )


TORTURE_TIMEOUT = 1800


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long --torture runs get a longer hang guard; the default stays the 120 s of pyproject."""
    if config.getoption("--torture"):
        for item in items:
            item.add_marker(pytest.mark.timeout(TORTURE_TIMEOUT))


@pytest.fixture(params=["memory", "file"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URI for a fresh store on each embedded backend."""
    if request.param == "memory":
        return "memory://"
    return str(tmp_path / "Data.fs")


@pytest.fixture
def store(store_uri: str) -> Iterator[snaptree.Store]:
    """A fresh, open store on each embedded backend, closed after the test."""
    s = snaptree.open(store_uri)
    try:
        yield s
    finally:
        s.close()
