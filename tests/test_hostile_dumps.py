"""Forged, damaged and explosive dumps: nothing runs, nothing expands, one clear error.

A zodb-format dump is a sequence of pickles (two per record), and whoever
can write a dump can write its manifest. ``verify`` and ``import`` read it
record by record with the allow-list unpickler, never with ZODB's
``importFile`` (which unpickles every record with a plain unpickler), and
rebuild the plain tree it holds; so a zodb export also imports anywhere
(the round trip of issue 15).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from BTrees.OOBTree import OOBTree
from BTrees.OOBTree import OOBucket as BTreesOOBucket
from persistent import Persistent

import snaptree
from _cli import error_line
from _cli import snaptree as run_snaptree
from snaptree import imports
from snaptree.manifest import manifest_path
from snaptree.tree import List


class Hostile:
    """Pickles as a call of *function* with *args*: what a forged record does."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> Any:
        return (self.function, self.args)


class Account(Persistent):
    """A user's own persistent class, allowed by name."""

    def __init__(self, owner: str) -> None:
        self.owner = owner


# -- reading and writing records of a .zexp file ---------------------------------------


def _records(path: Path) -> list[tuple[bytes, bytes]]:
    data = path.read_bytes()
    assert data[:4] == b"ZEXP"
    pos, out = 4, []
    while data[pos : pos + 16] != b"\xff" * 16:
        oid, length = data[pos : pos + 8], int.from_bytes(data[pos + 8 : pos + 16], "big")
        out.append((oid, data[pos + 16 : pos + 16 + length]))
        pos += 16 + length
    return out


def _write_records(path: Path, records: list[tuple[bytes, bytes]]) -> None:
    body = b"".join(oid + len(data).to_bytes(8, "big") + data for oid, data in records)
    path.write_bytes(b"ZEXP" + body + b"\xff" * 16)


def _vouch(path: Path, records: int | None = None) -> None:
    """Rewrite the manifest to match the file: what a forger who can write both does."""
    manifest = json.loads(manifest_path(path).read_text())
    data = path.read_bytes()
    manifest.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    if records is not None:
        manifest["objects"] = records
    manifest_path(path).write_text(json.dumps(manifest))


def _record(meta: Any, state: Any) -> bytes:
    return pickle.dumps(meta, protocol=3) + pickle.dumps(state, protocol=3)


@pytest.fixture
def zexp(store: snaptree.Store, tmp_path: Path) -> Path:
    store.run(
        lambda root: root.__setitem__(
            "accounts", {f"a{i:03}": {"balance": i, "tags": ["x", i]} for i in range(40)}
        )
    )
    return store.export(tmp_path / "d.zexp").path


def _list_record_oid(path: Path) -> bytes:
    """The oid of a snaptree List record in the dump (the tags of one account)."""
    for oid, data in _records(path):
        if pickle.Unpickler(io.BytesIO(data)).load() is List:  # our own dump: safe to load
            return oid
    raise AssertionError("no List record")


def _replace_record(path: Path, oid: bytes, data: bytes) -> None:
    _write_records(path, [(o, data if o == oid else d) for o, d in _records(path)])


# -- nothing runs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(
            lambda touch: _record(List, {"data": [Hostile(os.system, touch)]}), id="state"
        ),
        pytest.param(lambda touch: _record(Hostile(os.system, touch), None), id="class"),
        pytest.param(
            lambda touch: _record(List, {"data": [Hostile(eval, f"os.system({touch!r})")]}),
            id="eval",
        ),
    ],
)
def test_verify_of_a_forged_zexp_runs_no_code(zexp: Path, tmp_path: Path, forge: Any) -> None:
    """A record whose pickle calls os.system, under a matching manifest: refused, not run."""
    marker = tmp_path / "MARKER"
    _replace_record(zexp, _list_record_oid(zexp), forge(f"touch {marker}"))
    _vouch(zexp)
    with pytest.raises(snaptree.VerifyError, match=r"record 0x[0-9a-f]{16}: refused global"):
        snaptree.verify(zexp)
    with pytest.raises(snaptree.InputError, match="refused global"):
        snaptree.load_source(zexp)
    assert not marker.exists()


