"""The schedule: names, latest, retention, skipping unchanged runs, and the Exporter.

The command's tests are in test_export_command.py.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import threading
from types import SimpleNamespace

import pytest

import snaptree
from _cli import files_under
from snaptree import dump_directory, retention, schedule
from snaptree.export_run import export_file, export_into

WAIT = 60.0


# -- pure decisions, on a fake clock ----------------------------------------------


def test_first_run_is_immediate_then_every_interval_from_the_last_start():
    assert schedule.seconds_until(100.0, schedule.next_run(None, 60)) == 0
    due = schedule.next_run(100.0, 60)
    assert schedule.seconds_until(130.0, due) == 30
    assert schedule.seconds_until(175.0, due) == 0  # an overrun is followed at once, once


def test_interval_and_retention_are_validated():
    for bad in (-1, float("nan"), 10**9, "soon"):
        with pytest.raises(ValueError, match="every must be"):
            schedule.check_every(bad)
    for bad in (0, -3, 10**9, 2.5, True):
        with pytest.raises(ValueError, match="keep must be"):
            retention.check_keep(bad)
    assert schedule.check_every(0) == 0
    assert retention.check_keep(3) == retention.Retention(last=3)


def test_dump_names_carry_utc_time_and_tid_and_sort_in_commit_order():
    tz = datetime.timezone(datetime.timedelta(hours=2))
    name = dump_directory.dump_name(
        "pickle", datetime.datetime(2026, 1, 2, 5, 4, 5, 6, tzinfo=tz), "0" * 15 + "1"
    )
    assert name == "snaptree-20260102T030405.000006Z-0000000000000001.pickle"
    assert dump_directory.DUMP_NAME.match(name)


class FakeStop:
    """A stop event whose wait advances a fake clock instead of sleeping."""

    def __init__(self, clock: list[float], stop_after: int) -> None:
        self.clock = clock
        self.waits: list[float] = []
        self.stop_after = stop_after

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        self.clock[0] += timeout
        return len(self.waits) > self.stop_after


def test_run_periodically_keeps_the_rhythm_and_survives_a_failed_run():
    """Runs start every 60 s of the (fake) clock; a failing run is reported and the next goes on."""
    now = [1000.0]
    stop = FakeStop(now, stop_after=3)
    durations = iter([5.0, 70.0, 1.0])
    errors = []

    def run_once():
        took = next(durations)
        now[0] += took
        if took == 70.0:
            raise snaptree.ExportError("disk full")

    runs = schedule.run_periodically(
        run_once, every=60, stop=stop, clock=lambda: now[0], on_error=errors.append
    )
    assert runs == 3
    assert stop.waits == [0, 55.0, 0, 59.0]
    assert [str(e) for e in errors] == ["disk full"]


def test_back_to_back_exports_are_paced_by_the_share_of_time_spent_in_fsync():
    """every=0 waits until the last export's fsyncs are FLUSH_SHARE of the time since it began."""
    share = schedule.FLUSH_SHARE
    assert schedule.next_run(100.0, 0, flushed=0.01) == pytest.approx(100.0 + 0.01 / share)
    assert schedule.next_run(100.0, 60, flushed=0.01) == 160.0  # a slow schedule is not delayed
    assert schedule.next_run(100.0, 0, flushed=0.01, flush_share=1.0) == pytest.approx(100.01)

    now = [0.0]
    stop = FakeStop(now, stop_after=2)
    flushes = iter([0.002, 0.0])

    def run_once():
        now[0] += 0.05  # the export took 50 ms, 2 ms of them in fsync, then one with none
        flushed = next(flushes)
        return SimpleNamespace(flush_seconds=flushed, skipped=False)

    assert schedule.run_periodically(run_once, every=0, stop=stop, clock=lambda: now[0]) == 2
    assert stop.waits == [0, pytest.approx(0.002 / share - 0.05), 0]


