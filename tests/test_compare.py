"""The comparison machinery detects what it claims to: crashed and torn dumps of the naive design.

The interleavings are forced with events, not left to the scheduler: a value
whose pickling blocks until a writer has changed the dict being walked, and
an accounts mapping that blocks a transfer between its debit and its credit.
The same forced interleavings against snaptree find nothing wrong.
"""

from __future__ import annotations

import json
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import snaptree
from snaptree.demo import compare, designs

WAIT = 30.0  # every wait has a timeout; none of them is expected to expire


class _Tripwire:
    """A value that, when pickled, blocks until *during_pickle* has run in another thread."""

    def __init__(self, during_pickle: Callable[[], None]) -> None:
        self.during_pickle = during_pickle

    def __reduce__(self) -> tuple[Any, ...]:
        self.during_pickle()
        return (int, (0,))


class _PausingAccounts:
    """Wraps the accounts mapping; blocks after the first write (the debit of a transfer)."""

    def __init__(self, real: Any, half_done: threading.Event, resume: threading.Event) -> None:
        self.real = real
        self.half_done = half_done
        self.resume = resume

    def __getitem__(self, key: str) -> int:
        return self.real[key]

    def __setitem__(self, key: str, value: int) -> None:
        self.real[key] = value
        if not self.half_done.is_set():
            self.half_done.set()
            assert self.resume.wait(WAIT), "the test never resumed the transfer"


class _PausingRoot:
    """A tree root whose ``accounts`` pauses mid-transfer; everything else passes through."""

    def __init__(self, real: Any, accounts: _PausingAccounts) -> None:
        self.real = real
        self.accounts = accounts

    def __getitem__(self, key: str) -> Any:
        return self.accounts if key == "accounts" else self.real[key]


