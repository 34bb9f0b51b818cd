"""Bad input across the command line: one clear line, the documented exit code, nothing changed.

Each case runs a ``snaptree`` command with one thing wrong: a malformed or
unreachable store URI, a missing file, malformed JSON, a hostile pickle, a
wrong ``--format``, an absurd ``--every``/``--keep``, a damaged dump to
verify. Each must:

- exit with the code ``snaptree.cli`` documents: 2 for usage or
  configuration (click's usage errors, a bad argument, a store that cannot
  be opened), 3 for bad input (a malformed or hostile file, a dump that
  does not verify, a value that cannot be stored), 4 for a store whose
  server does not answer, 5 for an export that failed;
- say what is wrong in one line on stderr (click's usage errors add their
  ``Usage:``/``Try`` lines around their one ``Error:`` line), no traceback,
  nothing on stdout;
- leave the store (its file's bytes and a snapshot of the tree) and the
  earlier exports (every file and link) exactly as they were.

Every case runs the command in its own process, the one way tests start
it (tests/_cli.py), from the scratch directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import snaptree
from _cli import snaptree as run_snaptree
from snaptree.export_run import export_into
from snaptree.manifest import manifest_path

LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING) [\w.]+: ")


# -- the world every case runs against ---------------------------------------------------


class Hostile:
    """Pickles as a call of *function* with *args*: what a hostile file does."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> Any:
        return (self.function, self.args)


@dataclass
class World:
    root: Path  # scratch directory and the subprocesses' working directory
    db: Path  # the store every case must leave unchanged
    exports: Path  # earlier exports (--dir mode) that must stay unchanged
    dump: Path  # an earlier single-file export
    marker: Path  # a hostile pickle that ran would create this file

    def path(self, name: str) -> str:
        return str(self.root / name)


