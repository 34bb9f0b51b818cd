"""A node kept from a call is read inside a call, never silently stale or uncommitted.

A plain dict kept in a variable always shows its latest contents. A node
kept from a store call (in a global, a closure, an attribute) shows what
its connection's cache held when the call ended: another thread's later
commits are not in it. Read from another thread while its connection serves
a call, it showed that call's changes before they were committed. Both
were silent; both are refused now (WrongThreadError), whichever read method
is used, and the reads a call makes are unchanged.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
from persistent import Persistent

import snaptree
from _threads import run_threads
from snaptree import WrongThreadError

TIMEOUT = 30.0

STATE = {
    "m": {"a": 1, "b": 2},
    "f": {1: "x", "a": "y"},  # keys that do not order: a FlatMapping
    "l": [3, 1, 2],
    "s": {1, 2},
}

#: Read operations of each node kind, own and inherited: each must be checked.
READS = {
    "m[k]": ("m", lambda n: n["a"]),
    "m.get": ("m", lambda n: n.get("a")),
    "k in m": ("m", lambda n: "a" in n),
    "len(m)": ("m", len),
    "bool(m)": ("m", bool),
    "iter(m)": ("m", list),
    "m.items()": ("m", lambda n: list(n.items())),
    "len(m.keys())": ("m", lambda n: len(n.keys())),
    "m == {}": ("m", lambda n: n == {}),
    "repr(m)": ("m", repr),
    "m.copy()": ("m", lambda n: n.copy()),
    "copy.copy(m)": ("m", copy.copy),
    "m.minKey()": ("m", lambda n: n.minKey()),
    "m.has_key": ("m", lambda n: n.has_key("a")),
    "f[k]": ("f", lambda n: n[1]),
    "f.get": ("f", lambda n: n.get(1)),
    "len(f)": ("f", len),
    "iter(f)": ("f", list),
    "f.values()": ("f", lambda n: list(n.values())),
    "f == {}": ("f", lambda n: n == {}),
    "l[i]": ("l", lambda n: n[0]),
    "l[i:j]": ("l", lambda n: n[0:2]),
    "len(l)": ("l", len),
    "x in l": ("l", lambda n: 3 in n),
    "iter(l)": ("l", list),
    "l.index": ("l", lambda n: n.index(3)),
    "l.count": ("l", lambda n: n.count(3)),
    "l * 2": ("l", lambda n: n * 2),
    "l.copy()": ("l", lambda n: n.copy()),
    "l < []": ("l", lambda n: n < []),
    "repr(l)": ("l", repr),
    "x in s": ("s", lambda n: 1 in n),
    "len(s)": ("s", len),
    "iter(s)": ("s", list),
    "s | set()": ("s", lambda n: n | set()),
    "s.issubset": ("s", lambda n: n.issubset({1})),
    "s == set()": ("s", lambda n: n == set()),
    "to_plain(m)": ("m", snaptree.to_plain),
    "to_plain(m.items())": ("m", lambda n: snaptree.to_plain(n.items())),
    "to_plain([m])": ("m", lambda n: snaptree.to_plain([n])),
    "to_plain(f)": ("f", snaptree.to_plain),
    "to_plain(l)": ("l", snaptree.to_plain),
    "to_plain(s)": ("s", snaptree.to_plain),
    "int(counter)": ("c", int),
    "counter.value": ("c", lambda n: n.value),
}


def _fill(root: Any) -> None:
    root.update(STATE)
    root["c"] = snaptree.Counter()
    root["c"].add(5)


def _keep(store: snaptree.Store, name: str) -> Any:
    kept: dict[str, Any] = {}
    store.run(lambda root: kept.setdefault("node", root[name]) and None)
    return kept["node"]


@pytest.mark.parametrize("read", READS.values(), ids=READS.keys())
def test_reading_a_node_after_its_call_is_refused(store: snaptree.Store, read: Any) -> None:
    """Each read method, own or inherited from UserDict, UserList, Set, BTree or Length."""
    name, read_node = read
    store.run(_fill)
    node = _keep(store, name)
    with pytest.raises(WrongThreadError, match="after the call that loaded it ended"):
        read_node(node)


#: What the reads that a plain dict or int has no method for give inside a call.
NOT_PLAIN = {"m.minKey()": "a", "m.has_key": True, "int(counter)": 5, "counter.value": 5}


@pytest.mark.parametrize("read", READS.items(), ids=READS.keys())
def test_the_same_reads_inside_a_call_give_what_plain_python_gives(
    store: snaptree.Store, read: Any
) -> None:
    label, (name, read_node) = read
    store.run(_fill)
    inside = store.run(lambda root: snaptree.to_plain(read_node(root[name])))
    expected = NOT_PLAIN[label] if label in NOT_PLAIN else read_node(STATE[name])
    assert inside == expected


def test_a_kept_node_no_longer_reads_a_value_another_thread_replaced(store: snaptree.Store):
    """The silent case: another thread committed 2; the kept node still read 1."""
    store.run(lambda root: root.update(a={"x": 1}))
    node = _keep(store, "a")
    run_threads([lambda: store.run(lambda root: root["a"].__setitem__("x", 2))], TIMEOUT)
    with pytest.raises(WrongThreadError, match="not what other threads committed since"):
        node["x"]
    assert store.run(lambda root: root["a"]["x"]) == 2


def test_a_kept_node_cannot_show_another_calls_uncommitted_change(store: snaptree.Store):
    """Thread A's call changes the node and waits; thread B reads the node A kept. It read
    A's change before A committed (and A then failed: the value never existed)."""
    store.run(lambda root: root.update(a={"x": 1}))
    kept: dict[str, Any] = {}
    changed, read_done = threading.Event(), threading.Event()
    seen: list[Any] = []

    def a_call(root: Any) -> None:
        kept["node"] = root["a"]
        root["a"]["x"] = 666
        changed.set()
        assert read_done.wait(TIMEOUT)
        raise RuntimeError("the change is abandoned")

    def thread_a() -> None:
        with pytest.raises(RuntimeError, match="abandoned"):
            store.run(a_call)

    def thread_b() -> None:
        assert changed.wait(TIMEOUT)
        try:
            with pytest.raises(WrongThreadError, match="from another thread"):
                seen.append(kept["node"]["x"])
        finally:
            read_done.set()

    run_threads([thread_a, thread_b], TIMEOUT)
    assert seen == []
    assert store.run(lambda root: root["a"]["x"]) == 1