def test_verify_and_import_commands_of_a_forged_zexp_run_no_code(
    zexp: Path, tmp_path: Path
) -> None:
    """The same through the command line: one error line, exit 3 (bad input), no marker, store
    unchanged."""
    marker = tmp_path / "MARKER"
    _replace_record(
        zexp,
        _list_record_oid(zexp),
        _record(List, {"data": [Hostile(os.system, f"touch {marker}")]}),
    )
    _vouch(zexp)
    db = tmp_path / "target.fs"
    with snaptree.open(str(db)) as target:
        target.run(lambda root: root.__setitem__("kept", 1))
    before = db.read_bytes()
    for args in (["verify", str(zexp)], ["import", str(zexp), "--db", str(db), "--path", "x"]):
        proc = run_snaptree(*args)
        assert proc.returncode == 3, proc.stderr
        assert proc.stderr.strip() == error_line(proc)
        assert "refused global posix.system" in error_line(proc)
        assert not marker.exists()
    assert db.read_bytes() == before


def test_a_reference_naming_a_hostile_class_runs_no_code(zexp: Path, tmp_path: Path) -> None:
    """Persistent references carry a class too: it goes through the same allow-list."""
    marker = tmp_path / "MARKER"

    class Pid(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return (
                (b"\0" * 7 + b"\1", Hostile(os.system, f"touch {marker}")) if obj == "ref" else None
            )

    buffer = io.BytesIO()
    Pid(buffer, protocol=3).dump({"data": ["ref"]})
    _replace_record(
        zexp, _list_record_oid(zexp), pickle.dumps(List, protocol=3) + buffer.getvalue()
    )
    _vouch(zexp)
    with pytest.raises(snaptree.VerifyError, match=r"refused global posix\.system"):
        snaptree.verify(zexp)
    assert not marker.exists()


# -- damaged dumps ------------------------------------------------------------------------


def test_a_dangling_reference_is_a_verify_error(zexp: Path) -> None:
    """A record removed from the file: the reference to it names both records."""
    records = _records(zexp)
    missing = _list_record_oid(zexp)
    _write_records(zexp, [(o, d) for o, d in records if o != missing])
    _vouch(zexp, records=len(records) - 1)
    with pytest.raises(
        snaptree.VerifyError, match=rf"refers to record 0x{missing.hex()}, which is not in the file"
    ):
        snaptree.verify(zexp)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda data: data[: len(data) // 2] + b"\xff" * 16,
            r"truncated|not a valid pickle|ends in",
        ),
        (lambda data: data[:-16], r"ends in the middle of record|truncated"),
        (lambda data: data + b"junk", r"bytes after the export's end marker"),
        (lambda data: b"ZEXQ" + data[4:], r"not a ZODB export"),
        (lambda data: data[:20] + b"\0" * 30 + data[50:], r"not a valid pickle"),
        (lambda data: data[:4] + b"\0" * 8 + b"\x7f" + b"\xff" * 7 + data[20:], r"truncated"),
    ],
    ids=["half", "no-end-marker", "trailing-bytes", "bad-header", "zeroed-record", "huge-length"],
)
def test_a_damaged_zexp_under_a_matching_manifest_is_one_verify_error(
    zexp: Path, damage: Any, message: str
) -> None:
    """Whatever the damage, verify says so in one VerifyError, never a raw exception."""
    zexp.write_bytes(damage(zexp.read_bytes()))
    _vouch(zexp)
    with pytest.raises(snaptree.VerifyError, match=message) as caught:
        snaptree.verify(zexp)
    assert "\n" not in str(caught.value)


def test_a_record_whose_state_is_not_a_btree_is_an_input_error(zexp: Path) -> None:
    """A forged state of the right class but the wrong shape: refused with the record."""
    root = _records(zexp)[0][0]
    _replace_record(zexp, root, _record(snaptree.Mapping, ("not", "a", "btree")))
    with pytest.raises(
        snaptree.InputError, match=rf"{zexp}: .*(record 0x{root.hex()}|cannot rebuild)"
    ):
        snaptree.load_source(zexp)


