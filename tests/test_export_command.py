"""``snaptree export``: JSON output, reading a live file, usage errors, and the ``--every`` loop.

Every command runs in a real process (``tests/_cli.py``): exit codes, stdout
and stderr as a user sees them.
"""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import snaptree
from _cli import error_line
from _cli import snaptree as run_snaptree
from snaptree.dump_directory import complete_dumps

WAIT = 60.0
ROOT = Path(__file__).resolve().parents[1]


def _bump(store: snaptree.Store, value: int) -> None:
    store.run(lambda root: root.__setitem__("v", value))


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    path = tmp_path / "Data.fs"
    store = snaptree.open(str(path))
    _bump(store, 42)
    store.close()
    return path


def test_export_command_json_output_is_only_json(db_file, tmp_path):
    out = tmp_path / "d.json"
    result = run_snaptree("export", "--db", db_file, "-o", out, "--format", "json", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["written"] and data["path"] == str(out) and data["format"] == "json"
    assert "exported" in result.stderr
    assert json.loads(out.read_text()) == {"v": 42}


@pytest.mark.parametrize(
    ("what", "args", "code"),
    [
        ("no-store", ("--db", "{tmp}/nosuch.fs", "-o", "{tmp}/x.json"), 2),
        ("no-directory", ("--db", "{db}", "--dir", "{tmp}/nodir"), 5),
        ("unknown-suffix", ("--db", "{db}", "-o", "{tmp}/x.bin"), 2),
    ],
)
def test_a_failure_before_the_run_is_one_json_object_too(db_file, tmp_path, what, args, code):
    """--json: stdout holds the failed run's object whatever stage failed; exit non-zero."""
    argv = [a.format(tmp=tmp_path, db=db_file) for a in args]
    result = run_snaptree("export", *argv, "--json", "--metrics", tmp_path / "m.prom")
    assert result.returncode == code, result.stderr
    data = json.loads(result.stdout)
    assert data["written"] is False and data["failed"] is True and data["error"]
    assert re.search(
        r"(?m)^snaptree_export_failures_total\{.*\} 1$", (tmp_path / "m.prom").read_text()
    )
    assert not (tmp_path / "nosuch.fs").exists()


@pytest.mark.slow
def test_verify_json_reports_a_missing_dump_as_one_object(tmp_path):
    result = run_snaptree("verify", tmp_path / "gone.pickle", "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout) == {
        "ok": False,
        "path": str(tmp_path / "gone.pickle"),
        "error": f"{tmp_path / 'gone.pickle'} does not exist",
    }


@pytest.mark.slow
def test_export_command_reads_a_file_another_process_has_open(db_file, tmp_path):
    """The writer holds the FileStorage lock; the export opens the file read-only."""
    writer = snaptree.open(str(db_file))
    try:
        _bump(writer, 43)
        result = run_snaptree("export", "--db", db_file, "--dir", tmp_path, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["tid"] == writer.last_tid()
    finally:
        writer.close()


@pytest.mark.slow
def test_export_command_on_a_live_file_logs_no_stale_index_warning(tmp_path):
    """A file its writer created and still has open has an empty .index: expected, not warned."""
    db_file = tmp_path / "live.fs"
    writer = snaptree.open(str(db_file))  # saves an .index of the empty file, and no other
    try:
        _bump(writer, 44)
        done = run_snaptree("export", "--db", db_file, "-o", tmp_path / "d.pickle")
        assert done.returncode == 0, done.stderr
        assert "Ignoring index" not in done.stderr
        assert "exported" in done.stderr
    finally:
        writer.close()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--every", "-1"], "every must be between"),
        (["--every", "1e12"], "every must be between"),
        (["--keep", "0"], "keep must be between 1 and 100000, not 0"),
        (["--keep-weekly", "0"], "keep weekly must be between 1 and 100000, not 0"),
        (["--keep", "3"], "--keep needs --dir"),
        (["--keep-daily", "3"], "so does every --keep-* option"),
        (["--keep-within", "3 days"], "is not a duration"),
        (["--keep-within", "1m"], "restic and borg read m as months"),
        ([], "exactly one of -o FILE or --dir DIR"),
        (["--every", "5", "--at", "040d41d07e885dbb"], "--at exports one past state"),
    ],
)
def test_export_command_usage_errors_exit_2(db_file, tmp_path, args, message):
    target = [] if args == [] else ["-o", str(tmp_path / "x.pickle")]
    if args[:1] and args[0].startswith("--keep") and "0" in args:
        target = ["--dir", str(tmp_path)]
    result = run_snaptree("export", "--db", db_file, *target, *args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.slow
def test_an_empty_subtree_is_a_usage_error(db_file, tmp_path):
    """``--subtree "$UNSET"`` is refused rather than read as the root."""
    result = run_snaptree("export", "--db", db_file, "-o", tmp_path / "x.pickle", "--subtree", "")
    assert result.returncode == 2
    assert "the subtree '' is empty" in error_line(result)
    assert not (tmp_path / "x.pickle").exists()


@pytest.mark.slow
def test_export_command_on_a_missing_store_exits_2(tmp_path):
    result = run_snaptree("export", "--db", tmp_path / "none.fs", "-o", tmp_path / "x")
    assert result.returncode == 2 and error_line(result)


def _read_line(stream, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no output in time"
    return stream.readline()


@pytest.mark.slow  # seconds of work: with the torture tests in .ci/run
def test_the_script_every_loop_skips_unchanged_runs_and_exits_0_on_sigterm(db_file, tmp_path):
    """scripts/export.py (for cron and systemd) keeps exporting, says when nothing changed,
    and SIGTERM ends it with status 0."""
    out = tmp_path / "dumps"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "export.py"), "--db", str(db_file),
         "--dir", str(out), "--every", "0.05", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = json.loads(_read_line(proc.stdout, WAIT))
        second = json.loads(_read_line(proc.stdout, WAIT))
        assert first["written"] and not second["written"]
        assert second["reason"] == "nothing committed since the last export"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    assert "SIGTERM" in proc.stderr.read()
    assert [p.name for p in complete_dumps(out, "pickle")] == [Path(first["path"]).name]
