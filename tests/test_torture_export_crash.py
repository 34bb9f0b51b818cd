"""Crash test for exporters: SIGKILL a scheduled exporter process at random moments, over and over.

A writer thread in the test process keeps transferring money on a
FileStorage (balances always add up). An exporter process
(``snaptree export --dir D --every 0 --keep K --json``, or the same through
``scripts/export.py``) opens the file read-only and dumps it back to back,
one format per process, rotating pickle, json and zodb. It is killed with
SIGKILL at a random point: after a random number of finished runs plus a
random fraction of an export's duration, and sometimes while it is still
starting. After every kill, with no exporter running:

- every dump under a final name has a manifest, verifies against it and
  holds the invariant (a manifest without its dump may be left by a kill
  between the two renames; it is never counted as a dump);
- ``latest.<ext>`` points at a complete dump that verifies;
- only temporary files (``.*.tmp``) are partial;
- the killed exporter's lock on the directory went with it.

The next exporter is started in the same directory and must continue:
its first run removes the temporaries of the killed processes (as
docs/export.md and snaptree/dump_directory.py say) and its dumps are newer. At the end a
SIGTERM stops the last one cleanly (exit 0) and no temporary is left.

The default setting (CI) kills 22 exporters in two directories at once;
``--torture`` kills 120.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import transaction
from ZODB import DB
from ZODB.MappingStorage import MappingStorage

import snaptree
from _cli import start as start_snaptree
from _threads import run_threads
from snaptree.dump_directory import DUMP_NAME, complete_dumps, latest_link, lock_directory
from snaptree.export_run import export_into
from snaptree.manifest import manifest_path

ROOT = Path(__file__).resolve().parents[1]
EXPORT_SCRIPT = ROOT / "scripts" / "export.py"

ACCOUNTS = 300
INITIAL = 100
KILLS_DEFAULT = 22
KILLS_TORTURE = 120
KEEP = 4
FORMATS = ("pickle", "json", "zodb")
LANES = 2
WAIT = 60.0  # seconds any single wait may take before the test fails

TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
LOCK = re.compile(r"^\.snaptree-export-(pickle|json|zodb)\.lock$")


class Lines:
    """Complete lines from a child's stdout, read with a timeout (never a blocking readline)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buffer = b""
        self.lines: list[dict[str, Any]] = []

    def wait_for(self, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        """Wait until *count* JSON lines arrived in total; fail if the child exits or time is up."""
        deadline = time.monotonic() + timeout
        while len(self.lines) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"the exporter wrote {len(self.lines)} of {count} runs in {timeout} s")
            ready, _, _ = select.select([self.fd], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                pytest.fail(f"the exporter exited ({self.proc.wait(WAIT)}) on its own")
            self.buffer += chunk
            *complete, self.buffer = self.buffer.split(b"\n")
            self.lines.extend(json.loads(line) for line in complete if line)
        return self.lines


def _setup(root: Any) -> None:
    root["accounts"] = {
        f"a{i:04d}": {"balance": INITIAL, "owner": f"owner {i}"} for i in range(ACCOUNTS)
    }


def _transfer(root: Any, src: str, dst: str, amount: int) -> None:
    accounts = root["accounts"]
    accounts[src]["balance"] -= amount
    accounts[dst]["balance"] += amount


def _writer(store: snaptree.Store, stop: threading.Event, seed: int):
    def work() -> int:
        rand = random.Random(seed)
        n = 0
        while not stop.is_set():
            src, dst = rand.sample(range(ACCOUNTS), 2)
            store.run(_transfer, f"a{src:04d}", f"a{dst:04d}", rand.randint(1, 9))
            n += 1
            stop.wait(0.02)  # paces the writer so the file stays small; synchronises nothing
        return n

    return work


def _total(path: Path, fmt: str) -> int:
    """The sum of the balances in a dump, loaded as a user would load it."""
    if fmt == "pickle":
        with open(path, "rb") as f:
            tree = pickle.load(f)
    elif fmt == "json":
        tree = json.loads(path.read_text())
    else:
        db = DB(MappingStorage())
        try:
            tm = transaction.TransactionManager(explicit=True)
            conn = db.open(transaction_manager=tm)
            tm.begin()
            tree = snaptree.to_plain(conn.importFile(str(path)))
            tm.abort()
            conn.close()
        finally:
            db.close()
    return sum(account["balance"] for account in tree["accounts"].values())


def _check_directory(directory: Path, checked: dict[str, str]) -> dict[str, Any]:
    """Every guarantee that must hold in *directory* while no exporter runs; returns a summary.

    *checked* maps dump names already verified to their sha256, so a dump is
    fully loaded once and afterwards only compared with its manifest again.
    """
    orphans = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if TEMPORARY.match(name):
            continue  # partial by design; never under a final name
        if name.startswith("latest."):
            continue  # checked below
        if LOCK.match(name):
            continue  # checked below
        if name.endswith(".manifest.json"):
            dump = entry.with_name(name.removesuffix(".manifest.json"))
            assert DUMP_NAME.match(dump.name), f"an unexpected manifest: {name}"
            if not dump.exists():
                # Killed between the manifest's rename and the dump's (or between
                # retention's two deletes): never counted as a dump.
                fmt = {".pickle": "pickle", ".json": "json", ".zexp": "zodb"}[
                    DUMP_NAME.match(dump.name)["suffix"]
                ]
                assert dump not in complete_dumps(directory, fmt)
                orphans.append(name)
            continue
        match = DUMP_NAME.match(name)
        assert match, f"an unexpected file under a final name: {name}"
        fmt = {".pickle": "pickle", ".json": "json", ".zexp": "zodb"}[match["suffix"]]
        assert manifest_path(entry).exists(), f"{name}: a dump without manifest"
        if checked.get(name) is None:
            info = snaptree.verify(entry)
            assert _total(entry, fmt) == ACCOUNTS * INITIAL, f"{name}: balances do not add up"
            checked[name] = info.sha256
        else:  # loaded once already; now it must only be unchanged
            digest = hashlib.sha256(entry.read_bytes()).hexdigest()
            assert digest == checked[name], f"{name} changed after it was complete"
    latest = {}
    for fmt in FORMATS:
        link = latest_link(directory, fmt)
        complete = complete_dumps(directory, fmt)
        if not link.is_symlink():
            # latest appears with the first complete dump, unless the kill came in between.
            assert len(complete) <= 1, f"{len(complete)} complete {fmt} dumps but no {link.name}"
            continue
        target = directory / os.readlink(link)
        assert target in complete, f"{link.name} -> {target.name}, which is not a complete dump"
        assert target.name in checked  # verified above
        latest[fmt] = target.name
    for fmt in FORMATS:
        with lock_directory(directory, fmt):
            pass  # the killed holder does not block the next one
    return {"orphans": orphans, "latest": latest}


def _temporaries(directory: Path) -> dict[str, int]:
    return {e.name: int(m["pid"]) for e in directory.iterdir() if (m := TEMPORARY.match(e.name))}


def _start(db: Path, directory: Path, fmt: str, via_script: bool, stderr: Any) -> subprocess.Popen:
    """``snaptree export --dir ... --every 0``, or the same through scripts/export.py."""
    args = ["--db", str(db), "--dir", str(directory), "--format", fmt]
    args += ["--every", "0", "--keep", str(KEEP), "--json"]
    if via_script:
        command = [sys.executable, str(EXPORT_SCRIPT), *args]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr)
    return start_snaptree("export", *args, stderr=stderr)


