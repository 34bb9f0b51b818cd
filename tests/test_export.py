"""Exports: one committed snapshot per dump, in every format, written atomically with a manifest."""

from __future__ import annotations

import datetime
import enum
import errno
import json
import os
import pickle
import subprocess
import sys
import threading
from typing import Any

import pytest
import transaction
from persistent import Persistent
from ZODB import DB
from ZODB.MappingStorage import MappingStorage

import snaptree
from _cli import error_line
from _cli import snaptree as run_snaptree
from _threads import run_threads
from snaptree import _atomic, _plain_nodes, export_run, exports
from snaptree.errors import ArgumentError, ExportError, UnstorableValueError

ACCOUNTS = 50
BALANCE = 100
WAIT = 30.0


def _fill(store: snaptree.Store) -> None:
    def fill(root):
        root["accounts"] = {f"a{i:03}": {"balance": BALANCE} for i in range(ACCOUNTS)}
        root["meta"] = {"name": "bank", "tags": ["x", "y"], "n": snaptree.Counter()}

    store.run(fill)


def _total(tree: dict) -> int:
    return sum(account["balance"] for account in tree["accounts"].values())


def _load(info: snaptree.ExportInfo):
    if info.format == "pickle":
        with open(info.path, "rb") as f:
            return pickle.load(f)
    if info.format == "json":
        return json.loads(info.path.read_text())
    db = DB(MappingStorage())
    tm = transaction.TransactionManager(explicit=True)
    conn = db.open(transaction_manager=tm)
    tm.begin()
    obj = conn.importFile(str(info.path))
    tm.commit()
    tm.begin()
    plain = snaptree.to_plain(obj)
    tm.abort()
    conn.close()
    db.close()
    return plain


@pytest.mark.parametrize("fmt", ["pickle", "json", "zodb"])
def test_export_writes_the_tree_and_a_manifest(store, tmp_path, fmt):
    """Each format holds the whole tree; the manifest says what, when, how big and its sha256."""
    _fill(store)
    info = store.export(tmp_path / f"dump.{fmt}", format=fmt)
    assert info.path == tmp_path / f"dump.{fmt}"
    assert info.format == fmt and info.tid == store.last_tid()
    assert info.committed_at.tzinfo is not None
    assert info.bytes == info.path.stat().st_size and info.objects > ACCOUNTS
    tree = _load(info)
    assert _total(tree) == ACCOUNTS * BALANCE
    assert tree["meta"]["tags"] == ["x", "y"] and tree["meta"]["n"] == 0
    manifest = json.loads(info.manifest_path.read_text())
    assert manifest["format"] == fmt and manifest["sha256"] == info.sha256
    assert manifest["tid"] == info.tid and manifest["bytes"] == info.bytes
    assert manifest["objects"] == info.objects and manifest["snaptree_version"]
    assert manifest["source"] == store.source
    assert datetime.datetime.fromisoformat(manifest["committed_at"]) == info.committed_at


