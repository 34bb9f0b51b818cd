"""snaptree.testing: the conflict-retry kit, checked against the example bank (tests/example_bank).

Each kind of retry bug must be caught with a message that names it, each
fixed twin must pass; conflicts are genuine ZODB conflicts through the
store's own retry path; races are deterministic given their seed.
"""

from __future__ import annotations

import array
import functools
import io
import queue
import re
import sys
import sysconfig
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from ZODB.POSException import ConflictError

import snaptree
from _threads import run_threads
from example_bank import bank
from snaptree import RetriesExhausted, RetryPolicy
from snaptree.testing import (
    Chaos,
    assert_retry_safe,
    force_conflicts,
    interleave,
    race,
)

NO_SLEEP = RetryPolicy(attempts=20, sleep=lambda seconds: None)


@pytest.fixture(autouse=True)
def _clean_outside_world() -> Iterator[None]:
    bank.AUDIT_LOG.clear()
    bank.OUTBOX.clear()
    yield
    bank.AUDIT_LOG.clear()
    bank.OUTBOX.clear()


@pytest.fixture
def bank_store(store_uri: str) -> Iterator[snaptree.Store]:
    """The example bank on each embedded backend: a 100, b 50, c 0."""
    s = snaptree.open(store_uri, retry=NO_SLEEP)
    s.run(bank.create, {"a": 100, "b": 50, "c": 0})
    yield s
    s.close()


@pytest.fixture
def racing_bank_store(store_uri: str) -> Iterator[snaptree.Store]:
    """The example bank with the default retry policy, for races between threads.

    Its jittered backoff is what spreads colliding threads apart in
    production; without it (NO_SLEEP) three threads transferring among three
    accounts can collide twenty times in a row and give up.
    """
    s = snaptree.open(store_uri)
    s.run(bank.create, {"a": 100, "b": 50, "c": 0})
    yield s
    s.close()


def _balances(store: snaptree.Store) -> dict[str, int]:
    return store.run(lambda root: {k: v["balance"] for k, v in root["accounts"].items()})


# -- assert_retry_safe catches every kind of retry bug -----------------------------


def test_assert_retry_safe_catches_an_append_to_a_module_level_list(bank_store):
    with pytest.raises(AssertionError) as info:
        assert_retry_safe(bank_store, bank.transfer_audited, "a", "b", 5, conflicts=2)
    message = str(info.value)
    assert "transfer_audited is not retry-safe" in message
    assert "outside the tree, AUDIT_LOG (a global of example_bank.bank)" in message
    assert "left it [('a', 'b', 5)]" in message
    assert "to [('a', 'b', 5), ('a', 'b', 5), ('a', 'b', 5), ('a', 'b', 5)]" in message


def test_assert_retry_safe_catches_an_email_sent_by_a_helper_it_calls(bank_store):
    with pytest.raises(AssertionError, match=r"outside the tree, OUTBOX \(a global of "):
        assert_retry_safe(bank_store, bank.transfer_emailing, "a", "b", 5)


def test_assert_retry_safe_catches_a_closure_counter_and_its_return_value(bank_store):
    with pytest.raises(AssertionError) as info:
        assert_retry_safe(bank_store, bank.counting_transfers(), "a", "b", 5, conflicts=2)
    message = str(info.value)
    assert "made (a variable counting_transfers.<locals>.transfer_counted closes over)" in message
    assert "left it 1, and the run with 2 conflict(s) changed it again, to 4" in message
    assert "outcome: without conflicts it returned 1; with 2 conflict(s) it returned 4" in message


class _Audit:
    """Keeps its entries in a class attribute, reached only through self or cls."""

    entries: list[Any] = []
    sent = 0

    def log(self, entry: Any) -> None:
        self.entries.append(entry)

    @classmethod
    def notify(cls) -> None:
        cls.sent += 1


def _deposit(root: Any) -> None:
    root["accounts"]["a"]["balance"] += 1


