"""The tree's nodes behave like the dicts, lists and sets they replace, or say why not.

Each guarantee is checked the way a user would meet it: through store.run,
store.transaction and snapshots on memory:// and FileStorage, and on
free-standing nodes. A case passes if it behaves as plain Python does, or
raises a snaptree.Error with nothing committed.
"""

from __future__ import annotations

import collections
import copy
import datetime
import decimal
import difflib
import pickle
import re
import subprocess
import sys
import threading
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from persistent import Persistent

import snaptree
from snaptree import MisuseError, UnstorableValueError, WrongThreadError
from snaptree.tree import FlatMapping, List, Mapping, Set, dict_node, to_persistent, to_plain

TIMEOUT = 30


def kinds(value: Any) -> Any:
    """The node classes in *value*, as nested plain data, to compare with expectations."""
    if isinstance(value, Mapping | FlatMapping):
        return (type(value).__name__, {k: kinds(v) for k, v in value.items()})
    if isinstance(value, List):
        return ("List", [kinds(v) for v in value])
    return type(value).__name__


# -- conversion ------------------------------------------------------------------------


def test_assigned_values_become_nodes_that_keep_their_behaviour(store):
    def assign(root: Any) -> Any:
        root["d"] = {
            "nested": {"x": [1, {"y": 2}]},
            "tags": {"a", "b"},
            "frozen": frozenset({1}),
            "pair": (1, "a"),
            "when": datetime.date(2026, 1, 1),
        }
        root["mixed"] = {1: "int key", "a": "str key"}
        return kinds(root["d"]), type(root["d"]["tags"]).__name__, type(root["mixed"]).__name__

    tree, tags, mixed = store.run(assign)
    assert tree == (
        "Mapping",
        {
            "nested": ("Mapping", {"x": ("List", ["int", ("Mapping", {"y": "int"})])}),
            "tags": "Set",
            "frozen": "frozenset",
            "pair": "tuple",
            "when": "date",
        },
    )
    assert (tags, mixed) == ("Set", "FlatMapping")


def test_a_set_stays_a_mutable_set_whose_changes_are_committed(store_uri):
    with snaptree.open(store_uri) as store:
        store.run(lambda root: root.update(tags={"a"}))
        store.run(lambda root: root["tags"].add("b"))
        store.run(lambda root: root["tags"].update({"c", "d"}))

        def in_place(root: Any) -> None:
            tags = root["tags"]
            tags |= {"e"}
            tags -= {"a"}

        store.run(in_place)
        assert store.run(lambda root: root["tags"]) == {"b", "c", "d", "e"}
    if store_uri != "memory://":
        with snaptree.open(store_uri) as reopened:
            assert reopened.run(lambda root: root["tags"]) == {"b", "c", "d", "e"}


@pytest.mark.parametrize(
    "value",
    [collections.defaultdict(list, {"a": [1]}), collections.Counter("abc")],
    ids=["defaultdict", "Counter"],
)
def test_a_dict_with_a_default_factory_is_refused_with_a_hint(store, value):
    with pytest.raises(UnstorableValueError, match=r"^cfg/x: .*default.*setdefault"):
        store.run(lambda root: root.update(cfg={"x": value}))
    assert store.run(lambda root: "cfg" in root) is False


def test_a_bytearray_is_refused_with_a_hint(store):
    with pytest.raises(UnstorableValueError, match=r"^blob: cannot store a bytearray.*bytes\("):
        store.run(lambda root: root.update(blob=bytearray(b"ab")))
    assert store.run(lambda root: "blob" in root) is False


def test_plain_objects_inside_frozensets_and_tuples_are_refused_with_their_path(store):
    class Plain:
        pass

    with pytest.raises(UnstorableValueError, match=r"^a/b/1: .*Plain"):
        store.run(lambda root: root.update(a={"b": (1, Plain())}))
    with pytest.raises(UnstorableValueError, match=r"^a/b: .*Plain"):
        store.run(lambda root: root.update(a={"b": frozenset({Plain()})}))
    assert store.run(lambda root: "a" in root) is False


PARIS = zoneinfo.ZoneInfo("Europe/Paris")


def _unstorable_clocks(
    when: datetime.datetime, other: datetime.datetime | datetime.time, key: str
) -> dict[str, tuple[str, Callable[[Any], Any]]]:
    """Every place a datetime (*when*) can go, with the path its refusal names; *other* is
    another value refused for the same reason."""
    return {
        "a value": ("a/t", lambda root: root["a"].update(t=when)),
        "another value": ("a/t", lambda root: root["a"].update(t=other)),
        "in a tuple": ("a/t/1", lambda root: root["a"].update(t=(1, when))),
        "in a new dict": ("b/c", lambda root: root.update(b={"c": when})),
        "appended": ("a/log/0", lambda root: root["a"]["log"].append(when)),
        "a key": (f"a/{key}", lambda root: root["a"].update({when: 1})),
        "a key of a new dict": (f"b/{key}", lambda root: root.update(b={when: 1})),
        "a set element": ("a/s", lambda root: root["a"].update(s={when})),
        "added to a set": (
            "a/s",
            lambda root: root["a"].update(s=set()) or root["a"]["s"].add(when),
        ),
    }


ZONED = _unstorable_clocks(
    datetime.datetime(2026, 1, 1, tzinfo=PARIS),
    datetime.time(9, tzinfo=PARIS),
    r"2026-01-01 00:00:00\+01:00",
)


class _EndOfSummerTime(datetime.tzinfo):
    """Paris on the night of 2026-10-25, when 02:00-03:00 came twice: fold=1 is the second."""

    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(hours=1 if dt is not None and dt.fold else 2)

    def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(hours=0 if dt is not None and dt.fold else 1)


#: The second 02:30 of the night Paris went back from summer time (fold=1): naive, and with
#: a timezone whose offset reads the fold.
FOLDED = _unstorable_clocks(
    datetime.datetime(2026, 10, 25, 2, 30, fold=1),
    datetime.datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=_EndOfSummerTime()),
    "2026-10-25 02:30:00",
)


#: What each refusal says, and where: a datetime ZODB's protocol 3 cannot keep.
CLOCK_REFUSALS = {
    "ZoneInfo": (ZONED, r"ZoneInfo\('Europe/Paris'\).*UTC"),
    "fold=1": (FOLDED, "fold=1.*UTC"),
}


@pytest.mark.parametrize(
    "kind, where",
    [(kind, where) for kind, (places, _) in CLOCK_REFUSALS.items() for where in places],
)
def test_a_datetime_protocol_3_cannot_keep_is_refused_with_its_path(store, kind, where):
    """ZODB pickles records with protocol 3: a ZoneInfo failed the commit with a bare
    PicklingError, and a fold=1 came back as the other 02:30, silently."""
    places, message = CLOCK_REFUSALS[kind]
    path, change = places[where]
    store.run(lambda root: root.update(a={"x": 1, "log": []}))
    with pytest.raises(UnstorableValueError, match=rf"^{path}: .*{message}"):
        store.run(change)
    assert store.run(lambda root: snaptree.tree.to_plain(root)) == {"a": {"x": 1, "log": []}}


def test_datetimes_in_utc_with_fixed_offsets_or_naive_are_stored(store):
    values = [
        datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
        datetime.datetime(2026, 1, 1),
        (1, datetime.time(9, tzinfo=datetime.UTC)),
    ]
    store.run(lambda root: root.update(t=values))
    assert store.run(lambda root: list(root["t"])) == values


