"""import_tree: conversion rules, paths, replace, atomicity, batches, retries, round trip."""

from __future__ import annotations

import collections
import datetime
import decimal
import json
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from persistent import Persistent

import snaptree
from _strategies import json_trees
from snaptree.imports import staged_imports
from snaptree.testing import force_conflicts
from snaptree.tree import FlatMapping, List, Mapping


class Gadget(Persistent):
    """A user's own persistent class: stored as it is."""

    def __init__(self, name: str) -> None:
        self.name = name


class Plain:
    """A plain class instance: ZODB would not see changes to it, so it is refused."""


def committed_state(store: snaptree.Store) -> tuple[str, Any]:
    return store.last_tid(), store.run(lambda root: root)


def test_dicts_become_mappings_and_lists_become_lists(store: snaptree.Store) -> None:
    """Containers are converted to the tree's persistent nodes, recursively."""
    store.import_tree({"accounts": {"a1": {"entries": [{"amount": 5}]}}})
    with store.snapshot() as snap:
        a1 = snap.root["accounts"]["a1"]
        assert type(snap.root["accounts"]) is Mapping
        assert type(a1) is Mapping
        assert type(a1["entries"]) is List
        assert type(a1["entries"][0]) is Mapping
        assert a1["entries"][0]["amount"] == 5


def test_mapping_with_unorderable_keys_falls_back_to_flat_mapping(store: snaptree.Store) -> None:
    """Mixed key types cannot live in a BTree; the dict becomes a FlatMapping, keys intact."""
    store.import_tree({"mixed": {1: "one", "two": 2, None: 3}, "ints": {2: "b", 1: "a"}})
    with store.snapshot() as snap:
        assert type(snap.root["mixed"]) is FlatMapping
        assert type(snap.root["ints"]) is Mapping
        assert dict(snap.root["mixed"]) == {1: "one", "two": 2, None: 3}
        assert list(snap.root["ints"].keys()) == [1, 2]


@pytest.mark.slow
def test_large_mapping_keeps_every_key(store: snaptree.Store) -> None:
    """Dicts larger than one BTree bucket, and than one level of buckets, keep all items."""
    medium = {f"k{i:05}": i for i in range(500)}
    large = {i: [i] for i in range(12_000)}
    store.import_tree({"medium": medium, "large": large})
    assert store.run(lambda root: root["medium"]) == medium
    assert store.run(lambda root: root["large"]) == large
    # The mappings are ordinary BTrees afterwards: inserts keep working.
    store.run(lambda root: root["large"].__setitem__(-1, "new"))
    assert store.run(lambda root: (len(root["large"]), root["large"][-1])) == (12_001, "new")


def test_leaves_are_stored_as_the_tree_stores_them(store: snaptree.Store) -> None:
    """Scalars, tuples, bytes, datetimes and Decimals stay; sets become Set nodes."""
    when = datetime.datetime(2026, 11, 25, 17, 0, tzinfo=datetime.UTC)
    data = {
        "when": when,
        "day": when.date(),
        "price": decimal.Decimal("19.99"),
        "pair": (1, "two"),
        "raw": b"\x00\xff",
        "tags": {"a", "b"},
        "frozen": frozenset({1}),
        "z": complex(1, 2),
    }
    store.import_tree({"leaves": data})
    got = store.run(lambda root: root["leaves"])
    assert got["when"] == when and got["day"] == when.date()
    assert got["price"] == decimal.Decimal("19.99")
    assert got["pair"] == (1, "two")
    assert got["raw"] == b"\x00\xff"
    assert got["tags"] == {"a", "b"}
    assert got["frozen"] == frozenset({1})
    assert got["z"] == complex(1, 2)
    with store.snapshot() as snap:
        assert isinstance(snap.root["leaves"]["tags"], snaptree.tree.Set)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (bytearray(b"ab"), r"^leaves/buffer: cannot store a bytearray"),
        (
            collections.defaultdict(list, {"a": [1]}),
            r"^leaves/buffer: a collections\.defaultdict cannot be stored: its default",
        ),
        ({1.5: "x", float("nan"): "n"}, r"^leaves/buffer/nan: "),
    ],
    ids=["bytearray", "defaultdict", "nan-key"],
)
def test_what_assignment_refuses_import_refuses_with_the_path(
    store: snaptree.Store, value: Any, message: str
) -> None:
    """A bytearray, a defaultdict (its factory), a NaN key: refused where they are, nothing kept."""
    tid = store.last_tid()
    with pytest.raises(snaptree.UnstorableValueError, match=message):
        store.import_tree({"leaves": {"ok": 1, "buffer": value}})
    assert store.last_tid() == tid