def _logs_through_self(root: Any) -> None:
    _Audit().log("deposit")
    _deposit(root)


def _notifies_through_cls(root: Any) -> None:
    _Audit.notify()
    _deposit(root)


def _sends_through_a_default(root: Any, send: Any = bank.OUTBOX.append) -> None:
    send("mail")
    _deposit(root)


def _counts_on_itself(root: Any) -> None:
    _counts_on_itself.calls = getattr(_counts_on_itself, "calls", 0) + 1  # type: ignore[attr-defined]
    _deposit(root)


_MAILER = mock.Mock()


def _mails_a_mock(root: Any) -> None:
    _MAILER.send("mail")
    _deposit(root)


@pytest.mark.parametrize(
    ("fn", "place"),
    [
        (_logs_through_self, "_Audit.entries"),
        (_notifies_through_cls, "_Audit.sent"),
        (_sends_through_a_default, "the object of list.append"),
        (_counts_on_itself, "the attributes of"),
        (_mails_a_mock, "_MAILER"),
    ],
    ids=["class-attribute-via-self", "via-cls", "function-default", "function-attribute", "mock"],
)
def test_assert_retry_safe_follows_methods_defaults_and_test_doubles(bank_store, fn, place):
    """State reached through self, cls, a default that is code, the function, or a Mock."""
    with pytest.raises(AssertionError, match=rf"outside the tree, {re.escape(place)}"):
        assert_retry_safe(bank_store, fn)


_OUTBOX: queue.Queue[str] = queue.Queue()
_LOG = io.StringIO()
_WIRE = io.BytesIO()
_SAMPLES = array.array("d")


def _queues_a_mail(root: Any) -> None:
    _OUTBOX.put("mail")
    _deposit(root)


def _writes_a_log_line(root: Any) -> None:
    _LOG.write("deposit\n")
    _deposit(root)


def _sends_bytes(root: Any) -> None:
    _WIRE.write(b"deposit")
    _deposit(root)


def _records_a_sample(root: Any) -> None:
    _SAMPLES.append(1.0)
    _deposit(root)


@pytest.mark.parametrize(
    ("fn", "shown"),
    [
        (_queues_a_mail, "a Queue holding ['mail', 'mail', 'mail', 'mail']"),
        (_writes_a_log_line, "a StringIO holding 'deposit\\ndeposit\\ndeposit\\ndeposit\\n'"),
        (_sends_bytes, "a BytesIO holding b'depositdepositdepositdeposit'"),
        (_records_a_sample, "a array holding [1.0, 1.0, 1.0, 1.0]"),
    ],
    ids=["queue", "stringio", "bytesio", "array"],
)
def test_assert_retry_safe_sees_into_the_standard_librarys_queues_and_buffers(
    bank_store, fn, shown
):
    """They were compared by identity, as library objects are: a mail queued on every
    attempt passed as retry-safe."""
    _OUTBOX.queue.clear()
    for buffer in (_LOG, _WIRE):
        buffer.seek(0)
        buffer.truncate()
    del _SAMPLES[:]
    with pytest.raises(AssertionError) as info:
        assert_retry_safe(bank_store, fn)
    assert f"changed it again, to {shown}" in str(info.value)


def test_assert_retry_safe_catches_reading_the_clock(bank_store):
    with pytest.raises(AssertionError, match=r"committed tree at ledger/0/at: "):
        assert_retry_safe(bank_store, bank.transfer_stamped, "a", "b", 5)


def test_a_transactional_function_is_checked_on_the_copies_not_in_its_store(bank_store):
    """The decorated function would commit to its own store (and its args shift by one)."""

    @bank_store.transactional
    def stamp(root: Any, note: Any = None) -> None:
        root.setdefault("log", []).append(time.time())

    tid = bank_store.last_tid()
    not_safe = r"(?s)stamp is not retry-safe.*committed tree at log/0"
    with pytest.raises(AssertionError, match=not_safe):
        assert_retry_safe(bank_store, stamp)
    assert bank_store.last_tid() == tid


