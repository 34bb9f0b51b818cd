"""Pickle exports reuse the fragments of unchanged nodes, and never write stale data.

Each test commits one kind of change, exports again through a warm writer
(one that kept the previous export's fragments), and compares what
``pickle.load`` gives with ``snaptree.to_plain`` of a snapshot at the
dump's tid.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from persistent import Persistent

import snaptree
from snaptree import _pickle_fragments
from snaptree.exports import FragmentCaches

#: Enough accounts for a mapping spread over many buckets and interior BTree nodes.
ACCOUNTS = 8000

Edit = Callable[[Any], None]


class Owner(Persistent):
    """A user model object inside the tree: pickled as itself, never from a cached fragment."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Owner) and other.name == self.name

    __hash__ = None  # type: ignore[assignment]


def _fill(root: Any) -> None:
    root["accounts"] = {
        i: {"balance": 100, "owner": f"owner {i}", "history": [i, {"at": i}]}
        for i in range(ACCOUNTS)
    }
    root["other"] = {}
    root["count"] = snaptree.Counter()
    root["log"] = [{"n": n} for n in range(1500)]  # a list too large to cache whole
    root["flat"] = {1: "one", "two": [2]}  # mixed key types: a FlatMapping
    root["big"] = "x" * 70_000  # pickled outside a frame
    root["tags"] = {"a", "b", (1, 2)}  # a Set node


def _deep_leaf(root: Any) -> None:
    root["accounts"][4321]["history"][1]["at"] = "changed"


def _add_keys(root: Any) -> None:
    for i in range(ACCOUNTS, ACCOUNTS + 40):
        root["accounts"][i] = {"balance": i, "history": []}


def _delete_keys(root: Any) -> None:
    for i in range(100, 160):
        del root["accounts"][i]


def _change_list(root: Any) -> None:
    root["accounts"][7]["history"].append("appended")
    root["log"][1200]["n"] = -1
    root["log"].append({"n": "new"})


def _change_counter(root: Any) -> None:
    root["count"].add(5)


def _replace_subtree(root: Any) -> None:
    root["accounts"][3] = {"replaced": [1, 2, {"deep": True}]}


def _move_subtree(root: Any) -> None:
    root["other"]["moved"] = root["accounts"][9]
    del root["accounts"][9]


def _change_moved_subtree(root: Any) -> None:
    root["other"]["moved"]["history"].append("after the move")


def _share_subtree(root: Any) -> None:
    root["other"]["shared"] = root["accounts"][11]


def _change_shared_subtree(root: Any) -> None:
    root["accounts"][11]["balance"] = -11


def _change_flat(root: Any) -> None:
    root["flat"]["two"].append(3)
    root["flat"][(1, 2)] = "tuple key"


def _change_neighbours(root: Any) -> None:
    """Several values of one bucket: one changes in place, one gains a node, one a scalar."""
    root["accounts"][20]["balance"] = 0
    root["accounts"][21]["history"].append({"new": 1})
    root["accounts"][22]["history"].append(5)


def _change_big_string(root: Any) -> None:
    root["big"] = "y" * 80_000


def _change_set(root: Any) -> None:
    root["tags"].add("c")
    root["tags"].discard("a")


EDITS: list[Edit] = [
    _deep_leaf,
    _add_keys,
    _delete_keys,
    _change_list,
    _change_counter,
    _replace_subtree,
    _move_subtree,
    _change_moved_subtree,
    _share_subtree,
    _change_shared_subtree,
    _change_flat,
    _change_neighbours,
    _change_big_string,
    _change_set,
]


def _expected(store: snaptree.Store, tid: str) -> Any:
    with store.snapshot() as snap:
        # Nothing is committed between the export and this snapshot.
        assert snap.tid == tid
        return snaptree.to_plain(snap.root)