def test_users_persistent_objects_are_stored_as_they_are(store: snaptree.Store) -> None:
    """An instance of the caller's own Persistent subclass is stored, not converted."""
    store.import_tree({"gadgets": [Gadget("lamp"), (Gadget("mug"),)]})
    with store.snapshot() as snap:
        first = snap.root["gadgets"][0]
        assert type(first) is Gadget and first.name == "lamp"
        assert snap.root["gadgets"][1][0].name == "mug"


def test_root_import_merges_keys_and_leaves_other_keys_alone(store: snaptree.Store) -> None:
    """At "/" each top-level key of the data becomes a key of the root."""
    store.run(lambda root: root.__setitem__("existing", 1))
    result = store.import_tree({"a": 1, "b": [2]})
    assert store.run(lambda root: root) == {"existing": 1, "a": 1, "b": [2]}
    assert result.path == "/"
    assert result.keys == ("a", "b")
    assert result.replaced == ()
    assert result.objects == 1
    assert result.attempts == 1


def test_import_at_a_path_creates_the_mappings_on_the_way(store: snaptree.Store) -> None:
    """accounts/a1 makes the data the value of a1 in accounts, creating accounts if needed."""
    result = store.import_tree({"balance": 10}, path="bank/accounts/a1")
    assert store.run(lambda root: root) == {"bank": {"accounts": {"a1": {"balance": 10}}}}
    assert result.path == "bank/accounts/a1"
    assert result.keys == ("a1",)
    with store.snapshot() as snap:
        assert type(snap.root["bank"]) is Mapping
    # Leading and trailing slashes do not matter; a scalar can be imported too.
    store.import_tree(7, path="/bank/accounts/a2/")
    assert store.run(lambda root: root["bank"]["accounts"]["a2"]) == 7


def test_import_at_a_path_reaches_int_keys_and_list_items(store: snaptree.Store) -> None:
    """Path segments name int keys of int-keyed mappings and (with replace) list items."""
    store.import_tree({"by_id": {1: {"x": 1}}, "items": [0, 1, 2]})
    store.import_tree({"y": 2}, path="by_id/2")
    assert store.run(lambda root: root["by_id"]) == {1: {"x": 1}, 2: {"y": 2}}
    store.import_tree({"z": 3}, path="items/1", replace=True)
    assert store.run(lambda root: root["items"]) == [0, {"z": 3}, 2]
    with pytest.raises(snaptree.ArgumentError, match=r"^items: no item 7 in a list of 3"):
        store.import_tree(1, path="items/7", replace=True)


def test_existing_key_without_replace_is_an_error_naming_it(store: snaptree.Store) -> None:
    """Importing over an existing key fails, names the key, and commits nothing."""
    store.import_tree({"accounts": {"a1": {"balance": 1}}})
    before = committed_state(store)
    with pytest.raises(snaptree.Error, match=r"accounts/a1: already exists.*replace"):
        store.import_tree({"balance": 2}, path="accounts/a1")
    with pytest.raises(snaptree.Error, match=r"^accounts: already exists"):
        store.import_tree({"new": 1, "accounts": {}})
    assert committed_state(store) == before