def _dump_with_manifest(path: Path, data: bytes, fmt: str = "pickle") -> None:
    """A file with a manifest that matches it, as if snaptree had written it."""
    path.write_bytes(data)
    manifest = {
        "snaptree_manifest": 1,
        "path": path.name,
        "format": fmt,
        "tid": "0" * 16,
        "committed_at": "2026-01-01T00:00:00+00:00",
        "objects": 1,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    manifest_path(path).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("bad-input")
    w = World(root, root / "Data.fs", root / "exports", root / "dump.pickle", root / "MARKER")
    w.exports.mkdir()
    with snaptree.open(str(w.db)) as store:

        def fill(tree: Any) -> None:
            tree["accounts"] = {f"a{i:03d}": {"balance": 100} for i in range(50)}
            tree["blob"] = b"\x00bytes JSON cannot hold"
            tree["text"] = "a lone surrogate \ud800 UTF-8 cannot hold"
            tree["huge"] = 10**5000

        store.run(fill)
        store.export(w.dump)
        good_zexp = store.export(root / "good.zexp").path
        export_into(store, w.exports, format="pickle")
        export_into(store, w.exports, format="zodb")

    (root / "not-a-dir").mkdir()
    (root / "good.json").write_text('{"imported": 1}')
    (root / "notfs.json").write_text('{"a": 1}\n')
    (root / "broken.json").write_text('{"a": [1, 2,]}')
    (root / "truncated.json").write_text('{"a": [1, ')
    (root / "empty.json").write_text("")
    (root / "binary.json").write_bytes(b"\xff\xfe\x00\x01garbage")
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    marker = str(w.marker)
    hostile = {
        "system": Hostile(os.system, f"touch {marker}"),
        "eval": Hostile(eval, f"open({marker!r}, 'w')"),
        "popen": Hostile(subprocess.Popen, ["touch", marker]),
    }
    for name, payload in hostile.items():
        (root / f"hostile-{name}.pickle").write_bytes(pickle.dumps({"x": [payload]}))
    # bytes(n) with a huge n, in the protocol 2 form: a memory bomb, not code.
    (root / "hostile-bytes.pickle").write_bytes(
        b"\x80\x02c__builtin__\nbytes\nq\x00J\x00\xe4\x0bTq\x01\x85q\x02Rq\x03."
    )
    good_pickle = pickle.dumps({"a": list(range(100))})
    (root / "truncated.pickle").write_bytes(good_pickle[:-10])
    (root / "hostile-dump.pickle").write_bytes(pickle.dumps(Hostile(os.system, f"touch {marker}")))

    # Damaged copies of the good dump, for verify (the originals stay untouched).
    manifest = manifest_path(w.dump)
    for name in ("truncated", "altered", "no-manifest", "bad-manifest", "hostile-manifest"):
        shutil.copy(w.dump, root / f"{name}.pickle")
        if name != "no-manifest":
            shutil.copy(manifest, manifest_path(root / f"{name}.pickle"))
    data = w.dump.read_bytes()
    (root / "truncated.pickle").write_bytes(data[: len(data) // 2])
    (root / "altered.pickle").write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    manifest_path(root / "bad-manifest.pickle").write_text("{not json")
    # A hostile pickle under the good dump's manifest: the checksum stops it before loading.
    (root / "hostile-manifest.pickle").write_bytes(
        pickle.dumps(Hostile(os.system, f"touch {marker}"))
    )
    _dump_with_manifest(root / "forged.pickle", pickle.dumps(Hostile(os.system, f"touch {marker}")))
    _dump_with_manifest(root / "unknown-format.pickle", good_pickle, fmt="yaml")

    # zodb dumps: a record whose state calls os.system, a zeroed record; manifests to match.
    data = good_zexp.read_bytes()
    first = int.from_bytes(data[12:20], "big")  # the length of the root record
    hostile_state = pickle.dumps(snaptree.Mapping, protocol=3) + pickle.dumps(
        Hostile(os.system, f"touch {marker}"), protocol=3
    )
    forged = data[:4] + data[4:12] + len(hostile_state).to_bytes(8, "big") + hostile_state
    _dump_with_manifest(root / "forged.zexp", forged + data[20 + first :], fmt="zodb")
    _dump_with_manifest(
        root / "damaged.zexp", data[:20] + b"\0" * first + data[20 + first :], fmt="zodb"
    )
    # Manifests missing a field, or with a bad time, beside an intact dump.
    for name, change in {
        "no-bytes": lambda m: m.pop("bytes"),
        "no-tid": lambda m: m.pop("tid"),
        "bad-time": lambda m: m.update(committed_at="not a time"),
    }.items():
        copy = root / f"{name}.pickle"
        shutil.copy(w.dump, copy)
        fields = json.loads(manifest.read_text())
        change(fields)
        manifest_path(copy).write_text(json.dumps(fields))
    deep = b"[" * 100_000 + b"]" * 100_000
    _dump_with_manifest(root / "deep-dump.json", deep, fmt="json")
    (root / "long-int.json").write_text('{"n": ' + "7" * 5000 + "}")
    shared: Any = []
    for _ in range(9):
        shared = [shared] * 10
    (root / "bomb.pickle").write_bytes(pickle.dumps(shared, protocol=2))
    return w


def _fingerprint(world: World) -> dict[str, Any]:
    """The store's bytes and content, and every earlier export: what no bad input may change."""
    files = {}
    for entry in sorted([*world.exports.iterdir(), world.dump]):
        files[entry.name] = "-> " + os.readlink(entry) if entry.is_symlink() else entry.read_bytes()
    manifest = manifest_path(world.dump)
    files[manifest.name] = manifest.read_bytes()
    with snaptree.open(str(world.db), read_only=True) as store, store.snapshot() as snap:
        tid, tree = snap.tid, snaptree.to_plain(snap.root)
    return {
        "Data.fs": hashlib.sha256(world.db.read_bytes()).hexdigest(),
        "tid": tid,
        "tree": tree,
        "files": files,
        "scratch": sorted(p.name for p in world.root.iterdir()),
    }


# -- running the command --------------------------------------------------------------------


def _run(world: World, args: list[str]) -> tuple[int, str, str]:
    env = {"SNAPTREE_DB": str(world.root / "default.fs")}  # never ./data in the checkout
    result = run_snaptree(*args, cwd=world.root, env=env)
    return result.returncode, result.stdout, result.stderr


def _error_line(stderr: str) -> str:
    """The one line that says what is wrong; fails on a traceback or a second message line."""
    assert "Traceback" not in stderr, f"a traceback instead of one line:\n{stderr}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    usage = [line for line in lines if line.startswith(("Usage: ", "Try '"))]
    messages = [line for line in lines if line not in usage and not LOG_LINE.match(line)]
    assert len(messages) == 1, f"expected one message line on stderr, got:\n{stderr}"
    line = messages[0]
    if usage:
        assert line.startswith("Error: "), line
    else:
        assert line.startswith("snaptree: error: "), line
    return line


# -- the cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # "{name}" is a path in the scratch directory
    code: int
    message: str  # a regular expression the error line must match
    xfail: str = ""

    def argv(self, world: World) -> list[str]:
        return [
            a.format(db=world.db, exports=world.exports, dump=world.dump, scratch=world.root)
            for a in self.args
        ]


OUT = "{scratch}/out.pickle"
DB = ("--db", "{db}")

CASES = [
    # -- store URIs (configuration: 2; a server that does not answer: 4) --
    Case(
        "export-unknown-scheme",
        ("export", "--db", "foo://bar", "-o", OUT),
        2,
        r"cannot open foo://bar: unknown URI scheme 'foo'; use a file path",
    ),
    Case(
        "import-unknown-scheme",
        ("import", "{scratch}/good.json", "--db", "nosuch://x"),
        2,
        r"unknown URI scheme 'nosuch'",
    ),
    Case(
        "export-missing-directory",
        ("export", "--db", "{scratch}/nowhere/Data.fs", "-o", OUT),
        2,
        r"directory .*/nowhere does not exist; create it first",
    ),
    Case(
        "import-missing-directory",
        ("import", "{scratch}/good.json", "--db", "{scratch}/nowhere/Data.fs"),
        2,
        r"directory .*/nowhere does not exist",
    ),
    Case(
        "export-zeo-nobody-listens",
        ("export", "--db", "zeo://127.0.0.1:1?wait_timeout=1", "-o", OUT),
        4,
        r"no ZEO server answered at 127\.0\.0\.1:1 within 1 s; start one with `snaptree serve",
    ),
    Case(
        "export-postgres-nobody-listens",
        ("export", "--db", "postgresql://app:s3cret@127.0.0.1:1/app", "-o", OUT),
        4,
        r"cannot open postgresql://app:\*\*\*@127\.0\.0\.1:1/app: .*Connection refused; "
        r"Is the server running",
    ),
    Case(
        "export-db-is-a-directory",
        ("export", "--db", "{scratch}/not-a-dir", "-o", OUT),
        2,
        r"cannot open .*not-a-dir: it is a directory",
    ),
    Case(
        "import-db-is-not-a-filestorage",
        ("import", "{scratch}/good.json", "--db", "{scratch}/notfs.json"),
        2,
        r"cannot open .*notfs\.json: it is not a FileStorage",
    ),
    # -- missing files (usage: 2) --
    Case(
        "import-missing-file",
        ("import", "{scratch}/missing.json", *DB),
        2,
        r"Invalid value for 'FILE': File '.*missing\.json' does not exist",
    ),
    Case(
        "verify-missing-file",
        ("verify", "{scratch}/missing.pickle"),
        2,
        r"Invalid value for 'DUMP': File '.*missing\.pickle' does not exist",
    ),
    Case("verify-a-directory", ("verify", "{exports}"), 2, r"is a directory"),
    Case("export-output-is-a-directory", ("export", *DB, "-o", "{exports}"), 2, r"is a directory"),
    Case(
        "export-output-under-a-file",
        ("export", *DB, "-o", "{scratch}/good.json/out.pickle"),
        5,
        r"cannot write .*good\.json/out\.pickle: .*good\.json is a file, not a directory",
    ),
    Case(
        "export-dir-is-a-file",
        ("export", *DB, "--dir", "{scratch}/good.json"),
        2,
        r"Invalid value for '--dir': Directory '.*good\.json' is a file",
    ),
    # -- malformed JSON (bad input: 3) --
    Case(
        "import-malformed-json",
        ("import", "{scratch}/broken.json", *DB),
        3,
        r"broken\.json: malformed JSON at line 1, column 13: unallowed token",
    ),
    Case(
        "import-truncated-json",
        ("import", "{scratch}/truncated.json", *DB),
        3,
        r"truncated\.json: malformed JSON at line 1, column \d+",
    ),
    Case(
        "import-empty-json",
        ("import", "{scratch}/empty.json", *DB),
        3,
        r"empty\.json: malformed JSON at line 1, column 1",
    ),
    Case(
        "import-binary-as-json",
        ("import", "{scratch}/binary.json", *DB),
        3,
        r"binary\.json: not UTF-8 text \(byte \d+: .*\); JSON must be UTF-8",
    ),
    Case(
        "import-json-nested-too-deeply",
        ("import", "{scratch}/deep.json", *DB, "--path", "deep"),
        3,
        r"deep\.json: the JSON is nested too deeply \(more than 1,000 levels.*\) at line 1, "
        r"column 1001",
    ),
    Case(
        "import-pickle-as-json",
        ("import", "{scratch}/truncated.pickle", "--format", "json", *DB),
        3,
        r"truncated\.pickle: not UTF-8 text \(byte 0: invalid start byte\)",
    ),
    # -- hostile and broken pickles (bad input: 3; no code runs) --
    Case(
        "import-pickle-calling-os-system",
        ("import", "{scratch}/hostile-system.pickle", *DB),
        3,
        r"refused global posix\.system: .*no code from the file was run",
    ),
    Case(
        "import-pickle-calling-eval",
        ("import", "{scratch}/hostile-eval.pickle", *DB),
        3,
        r"refused global builtins\.eval",
    ),
    Case(
        "import-pickle-calling-popen",
        ("import", "{scratch}/hostile-popen.pickle", *DB),
        3,
        r"refused global subprocess\.Popen",
    ),
    Case(
        "import-pickle-allocating-bytes",
        ("import", "{scratch}/hostile-bytes.pickle", *DB),
        3,
        r"bytes\(n\).*refused",
    ),
    Case(
        "import-truncated-pickle",
        ("import", "{scratch}/truncated.pickle", *DB),
        3,
        r"truncated\.pickle: the pickle is truncated",
    ),
    # -- wrong formats --
    Case(
        "export-unknown-format",
        ("export", *DB, "-o", OUT, "--format", "xml"),
        2,
        r"Invalid value for '--format': 'xml' is not one of 'pickle', 'json', 'zodb'",
    ),
    Case(
        "import-unknown-format",
        ("import", "{scratch}/good.json", *DB, "--format", "yaml"),
        2,
        r"Invalid value for '--format': 'yaml' is not one of",
    ),
    Case(
        "export-json-of-bytes",
        ("export", *DB, "-o", "{scratch}/out.json", "--format", "json"),
        3,
        r"/blob: JSON cannot hold a builtins\.bytes; export this tree as pickle or zodb",
    ),
    Case(
        "export-zodb-of-a-scalar",
        ("export", *DB, "-o", "{scratch}/out.zexp", "--format", "zodb", "--subtree", "/blob"),
        5,
        r"the zodb format exports a persistent object; /blob is a bytes",
    ),
    Case(
        "export-missing-subtree",
        ("export", *DB, "-o", OUT, "--subtree", "/nope"),
        2,
        r"/: there is no key 'nope' there",
    ),
    Case(
        "export-malformed-at",
        ("export", *DB, "-o", OUT, "--at", "yesterday"),
        2,
        r"'yesterday' is neither a tid \(16 hex digits\) nor an ISO 8601 time",
    ),
    # -- --every and --keep (usage: 2) --
    *[
        Case(
            f"export-every-{name}",
            ("export", *DB, "--dir", "{scratch}/not-a-dir", "--every", value),
            2,
            message,
        )
        for name, value, message in [
            ("negative", "-1", r"every must be between 0 and 2678400 seconds"),
            ("absurd", "1e12", r"every must be between 0 and 2678400 seconds"),
            ("nan", "nan", r"every must be between"),
            ("infinite", "inf", r"every must be between"),
            ("not-a-number", "soon", r"'soon' is not a valid float"),
        ]
    ],
    *[
        Case(
            f"export-keep-{name}",
            ("export", *DB, "--dir", "{scratch}/not-a-dir", "--keep", value),
            2,
            message,
        )
        for name, value, message in [
            ("zero", "0", r"keep must be between 1 and 100000, not 0"),
            ("negative", "-3", r"keep must be between 1 and 100000, not -3"),
            ("absurd", "1000000000", r"keep must be between 1 and 100000"),
            ("fraction", "2.5", r"'2\.5' is not a valid integer"),
        ]
    ],
    Case(
        "export-keep-without-dir",
        ("export", *DB, "-o", OUT, "--keep", "3"),
        2,
        r"--keep needs --dir",
    ),
    Case(
        "export-at-with-every",
        ("export", *DB, "-o", OUT, "--every", "5", "--at", "040d41d07e885dbb"),
        2,
        r"--at exports one past state; it cannot be combined with --every",
    ),
    Case("export-cache-size-tiny", ("export", *DB, "-o", OUT, "--cache-size", "5"), 2, r"x>=100"),
    Case(
        "import-savepoint-every-zero",
        ("import", "{scratch}/good.json", *DB, "--savepoint-every", "0"),
        2,
        r"Invalid value for '--savepoint-every'",
    ),
    Case("demo-no-writers", ("demo", *DB, "--writers", "0"), 2, r"Invalid value for '--writers'"),
    Case("demo-negative-time", ("demo", *DB, "--seconds", "-1"), 2, r"'--seconds'"),
    Case(
        "serve-listen-nonsense",
        ("serve", *DB, "--listen", "127.0.0.1:99999"),
        2,
        r"listen address '127\.0\.0\.1:99999': expected HOST:PORT",
    ),
    Case("unknown-command", ("expotr", *DB), 2, r"No such command 'expotr'"),
    Case(
        "unknown-option",
        ("export", *DB, "--evrey", "5"),
        2,
        r"No such option '--evrey'\. \(Did you mean one of: '--every'",
    ),
    # -- verify of damaged dumps (bad input: 3) --
    Case(
        "verify-truncated-dump",
        ("verify", "{scratch}/truncated.pickle"),
        3,
        r"truncated\.pickle: \d+ bytes, but the manifest says \d+; the file is truncated",
    ),
    Case(
        "verify-altered-dump",
        ("verify", "{scratch}/altered.pickle"),
        3,
        r"altered\.pickle: sha256 [0-9a-f]{64} does not match the manifest's",
    ),
    Case(
        "verify-dump-without-manifest",
        ("verify", "{scratch}/no-manifest.pickle"),
        3,
        r"no-manifest\.pickle: no manifest \(no-manifest\.pickle\.manifest\.json\); "
        r"the export did not finish",
    ),
    Case(
        "verify-unreadable-manifest",
        ("verify", "{scratch}/bad-manifest.pickle"),
        3,
        r"bad-manifest\.pickle\.manifest\.json: unreadable manifest",
    ),
    Case(
        "verify-manifest-naming-an-unknown-format",
        ("verify", "{scratch}/unknown-format.pickle"),
        3,
        r"the manifest names an unknown format 'yaml'",
    ),
    Case(
        "verify-hostile-pickle-under-a-real-manifest",
        ("verify", "{scratch}/hostile-manifest.pickle"),
        3,
        r"hostile-manifest\.pickle: \d+ bytes, but the manifest says",
    ),
    Case(
        "verify-hostile-pickle-with-a-forged-manifest",
        ("verify", "{scratch}/forged.pickle"),
        3,
        r"forged\.pickle: .*refused",
    ),
    # -- zodb dumps are read without running them --
    Case(
        "verify-forged-zexp",
        ("verify", "{scratch}/forged.zexp"),
        3,
        r"forged\.zexp: record 0x[0-9a-f]{16}: refused global posix\.system: .*no code",
    ),
    Case(
        "import-forged-zexp",
        ("import", "{scratch}/forged.zexp", *DB, "--path", "copy"),
        3,
        r"forged\.zexp: record 0x[0-9a-f]{16}: refused global posix\.system",
    ),
    Case(
        "verify-damaged-zexp-under-a-matching-manifest",
        ("verify", "{scratch}/damaged.zexp"),
        3,
        r"damaged\.zexp: record 0x[0-9a-f]{16}: not a valid pickle",
    ),
    # -- damaged manifests, deep dumps --
    Case(
        "verify-manifest-without-bytes",
        ("verify", "{scratch}/no-bytes.pickle"),
        3,
        r"no-bytes\.pickle\.manifest\.json: damaged manifest: bytes '\(missing\)' is not a count",
    ),
    Case(
        "verify-manifest-without-tid",
        ("verify", "{scratch}/no-tid.pickle"),
        3,
        r"damaged manifest: tid '\(missing\)' is not 16 hex digits",
    ),
    Case(
        "verify-manifest-with-a-bad-time",
        ("verify", "{scratch}/bad-time.pickle"),
        3,
        r"damaged manifest: committed_at 'not a time' is not an ISO 8601 time",
    ),
    Case(
        "verify-json-dump-nested-100000-deep",
        ("verify", "{scratch}/deep-dump.json"),
        3,
        r"deep-dump\.json: the JSON is nested too deeply",
    ),
    # -- values JSON cannot hold, an int Python will not read --
    Case(
        "export-json-of-a-lone-surrogate",
        ("export", *DB, "-o", "{scratch}/out.json", "--format", "json", "--subtree", "/text"),
        3,
        r"/text: a string holding a lone surrogate .*export this tree as pickle or zodb",
    ),
    Case(
        "export-json-of-a-long-int",
        ("export", *DB, "-o", "{scratch}/out.json", "--format", "json", "--subtree", "/huge"),
        3,
        r"/huge: an int of more than 4300 digits",
    ),
    Case(
        "import-json-long-int",
        ("import", "{scratch}/long-int.json", *DB),
        3,
        r"long-int\.json: an integer of more than 4300 digits at line 1, column 7",
    ),
    # -- the store's own files, an empty path, a pickle bomb --
    Case(
        "export-over-its-own-database",
        ("export", *DB, "-o", "{db}", "--format", "pickle"),
        5,
        r"cannot write .*Data\.fs: it is one of the store's own files",
    ),
    Case(
        "export-over-its-own-index",
        ("export", *DB, "-o", "{db}.index", "--format", "pickle"),
        5,
        r"it is one of the store's own files",
    ),
    Case(
        "import-empty-path",
        ("import", "{scratch}/good.json", *DB, "--path", ""),
        2,
        r"the import path '' is empty; give a path such as accounts/a1, or / for the root",
    ),
    Case(
        "import-pickle-bomb",
        ("import", "{scratch}/bomb.pickle", *DB, "--path", "b"),
        3,
        r"the data expands to 1,111,111,111 objects from 10 distinct .*--max-objects",
    ),
    # -- schemes snaptree does not open --
    Case(
        "export-mysql",
        ("export", "--db", "mysql://app:s3cret@127.0.0.1/app", "-o", OUT),
        2,
        r"cannot open mysql://app:\*\*\*@127\.0\.0\.1/app: unsupported URI scheme 'mysql'; "
        r"use a file path",
    ),
    Case(
        "import-sqlite",
        ("import", "{scratch}/good.json", "--db", "sqlite:///x.db"),
        2,
        r"unsupported URI scheme 'sqlite'",
    ),
]


#: The cases the fast suite runs: one per command and exit code, and the hostile pickles.
#: Each case starts a process (about 0.45 s of imports on a 2-core machine), so the rest
#: run in the slow part of .ci/run, which runs every case.
FAST_CASES = {
    "export-unknown-scheme",
    "import-missing-file",
    "import-malformed-json",
    "import-pickle-calling-os-system",
    "export-json-of-bytes",
    "unknown-command",
    "verify-altered-dump",
}
assert {case.id for case in CASES} >= FAST_CASES, "FAST_CASES names a case that does not exist"


def _marks(case: Case) -> list[pytest.MarkDecorator]:
    marks = [] if case.id in FAST_CASES else [pytest.mark.slow]
    if case.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
    return marks


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_marks(c)) for c in CASES])
def test_bad_input_gets_one_clear_line_and_changes_nothing(world: World, case: Case) -> None:
    before = _fingerprint(world)
    try:
        code, stdout, stderr = _run(world, case.argv(world))
        assert not world.marker.exists(), "code from a hostile pickle ran"
        assert code == case.code, f"exit {code}, expected {case.code}; stderr:\n{stderr}"
        line = _error_line(stderr)
        assert re.search(case.message, line), f"{line!r} does not match {case.message!r}"
        assert stdout == ""
        assert _fingerprint(world) == before, "the store or an earlier export changed"
    finally:
        world.marker.unlink(missing_ok=True)
        for leftover in ("out.pickle", "out.json", "out.zexp"):
            (world.root / leftover).unlink(missing_ok=True)