class Lane:
    """One directory and the exporters killed in it, one after another, with its own checks."""

    def __init__(self, db: Path, directory: Path, kills: int, seed: int, stderr: Any) -> None:
        self.db, self.directory, self.kills = db, directory, kills
        self.rand = random.Random(seed)
        self.stderr = stderr
        self.checked: dict[str, str] = {}  # dump name -> sha256, once verified
        self.last_tid = dict.fromkeys(FORMATS, "")
        self.killed_pids: set[int] = set()
        self.temporaries_seen = 0
        self.orphans: set[str] = set()
        directory.mkdir()

    def _note_written(self, fmt: str, lines: list[dict[str, Any]]) -> None:
        for line in lines:
            if line["written"]:
                assert line["tid"] >= self.last_tid[fmt], f"{fmt}: a later run went back in time"
                self.last_tid[fmt] = line["tid"]

    def kill_one(self, round_number: int) -> None:
        fmt = FORMATS[round_number % len(FORMATS)]
        rand = self.rand
        proc = _start(self.db, self.directory, fmt, rand.random() < 0.3, self.stderr)
        lines = Lines(proc)
        try:
            if rand.random() < 0.1:
                # Kill while it imports, opens the file or runs its first export.
                time.sleep(rand.uniform(0.0, 1.2))  # randomises the kill point only
            else:
                done = lines.wait_for(1)
                # Its first run removed every temporary the killed exporters left.
                left = {
                    n: p for n, p in _temporaries(self.directory).items() if p in self.killed_pids
                }
                assert not left, f"round {round_number}: stale temporaries kept: {left}"
                first = done[0]
                assert not first["written"] or first["tid"] > self.last_tid[fmt], (
                    f"round {round_number}: the restarted exporter did not continue"
                )
                seconds = max([d.get("seconds", 0.0) for d in done if d["written"]] or [0.05])
                lines.wait_for(len(done) + rand.randint(0, 2))
                time.sleep(rand.uniform(0.0, 1.5 * seconds))  # a random point in a run
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(WAIT)
            assert proc.stdout is not None
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, f"round {round_number}: it had exited"
        self._note_written(fmt, lines.lines)
        self.killed_pids.add(proc.pid)
        self.temporaries_seen += len(_temporaries(self.directory))
        self.orphans.update(_check_directory(self.directory, self.checked)["orphans"])

    def finish(self) -> None:
        """A last exporter per format continues where the killed ones stopped; SIGTERM ends it."""
        for fmt in FORMATS:
            proc = _start(self.db, self.directory, fmt, False, self.stderr)
            try:
                lines = Lines(proc)
                done = lines.wait_for(1)
                assert not done[0]["written"] or done[0]["tid"] > self.last_tid[fmt]
                while not any(d["written"] for d in done):  # the writer is still committing
                    done = lines.wait_for(len(done) + 1)
                self._note_written(fmt, done)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(WAIT) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(WAIT)
                assert proc.stdout is not None
                proc.stdout.close()
        summary = _check_directory(self.directory, self.checked)
        assert set(summary["latest"]) == set(FORMATS)
        # The written runs' retention removed every manifest left without its dump.
        assert summary["orphans"] == []
        assert _temporaries(self.directory) == {}, "a temporary survived the clean exporters"
        for fmt in FORMATS:
            assert 1 <= len(complete_dumps(self.directory, fmt)) <= KEEP

    def run(self) -> None:
        for round_number in range(self.kills):
            self.kill_one(round_number)
        self.finish()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_killed_exporter_never_leaves_a_partial_dump_and_the_next_one_cleans_up(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two directories (lanes) are tortured at once, to halve the wall time on two cores."""
    kills = KILLS_TORTURE if request.config.getoption("--torture") else KILLS_DEFAULT
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"seed {seed}")  # shown on failure, to rerun the same kill points
    db = tmp_path / "Data.fs"
    store = snaptree.open(str(db), retry=snaptree.RetryPolicy(attempts=1000))
    stop = threading.Event()
    stderr_log = open(tmp_path / "exporters.err", "wb")  # noqa: SIM115 - closed in finally
    lanes = [
        Lane(db, tmp_path / f"dumps{i}", kills // LANES + (i < kills % LANES), seed + i, stderr_log)
        for i in range(LANES)
    ]
    remaining = [len(lanes)]
    lock = threading.Lock()

    def lane_target(lane: Lane) -> Any:
        def run() -> None:
            try:
                lane.run()
            finally:
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        stop.set()

        return run

    try:
        store.run(_setup)
        transfers, *_ = run_threads(
            [_writer(store, stop, seed), *(lane_target(lane) for lane in lanes)], 1500
        )
    finally:
        stop.set()
        stderr_log.close()
        store.close()
    assert sum(lane.kills for lane in lanes) == kills
    print(
        f"{kills} kills, {transfers} transfers, "
        f"{sum(len(lane.checked) for lane in lanes)} dumps verified, "
        f"{sum(lane.temporaries_seen for lane in lanes)} temporaries seen after kills, "
        f"{sum(len(lane.orphans) for lane in lanes)} manifests seen without their dump"
    )


KILL_AT_SECOND_RENAME = """
import os, signal, sys
import snaptree
from snaptree import _atomic
from snaptree.export_run import export_into

renames = []
real_commit = _atomic.commit

def commit(temp, final):
    renames.append(final)
    if len(renames) == 2:  # the first file of the pair is renamed, not the second
        os.kill(os.getpid(), signal.SIGKILL)
    return real_commit(temp, final)

_atomic.commit = commit
store = snaptree.open(sys.argv[1], read_only=True)
export_into(store, sys.argv[2], format="pickle", keep=2)
"""


def test_a_kill_between_the_two_renames_leaves_no_dump_without_its_manifest(
    tmp_path: Path,
) -> None:
    """Deterministic: SIGKILL between the two renames of one export.

    (Found by this suite: the dump used to be renamed before its manifest, so
    a kill in between left a dump without a manifest under a final name that
    no later run removed. The manifest now goes first; a manifest without its
    dump is never counted and is removed by retention.)
    """
    db, directory = tmp_path / "Data.fs", tmp_path / "dumps"
    directory.mkdir()
    store = snaptree.open(str(db))
    try:
        store.run(_setup)
        proc = subprocess.run(
            [sys.executable, "-c", KILL_AT_SECOND_RENAME, str(db), str(directory)],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        store.run(_transfer, "a0001", "a0002", 5)  # the next run has a new tid to export
        reader = snaptree.open(str(db), read_only=True)
        try:
            result = export_into(reader, directory, format="pickle", keep=2)
        finally:
            reader.close()
        assert result.info is not None
    finally:
        store.close()
    dumps = [e for e in directory.iterdir() if DUMP_NAME.match(e.name)]
    without_manifest = [e.name for e in dumps if not manifest_path(e).exists()]
    assert without_manifest == [], "a dump under a final name has no manifest"
    for dump in dumps:
        snaptree.verify(dump)
