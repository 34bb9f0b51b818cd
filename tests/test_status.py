"""Monitoring: ``snaptree status`` as a healthcheck, the Prometheus textfile, JSON on failure.

Exit codes are the contract a healthcheck relies on: 0 whole and recent, 3
the newest dump is broken, 6 no dump or the newest is older than --max-age.
"""

from __future__ import annotations

import datetime
import json
import re
import select
import signal
from pathlib import Path

import pytest

import snaptree
from _cli import error_line, start
from _cli import snaptree as run_snaptree
from _dumps import fabricate
from snaptree.export_run import export_into
from snaptree.monitoring import MetricsFile, dump_status

WAIT = 60.0
UTC = datetime.UTC
NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def test_status_reports_the_newest_dump_its_tid_commit_time_age_and_checksum(tmp_path):
    fabricate(tmp_path, NOW - datetime.timedelta(hours=5))
    newest = fabricate(tmp_path, NOW - datetime.timedelta(minutes=10), compressed=True)
    status = dump_status(tmp_path, max_age=datetime.timedelta(hours=1), now=NOW)
    assert status.ok and status.path == newest
    assert status.age == datetime.timedelta(minutes=10)
    assert status.newest.tid == newest.name.split("-")[2].split(".")[0]
    assert status.report().startswith(f"ok: {newest} (pickle, zstd, ")
    assert "10m ago, max age 1h" in status.report()


def test_status_command_exits_0_for_a_recent_whole_dump_and_prints_json(tmp_path):
    with snaptree.open(str(tmp_path / "Data.fs")) as store:
        store.run(lambda root: root.__setitem__("v", 1))
        tmp_path = tmp_path / "dumps"
        tmp_path.mkdir()
        written = export_into(store, tmp_path).info
    result = run_snaptree("status", tmp_path, "--max-age", "1h", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] and not data["stale"] and not data["broken"]
    assert data["dump"]["tid"] == written.tid and data["path"] == str(written.path)
    assert 0 <= data["age_seconds"] < 3600 and data["max_age_seconds"] == 3600
    text = dump_status(tmp_path).report()  # what the command prints without --json
    assert text.startswith(f"ok: {written.path} (pickle, ")
    assert f"tid {written.tid} committed {written.committed_at.isoformat()}" in text


def test_a_dump_older_than_max_age_exits_6_and_still_says_what_it_is(tmp_path):
    old = fabricate(tmp_path, datetime.datetime.now(UTC) - datetime.timedelta(hours=3))
    result = run_snaptree("status", tmp_path, "--max-age", "2h", "--json")
    assert result.returncode == 6
    data = json.loads(result.stdout)
    assert data["stale"] and not data["broken"] and data["path"] == str(old)
    assert "older than the --max-age" in error_line(result)
    assert dump_status(tmp_path, max_age=datetime.timedelta(hours=4)).ok


@pytest.mark.slow
def test_no_dump_at_all_exits_6(tmp_path):
    (tmp_path / "snaptree-20200101T000000.000000Z-0000000000000001.pickle").write_text("stray")
    result = run_snaptree("status", tmp_path)
    assert result.returncode == 6
    assert f"no complete dump in {tmp_path}" in error_line(result)
    assert result.stdout.startswith("stale: no complete dump")


def test_a_broken_newest_dump_exits_3_and_is_not_passed_over_for_an_older_one(tmp_path):
    """A healthcheck must not call the directory healthy because an older dump is."""
    fabricate(tmp_path, NOW - datetime.timedelta(hours=2))
    newest = fabricate(tmp_path, NOW)
    newest.write_bytes(b"X" + newest.read_bytes()[1:])  # one byte changed, same size
    result = run_snaptree("status", tmp_path, "--json")
    assert result.returncode == 3
    data = json.loads(result.stdout)
    assert data["broken"] and not data["ok"] and data["path"] == str(newest)
    assert "does not match the manifest" in data["problem"]
    assert "does not match the manifest" in error_line(result)


def test_a_damaged_manifest_on_the_newest_dump_is_broken_too(tmp_path):
    fabricate(tmp_path, NOW - datetime.timedelta(hours=2))
    newest = fabricate(tmp_path, NOW)
    Path(f"{newest}.manifest.json").write_text('{"snaptree_manifest": 1, "format": "pickle"}')
    status = dump_status(tmp_path, now=NOW)
    assert status.broken and status.path == newest and "damaged manifest" in status.problem
    assert not status.ok  # the command exits 3, as for a checksum mismatch


def test_a_newest_dump_status_cannot_read_is_broken_not_a_crash(tmp_path):
    """A monitoring user without read access got exit 1 ("unexpected PermissionError") and no
    JSON; any OSError reading the dump is the dump being broken (here a symlink loop, since
    the tests run as root, which reads every file)."""
    fabricate(tmp_path, NOW - datetime.timedelta(hours=2))
    newest = fabricate(tmp_path, NOW)
    newest.unlink()
    newest.symlink_to(newest.name)
    status = dump_status(tmp_path, now=NOW)
    assert status.broken and status.path == newest and not status.ok
    assert "cannot read the dump: Too many levels of symbolic links" in status.problem


def test_a_newest_dump_committed_in_the_future_is_not_fresh(tmp_path):
    """A day ahead of this machine's clock it counted as fresh (age -1 day) and passed any
    --max-age: a stopped exporter would go unnoticed for a day."""
    newest = fabricate(tmp_path, NOW + datetime.timedelta(days=1))
    status = dump_status(tmp_path, now=NOW, max_age=datetime.timedelta(hours=1))
    assert not status.ok and status.path == newest
    assert "1d after this machine's time" in status.problem
    assert dump_status(tmp_path, now=NOW + datetime.timedelta(days=1, seconds=30)).ok


