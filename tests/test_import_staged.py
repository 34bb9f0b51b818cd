"""Imports in bounded memory: JSON read as a stream, batches staged where no reader looks.

A large import commits its nodes in batches into a staging area outside the
tree and links them with one last commit. These tests pin down what that
must not change (the result is what ``json.load`` and an in-memory import
give; readers see all or nothing; two imports at once both work) and what
it adds (a crash leaves nothing in the tree, and the next import removes
what it left).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import snaptree
from _strategies import json_trees
from snaptree import _json_events, _staging
from snaptree._compression import zstd
from snaptree.imports import staged_imports
from snaptree.tree import List, Mapping

WAIT = 60  # seconds any handshake may take before the test fails


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not True, 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


# -- the same result as json.load -----------------------------------------------


@settings(max_examples=30)
@given(tree=json_trees, indent=st.sampled_from([None, 1]), ascii_only=st.booleans())
def test_a_streamed_json_file_imports_what_json_load_gives(
    tree: Any, indent: int | None, ascii_only: bool
) -> None:
    """Streaming the file and importing json.load's result give the same tree, types included."""
    text = json.dumps(tree, indent=indent, ensure_ascii=ascii_only)
    with tempfile.TemporaryDirectory() as tmp, snaptree.open("memory://") as store:
        source = write(Path(tmp) / "tree.json", text)
        streamed = store.import_tree(source, path="streamed", commit_every=2)
        loaded = store.import_tree(json.loads(text), path="loaded", commit_every=2)
        assert streamed.objects == loaded.objects
        plain = store.run(lambda root: root)
        assert same(plain["streamed"], json.loads(text))
        assert same(plain["streamed"], plain["loaded"])


def test_numbers_come_out_as_json_load_makes_them(tmp_path: Path) -> None:
    """Integers of any size stay exact; other numbers become the float json.loads gives."""
    text = "[12345678901234567890123, -9223372036854775809, 1.5, 1e400, -0.0, 0.1, 1E2, 7]"
    with snaptree.open("memory://") as store:
        store.import_tree(write(tmp_path / "n.json", text), path="n")
        assert same(store.run(lambda root: root["n"]), json.loads(text))


def test_a_wide_object_is_built_in_place_and_keeps_every_key(tmp_path: Path) -> None:
    """An object of thousands of keys, in any order, repeated keys included, as json.load says."""
    pairs = [(f"k{(i * 7919) % 2500:05}", {"n": i}) for i in range(2500)]
    pairs += [("k00003", "last wins"), ("zz", [1, 2])]
    text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"
    source = write(tmp_path / "wide.json", '{"wide": ' + text + "}")
    with snaptree.open("memory://") as store:
        result = store.import_tree(source, path="w", commit_every=150)
        assert result.batches > 10
        with store.snapshot() as snap:
            assert type(snap.root["w"]["wide"]) is Mapping
        assert store.run(lambda root: root["w"]) == json.loads(source.read_text())


def test_a_wide_dict_in_memory_is_built_in_place_too(store: snaptree.Store) -> None:
    """A dict of int keys wider than a batch: its Mapping fills as the batches go, same content."""
    data = {"big": {i: [i, {"sq": i * i}] for i in range(2000, 0, -1)}, "after": 1}
    result = store.import_tree(data, path="d", commit_every=300)
    assert result.batches > 10
    assert store.run(lambda root: root["d"]) == data
    with store.snapshot() as snap:
        assert type(snap.root["d"]["big"]) is Mapping
        assert type(snap.root["d"]["big"][17]) is List


def test_a_json_object_imported_at_the_root_merges_its_keys(store: snaptree.Store) -> None:
    store.run(lambda root: root.__setitem__("kept", 1))
    source = write(
        Path(tempfile.mkdtemp()) / "m.json", json.dumps({"a": {"x": 1}, "b": [1, {"y": 2}]})
    )
    result = store.import_tree(source, commit_every=1)
    assert sorted(result.keys) == ["a", "b"]
    assert result.objects == 3
    assert store.run(lambda root: root) == {"kept": 1, "a": {"x": 1}, "b": [1, {"y": 2}]}


def test_a_zstd_compressed_json_file_is_read_as_a_stream(tmp_path: Path) -> None:
    data = {"accounts": {f"a{i}": {"balance": i} for i in range(300)}}
    source = tmp_path / "model.json.zst"
    source.write_bytes(zstd.compress(json.dumps(data).encode()))
    with snaptree.open("memory://") as store:
        store.import_tree(source, path="m", commit_every=50)
        assert store.run(lambda root: root["m"]) == data
    assert snaptree.load_source(source) == data