def test_back_to_back_runs_do_not_spin_when_idle_or_failing():
    """every=0: after a run that found nothing new, 0.1 s; after a failed one, 1 s; else none."""
    now = [0.0]
    stop = FakeStop(now, stop_after=4)
    outcomes = iter(["skipped", "failed", "written", "written"])

    def run_once():
        outcome = next(outcomes)
        if outcome == "failed":
            raise snaptree.ExportError("disk full")
        return SimpleNamespace(flush_seconds=0.0, skipped=outcome == "skipped")

    runs = schedule.run_periodically(
        run_once, every=0, stop=stop, clock=lambda: now[0], on_error=lambda exc: None
    )
    assert runs == 4
    assert stop.waits == [
        0,
        pytest.approx(schedule.PAUSE_AFTER_NOTHING_NEW),
        pytest.approx(schedule.PAUSE_AFTER_FAILURE),
        0,
        0,
    ]
    with pytest.raises(ValueError, match="flush_share must be"):
        schedule.run_periodically(run_once, every=0, stop=stop, flush_share=0)


def test_a_schedule_stretched_by_pacing_warns_once_with_the_interval_it_keeps(caplog):
    """every=1 with 10 ms of fsync per export: the next starts 4 s later; one WARNING says so."""
    now = [0.0]
    stop = FakeStop(now, stop_after=3)
    with caplog.at_level("INFO", logger="snaptree.schedule"):
        schedule.run_periodically(
            lambda: SimpleNamespace(flush_seconds=0.01, skipped=False),
            every=1,
            stop=stop,
            clock=lambda: now[0],
            flush_share=0.0025,
        )
    assert stop.waits == [0, pytest.approx(4.0), pytest.approx(4.0), pytest.approx(4.0)]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, caplog.text
    assert "exports every 1 s were asked for" in warnings[0].getMessage()
    assert "can keep about one every 4.0 s here" in warnings[0].getMessage()
    assert sum(r.levelname == "INFO" for r in caplog.records) == 2  # the later ones, with -v


def test_back_to_back_exports_paced_by_their_fsyncs_do_not_warn(caplog):
    """every=0 asks for no interval: pacing it is the design, not a broken promise."""
    now = [0.0]
    stop = FakeStop(now, stop_after=2)
    with caplog.at_level("INFO", logger="snaptree.schedule"):
        schedule.run_periodically(
            lambda: SimpleNamespace(flush_seconds=0.01, skipped=False),
            every=0,
            stop=stop,
            clock=lambda: now[0],
        )
    assert stop.waits == [0, pytest.approx(4.0), pytest.approx(4.0)]
    assert not caplog.records


def test_an_export_reports_its_fsync_time_but_keeps_it_out_of_the_manifest(store, tmp_path):
    _bump(store, 1)
    result = export_into(store, tmp_path)
    assert 0 < result.flush_seconds == result.info.flush_seconds
    manifest = json.loads(result.info.manifest_path.read_text())
    assert "flush_seconds" not in manifest and manifest["tid"] == result.info.tid
    with pytest.raises(ValueError, match="flush_share must be"):
        snaptree.Exporter(store, tmp_path, every=0, flush_share=0)


# -- a directory of dumps ---------------------------------------------------------


def _bump(store: snaptree.Store, value: int) -> None:
    store.run(lambda root: root.__setitem__("v", value))


def test_directory_mode_names_latest_keep_and_skips_unchanged(store, tmp_path):
    out = tmp_path / "dumps"
    out.mkdir()
    (out / "notes.txt").write_text("not ours")
    (out / "snaptree-20000101T000000.000000Z-0000000000000001.pickle").write_text("no manifest")
    results = []
    for value in range(4):
        _bump(store, value)
        results.append(export_into(store, out, keep=2))
    unchanged = export_into(store, out, keep=2)
    assert unchanged.skipped and unchanged.skipped_tid == results[-1].info.tid
    assert "nothing committed since the last export" in unchanged.log_line()
    kept = dump_directory.complete_dumps(out, "pickle")
    assert kept == [r.info.path for r in results[-2:]]
    assert [p.name for p in results[-1].deleted] == [results[1].info.path.name]
    assert os.readlink(out / "latest.pickle") == results[-1].info.path.name
    with open(out / "latest.pickle", "rb") as f:
        assert pickle.load(f)["v"] == 3
    # never anything it did not write, and never an incomplete dump
    assert (out / "notes.txt").exists()
    assert (out / "snaptree-20000101T000000.000000Z-0000000000000001.pickle").exists()
    line = results[-1].log_line()
    for part in (str(results[-1].info.path), results[-1].info.tid, "objects", "bytes", " s"):
        assert part in line