def test_a_class_of_yours_needs_allow(store: snaptree.Store, tmp_path: Path) -> None:
    """A zodb dump holding your own persistent class loads only when you name it."""
    store.run(lambda root: root.__setitem__("owners", {"a": Account("ann")}))
    dump = store.export(tmp_path / "u.zexp").path
    with pytest.raises(snaptree.VerifyError, match=r"refused global test_hostile_dumps\.Account"):
        snaptree.verify(dump)
    loaded = snaptree.load_source(dump, allow=[Account])
    assert type(loaded["owners"]["a"]) is Account and loaded["owners"]["a"].owner == "ann"


Pair = collections.namedtuple("Pair", "left right")


def test_a_namedtuple_of_yours_holding_nodes_loads_with_them_rebuilt(store, tmp_path):
    """Its nodes are records of their own: they were left as the reader's internal
    references inside it (an import then refused "snaptree._zexp._Ref")."""
    store.run(lambda root: root.__setitem__("n", [Pair({"a": 1}, [2, {"b": 3}])]))
    dump = store.export(tmp_path / "n.zexp", subtree="n").path
    assert snaptree.load_source(dump, allow=[Pair]) == [Pair({"a": 1}, [2, {"b": 3}])]
    assert type(snaptree.load_source(dump, allow=[Pair])[0]) is Pair


# -- the zodb round trip ---------------------------------------------------------------------


SOURCE = {
    "accounts": {
        f"a{i:04}": {"balance": i * 7, "entries": [i, -i, {"memo": "x"}]} for i in range(700)
    },
    "by_id": {i: {"n": i} for i in range(300)},
    "mixed": {1: "one", "two": 2, None: [1.5, (1, 2)]},
    "blob": b"\x00\x01",
    "nested": [[[["deep"]]]],
}


@pytest.mark.parametrize("path", ["/", "restored/copy"])
@pytest.mark.slow
def test_a_zodb_export_imports_anywhere_and_reads_back_equal(
    store: snaptree.Store, tmp_path: Path, path: str
) -> None:
    """Export in the zodb format, import into another store (root or a path): the same tree."""
    store.run(lambda root: root.update(SOURCE))
    store.run(lambda root: root.__setitem__("hits", snaptree.Counter()))
    store.run(lambda root: root["hits"].add(5))
    info = store.export(tmp_path / "d.zexp")
    with store.snapshot() as snap:
        expected = snaptree.to_plain(snap.root)
    assert expected["hits"] == 5 and len(expected["accounts"]) == 700
    with snaptree.open(str(tmp_path / "other.fs")) as other:
        other.run(lambda root: root.__setitem__("existing", 1))
        result = other.import_tree(snaptree.load_source(info.path), path=path)
        assert result.objects > 1000
        with other.snapshot() as snap:
            root = snaptree.to_plain(snap.root)
    if path == "/":
        assert root == {**expected, "existing": 1}
    else:
        assert root["restored"]["copy"] == expected and root["existing"] == 1


@pytest.mark.slow
def test_a_zodb_export_of_a_subtree_imports_through_the_command(
    store: snaptree.Store, tmp_path: Path
) -> None:
    """``snaptree import d.zexp`` detects the format from the name and from the ZEXP header."""
    store.run(lambda root: root.update(SOURCE))
    info = store.export(tmp_path / "sub.zexp", subtree="/accounts")
    renamed = tmp_path / "sub.bin"
    renamed.write_bytes(info.path.read_bytes())
    db = tmp_path / "target.fs"
    for source, where in ((info.path, "by-name"), (renamed, "by-header")):
        proc = run_snaptree("import", source, "--db", db, "--path", where)
        assert proc.returncode == 0, proc.stderr
    with snaptree.open(str(db), read_only=True) as target, target.snapshot() as snap:
        assert snaptree.to_plain(snap.root["by-name"]) == SOURCE["accounts"]
        assert snaptree.to_plain(snap.root["by-header"]) == SOURCE["accounts"]