def test_a_manifest_that_disagrees_with_its_dumps_name_is_damaged(tmp_path):
    """Status takes the newest by name, retention by the manifest's time: a manifest that
    says another time than the name made them disagree on which is the newest."""
    older = fabricate(tmp_path, NOW - datetime.timedelta(hours=2))
    newest = fabricate(tmp_path, NOW)
    manifest = Path(f"{newest}.manifest.json")
    data = json.loads(manifest.read_text())
    data["committed_at"] = (NOW - datetime.timedelta(days=9)).isoformat()
    manifest.write_text(json.dumps(data))
    status = dump_status(tmp_path, now=NOW)
    assert status.broken and status.path == newest and "the dump's name says" in status.problem
    [result] = snaptree.prune(tmp_path, 1, dry_run=True)
    assert [p for p, _ in result.ignored] == [newest]
    assert [d.dump.path for d in result.decisions] == [older]
    data["committed_at"], data["format"] = NOW.isoformat(), "json"  # another format's name
    manifest.write_text(json.dumps(data))
    assert "format json" in dump_status(tmp_path, now=NOW).problem


def test_status_looks_at_one_format_when_asked(tmp_path):
    pickled = fabricate(tmp_path, NOW - datetime.timedelta(hours=2))
    fabricate(tmp_path, NOW, fmt="json")
    assert dump_status(tmp_path, format="pickle", now=NOW).path == pickled
    assert dump_status(tmp_path, now=NOW).path.name.endswith(".json")


# -- the Prometheus textfile -----------------------------------------------------------------


def _samples(path: Path) -> dict[str, float]:
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^snaptree_export_(\w+)\{(.*)\} (\S+)$", line)
        if match:
            found[match[1]] = float(match[3])
    return found


def test_the_exporter_writes_a_prometheus_textfile_after_every_run(store, tmp_path):
    metrics = tmp_path / "snaptree.prom"
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    store.run(lambda root: root.__setitem__("v", 1))
    exporter = snaptree.Exporter(store, dumps, every=3600, metrics=metrics, process=False)
    try:
        assert _samples(metrics)["runs_total"] == 0  # written at once: a wrong path fails early
        written = exporter.export_now()
        exporter.export_now()  # nothing new: still a success
    finally:
        exporter.stop()
    values = _samples(metrics)
    assert values["runs_total"] == 2 and values["failures_total"] == 0
    assert values["last_bytes"] == written.info.bytes
    assert values["last_objects"] == written.info.objects
    assert values["last_commit_timestamp_seconds"] == pytest.approx(
        written.info.committed_at.timestamp(), abs=1e-3
    )
    assert values["last_success_timestamp_seconds"] > 0
    text = metrics.read_text()
    assert "# TYPE snaptree_export_failures_total counter" in text
    assert f'target="{dumps}",format="pickle"' in text
    assert not list(tmp_path.glob(".snaptree.prom.*"))  # no temporary left beside it


@pytest.mark.slow
def test_a_failed_run_counts_and_counters_carry_on_from_the_file_a_cron_run_left(tmp_path):
    db = tmp_path / "Data.fs"
    metrics = tmp_path / "export.prom"
    with snaptree.open(str(db)) as store:
        store.run(lambda root: root.__setitem__("v", b"bytes JSON cannot hold"))
    out = tmp_path / "dump.json"
    failed = run_snaptree("export", "--db", db, "-o", out, "--metrics", metrics, "--json")
    assert failed.returncode == 3
    assert json.loads(failed.stdout) == {
        "written": False,
        "failed": True,
        "error": json.loads(failed.stdout)["error"],
        "path": str(out),
        "format": None,
    }
    assert "JSON cannot hold" in json.loads(failed.stdout)["error"]
    assert _samples(metrics)["failures_total"] == 1
    with snaptree.open(str(db)) as store:
        store.run(lambda root: root.__setitem__("v", "text"))
    ok = run_snaptree("export", "--db", db, "-o", out, "--metrics", metrics)
    assert ok.returncode == 0, ok.stderr
    values = _samples(metrics)
    assert values["runs_total"] == 2 and values["failures_total"] == 1
    assert values["last_success_timestamp_seconds"] >= values["last_failure_timestamp_seconds"]


def test_a_metrics_file_that_cannot_be_written_is_an_error_before_any_run(tmp_path):
    with pytest.raises(snaptree.ExportError, match=r"No such file or directory \(ENOENT\)"):
        MetricsFile(tmp_path / "missing" / "x.prom", target=tmp_path, format="pickle")


@pytest.mark.slow
def test_a_failed_run_under_every_json_prints_a_json_object_saying_so(tmp_path):
    db = tmp_path / "Data.fs"
    with snaptree.open(str(db)) as store:
        store.run(lambda root: root.__setitem__("v", b"bytes JSON cannot hold"))
    process = start(
        "export", "--db", db, "-o", tmp_path / "d.json", "--every", "3600", "--json"
    )  # fmt: skip
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], WAIT)
        assert ready, "no JSON line within the wait"
        line = json.loads(process.stdout.readline())
        assert line["failed"] and not line["written"] and "JSON cannot hold" in line["error"]
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=WAIT)
    assert process.returncode == 0, stderr
    assert stdout == ""  # one object per run, nothing else
    assert "snaptree: error:" in stderr
