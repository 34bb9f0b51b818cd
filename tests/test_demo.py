"""The demo the README starts with: it must run and check what it claims."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

import snaptree
from _cli import snaptree as run_snaptree
from snaptree.demo import transfers as demo

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample_model.json"


@pytest.mark.slow
def test_demo_imports_the_sample_model_once_and_keeps_its_total(tmp_path):
    with snaptree.open(str(tmp_path / "Data.fs")) as store:
        first = demo.run_demo(store, tmp_path / "exports", sample=SAMPLE, seconds=0.5, every=0.2)
        second = demo.run_demo(store, tmp_path / "exports", sample=SAMPLE, seconds=0.5, every=0.2)
    assert first.imported > 6000 and first.model_source == str(SAMPLE)
    assert second.imported == 0  # already in the store
    assert first.ok and second.ok
    assert second.final_total == 100_000_000  # the sample's documented total, in cents


@pytest.mark.slow  # seconds of work: with the torture tests in .ci/run
def test_demo_command_dumps_consistently_while_writers_run_and_exits_0(tmp_path, monkeypatch):
    """``snaptree demo`` on the default store: every dump holds the invariant, as plain data."""
    monkeypatch.delenv("SNAPTREE_DB", raising=False)
    outcome = run_snaptree(
        *("demo", "--seconds", "1", "--accounts", "20", "--model", "absent.json"), cwd=tmp_path
    )
    assert outcome.returncode == 0, outcome.stderr
    assert re.search(r"imported \d+ objects from a synthetic model of 20 accounts", outcome.stdout)
    transfers = re.search(r"writer threads made (\d+) transfers", outcome.stdout)
    assert transfers and int(transfers[1]) > 0, outcome.stdout
    assert "result: OK" in outcome.stdout  # every dump and the final state balance
    # what the exporter was asked for and what it got, as a user would see it
    assert re.search(r"exports: asked for one every 0\.5 s, wrote [1-9]\d* in ", outcome.stdout)
    assert (tmp_path / "data" / "snaptree.fs").is_file()  # the embedded default
    dumps = list((tmp_path / "data" / "exports").glob("snaptree-*.pickle"))
    assert dumps
    for dump in dumps:  # plain data, loadable without snaptree's classes
        tree = pickle.loads(dump.read_bytes())
        assert type(tree["model"]["accounts"]) is dict
        assert demo.total_balance(tree["model"]) == 20 * demo.START_BALANCE