@pytest.mark.slow
def test_a_deep_tree_round_trips_through_the_zodb_format(tmp_path: Path) -> None:
    """Nesting 5,000 deep: the reader and the rebuild are iterative, not recursive."""
    depth = 5000
    deep: Any = "bottom"
    for _ in range(depth):
        deep = {"a": deep}
    with snaptree.open(str(tmp_path / "deep.fs")) as store:
        store.import_tree({"deep": deep})
        info = store.export(tmp_path / "deep.zexp")
    assert snaptree.verify(info.path).summary["records"] == info.objects == depth + 1
    loaded = snaptree.load_source(info.path)["deep"]
    for _ in range(depth):  # == would recurse
        assert list(loaded) == ["a"]
        loaded = loaded["a"]
    assert loaded == "bottom"


# -- expansion bombs ----------------------------------------------------------------------------


def _bomb(levels: int, width: int = 10) -> bytes:
    value: Any = []
    for _ in range(levels):
        value = [value] * width
    return pickle.dumps(value, protocol=2)


def test_a_shared_reference_pickle_bomb_is_refused_before_anything_is_built(
    store: snaptree.Store, tmp_path: Path
) -> None:
    """A ~200-byte pickle naming 10^9 lists: refused at once, nothing committed."""
    source = tmp_path / "bomb.pickle"
    source.write_bytes(_bomb(9))
    assert len(source.read_bytes()) < 256
    data = snaptree.load_source(source)
    tid = store.last_tid()
    # Building (or counting one by one) a billion nodes would outlast the test's timeout.
    with pytest.raises(
        snaptree.InputError, match=r"expands to 1,111,111,11\d objects from 1\d distinct"
    ):
        store.import_tree(data, path="bomb", progress=True)
    assert store.last_tid() == tid


def test_a_smaller_bomb_is_refused_too_unless_the_limit_is_raised(store: snaptree.Store) -> None:
    """111,111 copies of 5 lists: over the default; max_objects lets the copies in on purpose."""
    data = pickle.loads(_bomb(5))
    with pytest.raises(snaptree.InputError, match="max-objects"):
        store.import_tree(data, path="b")
    shared = pickle.loads(_bomb(3))  # 1,111 copies of 3 lists: within the default
    assert store.import_tree(shared, path="small").objects == 4  # stored once, shared
    with pytest.raises(snaptree.InputError, match=r"The limit is 1,000"):
        store.import_tree(shared, path="capped", max_objects=1000)
    assert store.import_tree(shared, path="raised", max_objects=1111).objects == 4


