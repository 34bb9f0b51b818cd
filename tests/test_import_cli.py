"""``snaptree import``: exit codes, one-line errors, nothing committed on failure, the sample.

Exit codes are the ones ``snaptree.cli`` documents: 1 for a failure such as
a key that exists, 2 for usage (a bad path), 3 for bad input (a malformed
or hostile file, a value the tree cannot store, data that expands too far).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import snaptree
from _cli import error_line
from _cli import snaptree as run_snaptree

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample_model.json"


@pytest.fixture
def db(tmp_path: Path) -> str:
    """A FileStorage path holding {"existing": {"keep": 1}}."""
    path = str(tmp_path / "Data.fs")
    with snaptree.open(path) as store:
        store.import_tree({"existing": {"keep": 1}})
    return path


def state(db: str) -> tuple[str, Any]:
    with snaptree.open(db) as store:
        return store.last_tid(), store.run(lambda root: root)


def invoke(*args: str) -> subprocess.CompletedProcess[str]:
    return run_snaptree("import", *args)


def test_imports_a_json_file(db: str, tmp_path: Path) -> None:
    source = tmp_path / "model.json"
    source.write_text(json.dumps({"accounts": {"a1": {"balance": 5, "entries": [1, 2]}}}))
    result = invoke(str(source), "--db", db)
    assert result.returncode == 0, result.stderr
    assert "imported 3 objects" in result.stdout
    assert state(db)[1] == {
        "existing": {"keep": 1},
        "accounts": {"a1": {"balance": 5, "entries": [1, 2]}},
    }


@pytest.mark.slow
def test_savepoint_every_of_older_scripts_still_works(db: str, tmp_path: Path) -> None:
    """The option's old name stays (hidden from --help), meaning --commit-every."""
    source = tmp_path / "model.json"
    source.write_text(json.dumps({"m": {f"k{i}": [i] for i in range(30)}}))
    result = invoke(str(source), "--db", db, "--savepoint-every", "5")
    assert result.returncode == 0, result.stderr
    assert "--savepoint-every is now --commit-every" in result.stderr
    assert state(db)[1]["m"] == {f"k{i}": [i] for i in range(30)}
    assert "--savepoint-every" not in invoke("--help").stdout


@pytest.mark.slow
def test_path_puts_the_data_in_a_subtree(db: str, tmp_path: Path) -> None:
    source = tmp_path / "a1.json"
    source.write_text('{"balance": 7}')
    result = invoke(str(source), "--db", db, "--path", "bank/accounts/a1")
    assert result.returncode == 0, result.stderr
    assert state(db)[1]["bank"] == {"accounts": {"a1": {"balance": 7}}}


@pytest.mark.slow
def test_existing_key_fails_without_replace_and_succeeds_with_it(db: str, tmp_path: Path) -> None:
    source = tmp_path / "e.json"
    source.write_text('{"existing": {"new": 2}}')
    before = state(db)
    result = invoke(str(source), "--db", db)
    assert result.returncode == 1
    assert error_line(result).startswith("snaptree: error: existing: already exists")
    assert "--replace" in result.stderr and result.stdout == ""
    assert state(db) == before
    result = invoke(str(source), "--db", db, "--replace", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "replaced 1 existing key" in result.stdout
    assert state(db)[1] == {"existing": {"new": 2}}


def test_malformed_json_exits_3_with_line_and_column_and_commits_nothing(
    db: str, tmp_path: Path
) -> None:
    source = tmp_path / "broken.json"
    source.write_text('{"fine": 1,\n "broken": [1 2]}')
    before = state(db)
    result = invoke(str(source), "--db", db)
    assert result.returncode == 3
    assert "broken.json: malformed JSON at line 2, column 15" in error_line(result)
    assert state(db) == before


@pytest.mark.slow
def test_hostile_pickle_is_refused_and_runs_nothing(db: str, tmp_path: Path) -> None:
    canary = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return os.system, (f"touch {canary}",)

    source = tmp_path / "evil.pkl"
    source.write_bytes(pickle.dumps({"ok": 1, "evil": Evil()}))
    before = state(db)
    result = invoke(str(source), "--db", db)
    assert result.returncode == 3
    assert "refused global posix.system" in error_line(result)
    assert not canary.exists()
    assert state(db) == before


@pytest.mark.slow
def test_allow_lets_a_named_class_through(db: str, tmp_path: Path) -> None:
    source = tmp_path / "frac.pickle"
    from fractions import Fraction

    source.write_bytes(pickle.dumps({"ratio": Fraction(1, 3)}))
    result = invoke(str(source), "--db", db)
    assert result.returncode == 3
    assert "refused global fractions.Fraction" in error_line(result)
    result = invoke(str(source), "--db", db, "--allow", "fractions:Fraction")
    assert result.returncode == 0, result.stderr
    assert state(db)[1]["ratio"] == Fraction(1, 3)


def test_unstorable_value_exits_3_naming_its_path(db: str, tmp_path: Path) -> None:
    source = tmp_path / "odd.pickle"
    source.write_bytes(pickle.dumps({"accounts": {"a7": {"entries": [1, 2, 3, Fraction13()]}}}))
    before = state(db)
    # The command imports this module by name to load the allowed class.
    here = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(here)}
    result = run_snaptree(
        "import", str(source), "--db", db, "--allow", f"{__name__}:Fraction13", env=env
    )
    assert result.returncode == 3
    assert error_line(result).startswith("snaptree: error: accounts/a7/entries/3: cannot store")
    assert state(db) == before