def test_a_fold_that_picks_no_other_instant_is_stored_and_comes_back_equal(store):
    """In UTC, at a fixed offset or in a time, fold=1 changes no offset: it is not refused
    (it comes back as fold=0, equal and with the same hash), as a dict key too."""
    values = [
        datetime.datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=datetime.UTC),
        datetime.datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=datetime.timezone.min),
        datetime.time(2, 30, fold=1),
        datetime.time(2, 30, fold=1, tzinfo=datetime.UTC),
    ]
    store.run(lambda root: root.update(t=values, k={values[0]: 1}))
    store.db.cacheMinimize()  # read back from the storage's records
    stored, keys = store.run(lambda root: (list(root["t"]), list(root["k"])))
    assert stored == values and keys == values[:1]
    assert [hash(v) for v in stored] == [hash(v) for v in values]


CONSTRUCTIONS = {
    "List(list)": lambda root: List([{"v": 1}]),
    "Mapping(dict)": lambda root: Mapping({"a": {"v": 1}}),
    "Mapping(pairs)": lambda root: Mapping([("a", {"v": 1})]),
    "Mapping(kwargs)": lambda root: Mapping(a={"v": 1}),
    "FlatMapping(dict)": lambda root: FlatMapping({1: {"v": 1}, "a": 2}),
    "Set(set)": lambda root: Set({(1, 2)}),
    "node + list": lambda root: root["l"] + [{"v": 1}],
    "list + node": lambda root: [{"v": 1}] + root["l"],
    "node * 2": lambda root: root["l"] * 2,
    "node | dict": lambda root: root["m"] | {"b": {"v": 1}},
    "dict | node": lambda root: {"b": {"v": 1}} | root["m"],
    "flat | dict": lambda root: root["f"] | {"b": {"v": 1}},
    "copy()": lambda root: root["m"].copy(),
    "fromkeys": lambda root: Mapping.fromkeys(["a", "b"], {"v": 1}),
    "slice": lambda root: root["l"][:],
}


@pytest.mark.parametrize("make", CONSTRUCTIONS.values(), ids=CONSTRUCTIONS.keys())
def test_every_way_to_make_a_node_converts_what_it_holds(store, make):
    """Whatever a node is built from, dicts and lists inside it become nodes too."""
    store.run(lambda root: root.update(l=[{"v": 0}], m={"a": {"v": 0}}, f={1: {"v": 0}, "a": 2}))

    def build(root: Any) -> Any:
        root["built"] = make(root)
        return kinds(root["built"])

    shape = store.run(build)
    assert "dict" not in repr(shape) and "'list'" not in repr(shape)


CHANGES = {
    "append": lambda root: root["l"].append({"v": 1}),
    "extend": lambda root: root["l"].extend([{"v": 1}]),
    "+=": lambda root: root.__setitem__("l", _iadd(root["l"], [{"v": 1}])),
    "insert": lambda root: root["l"].insert(0, {"v": 1}),
    "slice assignment": lambda root: root["l"].__setitem__(slice(0, 0), [{"v": 1}]),
    "list item": lambda root: root["l"].__setitem__(0, {"v": 1}),
    "l = l + [...]": lambda root: root.__setitem__("l", root["l"] + [{"v": 1}]),
    "setdefault": lambda root: root["m"].setdefault("new", {"v": 1}),
    "update(dict)": lambda root: root["m"].update({"new": {"v": 1}}),
    "update(pairs)": lambda root: root["m"].update([("new", {"v": 1})]),
    "update(kwargs)": lambda root: root["m"].update(new={"v": 1}),
    "|=": lambda root: root.__setitem__("m", _ior(root["m"], {"new": {"v": 1}})),
    "flat |=": lambda root: root.__setitem__("f", _ior(root["f"], {"new": {"v": 1}})),
    "flat update": lambda root: root["f"].update(new={"v": 1}),
    "flat setdefault": lambda root: root["f"].setdefault("new", {"v": 1}),
}


def _iadd(node: Any, other: Any) -> Any:
    node += other
    return node


def _ior(node: Any, other: Any) -> Any:
    node |= other
    return node


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_every_way_into_a_node_converts_so_later_changes_are_committed(store, change):
    """What went in plain is a node: a later change inside it, in another call, is stored."""
    store.run(lambda root: root.update(l=["first"], m={}, f={1: "int key", "a": "str key"}))
    store.run(change)

    def find_new(root: Any) -> Any:
        for name in ("l", "m", "f"):
            for value in root[name] if name == "l" else root[name].values():
                if isinstance(value, Mapping | FlatMapping) and "v" in value:
                    return value
        raise AssertionError("the new value is not in the tree")

    store.run(lambda root: find_new(root).__setitem__("v", 2))
    assert store.run(lambda root: dict(find_new(root))) == {"v": 2}


def test_a_value_nested_past_the_recursion_limit_is_stored_by_assignment(store):
    """Conversion keeps its own stack: any depth of dicts and lists converts and reads back."""
    depth = sys.getrecursionlimit() * 3
    deep: Any = []
    for i in range(depth):
        deep = [deep] if i % 2 else {"c": deep}
    store.run(lambda root: root.__setitem__("deep", deep))
    plain = store.run(lambda root: root["deep"])
    levels = 0
    while plain:
        plain = plain["c"] if isinstance(plain, dict) else plain[0]
        levels += 1
    assert levels == depth


def test_conversion_shares_what_the_value_shares_as_python_does():
    """One object reached from several places becomes one node: changes show through each."""
    shared = {"n": [1]}
    pair = (shared, 2)
    node = to_persistent({"a": shared, "b": [shared, pair, pair]})
    assert node["a"] is node["b"][0] is node["b"][1][0]
    assert node["b"][1] is node["b"][2]  # a tuple reached twice is rebuilt once
    node["a"]["n"].append(2)
    assert node["b"][0]["n"] == [1, 2]


def test_values_holding_nothing_to_convert_are_kept_as_they_are():
    point = collections.namedtuple("point", "x y")
    values = [(1, "a"), frozenset({1, 2}), point(1, 2)]
    node = to_persistent(values)
    assert all(kept is value for kept, value in zip(node, values, strict=True))
    rebuilt = to_persistent([point([1], 2)])
    assert type(rebuilt[0]) is point and type(rebuilt[0].x) is List


def test_tuples_nested_too_deep_to_pickle_are_refused_with_the_path():
    """Tuples live inside their node's record, pickled recursively: deep ones are refused."""
    deep: Any = [1]
    for _ in range(200):
        deep = (deep,)
    with pytest.raises(UnstorableValueError, match=r"^a/0(/0)*: tuples and frozensets nested"):
        to_persistent({"a": [deep]})
    key: Any = 1
    for _ in range(200):
        key = (key,)
    with pytest.raises(UnstorableValueError, match=r"^m/.*nested more than"):
        to_persistent({"m": {key: 1}})


def test_a_cycle_through_a_tuple_is_refused_with_its_path():
    loop: list[Any] = [1]
    loop.append(({"back": loop},))
    with pytest.raises(UnstorableValueError, match=r"^x/1/0/back: contains itself"):
        to_persistent({"x": loop})


def test_plain_objects_inside_set_elements_are_refused_at_the_set():
    class Plain:
        pass

    with pytest.raises(UnstorableValueError, match=r"^s: .*Plain.*key or set element"):
        to_persistent({"s": {1, (2, Plain())}})


def test_a_node_of_another_transaction_is_refused_by_assignment_and_import(store):
    store.run(lambda root: root.__setitem__("m", {"v": 1}))
    with store.snapshot() as snap:
        loaded = snap.root["m"]
        message = r"^copy/0: this Mapping already belongs to another transaction"
        with pytest.raises(UnstorableValueError, match=message):
            store.run(lambda root: root.__setitem__("copy", [loaded]))
        with pytest.raises(UnstorableValueError, match=message):
            store.import_tree({"copy": [loaded]})
    assert store.run(lambda root: "copy" in root) is False