def _loaded(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.fixture
def file_store(tmp_path: Path) -> Iterator[snaptree.Store]:
    """A FileStorage store: what the exporter process reads (the writer does not depend on it)."""
    with snaptree.open(str(tmp_path / "Data.fs")) as store:
        yield store


@pytest.fixture
def warm() -> FragmentCaches:
    """Fragments kept from one in-process pickle export to the next, as the exporter process."""
    return FragmentCaches()


@pytest.mark.slow
def test_every_kind_of_change_shows_in_the_next_warm_export(tmp_path, warm):
    """Changes anywhere (leaf, keys, lists, counters, moved or shared subtrees) are never stale.

    On memory:// (the fragments do not depend on the storage); the exporter process
    test below runs edits on a FileStorage."""
    store = snaptree.open("memory://")
    store.run(_fill)
    first = store.export(tmp_path / "0.pickle", fragments=warm)
    assert _loaded(first.path) == _expected(store, first.tid)
    assert warm.entries() > 0
    for n, edit in enumerate(EDITS, 1):
        store.run(edit)
        info = store.export(tmp_path / f"{n}.pickle", fragments=warm)
        assert _loaded(info.path) == _expected(store, info.tid), edit.__name__
    assert snaptree.verify(info.path).sha256 == info.sha256
    store.close()


@pytest.mark.slow
def test_an_unchanged_tree_gives_the_same_bytes_and_object_count(file_store, tmp_path, warm):
    """Reuse changes nothing in the file: same bytes, same count as a cold export."""
    file_store.run(_fill)
    cold = file_store.export(tmp_path / "cold.pickle", fragments=warm)
    again = file_store.export(tmp_path / "again.pickle", fragments=warm)
    assert warm.entries() > 0
    assert again.sha256 == cold.sha256 and again.objects == cold.objects


@pytest.mark.slow
def test_warm_and_cold_exports_write_the_same_file(file_store, tmp_path, warm):
    """After a change, the warm export's bytes are exactly those a cold export writes."""
    file_store.run(_fill)
    file_store.export(tmp_path / "first.pickle", fragments=warm)
    file_store.run(_move_subtree)
    warm_info = file_store.export(tmp_path / "warm.pickle", fragments=warm)
    cold_info = file_store.export(tmp_path / "cold.pickle", fragments=FragmentCaches())
    assert warm_info.sha256 == cold_info.sha256
    assert warm_info.objects == cold_info.objects


def test_user_objects_are_pickled_afresh_every_time(tmp_path, warm):
    """A user object's state is not covered by serials of snaptree nodes: never reused."""
    store = snaptree.open("memory://")
    try:
        store.run(lambda root: root.update({"people": {"a": {"who": Owner("ann")}}}))
        store.export(tmp_path / "1.pickle", fragments=warm)

        def rename(root: Any) -> None:
            root["people"]["a"]["who"].name = "bob"

        store.run(rename)
        info = store.export(tmp_path / "2.pickle", fragments=warm)
        assert _loaded(info.path) == {"people": {"a": {"who": Owner("bob")}}}
    finally:
        store.close()


#: The exporter process's edits: one of each kind of place (a leaf, keys, a move, a list,
#: a set); every edit runs in the in-process test above.
EXPORTER_EDITS = [_deep_leaf, _add_keys, _move_subtree, _change_moved_subtree, _change_set]


@pytest.mark.slow
def test_the_exporter_process_reuses_fragments_and_stays_exact(tmp_path):
    """The Exporter's long-lived process (FileStorage, read-only, following commits)."""
    store = snaptree.open(str(tmp_path / "Data.fs"))
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    exporter = snaptree.Exporter(store, dumps, every=3600, keep=100, process=True)
    try:
        store.run(_fill)
        result = exporter.export_now()
        assert result.info is not None
        assert _loaded(result.info.path) == _expected(store, result.info.tid)
        for edit in EXPORTER_EDITS:
            store.run(edit)
            result = exporter.export_now()
            assert result.info is not None, edit.__name__
            assert _loaded(result.info.path) == _expected(store, result.info.tid), edit.__name__
    finally:
        exporter.stop()
        store.close()


# -- random sequences of edits ---------------------------------------------------------

_KEYS = st.integers(0, 40)
_LEAVES = st.one_of(st.integers(), st.text(max_size=5), st.none())
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=8,
)
_EDIT = st.one_of(
    st.tuples(st.just("set"), _KEYS, _VALUES),
    st.tuples(st.just("delete"), _KEYS, st.none()),
    st.tuples(st.just("inner"), _KEYS, _VALUES),
    st.tuples(st.just("move"), _KEYS, _KEYS),
    st.tuples(st.just("count"), st.integers(-5, 5), st.none()),
    # a run of plain items in a large mapping of mixed key types (written in parts),
    # up to past pickle's batch of 1,000 values
    st.tuples(st.just("bulk"), _KEYS, st.integers(0, 700)),
)


def _apply(root: Any, op: str, a: Any, b: Any) -> None:
    table = root["t"]
    if op == "set":
        table[a] = b
    elif op == "delete":
        table.pop(a, None)
    elif op == "inner":
        node = table.get(a)
        if isinstance(node, snaptree.Mapping):
            node["k"] = b
        elif isinstance(node, snaptree.List):
            node.append(b)
        else:
            table[a] = {"k": b}
    elif op == "move":
        if a in table and a != b:
            table[b] = table[a]
            del table[a]
    elif op == "bulk":
        root["f"].update({(a, i): i for i in range(b)})
    else:
        root["c"].add(a)


