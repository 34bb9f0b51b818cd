"""Crashes against the durability modes: what a writer was told is committed is in the file.

Two kinds of crash:

* a process kill (SIGKILL of a writer process at a random moment): the
  operating system keeps what the process wrote, so no mode, ``relaxed``
  included, may lose a commit it acknowledged;
* a machine crash, simulated by keeping a random prefix of the data file no
  shorter than what the last completed fsync covered (the page cache lost
  from some point on): the file must open, read-only and writable, hold
  whole transactions only (the books balance), and every commit
  acknowledged as durable before the cut must be in it. In ``relaxed`` a
  commit is durable once an fsync that started after it completed.

Randomness comes from the ``seed`` fixture (``--seed N`` repeats a run).
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import _crash_writer
import snaptree

WRITER = Path(__file__).with_name("_crash_writer.py")
THREADS = 4
KILLS = 20
CUTS = 25
WAIT = 60.0


def _kill_at_a_random_moment(path: Path, mode: str, rng: random.Random) -> dict[int, int]:
    """Start a writer process, SIGKILL it after a random number of acknowledgements."""
    process = subprocess.Popen(
        [sys.executable, str(WRITER), str(path), mode, str(THREADS), str(rng.randrange(1 << 30))],
        stdout=subprocess.PIPE,
        text=True,
        cwd=WRITER.parent,
    )
    assert process.stdout is not None
    acknowledged: dict[int, int] = {}
    try:
        assert process.stdout.readline().strip() == "ready"
        for _ in range(rng.randrange(1, 300)):
            line = process.stdout.readline()
            if not line:
                break
            thread, seq = map(int, line.split())
            acknowledged[thread] = max(acknowledged.get(thread, 0), seq)
    finally:
        process.send_signal(signal.SIGKILL)
        rest = process.communicate(timeout=WAIT)[0]
    for line in rest.splitlines(keepends=True):
        if line.endswith("\n"):  # a line cut by the kill was never a whole acknowledgement
            thread, seq = map(int, line.split())
            acknowledged[thread] = max(acknowledged.get(thread, 0), seq)
    return acknowledged


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["commit", "group", "relaxed", "batched"])
def test_a_killed_writer_process_loses_no_acknowledged_commit(tmp_path, seed, mode):
    path = tmp_path / "Data.fs"
    _crash_writer.create(str(path), THREADS)
    rng = random.Random(seed)
    for kill in range(KILLS):
        acknowledged = _kill_at_a_random_moment(path, mode, rng)
        with snaptree.open(str(path)) as store:  # opened for writing: a torn tail is cut
            problem = _crash_writer.check(store, acknowledged)
        assert not problem, f"kill {kill} (seed {seed}): {problem}"


# -- machine crashes ------------------------------------------------------------------------


class Writers:
    """Writer threads in this process, noting each acknowledgement and the commits flushed then."""

    def __init__(self, store: snaptree.Store, seed: int) -> None:
        self.store = store
        self.storage = store.db.storage
        self.acks: list[list[tuple[int, int]]] = [[] for _ in range(THREADS)]
        self.stop = threading.Event()
        self.more = threading.Condition()
        self.count = 0
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._write, args=(t, seed), daemon=True)
            for t in range(THREADS)
        ]

    def _write(self, thread: int, seed: int) -> None:
        rng = random.Random(seed * 1000 + thread)
        seq = 0
        try:
            while not self.stop.is_set():
                seq += 1
                a, b = rng.sample(range(_crash_writer.ACCOUNTS), 2)
                self.store.run(_crash_writer.transfer, f"a{a:03}", f"a{b:03}", thread, seq)
                # Its commit is among the ones flushed by now.
                self.acks[thread].append((seq, self.storage.flushed))
                with self.more:
                    self.count += 1
                    self.more.notify_all()
        except BaseException as exc:
            self.errors.append(exc)

    def wait_for(self, commits: int) -> None:
        with self.more:
            target = self.count + commits
            assert self.more.wait_for(lambda: self.count >= target or self.errors, WAIT)
        assert not self.errors, self.errors

    def durable(self, every_ack: bool = False) -> tuple[dict[int, int], int]:
        """The acknowledgements durable now, per thread, and the bytes on disk for sure.

        Acknowledgements are read first: in ``commit`` and ``group`` each
        was on disk when it was made, so within what the fsync done by now
        covers. In ``relaxed`` only those whose commit an fsync covered.
        """
        acks = [list(mine) for mine in self.acks]
        with self.storage._durable:  # what the last fsync covered, read together
            synced, position = self.storage._synced, self.storage.synced_position
        relaxed = self.store.durability == "relaxed" and not every_ack
        durable = {}
        for thread, mine in enumerate(acks):
            covered = [seq for seq, flushed in mine if not relaxed or flushed <= synced]
            durable[thread] = covered[-1] if covered else 0
        return durable, position


def _cut(live: Path, keep: int, copy: Path, stale_index: Path | None) -> None:
    """*copy* becomes the first *keep* bytes of *live*: the disk after the crash."""
    with live.open("rb") as source:
        copy.write_bytes(source.read(keep))
    if stale_index is not None:
        shutil.copyfile(stale_index, f"{copy}.index")


def _check_crashed(copy: Path, durable: dict[int, int]) -> str:
    for read_only in (True, False):  # writable: cuts a torn tail, as the next start would
        try:
            with snaptree.open(str(copy), read_only=read_only) as store:
                problem = _crash_writer.check(store, durable)
        except snaptree.Error as exc:
            problem = f"it does not open: {exc}"
        if problem:
            return f"{'read-only' if read_only else 'writable'}: {problem}"
    return ""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["commit", "group", "relaxed"])
def test_a_machine_crash_leaves_a_prefix_of_whole_transactions_with_every_durable_commit(
    tmp_path, seed, mode
):
    path = tmp_path / "Data.fs"
    _crash_writer.create(str(path), THREADS)
    old_index = tmp_path / "old.index"
    shutil.copyfile(f"{path}.index", old_index)
    rng = random.Random(seed)
    store = snaptree.open(str(path), durability=mode, sync_every=0.02)
    writers = Writers(store, seed)
    try:
        for thread in writers.threads:
            thread.start()
        for cut in range(CUTS):
            writers.wait_for(rng.randrange(1, 200))
            durable, on_disk = writers.durable()
            size = path.stat().st_size
            keep = rng.randint(on_disk, size)
            copy = tmp_path / f"crash-{cut}.fs"
            _cut(path, keep, copy, old_index if rng.random() < 0.5 else None)
            problem = _check_crashed(copy, durable)
            assert not problem, (
                f"cut {cut} at {keep} (on disk {on_disk}, file {size}, seed {seed}): {problem}"
            )
            for made in tmp_path.glob(f"crash-{cut}.fs*"):
                made.unlink()
    finally:
        writers.stop.set()
        for thread in writers.threads:
            thread.join(WAIT)
        store.close()
    assert not writers.errors


def test_the_crash_check_finds_commits_a_crash_lost(tmp_path, seed):
    """The negative control: counting relaxed acknowledgements as durable, a cut loses some."""
    path = tmp_path / "Data.fs"
    _crash_writer.create(str(path), THREADS)
    store = snaptree.open(str(path), durability="relaxed", sync_every=3600)
    writers = Writers(store, seed)
    try:
        for thread in writers.threads:
            thread.start()
        writers.wait_for(50)
        everything, on_disk = writers.durable(every_ack=True)
        really, _ = writers.durable()
    finally:
        writers.stop.set()
        for thread in writers.threads:
            thread.join(WAIT)
        store.close()
    copy = tmp_path / "crash.fs"
    _cut(path, on_disk, copy, None)
    assert "acknowledged" in _check_crashed(copy, everything)
    assert _check_crashed(copy, really) == ""