def test_replace_overwrites_the_old_value(store: snaptree.Store) -> None:
    """With replace=True the old value at the key is replaced entirely."""
    store.import_tree({"accounts": {"a1": {"balance": 1, "old": True}}, "keep": 1})
    result = store.import_tree({"balance": 2}, path="accounts/a1", replace=True)
    assert result.replaced == ("a1",)
    assert store.run(lambda root: root) == {"accounts": {"a1": {"balance": 2}}, "keep": 1}
    result = store.import_tree({"accounts": []}, replace=True)
    assert result.replaced == ("accounts",)
    assert store.run(lambda root: root) == {"accounts": [], "keep": 1}


def test_root_accepts_only_a_mapping(store: snaptree.Store) -> None:
    """A list cannot become the root: its items would have no keys."""
    with pytest.raises(snaptree.UnstorableValueError, match="only a mapping can be imported"):
        store.import_tree([1, 2])


def test_path_below_a_scalar_is_an_error(store: snaptree.Store) -> None:
    """Nothing can be imported below a value that is not a container; nothing is committed."""
    store.import_tree({"count": 3})
    before = committed_state(store)
    with pytest.raises(snaptree.Error, match="count"):
        store.import_tree({}, path="count/x/y")
    with pytest.raises(snaptree.Error, match="empty segment"):
        store.import_tree({}, path="a//b")
    assert committed_state(store) == before


def test_unstorable_value_is_reported_with_its_path(store: snaptree.Store) -> None:
    """A value the tree cannot hold is named by its path in the tree; nothing is committed."""
    store.import_tree({"other": 1})
    before = committed_state(store)
    data = {"accounts": {"a7": {"entries": [1, 2, 3, Plain()]}}}
    with pytest.raises(snaptree.UnstorableValueError) as info:
        store.import_tree(data)
    assert info.value.path == "accounts/a7/entries/3"
    assert "Plain" in str(info.value)
    with pytest.raises(snaptree.UnstorableValueError) as info:
        store.import_tree(data, path="bank")
    assert info.value.path == "bank/accounts/a7/entries/3"
    assert committed_state(store) == before


def test_cycle_is_reported_with_its_path(store: snaptree.Store) -> None:
    """A tree that contains itself cannot be stored; the error says where the loop closes."""
    loop: list[Any] = [1]
    loop.append({"back": [loop]})
    with pytest.raises(snaptree.UnstorableValueError) as info:
        store.import_tree({"x": loop})
    assert info.value.path == "x/1/back/0"
    assert store.run(lambda root: root) == {}


def test_shared_references_stay_shared_as_in_the_data(store: snaptree.Store) -> None:
    """The same dict twice in the data is one node reached twice, as assignment stores it."""
    shared = {"n": 1}
    result = store.import_tree({"a": shared, "b": shared, "pair": [shared, (shared,)]})
    assert result.objects == 2  # the shared dict and the list
    assert store.run(lambda root: root["b"] is root["a"] is root["pair"][1][0]) is True
    store.run(lambda root: root["a"].__setitem__("n", 2))
    assert store.run(lambda root: (root["b"]["n"], root["pair"][0]["n"])) == (2, 2)


def test_import_and_assignment_share_and_refuse_alike(store: snaptree.Store) -> None:
    """One conversion: the same nodes, the same sharing, the same errors either way in."""
    shared = {"n": [1]}
    data = {"x": [shared, {"y": shared, "t": (shared, frozenset({1}))}], "s": {1, 2}}
    store.import_tree({"imported": data})
    store.run(lambda root: root.__setitem__("assigned", data))

    def shape(node: Any) -> Any:
        return (
            type(node["x"]).__name__,
            node["x"][0] is node["x"][1]["y"] is node["x"][1]["t"][0],
            type(node["x"][1]["t"][1]).__name__,
            type(node["s"]).__name__,
        )

    assert store.run(lambda root: (shape(root["imported"]), shape(root["assigned"]))) == (
        ("List", True, "frozenset", "Set"),
        ("List", True, "frozenset", "Set"),
    )
    loop: list[Any] = []
    loop.append({"back": loop})
    for put in (
        lambda: store.import_tree({"loop": loop}),
        lambda: store.run(lambda root: root.__setitem__("loop", loop)),
    ):
        with pytest.raises(snaptree.UnstorableValueError, match=r"^loop/0/back: contains itself"):
            put()