def test_a_pickle_given_as_a_path_is_loaded_then_imported(tmp_path: Path) -> None:
    source = tmp_path / "model.pickle"
    source.write_bytes(pickle.dumps({"a": [1, {"b": 2}]}))
    with snaptree.open("memory://") as store:
        store.import_tree(source, path="p")
        assert store.run(lambda root: root["p"]) == {"a": [1, {"b": 2}]}


def test_format_and_allow_are_for_files_not_for_data(store: snaptree.Store) -> None:
    """A str is data, never a file name: format= with it is a mistake, said as one."""
    with pytest.raises(snaptree.ArgumentError, match=r"pathlib\.Path"):
        store.import_tree("model.json", path="x", format="json")


# -- what the stream parser refuses, and where --------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{\n  "a": 1,\n  "b": [1, 2,, 3]\n}\n', r"malformed JSON at line 3, column 14"),
        ('{"fine": 1,\n "broken": [1 2]}', r"malformed JSON at line 2, column 15"),
        ('{"a": [1, 2', r"malformed JSON at line 1, column 12: premature EOF"),
        ("", r"line 1, column 1: the file holds no JSON value"),
        ("[1] [2]", r"line 1, column 5: trailing garbage"),
        (b'["caf\xe9"]', r"not UTF-8 text \(byte 5: invalid continuation byte\).*column 6"),
        ("[" * 1001 + "]" * 1001, r"nested too deeply \(more than 1,000 .* line 1, column 1001"),
        ('{"a": 1}'.encode("utf-16"), r"not UTF-8 text \(byte 0: .* it looks like UTF-16"),
        ("[" + "7" * 5000 + "]", r"an integer of more than \d+ digits at line 1, column 2"),
    ],
    ids=[
        "double-comma",
        "missing-comma",
        "truncated",
        "empty",
        "trailing",
        "latin-1",
        "utf-16",
        "long-int",
        "too-deep",
    ],
)
def test_bad_json_is_refused_with_its_line_and_column(
    store: snaptree.Store, tmp_path: Path, content: str | bytes, message: str
) -> None:
    """Every refusal names the file and the place; nothing reaches the tree."""
    source = write(tmp_path / "bad.json", content)
    before = store.run(lambda root: root)
    with pytest.raises(snaptree.InputError, match=message) as info:
        store.import_tree(source, path="x")
    assert str(source) in str(info.value)
    assert store.run(lambda root: root) == before