def test_a_password_in_the_uri_never_reaches_the_output(world: World) -> None:
    """An unreachable PostgreSQL server: exit 4, the password masked everywhere."""
    uri = "postgresql://app:s3cret-pw@127.0.0.1:1/app?connect_timeout=1"
    code, stdout, stderr = _run(world, ["export", "--db", uri, "-o", OUT])
    assert code == 4
    assert "s3cret-pw" not in stdout + stderr
    assert "snaptree: error: cannot open postgresql://app:***@127.0.0.1:1/app" in stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "uri",
    [
        "postgresql://app:se#cret9@127.0.0.1:1/app",
        "postgresql://app:se/cret9@127.0.0.1:1/app",
        "postgresql://app:se?cret9@127.0.0.1:1/app",
        "zeo://app:se#cret9@127.0.0.1:1?wait_timeout=1",
    ],
    ids=["hash", "slash", "question-mark", "zeo-hash"],
)
def test_a_password_with_a_reserved_character_never_reaches_the_output(
    world: World, uri: str
) -> None:
    """An unencoded #, / or ?: exit 2, one line, no piece of the password."""
    code, stdout, stderr = _run(world, ["export", "--db", uri, "-o", OUT])
    assert code == 2, stderr
    line = _error_line(stderr)
    assert "se#cret9" not in stdout + stderr and "cret9" not in stdout + stderr
    assert re.match(r"snaptree: error: cannot open (postgresql|zeo)://\*\*\*@127\.0\.0\.1:1", line)


@pytest.mark.slow
def test_a_json_export_of_a_deep_tree_import_accepted_is_not_a_traceback(
    tmp_path: Path,
) -> None:
    """Nesting 600 deep: Python's json parser takes it, and import stores it.

    (Found by this test: the JSON writer recursed two frames a level and died
    with a RecursionError traceback.)
    """
    db = tmp_path / "deep.fs"
    deep: Any = 1
    for _ in range(600):
        deep = {"a": deep}
    source = tmp_path / "deep.json"
    source.write_text(json.dumps(deep))
    result = run_snaptree("import", source, "--db", db)
    assert result.returncode == 0, result.stderr
    for fmt in ("pickle", "zodb"):
        result = run_snaptree("export", "--db", db, "-o", tmp_path / f"d.{fmt}", "--format", fmt)
        assert result.returncode == 0, result.stderr
    out = tmp_path / "d.json"
    result = run_snaptree("export", "--db", db, "-o", out, "--format", "json")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    if result.returncode == 0:
        assert json.loads(out.read_text()) == deep
    else:  # a clear refusal would do as well
        assert result.returncode == 5
        _error_line(result.stderr)