def test_a_node_shared_across_batches_is_written_once_and_stays_shared(store_uri: str) -> None:
    """A shared dict finished early, committed in a batch and ghosted, is reached again later."""
    shared = {"n": 1, "deep": [{"m": 2}]}
    data = {f"k{i:04}": {"ref": shared, "own": [i]} for i in range(600)}
    with snaptree.open(store_uri, cache_size=10) as store:
        result = store.import_tree(data, path="d", commit_every=50)
        assert result.batches > 10
        assert result.objects == 600 * 2 + 3 + 1  # each key's two, the shared three, "d"
        assert store.run(lambda root: root["d"]["k0000"]["ref"] is root["d"]["k0599"]["ref"])
        store.run(lambda root: root["d"]["k0300"]["ref"]["deep"][0].__setitem__("m", 3))
        plain = store.run(lambda root: root["d"])
    assert plain["k0000"]["ref"]["deep"][0]["m"] == 3
    assert {key: value["own"] for key, value in plain.items()} == {
        key: value["own"] for key, value in data.items()
    }


def test_large_import_commits_batches_then_links_them_in_one_commit(store: snaptree.Store) -> None:
    """Batches bound memory; the tree changes once, at the last commit, which leaves no staging."""
    data = {f"a{i:04}": {"balance": i, "entries": [{"amount": i}]} for i in range(1000)}
    commits_before = store.stats()["commits"]
    result = store.import_tree(data, path="accounts", commit_every=100)
    assert result.objects == 3001
    assert result.batches >= 30
    assert store.stats()["commits"] == commits_before + result.batches + 1
    assert store.run(lambda root: root["accounts"]) == data
    assert staged_imports(store) == []


def test_an_import_smaller_than_a_batch_is_one_commit(store: snaptree.Store) -> None:
    """No staging for what one commit holds: a small import costs what an assignment does."""
    commits_before = store.stats()["commits"]
    result = store.import_tree({"a": [{"n": i} for i in range(50)]}, path="small")
    assert (result.batches, result.attempts) == (0, 1)
    assert store.stats()["commits"] == commits_before + 1


def test_failure_after_batches_leaves_the_tree_as_it_was(store: snaptree.Store) -> None:
    """An error late in a large import changes nothing readers see, and drops its staging."""
    store.import_tree({"accounts": {"a0": 0}})
    before = store.run(lambda root: root)
    data: dict[str, Any] = {f"a{i:04}": {"entries": [i, {"x": i}]} for i in range(1, 600)}
    data["zzzz"] = {"entries": [1, Plain()]}
    with pytest.raises(snaptree.UnstorableValueError, match="accounts/new/zzzz/entries/1"):
        store.import_tree(data, path="accounts/new", commit_every=50)
    assert store.run(lambda root: root) == before
    assert staged_imports(store) == []
    # The store is usable afterwards, and the same import without the bad value works.
    del data["zzzz"]
    result = store.import_tree(data, path="accounts/new", commit_every=50)
    assert result.batches > 0
    assert store.run(lambda root: root["accounts"]["new"]) == data