@pytest.mark.slow
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(edits=st.lists(st.lists(_EDIT, min_size=1, max_size=4), min_size=1, max_size=6))
def test_random_edits_never_leave_a_stale_dump(tmp_path, edits):
    """Any sequence of commits, each followed by a warm export, gives exact dumps."""
    store = snaptree.open("memory://")
    try:
        flat: dict[Any, Any] = {f"n{i}": {"v": i} for i in range(_pickle_fragments.SEAL_NODES)}
        flat[0] = "int and str keys: a FlatMapping"
        store.run(
            lambda root: root.update(
                {
                    "t": {i: {"v": i, "l": [i]} for i in range(0, 80, 2)},
                    "c": snaptree.Counter(),
                    "f": flat,
                }
            )
        )
        fragments = FragmentCaches()
        store.export(tmp_path / "dump.pickle", fragments=fragments)
        for commit in edits:

            def change(root: Any, commit: list[Any] = commit) -> None:
                for op, a, b in commit:
                    _apply(root, op, a, b)

            store.run(change)
            info = store.export(tmp_path / "dump.pickle", fragments=fragments)
            assert _loaded(info.path) == _expected(store, info.tid)
            cold = store.export(tmp_path / "cold.pickle", fragments=FragmentCaches())
            assert (info.sha256, info.objects) == (cold.sha256, cold.objects)
    finally:
        store.close()


class Tag(Persistent):
    """A hashable user object, as a set may hold."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tag) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


@pytest.mark.parametrize("scalars", [499, 500, 501, 999, 1000, 1001])
def test_a_large_flat_mapping_with_long_runs_of_plain_items_loads(tmp_path, warm, scalars):
    """A mapping of mixed key types too large to seal is written in parts; every part loads.

    Its plain items are pickled in runs: a run of more than a thousand values
    (pickle's batch) once carried a list's APPENDS into the dict's SETITEMS,
    a dump that verified its checksum and that no unpickler could load.
    """
    store = snaptree.open("memory://")
    try:

        def fill(root: Any) -> None:
            flat: dict[Any, Any] = {"big": {f"k{i}": {"v": i} for i in range(150)}}
            flat.update((i, i) for i in range(scalars))  # int and str keys: a FlatMapping
            root["m"] = flat

        store.run(fill)
        for name in ("cold.pickle", "warm.pickle"):
            info = store.export(tmp_path / name, fragments=warm)
            assert _loaded(info.path) == _expected(store, info.tid)
        assert warm.entries() > 0
    finally:
        store.close()


def test_a_set_of_many_objects_of_yours_is_written_in_parts(tmp_path, warm):
    """More objects of yours than one fragment holds: the set is written item by item."""
    store = snaptree.open("memory://")
    try:
        tags = {Tag(f"t{i}") for i in range(_pickle_fragments.SEAL_NODES + 50)}
        store.run(lambda root: root.update({"tags": tags, "small": {"x", 1}}))
        for name in ("1.pickle", "2.pickle"):
            info = store.export(tmp_path / name, fragments=warm)
            assert _loaded(info.path) == {"tags": tags, "small": {"x", 1}}
    finally:
        store.close()


@pytest.mark.slow
def test_repeated_store_exports_reuse_fragments_once_the_tree_fits_the_cache(tmp_path):
    """store.export() keeps its own fragments: the 1st writes plainly, the 2nd builds them,
    later ones reuse them, and every dump is exact."""
    store = snaptree.open(str(tmp_path / "Data.fs"), cache_size=100_000)
    try:
        store.run(_fill)
        edits = [_deep_leaf, _add_keys, _change_neighbours, _change_list, _delete_keys]
        for round_, edit in enumerate([None, *edits]):
            if edit is not None:
                store.run(edit)
            info = store.export(tmp_path / "d.pickle")
            assert _loaded(info.path) == _expected(store, info.tid), f"round {round_}"
            kept = store._export_fragments.entries()  # the store's own, not part of the API
            assert (kept > 0) == (round_ >= 1)
        info = store.export(tmp_path / "n.pickle", fragments=None)
        assert _loaded(info.path) == _expected(store, info.tid)
    finally:
        store.close()


def test_a_store_whose_cache_cannot_hold_the_tree_keeps_no_fragments(tmp_path):
    """Fragments of a tree the cache cannot hold would save nothing: it is loaded anyway."""
    store = snaptree.open(str(tmp_path / "Data.fs"), cache_size=1000)
    try:
        store.run(lambda root: root.__setitem__("a", {i: {"b": i} for i in range(2000)}))
        for _ in range(3):
            store.export(tmp_path / "d.pickle")
        assert store._export_fragments.entries() == 0
    finally:
        store.close()