#: Reads of a snapshot's nodes that make a new node, as their plain versions make a new
#: dict or list: inside a write call they were refused as storing another transaction's node.
NEW_FROM_SNAPSHOT = {
    "l[0:2]": lambda root: root["l"][0:2],
    "l * 2": lambda root: root["l"] * 2,
    "[] + l": lambda root: [] + root["l"],
    "l.copy()": lambda root: root["l"].copy(),
    "{} | m": lambda root: {} | root["m"],
    "fromkeys": lambda root: Mapping.fromkeys(["k"], root["m"]["b"]),
}


@pytest.mark.parametrize("read", NEW_FROM_SNAPSHOT.values(), ids=NEW_FROM_SNAPSHOT.keys())
def test_a_snapshot_read_inside_a_write_call_makes_new_nodes_as_outside(store, read):
    state = {"l": [3, {"k": 2}], "m": {"a": 1, "b": {"x": 1}}}
    store.run(lambda root: root.update(copy.deepcopy(state)))
    with store.snapshot() as snap:
        outside = to_plain(read(snap.root))

    def inside(root: Any) -> Any:
        with store.snapshot() as snap:
            return to_plain(read(snap.root))

    assert store.run(inside) == outside == read(copy.deepcopy(state))


@pytest.mark.parametrize("how", ["run", "transaction", "run_batched"])
def test_storing_a_new_node_that_holds_a_snapshots_node_is_refused_with_its_path(store, how):
    """The new node is stored, and its snapshot's node would be a reference into another
    connection: ZODB's bare InvalidObjectReference at commit becomes the conversion's error
    and path; nothing is committed."""
    store.run(lambda root: root.update(l=[3, {"k": 2}], deep={"a": [1]}))
    with store.snapshot() as snap:
        made = snap.root["l"][0:2]

        def put(root: Any) -> None:
            root["deep"]["a"].append(made)

        message = r"^deep/a/1: this List holds a Mapping of another transaction"
        with pytest.raises(UnstorableValueError, match=message):
            if how == "transaction":
                with store.transaction() as root:
                    put(root)
            else:
                getattr(store, how)(put)
    assert store.run(lambda root: root["deep"]) == {"a": [1]}


# -- operators, equality, hashing ----------------------------------------------------------


@pytest.mark.parametrize("node_type", [Mapping, FlatMapping])
def test_or_and_ior_merge_like_dict(node_type):
    plain = {"mode": "slow", "retries": 3}
    node = node_type(plain)
    assert node | {"mode": "fast"} == plain | {"mode": "fast"}
    assert {"mode": "fast", "x": 1} | node == {"mode": "fast", "x": 1} | plain
    merged = node
    merged |= {"mode": "fast", "new": [1]}
    assert merged is node
    assert node == {"mode": "fast", "retries": 3, "new": [1]}
    assert isinstance(node["new"], List)
    with pytest.raises(TypeError):
        node | [("a", 1)]  # dict refuses a non-mapping too


def test_ior_on_a_stored_mapping_merges_and_keeps_every_value(store):
    store.run(lambda root: root.update(settings={"mode": "slow", "limits": {"n": 1}}))

    def merge(root: Any) -> None:
        root["settings"] |= {"mode": "fast"}

    store.run(merge)
    assert store.run(lambda root: root["settings"]) == {"mode": "fast", "limits": {"n": 1}}
    assert store.run(lambda root: type(root["settings"]).__name__) == "Mapping"


def test_btree_key_set_operators_are_not_offered_since_dict_has_none():
    node = Mapping(a=1)
    for operation in (lambda: node & {"a": 1}, lambda: node - {"a": 1}):
        with pytest.raises(TypeError):
            operation()


def test_nodes_compare_by_contents_like_the_plain_values():
    plain = {"a": 1, "b": {"c": [1, 2]}}
    assert Mapping(plain) == plain and plain == Mapping(plain)
    assert Mapping(plain) == Mapping(plain)
    assert Mapping(plain) != Mapping({"a": 2})
    assert (Mapping(plain) != plain) is False
    assert FlatMapping({1: "x", "a": {"b": 1}}) == {1: "x", "a": {"b": 1}}
    assert FlatMapping({"a": 1}) == Mapping({"a": 1})
    assert List([{"n": 1}, {"n": 2}]) == [{"n": 1}, {"n": 2}]
    assert [{"n": 1}] == List([{"n": 1}])  # noqa: SIM300 - the reflected comparison
    assert Set({1, 2}) == {1, 2} and {1, 2} == Set({1, 2}) and Set({1}) != {2}
    assert Mapping({"a": 1}) != [("a", 1)]


@pytest.mark.parametrize(
    "node", [Mapping(), FlatMapping(), List(), Set()], ids=lambda node: type(node).__name__
)
def test_nodes_are_unhashable_like_dicts_lists_and_sets(node):
    with pytest.raises(TypeError, match="unhashable"):
        hash(node)


def test_repr_shows_contents_like_the_plain_value():
    node = Mapping({"a": [1, {"b": {2}}]})
    assert repr(node) == repr({"a": [1, {"b": {2}}]})
    assert repr(FlatMapping({1: "x", "a": None})) == repr({1: "x", "a": None})
    assert repr(Set()) == "set()"


# -- iteration -------------------------------------------------------------------------

ITERATIONS = {
    "iter": lambda d: iter(d),
    "keys": lambda d: iter(d.keys()),
    "values": lambda d: iter(d.values()),
    "items": lambda d: iter(d.items()),
}


@pytest.mark.parametrize("iterate", ITERATIONS.values(), ids=ITERATIONS.keys())
@pytest.mark.parametrize("make", [dict, Mapping, FlatMapping], ids=lambda t: t.__name__)
def test_deleting_while_iterating_raises_like_a_dict(make, iterate):
    d = make({f"k{i}": i for i in range(10)})
    keys = list(d)
    with pytest.raises(RuntimeError, match="changed size during iteration"):
        for i, _ in enumerate(iterate(d)):
            del d[keys[i]]
    assert len(d) == 9  # one deletion happened, as in a dict, then the iteration stopped


@pytest.mark.parametrize("make", [dict, Mapping, FlatMapping], ids=lambda t: t.__name__)
def test_adding_while_iterating_raises_like_a_dict(make):
    d = make({1: 1})
    with pytest.raises(RuntimeError):
        for key in d:
            d[key + 1] = 1


@pytest.mark.parametrize("make", [dict, Mapping, FlatMapping], ids=lambda t: t.__name__)
def test_replacing_values_while_iterating_is_allowed_like_a_dict(make):
    d = make({f"k{i}": i for i in range(100)})
    for key in d:
        d[key] = d[key] * 2
    assert dict(d) == {f"k{i}": 2 * i for i in range(100)}


def test_a_change_then_break_is_allowed_like_a_dict():
    d = Mapping({"a": 1, "b": 2})
    for key in d:
        del d[key]
        break
    assert d == {"b": 2}
    assert list(d) == ["b"]  # the abandoned iteration left no watch behind


def test_deleting_every_key_while_iterating_in_a_store_commits_nothing(store):
    store.run(lambda root: root.update(d={f"k{i}": i for i in range(10)}))

    def clear_by_iterating(root: Any) -> None:
        for key in root["d"].keys():  # noqa: SIM118 - the case the issue reported
            del root["d"][key]

    with pytest.raises(RuntimeError, match="changed size during iteration"):
        store.run(clear_by_iterating)
    assert store.run(lambda root: len(root["d"])) == 10


def test_a_large_mapping_iterates_in_key_order_across_buckets():
    node = Mapping({f"k{i:05}": i for i in range(5000)})
    assert list(node) == sorted(node)
    assert list(reversed(node)) == sorted(node, reverse=True)
    assert list(node.items())[:2] == [("k00000", 0), ("k00001", 1)]


# -- plain objects changed after they were stored ---------------------------------------------


def test_a_change_through_the_original_dict_fails_the_commit_with_its_path(store):
    store.run(lambda root: root.update(customers={}))

    def add_customer(root: Any) -> None:
        c = {"orders": []}
        root["customers"]["ann"] = c
        c["orders"].append(1)  # the tree holds a copy: this would be lost

    with pytest.raises(MisuseError, match=r"^customers/ann/orders: the list stored there was"):
        store.run(add_customer)
    assert store.run(lambda root: dict(root["customers"])) == {}