def test_assert_retry_safe_catches_an_unseeded_random_number(bank_store):
    """Caught through the generator's state, so even when the two draws happen to agree."""
    with pytest.raises(AssertionError, match="the random module's shared generator"):
        assert_retry_safe(bank_store, bank.transfer_with_random_reference, "a", "b", 5)


def test_assert_retry_safe_catches_a_consumed_argument(bank_store):
    batch = [{"src": "a", "dst": "c", "amount": 10}, {"src": "b", "dst": "c", "amount": 5}]
    with pytest.raises(AssertionError) as info:
        assert_retry_safe(bank_store, bank.apply_batch_consuming, batch)
    message = str(info.value)
    assert "committed tree at accounts/c/balance: 15 without conflicts, 0 with 2" in message
    assert "returned 2; with 2 conflict(s) it returned 0" in message
    assert len(batch) == 2  # each run was given its own copy


def test_assert_retry_safe_catches_an_argument_changed_more_on_each_run(bank_store):
    def add_fee(root: Any, order: dict[str, int]) -> None:
        order["fee"] = order.get("fee", 0) + 1
        bank.transfer(root, "a", "b", 1)

    with pytest.raises(AssertionError, match=r"argument 1 after the run: \{'fee': 1\} without"):
        assert_retry_safe(bank_store, add_fee, {})


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (bank.transfer, ("a", "b", 5)),
        (bank.transfer_at, ("a", "b", 5, 1_700_000_000.0)),
        (bank.transfer_with_reference, ("a", "b", 5)),
        (bank.apply_batch, ([{"src": "a", "dst": "c", "amount": 10}],)),
        (bank.go_off_call, ("alice", "bob")),
    ],
)
def test_the_fixed_twins_pass_and_leave_the_store_unchanged(bank_store, fn, args):
    before = bank_store.run(lambda root: root)
    assert_retry_safe(bank_store, fn, *args, conflicts=3)
    assert bank_store.run(lambda root: root) == before
    assert bank.AUDIT_LOG == [] and bank.OUTBOX == []


def test_assert_retry_safe_returns_what_the_function_returned(bank_store):
    assert assert_retry_safe(bank_store, bank.transfer_with_reference, "a", "b", 5) == "T000001"


def test_assert_retry_safe_follows_the_application_even_when_installed_as_a_library(
    bank_store, monkeypatch
):
    """An application installed into site-packages is still the code under test."""
    app = types.ModuleType("installed_bank")
    app.__file__ = str(Path(sysconfig.get_paths()["purelib"]) / "installed_bank.py")
    exec(  # the module's source, as if imported from site-packages
        "SENT = []\n"
        "def pay(root):\n"
        "    root['accounts']['a']['balance'] -= 1\n"
        "    SENT.append('receipt')\n",
        app.__dict__,
    )
    monkeypatch.setitem(sys.modules, "installed_bank", app)
    with pytest.raises(AssertionError, match=r"SENT \(a global of installed_bank\)"):
        assert_retry_safe(bank_store, app.pay)


_RATES: dict[str, float] = {}


def _convert(root: Any, currency: str) -> float:
    rate = _RATES.setdefault(currency, 1.5)  # a cache: a second execution changes nothing
    root["last_rate"] = rate
    return rate


def test_a_cache_filled_the_same_way_by_every_execution_is_retry_safe(bank_store):
    _RATES.clear()
    assert assert_retry_safe(bank_store, _convert, "EUR") == 1.5


def test_assert_retry_safe_refuses_more_conflicts_than_the_policy_retries(store_uri):
    s = snaptree.open(store_uri, retry=RetryPolicy(attempts=3))
    with s, pytest.raises(snaptree.ArgumentError, match="ask for at most 2"):
        assert_retry_safe(s, bank.create, {}, conflicts=3)


def test_assert_retry_safe_reports_a_function_that_fails_without_any_conflict(bank_store):
    with pytest.raises(AssertionError, match=r"raised InsufficientFunds.*needs a call that"):
        assert_retry_safe(bank_store, bank.transfer, "c", "a", 1)