@pytest.mark.parametrize(
    "text",
    ['[1, NaN, {"i": -Infinity}]', '["ok", "\\ud800"]', '{"\\udc00": 1}', '["\\ud800\\ud800"]'],
    ids=["nan", "lone-high", "lone-low", "two-highs"],
)
def test_what_only_pythons_parser_reads_is_imported_as_it_reads_it(
    store: snaptree.Store, tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    """NaN, infinities, lone surrogates: the stream parser cannot keep them, json.load can.

    ``snaptree import`` read them before it streamed; it still does, reading
    that file whole, and says so in the log.
    """
    source = write(tmp_path / "odd.json", text)
    store.import_tree(source, path="x", commit_every=1)
    assert same(store.run(lambda root: root["x"]), json.loads(text))
    assert "reading the whole file with Python's json" in caplog.text
    assert staged_imports(store) == []


def test_nesting_json_load_reads_imports(store: snaptree.Store, tmp_path: Path) -> None:
    """990 levels (json.load's limit is 995): past the recursion limit, built without recursion."""
    source = write(tmp_path / "deep.json", "[" * 990 + "]" * 990)
    store.import_tree(source, path="deep", commit_every=100)

    def depth(root: Any) -> int:
        node, levels = root["deep"], 0
        while isinstance(node, List):
            levels += 1
            node = node[0] if len(node) else None
        return levels

    assert store.run(depth) == 990


def test_escaped_backslashes_before_u_are_text_not_surrogates(store: snaptree.Store) -> None:
    text = json.dumps(["\\ud800", "\\\\udc00", "\U0001f600"])  # ensure_ascii escapes the emoji
    source = write(Path(tempfile.mkdtemp()) / "s.json", text)
    store.import_tree(source, path="s")
    assert store.run(lambda root: root["s"]) == json.loads(text)


@pytest.mark.parametrize("shift", range(-13, 2))
def test_a_surrogate_pair_split_between_blocks_is_seen_whole(tmp_path: Path, shift: int) -> None:
    """A pair cut by a block boundary is kept; a lone half near it is still found."""
    pad = "x" * (_json_events.BLOCK + shift)
    good = write(tmp_path / "good.json", f'["{pad}\\ud83d\\ude00", "\\\\\\\\ud800"]')
    lone = write(tmp_path / "lone.json", f'["{pad}\\ud83d", 1]')
    with snaptree.open("memory://") as store:
        store.import_tree(good, path="g")
        assert store.run(lambda root: root["g"]) == [pad + "\U0001f600", "\\\\ud800"]
        store.import_tree(lone, path="l")  # found, so read whole by Python's parser
        assert store.run(lambda root: root["l"]) == [pad + "\ud83d", 1]


@pytest.mark.parametrize(
    "text",
    [
        '["\\udc00"]',  # a lone low half in a file shorter than the check's margin
        '{"k": "\\udfff"}',
        '{"a": 1e9999999999999999999, "b": 1e-9999999999999999999}',  # exponents past Decimal
    ],
    ids=["short-low-half", "short-low-half-in-object", "huge-exponents"],
)
def test_what_yajl_refuses_but_python_reads_is_read_by_python(tmp_path: Path, text: str) -> None:
    """Valid JSON the stream parser cannot take falls back to Python's parser, never an error."""
    source = write(tmp_path / "s.json", text)
    with snaptree.open("memory://") as store:
        store.import_tree(source, path="s")
        assert store.run(lambda root: root["s"]) == json.loads(text)


def test_a_json_value_that_is_not_an_object_cannot_go_to_the_root(tmp_path: Path) -> None:
    source = write(tmp_path / "list.json", "[1, 2]")
    with (
        snaptree.open("memory://") as store,
        pytest.raises(snaptree.UnstorableValueError, match=r"^/: .*list\.json holds an array"),
    ):
        store.import_tree(source)


def test_max_objects_caps_a_json_import(tmp_path: Path) -> None:
    source = write(tmp_path / "m.json", json.dumps([{"n": i} for i in range(100)]))
    with snaptree.open("memory://") as store:
        with pytest.raises(snaptree.InputError, match="more than 50 objects"):
            store.import_tree(source, path="m", max_objects=50, commit_every=10)
        assert staged_imports(store) == []
        assert store.import_tree(source, path="m", max_objects=101).objects == 101


# -- atomicity: the tree before, or the tree after ------------------------------------


def test_a_json_error_after_many_batches_leaves_the_tree_and_no_staging(
    store: snaptree.Store, tmp_path: Path
) -> None:
    body = ", ".join(f'"k{i:04}": {{"n": [{i}]}}' for i in range(2000))
    source = write(tmp_path / "late.json", "{" + body + ', "bad": [1,,2]}')
    before = store.run(lambda root: root)
    with pytest.raises(snaptree.InputError, match="malformed JSON"):
        store.import_tree(source, path="late", commit_every=100)
    assert store.run(lambda root: root) == before
    assert staged_imports(store) == []


class _Pause(dict):
    """A dict whose conversion stops, the second time its values are read, until released.

    The import reads the data once to count it, then once to convert it: the
    pause comes after every batch made before this dict was reached.
    """

    def __init__(self, data: dict) -> None:
        super().__init__(data)
        self.reached = threading.Event()
        self.release = threading.Event()
        self._reads = 0

    def values(self) -> Any:
        self._reads += 1
        if self._reads == 2:
            self.reached.set()
            assert self.release.wait(WAIT)
        return super().values()


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_reader_never_sees_part_of_an_import(store: snaptree.Store) -> None:
    """While batches are committed, snapshots show the tree as before; after, all of it."""
    store.run(lambda root: root.__setitem__("other", {"x": 1}))
    before = store.run(lambda root: root)
    pause = _Pause({"last": 1})
    data = {f"k{i:04}": {"n": [i]} for i in range(500)} | {"zzzz": pause}
    importer, outcome = _in_thread(lambda: store.import_tree(data, path="big", commit_every=40))
    try:
        assert pause.reached.wait(WAIT)
        (entry,) = staged_imports(store)
        assert entry.batches >= 20 and not entry.abandoned
        reader, seen = _in_thread(lambda: store.run(lambda root: root))
        reader.join(WAIT)
        assert seen == [before]
    finally:
        pause.release.set()
        importer.join(WAIT)
    assert isinstance(outcome[0], snaptree.imports.ImportResult), outcome
    assert store.run(lambda root: root["big"]) == data
    assert staged_imports(store) == []


def test_two_imports_at_once_both_land(store: snaptree.Store) -> None:
    """Two imports staging at the same time, into one mapping: neither disturbs the other.

    The second runs from start to end while the first is paused between
    batches: its cleanup of abandoned entries must leave the live one alone.
    """
    pause = _Pause({"last": 1})
    first = {f"a{i:04}": {"n": [i]} for i in range(300)} | {"zzzz": pause}
    second = {f"b{i:04}": {"n": [i]} for i in range(300)}
    importer, outcome = _in_thread(lambda: store.import_tree(first, path="m/one", commit_every=30))
    try:
        assert pause.reached.wait(WAIT)
        result = store.import_tree(second, path="m/two", commit_every=30)
        assert result.batches > 5
        assert [entry.abandoned for entry in staged_imports(store)] == [False]
    finally:
        pause.release.set()
        importer.join(WAIT)
    assert isinstance(outcome[0], snaptree.imports.ImportResult), outcome
    assert store.run(lambda root: root["m"]) == {"one": first, "two": second}


def test_two_imports_of_one_key_at_once_one_wins_one_reports_it(store: snaptree.Store) -> None:
    pause = _Pause({"last": 1})
    first = {f"a{i:04}": {"n": [i]} for i in range(300)} | {"zzzz": pause}
    second = {"b": {"n": 2}}
    importer, outcome = _in_thread(lambda: store.import_tree(first, path="key", commit_every=30))
    try:
        assert pause.reached.wait(WAIT)
        store.import_tree(second, path="key")
    finally:
        pause.release.set()
        importer.join(WAIT)
    assert isinstance(outcome[0], snaptree.Error) and "key: already exists" in str(outcome[0])
    assert store.run(lambda root: root["key"]) == second
    assert staged_imports(store) == []


# -- crashes: nothing in the tree, and the next import removes what was left -----------

_CRASHING_IMPORT = textwrap.dedent(
    """
    import os, signal, sys
    import snaptree

    class Stop(dict):
        reads = 0
        def values(self):
            Stop.reads += 1
            if Stop.reads == 2:  # converting it: every batch before it is committed
                print("ready", flush=True)
                sys.stdin.read()  # the parent kills us here
            return super().values()

    db, before, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data = {f"k{i:05}": {"n": [i]} for i in range(size)}
    data[f"k{before:05}x"] = Stop({"n": 1})
    with snaptree.open(db) as store:
        store.import_tree(data, path="crashed", commit_every=40)
    """
)


_CRASHING_JSON_IMPORT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import snaptree
    from snaptree import _staging

    db, source, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    committed = _staging.Staging.batch_committed

    def batch_committed(self):
        committed(self)
        if self.batches == after:  # that many batches of the stream are in the database
            print("ready", flush=True)
            sys.stdin.read()  # the parent kills us here

    _staging.Staging.batch_committed = batch_committed
    with snaptree.open(db) as store:
        store.import_tree(Path(source), path="crashed", commit_every=40)
    """
)


def _kill_at_ready(*argv: str) -> None:
    """Run a child Python with *argv*, SIGKILL it once it prints "ready" (a forced point)."""
    child = subprocess.Popen(
        [sys.executable, "-c", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(child.stdout.readline()))
        reader.start()
        reader.join(WAIT)
        assert ready == ["ready\n"], f"the child did not reach the kill point: {ready}"
    finally:
        child.kill()
        child.wait(WAIT)


def _crash_and_recover(tmp_path: Path, before: int, size: int, streamed: bool = False) -> None:
    """Kill an import after its batches up to key number *before*, then check and clean up."""
    db = str(tmp_path / "Data.fs")
    with snaptree.open(db) as store:
        store.import_tree({"kept": {"x": [1, 2]}})
    if streamed:
        data = {f"k{i:05}": {"n": [i]} for i in range(size)}
        source = write(tmp_path / "data.json", json.dumps(data, indent=1))
        _kill_at_ready(_CRASHING_JSON_IMPORT, db, str(source), str(before * 2 // 40))
    else:
        _kill_at_ready(_CRASHING_IMPORT, db, str(before), str(size))
    with snaptree.open(db) as store:
        assert store.run(lambda root: root) == {"kept": {"x": [1, 2]}}
        (left,) = staged_imports(store)
        assert left.abandoned and left.batches > 0
        store.import_tree({"new": 1}, path="after")  # any import removes what was left
        assert staged_imports(store) == []
        assert store.run(lambda root: root) == {"kept": {"x": [1, 2]}, "after": {"new": 1}}
        size_before_pack = os.path.getsize(db)
        store.db.pack()
        assert os.path.getsize(db) < size_before_pack  # the batches were garbage


@pytest.mark.parametrize("streamed", [False, True], ids=["data", "json-file"])
def test_a_killed_import_leaves_the_tree_as_before_and_the_next_import_cleans_up(
    tmp_path: Path, streamed: bool
) -> None:
    """SIGKILL between two batch commits: the tree as before; the next import cleans up."""
    _crash_and_recover(tmp_path, before=150, size=300, streamed=streamed)


@pytest.mark.slow
def test_an_import_killed_at_random_points_never_shows_in_the_tree(
    tmp_path: Path, seed: int
) -> None:
    """Killed between any two batches (forced by a handshake), at several random points."""
    import random

    rng = random.Random(seed)
    for point in sorted(rng.sample(range(20, 2000), 6)):
        for streamed in (False, True):
            directory = tmp_path / f"{point}-{streamed}"
            directory.mkdir()
            _crash_and_recover(directory, before=point, size=2000, streamed=streamed)


def test_a_live_import_on_this_machine_is_never_taken_for_abandoned() -> None:
    now = time.time()
    mine = {"owner": _staging._this_process(), "heartbeat": now - 10 * _staging.STALE_AFTER}
    assert not _staging.is_abandoned(mine, now)


def test_an_import_whose_process_is_gone_is_abandoned_whatever_its_age() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(WAIT)
    owner = _staging._this_process() | {"pid": child.pid}
    assert _staging.is_abandoned({"owner": owner, "heartbeat": time.time()}, time.time())


def test_another_machines_import_is_abandoned_only_when_its_heartbeat_is_stale() -> None:
    now = time.time()
    owner = {"host": "elsewhere.example", "boot": "x", "pid": os.getpid(), "process": "1"}
    assert not _staging.is_abandoned({"owner": owner, "heartbeat": now - 60}, now)
    stale = now - _staging.STALE_AFTER - 1
    assert _staging.is_abandoned({"owner": owner, "heartbeat": stale}, now)


# -- memory -------------------------------------------------------------------------

_PEAK_OF_IMPORT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import snaptree

    db, source, how, cap = sys.argv[1:5]
    if int(cap):  # a hard cap on the address space: past it, MemoryError
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (int(cap) * 2**20, int(cap) * 2**20))
    with snaptree.open(db) as store:
        data = Path(source) if how == "stream" else snaptree.load_source(source)
        store.import_tree(data, path="big")
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print(int(line.split()[1]) // 1024)
    """
)