def test_a_change_to_a_dict_after_appending_it_fails_the_commit(store):
    store.run(lambda root: root.update(log=[]))

    def append_then_fill(root: Any) -> None:
        entry: dict[str, int] = {}
        root["log"].append(entry)
        entry["n"] = 1

    with pytest.raises(MisuseError, match=r"^log/0: the dict stored there was changed"):
        store.run(append_then_fill)
    assert store.run(lambda root: list(root["log"])) == []


@pytest.mark.parametrize(
    ("before", "after"),
    [(1, True), (0.0, -0.0), (decimal.Decimal("1.0"), decimal.Decimal("1.00")), (1, 1.0)],
    ids=["int-to-bool", "zero-sign", "decimal-digits", "int-to-float"],
)
def test_a_change_to_an_equal_value_of_another_kind_fails_the_commit(store, before, after):
    """1 == True, but a dump of the tree would say 1: the change would be lost all the same."""

    def assign_then_change(root: Any) -> None:
        row = {"v": before}
        values = [before]
        root["row"] = row
        root["values"] = values
        row["v"] = after
        values[0] = after

    with pytest.raises(MisuseError, match=r"^(row|values): the (dict|list) stored there"):
        store.run(assign_then_change)
    assert store.run(lambda root: "row" in root) is False


#: Changes through the original that == cannot see: inside a tuple, a key, a set element,
#: a container put in place of another.
HIDDEN_CHANGES = {
    "in a tuple": lambda x: x.__setitem__("t", (True, 2)),
    "zero in a tuple": lambda x: x.__setitem__("z", (-0.0,)),
    "a key": lambda x: (x.__delitem__(1), x.__setitem__(True, "one")),
    "a set element": lambda x: (x["s"].discard(1), x["s"].add(True)),
    "a replaced dict": lambda x: x.__setitem__("sub", {"a": True}),
}


@pytest.mark.parametrize("change", HIDDEN_CHANGES.values(), ids=HIDDEN_CHANGES.keys())
def test_an_equal_change_inside_keys_sets_and_tuples_fails_the_commit_too(store, change):
    """The commit check compared keys, set elements and tuple items by == only: the tree
    kept (1, 2), {1} and the key 1 where Python's object held True (a review found it)."""

    def assign_then_change(root: Any) -> None:
        x = {"t": (1, 2), "z": (0.0,), 1: "one", "s": {1}, "sub": {"a": 1}}
        root["x"] = x
        change(x)

    with pytest.raises(MisuseError, match=r"^x(/s)?: the (dict|set) stored there was changed"):
        store.run(assign_then_change)
    assert store.run(lambda root: "x" in root) is False


def test_the_same_values_assigned_again_through_the_original_still_commit(store):
    def assign_then_repeat(root: Any) -> None:
        x = {"t": (1, 2), "s": {1}, "sub": {"a": 1}}
        root["x"] = x
        x["t"], x["s"], x["sub"] = (1, 2), {1}, {"a": 1}  # new objects, the same values

    store.run(assign_then_repeat)
    assert store.run(lambda root: root["x"]) == {"t": (1, 2), "s": {1}, "sub": {"a": 1}}


def test_an_equal_value_assigned_again_through_the_original_loses_nothing(store):
    def reassign(root: Any) -> None:
        row = {"name": "ann", "n": [1]}
        root["row"] = row
        row["name"] = "".join(["a", "nn"])  # another str object, the same value

    store.run(reassign)
    assert store.run(lambda root: root["row"]) == {"name": "ann", "n": [1]}


def test_a_change_through_the_original_in_a_transaction_block_commits_nothing(store):
    store.run(lambda root: root.update(items={}))
    with pytest.raises(MisuseError), store.transaction() as root:
        item = {"qty": 1}
        root["items"]["a"] = item
        item["qty"] = 2
    assert store.run(lambda root: dict(root["items"])) == {}


def test_a_free_standing_node_built_inside_a_call_is_checked_too(store):
    def build_then_change(root: Any) -> None:
        rows = [{"n": 1}]
        root["table"] = List(rows)
        rows[0]["n"] = 2

    with pytest.raises(MisuseError, match=r"^table/0: the dict"):
        store.run(build_then_change)
    assert store.run(lambda root: "table" in root) is False


def test_changes_through_the_tree_after_assignment_commit(store):
    def add_then_change_through_tree(root: Any) -> None:
        c = {"orders": [], "tags": set()}
        root["c"] = c
        root["c"]["orders"].append({"n": 1})
        root["c"]["orders"][0]["n"] = 2
        root["c"]["tags"].add("vip")
        root["c"]["name"] = "ann"

    store.run(add_then_change_through_tree)
    assert store.run(lambda root: root["c"]) == {
        "orders": [{"n": 2}],
        "tags": {"vip"},
        "name": "ann",
    }


def test_the_same_object_assigned_twice_is_one_shared_node_as_in_python(store):
    def alias(root: Any) -> bool:
        shared = {"n": 0}
        root["a"] = shared
        root["b"] = shared
        root["pair"] = [shared, shared]
        root["a"]["n"] = 1
        return root["b"] is root["a"] and root["pair"][1] is root["a"]

    assert store.run(alias) is True
    assert store.run(lambda root: (root["b"]["n"], root["pair"][0]["n"])) == (1, 1)


def test_a_conversion_that_is_thrown_away_does_not_fail_the_commit(store):
    def throwaway(root: Any) -> None:
        rows = [{"n": 1}]
        List(rows)  # built and dropped: nothing of it is stored
        rows[0]["n"] = 2
        root["ok"] = True

    store.run(throwaway)
    assert store.run(lambda root: root["ok"]) is True


def test_outside_a_store_call_assignment_copies(store):
    """A documented difference: without a transaction there is no commit to refuse."""
    original = {"n": 1}
    node = Mapping(a=original)
    original["n"] = 2
    assert node == {"a": {"n": 1}}


# -- keys ---------------------------------------------------------------------------------------

NAIVE = datetime.datetime(2026, 1, 1)
AWARE = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("existing", "key"),
    [({"a": 1}, 5), ({1: "x"}, "a"), ({NAIVE: 1}, AWARE), ({(1, "a"): 1}, (1, 2))],
    ids=["int into str", "str into int", "aware into naive", "tuple of other types"],
)
def test_a_key_the_mapping_cannot_order_is_refused_with_path_before_anything_changes(
    store, existing, key
):
    store.run(lambda root: root.update(m=existing))
    with pytest.raises(UnstorableValueError, match=r"^m/.*cannot be ordered.*convert the key"):
        store.run(lambda root: root["m"].__setitem__(key, 1))

    def update_with_one_bad_key(root: Any) -> None:
        root["m"].update([("zz" if isinstance(key, int) else 99, 2), (key, 1)])

    with pytest.raises(UnstorableValueError):
        store.run(update_with_one_bad_key)
    assert store.run(lambda root: root["m"]) == existing


def test_an_update_refused_midway_undoes_what_it_inserted():
    node = Mapping({"b": 1})
    with pytest.raises(UnstorableValueError):
        node.update([("a", 2), ("b", 3), ("c", 4), (5, 5)])
    assert node == {"b": 1}
    # two new keys that do not order against each other, found only while inserting
    node = Mapping()
    with pytest.raises(UnstorableValueError):
        node.update([((1, "x"), 1), ((1, 2), 2)])
    assert node == {}


def test_lookups_with_a_key_of_another_type_answer_like_a_dict():
    node = Mapping({"a": 1})
    assert 5 not in node
    assert node.get(5) is None and node.get(5, "d") == "d"
    assert node.pop(5, "d") == "d"
    with pytest.raises(KeyError):
        node[5]
    with pytest.raises(KeyError):
        del node[5]