def test_a_run_of_another_subtree_is_refused_and_replaces_nothing(store, tmp_path):
    """Nothing committed since the newest dump, which holds another part of the tree: the dump
    of the whole tree would have taken its name (time and tid) and replaced it."""
    store.run(lambda root: root.update(accounts={"a": 1}, settings={"x": 2}))
    out = tmp_path / "dumps"
    out.mkdir()
    part = export_into(store, out, subtree="/accounts")
    before = files_under(out)
    with pytest.raises(snaptree.ArgumentError, match=r"dumps of the subtree /accounts .* into "):
        export_into(store, out, subtree="/")
    assert files_under(out) == before
    with open(out / "latest.pickle", "rb") as f:
        assert pickle.load(f) == {"a": 1}
    assert export_into(store, out, subtree="accounts/").skipped  # the same part, spelt so
    fixed = tmp_path / "fixed.pickle"
    export_file(store, fixed, subtree="accounts", skip_unchanged=True)
    again = export_file(store, fixed, subtree="/accounts/", skip_unchanged=True)
    assert again.info is None and again.skipped_tid == part.info.tid
    assert export_file(store, fixed, skip_unchanged=True).info.subtree == "/"


def test_formats_have_their_own_latest_and_retention(store, tmp_path):
    _bump(store, 1)
    a = export_into(store, tmp_path, format="json", keep=1)
    b = export_into(store, tmp_path, format="zodb", keep=1)
    assert not a.skipped and not b.skipped
    assert os.readlink(tmp_path / "latest.json") == a.info.path.name
    assert os.readlink(tmp_path / "latest.zexp") == b.info.path.name


# -- the Exporter -----------------------------------------------------------------


def test_exporter_in_a_separate_process_follows_new_commits(tmp_path):
    """On a FileStorage the Exporter exports from its own process and sees every new commit."""
    store = snaptree.open(str(tmp_path / "Data.fs"))
    out = tmp_path / "dumps"
    out.mkdir()
    exporter = snaptree.Exporter(store, out, every=3600, keep=3)
    try:
        assert not exporter.in_process
        for value in range(3):
            _bump(store, value)
            result = exporter.export_now()
            assert result.info.tid == store.last_tid()
            assert snaptree.verify(result.info.path).tid == result.info.tid
            with open(result.info.path, "rb") as f:
                assert pickle.load(f)["v"] == value
        assert exporter.export_now().skipped
    finally:
        exporter.stop()
        store.close()


def test_exporter_thread_runs_at_start_and_stops_cleanly(store, tmp_path):
    """start() exports at once; stop() ends the thread; on_export sees each run."""
    _bump(store, 1)
    done = threading.Event()
    seen = []

    def on_export(result):
        seen.append(result)
        done.set()

    exporter = snaptree.Exporter(store, tmp_path, every=3600, on_export=on_export)
    exporter.start()
    try:
        assert done.wait(WAIT)
    finally:
        exporter.stop(timeout=WAIT)
    assert exporter.runs == 1 and seen[0].info is not None and exporter.last_error is None


def test_exporter_refuses_bad_settings(store, tmp_path):
    with pytest.raises(ValueError, match="every"):
        snaptree.Exporter(store, tmp_path, every=-5)
    with pytest.raises(ValueError, match="keep"):
        snaptree.Exporter(store, tmp_path, keep=0)
    if store.source == "memory://":
        with pytest.raises(ValueError, match="cannot be read from another process"):
            snaptree.Exporter(store, tmp_path, process=True)