def test_pickle_dump_loads_without_snaptree_or_zodb(store, tmp_path):
    """A plain tree's pickle references only builtins: a bare interpreter loads it."""
    _fill(store)
    info = store.export(tmp_path / "dump.pickle")
    code = (
        "import sys, pickle\n"
        "sys.modules['snaptree'] = sys.modules['ZODB'] = sys.modules['persistent'] = None\n"
        "sys.modules['BTrees'] = None\n"
        f"tree = pickle.load(open({str(info.path)!r}, 'rb'))\n"
        "assert type(tree) is dict and type(tree['accounts']['a001']) is dict\n"
        "print(sum(a['balance'] for a in tree['accounts'].values()))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ACCOUNTS * BALANCE)


class Gate(Persistent):
    """A user model object that, while being pickled, lets the test commit a transfer."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getstate__(self):
        hook = GATE_HOOKS.get(self.name)
        if hook is not None:
            hook()
        return super().__getstate__()


GATE_HOOKS: dict = {}


def test_export_never_sees_half_a_transfer(store, tmp_path):
    """A transfer committed while the dump is half written is absent from the whole dump."""
    _fill(store)
    store.run(lambda root: root["accounts"].__setitem__("a025_gate", Gate("g")))
    reached, resume = threading.Event(), threading.Event()

    def pause_export():
        reached.set()
        assert resume.wait(WAIT)

    GATE_HOOKS["g"] = pause_export

    def transfer(root):
        root["accounts"]["a000"]["balance"] -= 30  # before the gate in key order
        root["accounts"]["a049"]["balance"] += 30  # after it

    def writer():
        assert reached.wait(WAIT)
        store.run(transfer)
        resume.set()

    try:
        info, _ = run_threads([lambda: store.export(tmp_path / "d.pickle"), writer])
    finally:
        GATE_HOOKS.clear()
    tree = _load(info)
    assert tree["accounts"]["a000"]["balance"] == BALANCE
    assert tree["accounts"]["a049"]["balance"] == BALANCE
    assert info.tid != store.last_tid()


@pytest.mark.parametrize("fmt", ["pickle", "json", "zodb"])
def test_exports_taken_while_writers_transfer_keep_the_total(store, tmp_path, fmt):
    """Writers never wait for exports, and every dump taken meanwhile holds the invariant."""
    _fill(store)
    stop = threading.Event()
    first_commit = threading.Event()
    transfers = [0, 0]

    def writer(n: int):
        def transfer(root):
            accounts = root["accounts"]
            src, dst = f"a{(n * 7 + transfers[n]) % ACCOUNTS:03}", f"a{transfers[n] % ACCOUNTS:03}"
            accounts[src]["balance"] -= 1
            accounts[dst]["balance"] += 1

        def loop():
            while not stop.is_set() and transfers[n] < 5000:
                store.run(transfer)
                transfers[n] += 1
                first_commit.set()

        return loop

    def exporter():
        try:
            assert first_commit.wait(WAIT)
            return [store.export(tmp_path / f"d{i}.{fmt}", format=fmt) for i in range(5)]
        finally:
            stop.set()

    _, _, infos = run_threads([writer(0), writer(1), exporter])
    assert sum(transfers) > 0
    for info in infos:
        assert _total(_load(info)) == ACCOUNTS * BALANCE
        assert snaptree.verify(info.path).sha256 == info.sha256


def test_subtree_export(store, tmp_path):
    """--subtree exports one branch; integer keys and list indexes work in the path."""
    store.run(lambda root: root.__setitem__("by_id", {7: {"tags": ["a", "b"]}}))
    info = store.export(tmp_path / "s.json", format="json", subtree="/by_id/7/tags")
    assert json.loads(info.path.read_text()) == ["a", "b"]
    assert info.subtree == "/by_id/7/tags"
    info = store.export(tmp_path / "s.zexp", format="zodb", subtree="by_id/7")
    assert _load(info) == {"tags": ["a", "b"]}
    with pytest.raises(ArgumentError, match="by_id: there is no key 'nope'"):
        store.export(tmp_path / "x.pickle", subtree="/by_id/nope")
    with pytest.raises(ArgumentError, match="the subtree '' is empty"):
        store.export(tmp_path / "x.pickle", subtree="")
    with pytest.raises(ExportError, match="persistent object"):
        store.export(tmp_path / "x.zexp", format="zodb", subtree="/by_id/7/tags/0")


def test_json_names_the_path_of_a_value_it_cannot_hold(store, tmp_path):
    """A value JSON cannot represent is an error naming where it is; nothing is written."""
    store.run(lambda root: root.__setitem__("people", {"ann": {"born": datetime.date(1990, 1, 2)}}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnstorableValueError) as caught:
        store.export(out / "x.json", format="json")
    assert caught.value.path == "/people/ann/born"
    assert list(out.iterdir()) == []
    store.run(lambda root: root["people"]["ann"].__setitem__("born", float("nan")))
    with pytest.raises(UnstorableValueError, match="/people/ann/born"):
        store.export(tmp_path / "x.json", format="json")


class Color(str, enum.Enum):  # noqa: UP042 - the mixed-in kind, whose str() is not its value
    RED = "red"


class Size(int, enum.Enum):
    LARGE = 3


def test_json_writes_enum_keys_by_their_value_as_json_dumps_does(store, tmp_path):
    """An Enum mixed with str or int is a key JSON can hold: its value, not its str()
    ("Color.RED"), which came back from the dump as a different key."""
    tree = {"by_color": {Color.RED: 1}, "by_size": {Size.LARGE: 2}, "flat": {Color.RED: 1, 5: 2}}
    store.run(lambda root: root.update(tree))
    info = store.export(tmp_path / "x.json", format="json")
    assert json.loads(info.path.read_text()) == json.loads(json.dumps(tree))


def test_json_refuses_two_keys_it_would_write_as_one(store, tmp_path):
    """{1: .., "1": ..} would be written with the key "1" twice, and loaded as one value."""
    store.run(lambda root: root.__setitem__("both", {1: "int", "1": "str"}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnstorableValueError, match=r"^/both/'1': .* is written as \"1\""):
        store.export(out / "x.json", format="json")
    assert list(out.iterdir()) == []


def test_historical_export(tmp_path):
    """--at a tid or a time exports the tree as it was then."""
    store = snaptree.open(str(tmp_path / "Data.fs"))
    try:
        store.run(lambda root: root.__setitem__("v", 1))
        then = store.last_tid()
        store.run(lambda root: root.__setitem__("v", 2))
        info = store.export(tmp_path / "old.pickle", at=then)
        assert _load(info)["v"] == 1
        info = store.export(tmp_path / "now.pickle")
        assert _load(info)["v"] == 2
    finally:
        store.close()


def test_an_unknown_format_is_a_bad_argument(store, tmp_path):
    with pytest.raises(ArgumentError, match="unknown format 'xml'"):
        store.export(tmp_path / "x.xml", format="xml")


def test_disk_full_leaves_the_previous_dump_and_no_temporary(store, tmp_path, monkeypatch):
    """ENOSPC in the middle of a write: a clear error, the old dump intact, no temp file left."""
    _fill(store)
    out = tmp_path / "out"
    out.mkdir()
    first = store.export(out / "dump.pickle")
    before = first.path.read_bytes()
    store.run(lambda root: root["accounts"]["a001"].__setitem__("balance", 7))

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_atomic.HashingWriter, "write", full)
    with pytest.raises(ExportError, match=r"No space left on device.*ENOSPC"):
        store.export(out / "dump.pickle")
    monkeypatch.undo()
    assert first.path.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [
        "dump.pickle",
        "dump.pickle.manifest.json",
    ]
    assert snaptree.verify(first.path).tid == first.tid


def test_unwritable_directory_is_a_clear_error(store, tmp_path, monkeypatch):
    """A directory this user cannot write to: one line saying so and what to do; nothing left."""
    _fill(store)
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make creating files there fail as it would
        real_open = os.open

        def refuse(path, *args, **kwargs):
            if str(path).startswith(str(locked)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(_atomic.os, "open", refuse)
    locked.chmod(0o555)
    try:
        with pytest.raises(ExportError, match=r"cannot write .*Permission denied.*writable"):
            store.export(locked / "dump.pickle")
    finally:
        locked.chmod(0o755)
        monkeypatch.undo()
    assert list(locked.iterdir()) == []


def test_missing_directory_is_a_clear_error(store, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        store.export(tmp_path / "nowhere" / "dump.pickle")


def test_a_killed_export_leaves_no_file_under_the_final_name(tmp_path):
    """SIGKILL just before the rename: only a temporary remains, which the next run removes."""
    db = tmp_path / "Data.fs"
    store = snaptree.open(str(db))
    _fill(store)
    store.close()
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    code = (
        "import os, signal, snaptree\n"
        "from snaptree import _atomic\n"
        "_atomic.commit = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"s = snaptree.open({str(db)!r}, read_only=True)\n"
        f"snaptree.Exporter(s, {str(dumps)!r}, process=False).export_now()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    left = [p.name for p in dumps.iterdir() if not p.name.endswith(".lock")]  # the schedule's
    assert len(left) == 2 and all(n.startswith(".snaptree-") and n.endswith(".tmp") for n in left)
    store = snaptree.open(str(db), read_only=True)
    try:
        result = snaptree.Exporter(store, dumps, process=False).export_now()
    finally:
        store.close()
    names = sorted(p.name for p in dumps.iterdir() if not p.name.endswith(".lock"))
    assert names == sorted(
        [result.info.path.name, result.info.path.name + ".manifest.json", "latest.pickle"]
    )


@pytest.mark.parametrize("fragments", [False, True], ids=["one-off", "with fragments"])
def test_a_tree_of_many_frozensets_exports_as_pickle(store, tmp_path, fragments):
    """CPython's memo-less pickler raised KeyError past 50 frozensets (gh-146059): such a
    tree is written again with the pickler's memo, and loads equal."""
    tree = {
        "a": [frozenset({i, "x"}) for i in range(60)],  # first: a list left past the 50th
        "by_id": {f"k{i}": {"in": (frozenset({i}),)} for i in range(200)},
        "set": {frozenset({1}), (frozenset({2}),)},
    }
    store.run(lambda root: root.update(tree))
    caches = exports.FragmentCaches() if fragments else None
    for round_ in range(2):  # the second with the fragments of the first, if any
        info = store.export(tmp_path / f"f{round_}.pickle", fragments=caches)
        assert {k: v for k, v in _load(info).items() if k in tree} == tree


@pytest.mark.parametrize("fragments", [False, True], ids=["one-off", "with fragments"])
def test_a_frozenset_met_again_past_the_50th_is_no_cycle(store, tmp_path, fragments):
    """The same miscount (gh-146059) made the memo-less pickler report a reference cycle."""
    frozensets = [frozenset({i, "y"}) for i in range(60)]
    store.run(lambda root: root.update(again=[*frozensets, frozensets[55]]))
    caches = exports.FragmentCaches() if fragments else None
    info = store.export(tmp_path / "again.pickle", fragments=caches)
    assert _load(info)["again"] == [*frozensets, frozensets[55]]


class Linked(Persistent):
    """A user model object that may point back at another (a cycle)."""


@pytest.mark.parametrize("fragments", [False, True], ids=["one-off", "with fragments"])
def test_a_cycle_through_user_objects_is_written_as_pickle_writes_one(store, tmp_path, fragments):
    """The memo-less pickler cannot write a cycle: it is written again with the memo, as
    ``pickle.dump`` writes one (it was an error that pointed to the zodb format)."""

    def link(root):
        a, b = Linked(), Linked()
        a.other, b.other = b, a
        root["a"] = a

    store.run(link)
    caches = exports.FragmentCaches() if fragments else None
    info = store.export(tmp_path / "c.pickle", fragments=caches)
    a = snaptree.load_source(info.path, allow=[Linked])["a"]
    assert type(a) is Linked and a.other.other is a and a.other is not a
    dump = store.export(tmp_path / "c.zexp", format="zodb").path
    with pytest.raises(snaptree.VerifyError, match=r"refused global test_export\.Linked"):
        snaptree.verify(dump)  # a class of yours loads only when you name it
    assert snaptree.verify(dump, allow=[Linked]).summary["type"] == "dict"


@pytest.mark.parametrize("fragments", [False, True], ids=["one-off", "with fragments"])
def test_a_cycle_through_each_kind_of_node_loads_back_whole(store, tmp_path, fragments):
    """A list or flat mapping met again inside its own items, written with the memo, loaded
    back empty (its items were the argument of its reduction, pickled before the node was
    memoized): the dump verified, and the data was gone."""

    def make(root):
        root.update(
            lst=[Linked(), 1], flat={1: Linked(), "x": 2}, map={"k": Linked()}, set={Linked()}
        )

    def link(root):
        root["lst"][0].back = root["lst"]
        root["flat"][1].back = root["flat"]
        root["map"]["k"].back = root["map"]
        next(iter(root["set"])).back = root["set"]

    store.run(make)
    store.run(link)
    with store.snapshot() as snap:
        kinds = {key: type(node).__name__ for key, node in snap.root.items()}
    assert kinds == {"lst": "List", "flat": "FlatMapping", "map": "Mapping", "set": "Set"}
    caches = exports.FragmentCaches() if fragments else None
    info = store.export(tmp_path / "cycles.pickle", fragments=caches)
    tree = snaptree.load_source(info.path, allow=[Linked])
    assert len(tree["lst"]) == 2 and tree["lst"][0].back is tree["lst"] and tree["lst"][1] == 1
    assert tree["flat"][1].back is tree["flat"] and tree["flat"]["x"] == 2
    assert tree["map"]["k"].back is tree["map"]
    [member] = tree["set"]
    assert member.back is tree["set"]


# -- the format, from the name -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("d.json", "json"), ("d.pickle", "pickle"), ("d.PKL", "pickle"), ("d.zexp", "zodb")],
)
def test_the_format_comes_from_the_suffix(store, tmp_path, name, fmt):
    """``export("x.json")`` writes JSON: the name is not a lie about the content."""
    _fill(store)
    info = exports.export(store, tmp_path / name)
    assert info.format == fmt
    assert snaptree.verify(info.path).format == fmt
    assert snaptree.load_source(info.path, format=fmt)["meta"]["name"] == "bank"


