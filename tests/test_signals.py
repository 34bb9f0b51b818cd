"""SIGINT/SIGTERM stop the foreground loops (``export --every``, ``serve``) wherever they land.

The bug these tests pin: the loops waited on a ``threading.Event`` that the
signal handler set. A handler runs in the main thread wherever that thread
is; landing inside ``Event.wait`` while it held the event's lock, ``set``
waited for that lock forever, and ``snaptree export --every 0`` ignored
SIGTERM (CI saw it time out after 60 s).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import snaptree
from _cli import reaped
from _cli import start as start_snaptree

WAIT = 60.0

# SIGTERM is raised at the k-th line the interpreter runs inside stop.wait
# (and anything it calls), for every line a wait of T seconds runs.
AT_EVERY_LINE = textwrap.dedent(
    """
    import json, signal, sys
    from snaptree._signals import stop_on_signals

    T = 0.2

    def wait_with_sigterm_at_line(k):
        lines = 0
        def tracer(frame, event, arg):
            nonlocal lines
            if event == "line":
                lines += 1
                if lines == k:
                    signal.raise_signal(signal.SIGTERM)
            return tracer
        with stop_on_signals() as stop:
            sys.settrace(tracer)
            try:
                returned = stop.wait(T)
            finally:
                sys.settrace(None)
            return lines, returned, stop.received, stop.wait(0)

    lines = wait_with_sigterm_at_line(0)[0]
    print(json.dumps([wait_with_sigterm_at_line(k) for k in range(1, lines + 1)]))
    """
)


def test_a_signal_at_any_line_of_the_wait_is_heard_and_never_hangs() -> None:
    """The wait is traced, and SIGTERM raised at each of its lines in turn (in a subprocess, so
    a deadlock fails the test after WAIT seconds instead of hanging the suite): the handler
    always completes, the wait returns and the stop stays set."""
    child = subprocess.run(
        [sys.executable, "-c", AT_EVERY_LINE], capture_output=True, text=True, timeout=WAIT
    )
    assert child.returncode == 0, child.stderr
    results = json.loads(child.stdout)
    assert len(results) >= 3, results  # lines before, at and after the blocking select
    for _, _, received, set_after in results:
        assert received == "SIGTERM" and set_after, results


def test_a_signal_that_arrives_while_the_wait_blocks_wakes_it() -> None:
    """SIGTERM from outside while the loop sits in a long wait: it ends at once, not when the
    wait would have timed out."""
    script = textwrap.dedent(
        """
        import sys
        from snaptree._signals import stop_on_signals
        with stop_on_signals() as stop:
            print("waiting", flush=True)
            sys.exit(0 if stop.wait(3 * 60) and stop.received == "SIGTERM" else 1)
        """
    )
    command = [sys.executable, "-c", script]
    with reaped(subprocess.Popen(command, stdout=subprocess.PIPE, text=True)) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "waiting\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0


@pytest.mark.parametrize("attempt", range(20))
def test_sigterm_ends_export_every_0_whatever_it_was_doing(tmp_path: Path, attempt: int) -> None:
    """``export --every 0`` gets SIGTERM at 20 points of its loop (after 1, 2 or 3 runs it
    reported, in an export or the pause after one): it exits 0 each time, within WAIT."""
    db_file = tmp_path / "Data.fs"
    store = snaptree.open(str(db_file))
    store.run(lambda root: root.update(accounts={f"a{i}": i for i in range(100)}))
    store.close()
    out = tmp_path / "dumps"
    out.mkdir()
    args = ("--db", str(db_file), "--dir", str(out), "--every", "0", "--json")
    with reaped(start_snaptree("export", *args)) as proc:
        assert proc.stdout is not None
        for _ in range(1 + attempt % 3):
            assert "written" in json.loads(proc.stdout.readline())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0


def test_the_first_signal_is_announced_and_a_second_abandons_the_work() -> None:
    """What ``export --every`` asks for: the first SIGTERM sets the stop and says so on
    stderr; the second raises KeyboardInterrupt where the main thread is (the export in
    progress); after the block, the previous handlers are back."""
    script = textwrap.dedent(
        """
        import signal
        from snaptree._signals import stop_on_signals
        before = signal.getsignal(signal.SIGTERM)
        with stop_on_signals(lambda name: f"got {name}", abandon_on_second=True) as stop:
            signal.raise_signal(signal.SIGTERM)
            print("set" if stop.wait(0) else "not set", flush=True)
            try:
                signal.raise_signal(signal.SIGTERM)
            except KeyboardInterrupt:
                print("abandoned", flush=True)
        print("restored" if signal.getsignal(signal.SIGTERM) is before else "kept", flush=True)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["set", "abandoned", "restored"]
    assert child.stderr.splitlines() == ["got SIGTERM"]