#: Reads and operators whose answer, or exception, a review found differed from plain
#: Python's: each is run on the plain value and, inside a call, on its node.
AS_PLAIN = {
    "[1] in m": ("m", lambda v: [1] in v),
    "m.get([1])": ("m", lambda v: v.get([1])),
    "m[[1]]": ("m", lambda v: v[[1]]),
    "del m[[1]]": ("m", lambda v: v.__delitem__([1])),
    "m.pop([1], 0)": ("m", lambda v: v.pop([1], 0)),
    "[1] in empty": ("e", lambda v: [1] in v),
    "empty[[1]]": ("e", lambda v: v[[1]]),
    "empty.pop([1], 0)": ("e", lambda v: v.pop([1], 0)),
    "1+0j in m": ("m", lambda v: 1 + 0j in v),
    "m[2+0j]": ("m", lambda v: v[2 + 0j]),
    "m.get(2+1j)": ("m", lambda v: v.get(2 + 1j)),
    "m.pop(1+0j), m": ("m", lambda v: (v.pop(1 + 0j), dict(v))),
    "del m[2+0j], m": ("m", lambda v: (v.__delitem__(2 + 0j), dict(v))),
    "1 in m.items()": ("m", lambda v: 1 in v.items()),
    "(1,) in m.items()": ("m", lambda v: (1,) in v.items()),
    "(1, 'one') in m.items()": ("m", lambda v: (1, "one") in v.items()),
    "1 in f.items()": ("f", lambda v: 1 in v.items()),
    "l + (4,)": ("l", lambda v: v + (4,)),  # noqa: RUF005 - the concatenation is the test
    "(4,) + l": ("l", lambda v: (4,) + v),  # noqa: RUF005
    "l + 'ab'": ("l", lambda v: v + "ab"),
    "[0] + l + [3]": ("l", lambda v: [0] + v + [3]),  # noqa: RUF005
    "frozenset | s": ("s", lambda v: frozenset({1, 7}) | v),
    "frozenset & s": ("s", lambda v: frozenset({1, 7}) & v),
    "frozenset - s": ("s", lambda v: frozenset({1, 7}) - v),
    "frozenset ^ s": ("s", lambda v: frozenset({1, 7}) ^ v),
    "set | s": ("s", lambda v: {1, 7} | v),
}
AS_PLAIN_STATE = {"m": {1: "one", 2: "two"}, "e": {}, "f": {1: "x", "a": "y"}, "l": [1, 2]}


def _outcome(operation: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        value = operation()
    except Exception as exc:
        return ("raises", type(exc))
    return ("gives", type(value) if isinstance(value, frozenset) else None, to_plain(value))


@pytest.mark.parametrize("case", AS_PLAIN.values(), ids=AS_PLAIN.keys())
def test_reads_and_operators_answer_or_raise_as_plain_python_does(store, case):
    """An unhashable key is a TypeError, even where the BTree never hashes it; a complex
    equal to an int key finds it; a list adds only lists; a frozenset on the left of a set
    operator gives a frozenset."""
    name, operation = case
    state = {**AS_PLAIN_STATE, "s": {1, 5}}
    store.run(lambda root: root.update(copy.deepcopy(state)))
    expected = _outcome(lambda: operation(copy.deepcopy(state)[name]))
    assert store.run(lambda root: _outcome(lambda: operation(root[name]))) == expected


@pytest.mark.parametrize(
    "nan",
    [float("nan"), decimal.Decimal("NaN"), decimal.Decimal("sNaN"), (1, float("nan"))],
    ids=["float", "Decimal", "sNaN", "in a tuple"],
)
def test_nan_keys_are_refused_with_the_path(store, nan):
    store.run(lambda root: root.update(prices={10.5: "x"}, flat={1: "a", "b": 2}))
    for target in ("prices", "flat"):
        with pytest.raises(UnstorableValueError, match=rf"^{target}/.*NaN cannot be a key"):
            store.run(lambda root, target=target: root[target].__setitem__(nan, "n"))
    if not isinstance(nan, decimal.Decimal) or not nan.is_snan():  # sNaN cannot hash at all
        with pytest.raises(UnstorableValueError, match=r"^new/.*NaN cannot be a key"):
            store.run(lambda root: root.update(new={0.5: "x", nan: "n", 19.0: "y"}))
    assert store.run(lambda root: ("new" in root, dict(root["prices"]))) == (False, {10.5: "x"})


def test_nan_keys_in_converted_dicts_are_refused_by_dict_node_with_the_path():
    with pytest.raises(UnstorableValueError, match=r"^model/prices/nan: NaN"):
        dict_node({10.5: 0, float("nan"): 0}, ["x", "n"], path="model/prices")


def test_a_dict_with_naive_and_aware_datetime_keys_is_stored_unordered_and_works(store):
    store.run(lambda root: root.update(when={NAIVE: "naive", AWARE: "aware"}))
    assert store.run(lambda root: type(root["when"]).__name__) == "FlatMapping"
    assert store.run(lambda root: (root["when"][NAIVE], root["when"][AWARE])) == (
        "naive",
        "aware",
    )


# -- a refused change leaves no trace ---------------------------------------------------------

MUTATIONS = {
    "m[k] = v": ("m", lambda n: n.__setitem__("a", "DANGER")),
    "del m[k]": ("m", lambda n: n.__delitem__("a")),
    "m.update": ("m", lambda n: n.update(mode="DANGER")),
    "m |=": ("m", lambda n: _ior(n, {"mode": "DANGER"})),
    "m.setdefault": ("m", lambda n: n.setdefault("mode", "DANGER")),
    "m.pop": ("m", lambda n: n.pop("a")),
    "m.popitem": ("m", lambda n: n.popitem()),
    "m.clear": ("m", lambda n: n.clear()),
    "m.insert": ("m", lambda n: n.insert("mode", "DANGER")),
    "m.__init__": ("m", lambda n: n.__init__(mode="DANGER")),
    "f[k] = v": ("f", lambda n: n.__setitem__("a", "DANGER")),
    "del f[k]": ("f", lambda n: n.__delitem__(1)),
    "f |=": ("f", lambda n: _ior(n, {"mode": "DANGER"})),
    "f.update": ("f", lambda n: n.update(mode="DANGER")),
    "f.setdefault": ("f", lambda n: n.setdefault("mode", "DANGER")),
    "f.pop": ("f", lambda n: n.pop(1)),
    "f.popitem": ("f", lambda n: n.popitem()),
    "f.clear": ("f", lambda n: n.clear()),
    "f.__init__": ("f", lambda n: n.__init__(mode="DANGER")),
    "l[i] = v": ("l", lambda n: n.__setitem__(0, "DANGER")),
    "l[:] = v": ("l", lambda n: n.__setitem__(slice(None), ["DANGER"])),
    "del l[i]": ("l", lambda n: n.__delitem__(0)),
    "l.append": ("l", lambda n: n.append("DANGER")),
    "l.extend": ("l", lambda n: n.extend(["DANGER"])),
    "l +=": ("l", lambda n: _iadd(n, ["DANGER"])),
    "l *=": ("l", lambda n: n.__imul__(2)),
    "l.insert": ("l", lambda n: n.insert(0, "DANGER")),
    "l.pop": ("l", lambda n: n.pop()),
    "l.remove": ("l", lambda n: n.remove(3)),
    "l.reverse": ("l", lambda n: n.reverse()),
    "l.sort": ("l", lambda n: n.sort()),
    "l.clear": ("l", lambda n: n.clear()),
    "l.__init__": ("l", lambda n: n.__init__(["DANGER"])),
    "s.add": ("s", lambda n: n.add("DANGER")),
    "s.discard": ("s", lambda n: n.discard(1)),
    "s.remove": ("s", lambda n: n.remove(1)),
    "s.pop": ("s", lambda n: n.pop()),
    "s.clear": ("s", lambda n: n.clear()),
    "s.update": ("s", lambda n: n.update({"DANGER"})),
    "s |=": ("s", lambda n: _ior(n, {"DANGER"})),
    "s &=": ("s", lambda n: n.__iand__({1})),
    "s -=": ("s", lambda n: n.__isub__({1})),
    "s ^=": ("s", lambda n: n.__ixor__({1})),
}

STATE = {"m": {"a": 1, "b": 2}, "f": {1: "x", "a": "y"}, "l": [3, 1, 2], "s": {1, 2}}


def _hold_in_snapshot(store: Any, name: str, mutate: Any) -> None:
    with store.snapshot() as snap:
        mutate(snap.root[name])


def _hold_from_another_thread(store: Any, name: str, mutate: Any) -> None:
    loaded, done = threading.Event(), threading.Event()
    shared: dict[str, Any] = {}
    errors: list[BaseException] = []

    def owner(root: Any) -> None:
        shared["node"] = root[name]
        loaded.set()
        assert done.wait(TIMEOUT)

    thread = threading.Thread(target=lambda: store.run(owner))
    thread.start()
    try:
        assert loaded.wait(TIMEOUT)
        try:
            mutate(shared["node"])
        except BaseException as exc:  # re-raised below, after the owner ends
            errors.append(exc)
    finally:
        done.set()
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=MUTATIONS.keys())
@pytest.mark.parametrize(
    "hold",
    [_hold_in_snapshot, _hold_from_another_thread],
    ids=["in a snapshot", "from another thread"],
)
def test_a_refused_change_leaves_no_trace_even_after_a_later_commit(store_uri, hold, mutation):
    """pool_size=1: the next calls reuse the very connection, and objects, the change touched."""
    name, mutate = mutation
    with snaptree.open(store_uri, pool_size=1) as store:
        store.run(lambda root: root.update(STATE))
        with pytest.raises(MisuseError):
            hold(store, name, mutate)
        store.run(lambda root: root.__setitem__("unrelated", 1))
        store.run(lambda root: root[name].__class__ and None)
        assert store.run(lambda root: root[name]) == STATE[name]