def _start_import(tmp_path: Path, source: Path, how: str, cap_mib: int = 0) -> subprocess.Popen:
    """Start an import of *source* in a process of its own; _peak_of tells its peak RSS."""
    db = tmp_path / f"{how}.fs"
    return subprocess.Popen(
        [sys.executable, "-c", _PEAK_OF_IMPORT, str(db), str(source), how, str(cap_mib)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _peak_of(process: subprocess.Popen) -> int:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    return int(stdout.split()[-1])


#: Peak RSS allowed to a streamed import, in MiB, whatever its size. Measured on
#: 2026-11-30 (CPython 3.11, ZODB 6.4, FileStorage): 300k objects streamed peak
#: at 57 MiB (1M at 62 MiB, 10M: see docs/benchmarks.md); the same file through
#: load_source (json.load, then the same bounded import) at 122 MiB.
STREAMED_PEAK_CAP_MIB = 90
#: Address space (RLIMIT_AS) the streamed import runs under: a hard cap, past
#: which it would fail with MemoryError. Its VmPeak was 167 MiB at 100k objects.
STREAMED_ADDRESS_SPACE_MIB = 400


@pytest.mark.slow
def test_a_streamed_json_import_stays_under_a_fixed_memory_cap(tmp_path: Path) -> None:
    """300k objects streamed, under a hard address-space cap, stay under the RSS cap.

    Loading the same file whole (json.load first) does not: the cap means something.
    """
    source = tmp_path / "big.json"
    with open(source, "w") as file:
        file.write("{")
        for i in range(60_000):
            account = {"owner": f"c{i}", "balance": i, "entries": [{"n": j} for j in range(3)]}
            file.write(f'{"," if i else ""}"a{i:06}": {json.dumps(account)}\n')
        file.write("}")
    # At once, each in its own process: a peak RSS is the process's own.
    streaming = _start_import(tmp_path, source, "stream", cap_mib=STREAMED_ADDRESS_SPACE_MIB)
    loading = _start_import(tmp_path, source, "whole")
    streamed, whole = _peak_of(streaming), _peak_of(loading)
    assert streamed < STREAMED_PEAK_CAP_MIB, (streamed, whole)
    assert whole > STREAMED_PEAK_CAP_MIB, (streamed, whole)  # the cap means something
