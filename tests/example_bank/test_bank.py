"""The example bank's own suite, written against snaptree.testing.

It passes as it is and under ``--snaptree-chaos`` (tests/test_testing_plugin.py
runs it so): every retried commit may conflict once, and nothing may change.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import snaptree
from example_bank import bank
from snaptree.testing import assert_retry_safe, interleave, race


@pytest.fixture(autouse=True)
def _clean_outside_world() -> Iterator[None]:
    bank.AUDIT_LOG.clear()
    bank.OUTBOX.clear()
    yield
    bank.AUDIT_LOG.clear()
    bank.OUTBOX.clear()


@pytest.fixture
def store(snaptree_store: snaptree.Store) -> snaptree.Store:
    snaptree_store.run(bank.create, {"a": 100, "b": 50, "c": 0})
    return snaptree_store


def test_transfer_moves_money_and_records_it_in_the_ledger(store):
    assert store.run(bank.transfer, "a", "b", 30) == 70
    assert store.run(lambda root: (bank.total(root), list(root["ledger"]))) == (
        150,
        [{"n": 1, "src": "a", "dst": "b", "amount": 30}],
    )


def test_an_overdraft_is_refused_and_changes_nothing(store):
    with pytest.raises(bank.InsufficientFunds):
        store.run(bank.transfer, "c", "a", 1)
    assert store.run(lambda root: (root["accounts"]["c"]["balance"], len(root["ledger"]))) == (0, 0)


def test_a_transfer_is_audited_and_emailed_exactly_once(store):
    for amount in (1, 2, 3):
        bank.transfer_and_notify(store, "a", "b", amount)
    assert bank.AUDIT_LOG == [("a", "b", 1), ("a", "b", 2), ("a", "b", 3)]
    assert len(bank.OUTBOX) == 3


def test_a_bank_the_application_opens_itself_keeps_its_total(tmp_path: Path):
    store = bank.open_bank(str(tmp_path / "bank.fs"))
    try:
        store.run(bank.create, {"x": 10, "y": 10})
        for _ in range(10):
            store.run(bank.transfer, "x", "y", 1)
        assert store.run(lambda root: [a["balance"] for a in root["accounts"].values()]) == [0, 20]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (bank.transfer, ("a", "b", 5)),
        (bank.transfer_at, ("a", "b", 5, 1_700_000_000.0)),
        (bank.transfer_with_reference, ("a", "b", 5)),
        (bank.apply_batch, ([{"src": "a", "dst": "c", "amount": 5}] * 3,)),
        (bank.go_off_call, ("alice", "bob")),
    ],
)
def test_the_bank_functions_are_retry_safe(store, fn, args):
    assert_retry_safe(store, fn, *args, conflicts=3)


def test_two_doctors_cannot_both_leave_the_rota(store):
    result = interleave(
        store,
        lambda root: bank.go_off_call(root, "alice", "bob"),
        lambda root: bank.go_off_call(root, "bob", "alice"),
    )
    assert (result.first_result, result.second_result, result.second_runs) == (True, False, 2)
    assert store.run(lambda root: root["doctors"]["bob"]["on_call"]) is True


def test_random_transfers_never_change_the_total(store):
    def total_is_150(root):
        assert bank.total(root) == 150, f"total {bank.total(root)}"

    report = race(store, [bank.random_transfer], total_is_150, threads=3, seconds=0.5, seed=11)
    assert report.operations["random_transfer"] > 0