def test_a_format_contradicting_the_suffix_is_refused(store, tmp_path):
    """A pickle in x.json would mislead every reader that trusts the name; nothing is written."""
    _fill(store)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArgumentError, match=r"the name says json, .* asked for is pickle"):
        exports.export(store, out / "x.json", format="pickle")
    assert list(out.iterdir()) == []


def test_an_unknown_suffix_needs_a_format(store, tmp_path):
    """``app.dump`` says nothing: name the format, or use a suffix that does."""
    _fill(store)
    with pytest.raises(ArgumentError, match=r"\.pickle \(or \.pkl\), \.json or \.zexp"):
        exports.export(store, tmp_path / "app.dump")
    assert exports.export(store, tmp_path / "app.dump", format="json").format == "json"


def test_an_open_file_is_refused_with_what_to_do(store, tmp_path):
    """export() needs a path (temporary file, rename, manifest): an open file is refused."""
    _fill(store)
    with (
        open(tmp_path / "f.pickle", "wb") as f,
        pytest.raises(ArgumentError, match=r"not to a BufferedWriter.*its \.name"),
    ):
        exports.export(store, f)
    assert (tmp_path / "f.pickle").read_bytes() == b""


# -- the store's own files ---------------------------------------------------------------


@pytest.fixture
def file_store(tmp_path):
    s = snaptree.open(str(tmp_path / "app.fs"))
    _fill(s)
    yield s
    s.close()


