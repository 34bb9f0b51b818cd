"""Crash test for writers: SIGKILL a writing process at random moments, over and over.

A writer process runs transfers on a FileStorage from two threads and logs
each transfer's id (fsync'd) only after ``store.run`` returned, that is after
the commit was acknowledged. It is killed with SIGKILL at a random point:
after a random number of acknowledged transfers, plus a random fraction of a
commit's duration, and sometimes while it is still starting. After every kill
the store must open, the balances must add up, every acknowledged transfer
must be in the tree, and the balances must be exactly what the transfers
recorded in the tree produce (no transfer half applied).

The default setting (CI) kills the writer 24 times; ``--torture`` kills it
200 times.
"""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import snaptree

ACCOUNTS = 40
INITIAL_BALANCE = 1_000
KILLS_DEFAULT = 24
KILLS_TORTURE = 200
WAIT = 30.0  # seconds any single wait may take before the test fails
POLL = 0.002

WRITER = textwrap.dedent(
    """
    import os, random, sys, threading
    import snaptree

    path, log_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ACCOUNTS, INITIAL, THREADS = {accounts}, {initial}, 2

    store = snaptree.open(path, retry=snaptree.RetryPolicy(attempts=1000))

    def setup(root):
        if "accounts" not in root:
            root["accounts"] = {{f"a{{i:03d}}": INITIAL for i in range(ACCOUNTS)}}
            root["transfers"] = {{}}
        transfers = root["transfers"]
        return transfers.maxKey() if len(transfers) else 0

    last = store.run(setup)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    log_lock = threading.Lock()

    def transfer(root, tid, src, dst, amount, memo):
        accounts = root["accounts"]
        accounts[src] -= amount
        accounts[dst] += amount
        root["transfers"][tid] = (src, dst, amount, memo)

    def work(thread):
        rand = random.Random(seed * 7 + thread)
        tid = last + 1 + thread
        while True:
            src, dst = rand.sample(range(ACCOUNTS), 2)
            # Some commits are large, so that kills also land in the middle of a write.
            memo = "x" * rand.choice((0, 0, 0, 20_000))
            store.run(transfer, tid, f"a{{src:03d}}", f"a{{dst:03d}}", rand.randint(1, 99), memo)
            with log_lock:  # acknowledged: the commit returned
                os.write(log, f"{{tid}}\\n".encode())
                os.fsync(log)
            tid += THREADS

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    """
).format(accounts=ACCOUNTS, initial=INITIAL_BALANCE)


def _acknowledged(log: Path) -> list[int]:
    """Transfer ids in the log; a line cut short by the kill was never acknowledged."""
    if not log.exists():
        return []
    text = log.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [int(line) for line in complete.splitlines()]


def _wait_for_acknowledged(log: Path, count: int, writer: subprocess.Popen) -> None:
    """Poll the log until it holds *count* ids; fail if the writer dies or WAIT passes."""
    deadline = time.monotonic() + WAIT
    while len(_acknowledged(log)) < count:
        if writer.poll() is not None:
            stderr = writer.stderr.read().decode() if writer.stderr else ""
            pytest.fail(f"the writer exited with {writer.returncode} on its own:\n{stderr}")
        if time.monotonic() > deadline:
            pytest.fail(f"the writer acknowledged fewer than {count} transfers in {WAIT:g} s")
        time.sleep(POLL)


def _check_store(path: Path, acknowledged: list[int], kills: int) -> int:
    """Open the store after a kill and check every guarantee; return the number of transfers."""
    store = snaptree.open(str(path))
    try:
        with store.snapshot() as snap:
            if "accounts" not in snap.root:
                assert not acknowledged, "transfers were acknowledged but the tree is empty"
                return 0
            balances = dict(snap.root["accounts"].items())
            transfers = {tid: entry[:3] for tid, entry in snap.root["transfers"].items()}
    finally:
        store.close()

    assert sum(balances.values()) == ACCOUNTS * INITIAL_BALANCE
    missing = set(acknowledged) - set(transfers)
    assert not missing, f"acknowledged transfers lost: {sorted(missing)[:10]}"
    replayed = {f"a{i:03d}": INITIAL_BALANCE for i in range(ACCOUNTS)}
    for src, dst, amount in transfers.values():
        replayed[src] -= amount
        replayed[dst] += amount
    assert balances == replayed, "the balances do not match the transfers recorded"
    # The writer logs after commit, so at most one committed transfer per thread is unlogged.
    assert len(transfers) - len(set(acknowledged)) <= 2 * kills
    return len(transfers)


@pytest.mark.slow
def test_killed_writer_never_loses_an_acknowledged_transfer_nor_tears_one(
    tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture, seed: int
) -> None:
    kills = KILLS_TORTURE if request.config.getoption("--torture") else KILLS_DEFAULT
    rand = random.Random(seed)
    path, log, script = tmp_path / "Data.fs", tmp_path / "acknowledged.log", tmp_path / "writer.py"
    script.write_text(WRITER)
    transfers = 0
    caplog.set_level(logging.WARNING, logger="ZODB.FileStorage")

    for round_number in range(kills):
        before = len(_acknowledged(log))
        writer = subprocess.Popen(
            [sys.executable, str(script), str(path), str(log), str(rand.randrange(2**31))],
            stderr=subprocess.PIPE,
        )
        try:
            if rand.random() < 0.1:
                # Kill while it is importing, opening the store or running its first commits.
                time.sleep(rand.uniform(0.0, 0.6))  # randomises the kill point, syncs nothing
            else:
                _wait_for_acknowledged(log, before + rand.randint(1, 40), writer)
                time.sleep(rand.uniform(0.0, 0.004))  # a random point inside the next commit
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(WAIT)
            if writer.stderr:
                writer.stderr.close()
        assert writer.returncode == -signal.SIGKILL, f"round {round_number}: writer had exited"

        acknowledged = _acknowledged(log)
        assert len(acknowledged) == len(set(acknowledged)), "a transfer id was acknowledged twice"
        now = _check_store(path, acknowledged, round_number + 1)
        assert now >= transfers, f"round {round_number}: committed transfers disappeared"
        transfers = now

    assert len(_acknowledged(log)) >= kills  # the writer really worked between kills
    # How many kills landed inside a commit (FileStorage cut off the partial transaction).
    mid_commit = sum("truncated, possibly due to damaged records" in m for m in caplog.messages)
    print(f"{kills} kills, {mid_commit} inside a commit, {transfers} transfers committed")