def test_users_objects_survive_a_failed_import(store_uri: str) -> None:
    """A failed import leaves the caller's own persistent objects unsaved and intact.

    A batch commit would give them an oid in a database they then are not
    in; imports that carry such objects are therefore one transaction, whose
    abort gives them back as they were (a small cache would ghost anything
    committed early).
    """
    gadgets = [Gadget(f"g{i}") for i in range(300)]
    data = {"filler": [{"n": i} for i in range(300)], "gadgets": gadgets, "more": [[1]] * 300}
    data["zzz"] = Plain()
    with snaptree.open(store_uri, cache_size=10) as store:
        with pytest.raises(snaptree.UnstorableValueError, match=r"^zzz"):
            store.import_tree(data, commit_every=10)
        assert [g.name for g in gadgets] == [f"g{i}" for i in range(300)]
        assert all(g._p_jar is None for g in gadgets)
        del data["zzz"]
        assert store.import_tree(data, commit_every=10).batches == 0
        with store.snapshot() as snap:
            assert [g.name for g in snap.root["gadgets"]] == [f"g{i}" for i in range(300)]


@pytest.mark.parametrize("in_tuple", [False, True], ids=["key", "in-a-tuple-key"])
def test_users_objects_used_as_keys_survive_a_failed_import(
    store: snaptree.Store, in_tuple: bool
) -> None:
    """A persistent key (or one inside a tuple key) makes the import one transaction too."""
    gadget = Gadget("tag")
    key = ("tuple", gadget) if in_tuple else gadget
    data = {"tagged": {key: "v"}, "filler": [[i] for i in range(50)], "zzz": Plain()}
    with pytest.raises(snaptree.UnstorableValueError, match=r"^x/zzz"):
        store.import_tree(data, path="x", commit_every=5)
    assert gadget._p_jar is None and gadget._p_oid is None
    del data["zzz"]
    assert store.import_tree(data, path="x", commit_every=5).batches == 0
    with store.snapshot() as snap:
        (stored,) = snap.root["x"]["tagged"].keys()
        assert stored is not None and snap.root["x"]["tagged"][stored] == "v"


def test_object_of_another_connection_is_refused(store: snaptree.Store) -> None:
    """A persistent object that already lives in a database cannot be imported again."""
    store.import_tree({"gadget": Gadget("lamp")})
    with store.snapshot() as snap:
        loaded = snap.root["gadget"]
        with pytest.raises(snaptree.UnstorableValueError, match="copy/0: this Gadget already"):
            store.import_tree({"copy": [loaded]})


class _OnRead(dict):
    """A dict that runs *hook* when the import converts it (its values are read the second time).

    The import reads the data once before anything is built (to count what
    it will create), then once to convert it.
    """

    def __init__(self, data: dict, hook: Any) -> None:
        super().__init__(data)
        self._hook = hook
        self._reads = 0

    def values(self) -> Any:
        self._reads += 1
        if self._reads == 2:
            self._hook()
        return super().values()


def _commit_in_another_thread(store: snaptree.Store, fn: Any) -> None:
    errors: list[BaseException] = []

    def write() -> None:
        try:
            store.run(fn)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert errors == []


def test_a_conflict_at_the_final_commit_retries_that_commit(store: snaptree.Store) -> None:
    """The last commit is retried like any store call; what it links is built only once."""
    data = {"a": [{"n": i} for i in range(20)]}
    with force_conflicts(store, times=2) as forced:
        result = store.import_tree(data, path="target")
    assert forced.conflicts == 2
    assert result.attempts == 3
    assert store.run(lambda root: root["target"]) == data


def test_a_conflict_at_a_batch_commit_retries_that_batch_alone(store: snaptree.Store) -> None:
    """A batch writes only new objects and its own staging: a conflict there redoes that batch."""
    data = {f"k{i:03}": {"n": i, "list": [i]} for i in range(300)}
    with force_conflicts(store, times=3) as forced:
        result = store.import_tree(data, path="target", commit_every=40)
    assert forced.conflicts == 3
    assert result.batches > 3
    assert result.attempts == 1
    assert store.run(lambda root: root["target"]) == data
    assert staged_imports(store) == []