class Fraction13:
    """A plain class: loadable when allowed, but not storable."""


@pytest.mark.slow
def test_help_ends_with_an_example() -> None:
    result = invoke("--help")
    assert result.returncode == 0
    assert "Example:" in result.stdout
    assert "snaptree import data/sample_model.json" in result.stdout


def test_sample_model_imports_and_its_balances_add_up(tmp_path: Path) -> None:
    """The shipped sample is a few thousand objects whose balances total 1,000,000.00."""
    db = str(tmp_path / "bank.fs")
    result = invoke(str(SAMPLE), "--db", db, "--path", "bank")
    assert result.returncode == 0, result.stderr
    with snaptree.open(db) as store:
        total, count, meta = store.run(
            lambda root: (
                sum(a["balance"] for a in root["bank"]["accounts"].values()),
                len(root["bank"]["accounts"]),
                root["bank"]["meta"]["total_balance"],
            )
        )
    assert total == meta == 100_000_000
    assert count == 400
    assert SAMPLE.stat().st_size < 1_500_000


def test_sample_model_is_what_the_generator_writes() -> None:
    """The shipped file is reproducible from scripts/make_sample_model.py."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_sample_model.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_failure_is_one_line_on_stderr_and_success_is_quiet_off_a_terminal(tmp_path: Path) -> None:
    """A failure is one line on stderr and nothing on stdout; success exit 0, no progress bar."""
    db = str(tmp_path / "Data.fs")
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": [1, 2,]}')
    env = {"SNAPTREE_DB": db}
    failed = run_snaptree("import", broken, env=env)
    assert failed.returncode == 3
    assert failed.stdout == ""
    assert failed.stderr.strip().splitlines() == [
        f"snaptree: error: {broken}: malformed JSON at line 1, column 13: unallowed token at "
        "this point in JSON text"
    ]
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    done = run_snaptree("import", good, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # not a terminal: no progress bar
    assert state(db)[1] == {"a": [1, 2]}


@pytest.mark.slow
def test_an_empty_path_is_a_usage_error_and_changes_nothing(db: str, tmp_path: Path) -> None:
    """``snaptree import f.json --path "$UNSET"``: refused (exit 2), not imported into the root."""
    source = tmp_path / "model.json"
    source.write_text('{"existing": {"replaced": true}}')
    before = state(db)
    result = invoke(str(source), "--db", db, "--path", "", "--replace")
    assert result.returncode == 2
    assert error_line(result).startswith("snaptree: error: the import path '' is empty")
    assert state(db) == before


@pytest.mark.slow
def test_max_objects_lets_intended_sharing_in(db: str, tmp_path: Path) -> None:
    """--max-objects raises (or lowers) the limit on what shared containers may expand to."""
    shared: Any = [[]] * 50
    source = tmp_path / "shared.pickle"
    source.write_bytes(pickle.dumps({"s": [shared] * 50}))
    refused = invoke(str(source), "--db", db, "--max-objects", "100")
    assert refused.returncode == 3
    assert "expands to 2,552 objects from 4 distinct" in error_line(refused)
    done = invoke(str(source), "--db", db, "--max-objects", "3000")
    assert done.returncode == 0, done.stderr
    assert "imported 3 objects" in done.stdout  # the three lists, once each
    assert state(db)[1]["s"] == [shared] * 50


@pytest.mark.slow
def test_a_failed_streamed_import_into_a_new_store_leaves_no_store_behind(tmp_path: Path) -> None:
    """A typo in --db plus a bad file must not create a database (a JSON file is read once open)."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"accounts": {"a1": {"balance": 1}, "a2": [1, 2,')
    typo = tmp_path / "tpyo.fs"
    result = run_snaptree("import", bad, "--db", typo)
    assert result.returncode == 3
    assert "bad.json: malformed JSON" in error_line(result)
    assert not typo.exists()
    assert not any(tmp_path.glob("tpyo.fs.*index")) and not (tmp_path / "tpyo.fs.tmp").exists()
    # a store that existed before is left in place, unchanged
    good = tmp_path / "good.json"
    good.write_text('{"n": 1}')
    assert run_snaptree("import", good, "--db", typo).returncode == 0
    before = typo.read_bytes()
    assert run_snaptree("import", bad, "--db", typo, "--path", "more").returncode == 3
    assert typo.exists() and typo.read_bytes()[: len(before)] == before
    with snaptree.open(str(typo)) as store:
        assert store.run(lambda root: dict(root)) == {"n": 1}