class _Worker:
    """Runs one function in a thread; joins with a timeout and re-raises its failure."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.failure: BaseException | None = None

        def target() -> None:
            try:
                fn()
            except BaseException as exc:  # collected and re-raised by join()
                self.failure = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "worker thread did not finish"
        if self.failure is not None:
            raise self.failure


def _transfer_paused_midway(design: designs.Design) -> tuple[_Worker, threading.Event]:
    """Start a transfer in a thread and return once it has debited but not credited.

    ``design.apply(fn, ())`` calls ``fn(root)`` however the design gets its root.
    """
    half_done, resume = threading.Event(), threading.Event()
    args = (0, 1, designs.account_key(0), designs.account_key(1), 7, 100)

    def paused_transfer(root: Any) -> None:
        accounts = _PausingAccounts(root["accounts"], half_done, resume)
        designs.transfer(_PausingRoot(root, accounts), *args)

    worker = _Worker(lambda: design.apply(paused_transfer, ()))
    assert half_done.wait(WAIT), "the transfer never reached its debit"
    return worker, resume


def _clock() -> float:
    return time.perf_counter()


def _load(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f)


def test_naive_dump_crashes_when_a_writer_adds_a_key_to_the_dict_being_dumped(
    tmp_path: Path,
) -> None:
    tree = designs.initial_tree(20)
    design = designs.NaiveDesign(tree)
    reached, changed = threading.Event(), threading.Event()

    def during_pickle() -> None:
        reached.set()
        assert changed.wait(WAIT), "the writer never changed the sessions"

    tree["sessions"]["session-0000005x"] = _Tripwire(during_pickle)

    def writer() -> None:
        assert reached.wait(WAIT), "the dump never reached the tripwire"
        design.apply(designs.change_session, ("temp-0-1", None, (0, 1)))
        changed.set()

    worker = _Worker(writer)
    attempt = designs.attempt_dump(design.dump, tmp_path / "dump.pickle", _clock)
    worker.join()

    assert attempt.crashed
    assert attempt.iteration_crash
    assert "dictionary changed size during iteration" in (attempt.error or "")


def test_naive_dump_taken_between_debit_and_credit_loads_but_is_torn(tmp_path: Path) -> None:
    design = designs.NaiveDesign(designs.initial_tree(20))
    worker, resume = _transfer_paused_midway(design)
    path = tmp_path / "dump.pickle"
    attempt = designs.attempt_dump(design.dump, path, _clock)
    resume.set()
    worker.join()

    assert not attempt.crashed
    assert designs.check_dump(path, 20) == "torn"
    assert sum(_load(path)["accounts"].values()) == designs.expected_total(20) - 7
    after = tmp_path / "after.pickle"
    assert not designs.attempt_dump(design.dump, after, _clock).crashed
    assert designs.check_dump(after, 20) == "consistent"


def test_check_dump_reports_a_truncated_file_as_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "dump.pickle"
    designs.write_pickle(designs.initial_tree(20), path)
    assert designs.check_dump(path, 20) == "consistent"
    path.write_bytes(path.read_bytes()[:100])
    assert designs.check_dump(path, 20) == "unreadable"


SNAPTREE_ACCOUNTS = 200  # enough for several BTree buckets, loaded lazily by a snapshot


@pytest.fixture
def snaptree_design(tmp_path: Path) -> Iterator[designs.SnaptreeDesign]:
    design = designs.SnaptreeDesign(designs.initial_tree(SNAPTREE_ACCOUNTS), tmp_path)
    try:
        yield design
    finally:
        design.close()


def test_snaptree_dump_taken_between_debit_and_credit_is_consistent(
    snaptree_design: designs.SnaptreeDesign, tmp_path: Path
) -> None:
    design = snaptree_design
    worker, resume = _transfer_paused_midway(design)
    during = tmp_path / "during.pickle"
    attempt = designs.attempt_dump(design.dump, during, _clock)
    resume.set()
    worker.join()

    assert not attempt.crashed, attempt.error
    assert designs.check_dump(during, SNAPTREE_ACCOUNTS) == "consistent"
    assert _load(during)["accounts"][designs.account_key(0)] == designs.INITIAL_BALANCE
    after = tmp_path / "after.pickle"
    assert not designs.attempt_dump(design.dump, after, _clock).crashed
    assert designs.check_dump(after, SNAPTREE_ACCOUNTS) == "consistent"
    assert _load(after)["accounts"][designs.account_key(0)] == designs.INITIAL_BALANCE - 7


def test_snaptree_snapshot_walked_while_a_writer_adds_and_removes_keys_sees_none_of_it(
    snaptree_design: designs.SnaptreeDesign, tmp_path: Path
) -> None:
    design = snaptree_design
    path = tmp_path / "dump.pickle"
    with design.store.snapshot() as snap:
        walk = iter(snap.root["sessions"].items())
        seen = [next(walk) for _ in range(5)]

        def writer() -> None:
            for n in range(30):
                design.apply(designs.change_session, (f"temp-0-{n}", None, (0, n)))
            for n in [*range(15), *range(100, 130)]:
                design.apply(designs.change_session, (None, f"session-{n:07d}"))
            design.apply(
                designs.transfer,
                (0, 1, designs.account_key(2), designs.account_key(3), 5, 100),
            )

        worker = _Worker(writer)
        worker.join()  # every change is committed before the walk goes on
        seen.extend(walk)
        designs.write_pickle(snaptree.to_plain(snap.root), path)

    everything = [f"session-{i:07d}" for i in range(SNAPTREE_ACCOUNTS)]
    assert [key for key, _ in seen] == everything
    assert designs.check_dump(path, SNAPTREE_ACCOUNTS) == "consistent"
    assert set(_load(path)["sessions"]) == set(everything)


@pytest.mark.slow  # seconds of work: with the torture tests in .ci/run
def test_a_short_run_finds_bad_dumps_only_where_they_can_happen() -> None:
    workload = compare.Workload(seconds=0.4, accounts=300, writers=2, dump_interval=0.02)
    comparison = compare.run_comparison(workload)

    by_name = {r.name: r for r in comparison.results}
    assert list(by_name) == list(designs.DESIGNS)
    for result in comparison.results:
        assert not result.writer_errors
        assert result.ops > 0
        assert result.dumps_attempted >= 1
        assert result.dumps_attempted == (
            result.dumps_crashed
            + result.dumps_unreadable
            + result.dumps_torn
            + result.dumps_consistent
        )
    for name in ("global-lock", "owner-thread", "snaptree"):
        result = by_name[name]
        assert result.dumps_crashed == result.dumps_torn == result.dumps_unreadable == 0, name
    assert by_name["snaptree"].extra["dump_path"]
    table = comparison.to_markdown()
    for name in designs.DESIGNS:
        assert f"| {name} |" in table


def test_main_prints_only_json_on_stdout_with_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--seconds", "0.2", "--accounts", "100", "--writers", "1", "--design", "global-lock"]
    assert compare.main([*argv, "--json"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)  # all of stdout is the one JSON document
    (design,) = result["designs"]
    assert design["design"] == "global-lock"
    assert design["dumps_crashed"] == design["dumps_torn"] == 0
    assert "running global-lock for 0.2 s" in out.err  # progress goes to stderr


def test_main_rejects_a_workload_that_makes_no_sense(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--accounts", "1"])
    assert exit_info.value.code == 2
    assert "accounts must be at least 2" in capsys.readouterr().err