def test_a_key_written_meanwhile_is_never_overwritten_without_replace(
    store: snaptree.Store,
) -> None:
    """The final commit checks the target again: a rival's key is reported, and kept."""
    data = _OnRead(
        {f"k{i}": {"n": i} for i in range(200)},
        lambda: _commit_in_another_thread(store, lambda root: root.__setitem__("target", "rival")),
    )
    with pytest.raises(snaptree.Error, match="target: already exists"):
        store.import_tree({"target": data}, commit_every=50)
    assert store.run(lambda root: root["target"]) == "rival"
    assert staged_imports(store) == []


def test_with_replace_a_key_written_meanwhile_is_replaced(store: snaptree.Store) -> None:
    data = _OnRead(
        {"a": 1},
        lambda: _commit_in_another_thread(store, lambda root: root.__setitem__("target", "rival")),
    )
    store.import_tree({"target": data}, replace=True)
    assert store.run(lambda root: root["target"]) == {"a": 1}


def test_progress_bar_goes_to_stderr_only(
    store: snaptree.Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """progress=True draws a tqdm bar on stderr and writes nothing on stdout."""
    store.import_tree({"a": [{"n": i} for i in range(50)]}, progress=True, commit_every=10)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "obj" in captured.err


@pytest.mark.parametrize("path", ["", "   ", "\t"])
def test_an_empty_path_is_refused_not_taken_for_the_root(store: snaptree.Store, path: str) -> None:
    """--path "$UNSET" must not merge the data over the root; "/" is how to mean the root."""
    store.import_tree({"accounts": {f"a{i}": i for i in range(10)}})
    tid = store.last_tid()
    with pytest.raises(snaptree.ArgumentError, match=r"empty; give a path .* or / for the root"):
        store.import_tree({"accounts": {"a0": 1}}, path=path, replace=True)
    assert store.last_tid() == tid
    assert len(store.run(lambda root: root["accounts"])) == 10
    store.import_tree({"more": 1}, path="/")
    assert store.run(lambda root: root["more"]) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10"])
def test_max_objects_must_be_a_positive_int(store: snaptree.Store, bad: Any) -> None:
    with pytest.raises(snaptree.ArgumentError, match="max_objects"):
        store.import_tree({"a": 1}, max_objects=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_commit_every_must_be_a_positive_int(store: snaptree.Store, bad: Any) -> None:
    with pytest.raises(ValueError, match="commit_every"):
        store.import_tree({}, commit_every=bad)


def test_the_old_savepoint_every_still_works_and_says_it_is_commit_every(
    store: snaptree.Store,
) -> None:
    data = {f"k{i}": {"n": [i]} for i in range(50)}
    with pytest.warns(DeprecationWarning, match="commit_every"):
        result = store.import_tree(data, path="old", savepoint_every=10)
    assert result.batches >= 5
    with pytest.warns(DeprecationWarning, match="batches"):
        assert result.savepoints == result.batches
    assert store.run(lambda root: root["old"]) == data


# -- round trip ---------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not True, 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=json_trees)
def test_any_json_tree_round_trips_exactly(tree: Any) -> None:
    """Importing a JSON-compatible tree and reading it back as plain data gives it back."""
    with snaptree.open("memory://") as store:
        store.import_tree(tree, path="model", commit_every=3)
        assert same(store.run(lambda root: root["model"]), tree)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.dictionaries(st.text(max_size=6), json_trees, max_size=6))
def test_any_json_mapping_round_trips_at_the_root(tree: dict[str, Any]) -> None:
    """At the root, too, and through snaptree.to_plain inside a transaction."""
    with snaptree.open("memory://") as store:
        store.import_tree(tree, commit_every=2)
        assert same(store.run(lambda root: snaptree.to_plain(root)), tree)
        assert same(json.loads(json.dumps(tree)), tree)