@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_a_change_after_the_transaction_is_refused_and_leaves_no_trace(store_uri, mutation):
    name, mutate = mutation
    with snaptree.open(store_uri, pool_size=1) as store:
        store.run(lambda root: root.update(STATE))
        kept: dict[str, Any] = {}
        store.run(lambda root: kept.setdefault("node", root[name]) and None)
        with pytest.raises(WrongThreadError, match="after its transaction ended"):
            mutate(kept["node"])
        store.run(lambda root: root.__setitem__("unrelated", 1))
        assert store.run(lambda root: root[name]) == STATE[name]


class Account(Persistent):
    """A user's own persistent class, changed the usual way for a plain list attribute."""

    def __init__(self) -> None:
        self.entries: list[int] = []

    def add(self, amount: int) -> None:
        self.entries.append(amount)
        self._p_changed = True  # persistent asks the connection only now, after the change


def _change_kept_after_call(store: Any, name: str, mutate: Any) -> None:
    kept: dict[str, Any] = {}
    store.run(lambda root: kept.setdefault("node", root[name]) and None)
    mutate(kept["node"])


@pytest.mark.parametrize(
    "hold",
    [_hold_in_snapshot, _change_kept_after_call, _hold_from_another_thread],
    ids=["in a snapshot", "after its call", "from another thread"],
)
def test_a_refused_change_to_a_users_own_object_is_discarded(store_uri, hold):
    """Its class changes a list in place, then sets _p_changed: refused after the change."""
    with snaptree.open(store_uri, pool_size=1) as store:
        store.run(lambda root: root.update(acct=Account()))
        with pytest.raises(MisuseError):
            hold(store, "acct", lambda acct: acct.add(666))
        assert store.run(lambda root: list(root["acct"].entries)) == []

        def touch(root: Any) -> None:
            root["acct"].note = "unrelated"

        store.run(touch)
        assert store.run(lambda root: list(root["acct"].entries)) == []


# -- reading back ------------------------------------------------------------------------------


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list) and value:
        value, depth = value[0], depth + 1
    return depth


@pytest.mark.slow
def test_to_plain_copies_a_50000_deep_tree_without_recursion():
    node = List()
    for _ in range(50_000):
        node = List([node])
    plain = to_plain(node)
    assert type(plain) is list and _depth(plain) == 50_000


@pytest.mark.slow  # seconds of work: with the torture tests in .ci/run
def test_a_50000_deep_imported_tree_reads_back_through_store_run():
    """The read-back walk is the same on every storage: memory:// shows it."""
    deep: list[Any] = []
    for _ in range(50_000):
        deep = [deep]
    with snaptree.open("memory://") as store:
        store.import_tree(deep, path="deep")
        plain = store.run(lambda root: root["deep"])
    assert type(plain) is list and _depth(plain) == 50_000


def test_to_plain_keeps_shared_nodes_shared_and_cycles_as_cycles():
    shared = Mapping(n=1)
    root = Mapping(a=shared, b=shared, l=List([shared]))
    plain = to_plain(root)
    assert plain["a"] is plain["b"] is plain["l"][0]
    cyclic = Mapping()
    cyclic["self"] = cyclic
    copied = to_plain(cyclic)
    assert copied["self"] is copied


def test_to_plain_gives_plain_types_at_every_level():
    node = to_persistent({"a": [{"b": {1, 2}}, (1, List([3]))], "c": snaptree.Counter()})
    plain = to_plain(node)
    assert plain == {"a": [{"b": {1, 2}}, (1, [3])], "c": 0}
    assert type(plain["a"][0]["b"]) is set and type(plain["a"][1][1]) is list


class Tagged(tuple):
    """A tuple subclass that is not a namedtuple: made from one iterable, as tuple is."""


Point = collections.namedtuple("Point", "x y")


def test_tuple_subclasses_read_back_as_themselves_with_their_items(store):
    """A one-string Tagged came back split into letters (``Tagged(*items)``)."""
    tree = {"one": [Tagged(("ab",))], "holding": [Tagged(("ab", [1]))], "point": Point(1, [2])}
    store.run(lambda root: root.update(tree))
    for read in (lambda root: {k: root[k] for k in tree}, lambda root: to_plain(root)):
        back = store.run(read)
        assert {k: back[k] for k in tree} == tree
        assert type(back["one"][0]) is Tagged and type(back["holding"][0]) is Tagged
        assert type(back["point"]) is Point


# -- pickle and copy ----------------------------------------------------------------------------

PLAIN = {"a": [1, {"b": {1, 2}}], "f": {1: "x", "y": [2]}, "t": (1, [2])}


def test_pickle_and_copy_of_nodes_give_plain_data():
    node = to_persistent(PLAIN)
    node["n"] = snaptree.Counter()
    expected = {**PLAIN, "n": 0}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        loaded = pickle.loads(pickle.dumps(node, protocol))
        assert loaded == expected and type(loaded) is dict
        assert type(loaded["f"]) is dict and type(loaded["a"][1]["b"]) is set
    deep = copy.deepcopy(node)
    assert deep == expected and type(deep["a"]) is list and type(deep["a"][1]) is dict
    shallow = copy.copy(node)
    assert type(shallow) is dict and shallow["a"] is node["a"]
    assert type(copy.copy(node["f"])) is dict and type(copy.copy(node["a"])) is list


def test_a_snapshot_dumped_with_pickle_loads_where_snaptree_is_not_installed(store, tmp_path):
    store.run(lambda root: root.update(PLAIN))
    path = tmp_path / "dump.pickle"
    with store.snapshot() as snap, path.open("wb") as f:
        pickle.dump(snap.root, f)
    code = (
        "import pickle, sys\n"
        f"data = pickle.load(open({str(path)!r}, 'rb'))\n"
        "assert 'snaptree' not in sys.modules and 'persistent' not in sys.modules\n"
        "print(repr(sorted(data.items(), key=repr)))\n"
    )
    # -S: no site-packages, so neither snaptree nor ZODB could be imported
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(sorted(PLAIN.items(), key=repr))