def test_assert_retry_safe_refuses_arguments_it_cannot_copy(bank_store):
    with pytest.raises(snaptree.ArgumentError, match="pass copyable stand-ins"):
        assert_retry_safe(bank_store, lambda root, lock: None, threading.Lock())


# -- force_conflicts -------------------------------------------------------------------


def test_forced_conflicts_are_genuine_conflicts_the_store_retries_and_counts(bank_store):
    executions = []

    def move(root: Any) -> int:
        executions.append(1)
        return bank.transfer(root, "a", "b", 10)

    with force_conflicts(bank_store, times=2) as forced:
        assert bank_store.run(move) == 90
    assert len(executions) == 3
    assert (forced.conflicts, forced.retries, forced.exhausted) == (2, 2, 0)
    stats = bank_store.stats()
    assert (stats["conflicts"], stats["retries"]) == (2, 2)
    assert _balances(bank_store) == {"a": 90, "b": 60, "c": 0}  # applied once


def test_more_forced_conflicts_than_retries_exhaust_the_call_with_a_conflict_error(store_uri):
    with snaptree.open(store_uri, retry=RetryPolicy(attempts=3, sleep=lambda s: None)) as s:
        s.run(bank.create, {"a": 1, "b": 0})
        with force_conflicts(s, times=5) as forced, pytest.raises(RetriesExhausted) as info:
            s.run(bank.transfer, "a", "b", 1)
        assert isinstance(info.value.__cause__, ConflictError)
        assert "forced by snaptree.testing.force_conflicts, 3 of 5" in str(info.value.__cause__)
        assert (forced.conflicts, forced.retries, forced.exhausted) == (3, 2, 1)
        assert _balances(s) == {"a": 1, "b": 0}


def test_where_aims_the_conflicts_at_one_function(bank_store):
    seen: list[str] = []

    def audit(root: Any) -> None:
        seen.append("audit")
        root["audited"] = True

    def move(root: Any, amount: int) -> None:
        seen.append("move")
        bank.transfer(root, "a", "b", amount)

    with force_conflicts(bank_store, times=1, where=move) as forced:
        bank_store.run(audit)
        bank_store.run(functools.partial(move, amount=1))  # a partial of the target counts
        bank_store.run(audit)
    assert seen == ["audit", "move", "move", "audit"]
    assert forced.conflicts == 1
    with force_conflicts(bank_store, times=1, where=move) as forced:
        bank_store.transactional(move)(1)  # so does a @store.transactional function
    assert seen[4:] == ["move", "move"]
    assert forced.conflicts == 1


def test_where_matches_a_bound_method_by_equality(bank_store):
    class Teller:
        def pay(self, root: Any) -> None:
            bank.transfer(root, "a", "c", 1)

    teller, other = Teller(), Teller()
    with force_conflicts(bank_store, times=1, where=teller.pay) as forced:
        bank_store.run(other.pay)
        assert forced.conflicts == 0
        bank_store.run(teller.pay)
    assert forced.conflicts == 1


def test_transaction_blocks_and_snapshots_are_never_forced_to_conflict(bank_store):
    with force_conflicts(bank_store, times=1) as forced:
        with bank_store.transaction() as root:
            root["accounts"]["c"]["balance"] = 7
        with bank_store.snapshot() as snap:
            assert snap.root["accounts"]["c"]["balance"] == 7
        assert forced.conflicts == 0
        bank_store.run(bank.transfer, "c", "a", 7)
    assert forced.conflicts == 1


def test_calls_from_other_threads_are_forced_too_and_nothing_after_the_block(bank_store):
    with force_conflicts(bank_store, times=1) as forced:
        run_threads([lambda: bank_store.run(bank.transfer, "a", "b", 1)])
    bank_store.run(bank.transfer, "a", "b", 1)
    assert forced.conflicts == 1
    assert bank_store.stats()["conflicts"] == 1


