"""Fixtures shared by the whole suite: stores on every embedded backend."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import snaptree

# One hypothesis profile for the whole suite: generated trees are stored and
# exported, which is slow next to hypothesis's default deadline of 200 ms.
settings.register_profile(
    "snaptree", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("snaptree")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--torture",
        action="store_true",
        default=False,
        help="run the torture tests with long settings",
    )
    parser.addoption(
        "--seed",
        type=int,
        default=None,
        help="seed for the randomised tests (torture runs print the seed they used)",
    )
    parser.addoption(
        "--require-postgres",
        action="store_true",
        default=False,
        help="fail instead of skipping when PostgreSQL is not reachable (CI sets this)",
    )


TORTURE_TIMEOUT = 1800


#: Parametrized tests whose every case starts a process (about 0.45 s of imports on a
#: 2-core machine) or loads millions of values: the fast suite runs their first case, the
#: slow part of .ci/run all the others, so that the fast suite stays under a minute.
FIRST_CASE_IN_THE_FAST_SUITE = {
    "test_export_command_usage_errors_exit_2",
    "test_sigterm_ends_export_every_0_whatever_it_was_doing",
    "test_tuples_repeated_through_the_memo_load_as_pickle_loads_them",
    "test_the_same_tuple_hashed_a_few_times_loads",
    "test_the_import_command_refuses_a_tuple_hashed_again_and_again",
    "test_a_cold_export_asks_for_objects_in_full_batches",
    "test_verify_json_prints_one_object_when_the_dump_fails_too",
    "test_a_very_deep_json_dump_is_a_verify_error_not_a_recursion_error",
    "test_verify_reads_a_compressed_dump_as_it_reads_a_plain_one",
    "test_a_killed_import_leaves_the_tree_as_before_and_the_next_import_cleans_up",
    "test_tuples_that_hold_the_same_tuple_twice_over_and_over_are_refused",
    "test_a_broken_object_stops_the_export_and_says_why",
    "test_verify_and_import_commands_of_a_forged_zexp_run_no_code",
    "test_a_damaged_zstd_source_is_bad_input_for_import_not_an_unexpected_error",
    "test_a_failure_before_the_run_is_one_json_object_too",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Split the families above; long --torture runs get a longer hang guard (the default
    stays the 120 s of pyproject)."""
    first_seen: set[tuple[Any, str]] = set()  # per module: two modules may use one name
    for item in items:
        name = getattr(item, "originalname", item.name)
        if name in FIRST_CASE_IN_THE_FAST_SUITE:
            family = (item.path, name)
            if family in first_seen:
                item.add_marker(pytest.mark.slow)
            first_seen.add(family)
        if config.getoption("--torture"):
            item.add_marker(pytest.mark.timeout(TORTURE_TIMEOUT))


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """--seed N, else a fresh seed; printed, so that a failing run can be repeated."""
    chosen = request.config.getoption("--seed")
    if chosen is None:
        chosen = int.from_bytes(os.urandom(4), "big")
    print(f"seed {chosen} (rerun with --seed {chosen})")  # shown on failure
    return chosen


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


@pytest.fixture(autouse=True)
def _no_connection_left_claimed() -> Iterator[None]:
    """Every store call gives its connection back: none is left claimed by the test's thread.

    A connection left claimed stays the thread's current one: later conversions
    in that thread (a later test's, in the same worker) would join its transaction.
    """
    yield
    from snaptree._held import held

    left = list(getattr(held, "stack", ()))
    held.stack = []
    assert not left, f"connections left claimed by the test's thread: {left}"