def test_a_snapshots_nodes_are_read_inside_the_snapshot_only(store: snaptree.Store):
    store.run(lambda root: root.update(a=[1, 2]))
    with store.snapshot() as snap:
        node = snap.root["a"]
        assert list(node) == [1, 2]
    with pytest.raises(WrongThreadError, match="after the call that loaded it ended"):
        list(node)


def test_a_kept_node_read_in_a_later_call_of_its_thread_is_current(store: snaptree.Store):
    """The thread's next call syncs the connection the node belongs to: there it is current."""
    store.run(lambda root: root.update(a={"x": 1}))
    node = _keep(store, "a")
    run_threads([lambda: store.run(lambda root: root["a"].__setitem__("x", 2))], TIMEOUT)
    assert store.run(lambda root: node["x"]) == 2


def test_free_standing_nodes_are_read_anywhere() -> None:
    """Nodes not in a store have no connection: they read as the plain values they hold."""
    node = snaptree.to_persistent({"a": [1, {2}]})
    assert node["a"][0] == 1 and 2 in node["a"][1] and len(node) == 1


class Box(Persistent):
    """A user's own persistent class: its attributes are not checked on reads, but a ghost's
    load is (the connection's setstate)."""

    def __init__(self, value: int) -> None:
        self.value = value


#: A kept object made a ghost, and how to read it: a node, and one of your own class.
GHOSTS = {
    "node": (lambda: {"x": 1}, lambda kept: kept["x"]),
    "your own class": (lambda: Box(1), lambda kept: kept.value),
}


@pytest.mark.parametrize("ghost", GHOSTS.values(), ids=GHOSTS.keys())
def test_a_kept_ghost_is_not_loaded_from_another_thread(store, ghost):
    """Loading it would put its state into the cache of a call another thread is running,
    from two threads at once: refused (for a node by its read check, for your own class by
    the connection's load), and the call commits what it meant to."""
    make, read = ghost
    store.run(lambda root: root.update(kept=make()))
    kept: dict[str, Any] = {}
    inside, finish = threading.Event(), threading.Event()

    def owner() -> None:
        store.run(lambda root: kept.update(it=root["kept"]))
        kept["it"]._p_deactivate()  # a ghost: reading it loads from the connection

        def hold(root: Any) -> None:
            root["other"] = 2  # the call has the connection; the kept object stays a ghost
            inside.set()
            assert finish.wait(TIMEOUT)

        store.run(hold)

    def intruder() -> None:
        assert inside.wait(TIMEOUT)
        try:
            with pytest.raises(WrongThreadError, match="from another thread"):
                read(kept["it"])
        finally:
            finish.set()

    run_threads([owner, intruder], TIMEOUT)
    assert store.run(lambda root: (read(root["kept"]), root["other"])) == (1, 2)