# -- ZODB's own storage of nodes is unaffected ---------------------------------------------------


def test_nodes_are_stored_as_nodes_and_load_back_after_reopening(tmp_path):
    path = str(tmp_path / "Data.fs")
    with snaptree.open(path) as store:
        store.run(lambda root: root.update(PLAIN, big={f"k{i:04}": i for i in range(1000)}))
        store.run(lambda root: root.update(hits=snaptree.Counter()))
        store.run(lambda root: root["hits"].add(2))
    with snaptree.open(path) as reopened:

        def load(root: Any) -> Any:
            return (
                kinds(root["a"]),
                type(root["a"][1]["b"]).__name__,
                type(root["f"]).__name__,
                type(root["big"]).__name__,
                root["hits"].value,
            )

        assert reopened.run(load) == (
            ("List", ["int", ("Mapping", {"b": "Set"})]),
            "Set",
            "FlatMapping",
            "Mapping",
            2,
        )
        assert reopened.run(lambda root: root["big"]) == {f"k{i:04}": i for i in range(1000)}
        assert reopened.run(lambda root: root["a"]) == PLAIN["a"]


def _two_writers(store: Any, first: Any, second: Any) -> None:
    """Both blocks read, then both write and commit: the second commit must be resolved."""
    both_read = threading.Barrier(2, timeout=TIMEOUT)
    first_done = threading.Event()
    errors: list[BaseException] = []

    def run(change: Any, wait_for_first: bool) -> None:
        try:
            with store.transaction() as root:
                root["target"].__len__()  # loaded before the other commits
                both_read.wait()
                if wait_for_first:
                    assert first_done.wait(TIMEOUT)
                change(root["target"])
            if not wait_for_first:
                first_done.set()
        except BaseException as exc:  # reported by the test below
            errors.append(exc)
            first_done.set()

    threads = [
        threading.Thread(target=run, args=(first, False)),
        threading.Thread(target=run, args=(second, True)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []


def test_concurrent_inserts_into_one_mapping_are_still_merged_by_btrees(store):
    store.run(lambda root: root.update(target={f"k{i:03}": i for i in range(20)}))
    _two_writers(store, lambda m: m.__setitem__("a-new", 1), lambda m: m.__setitem__("z-new", 2))
    target = store.run(lambda root: root["target"])
    assert target["a-new"] == 1 and target["z-new"] == 2 and len(target) == 22


def test_concurrent_changes_to_one_set_are_merged(store):
    store.run(lambda root: root.update(target={1, 2, 3}))
    _two_writers(store, lambda s: (s.add(10), s.discard(1)), lambda s: (s.add(20), s.discard(2)))
    assert store.run(lambda root: root["target"]) == {3, 10, 20}


def test_zodb_export_and_import_of_nodes_round_trip(store, tmp_path):
    store.run(lambda root: root.update(src=PLAIN))
    path = tmp_path / "src.zexp"
    with store.transaction() as root, path.open("wb") as f:
        root._p_jar.exportFile(root["src"]._p_oid, f)
    with store.transaction() as root, path.open("rb") as f:
        root["copy"] = root._p_jar.importFile(f)
    assert store.run(lambda root: (kinds(root["copy"]), root["copy"])) == (
        store.run(lambda root: kinds(root["src"])),
        PLAIN,
    )


# -- the port shown in docs/coming-from-dicts.md -------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "coming-from-dicts.md"


def _program(name: str) -> str:
    """The program shown under ``<!-- seed: name -->`` in the doc."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"<!-- seed: {name} -->\n```python\n(.*?)\n```", text, re.DOTALL)
    assert match, f"docs/coming-from-dicts.md has no '{name}' program"
    return match.group(1) + "\n"


def test_the_documented_port_changes_at_most_8_lines():
    before, after = _program("before").splitlines(), _program("after").splitlines()
    diff = list(difflib.unified_diff(before, after, lineterm="", n=0))
    added = [line for line in diff[2:] if line.startswith("+")]
    removed = [line for line in diff[2:] if line.startswith("-")]
    assert len(added) <= 8 and len(removed) <= 8, diff
    compile(_program("before"), "before.py", "exec")


@pytest.mark.slow  # seconds of work: with the torture tests in .ci/run
def test_the_documented_port_runs_its_threads_and_dumps_plain_data(tmp_path):
    source = _program("after")
    assert "SECONDS = 5\n" in source
    (tmp_path / "after.py").write_text(source.replace("SECONDS = 5\n", "SECONDS = 1\n"))
    run = subprocess.run(
        [sys.executable, "after.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout.endswith(" customers\n")
    check = (
        "import pickle, sys\n"
        "customers = pickle.load(open('customers.pickle', 'rb'))\n"
        "assert type(customers) is dict, type(customers)\n"
        "for c in customers.values():\n"
        "    assert type(c) is dict and type(c['orders']) is list and type(c['tags']) is set\n"
        "    assert all(type(o) is dict and set(o) == {'amount', 'paid'} for o in c['orders'])\n"
        "assert 'snaptree' not in sys.modules\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-S", "-c", check],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert loaded.returncode == 0, loaded.stderr


def test_every_node_is_stored_under_its_class_path_in_snaptree_tree(tmp_path: Path) -> None:
    """The class paths in the records are the storage format: moving a class breaks old files."""
    from ZODB.FileStorage import FileStorage
    from ZODB.utils import get_pickle_metadata

    path = tmp_path / "format.fs"
    with snaptree.open(str(path)) as store:
        store.run(
            lambda root: root.update(
                m={"a": {"b": 1}}, f={1: "x", "y": 2}, l=[[1]], s={1, 2}, c=snaptree.Counter()
            )
        )
    storage = FileStorage(str(path), read_only=True)
    try:
        stored = {
            get_pickle_metadata(record.data)
            for txn in storage.iterator()
            for record in txn
            if record.data
        }
    finally:
        storage.close()
    for name in ("Mapping", "FlatMapping", "List", "Set", "Counter"):
        assert ("snaptree.tree", name) in stored, (name, stored)


# -- a change that fails midway ---------------------------------------------------------


def _sort(node: Any) -> None:
    node.sort()


def _difference_update(node: Any) -> None:
    node.difference_update([1], 5)  # removes 1, then finds 5 is not iterable


@pytest.mark.parametrize(
    ("start", "fail"),
    [([1, 3, 2, None], _sort), ({1, 2, 3}, _difference_update)],
    ids=["list-sort", "set-difference-update"],
)
def test_a_change_that_fails_midway_is_undone_with_its_call_and_kept_if_caught(
    store: snaptree.Store, start: Any, fail: Any
) -> None:
    """Plain list.sort and set.difference_update leave a half-done change when they raise.

    Uncaught, the call is aborted and the node is as before, also for the next call of the
    same thread (whose connection cached it); caught, the call commits what plain Python holds.
    """
    store.run(lambda root: root.__setitem__("n", start))
    with pytest.raises(TypeError):
        store.run(lambda root: fail(root["n"]))
    assert store.run(lambda root: root["n"]) == start
    store.run(lambda root: root.__setitem__("other", 1))  # an unrelated commit, same thread
    with store.snapshot() as snap:
        assert to_plain(snap.root["n"]) == start

    plain = copy.copy(start)
    with pytest.raises(TypeError):
        fail(plain)
    assert plain != start  # plain Python is left half-changed

    def caught(root: Any) -> None:
        try:
            fail(root["n"])
        except TypeError:
            pass

    store.run(caught)
    with store.snapshot() as snap:
        assert to_plain(snap.root["n"]) == plain


# -- concurrent changes to one set ----------------------------------------------------------


@pytest.mark.parametrize("claim", ["remove", "add"])
def test_two_threads_never_both_claim_one_element_of_a_set(store: snaptree.Store, claim: str):
    """Both read the set, both change the same element, then both commit: one is retried.

    Changes to different elements merge; removing (or adding) the same element twice
    conflicts, so a set used as a queue or a claim list never hands one element out twice.
    """
    store.run(lambda root: root.__setitem__("s", {"job1", "job2"} if claim == "remove" else set()))
    both_read = threading.Barrier(2, timeout=10)
    attempts: collections.Counter[str] = collections.Counter()
    results: dict[str, str] = {}

    def take(root: Any, who: str) -> str:
        attempts[who] += 1
        elements = root["s"]
        if claim == "remove":
            got = "job1" in elements
            elements.discard("job1")
        else:
            got = "token" not in elements
            elements.add("token")
        if attempts[who] == 1:
            both_read.wait()  # neither commits before both have changed the set
        return "claimed" if got else "taken"

    def worker(who: str) -> None:
        results[who] = store.run(take, who)

    threads = [threading.Thread(target=worker, args=(who,)) for who in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results.values()) == ["claimed", "taken"]
    assert sum(attempts.values()) == 3  # the later commit conflicted and ran again
    expected = {"job2"} if claim == "remove" else {"token"}
    assert store.run(lambda root: root["s"]) == expected


def test_changes_to_different_elements_of_a_set_still_merge(store: snaptree.Store) -> None:
    store.run(lambda root: root.__setitem__("s", {"a", "b"}))
    both_read = threading.Barrier(2, timeout=10)
    attempts: collections.Counter[str] = collections.Counter()

    def change(root: Any, remove: str, add: str) -> None:
        attempts[remove] += 1
        root["s"].discard(remove)
        root["s"].add(add)
        if attempts[remove] == 1:
            both_read.wait()

    threads = [
        threading.Thread(target=store.run, args=(change, remove, add))
        for remove, add in (("a", "x"), ("b", "y"))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert store.run(lambda root: root["s"]) == {"x", "y"}
    assert sum(attempts.values()) == 2  # merged: no retry


def test_a_dict_with_tuple_keys_that_do_not_order_keeps_every_key_findable(store):
    """Tuples holding frozensets sort without an error, by subset, which is no order."""
    keys = [(frozenset({i % 3, i % 5}), i % 2) for i in range(10)]
    data = {key: n for n, key in enumerate(keys)}
    store.run(lambda root: root.__setitem__("d", data))

    def look(root: Any) -> tuple[str, list[bool], list[Any]]:
        node = root["d"]
        return type(node).__name__, [key in node for key in keys], [node.get(k) for k in keys]

    kind, found, values = store.run(look)
    assert kind == "FlatMapping"
    assert all(found) and values == [data[key] for key in keys]
    assert store.run(lambda root: root["d"]) == data


def test_an_unhashable_key_is_a_type_error_in_every_lookup_as_in_a_dict(store):
    """A key of another type is absent; an unhashable one is a TypeError, as a dict says."""
    store.run(lambda root: root.__setitem__("m", {"a": 1, "b": 2}))

    def lookups(root: Any) -> list[str]:
        node, outcomes = root["m"], []
        for look in (
            lambda: node[[1]],
            lambda: node.get([1]),
            lambda: [1] in node,
            lambda: node.pop([1], None),
            lambda: node.__delitem__([1]),
        ):
            try:
                look()
                outcomes.append("ok")
            except TypeError:
                outcomes.append("TypeError")
        assert node.get(5) is None and 5 not in node  # another type: simply absent
        return outcomes

    assert store.run(lookups) == ["TypeError"] * 5
    assert store.run(lambda root: root["m"]) == {"a": 1, "b": 2}


def test_init_again_on_a_stored_mapping_updates_it_as_a_dicts_does(store):
    store.run(lambda root: root.update(m={"a": 1}, f={"a": 1, 2: "x"}))
    plain = {"a": 1, 2: "x"}
    plain.__init__({"b": 2})  # type: ignore[misc]
    store.run(lambda root: (root["m"].__init__({"b": 2}), root["f"].__init__({"b": 2})))
    assert store.run(lambda root: root["f"]) == plain
    assert store.run(lambda root: root["m"]) == {"a": 1, "b": 2}


def _doubling_tuple(levels: int) -> tuple[Any, ...]:
    """A tuple holding the same tuple twice, that one the next twice...: 2**levels tuples."""
    value: tuple[Any, ...] = ()
    for _ in range(levels):
        value = (value, value)
    return value


@pytest.mark.timeout(30)
def test_a_mapping_key_holding_the_same_tuple_twice_over_and_over_is_checked_once_per_tuple():
    """The key checks walked every path through it (2**60 here) and never returned; a
    Mapping compares keys without hashing them, so it is storable, and comes back shared."""
    key = _doubling_tuple(60)

    def levels(root: Any) -> int:
        (stored,) = list(root["m"])
        count = 0
        while stored:
            stored, again = stored
            assert again is stored
            count += 1
        return count

    with snaptree.open("memory://") as store:
        store.run(lambda root: root.update(m=Mapping()) or root["m"].__setitem__(key, 1))
        store.db.cacheMinimize()
        assert store.run(levels) == 60


def _nested(levels: int, inner: Any) -> tuple[Any, ...]:
    """*inner* inside *levels* one-item tuples."""
    for _ in range(levels):
        inner = (inner,)
    return inner


def test_a_tuple_held_again_deeper_is_checked_where_it_is_held_again(store):
    """The conversion converts a tuple once; met again 40 levels deeper, it was taken as it
    was converted, and a value 101 deep was stored (then no pickle export could write it)."""
    shallow = _nested(60, "x")  # 61 levels of tuples, within the 100 allowed
    with pytest.raises(UnstorableValueError, match="nested more than 100 deep"):
        store.run(lambda root: root.update(v=(shallow, _nested(40, shallow))))
    assert store.run(lambda root: "v" in root) is False
    store.run(lambda root: root.update(v=(shallow, _nested(39, shallow))))  # 100 deep: stored
    assert store.run(lambda root: root["v"][1]) == _nested(39, shallow)


def _doubling(levels: int) -> tuple[Any, ...]:
    """A tuple that holds the one before twice, *levels* times over: 2**levels leaves."""
    value: tuple[Any, ...] = ("leaf",)
    for _ in range(levels):
        value = (value, value)
    return value


def test_tuples_that_hold_the_same_tuple_twice_over_and_over_are_refused(store, tmp_path):
    """ZODB's record keeps one copy of each (a few hundred bytes), but every export wrote
    them out in full: 24 levels were a 100 MB dump, 40 would fill the disk at every export."""
    with pytest.raises(UnstorableValueError, match=r"^v/.*counting repeats") as info:
        store.run(lambda root: root.update(v=[1, {"deep": _doubling(24)}]))
    assert "values counting repeats" in str(info.value) and info.value.path.startswith("v/1/deep")
    assert store.run(lambda root: "v" in root) is False
    store.run(lambda root: root.update(v=_doubling(20)))  # a million leaves: still stored
    dump = tmp_path / "dump.pickle"
    store.export(dump)
    assert dump.stat().st_size < 10 * 2**20


def test_a_tuple_repeated_thousands_of_times_in_one_tuple_is_stored(store):
    """Repeats that the data spells out are ordinary: a tuple of a thousand pairs, held two
    thousand times by one tuple (6 million values counting repeats), is stored."""
    pairs = tuple((i, "x") for i in range(1_000))
    store.run(lambda root: root.update(v=tuple([pairs] * 2_000)))
    assert store.run(lambda root: (len(root["v"]), root["v"][1_999][999])) == (2_000, (999, "x"))