def _fingerprint(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.mark.parametrize(
    "target",
    ["app.fs", "app.fs.index", "app.fs.lock", "app.fs.tmp", "app.fs.old", "./sub/../app.fs"],
)
def test_an_export_never_replaces_the_stores_own_files(file_store, tmp_path, target, monkeypatch):
    """The data file or a companion, named however (relative too): ExportError, nothing written."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    before = _fingerprint(tmp_path)
    with pytest.raises(ExportError, match=r"one of the store's own files .*another name"):
        file_store.export(target, format="pickle")
    with pytest.raises(ExportError, match="one of the store's own files"):
        exports.export(file_store, target)  # before asking what format it is
    assert _fingerprint(tmp_path) == before
    assert file_store.run(lambda root: root["meta"]["name"]) == "bank"


def test_a_link_to_the_stores_file_is_refused(file_store, tmp_path):
    """By inode: a hard link, a symlink, a symlinked directory all lead to the data file."""
    os.link(tmp_path / "app.fs", tmp_path / "hard.pickle")
    (tmp_path / "soft.pickle").symlink_to(tmp_path / "app.fs")
    (tmp_path / "linked-dir").symlink_to(tmp_path)
    before = (tmp_path / "app.fs").read_bytes()
    for target in ("hard.pickle", "soft.pickle", "linked-dir/app.fs"):
        with pytest.raises(ExportError, match="one of the store's own files"):
            file_store.export(tmp_path / target, format="pickle")
    assert (tmp_path / "app.fs").read_bytes() == before


def test_another_filestorage_is_never_replaced(file_store, tmp_path):
    """A FileStorage that is not this store's (say, the one a ZEO server serves) is refused too."""
    other = tmp_path / "other.fs"
    snaptree.open(str(other)).close()
    before = other.read_bytes()
    with pytest.raises(ExportError, match="is a ZODB FileStorage"):
        file_store.export(other, format="pickle")
    memory = snaptree.open("memory://")
    try:
        _fill(memory)
        with pytest.raises(ExportError, match="is a ZODB FileStorage"):
            memory.export(tmp_path / "app.fs", format="pickle")
    finally:
        memory.close()
    assert other.read_bytes() == before


def test_the_blob_directory_is_refused(tmp_path):
    """Nothing is written into the store's blob directory."""
    uri = f"file://{tmp_path}/app.fs?blobstorage_dir={tmp_path}/blobs"
    with snaptree.open(uri) as store:
        _fill(store)
        with pytest.raises(ExportError, match="inside the store's blob directory"):
            store.export(tmp_path / "blobs" / "d.pickle")
        with pytest.raises(ExportError, match="one of the store's own files"):
            store.export(tmp_path / "app.fs", format="pickle")


@pytest.mark.slow
def test_the_command_refuses_to_overwrite_its_own_database(tmp_path):
    """``snaptree export --db app.fs -o app.fs``: one error line, exit 5, the file as it was."""
    db = tmp_path / "app.fs"
    with snaptree.open(str(db)) as store:
        _fill(store)
    before = db.read_bytes()
    for output in ("app.fs", "app.fs.index"):
        proc = run_snaptree(
            "export", "--db", "app.fs", "-o", output, "--format", "pickle", cwd=tmp_path
        )
        assert proc.returncode == 5, proc.stderr
        assert proc.stderr.strip() == error_line(proc)
        assert error_line(proc).startswith("snaptree: error: cannot write")
    assert db.read_bytes() == before
    with snaptree.open(str(db), read_only=True) as store:
        assert store.run(lambda root: root["meta"]["name"]) == "bank"


# -- permissions ---------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_a_dump_is_never_more_readable_than_the_store(tmp_path, umask_022, mode):
    """The data file's permission bits cap the dump's and the manifest's (-o and --dir alike)."""
    db = tmp_path / "app.fs"
    with snaptree.open(str(db)) as store:
        _fill(store)
    db.chmod(mode)
    (tmp_path / "dumps").mkdir()
    with snaptree.open(str(db), read_only=True) as store:
        single = store.export(tmp_path / "one.pickle")
        scheduled = export_run.export_into(store, tmp_path / "dumps", format="json").info
    for path in (single.path, single.manifest_path, scheduled.path, scheduled.manifest_path):
        assert path.stat().st_mode & 0o777 == mode, path


def test_a_dump_of_a_store_without_a_local_file_is_private(store, tmp_path, umask_022):
    """memory:// (and ZEO, PostgreSQL) have no file bits to copy: dumps are 0600."""
    _fill(store)
    if store.source != "memory://":
        (tmp_path / "Data.fs").chmod(0o600)
    info = store.export(tmp_path / "d.json")
    assert info.path.stat().st_mode & 0o777 == 0o600
    assert info.manifest_path.stat().st_mode & 0o777 == 0o600


def test_the_temporary_file_is_private_from_its_creation(store, tmp_path, umask_022, monkeypatch):
    """No window in which the half-written dump is world-readable: the mode is set at creation."""
    _fill(store)
    if store.source != "memory://":
        (tmp_path / "Data.fs").chmod(0o600)
    seen = []
    real_write = _atomic.HashingWriter.write

    def spy(self, data):
        seen.extend(
            p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir() if p.suffix == ".tmp"
        )
        return real_write(self, data)

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(_atomic.HashingWriter, "write", spy)
    store.export(tmp_path / "out" / "d.pickle")
    assert seen and set(seen) == {0o600}


# -- values JSON cannot hold ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a\ud800b", r"/bad/v: a string holding a lone surrogate"),
        (10**5000, r"/bad/v: an int of more than 4300 digits"),
        ([1, "\udfff"], r"/bad/v/1: a string holding a lone surrogate"),
    ],
    ids=["surrogate", "long-int", "surrogate-in-list"],
)
def test_a_json_export_of_an_unwritable_value_names_its_path(store, tmp_path, value, message):
    """UnstorableValueError with the path; nothing written; the pickle format takes them."""
    store.run(lambda root: root.__setitem__("bad", {"v": value, "w": 1}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnstorableValueError, match=message):
        store.export(out / "d.json", format="json")
    assert list(out.iterdir()) == []
    with open(store.export(out / "d.pickle", format="pickle").path, "rb") as f:
        assert pickle.load(f)["bad"]["v"] == value


def test_unwritable_keys_and_counters_are_named_too(store, tmp_path):
    """A surrogate key, a long-int key, a counter past the digit limit: paths, not tracebacks."""
    store.run(lambda root: root.__setitem__("k", {"\ud800": 1}))
    with pytest.raises(UnstorableValueError, match=r"/k/'\\ud800': a string holding a lone"):
        store.export(tmp_path / "a.json")
    store.run(lambda root: root.__setitem__("k", {10**5000: 1}))
    with pytest.raises(UnstorableValueError, match=r"/k/<int key>: an int of more than"):
        store.export(tmp_path / "b.json")
    store.run(lambda root: root.__setitem__("k", snaptree.Counter()))
    store.run(lambda root: root["k"].add(10**5000))
    with pytest.raises(UnstorableValueError, match=r"/k: an int of more than"):
        store.export(tmp_path / "c.json")
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.slow
def test_a_json_export_of_a_lone_surrogate_on_the_command_line_is_one_line(tmp_path):
    """The CLI path of the same refusal: exit 3 (a value JSON cannot hold), one line, no file."""
    db = tmp_path / "app.fs"
    with snaptree.open(str(db)) as store:
        store.run(lambda root: root.__setitem__("bad", "x\ud800"))
    proc = run_snaptree("export", "--db", db, "-o", "d.json", "--format", "json", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip() == error_line(proc)
    assert error_line(proc).startswith("snaptree: error: /bad: a string holding a lone surrogate")
    assert not (tmp_path / "d.json").exists()


# -- objects whose class this process cannot import ----------------------------------------------

_MAIN_CLASS = """
import sys, snaptree
from persistent import Persistent

class Account(Persistent):
    def __init__(self, owner):
        self.owner = owner

with snaptree.open(sys.argv[1]) as store:
    store.run(lambda root: root.__setitem__("accounts", {"a": Account("ann")}))
"""


@pytest.fixture
def main_class_store(tmp_path):
    """A FileStorage holding an instance of a class defined in its writer's __main__."""
    db = tmp_path / "app.fs"
    proc = subprocess.run(
        [sys.executable, "-c", _MAIN_CLASS, str(db)], capture_output=True, text=True, timeout=WAIT
    )
    assert proc.returncode == 0, proc.stderr
    return db


@pytest.mark.parametrize("fmt", ["pickle", "json"])
def test_a_broken_object_stops_the_export_and_says_why(main_class_store, tmp_path, fmt):
    """``__main__.Account`` is broken here: ExportError naming the class, the cause, the fixes."""
    with snaptree.open(str(main_class_store), read_only=True) as store:
        with pytest.raises(ExportError) as caught:
            store.export(tmp_path / f"d.{fmt}", format=fmt)
        message = str(caught.value)
        assert "cannot export a __main__.Account" in message
        assert "importable module" in message and "process=False" in message
        assert not (tmp_path / f"d.{fmt}").exists()
        # The zodb format copies records without loading them: it needs no class.
        info = store.export(tmp_path / "d.zexp")
    assert info.objects > 2


def test_a_broken_object_on_the_command_line_is_one_line(main_class_store, tmp_path):
    """An export that cannot be written exits 5, with one line."""
    proc = run_snaptree(
        "export", "--db", main_class_store, "-o", "d.pickle", "--format", "pickle", cwd=tmp_path
    )
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.strip() == error_line(proc)
    assert error_line(proc).startswith("snaptree: error: cannot export a __main__.Account (oid 0x")
    assert not (tmp_path / "d.pickle").exists()


# -- shared nodes ---------------------------------------------------------------------------------


def _chain(levels: int):
    """``x = []``, then *levels* times ``x = [x] * 10``: a node a level, 10**levels leaves."""

    def build(root):
        x: list = []
        for _ in range(levels):
            x = [x] * 10
        root["bomb"] = x

    return build


@pytest.mark.parametrize(
    ("fmt", "kept"), [("pickle", False), ("pickle", True), ("json", False)], ids=str
)
def test_a_dump_that_sharing_would_blow_up_is_refused_and_nothing_is_written(
    tmp_path, fmt, kept, monkeypatch
):
    """Six list nodes in the store, a million in a dump: ExportError, no file, no temp.

    The pickle and json formats write a node once per place it is reached
    from; the zodb format, which keeps sharing, writes the six records. (The
    floor of the bound is lowered so that the refusal comes after 10,000
    nodes, not a million: the same rule, a fraction of the time.)
    """
    monkeypatch.setattr(_plain_nodes, "SHARING_FLOOR", 10_000)
    out = tmp_path / "out"
    out.mkdir()
    with snaptree.open("memory://") as store:
        store.run(_chain(6))
        fragments = exports.FragmentCaches() if kept else None
        with pytest.raises(ExportError, match=r"passed 10,000 nodes .*zodb format") as caught:
            store.export(out / f"d.{fmt}", fragments=fragments)
        assert "\n" not in str(caught.value) and "nothing was written" in str(caught.value)
        assert list(out.iterdir()) == []
        zodb = store.export(out / "d.zexp")
    assert zodb.objects < 10
    assert snaptree.verify(zodb.path).summary["first_keys"] == ["bomb"]


@pytest.mark.parametrize("fmt", ["pickle", "json"])
def test_a_node_shared_in_two_places_exports_as_two_equal_copies(store, tmp_path, fmt):
    """Sharing within the bound is written out, in every writer, and loads as the plain tree."""

    def share(root):
        shared = {"balance": 7, "history": [1, 2]}
        root["a"] = shared
        root["b"] = {"same": shared, "list": [shared, shared]}

    store.run(share)
    plain = store.run(lambda root: snaptree.to_plain(root))
    assert plain["a"] == plain["b"]["same"] == plain["b"]["list"][1]
    one_off = store.export(tmp_path / f"one.{fmt}")
    fragments = exports.FragmentCaches()
    store.export(tmp_path / f"first.{fmt}", fragments=fragments)
    reused = store.export(tmp_path / f"again.{fmt}", fragments=fragments)
    for info in (one_off, reused):
        assert _load(info) == plain
        assert info.objects == one_off.objects


def _fsyncs_and_renames(store: snaptree.Store, target: Any, monkeypatch: Any) -> tuple:
    """The fsyncs (by file) and renames (by target) of one export, in order, and its info."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    try:
        info = store.export(target)
    finally:
        monkeypatch.undo()
    return events, info


def test_a_commit_not_yet_durable_is_fsynced_before_a_dump_of_it_is_published(
    tmp_path, monkeypatch
):
    """A commit may be visible before it is durable (relaxed or group durability): the data
    file is fsynced after the snapshot and before the dump is renamed into place, so no dump
    outlives a machine crash that takes back a commit it holds. A process that only reads
    the file (the exporter process runs the same export_snapshot) fsyncs it itself; in
    commit mode every visible commit is on disk already."""
    db = tmp_path / "Data.fs"
    with snaptree.open(str(db), durability="relaxed", sync_every=3600) as store:
        store.run(lambda root: root.__setitem__("v", 1))
        events, info = _fsyncs_and_renames(store, tmp_path / "relaxed.pickle", monkeypatch)
        synced = events.index(("fsync", str(db)))
        assert synced < events.index(("replace", str(info.manifest_path)))
        assert synced < events.index(("replace", str(info.path)))
        with snaptree.open(str(db), read_only=True) as reader:
            events, info = _fsyncs_and_renames(reader, tmp_path / "reader.pickle", monkeypatch)
        assert events.index(("fsync", str(db))) < events.index(("replace", str(info.path)))
    with snaptree.open(str(db), durability="commit") as store:
        store.run(lambda root: root.__setitem__("v", 2))
        events, info = _fsyncs_and_renames(store, tmp_path / "commit.pickle", monkeypatch)
    assert ("fsync", str(db)) not in events  # the dump's own fsyncs still happen:
    assert ("fsync", str(tmp_path)) in events and ("replace", str(info.path)) in events
