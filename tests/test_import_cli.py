"""``snaptree import``: exit codes, one-line errors, nothing committed on failure, the sample."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import snaptree
from snaptree.cli import main

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample_model.json"
SNAPTREE = Path(sys.executable).parent / "snaptree"


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


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, ["import", *args])


def test_imports_a_json_file(db: str, tmp_path: Path) -> None:
    source = tmp_path / "model.json"
    source.write_text(json.dumps({"accounts": {"a1": {"balance": 5, "entries": [1, 2]}}}))
    result = invoke(str(source), "--db", db)
    assert result.exit_code == 0, result.output
    assert "imported 3 objects" in result.output
    assert state(db)[1] == {
        "existing": {"keep": 1},
        "accounts": {"a1": {"balance": 5, "entries": [1, 2]}},
    }


def test_path_puts_the_data_in_a_subtree(db: str, tmp_path: Path) -> None:
    source = tmp_path / "a1.json"
    source.write_text('{"balance": 7}')
    result = invoke(str(source), "--db", db, "--path", "bank/accounts/a1")
    assert result.exit_code == 0, result.output
    assert state(db)[1]["bank"] == {"accounts": {"a1": {"balance": 7}}}


def test_existing_key_fails_without_replace_and_succeeds_with_it(db: str, tmp_path: Path) -> None:
    source = tmp_path / "e.json"
    source.write_text('{"existing": {"new": 2}}')
    before = state(db)
    result = invoke(str(source), "--db", db)
    assert result.exit_code == 1
    assert result.output.strip().startswith("snaptree: error: existing: already exists")
    assert "--replace" in result.output
    assert state(db) == before
    result = invoke(str(source), "--db", db, "--replace", "--quiet")
    assert result.exit_code == 0, result.output
    assert "replaced 1 existing key" in result.output
    assert state(db)[1] == {"existing": {"new": 2}}


def test_malformed_json_exits_1_with_line_and_column_and_commits_nothing(
    db: str, tmp_path: Path
) -> None:
    source = tmp_path / "broken.json"
    source.write_text('{"fine": 1,\n "broken": [1 2]}')
    before = state(db)
    result = invoke(str(source), "--db", db)
    assert result.exit_code == 1
    assert "broken.json: malformed JSON at line 2, column 15" in result.output
    assert "Traceback" not in result.output
    assert state(db) == before


def test_hostile_pickle_is_refused_and_runs_nothing(db: str, tmp_path: Path) -> None:
    canary = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return os.system, (f"touch {canary}",)

    source = tmp_path / "evil.pkl"
    source.write_bytes(pickle.dumps({"ok": 1, "evil": Evil()}))
    before = state(db)
    result = invoke(str(source), "--db", db)
    assert result.exit_code == 1
    assert "refused global posix.system" in result.output
    assert not canary.exists()
    assert state(db) == before


def test_allow_lets_a_named_class_through(db: str, tmp_path: Path) -> None:
    source = tmp_path / "frac.pickle"
    from fractions import Fraction

    source.write_bytes(pickle.dumps({"ratio": Fraction(1, 3)}))
    result = invoke(str(source), "--db", db)
    assert result.exit_code == 1
    assert "refused global fractions.Fraction" in result.output
    result = invoke(str(source), "--db", db, "--allow", "fractions:Fraction")
    assert result.exit_code == 0, result.output
    assert state(db)[1]["ratio"] == Fraction(1, 3)


def test_unstorable_value_exits_1_naming_its_path(db: str, tmp_path: Path) -> None:
    source = tmp_path / "odd.pickle"
    source.write_bytes(pickle.dumps({"accounts": {"a7": {"entries": [1, 2, 3, Fraction13()]}}}))
    before = state(db)
    result = invoke(str(source), "--db", db, "--allow", f"{__name__}:Fraction13")
    assert result.exit_code == 1
    assert "snaptree: error: accounts/a7/entries/3: cannot store" in result.output
    assert state(db) == before


class Fraction13:
    """A plain class: loadable when allowed, but not storable."""


def test_help_ends_with_an_example() -> None:
    result = CliRunner().invoke(main, ["import", "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert "snaptree import data/sample_model.json" in result.output


def test_sample_model_imports_and_its_balances_add_up(tmp_path: Path) -> None:
    """The shipped sample is a few thousand objects whose balances total 1,000,000.00."""
    db = str(tmp_path / "bank.fs")
    result = invoke(str(SAMPLE), "--db", db, "--path", "bank")
    assert result.exit_code == 0, result.output
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


def test_real_process_exit_code_and_stderr(tmp_path: Path) -> None:
    """The installed command: failure is one line on stderr and exit 1; success exit 0."""
    db = str(tmp_path / "Data.fs")
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": [1, 2,]}')
    env = {**os.environ, "SNAPTREE_DB": db}
    failed = subprocess.run(
        [str(SNAPTREE), "import", str(broken)], capture_output=True, text=True, env=env, timeout=60
    )
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert failed.stderr.strip().splitlines() == [
        f"snaptree: error: {broken}: malformed JSON at line 1, column 13: Expecting value"
    ]
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    done = subprocess.run(
        [str(SNAPTREE), "import", str(good)], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # not a terminal: no progress bar
    assert state(db)[1] == {"a": [1, 2]}


def test_an_empty_path_is_one_error_line_and_changes_nothing(db: str, tmp_path: Path) -> None:
    """``snaptree import f.json --path "$UNSET"``: refused, not imported into the root."""
    source = tmp_path / "model.json"
    source.write_text('{"existing": {"replaced": true}}')
    before = state(db)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snaptree",
            "import",
            str(source),
            "--db",
            db,
            "--path",
            "",
            "--replace",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("snaptree: error: the import path '' is empty")
    assert state(db) == before


def test_max_objects_lets_intended_copies_in(db: str, tmp_path: Path) -> None:
    """--max-objects raises (or lowers) the limit on what shared containers may become."""
    shared: Any = [[]] * 50
    source = tmp_path / "shared.pickle"
    source.write_bytes(pickle.dumps({"s": [shared] * 50}))
    refused = invoke(str(source), "--db", db, "--max-objects", "100")
    assert refused.exit_code == 1 and "would create 2,552 objects" in refused.stderr
    done = invoke(str(source), "--db", db, "--max-objects", "3000")
    assert done.exit_code == 0, done.output
    assert state(db)[1]["s"] == [shared] * 50
