"""snaptree's pytest plugin as users run it: pytest in a subprocess, loaded by its entry point."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
RUN_TIMEOUT = 100

# An application suite whose conftest opens the application's store when it is
# imported: chaos must reach it all the same.
CONFTEST = """
    import os
    from example_bank import bank

    STORE = bank.open_bank(os.path.join(os.path.dirname(__file__), "bank.fs"))
    STORE.run(bank.create, {"a": 10, "b": 10})
"""
SUITE = """
    from conftest import STORE
    from example_bank import bank

    def test_audited_transfer_is_logged_once():
        bank.AUDIT_LOG.clear()
        STORE.run(bank.transfer_audited, "a", "b", 1)
        assert bank.AUDIT_LOG == [("a", "b", 1)]

    def test_notified_transfer_is_logged_once():
        bank.AUDIT_LOG.clear()
        bank.transfer_and_notify(STORE, "a", "b", 1)
        assert bank.AUDIT_LOG == [("a", "b", 1)]

    def test_fixture(snaptree_store):
        print("SOURCE", snaptree_store.source)
        assert snaptree_store.run(lambda root: len(root)) == 0
"""


def _pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


@pytest.fixture
def app_suite(tmp_path: Path) -> Path:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_app.py").write_text(textwrap.dedent(SUITE))
    return tmp_path


def test_the_plugin_is_registered_through_the_pytest11_entry_point():
    (plugin,) = entry_points(group="pytest11", name="snaptree")
    assert plugin.value == "snaptree._pytest_plugin"


@pytest.mark.parametrize("backend", ["memory", pytest.param("file", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_the_example_bank_suite_passes_under_chaos_with_conflicts_forced(backend):
    run = _pytest(
        str(TESTS / "example_bank"),
        "-q",
        "--snaptree-chaos=0.5",
        "--snaptree-seed=4",
        f"--snaptree-backend={backend}",
        cwd=TESTS.parent,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"\b\d+ passed\b", run.stdout)
    forced = re.search(r"snaptree chaos: forced (\d+) conflict\(s\) in (\d+) retried", run.stdout)
    assert forced, run.stdout
    assert 0 < int(forced[1]) < int(forced[2])
    assert "--snaptree-chaos=0.5 --snaptree-seed=4" in run.stdout


@pytest.mark.slow
def test_chaos_exposes_a_retry_bug_even_in_a_store_a_conftest_opened_at_import(app_suite):
    run = _pytest("-s", "--snaptree-chaos=1", "--snaptree-seed=1", cwd=app_suite)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAILED test_app.py::test_audited_transfer_is_logged_once" in run.stdout
    assert "1 failed, 2 passed" in run.stdout
    # the conftest's create, the two transfers, and test_fixture's call
    assert "snaptree chaos: forced 4 conflict(s) in 4 retried call(s)" in run.stdout
    assert "snaptree chaos: probability 1, seed 1" in run.stdout  # the header
    assert "SOURCE memory://" in run.stdout  # the fixture's default backend


@pytest.mark.slow
def test_without_chaos_the_plugin_only_provides_the_fixture(app_suite):
    run = _pytest("-q", "-s", "--snaptree-backend=file", cwd=app_suite)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout
    assert "snaptree chaos" not in run.stdout
    assert re.search(r"SOURCE \S+Data\.fs", run.stdout), run.stdout  # a FileStorage


def test_a_probability_outside_0_to_1_is_a_usage_error(app_suite):
    run = _pytest("-q", "--snaptree-chaos=2", cwd=app_suite)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR
    assert "--snaptree-chaos=2: give a probability between 0 and 1" in run.stderr