def test_the_default_limit_grows_with_the_distinct_containers(
    store: snaptree.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the floor, data may make copies up to ten times its distinct containers.

    (The floor is lowered here so that the rule shows on a small tree.)
    """
    monkeypatch.setattr(imports, "EXPANSION_FLOOR", 100)
    distinct = {f"k{i}": {"v": [i]} for i in range(500)}  # 1,001 containers, no sharing
    assert store.import_tree(distinct, path="plain").objects == 1001
    leaf = {"v": [1]}
    shared = {"a": [leaf] * 30}  # 4 distinct, 62 made: within 10x only thanks to the floor
    assert store.import_tree(shared, path="shared").objects == 4  # stored once, shared
    wide = {"a": [leaf] * 300}  # 4 distinct, 602 made: over both
    with pytest.raises(snaptree.InputError, match=r"602 objects from 4 distinct.*limit is 100"):
        store.import_tree(wide, path="wide")


def test_the_bomb_through_the_command_is_one_line_and_quick(tmp_path: Path) -> None:
    """``snaptree import bomb.pickle``: exit 3, one line naming --max-objects; store unchanged."""
    source = tmp_path / "bomb.pickle"
    source.write_bytes(_bomb(9))
    db = tmp_path / "Data.fs"
    with snaptree.open(str(db)) as store:
        store.run(lambda root: root.__setitem__("kept", 1))
    before = db.read_bytes()
    proc = run_snaptree("import", source, "--db", db, "--path", "b")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip() == error_line(proc)
    assert error_line(proc).startswith("snaptree: error: the data expands to")
    assert "--max-objects" in error_line(proc)
    assert db.read_bytes() == before


def _with_refs(meta: Any, state: Any, refs: dict[str, tuple[bytes, type]]) -> bytes:
    """A record whose state holds persistent references where *refs*' names are."""
    buffer = io.BytesIO()

    class Pid(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return refs.get(obj) if type(obj) is str else None

    pickle.Pickler(buffer, protocol=3).dump(meta)
    Pid(buffer, protocol=3).dump(state)
    return buffer.getvalue()


def test_a_zexp_whose_records_share_a_record_is_counted_the_same_way(
    zexp: Path, store: snaptree.Store
) -> None:
    """Ten references to one record, six levels deep: read as one object each, copies refused."""
    oids = [bytes([0] * 7 + [200 + level]) for level in range(7)]
    chain = [
        (
            oids[level],
            _with_refs(List, {"data": ["child"] * 10}, {"child": (oids[level + 1], List)}),
        )
        for level in range(6)
    ]
    chain.append((oids[6], _record(List, {"data": []})))
    flat = ("bomb", "ref")
    root = _with_refs(snaptree.Mapping, (((flat,),),), {"ref": (oids[0], List)})
    _write_records(zexp, [(_records(zexp)[0][0], root), *chain])
    data = snaptree.load_source(zexp)
    assert data["bomb"][0] is data["bomb"][1]  # one record, one object: nothing expanded yet
    with pytest.raises(snaptree.InputError, match="expands to 1,111,112 objects from 8 distinct"):
        store.import_tree(data, path="z")


def test_a_bucket_shared_by_two_btrees_is_refused(zexp: Path) -> None:
    """ZODB never shares a bucket; a forged dump that does would copy its items per mapping."""
    bucket_oid = bytes([0] * 7 + [250])
    bucket = _record(BTreesOOBucket, (tuple(x for i in range(50) for x in (i, i)),))
    trees = [
        (
            bytes([0] * 7 + [240 + n]),
            _with_refs(OOBTree, (("b",), "b"), {"b": (bucket_oid, BTreesOOBucket)}),
        )
        for n in range(2)
    ]
    flat = ("one", "t0", "two", "t1")
    root = _with_refs(
        snaptree.Mapping,
        (((flat,),),),
        {"t0": (trees[0][0], OOBTree), "t1": (trees[1][0], OOBTree)},
    )
    _write_records(zexp, [(_records(zexp)[0][0], root), *trees, (bucket_oid, bucket)])
    with pytest.raises(
        snaptree.InputError, match=rf"0x{bucket_oid.hex()} is part of .* two BTrees"
    ):
        snaptree.load_source(zexp)


def _zexp_record(number: int, data: bytes) -> bytes:
    return number.to_bytes(8, "big") + len(data).to_bytes(8, "big") + data


def test_a_persistent_object_built_inside_a_zexp_state_is_refused(tmp_path: Path) -> None:
    """ZODB refers to persistent objects by oid; one built inline would be stored unchecked.

    Here an OOBTree whose state lists its keys out of order: stored as it is, it would
    answer that keys it holds are absent.
    """
    proto = b"\x80\x03"
    mapping_class = proto + b"cpersistent.mapping\nPersistentMapping\nN\x86."
    unsorted = (  # OOBTree(), then BUILD with its state ((("b", 1, "a", 2),),)
        b"cBTrees.OOBTree\nOOBTree\n)R(X\x01\x00\x00\x00bK\x01X\x01\x00\x00\x00aK\x02t\x85\x85\x85b"
    )
    state = proto + b"}X\x04\x00\x00\x00data}X\x01\x00\x00\x00x" + unsorted + b"ss."
    forged = tmp_path / "forged.zexp"
    forged.write_bytes(b"ZEXP" + _zexp_record(1, mapping_class + state) + b"\xff" * 16)
    with pytest.raises(snaptree.InputError, match=r"OOBTree built inside a record's state"):
        snaptree.load_source(forged)
