"""The demo the README starts with: it must run and check what it claims."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

import snaptree
from snaptree.cli import main
from snaptree.demo import transfers as demo

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample_model.json"


def test_demo_dumps_are_consistent_while_writers_run(tmp_path):
    with snaptree.open(str(tmp_path / "Data.fs")) as store:
        result = demo.run_demo(
            store, tmp_path / "exports", seconds=1.0, accounts=50, writers=3, every=0.2, seed=1
        )
    assert result.model_source == "a synthetic model of 50 accounts"
    assert result.transfers > 0
    assert result.exports, "the exporter wrote nothing"
    assert result.consistent_exports == len(result.exports)
    assert result.final_total == result.expected_total == 50 * demo.START_BALANCE
    assert result.ok
    for dump in result.exports:  # plain data, loadable without snaptree's classes
        with dump.open("rb") as f:
            tree = pickle.load(f)
        assert type(tree["model"]["accounts"]) is dict


def test_demo_imports_the_sample_model_once_and_keeps_its_total(tmp_path):
    with snaptree.open(str(tmp_path / "Data.fs")) as store:
        first = demo.run_demo(store, tmp_path / "exports", sample=SAMPLE, seconds=0.5, every=0.2)
        second = demo.run_demo(store, tmp_path / "exports", sample=SAMPLE, seconds=0.5, every=0.2)
    assert first.imported > 6000 and first.model_source == str(SAMPLE)
    assert second.imported == 0  # already in the store
    assert first.ok and second.ok
    assert second.final_total == 100_000_000  # the sample's documented total, in cents


def test_demo_command_prints_a_summary_and_exits_0(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SNAPTREE_DB", raising=False)
    outcome = CliRunner().invoke(
        main, ["demo", "--seconds", "1", "--accounts", "20", "--model", "absent.json"]
    )
    assert outcome.exit_code == 0, outcome.output
    assert "result: OK" in outcome.stdout
    assert Path("data/snaptree.fs").is_file()  # the embedded default
    assert list(Path("data/exports").glob("snaptree-*.pickle"))


def test_python_dash_m_snaptree_runs_the_cli(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "snaptree", "demo", "--db", "nowhere://x"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("snaptree: error: cannot open nowhere://x: unknown URI scheme")
    assert "Traceback" not in done.stderr
