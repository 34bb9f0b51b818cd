"""``snaptree serve`` for a benchmark: started on a port chosen at run time, stopped after."""

from __future__ import annotations

import contextlib
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def snaptree_serve(db: Path, log: Path, *options: str) -> Iterator[str]:
    """Serve *db* on 127.0.0.1 and yield its ``zeo://`` URI; its stderr goes to *log*."""
    command = [sys.executable, "-m", "snaptree", "serve", "--db", str(db)]
    command += ["--listen", "127.0.0.1:0", *options]
    with log.open("w") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 60)
        uri = process.stdout.readline().strip() if ready else ""
        if not uri.startswith("zeo://"):
            raise RuntimeError(f"snaptree serve did not start: {log.read_text()}")
        yield uri
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(60)