# -- interleave ---------------------------------------------------------------------------


def test_interleave_shows_write_skew_without_read_current(bank_store):
    result = interleave(
        bank_store,
        lambda root: bank.go_off_call_unguarded(root, "alice", "bob"),
        lambda root: bank.go_off_call_unguarded(root, "bob", "alice"),
    )
    assert (result.first_runs, result.second_runs, result.conflicted) == (1, 1, False)
    assert (result.first_result, result.second_result) == (True, True)
    doctors = bank_store.run(lambda root: {k: v["on_call"] for k, v in root["doctors"].items()})
    assert doctors == {"alice": False, "bob": False}  # nobody on call: the anomaly


def test_interleave_shows_read_current_prevents_write_skew(bank_store):
    result = interleave(
        bank_store,
        lambda root: bank.go_off_call(root, "alice", "bob"),
        lambda root: bank.go_off_call(root, "bob", "alice"),
    )
    assert (result.first_runs, result.second_runs, result.conflicted) == (1, 2, True)
    assert (result.first_result, result.second_result) == (True, False)
    doctors = bank_store.run(lambda root: {k: v["on_call"] for k, v in root["doctors"].items()})
    assert doctors == {"alice": False, "bob": True}


def test_interleave_lets_merged_changes_commit_without_a_conflict(bank_store):
    """Different keys of one mapping merge: the second function runs once."""
    result = interleave(
        bank_store,
        lambda root: root["accounts"].__setitem__("d", {"balance": 1}),
        lambda root: root["accounts"].__setitem__("e", {"balance": 2}),
    )
    assert result.second_runs == 1
    assert sorted(_balances(bank_store)) == ["a", "b", "c", "d", "e"]


def test_interleave_reports_an_error_of_the_second_function_and_runs_nothing_else(bank_store):
    ran = []
    with pytest.raises(bank.InsufficientFunds):
        interleave(bank_store, lambda root: ran.append(1), lambda r: bank.transfer(r, "c", "a", 1))
    assert ran == []


# -- race ---------------------------------------------------------------------------------


def _total_is_150(root: Any) -> None:
    assert bank.total(root) == 150, f"the total is {bank.total(root)}, not 150"


def test_race_passes_when_operations_keep_the_invariant(racing_bank_store, capsys):
    store = racing_bank_store
    report = race(store, [bank.random_transfer], _total_is_150, threads=3, seconds=0.5, seed=5)
    assert report.seed == 5
    assert report.operations["random_transfer"] > 0
    assert report.snapshots_checked >= 2
    assert "seed 5" in capsys.readouterr().out
    assert store.run(bank.total) == 150


def test_race_runs_each_workers_calls_alongside_on_its_own_connection(bank_store):
    """Taking turns, the workers' transactions would hardly ever be open at once, and a
    race would miss the interleavings (write skew) it is there to find."""
    seen: set[tuple[int, int]] = set()

    def note(root: Any, rng: Any) -> None:
        seen.add((threading.get_ident(), id(root._p_jar)))

    race(bank_store, [note], lambda root: None, threads=3, seconds=0.2, seed=1)
    assert len({thread for thread, _ in seen}) == 3
    assert len({jar for _, jar in seen}) == len(seen) == 3


def test_race_fails_with_the_tid_the_message_and_the_seed(racing_bank_store, capsys):
    """With seed 8 the first operation of worker 0 is the lossy fee: the race must fail."""
    racing_bank_store.run(bank.transfer, "a", "c", 50)  # every account can pay a fee
    with pytest.raises(AssertionError) as info:
        race(
            racing_bank_store,
            [bank.random_transfer, bank.charge_fee_lossy],
            _total_is_150,
            threads=2,
            seconds=0.5,
            seed=8,
        )
    message = str(info.value)
    assert "invariant _total_is_150 violated" in message
    assert "at tid " in message
    assert "not 150" in message
    assert "seed 8: repeat with race(..., seed=8)" in message
    assert "seed 8" in capsys.readouterr().out


def test_an_invariant_that_returns_false_fails_the_race_too(racing_bank_store):
    """A predicate written instead of an assert is not a silent pass."""
    racing_bank_store.run(bank.transfer, "a", "c", 50)
    with pytest.raises(AssertionError, match=r"invariant .*<lambda> violated .* returned False"):
        race(
            racing_bank_store,
            [bank.random_transfer, bank.charge_fee_lossy],
            lambda root: bank.total(root) == 150,
            threads=2,
            seconds=0.5,
            seed=8,
        )


def test_race_chooses_the_same_operations_for_the_same_seed(bank_store):
    """One worker's sequence of operations and their numbers is a function of the seed."""

    def record(name: str) -> Any:
        def operation(root: Any, rng: Any) -> None:
            root["ledger"].append(f"{name}{rng.randint(0, 99)}")

        operation.__name__ = name
        return operation

    operations = [record("x"), record("y"), record("z")]
    runs = []
    for _ in range(2):
        bank_store.run(lambda root: root["ledger"].clear())
        race(bank_store, operations, lambda root: None, threads=1, seconds=0.2, seed=42)
        runs.append(bank_store.run(lambda root: list(root["ledger"])))
    common = min(len(runs[0]), len(runs[1]))
    assert common > 0
    assert runs[0][:common] == runs[1][:common]


def test_race_stops_at_the_first_failing_operation(bank_store):
    def broken(root: Any, rng: Any) -> None:
        raise KeyError("no such account")

    with pytest.raises(AssertionError, match=r"operation .*broken failed in worker"):
        race(bank_store, [broken], _total_is_150, threads=2, seconds=30, seed=1)


# -- Chaos ----------------------------------------------------------------------------------


def test_chaos_conflicts_the_first_commit_of_retried_calls_in_stores_opened_meanwhile(store_uri):
    with Chaos(1.0, seed=1) as chaos, snaptree.open(store_uri, retry=NO_SLEEP) as s:
        executions = []
        s.run(bank.create, {"a": 10, "b": 0})

        def move(root: Any) -> None:
            executions.append(1)
            bank.transfer(root, "a", "b", 1)

        s.run(move)
        assert len(executions) == 2  # conflicted once, then committed
        with s.transaction() as root:  # never retried: never forced
            root["untouched"] = True
        s.transactional(retries=0)(move)()  # no retry left: never forced
        assert len(executions) == 3
        assert chaos.forced == 2  # create and the first move
    with snaptree.open(store_uri, retry=NO_SLEEP) as s:  # chaos is off again
        s.run(bank.create, {"a": 10, "b": 0})
        s.run(move)
        assert s.stats()["conflicts"] == 0


def test_chaos_stands_down_where_the_kit_counts_conflicts(bank_store):
    with Chaos(1.0, seed=1) as chaos:
        chaos.attach(bank_store)
        with force_conflicts(bank_store, times=1) as forced:
            bank_store.run(bank.transfer, "a", "b", 1)
        result = interleave(
            bank_store, lambda r: bank.transfer(r, "a", "b", 1), lambda r: bank.total(r)
        )
        assert_retry_safe(bank_store, bank.transfer, "a", "b", 1)
        assert chaos.forced == 0
    assert forced.retries == 1
    assert (result.first_runs, result.second_runs) == (1, 1)


def test_chaos_draws_the_same_conflicts_for_the_same_seed_and_label(store_uri):
    def conflicts_of(seed: int) -> list[int]:
        pattern = []
        with Chaos(0.5, seed=seed) as chaos, snaptree.open(store_uri, retry=NO_SLEEP) as s:
            chaos.reseed("tests/test_x.py::test_y")
            for _ in range(30):
                before = chaos.forced
                s.run(lambda root: root.update(n=1))
                pattern.append(chaos.forced - before)
        return pattern

    first = conflicts_of(7)
    assert first == conflicts_of(7)
    assert 0 < sum(first) < 30
    assert first != conflicts_of(8)
